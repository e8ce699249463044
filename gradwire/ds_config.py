"""The DeepSpeed part of a config, checked before anything starts (``launch/train.py``).

``config.parse_gradwire`` checks the ``"gradwire"`` section; this module checks the rest, so that a
typo or an impossible value is a one-line ``ConfigError`` (exit 2) instead of a traceback, a NaN
loss or a silently ignored setting:

* top-level keys: DeepSpeed ignores unknown ones, so a misspelt key silently ran with a default,
  and a misspelt ``"gradwyre"`` section ran uncompressed. An unknown key close to a known one
  (DeepSpeed's or ``"gradwire"``) is an error with "did you mean"; any other unknown key is
  reported as ignored (``unknown_keys``).
* batch settings: integers >= 1 (micro batch 0 trained on empty batches with a NaN loss), then
  DeepSpeed's own ``DeepSpeedConfig`` where the world size it assumes (1) is the real one.
* single-process mode (in-process stages, no DeepSpeed engine) honours the optimizer (Adam, AdamW,
  SGD), the batch settings and ``gradient_clipping`` only: it refuses fp16/bf16/autocast and a
  scheduler rather than silently training without them, and builds the optimizer once on a
  dummy parameter so that a misspelt parameter or a bad ``lr`` fails here.
"""
from __future__ import annotations

import difflib
import math
from typing import Any, Callable, Mapping

from gradwire.config import ConfigError

# Top-level keys DeepSpeed reads that are not in deepspeed.runtime.constants (sections parsed by
# their own modules). The rest come from the constants at run time.
_SECTIONS = (
    "zero_optimization", "activation_checkpointing", "flops_profiler", "comms_logger", "tensorboard",
    "wandb", "csv_monitor", "monitor_config", "autotuning", "compression_training", "data_efficiency",
    "pipeline", "aio", "elasticity", "nebula", "amp", "curriculum_learning", "sparse_attention",
    "sparse_gradients", "weight_quantization", "hybrid_engine", "checkpoint", "quantize_training",
    "data_types", "eigenvalue", "progressive_layer_drop", "zero_allow_untested_optimizer", "comet",
    "timers", "graph_harvesting", "compile", "use_data_before_expert_parallelism", "gradwire",
)
_CLOSE = 0.8  # difflib ratio above which an unknown key is taken for a typo


def known_top_level_keys() -> set[str]:
    """Keys DeepSpeed reads at the top level of its JSON, plus ``"gradwire"``."""
    keys = set(_SECTIONS)
    try:
        import deepspeed.runtime.constants as C
    except ImportError:  # pragma: no cover - deepspeed is a dependency of the launcher
        return keys
    for name, v in vars(C).items():
        if name.isupper() and isinstance(v, str) and v.isidentifier() and not name.endswith("DEFAULT"):
            keys.add(v)
    return keys


def unknown_keys(raw: Mapping[str, Any]) -> list[str]:
    """Unknown top-level keys that are not typos (DeepSpeed ignores them); ConfigError for one
    that is close to a known key."""
    known = known_top_level_keys()
    ignored = []
    for k in raw:
        if k in known:
            continue
        close = difflib.get_close_matches(str(k), sorted(known), n=1, cutoff=_CLOSE)
        if close:
            raise ConfigError(f"unknown top-level key {k!r}; did you mean {close[0]!r}? "
                              f"(DeepSpeed would ignore it silently)")
        ignored.append(str(k))
    return ignored


def _positive_int(ds: Mapping[str, Any], key: str, default: int | None) -> int | None:
    v = ds.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{key} must be an integer >= 1, got {v!r}")
    return v


def batch_sizes(ds: Mapping[str, Any]) -> tuple[int, int]:
    """(micro batch, gradient accumulation steps), validated (defaults 8 and 1)."""
    micro = _positive_int(ds, "train_micro_batch_size_per_gpu", 8)
    gas = _positive_int(ds, "gradient_accumulation_steps", 1)
    _positive_int(ds, "train_batch_size", None)
    return micro, gas


def check_deepspeed(ds: Mapping[str, Any], world: int) -> None:
    """Batch settings, optimizer basics and, with one process, ``DeepSpeedConfig`` itself."""
    batch_sizes(ds)
    opt = ds.get("optimizer")
    if opt is not None:
        if not isinstance(opt, Mapping) or not isinstance(opt.get("type"), str):
            raise ConfigError(f"optimizer must be an object with a \"type\" string, got {opt!r}")
        params = opt.get("params", {})
        if not isinstance(params, Mapping):
            raise ConfigError(f"optimizer.params must be an object, got {params!r}")
        lr = params.get("lr")
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float))
                               or not math.isfinite(lr) or lr < 0):
            raise ConfigError(f"optimizer.params.lr must be a finite number >= 0, got {lr!r}")
    clip = ds.get("gradient_clipping")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))
                             or not math.isfinite(clip) or clip < 0):
        raise ConfigError(f"gradient_clipping must be a finite number >= 0, got {clip!r}")
    if world == 1:  # DeepSpeedConfig assumes the world size is 1 before dist is initialised
        try:
            from deepspeed.runtime.config import DeepSpeedConfig
        except ImportError:  # pragma: no cover
            return
        try:
            DeepSpeedConfig(dict(ds))
        except (AssertionError, ValueError, TypeError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"DeepSpeed rejects the config: {first}") from None


_OPTIMIZERS = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}
_NOT_TORCH_PARAMS = ("torch_adam", "adam_w_mode")  # DeepSpeed's own switches, not torch arguments
_UNSUPPORTED_IN_PROCESS = (("fp16", "fp16 loss scaling"), ("bf16", "bf16 training"), ("amp", "apex AMP"),
                           ("torch_autocast", "autocast"))


def inprocess_optimizer(ds: Mapping[str, Any]) -> Callable:
    """For single-process mode: refuse what it cannot honour, and return ``make(params)`` that
    builds the configured optimizer (checked once on a dummy parameter)."""
    import torch

    for key, what in _UNSUPPORTED_IN_PROCESS:
        sec = ds.get(key)
        if isinstance(sec, Mapping) and sec.get("enabled", False):
            raise ConfigError(f"{key}.enabled: single-process mode (in-process stages) trains in float32 and "
                              f"does not implement {what}; remove it, or launch several ranks "
                              f"(the DeepSpeed engine honours it)")
    if ds.get("scheduler") is not None:
        raise ConfigError("scheduler: single-process mode (in-process stages) does not run a learning-rate "
                          "scheduler; remove it, or launch several ranks (the DeepSpeed engine runs it)")
    opt = ds.get("optimizer", {"type": "Adam", "params": {"lr": 1e-3}})
    name = _OPTIMIZERS.get(str(opt.get("type", "adam")).lower())
    if name is None:
        raise ConfigError(f"optimizer.type {opt.get('type')!r}: single-process mode knows "
                          f"{', '.join(_OPTIMIZERS.values())}")
    cls = getattr(torch.optim, name)
    params = {k: v for k, v in opt.get("params", {}).items() if k not in _NOT_TORCH_PARAMS}
    if name == "SGD":
        params.setdefault("lr", 1e-3)
    try:
        cls([torch.zeros(1, requires_grad=True)], **params)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"optimizer {name} params {dict(params)}: {e}") from None
    return lambda ps: cls(ps, **params)
