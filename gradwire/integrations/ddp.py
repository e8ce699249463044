"""A ``DistributedDataParallel`` communication hook that all-reduces gradient buckets through
the two-phase compressed all-reduce (``gradwire.comm.compressed_all_reduce``).

Usage::

    state = GradwireDDPState({"name": "bf16"}, process_group=None, base_seed=0)
    ddp_model.register_comm_hook(state, gradwire_allreduce_hook)

Every replica decodes the same gathered packets, so replicas keep bit-identical gradients and
parameters. The state validates its arguments and leaves the process group out of pickling
(as torch's own ``ddp_comm_hooks`` states do); after unpickling, ``process_group`` is None,
i.e. the default group.
"""
# No `from __future__ import annotations`: DDP inspects the hook's annotations at runtime.
from typing import Any, Mapping

import torch
import torch.distributed as dist

from gradwire.codec.base import Codec
from gradwire.comm.collectives import compressed_all_reduce
from gradwire.numerics.rng import check_seed, derive_seed


class GradwireDDPState:
    """State of the hook: the codec, seeds, the step counter and byte counters.

    ``codec``: a Codec or a ``build_codec`` mapping. ``min_numel``: buckets with fewer elements
    use the plain all-reduce (headers would dominate). ``keep_trace``: remember, per bucket index,
    the packets of the current (or last finished) step, ``{"plain": True, ...}`` for buckets that
    went through the plain all-reduce (for tests and debugging). The trace is cleared at the
    first bucket of each step, so a bucket index that DDP's bucket rebuild (after the first
    iteration) no longer uses does not linger with stale packets.
    """

    _PICKLED = ("codec_config", "base_seed", "min_numel", "iteration", "keep_trace", "counters")

    def __init__(self, codec: Codec | Mapping[str, Any], *, process_group=None, base_seed: int = 0,
                 min_numel: int = 0, keep_trace: bool = False):
        if isinstance(codec, Codec):
            self.codec = codec
        elif isinstance(codec, Mapping):
            from gradwire.codec.registry import build_codec

            self.codec = build_codec(dict(codec))
        else:
            raise TypeError(f"codec must be a Codec or a codec config mapping, got {type(codec).__name__}")
        if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 0:
            raise ValueError(f"min_numel must be an int >= 0, got {min_numel!r}")
        self.codec_config = {"name": self.codec.name, **self.codec.config()}
        self.process_group = process_group
        self.base_seed = check_seed(base_seed)
        self.min_numel = min_numel
        self.keep_trace = bool(keep_trace)
        self.iteration = 0
        self.trace: dict[int, dict] = {}
        self._step_started = False  # a bucket of the current iteration has been reduced
        self.counters = {"raw_bytes": 0, "sent_bytes": 0, "compressed_buckets": 0, "plain_buckets": 0}

    def __getstate__(self) -> dict:
        # The process group (and the codec object, which may hold device buffers) stay behind.
        return {k: getattr(self, k) for k in self._PICKLED}

    def __setstate__(self, d: dict) -> None:
        from gradwire.codec.registry import build_codec

        self.__dict__.update(d)
        self.codec = build_codec(dict(d["codec_config"]))
        self.process_group = None
        self.trace = {}
        self._step_started = False


def _completed_future(value: torch.Tensor) -> torch.futures.Future:
    """A completed future holding ``value``. On CUDA the future must be told its devices: a plain
    ``Future()`` is CPU-only and ``set_result`` of a CUDA tensor raises ("Expected all data ptrs
    to be on a device of type cpu"); with ``devices`` it records an event on the current stream,
    which DDP's reducer waits on before reading the result."""
    if value.device.type == "cpu":
        fut: torch.futures.Future = torch.futures.Future()
    else:
        fut = torch.futures.Future(devices=[value.device])
    fut.set_result(value)
    return fut


def gradwire_allreduce_hook(state: GradwireDDPState, bucket: dist.GradBucket
                            ) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket over the data-parallel group through compressed packets."""
    buf = bucket.buffer()
    group = state.process_group
    p = dist.get_world_size(group)
    if not state._step_started:  # first bucket of this iteration
        state.trace = {}
        state._step_started = True
    if bucket.is_last():
        state._step_started = False
    if buf.numel() < state.min_numel:
        state.counters["plain_buckets"] += 1
        dist.all_reduce(buf, group=group)
        if state.keep_trace:
            state.trace[bucket.index()] = {"plain": True, "param_ids": [id(q) for q in bucket.parameters()]}
        if bucket.is_last():
            state.iteration += 1
        return _completed_future(buf.div_(p))
    trace: dict = {}
    seed = derive_seed(state.base_seed, state.iteration, bucket.index())
    out = compressed_all_reduce(buf, state.codec, group=group, seed=seed, trace=trace)
    state.counters["compressed_buckets"] += 1
    state.counters["raw_bytes"] += trace["raw_bytes"]
    state.counters["sent_bytes"] += trace["bytes_sent"]
    if state.keep_trace:
        state.trace[bucket.index()] = {"seed": seed, "param_ids": [id(q) for q in bucket.parameters()],
                                       **trace}
    if bucket.is_last():
        state.iteration += 1
    return _completed_future(out.div_(p))
