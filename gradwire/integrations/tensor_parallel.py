"""Megatron-style tensor-parallel Linear layers whose backward collectives are compressed.

Only neural gradients are compressed (the forward activations travel exactly):

* ``ColumnParallelLinear`` (weight split along the output features): the input is replicated,
  so the gradient of the input is a sum over ranks: a compressed all-reduce in backward
  (``CopyToTensorParallel``). With sequence parallelism the input arrives split along the
  sequence (dim 0) and is all-gathered in forward; backward is a compressed reduce-scatter
  (``GatherFromSequenceParallel``).
* ``RowParallelLinear`` (weight split along the input features): forward sums the partial
  outputs with a plain all-reduce, whose backward is the identity (no communication). With
  sequence parallelism the forward is a reduce-scatter and the backward a compressed
  all-gather of the output gradient (``ReduceScatterToSequenceParallel``).

A ``BoundaryPolicy``-free design: each layer holds a codec and a step counter; seeds are
``derive_seed(base_seed, step, layer_id)`` (identical on every rank, so the collective seeds
agree), and every rank decodes the same packets, so replicated gradients are bit-identical.
``trace`` (a dict or None) records the packets of the last backward for inspection.

``CompressedColwiseParallel`` is the DTensor variant (``parallelize_module`` style).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn

from gradwire.codec.base import Codec
from gradwire.codec.registry import as_codec
from gradwire.comm.collectives import (compressed_all_gather, compressed_all_reduce,
                                       compressed_reduce_scatter)
from gradwire.numerics.rng import derive_seed


class TPComm:
    """What the autograd Functions need: codec, group, seed schedule, counters, trace."""

    def __init__(self, codec: Codec | Mapping[str, Any], group=None, base_seed: int = 0, layer_id: int = 0,
                 keep_trace: bool = False):
        codec = as_codec(codec)  # a Codec or a config mapping
        self.codec, self.group, self.base_seed, self.layer_id = codec, group, base_seed, layer_id
        self.step = 0  # incremented by the layer at each backward
        self.keep_trace = keep_trace
        self.trace: dict | None = None
        self.bytes_sent = 0
        self.raw_bytes = 0

    def seed(self) -> int:
        return derive_seed(self.base_seed, self.step, self.layer_id)

    def record(self, trace: dict) -> None:
        self.bytes_sent += trace["bytes_sent"]
        self.raw_bytes += trace["raw_bytes"]
        if self.keep_trace:
            self.trace = trace
        self.step += 1


class CopyToTensorParallel(torch.autograd.Function):
    """Forward: identity. Backward: compressed all-reduce (sum) of the input gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: TPComm) -> torch.Tensor:
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        comm, tr = ctx.comm, {}
        out = compressed_all_reduce(g.contiguous(), comm.codec, group=comm.group, seed=comm.seed(), trace=tr)
        comm.record(tr)
        return out, None


class GatherFromSequenceParallel(torch.autograd.Function):
    """Forward: all-gather along dim 0 (exact). Backward: compressed reduce-scatter."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: TPComm) -> torch.Tensor:
        ctx.comm = comm
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(comm.group))]
        dist.all_gather(parts, x.contiguous(), group=comm.group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        comm, tr = ctx.comm, {}
        out = compressed_reduce_scatter(g.contiguous(), comm.codec, group=comm.group, seed=comm.seed(), trace=tr)
        comm.record(tr)
        return out, None


class ReduceFromTensorParallel(torch.autograd.Function):
    """Forward: all-reduce (sum) of partial outputs, exact. Backward: identity."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None


class ReduceScatterToSequenceParallel(torch.autograd.Function):
    """Forward: reduce-scatter along dim 0 (exact). Backward: compressed all-gather."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: TPComm) -> torch.Tensor:
        ctx.comm = comm
        p = dist.get_world_size(comm.group)
        if x.shape[0] % p:
            raise ValueError(f"sequence length {x.shape[0]} is not divisible by the TP size {p}")
        # a real reduce-scatter (NCCL, and gloo since torch 2.x): each rank receives only its
        # slice, (p-1)/p of the bytes of an all-reduce followed by a slice
        y = x.new_empty((x.shape[0] // p, *x.shape[1:]))
        dist.reduce_scatter_tensor(y, x.contiguous(), group=comm.group)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        comm, tr = ctx.comm, {}
        out = compressed_all_gather(g.contiguous(), comm.codec, group=comm.group, seed=comm.seed(), trace=tr)
        comm.record(tr)
        return out, None


def _shard(full: torch.Tensor | None, dim: int, group) -> torch.Tensor | None:
    if full is None:
        return None
    p, r = dist.get_world_size(group), dist.get_rank(group)
    if full.shape[dim] % p:
        raise ValueError(f"dimension {dim} of size {full.shape[dim]} is not divisible by the TP size {p}")
    return full.chunk(p, dim=dim)[r].clone()


class ColumnParallelLinear(nn.Module):
    """y_local = x W_local^T + b_local, W split along the output features.

    ``gather_output``: all-gather the output features (exact forward; the backward of that
    gather is a slice, no communication). ``sequence_parallel``: x is split along dim 0.
    ``weight``/``bias``: the full (unsharded) initial values, identical on every rank.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, codec: Codec | Mapping[str, Any], *, group=None,
                 sequence_parallel: bool = False, gather_output: bool = False, base_seed: int = 0,
                 layer_id: int = 0, keep_trace: bool = False):
        super().__init__()
        self.weight = nn.Parameter(_shard(weight, 0, group))
        self.bias = nn.Parameter(_shard(bias, 0, group)) if bias is not None else None
        self.comm = TPComm(codec, group, base_seed, layer_id, keep_trace)
        self.sequence_parallel, self.gather_output = sequence_parallel, gather_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = GatherFromSequenceParallel.apply(x, self.comm)
        else:
            x = CopyToTensorParallel.apply(x, self.comm)
        y = nn.functional.linear(x, self.weight, self.bias)
        if self.gather_output:
            y = _GatherLastDim.apply(y, self.comm.group)
        return y


class _GatherLastDim(torch.autograd.Function):
    """Forward: all-gather along the last dim (exact). Backward: take this rank's slice."""

    @staticmethod
    def forward(ctx, y, group):
        ctx.group = group
        parts = [torch.empty_like(y) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, y.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, g):
        p, r = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return g.chunk(p, dim=-1)[r].contiguous(), None


class RowParallelLinear(nn.Module):
    """y = sum_r x_r W_r^T + b, W split along the input features; x arrives split (e.g. the
    output of a ColumnParallelLinear). The bias is added once, after the reduction."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, codec: Codec | Mapping[str, Any], *, group=None,
                 sequence_parallel: bool = False, base_seed: int = 0, layer_id: int = 0,
                 keep_trace: bool = False):
        super().__init__()
        self.weight = nn.Parameter(_shard(weight, 1, group))
        self.bias = nn.Parameter(bias.clone()) if bias is not None else None
        self.comm = TPComm(codec, group, base_seed, layer_id, keep_trace)
        self.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight)
        if self.sequence_parallel:
            y = ReduceScatterToSequenceParallel.apply(y, self.comm)
        else:
            y = ReduceFromTensorParallel.apply(y, self.comm.group)
        return y + self.bias if self.bias is not None else y


def compressed_colwise_parallel(codec: Codec | Mapping[str, Any], *, base_seed: int = 0, layer_id: int = 0,
                                keep_trace: bool = False) -> Any:
    """A DTensor ``ColwiseParallel`` style whose backward input-gradient all-reduce is
    compressed: the module's plain input goes through ``CopyToTensorParallel`` before it is
    wrapped as a replicated DTensor, and the gradient that reaches it is treated as a local
    partial sum (see ``CompressedColwiseParallel``)."""
    return CompressedColwiseParallel(codec, base_seed=base_seed, layer_id=layer_id, keep_trace=keep_trace)


try:  # DTensor tensor parallelism (torch >= 2.4)
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel
except ImportError:  # pragma: no cover - older torch
    ColwiseParallel = object


class CompressedColwiseParallel(ColwiseParallel):
    """``ColwiseParallel`` with a compressed backward all-reduce of the input gradient.

    Stock ``ColwiseParallel`` wraps the input as a ``Replicate`` DTensor; in backward the input
    gradient is ``Partial`` and DTensor all-reduces it (uncompressed) to ``Replicate``. Here the
    input is wrapped with ``grad_placements=[Partial]``-equivalent behaviour: we convert it
    ourselves, so DTensor hands back the local partial gradient, and ``CopyToTensorParallel``
    performs the compressed all-reduce.
    """

    def __init__(self, codec: Codec | Mapping[str, Any], *, base_seed: int = 0, layer_id: int = 0, keep_trace: bool = False):
        super().__init__()
        self._codec, self._seed, self._layer_id, self._keep = codec, base_seed, layer_id, keep_trace
        self.comm: TPComm | None = None

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        group = device_mesh.get_group()
        self.comm = TPComm(self._codec, group, self._seed, self._layer_id, self._keep)
        module._gradwire_comm = self.comm
        # the base class calls partial(self._prepare_input_fn, input_layouts, desired_layouts):
        # an instance attribute shadows its staticmethod
        self._prepare_input_fn = lambda _il, _dl, mod, inputs, mesh: \
            self._prepare_input_fn_compressed(mod, inputs, mesh)
        return super()._apply(module, device_mesh)

    def _prepare_input_fn_compressed(self, mod, inputs, device_mesh):
        from torch.distributed.tensor.placement_types import Partial

        x = inputs[0]
        if isinstance(x, DTensor):
            raise TypeError("CompressedColwiseParallel expects a plain (replicated) tensor input")
        x = CopyToTensorParallel.apply(x, self.comm)
        # grad_placements=Partial: the gradient reaching from_local stays the local partial sum
        # (no DTensor all-reduce); CopyToTensorParallel above does the compressed reduction.
        return DTensor.from_local(x, device_mesh, [Replicate()], run_check=False,
                                  grad_placements=[Partial()])
