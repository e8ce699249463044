"""Megatron-Core (0.16.x; ``pip install gradwire[megatron]``): compressed tensor-parallel backward
all-reduce and compressed pipeline-parallel gradient p2p.

Tensor parallelism: ``compress_tensor_parallel(codec)`` (one call; ``.disable()`` undoes it).
``ColumnParallelLinear``'s input-gradient all-reduce is a direct ``torch.distributed.all_reduce``
inside ``LinearWithGradAccumulationAndAsyncCommunication.backward`` (no hook or group argument can
reach it), so the call swaps that autograd Function, which ``linear_with_grad_accumulation_and_
async_allreduce`` looks up by module global at every call, for a subclass whose backward runs
Megatron's own with the all-reduce switched off and then all-reduces the input gradient through
gradwire's two-phase compressed all-reduce (``comm.compressed_all_reduce``: every TP rank
decodes the same packets, so the replicated input gradient stays bit-identical across the group).
Version-checked: other Megatron-Core versions are refused. Under sequence parallelism Megatron
reduce-scatters instead, on ``torch.cuda.current_device()``; that path is left to Megatron
(counted in ``counters["uncompressed_reduce_scatter"]``), as is the frozen-weight variant.

Pipeline parallelism: ``CompressedP2PCommunicator(pp_group, config, codec=...)``, passed as
``p2p_communicator=`` to Megatron's schedules: its ``_communicate`` sends each backward gradient
(``tensor_send_prev``) as a packet and decodes each received one (``recv_next``); activations
travel exactly. Fixed-rate codecs only (the receiver allocates ``packed_size(tensor_shape)``),
and not with ``variable_seq_lengths``, ``mtp_standalone`` or ``use_ring_exchange_p2p``. Buffers
live on the pp group's device (CPU under gloo, the current CUDA device under NCCL), so the
communicator itself runs on CPU; Megatron's schedule functions (``forward_backward_pipelining_
without_interleaving``) still allocate on ``"cuda"`` themselves (e.g. ``total_num_tokens``), so
a whole schedule runs on a GPU only.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import torch

from gradwire.codec.base import Codec
from gradwire.codec.registry import as_codec
from gradwire.comm.collectives import compressed_all_reduce
from gradwire.comm.handshake import check_group, default_device
from gradwire.numerics.rng import check_seed, derive_seed

SUPPORTED_VERSIONS = ("0.16.",)


def _megatron():
    try:
        import megatron.core as mcore
        from megatron.core import package_info
    except ImportError as e:
        raise ImportError("gradwire.integrations.megatron needs Megatron-Core 0.16.x: "
                          "pip install 'gradwire[megatron]'") from e
    if not package_info.__version__.startswith(SUPPORTED_VERSIONS):
        raise RuntimeError(f"gradwire supports Megatron-Core {SUPPORTED_VERSIONS}, found "
                           f"{package_info.__version__}: the patched backward follows that version's code")
    return mcore


# ------------------------------------------------------------------------------------------ TP
class TPCompression:
    """The active tensor-parallel compression (returned by ``compress_tensor_parallel``).

    ``counters``: ``all_reduces``, ``bytes_sent``, ``raw_bytes`` (what a ring all-reduce of the
    uncompressed gradients sends per rank) and ``uncompressed_reduce_scatter``. ``last_trace``:
    the trace of the last compressed all-reduce when ``keep_trace``.
    """

    def __init__(self, codec: Codec, base_seed: int, keep_trace: bool):
        self.codec, self.base_seed, self.keep_trace = codec, base_seed, keep_trace
        self.counters = {"all_reduces": 0, "bytes_sent": 0, "raw_bytes": 0, "uncompressed_reduce_scatter": 0}
        self.last_trace: dict | None = None
        self._original: Any = None

    def all_reduce(self, grad: torch.Tensor, group) -> torch.Tensor:
        # the n-th all-reduce of the run: the same n on every rank of the TP group
        seed = derive_seed(self.base_seed, self.counters["all_reduces"])
        trace: dict = {}
        out = compressed_all_reduce(grad, self.codec, group=group, seed=seed, trace=trace)
        self.counters["all_reduces"] += 1
        self.counters["bytes_sent"] += trace["bytes_sent"]
        self.counters["raw_bytes"] += trace["raw_bytes"]
        if self.keep_trace:
            self.last_trace = trace
        return out

    def disable(self) -> None:
        """Put Megatron's own autograd Function back."""
        global _ACTIVE
        if self._original is not None:
            from megatron.core.tensor_parallel import layers

            layers.LinearWithGradAccumulationAndAsyncCommunication = self._original
            self._original = None
        if _ACTIVE is self:
            _ACTIVE = None


_ACTIVE: TPCompression | None = None


@functools.lru_cache(maxsize=None)
def _compressed_function(base: type) -> type:
    """The subclass of Megatron's ``LinearWithGradAccumulationAndAsyncCommunication``."""

    class CompressedLinearWithGradAccumulation(base):
        @staticmethod
        def backward(ctx, grad_output):
            state = _ACTIVE
            if state is None or not ctx.allreduce_dgrad:
                if state is not None and ctx.sequence_parallel:
                    state.counters["uncompressed_reduce_scatter"] += 1
                return base.backward(ctx, grad_output)
            ctx.allreduce_dgrad = False  # Megatron computes every gradient but all-reduces nothing
            try:
                grads = base.backward(ctx, grad_output)
            finally:
                ctx.allreduce_dgrad = True
            return (state.all_reduce(grads[0], ctx.tp_group), *grads[1:])

    return CompressedLinearWithGradAccumulation


def compress_tensor_parallel(codec: Codec | Mapping[str, Any], *, base_seed: int = 0,
                             keep_trace: bool = False) -> TPCompression:
    """Compress the input-gradient all-reduce of every Megatron ``ColumnParallelLinear`` (and
    every other user of ``linear_with_grad_accumulation_and_async_allreduce``) from now on."""
    global _ACTIVE
    _megatron()
    from megatron.core.tensor_parallel import layers

    if _ACTIVE is not None:
        raise RuntimeError("tensor-parallel compression is already enabled; disable() it first")
    state = TPCompression(as_codec(codec), check_seed(base_seed), keep_trace)
    state._original = layers.LinearWithGradAccumulationAndAsyncCommunication
    layers.LinearWithGradAccumulationAndAsyncCommunication = _compressed_function(state._original)
    _ACTIVE = state
    return state


# ------------------------------------------------------------------------------------------ PP
def CompressedP2PCommunicator(pp_group, config, *, codec: Codec | Mapping[str, Any], base_seed: int = 0):
    """A Megatron ``P2PCommunicator`` whose backward gradients travel as packets (module doc).

    Collective over ``pp_group`` (the codec handshake): construct it on every pipeline rank."""
    _megatron()
    return _communicator_class()(pp_group, config, codec=codec, base_seed=base_seed)


@functools.lru_cache(maxsize=None)
def _communicator_class() -> type:
    from megatron.core.pipeline_parallel import p2p_communication as p2p

    class _CompressedP2PCommunicator(p2p.P2PCommunicator):
        def __init__(self, pp_group, config, *, codec, base_seed: int = 0):
            codec = as_codec(codec)  # checked before anything else is touched
            if not codec.fixed_rate:
                raise TypeError(f"Megatron pipeline p2p needs a fixed-rate codec; {codec!r} is variable-size")
            super().__init__(pp_group, config)
            self.codec = codec
            for flag in ("variable_seq_lengths", "mtp_standalone", "use_ring_exchange_p2p"):
                if getattr(config, flag, False):
                    raise ValueError(f"CompressedP2PCommunicator does not support config.{flag}")
            self.base_seed = check_seed(base_seed)
            self.device = default_device(pp_group)
            self.bytes_sent = self.raw_bytes_sent = self.n_sent = 0
            check_group(self.codec, pp_group, self.device)

        def _communicate(self, *, tensor_send_next, tensor_send_prev, recv_prev: bool, recv_next: bool,
                         tensor_shape, wait_on_reqs: bool = True):
            cfg, codec = self.config, self.codec
            if (recv_prev or recv_next) and (tensor_shape is None or cfg.pipeline_dtype is None):
                raise RuntimeError("tensor_shape and config.pipeline_dtype are needed to receive")
            recv_prev_t = (torch.empty(tensor_shape, requires_grad=True, device=self.device,
                                       dtype=cfg.pipeline_dtype) if recv_prev else None)
            send_prev_pk = None
            if tensor_send_prev is not None:
                g = tensor_send_prev.detach()
                send_prev_pk = codec.encode(g, seed=derive_seed(self.base_seed, self.n_sent, self.pp_group.rank()))
                self.n_sent += 1
                self.bytes_sent += send_prev_pk.numel()
                self.raw_bytes_sent += g.numel() * g.element_size()
            recv_next_pk = recv_next_t = None
            if recv_next:
                recv_next_pk = torch.empty(codec.packed_size(tuple(tensor_shape), cfg.pipeline_dtype),
                                           dtype=torch.uint8, device=self.device)
                recv_next_t = torch.empty(tensor_shape, requires_grad=True, device=self.device,
                                          dtype=cfg.pipeline_dtype)
            func = p2p._batched_p2p_ops if cfg.batch_p2p_comm else p2p._p2p_ops
            reqs = func(tensor_send_prev=send_prev_pk, tensor_recv_prev=recv_prev_t,
                        tensor_send_next=tensor_send_next, tensor_recv_next=recv_next_pk,
                        group=self.pp_group, prev_pipeline_rank=self.prev_rank,
                        next_pipeline_rank=self.next_rank)

            def decode() -> None:
                with torch.no_grad():
                    recv_next_t.copy_(codec.decode(recv_next_pk, dtype=cfg.pipeline_dtype).reshape(tensor_shape))

            if wait_on_reqs:
                for req in reqs if isinstance(reqs, list) else reqs.values():
                    req.wait()
                if recv_next:
                    decode()
                reqs = None
            elif recv_next:  # overlapped p2p (unbatched only): the caller waits on reqs["recv_next"]
                reqs["recv_next"] = _DecodeOnWait(reqs["recv_next"], decode)
            if cfg.batch_p2p_comm and cfg.batch_p2p_sync and torch.cuda.is_available():
                torch.cuda.synchronize()
            return recv_prev_t, recv_next_t, reqs

    return _CompressedP2PCommunicator


class _DecodeOnWait:
    """The receive request of a gradient packet whose ``wait()`` also decodes it (once), for the
    interleaved schedule's overlapped p2p, which waits on ``reqs["recv_next"]`` later."""

    def __init__(self, req, decode):
        self._req, self._decode = req, decode

    def wait(self) -> None:
        self._req.wait()
        if self._decode is not None:
            self._decode()
            self._decode = None

    def is_completed(self) -> bool:
        return self._decode is None
