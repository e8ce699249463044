"""``torch.distributed.pipelining`` stages whose backward gradient sends are compressed.

``CompressedPipelineStage`` is a ``PipelineStage`` (one stage per rank; GPipe, 1F1B and the
other single-stage schedules) that swaps, in the point-to-point ops the schedule batches:

* ``get_bwd_send_ops``: each input gradient is encoded, and the packet is sent instead;
* ``get_bwd_recv_ops``: a packet buffer of the exact packed size (fixed-rate codecs: the size
  is a function of the gradient's shape, so no length message is needed) is received instead of
  the gradient; ``_retrieve_recv_grads`` decodes it into the stage's gradient buffer before the
  stage's backward reads it.

Seeds: gradient ``i`` of the n-th send of micro-batch ``mb`` across boundary ``b`` (stage b+1 ->
stage b) uses ``derive_seed(base_seed, n, mb, b, i)``, so the rounding noise is independent
across steps, micro-batches, boundaries and the several gradients of one send (the receiver
needs no seed: decoding is deterministic). Activations (forward) are
sent exactly. Only fixed-rate codecs are accepted (variable-size ones would need a length
message that the schedules' batched p2p cannot express).

The constructor swaps codec fingerprints with the neighbouring stages (blocking p2p, previous
stage first, so the chain cannot deadlock): a stage with a different codec config fails there,
at its first exchange, naming both configs. Every stage must therefore be constructed on every
rank at about the same time, as the schedules require anyway.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage

from gradwire.codec.base import Codec
from gradwire.codec.header import Expected
from gradwire.comm.handshake import check_peer
from gradwire.numerics.rng import derive_seed


class CompressedPipelineStage(PipelineStage):
    """A ``PipelineStage`` whose backward sends are gradwire packets (see the module doc).

    Extra arguments: ``codec`` (a fixed-rate Codec, identical on every stage), ``base_seed``,
    ``keep_trace`` (remember sent/received packets and decoded gradients, for tests).
    Counters: ``bytes_sent`` / ``raw_bytes_sent`` (packets vs the uncompressed gradients).
    """

    def __init__(self, submodule: torch.nn.Module, stage_index: int, num_stages: int,
                 device: torch.device, *args: Any, codec: Codec, base_seed: int = 0,
                 keep_trace: bool = False, **kwargs: Any):
        if not isinstance(codec, Codec):
            raise TypeError(f"codec must be a gradwire Codec, got {type(codec).__name__}")
        if not codec.fixed_rate:
            raise TypeError(f"pipeline stages need a fixed-rate codec; {codec!r} is variable-size")
        super().__init__(submodule, stage_index, num_stages, device, *args, **kwargs)
        self.codec, self.base_seed, self.keep_trace = codec, base_seed, keep_trace
        self._n_sent: dict[int, int] = {}
        self._n_recv: dict[int, int] = {}
        self._pending: dict[int, list[tuple[Any, torch.Tensor]]] = {}
        self.bytes_sent = 0
        self.raw_bytes_sent = 0
        self.trace: dict[str, list] = {"sent": [], "recv": [], "decoded": []}
        for peer_stage in (stage_index - 1, stage_index + 1):  # previous first: no deadlock
            if 0 <= peer_stage < num_stages:
                check_peer(codec, self.stage_index_to_group_rank[peer_stage], self.group, device)

    def _seed(self, n: int, mb: int, sender_stage: int, i: int) -> int:
        return derive_seed(self.base_seed, n, mb, sender_stage - 1, i)

    def get_bwd_send_ops(self, bwd_chunk_id: int) -> list[dist.P2POp]:
        ops = super().get_bwd_send_ops(bwd_chunk_id)
        n = self._n_sent.get(bwd_chunk_id, 0)
        self._n_sent[bwd_chunk_id] = n + 1
        out = []
        for i, op in enumerate(ops):
            g = op.tensor
            packet = self.codec.encode(g.detach(), seed=self._seed(n, bwd_chunk_id, self.stage_index, i))
            self.bytes_sent += packet.numel()
            self.raw_bytes_sent += g.numel() * g.element_size()
            if self.keep_trace:
                self.trace["sent"].append((bwd_chunk_id, n, packet))
            out.append(dist.P2POp(dist.isend, packet, op.peer, op.group, op.tag))
        return out

    def get_bwd_recv_ops(self, bwd_chunk_id: int) -> list[dist.P2POp]:
        ops = super().get_bwd_recv_ops(bwd_chunk_id)
        pending, out = [], []
        for op in ops:
            buf = op.tensor  # the stage's gradient buffer: decoded into after the receive
            pk = torch.empty(self.codec.packed_size(buf.shape, buf.dtype), dtype=torch.uint8,
                             device=buf.device)
            pending.append((buf, pk))
            out.append(dist.P2POp(dist.irecv, pk, op.peer, op.group, op.tag))
        self._pending[bwd_chunk_id] = pending
        return out

    def _retrieve_recv_grads(self, bwd_chunk_id: int):
        n = self._n_recv.get(bwd_chunk_id, 0)
        self._n_recv[bwd_chunk_id] = n + 1
        for buf, pk in self._pending.pop(bwd_chunk_id, []):
            # checked against the buffer's shape/dtype before the decode allocates (header.Expected)
            dec = self.codec.decode(pk, dtype=buf.dtype, expect=Expected(tuple(buf.shape), buf.dtype))
            if dec.shape != buf.shape:
                raise ValueError(f"stage {self.stage_index}: received a gradient of shape "
                                 f"{tuple(dec.shape)}, expected {tuple(buf.shape)}")
            with torch.no_grad():
                buf.copy_(dec)
            if self.keep_trace:
                self.trace["recv"].append((bwd_chunk_id, n, pk.clone()))
                self.trace["decoded"].append((bwd_chunk_id, n, buf.detach().clone()))
        return super()._retrieve_recv_grads(bwd_chunk_id)
