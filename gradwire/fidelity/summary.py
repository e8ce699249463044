"""Compact summaries of a run's per-tensor probes (what the suite caches and tables).

A 1000-step run encodes 2000 boundary tensors per boundary; the cached result keeps, per
boundary, the means over the compressed (non-warm-up) tensors and a coarse series (means over
blocks of ``block`` tensors) for plots, not every record.
"""
from __future__ import annotations

import math
from typing import Sequence

FIELDS = ("cosine", "added_var", "sparsity", "analytic_cosine", "analytic_sparsity", "sigma_log2", "alpha",
          "expected_cosine", "expected_sparsity", "atp_predicted_sparsity")


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def summarise_boundary(records: Sequence[dict], block: int = 20) -> dict:
    """Means of ``FIELDS`` over the compressed tensors, the analytic added variance
    (1 / cos^2 - 1 per tensor, then averaged), and block means of cosine / analytic cosine /
    added variance / sparsity."""
    comp = [r for r in records if not r["warmup"]]
    out = {"tensors": len(records), "compressed": len(comp)}
    for f in FIELDS:
        out[f] = _mean([r.get(f, math.nan) for r in comp])  # older caches lack the newer fields
    out["analytic_added_var"] = _mean([1.0 / r["analytic_cosine"] ** 2 - 1.0 for r in comp
                                       if r["analytic_cosine"] and not math.isnan(r["analytic_cosine"])])
    series = {k: [] for k in ("step", "cosine", "analytic_cosine", "added_var", "sparsity")}
    for i in range(0, len(records), block):
        chunk = records[i:i + block]
        series["step"].append(chunk[0]["step"])
        for k in ("cosine", "analytic_cosine", "added_var", "sparsity"):
            series[k].append(_mean([r[k] for r in chunk]))
    out["series"] = series
    return out


def summarise_param_probes(probes: Sequence[dict]) -> dict:
    """Means of the same-step parameter-gradient cosines (compressed vs exact) and of the
    batch-vs-batch cosine, per stage and over the whole model."""
    if not probes:
        return {}
    n_st = len(probes[0]["cos_stage"])
    return {"probes": len(probes),
            "cos_stage": [_mean([p["cos_stage"][s] for p in probes]) for s in range(n_st)],
            "cos_all": _mean([p["cos_all"] for p in probes]),
            "batch_cos_stage": [_mean([p["batch_cos_stage"][s] for p in probes]) for s in range(n_st)],
            "batch_cos_all": _mean([p["batch_cos_all"] for p in probes])}


def compact(result: dict, block: int = 20) -> dict:
    """The cached form of a ``trainer.run`` result: probes summarised, floats rounded."""
    out = {k: v for k, v in result.items() if k not in ("boundary_probes", "param_probes")}
    out["boundaries"] = [summarise_boundary(r, block) for r in result["boundary_probes"]]
    out["param_grad"] = summarise_param_probes(result["param_probes"])
    out["losses"] = [round(x, 5) for x in result["losses"]]
    return out
