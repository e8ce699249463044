"""One fidelity run: the main job's in-process training loop (``launch/train.py``, one process)
plus the measurements the fidelity suite reports.

The loop is the main job's: ``gpt_layers(seed)``, ``InProcessPipeline``, the config's optimizer,
``gradient_accumulation_steps`` micro-batches per step, gradient clipping, the same data streams
(for the Markov task: the same language and ``TokenStream`` seeds), so a ``RunSpec`` with no
overrides reproduces ``python launch/train.py --config C --seed S`` step for step (tested). On top:

* every boundary's policy is a ``probe.ProbedPolicy`` (per-tensor cosine, added variance, achieved
  sparsity, analytic cosine);
* every ``probe_every`` steps, before the step, the exact (uncompressed) parameter gradient on the
  same weights and micro-batches, and the exact gradient on an independent batch; after the
  compressed backward, the cosines compressed-vs-exact and batch-vs-batch per stage. The second
  tells how noisy the minibatch gradient itself is, the scale against which codec noise matters.
  Probe batches come from their own generator, so probing does not change the trajectory;
* validation loss on a held-out split every ``eval_every`` steps and at the end (stdlib: the
  corpus's fixed validation split; Markov: a separately seeded sample of the same language).

Overrides a config cannot express (research arms): ``variant`` replaces every pruning
boundary's codec by a baseline ("atp", "topk") or sends kept values raw ("raw_kept");
``optimizer`` replaces the optimizer (e.g. momentum SGD); ``gradwire`` entries are merged into the
config's section (e.g. ``warmup_steps``); ``min_cosine`` sets the policies' sparsity cap.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

TASKS = ("markov", "stdlib")
VARIANTS = (None, "atp", "topk", "raw_kept")


@dataclass(frozen=True)
class RunSpec:
    config: str  # path of a DeepSpeed JSON with a "gradwire" section
    task: str = "markov"
    seed: int = 0
    steps: int = 1000
    stages: int = 2
    variant: str | None = None
    lr: float | None = None  # overrides the optimizer's lr
    optimizer: dict | None = None  # e.g. {"type": "sgd", "lr": 0.1, "momentum": 0.9}
    gradwire: dict = field(default_factory=dict)  # merged into the config's "gradwire" section
    min_cosine: float | None = None
    probe_every: int = 25
    eval_every: int = 100
    width: int = 64
    depth: int = 4
    heads: int = 4
    seq_len: int = 32

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")

    def key(self) -> str:
        """A stable hash of everything that changes the result (the cache file name); the
        config is hashed by content, not by path."""
        d = asdict(self)
        with open(self.config, encoding="utf-8") as f:
            d["config"] = json.load(f)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def load_configs(path: str, overrides: dict | None = None):
    """(DeepSpeed dict, parsed gradwire section) of ``path`` with ``overrides`` merged into the
    section (``load_config`` drops the section from the dict, so it is re-read here)."""
    from gradwire.config import load_config, parse_gradwire

    ds_config, gw = load_config(path)
    if overrides:
        with open(path, encoding="utf-8") as f:
            section = {**json.load(f).get("gradwire", {}), **overrides}
        section.pop("report_dir", None)
        gw = parse_gradwire(section)
    return ds_config, gw


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else math.nan


def _stage_grads(pipe) -> list[torch.Tensor]:
    out = []
    for stage in pipe.stages:
        gs = [p.grad.reshape(-1).double() if p.grad is not None else torch.zeros(p.numel(), dtype=torch.float64)
              for p in stage.parameters()]
        out.append(torch.cat(gs))
    return out


def _exact_grads(pipe, batches, loss_fn) -> list[torch.Tensor]:
    """Uncompressed parameter gradients of the mean loss over ``batches`` (graph not cut)."""
    pipe.zero_grad(set_to_none=True)
    for x, y in batches:
        h = x
        for stage in pipe.stages:
            h = stage(h)
        (loss_fn(h, y) / len(batches)).backward()
    g = _stage_grads(pipe)
    pipe.zero_grad(set_to_none=True)
    return g


def _data(spec: RunSpec):
    """(train tokens, validation tokens, vocab size, entropy floor, data name)."""
    if spec.task == "stdlib":
        from gradwire.data.corpus import build_corpus

        c = build_corpus()
        return c.train, c.val, len(c.vocab), None, c.name
    from gradwire.models.synthetic import MarkovLanguage

    # exactly launch/train.py's build_data for the default --vocab 16 --order 2
    lang = MarkovLanguage(vocab=16, order=2, concentration=0.1, seed=1234)
    return (lang.sample(300_000, seed=spec.seed), lang.sample(20_000, seed=10_000 + spec.seed), lang.vocab,
            lang.entropy_rate, "markov(V=16,k=2,c=0.1)")


def _optimizer(spec: RunSpec, ds_config: dict, params):
    opt_cfg = copy.deepcopy(spec.optimizer or ds_config.get("optimizer", {"type": "Adam", "params": {"lr": 1e-3}}))
    if spec.optimizer is not None:  # flat form {"type": ..., "lr": ..., ...}
        kind = opt_cfg.pop("type").lower()
        kw = opt_cfg
    else:
        kind = opt_cfg.get("type", "adam").lower()
        kw = {k: v for k, v in opt_cfg.get("params", {}).items() if k != "torch_adam"}
    if spec.lr is not None:
        kw["lr"] = spec.lr
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[kind]
    return cls(params, **kw), {"type": kind, **kw}


def _apply_variant(pipe, variant: str | None) -> None:
    if variant is None:
        return
    from gradwire.codec.prune import PruneCodec
    from gradwire.fidelity.baselines import ATPPruneCodec, TopKCodec

    for p in pipe.policies:
        c = p.codec
        if not isinstance(c, PruneCodec):
            raise ValueError(f"variant {variant!r} needs prune boundaries, found codec {c.config()}")
        if pipe.hetero:
            raise ValueError(f"variant {variant!r} with heterogeneous allocation is not supported "
                             "(set_sparsity rebuilds registry codecs)")
        if variant == "atp":
            p.codec = ATPPruneCodec(c.sparsity, kept_bits=c.kept_bits, kept_exp_bits=c.kept_exp_bits)
        elif variant == "topk":
            p.codec = TopKCodec(c.sparsity, kept_bits=c.kept_bits, kept_exp_bits=c.kept_exp_bits)
        else:  # raw_kept: kept values in the source dtype (fp32 here), no FP8 rounding
            p.codec = PruneCodec(c.sparsity, kept_bits=None)


def run(spec: RunSpec, threads: int = 1, log=None) -> dict[str, Any]:
    """Train and measure; returns the result dictionary (JSON-serialisable)."""
    from gradwire.data.corpus import eval_windows
    from gradwire.fidelity.probe import ProbedPolicy
    from gradwire.models.gpt import GPTConfig, gpt_layers, lm_loss
    from gradwire.models.inprocess import InProcessPipeline
    from gradwire.models.synthetic import TokenStream

    torch.set_num_threads(threads)
    ds_config, gw = load_configs(spec.config, spec.gradwire)
    train, val, vocab, floor, data_name = _data(spec)
    cfg = GPTConfig(vocab=vocab, width=spec.width, depth=spec.depth, heads=spec.heads, seq_len=spec.seq_len)
    pipe = InProcessPipeline(gpt_layers(cfg, seed=spec.seed), spec.stages, gw, lm_loss)
    _apply_variant(pipe, spec.variant)
    if spec.min_cosine is not None:
        for p in pipe.policies:
            p.set_min_cosine(spec.min_cosine)
    # Wrap after the variant: the probes see the codec that actually runs.
    pipe.policies = [ProbedPolicy(p, b) for b, p in enumerate(pipe.policies)]
    pipe.hetero = [p for p, s in zip(pipe.policies, pipe.specs) if s.name == "prune" and s.heterogeneous]
    opt, opt_desc = _optimizer(spec, ds_config, pipe.parameters())
    micro = int(ds_config.get("train_micro_batch_size_per_gpu", 8))
    gas = int(ds_config.get("gradient_accumulation_steps", 1))
    clip = ds_config.get("gradient_clipping")
    data = TokenStream(train, cfg.seq_len, micro, seed=spec.seed + 1)
    probe_data = TokenStream(train, cfg.seq_len, micro, seed=spec.seed + 7919)
    vx, vy = eval_windows(val, cfg.seq_len, max_windows=256)

    def val_loss() -> float:
        return sum(pipe.evaluate(vx[i:i + 64], vy[i:i + 64]) * len(vx[i:i + 64])
                   for i in range(0, len(vx), 64)) / len(vx)

    losses, vals, pprobes = [], [], []
    t0 = time.perf_counter()
    for step in range(spec.steps):
        batches = [next(data) for _ in range(gas)]
        probing = spec.probe_every > 0 and step % spec.probe_every == 0
        if probing:
            exact = _exact_grads(pipe, batches, lm_loss)
            other = _exact_grads(pipe, [next(probe_data) for _ in range(gas)], lm_loss)
        opt.zero_grad(set_to_none=True)
        loss = sum(pipe.forward_backward(x, y, step, scale=1.0 / gas) for x, y in batches) / gas
        if probing:
            comp = _stage_grads(pipe)
            pprobes.append({"step": step,
                            "cos_stage": [_cosine(c, e) for c, e in zip(comp, exact)],
                            "cos_all": _cosine(torch.cat(comp), torch.cat(exact)),
                            "batch_cos_stage": [_cosine(o, e) for o, e in zip(other, exact)],
                            "batch_cos_all": _cosine(torch.cat(other), torch.cat(exact))})
        if clip:
            torch.nn.utils.clip_grad_norm_(pipe.parameters(), clip)
        opt.step()
        losses.append(loss)
        if spec.eval_every and (step + 1) % spec.eval_every == 0 or step + 1 == spec.steps:
            vals.append((step + 1, val_loss()))
        if log is not None and (step + 1) % 100 == 0:
            log(f"step {step + 1}/{spec.steps} loss {loss:.4f} ({time.perf_counter() - t0:.0f}s)")
    seconds = time.perf_counter() - t0
    per = pipe.wire_log.per_step()
    raw = sum(d["raw"] for d in per.values())
    sent = sum(d["sent"] for d in per.values())
    tail = max(1, len(losses) // 10)
    return {
        "spec": asdict(spec), "key": spec.key(), "data": data_name, "entropy_floor": floor,
        "optimizer": opt_desc, "codec_impl": sorted({f"{type(p.codec).__module__}.{type(p.codec).__name__}"
                                                       for p in pipe.policies}),
        "losses": losses, "final_loss": sum(losses[-tail:]) / tail,
        "val": vals, "final_val": vals[-1][1],
        "wire": {"raw_bytes": raw, "sent_bytes": sent,
                 "bits_per_element": 8.0 * sent / (raw / 4.0) if raw else math.nan},  # raw is fp32
        "boundary_probes": [p.probe_dicts() for p in pipe.policies],
        "param_probes": pprobes,
        "allocations": pipe.allocations,
        "policy_events": [getattr(p, "events", []) for p in pipe.policies],
        "seconds": seconds,
    }
