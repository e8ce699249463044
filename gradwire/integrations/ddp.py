"""A ``DistributedDataParallel`` communication hook that averages gradient buckets through
gradwire's two-phase compressed all-reduce.

Usage::

    state = GradwireDDPState({"name": "fp", "bits": 8}, process_group=None, base_seed=0)
    ddp_model.register_comm_hook(state, gradwire_allreduce_hook)

The hook follows torch's ``default_hooks`` contract: it writes the averaged gradients into
``bucket.buffer()`` (which ``bucket.gradients()`` views, and which wrappers such as torch's
``_hook_then_optimizer`` read) and returns the future of its last collective, so DDP overlaps
the exchange with the rest of backward. Every replica decodes the same packets, so replicas keep
bit-identical gradients and parameters.

Each parameter's gradient in a bucket is encoded on its own, with a seed derived from
(base_seed, iteration, parameter key): ``gradwire.comm.segmented``. The key is the parameter's
position in DDP's first-iteration bucket order, which every fresh DDP of the same model and
bucket sizes reproduces; so neither DDP's bucket rebuild nor a checkpoint resume (the state
pickled, loaded into a fresh DDP) changes what a gradient goes through.

Buckets the codecs cannot or should not carry take torch's plain averaging all-reduce (divide,
then sum, as DDP without a hook), counted in ``counters["plain_buckets"]`` and by reason in
``counters["plain_by_reason"]``: ``sparse`` (sparse gradients, e.g. ``nn.Embedding(sparse=True)``),
``dtype`` (float64 and other dtypes the wire format does not carry), ``small`` (fewer than
``min_numel`` elements: headers would dominate) and ``warmup`` (iterations before
``start_iter``, as PowerSGD's ``start_powerSGD_iter``: early gradients are large and erratic).
"""
# No `from __future__ import annotations`: DDP inspects the hook's annotations at runtime.
from typing import Any, Mapping

import torch
import torch.distributed as dist

from gradwire.codec.base import Codec
from gradwire.codec.header import DTYPE_CODES
from gradwire.codec.registry import as_codec
from gradwire.comm.segmented import segmented_all_reduce
from gradwire.numerics.rng import check_seed, derive_seed

PLAIN_REASONS = ("sparse", "dtype", "small", "warmup")


def _nonneg_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    return v


class GradwireDDPState:
    """State of the hook.

    Hyperparameters: ``codec`` (a Codec or a ``build_codec`` mapping), ``base_seed``,
    ``min_numel`` (smaller buckets use the plain all-reduce), ``start_iter`` (iterations before it
    use the plain all-reduce), ``process_group`` (None: the default group; not pickled).
    State: ``iteration`` (finished iterations), the parameter keys (rebuilt, see the module doc).
    Statistics: ``counters``; with ``keep_trace``, ``trace`` holds per bucket index the packets
    of the current (or last finished) step, ``{"plain": reason, ...}`` for plain buckets (for
    tests and debugging; cleared at the first bucket of each step).
    """

    _PICKLED = ("codec_config", "base_seed", "min_numel", "start_iter", "iteration", "keep_trace", "counters")

    def __init__(self, codec: Codec | Mapping[str, Any], *, process_group=None, base_seed: int = 0,
                 min_numel: int = 0, start_iter: int = 0, keep_trace: bool = False):
        self.codec = as_codec(codec)
        self.codec_config = {"name": self.codec.name, **self.codec.config()}
        self.process_group = process_group
        self.base_seed = check_seed(base_seed)
        self.min_numel = _nonneg_int("min_numel", min_numel)
        self.start_iter = _nonneg_int("start_iter", start_iter)
        self.keep_trace = bool(keep_trace)
        self.iteration = 0
        self.counters = {"raw_bytes": 0, "sent_bytes": 0, "compressed_buckets": 0, "plain_buckets": 0,
                         "plain_by_reason": {r: 0 for r in PLAIN_REASONS}}
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self.trace: dict[int, dict] = {}
        self._step_started = False  # a bucket of the current iteration has been reduced
        self._keys: dict[int, int] = {}  # id(parameter) -> key (order of first appearance)

    def __getstate__(self) -> dict:
        # The process group (and the codec object, which may hold device buffers) stay behind.
        return {k: getattr(self, k) for k in self._PICKLED}

    def __setstate__(self, d: dict) -> None:
        from gradwire.codec.registry import build_codec

        self.__dict__.update(d)
        self.codec = build_codec(dict(d["codec_config"]))
        self.process_group = None
        self._reset_runtime()

    def param_key(self, param: torch.Tensor) -> int:
        """The stable key of a parameter: its position in the first-iteration bucket order."""
        return self._keys.setdefault(id(param), len(self._keys))

    def plain_reason(self, buf: torch.Tensor) -> str | None:
        """Why this bucket takes the plain all-reduce, or None when it is compressed."""
        if buf.is_sparse:
            return "sparse"
        if buf.dtype not in DTYPE_CODES:
            return "dtype"
        if buf.numel() < self.min_numel:
            return "small"
        if self.iteration < self.start_iter:
            return "warmup"
        return None


def _plain_allreduce(buf: torch.Tensor, group, p: int) -> torch.futures.Future:
    """torch's ``allreduce_hook``: divide first (as DDP without a hook), sum, resolve to the
    result (for a dense bucket, ``buf`` itself; a sparse all-reduce returns a new tensor)."""
    buf.div_(p)
    return dist.all_reduce(buf, group=group, async_op=True).get_future().then(lambda f: f.value()[0])


def _segments(bucket: dist.GradBucket, buf: torch.Tensor) -> list[tuple[int, int]]:
    """(offset, numel) of each parameter's gradient in the bucket buffer. DDP lays a bucket's
    gradients out back to back in ``bucket.parameters()`` order; computed from the sizes (not
    the views' storage offsets) so that a wrapper that replaced the buffer (torch's
    ``fp16_compress_wrapper``: ``bucket.set_buffer(buffer.to(float16))``) is handled too."""
    out, offset = [], 0
    for q in bucket.parameters():
        out.append((offset, q.numel()))
        offset += q.numel()
    if offset != buf.numel():
        raise RuntimeError(f"DDP bucket {bucket.index()}: its parameters hold {offset} elements but its "
                           f"buffer has {buf.numel()}; gradwire cannot tell the gradients apart")
    return out


def gradwire_allreduce_hook(state: GradwireDDPState, bucket: dist.GradBucket
                            ) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket over the data-parallel group through compressed packets."""
    buf = bucket.buffer()
    group = state.process_group
    p = dist.get_world_size(group)
    if not state._step_started:  # first bucket of this iteration
        state.trace = {}
        state._step_started = True
    params = bucket.parameters()
    keys = [state.param_key(q) for q in params]  # every bucket, so keys follow the first iteration
    last = bucket.is_last()
    if last:
        state._step_started = False
    reason = state.plain_reason(buf)
    if reason is not None:
        state.counters["plain_buckets"] += 1
        state.counters["plain_by_reason"][reason] += 1
        if state.keep_trace:
            state.trace[bucket.index()] = {"plain": reason, "param_ids": [id(q) for q in params]}
        fut = _plain_allreduce(buf, group, p)
    else:
        seeds = [derive_seed(state.base_seed, state.iteration, k) for k in keys]
        # the callback adds phase2_recv to the trace when the packets arrive
        trace: dict = {"seeds": seeds, "keys": keys, "param_ids": [id(q) for q in params]}
        fut = segmented_all_reduce(buf, _segments(bucket, buf), seeds, state.codec, out=buf, group=group,
                                   trace=trace).then(lambda f: f.value().div_(p))
        state.counters["compressed_buckets"] += 1
        state.counters["raw_bytes"] += trace["raw_bytes"]
        state.counters["sent_bytes"] += trace["bytes_sent"]
        if state.keep_trace:
            state.trace[bucket.index()] = trace
    if last:
        state.iteration += 1
    return fut
