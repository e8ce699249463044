"""The ``"gradwire"`` section of a DeepSpeed JSON config, parsed into frozen dataclasses.

Every key is checked: an unknown key raises ``ConfigError`` naming the key, its place in the
section, the allowed keys and the closest one ("did you mean"); a bad value names the key and the
values it may take. Everything is checked before training starts, so a typo costs seconds, not a
queued job.

Schema (all keys optional)::

    "gradwire": {
      "enabled": true,
      "seed": 0,                       # base seed of every stochastic codec decision
      "refresh_every": 50,             # micro-batches between refreshes of a boundary's lognormal fit
      "stats_every": 1,                # gather the fit's statistics every k-th micro-batch (k <= refresh_every)
      "warmup_steps": 0,               # first micro-batches sent uncompressed (statistics only)
      "codec": {"name": "fp", "bits": 6},      # default codec of every pipeline boundary
      "boundaries": {"1": {"bits": 8}},        # per-boundary overrides, merged into "codec"
      "data_parallel": {"name": "fp", "bits": 8},  # optional: compress DP gradient all-reduce
      "tensor_parallel": {"size": 2, "codec": {"name": "fp", "bits": 8}},  # optional: TP in stages
      "report_dir": "reports/fp6",
      "timeout": 120                   # seconds any gradwire wait for a peer may last (default:
                                       # the process group's: DeepSpeed's 10 min / $DEEPSPEED_TIMEOUT)
    }

Boundary ``b`` is the link between pipeline stage ``b`` and stage ``b + 1`` (its backward
gradient is sent by stage ``b + 1``). An override with the same codec ``name`` (or none) is merged
into the default; one with another ``name`` replaces it.

Codecs (``name`` and their keys):

* ``none``: gradients cross uncompressed (the baseline).
* ``bf16``: cast to bfloat16.
* ``fp``: ``bits`` (3..8, total incl. sign; ``FPCodec`` also takes 2, stochastic ternary, for
  experiments, not offered for training), ``exp_bits`` (optional; default: the split that
  minimises Eq. 4 of paper 001 for the measured sigma), ``rounding`` ("stochastic" | "nearest").
* ``prune``: stochastic pruning (paper 001, Eq. 5/8): ``sparsity`` in (0, 1),
  ``heterogeneous`` (bool: per-boundary sparsities from the cosine-similarity allocation with the
  element-weighted mean at ``sparsity``), ``min_cosine`` (optional, in (0, 1]: at every refresh
  the sparsity is lowered to keep at least this expected cosine on the measured gradient;
  ``policy.BoundaryPolicy``, "Pruning regime").
* ``nm``: N:M sparsity (paper 004): ``n``, ``m`` (n < m, m in {2, 4, 8}), ``method``
  ("mvue" | "mvue_approx" | "greedy"; MVUE exists for 1:2 and 2:4), ``value_bits`` (optional: FP
  bits of the kept values, e.g. 8; default: the source dtype).
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

__all__ = ["ConfigError", "CodecSpec", "GradwireConfig", "TensorParallelSpec", "parse_gradwire", "load_config",
           "check_topology"]


class ConfigError(ValueError):
    """A ``"gradwire"`` section (or a launch setting) that cannot work; the message says what to
    change."""


def _unknown(where: str, key: str, allowed: tuple[str, ...]) -> ConfigError:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{where}: unknown key {key!r}{hint} (allowed keys: {', '.join(allowed)})")


def _check_keys(where: str, d: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where} must be a JSON object, got {type(d).__name__}")
    for k in d:
        if k not in allowed:
            raise _unknown(where, str(k), allowed)


def _int(where: str, v: Any, lo: int, hi: int | None = None) -> int:
    # bool is an int subclass in Python; "bits": true is a mistake, not 1.
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{where} must be an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{where} must be {rng}, got {v}")
    return v


def _choice(where: str, v: Any, allowed: tuple[str, ...]) -> str:
    if v not in allowed:
        close = difflib.get_close_matches(str(v), allowed, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{where} must be one of {', '.join(map(repr, allowed))}, got {v!r}{hint}")
    return v


CODEC_KEYS: dict[str, tuple[str, ...]] = {
    "none": ("name",),
    "bf16": ("name",),
    "fp": ("name", "bits", "exp_bits", "rounding"),
    "prune": ("name", "sparsity", "heterogeneous", "min_cosine"),
    "nm": ("name", "n", "m", "method", "value_bits"),
}
ROUNDINGS = ("stochastic", "nearest")
NM_METHODS = ("mvue", "mvue_approx", "greedy")
# Unbiased (MVUE) N:M schemes exist in closed form for these patterns only (paper 004).
MVUE_PATTERNS = {"mvue": ((1, 2), (2, 4)), "mvue_approx": ((2, 4),)}


@dataclass(frozen=True)
class CodecSpec:
    """A validated codec description; ``bits_per_element`` is the nominal payload rate."""

    name: str = "none"
    bits: int | None = None
    exp_bits: int | None = None
    rounding: str = "stochastic"
    sparsity: float | None = None
    heterogeneous: bool = False
    min_cosine: float | None = None
    n: int | None = None
    m: int | None = None
    method: str = "mvue"
    value_bits: int | None = None

    @property
    def label(self) -> str:
        """Short human name, e.g. ``fp6``, ``nm1:2-mvue``, ``prune0.8``."""
        if self.name == "fp":
            return f"fp{self.bits}" + (f"(e{self.exp_bits})" if self.exp_bits is not None else "")
        if self.name == "prune":
            return (f"prune{self.sparsity:g}" + ("-hetero" if self.heterogeneous else "")
                    + (f"-cos{self.min_cosine:g}" if self.min_cosine is not None else ""))
        if self.name == "nm":
            vb = f"+fp{self.value_bits}" if self.value_bits else ""
            return f"nm{self.n}:{self.m}-{self.method}{vb}"
        return self.name

    def to_dict(self) -> dict[str, Any]:
        """Only the keys that belong to this codec (round-trips through ``parse_codec``)."""
        d = {k: getattr(self, k) for k in CODEC_KEYS[self.name]}
        return {k: v for k, v in d.items() if v is not None}


def parse_codec(d: Mapping[str, Any], where: str = "gradwire.codec") -> CodecSpec:
    """Validate one codec object (see the module docstring for the keys)."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where} must be a JSON object like {{\"name\": \"fp\", \"bits\": 6}}, "
                          f"got {d!r}")
    name = _choice(f"{where}.name", d.get("name", "none"), tuple(CODEC_KEYS))
    _check_keys(f"{where} (codec {name!r})", d, CODEC_KEYS[name])
    if name == "fp":
        if "bits" not in d:
            raise ConfigError(f"{where}: codec 'fp' needs \"bits\" (3..8), e.g. {{\"name\": \"fp\", \"bits\": 6}}")
        bits = _int(f"{where}.bits", d["bits"], 3, 8)
        exp_bits = d.get("exp_bits")
        if exp_bits is not None:
            # 1 sign bit + at least 1 exponent bit; mantissa may be empty (FP4 = 1-3-0, Table 2).
            exp_bits = _int(f"{where}.exp_bits", exp_bits, 1, bits - 1)
        rounding = _choice(f"{where}.rounding", d.get("rounding", "stochastic"), ROUNDINGS)
        return CodecSpec(name=name, bits=bits, exp_bits=exp_bits, rounding=rounding)
    if name == "prune":
        if "sparsity" not in d:
            raise ConfigError(f"{where}: codec 'prune' needs \"sparsity\" in (0, 1), e.g. 0.8")
        s = d["sparsity"]
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 < s < 1.0:
            raise ConfigError(f"{where}.sparsity must be a number in (0, 1), got {s!r}")
        het = d.get("heterogeneous", False)
        if not isinstance(het, bool):
            raise ConfigError(f"{where}.heterogeneous must be true or false, got {het!r}")
        mc = d.get("min_cosine")
        if mc is not None and (isinstance(mc, bool) or not isinstance(mc, (int, float)) or not 0.0 < mc <= 1.0):
            raise ConfigError(f"{where}.min_cosine must be a number in (0, 1], e.g. 0.9, got {mc!r}")
        return CodecSpec(name=name, sparsity=float(s), heterogeneous=het,
                         min_cosine=None if mc is None else float(mc))
    if name == "nm":
        n = _int(f"{where}.n", d.get("n", 1), 1)
        m = _int(f"{where}.m", d.get("m", 2), 2)
        if m not in (2, 4, 8):
            raise ConfigError(f"{where}.m must be 2, 4 or 8, got {m}")
        if n >= m:
            raise ConfigError(f"{where}: n:m = {n}:{m} keeps everything; n must be < m")
        method = _choice(f"{where}.method", d.get("method", "mvue"), NM_METHODS)
        if method in MVUE_PATTERNS and (n, m) not in MVUE_PATTERNS[method]:
            ok = " or ".join(f"{a}:{b}" for a, b in MVUE_PATTERNS[method])
            raise ConfigError(f"{where}: method {method!r} exists for {ok} only, got {n}:{m} "
                              f"(use \"method\": \"greedy\" or change n/m)")
        vb = d.get("value_bits")
        if vb is not None:
            vb = _int(f"{where}.value_bits", vb, 3, 8)
        return CodecSpec(name=name, n=n, m=m, method=method, value_bits=vb)
    return CodecSpec(name=name)


SECTION_KEYS = ("enabled", "seed", "refresh_every", "stats_every", "warmup_steps", "codec", "boundaries", "data_parallel",
                "tensor_parallel", "report_dir", "timeout")
TP_KEYS = ("size", "codec")


@dataclass(frozen=True)
class TensorParallelSpec:
    """``"tensor_parallel"``: ``size`` ranks per pipeline stage (Megatron-style); ``codec``
    compresses the backward all-reduce of each column-parallel layer's input gradient."""

    size: int = 1
    codec: CodecSpec = field(default_factory=CodecSpec)

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "codec": self.codec.to_dict()}


def parse_tensor_parallel(d: Any) -> TensorParallelSpec:
    _check_keys("gradwire.tensor_parallel", d, TP_KEYS)
    size = _int("gradwire.tensor_parallel.size", d.get("size", 1), 1)
    codec = parse_codec(d.get("codec", {"name": "none"}), "gradwire.tensor_parallel.codec")
    if codec.heterogeneous:
        raise ConfigError("gradwire.tensor_parallel.codec: \"heterogeneous\" allocates sparsity across "
                          "pipeline boundaries; set it to false for the tensor-parallel codec")
    return TensorParallelSpec(size=size, codec=codec)


@dataclass(frozen=True)
class GradwireConfig:
    """The validated ``"gradwire"`` section."""

    enabled: bool = True
    seed: int = 0
    refresh_every: int = 50
    stats_every: int = 1
    warmup_steps: int = 0
    codec: CodecSpec = field(default_factory=CodecSpec)
    boundaries: tuple[tuple[int, CodecSpec], ...] = ()  # sorted (boundary, spec) overrides
    data_parallel: CodecSpec | None = None
    report_dir: str | None = None
    tensor_parallel: TensorParallelSpec = field(default_factory=TensorParallelSpec)
    timeout: float | None = None  # seconds (comm.timeout); None: the process group's own

    def codec_for(self, boundary: int) -> CodecSpec:
        """The codec of pipeline boundary ``boundary`` (stage b -> b+1); ``none`` if disabled."""
        if not self.enabled:
            return CodecSpec()
        return dict(self.boundaries).get(boundary, self.codec)

    def check_boundaries(self, num_stages: int) -> None:
        """Overrides must name boundaries that exist (0 .. num_stages - 2)."""
        for b, _ in self.boundaries:
            if b > num_stages - 2:
                raise ConfigError(f"gradwire.boundaries: boundary {b} does not exist with "
                                  f"{num_stages} pipeline stages (valid: 0..{num_stages - 2})")


def parse_gradwire(section: Mapping[str, Any] | None) -> GradwireConfig:
    """Validate a ``"gradwire"`` section (``None`` -> defaults: no compression)."""
    if section is None:
        return GradwireConfig()
    _check_keys("gradwire", section, SECTION_KEYS)
    enabled = section.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"gradwire.enabled must be true or false, got {enabled!r}")
    seed = _int("gradwire.seed", section.get("seed", 0), 0, 2**63 - 1)
    refresh = _int("gradwire.refresh_every", section.get("refresh_every", 50), 1)
    stats_every = _int("gradwire.stats_every", section.get("stats_every", 1), 1)
    if stats_every > refresh:
        raise ConfigError(f"gradwire.stats_every ({stats_every}) must be <= gradwire.refresh_every "
                          f"({refresh}): otherwise some refreshes of the fit would have no statistics")
    warmup = _int("gradwire.warmup_steps", section.get("warmup_steps", 0), 0)
    base = section.get("codec", {"name": "none"})
    codec = parse_codec(base)
    overrides = []
    bsec = section.get("boundaries", {})
    if not isinstance(bsec, Mapping):
        raise ConfigError(f"gradwire.boundaries must be an object like {{\"0\": {{\"bits\": 8}}}}, got {bsec!r}")
    for key, over in bsec.items():
        try:
            b = int(key)
            if b < 0 or str(b) != str(key).strip():
                raise ValueError
        except ValueError:
            raise ConfigError(f"gradwire.boundaries: key {key!r} must be a boundary index "
                              f"0, 1, ... (boundary b links stage b and b+1)") from None
        if not isinstance(over, Mapping):
            raise ConfigError(f"gradwire.boundaries.{key} must be a JSON object, got {over!r}")
        same = over.get("name", codec.name) == codec.name
        merged = {**base, **over} if same and isinstance(base, Mapping) else dict(over)
        overrides.append((b, parse_codec(merged, f"gradwire.boundaries.{key}")))
    dp = section.get("data_parallel")
    dp_spec = None if dp is None else parse_codec(dp, "gradwire.data_parallel")
    if dp_spec is not None and dp_spec.name not in ("none", "bf16", "fp"):
        raise ConfigError("gradwire.data_parallel: only 'none', 'bf16' and 'fp' codecs are supported "
                          f"for the data-parallel all-reduce, got {dp_spec.name!r}")
    tp = section.get("tensor_parallel")
    tp_spec = TensorParallelSpec() if tp is None else parse_tensor_parallel(tp)
    rd = section.get("report_dir")
    if rd is not None and not isinstance(rd, str):
        raise ConfigError(f"gradwire.report_dir must be a string, got {rd!r}")
    from gradwire.comm.timeout import check_timeout

    try:
        timeout = check_timeout(section.get("timeout"))
    except ValueError as e:
        raise ConfigError(f"gradwire.{e}") from None
    return GradwireConfig(enabled=enabled, seed=seed, refresh_every=refresh, stats_every=stats_every,
                          warmup_steps=warmup, codec=codec,
                          boundaries=tuple(sorted(overrides)), data_parallel=dp_spec, tensor_parallel=tp_spec,
                          report_dir=rd, timeout=timeout)


def load_config(path: str) -> tuple[dict[str, Any], GradwireConfig]:
    """Read a DeepSpeed JSON file: (the DeepSpeed dict without ``"gradwire"``, the parsed section)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config path {path!r} is a directory, not a JSON file") from None
    except OSError as e:
        raise ConfigError(f"config file {path!r} cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: JSON nested too deeply to be a config") from None
    except ValueError as e:  # e.g. an integer literal beyond Python's 4300-digit conversion limit
        raise ConfigError(f"{path}: unreadable JSON value: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a DeepSpeed config is a JSON object, got {type(raw).__name__}")
    section = raw.pop("gradwire", None)
    try:
        return raw, parse_gradwire(section)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def check_topology(world_size: int, num_stages: int, num_layers: int, tensor_parallel: int = 1) -> None:
    """Fail before training when the pipeline cannot be laid out on the ranks."""
    _int("pipeline stages", num_stages, 1)
    _int("tensor parallel size", tensor_parallel, 1)
    per_replica = num_stages * tensor_parallel
    if world_size > 1 and world_size % per_replica != 0:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ConfigError(
            f"{num_stages} pipeline stages x {tensor_parallel} tensor-parallel ranks = {per_replica} "
            f"does not divide the {world_size} ranks; set --stages so that stages x tp is one of "
            f"{divisors}, or launch with a multiple of {per_replica} ranks")
    if num_stages > num_layers:
        raise ConfigError(f"{num_stages} pipeline stages need at least {num_stages} layers; "
                          f"the model has {num_layers} (raise --depth or lower --stages)")


def with_codec(cfg: GradwireConfig, codec: CodecSpec) -> GradwireConfig:
    """A copy of ``cfg`` whose default codec is ``codec`` (overrides kept)."""
    return replace(cfg, codec=codec)
