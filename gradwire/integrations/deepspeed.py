"""DeepSpeed pipeline integration: compressed backward gradients between pipeline stages.

DeepSpeed has no hook for pipeline gradients (DESIGN.md): ``PipelineEngine`` dispatches its
schedule through the class-level dict ``_INSTRUCTION_MAP``, so overriding ``_exec_send_grads``
alone is silently ignored. ``GradwirePipelineEngine`` overrides the two gradient instructions and
re-declares the map. ``initialize`` is a drop-in for ``deepspeed.initialize`` that builds it.

Wire protocol per boundary, per micro-batch (sender = stage b+1, receiver = stage b): for each
gradient tensor DeepSpeed would send, in DeepSpeed's order, a floating-point tensor goes as one
gradwire packet encoded by the boundary's ``policy.BoundaryPolicy`` at step = micro-batch index
(``comm.p2p.send_packet``/``recv_packet``: fixed-size codecs into a buffer of the known size,
variable-size ones length first; a codec-fingerprint handshake before the first packet), and a
non-float tensor (the int64 metadata of DeepSpeed's partitioned-gradient path, used with tensor
parallelism) goes raw, as DeepSpeed sends it. So the
partitioned path compresses the local 1/TP slice of the gradient, and the receiver rebuilds
the full tensor exactly as DeepSpeed does.

Optionally (``"data_parallel"`` in the section) each bucket of DeepSpeed's data-parallel
gradient all-reduce goes through ``comm.compressed_all_reduce`` (override of
``allreduce_bucket``; not with ZeRO or the bf16 optimizer, which reduce elsewhere).

Tested on CPU/gloo with 2 pipeline ranks and with 2 data-parallel replicas (tests/integration). The partitioned-gradient branch
(``is_grad_partitioned``, TP > 1 inside DeepSpeed's own grid) is written but not run in tests.
"""
from __future__ import annotations

import contextlib
from typing import Any, Mapping

import torch

from gradwire.codec.base import Codec
from gradwire.config import CodecSpec, ConfigError, GradwireConfig, parse_gradwire
from gradwire.report import WireLog

__all__ = ["codec_from_spec", "make_policy", "GradwirePipelineEngine", "initialize"]


def codec_from_spec(spec: CodecSpec) -> Codec:
    """The registry ``Codec`` for a validated ``CodecSpec`` (``none`` -> identity)."""
    from gradwire.codec import registry

    if spec.name == "none":
        return registry.build_codec("identity")
    try:
        return registry.build_codec(_registry_config(spec))
    except ValueError as e:  # the codec's own check of a value the schema let through
        raise ConfigError(f"codec {spec.label}: {e}") from None


def _registry_config(spec: CodecSpec) -> dict[str, Any]:
    d = spec.to_dict()
    d.pop("heterogeneous", None)  # an allocation policy across boundaries, not a codec parameter
    d.pop("min_cosine", None)  # a policy cap (BoundaryPolicy), not a codec parameter
    if d.get("name") == "nm":  # for communication, blocks over the flattened tensor: any shape
        d["dim"] = None
    return d


def check_heterogeneous(cfg: GradwireConfig, num_stages: int) -> None:
    """Heterogeneous sparsity needs every boundary's fit in one place (``policy.
    allocate_heterogeneous``); the engine's boundaries live on different ranks and nothing
    gathers their fits, so with more than one boundary it would silently run the uniform budget.
    Refuse instead, naming the key."""
    if num_stages > 2 and any(cfg.codec_for(b).heterogeneous for b in range(num_stages - 1)):
        raise ConfigError("gradwire.codec.heterogeneous: the DeepSpeed pipeline engine does not "
                          "allocate sparsity across boundaries on different ranks; set "
                          "\"heterogeneous\": false (or use the single-process in-process stages)")


def make_policy(cfg: GradwireConfig, boundary: int):
    """The ``policy.BoundaryPolicy`` of one pipeline boundary: its codec, the refresh schedule of
    its lognormal fit, warm-up steps, and seeds ``derive_seed(cfg.seed, step, boundary)``."""
    from gradwire.policy import BoundaryPolicy, PolicyConfig

    return BoundaryPolicy(PolicyConfig(codec=codec_from_spec(cfg.codec_for(boundary)),
                                       warmup_steps=cfg.warmup_steps, refresh_every=cfg.refresh_every,
                                       stats_every=cfg.stats_every,
                                       min_cosine=cfg.codec_for(boundary).min_cosine,
                                       base_seed=cfg.seed, boundary_id=boundary))


def _label(policy, step: int) -> str:
    """The format used at ``step``: "identity" during warm-up, else the codec's short name."""
    if policy.in_warmup(step):
        return "identity(warm-up)"
    c = policy.codec.config()
    name = c.get("name")
    if name == "fp":
        return f"fp{c['bits']}" + (f"(e{c['exp_bits']})" if c.get("exp_bits") is not None else "")
    if name == "prune":
        return f"prune{c['sparsity']:.3g}"
    if name == "nm":
        vb = f"+fp{c['value_bits']}" if c.get("value_bits") else ""
        return f"nm{c['n']}:{c['m']}-{c['method']}{vb}"
    return str(name)


try:  # DeepSpeed is optional at import time: the in-process pipeline does not need it.
    from deepspeed.runtime.pipe import p2p as _ds_p2p
    from deepspeed.runtime.pipe import schedule as _ds_schedule
    from deepspeed.runtime.pipe.engine import PipelineEngine as _PipelineEngine
    from deepspeed.runtime.utils import PartitionedTensor as _PartitionedTensor
except ImportError:  # pragma: no cover - exercised only without deepspeed installed
    _PipelineEngine = object
    _ds_schedule = None


def _grad_of(t: torch.Tensor) -> torch.Tensor:
    if t.grad is None:
        raise RuntimeError("a floating-point pipeline input has no gradient to send")
    return t.grad


@contextlib.contextmanager
def _timer(engine, name: str):
    """DeepSpeed's wall-clock breakdown timer around an instruction (as its own versions do)."""
    on = engine.wall_clock_breakdown()
    if on:
        engine.timers(name).start()
    try:
        yield
    finally:
        if on:
            engine.timers(name).stop()


class GradwirePipelineEngine(_PipelineEngine):
    """``PipelineEngine`` whose backward gradient send/receive go through gradwire codecs.

    ``gradwire_config`` is a class attribute set by ``initialize`` (DeepSpeed constructs the
    engine itself, so the config cannot be a constructor argument).
    """

    gradwire_config: GradwireConfig = GradwireConfig()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.gradwire_config
        if cfg.timeout is not None:  # every gradwire wait of this process (comm.timeout)
            from gradwire.comm.timeout import set_timeout

            set_timeout(cfg.timeout)
        cfg.check_boundaries(self.num_stages)
        check_heterogeneous(cfg, self.num_stages)
        self.wire_log = WireLog()
        self.gradwire_bytes_sent = 0  # packet bytes (+ length prefixes) this rank sent
        self.gradwire_bytes_received = 0
        self._gw_send = None  # (policy, peer global rank): to the previous stage, boundary stage-1
        self._gw_recv = None  # (policy, peer global rank): from the next stage, boundary stage
        self._gw_counter = {"send": 0, "recv": 0}  # micro-batches: the policies' step index
        self._gw_checked = set()
        if not self.is_first_stage():
            b = self.stage_id - 1
            self._gw_send = (make_policy(cfg, b), self.grid.stage_to_global(self.prev_stage))
        if not self.is_last_stage():
            b = self.stage_id
            self._gw_recv = (make_policy(cfg, b), self.grid.stage_to_global(self.next_stage))
        # Data-parallel gradient all-reduce: DeepSpeed's own bucketing, each bucket reduced by
        # comm.compressed_all_reduce (two-phase, DESIGN.md) instead of dist.all_reduce.
        dp = cfg.data_parallel
        self._gw_dp_codec = None if dp is None or dp.name == "none" else codec_from_spec(dp)
        self._gw_dp_calls = 0
        self.gradwire_dp_bytes = {"sent": 0, "raw": 0}

    def _gw_handshake(self, policy, peer):
        # Both ends swap fingerprints before the first packet (comm.handshake): the codec config
        # and everything else that sizes a gradient packet (warm-up steps, micro-batch size, the
        # gradients' dtype), so a rank started with another config fails naming the setting.
        if peer not in self._gw_checked:
            from gradwire.comm.handshake import check_peer

            settings = {**policy.wire_settings(),
                        "train_micro_batch_size_per_gpu": self.train_micro_batch_size_per_gpu(),
                        "fp16": bool(self.fp16_enabled()), "bf16": bool(self.bfloat16_enabled())}
            check_peer(policy.codec, peer, device=self.device, settings=settings)
            self._gw_checked.add(peer)

    # -- the two gradient instructions ------------------------------------------------------
    def _grads_to_send(self, buffer_id):
        """The tensors DeepSpeed would send for this buffer, in its order (see its
        ``_exec_send_grads``), with the partitioned-gradient split when TP partitions them."""
        inputs = self.pipe_buffers["inputs"][buffer_id]
        if self.is_grad_partitioned:
            first, tail = (inputs[0], list(inputs[1:])) if isinstance(inputs, tuple) else (inputs, [])
            part = _PartitionedTensor(tensor=first.grad, group=self.grid.get_slice_parallel_group())
            if (self.has_attention_mask or self.has_bool_tensors) and tail:
                tail = tail[:-1]  # the mask, last, has no gradient (DeepSpeed pops it the same way)
            # The receiver expects the metadata, the local part, then one gradient per
            # floating-point tail output (DeepSpeed's own _exec_recv_grads); integer tail inputs
            # (e.g. position ids) have no gradient and nothing is sent for them.
            return [part.to_meta(), part.data()] + [_grad_of(t) for t in tail if t.is_floating_point()]
        if isinstance(inputs, torch.Tensor):
            return [inputs.grad]
        inputs = list(inputs)
        if self.has_attention_mask or self.has_bool_tensors:
            inputs = inputs[:-1]  # the mask has no gradient; DeepSpeed drops it the same way
        return [_grad_of(t) for t in inputs if t.is_floating_point()]

    def _exec_send_grads(self, buffer_id):
        with _timer(self, "pipe_send_grad"):
            self._gw_send_grads(buffer_id)

    def _exec_recv_grads(self, buffer_id):
        with _timer(self, "pipe_recv_grad"):
            self._gw_recv_grads(buffer_id)

    def _gw_send_grads(self, buffer_id):
        from gradwire.comm.p2p import LENGTH_BYTES, send_packet

        policy, peer = self._gw_send
        self._gw_handshake(policy, peer)
        step = self._gw_counter["send"]
        self._gw_counter["send"] += 1
        for t in self._grads_to_send(buffer_id):
            if not t.is_floating_point():
                _ds_p2p.send(t, self.prev_stage)  # partition metadata: raw, as DeepSpeed sends it
                continue
            t = t.contiguous()
            packet = policy.encode(t, step)
            fixed = policy.packed_size(t.shape, t.dtype, step)
            send_packet(packet, peer, with_length=fixed is None)
            sent = packet.numel() + (LENGTH_BYTES if fixed is None else 0)
            self.gradwire_bytes_sent += sent
            self.wire_log.record(self.global_steps, policy.config.boundary_id, t, packet,
                                 fixed if fixed is not None else sent,
                                 _label(policy, step), sent_bytes=sent)
        self.pipe_buffers["inputs"][buffer_id] = None

    def _gw_recv_grads(self, buffer_id):
        outputs = self.pipe_buffers["outputs"][buffer_id]
        if self.is_pipe_partitioned and not self.is_grad_partitioned:
            # Activations were sent partitioned; restore the full output before backward.
            if self.pipe_partition_grad_meta_cache is None:
                self.pipe_partition_grad_meta_cache = outputs[0].to("cpu")
            full = _PartitionedTensor.from_meta(meta=self.pipe_partition_grad_meta_cache,
                                                local_part=outputs[1],
                                                group=self.grid.get_slice_parallel_group())
            outputs[0].data = full.full()
            outputs = (outputs[0], *outputs[2:])
            self.pipe_buffers["outputs"][buffer_id] = outputs
        if isinstance(outputs, torch.Tensor):
            like = [(outputs.shape, outputs.dtype)]
        elif self.is_grad_partitioned:
            # outputs[0] holds the partition metadata (DeepSpeed receives it as int64 of that size).
            like = [(outputs[0].shape, torch.long), (outputs[1].shape, outputs[1].dtype)]
            like += [(t.shape, t.dtype) for t in outputs[2:] if t.is_floating_point()]
        else:
            like = [(t.shape, t.dtype) for t in outputs if t.is_floating_point()]
        from gradwire.codec.header import Expected
        from gradwire.comm.p2p import LENGTH_BYTES, recv_packet

        policy, peer = self._gw_recv
        self._gw_handshake(policy, peer)
        step = self._gw_counter["recv"]
        self._gw_counter["recv"] += 1
        grads = []
        for shape, dtype in like:
            if not dtype.is_floating_point:
                buf = torch.zeros(shape, dtype=dtype, device=self.device)
                _ds_p2p.recv(buf, self.next_stage)
                grads.append(buf)
                continue
            size = policy.packed_size(shape, dtype, step)
            if size is not None:  # fixed-rate: receive into a buffer of the known size
                packet = recv_packet(peer, out=torch.empty(size, dtype=torch.uint8, device=self.device))
                self.gradwire_bytes_received += size
            else:  # variable-size: length first, bounded by the codec's maximum
                packet = recv_packet(peer, device=self.device,
                                     max_size=policy.max_packed_size(shape, dtype, step))
                self.gradwire_bytes_received += packet.numel() + LENGTH_BYTES
            # The header must describe this very gradient before the decode allocates anything.
            g = policy.decode(packet, dtype=dtype, expect=Expected(tuple(shape), dtype))
            if tuple(g.shape) != tuple(shape):
                raise RuntimeError(f"gradwire: stage {self.next_stage} sent a gradient of shape "
                                   f"{tuple(g.shape)}, expected {tuple(shape)}")
            grads.append(g)
        # DeepSpeed's backward reads self.grad_layer: a tensor, or a list in the same order.
        self.grad_layer = grads[0] if isinstance(outputs, torch.Tensor) else grads

    if _ds_schedule is not None:
        _INSTRUCTION_MAP = {
            **_PipelineEngine._INSTRUCTION_MAP,
            _ds_schedule.SendGrad: _exec_send_grads,
            _ds_schedule.RecvGrad: _exec_recv_grads,
        }

    def allreduce_bucket(self, bucket, dp_group, dp_world_size=None):
        import torch.distributed as dist

        if self._gw_dp_codec is None or dist.get_world_size(group=dp_group) == 1:
            return super().allreduce_bucket(bucket, dp_group, dp_world_size)
        from gradwire.comm.collectives import compressed_all_reduce
        from gradwire.numerics.rng import derive_seed

        tensor = self.flatten(bucket)
        if dp_world_size is None:
            dp_world_size = dist.get_world_size(group=dp_group)
        # Same seed on every replica (global_steps and the call count agree); the collective
        # derives per-rank, per-chunk seeds from it.
        seed = derive_seed(self.gradwire_config.seed, 0x0D, self.global_steps, self._gw_dp_calls)
        self._gw_dp_calls += 1
        trace: dict = {}
        summed = compressed_all_reduce(tensor.float(), self._gw_dp_codec, group=dp_group, seed=seed,
                                       trace=trace)
        self.gradwire_dp_bytes["sent"] += int(trace.get("bytes_sent", 0))
        self.gradwire_dp_bytes["raw"] += int(trace.get("raw_bytes", 0))
        if self.gradient_average:
            summed = summed / dp_world_size
        tensor.copy_(summed)
        return tensor

    def gradwire_rows(self) -> list[dict]:
        """This rank's wire telemetry rows (gather them across ranks for a report)."""
        from dataclasses import asdict

        return [asdict(r) for r in self.wire_log.rows]

    def gradwire_policies(self) -> list:
        """This rank's boundary policies (sender side first), for telemetry."""
        return [x[0] for x in (self._gw_send, self._gw_recv) if x is not None]


def initialize(*, model, config: Mapping[str, Any] | str, **kwargs):
    """Drop-in for ``deepspeed.initialize`` for a ``PipelineModule``: same arguments and return
    value, but the engine is a ``GradwirePipelineEngine`` configured from the config's
    ``"gradwire"`` section (validated first; ``ConfigError`` names any bad key).

    ``config`` is a dict or a JSON path, as for DeepSpeed.
    """
    import deepspeed
    from deepspeed.pipe import PipelineModule

    if isinstance(config, str):
        from gradwire.config import load_config

        ds_config, gw = load_config(config)
    else:
        ds_config = dict(config)
        gw = parse_gradwire(ds_config.pop("gradwire", None))
    if not isinstance(model, PipelineModule):
        raise TypeError("gradwire.integrations.deepspeed.initialize compresses pipeline boundaries: "
                        f"model must be a deepspeed.pipe.PipelineModule, got {type(model).__name__}")
    if isinstance(getattr(model, "num_stages", None), int):
        check_heterogeneous(gw, model.num_stages)
    if gw.data_parallel is not None and gw.data_parallel.name != "none":
        zero = ds_config.get("zero_optimization", {}).get("stage", 0)
        if zero or ds_config.get("bf16", {}).get("enabled", False):
            raise ConfigError("gradwire.data_parallel compresses DeepSpeed's plain data-parallel "
                              "all-reduce; it does not apply with ZeRO or the bf16 optimizer "
                              "(remove gradwire.data_parallel or those settings)")
    engine_cls = type("GradwirePipelineEngine", (GradwirePipelineEngine,), {"gradwire_config": gw})
    # deepspeed.initialize picks the engine class through its module-global PipelineEngine.
    with _patched(deepspeed, "PipelineEngine", engine_cls):
        return deepspeed.initialize(model=model, config=ds_config, **kwargs)


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)
