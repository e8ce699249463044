"""``torch.distributed.pipelining`` stages whose backward gradient sends are compressed.

``CompressedPipelineStage`` is a ``PipelineStage`` (manual frontend; ``from_pipe`` takes what
the ``pipeline()`` tracer builds) usable with every schedule torch ships: GPipe, 1F1B,
Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble, DualPipeV and forward-only.
It swaps, in the point-to-point ops the schedule batches:

* ``get_bwd_send_ops``: each input gradient is encoded, and the packet is sent instead;
* ``get_bwd_recv_ops``: a packet buffer of the exact packed size (fixed-rate codecs: the size
  is a function of the gradient's shape, so no length message is needed) is received instead of
  the gradient; ``_retrieve_recv_grads`` decodes it into the stage's gradient buffer before the
  stage's backward reads it.

Neighbouring stages on the same rank (V-shaped schedules) hand gradients over in memory through
the schedule (``set_local_bwd_input``); nothing crosses a wire there, so nothing is encoded.

Seeds: gradient ``i`` of the n-th send of micro-batch ``mb`` across boundary ``b`` (stage b+1 ->
stage b) uses ``derive_seed(base_seed, n, mb, b, i)``, so the rounding noise is independent
across steps, micro-batches, boundaries and the several gradients of one send (the receiver
needs no seed: decoding is deterministic). Activations (forward) are sent exactly. Only
fixed-rate codecs are accepted (variable-size ones would need a length message that the
schedules' batched p2p cannot express).

Handshake: the codec fingerprints travel with torch's own warm-up vote (the first ``step``,
again after a train/eval switch), i.e. once the schedule has fixed the stage-to-rank map, in
the vote's deadlock-free order, and only between stages on different ranks: forward with the
vote, backward with its result. A stage whose neighbour runs another codec config raises
``ConfigMismatchError`` naming both configs, on both sides of the boundary, after the vote has
completed (so no peer is left waiting). Every stage of the pipeline must be a
``CompressedPipelineStage``. The shapes of the gradients each stage sends and receives are
checked against the codec when the schedule builds the backward buffers (before the first
send).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage

from gradwire.codec.base import Codec
from gradwire.codec.header import Expected
from gradwire.codec.registry import as_codec
from gradwire.comm.errors import ConfigMismatchError, comm_guard
from gradwire.comm.handshake import codec_fingerprint
from gradwire.numerics.rng import derive_seed


class CompressedPipelineStage(PipelineStage):
    """A ``PipelineStage`` whose backward sends are gradwire packets (see the module doc).

    Extra arguments: ``codec`` (a fixed-rate Codec or a codec config mapping, identical on every
    stage), ``base_seed``, ``keep_trace`` (remember sent/received packets and decoded gradients,
    for tests). Counters: ``bytes_sent`` / ``raw_bytes_sent`` (packets vs the uncompressed
    gradients).
    """

    def __init__(self, submodule: torch.nn.Module, stage_index: int, num_stages: int,
                 device: torch.device, *args: Any, codec: Codec | Mapping[str, Any], base_seed: int = 0,
                 keep_trace: bool = False, **kwargs: Any):
        if not hasattr(PipelineStage, "_warmup_forward_vote"):  # the handshake rides on it
            raise RuntimeError("CompressedPipelineStage needs torch.distributed.pipelining's warm-up "
                               f"vote (torch 2.13); this torch is {torch.__version__}")
        codec = as_codec(codec)
        if not codec.fixed_rate:
            raise TypeError(f"pipeline stages need a fixed-rate codec; {codec!r} is variable-size")
        super().__init__(submodule, stage_index, num_stages, device, *args, **kwargs)
        self.codec, self.base_seed, self.keep_trace = codec, base_seed, keep_trace
        self._fingerprint = codec_fingerprint(codec)
        self._peer_fingerprints: dict[int, str] = {}  # stage index -> its fingerprint
        self._n_sent: dict[int, int] = {}
        self._n_recv: dict[int, int] = {}
        self._pending: dict[int, list[tuple[Any, torch.Tensor]]] = {}
        self.bytes_sent = 0
        self.raw_bytes_sent = 0
        self.trace: dict[str, list] = {"sent": [], "recv": [], "decoded": []}

    @classmethod
    def from_pipe(cls, pipe: Any, stage_index: int, device: torch.device, *, group=None,
                  **kwargs: Any) -> "CompressedPipelineStage":
        """The stage ``stage_index`` of a ``torch.distributed.pipelining.pipeline(...)`` result.

        The manual frontend passes each stage's outputs to the next stage only, so the traced
        split must be a chain (each stage consumes the previous stage's outputs and nothing
        else); a skip connection across stages raises ``ValueError``."""
        from torch.distributed.pipelining import Pipe

        if not isinstance(pipe, Pipe):
            raise TypeError(f"from_pipe expects what pipeline() returns (a Pipe), got {type(pipe).__name__}")
        _check_chain(pipe)
        return cls(pipe.get_stage_module(stage_index), stage_index, pipe.num_stages, device, group=group,
                   **kwargs)

    # ------------------------------------------------------------------ handshake
    def _cross_rank(self, other: int) -> bool:
        return 0 <= other < self.num_stages and not self._is_same_rank(other)

    def _send_fingerprint(self, dst_stage: int) -> None:
        data = torch.tensor(list(self._fingerprint.encode()), dtype=torch.uint8, device=self.device)
        peer = self._resolve_peer_global_rank(dst_stage)
        with comm_guard(f"codec handshake with stage {dst_stage} (rank {peer})"):
            dist.send(torch.tensor([data.numel()], dtype=torch.int64, device=self.device), peer, group=self.group)
            dist.send(data, peer, group=self.group)

    def _recv_fingerprint(self, src_stage: int) -> None:
        peer = self._resolve_peer_global_rank(src_stage)
        n = torch.empty(1, dtype=torch.int64, device=self.device)
        with comm_guard(f"codec handshake with stage {src_stage} (rank {peer})"):
            dist.recv(n, peer, group=self.group)
            if not 0 < int(n.item()) <= 1 << 16:
                raise ConfigMismatchError(f"stage {self.stage_index}: stage {src_stage} (rank {peer}) "
                                          f"sent a {int(n.item())}-byte codec fingerprint; is it a "
                                          f"CompressedPipelineStage of this gradwire version?")
            data = torch.empty(int(n.item()), dtype=torch.uint8, device=self.device)
            dist.recv(data, peer, group=self.group)
        self._peer_fingerprints[src_stage] = bytes(data.cpu().tolist()).decode("utf-8", "replace")

    # torch 2.13's warm-up vote (``PipelineStage._warmup_forward_vote`` /
    # ``_warmup_backward_result``), with each cross-rank vote message followed by this stage's
    # codec fingerprint. The vote is a chain in which every stage receives everything from one
    # side before it sends to the other; gloo's blocking sends wait for the matching receive,
    # so the fingerprint must travel inside the same receive-then-send step (a second chain run
    # after each vote message deadlocks as soon as a rank holds two stages).
    def _link_recv(self, src_stage: int, t: torch.Tensor) -> None:
        with comm_guard(f"pipeline warm-up vote from stage {src_stage}"):
            dist.recv(t, src=self._resolve_peer_global_rank(src_stage), group=self.group)
        self._recv_fingerprint(src_stage)

    def _link_send(self, dst_stage: int, t: torch.Tensor) -> None:
        with comm_guard(f"pipeline warm-up vote to stage {dst_stage}"):
            dist.send(t, dst=self._resolve_peer_global_rank(dst_stage), group=self.group)
        self._send_fingerprint(dst_stage)

    def _warmup_forward_vote(self, has_backward: bool, received_acc: torch.Tensor | None = None
                             ) -> torch.Tensor:
        from torch.distributed.pipelining._utils import InferenceMode

        self._peer_fingerprints = {}
        vote = torch.tensor([0 if InferenceMode.needs_dynamic(self._user_meta, has_backward) else 1],
                            dtype=torch.int32, device=self.device)
        if self.is_first:
            acc = vote
        elif self._is_same_rank(self.stage_index - 1):
            if received_acc is None:
                raise RuntimeError(f"stage {self.stage_index}: no vote from the same-rank previous stage")
            acc = received_acc * vote
        else:
            acc = torch.zeros(1, dtype=torch.int32, device=self.device)
            self._link_recv(self.stage_index - 1, acc)
            acc = acc * vote
        if self._cross_rank(self.stage_index + 1):
            self._link_send(self.stage_index + 1, acc)
        return acc

    def _warmup_backward_result(self, received_result: torch.Tensor | None = None) -> torch.Tensor:
        if self.is_last or self._is_same_rank(self.stage_index + 1):
            if received_result is None:
                raise RuntimeError(f"stage {self.stage_index}: no vote result from the same-rank next stage")
            result = received_result
        else:
            result = torch.zeros(1, dtype=torch.int32, device=self.device)
            self._link_recv(self.stage_index + 1, result)
        if self._cross_rank(self.stage_index - 1):
            self._link_send(self.stage_index - 1, result)
        for stage, theirs in sorted(self._peer_fingerprints.items()):
            if theirs != self._fingerprint:
                me, peer = self.group_rank, self.stage_index_to_group_rank[stage]
                raise ConfigMismatchError(
                    f"codec config mismatch between pipeline stage {self.stage_index} (rank {me}) and "
                    f"stage {stage} (rank {peer}): rank {me} has {self._fingerprint}; rank {peer} has {theirs}")
        return result

    # ------------------------------------------------------------------ shapes
    def _prepare_backward_infra(self, num_microbatches: int, *args: Any, **kwargs: Any):
        out = super()._prepare_backward_infra(num_microbatches, *args, **kwargs)
        sides = []
        if self._cross_rank(self.stage_index - 1):
            sides.append(("sends to stage", self.stage_index - 1, self._stage_meta.input_grads))
        if self._cross_rank(self.stage_index + 1):
            sides.append(("receives from stage", self.stage_index + 1, self._stage_meta.output_grads))
        for what, peer, metas in sides:
            for i, meta in enumerate(metas or ()):
                if meta is None:
                    continue
                try:
                    self.codec.packed_size(tuple(meta.shape), meta.dtype)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"stage {self.stage_index} {what} {peer} gradient {i} of shape "
                                     f"{tuple(meta.shape)} and dtype {meta.dtype}, which codec "
                                     f"{self.codec!r} cannot carry: {e}") from None
        return out

    # ------------------------------------------------------------------ p2p
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


def _check_chain(pipe: Any) -> None:
    """Each traced stage may read the graph inputs (stage 0 only) or the previous stage's outputs."""
    import torch.fx as fx

    stages = [n for n in pipe.split_gm.graph.nodes if n.op == "call_module"]
    for i, node in enumerate(stages):
        for arg in node.all_input_nodes:
            src = arg
            while src.op == "call_function" and src.all_input_nodes:  # getitem of a stage's tuple
                src = src.all_input_nodes[0]
            ok = (src.op == "placeholder" and i == 0) or (i > 0 and src is stages[i - 1])
            if not ok and isinstance(src, fx.Node):
                raise ValueError(f"stage {i} of the traced pipeline reads {arg.name} (from {src.name}); "
                                 f"CompressedPipelineStage needs each stage to consume only the previous "
                                 f"stage's outputs (no skip connections across stages)")
