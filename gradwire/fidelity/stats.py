"""Paired comparison of runs across seeds.

A compressed run and the uncompressed baseline of the same seed share the model init and the
batches, so their final losses are strongly correlated; the difference d_i = run_i - base_i has a
much smaller spread than either run. The interval is the Student t interval on the d_i:

    mean(d) +- t_{1 - (1 - conf)/2, n - 1} * sd(d) / sqrt(n)      (sd with n - 1)

It assumes the d_i are independent and roughly normal; with n = 3 seeds the t quantile is 4.30
(95%), so only large or very consistent differences are resolved, which is the honest answer.
The relative difference uses the per-seed ratios d_i / base_i.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

from scipy.stats import t as student_t


@dataclass(frozen=True)
class Interval:
    n: int
    mean: float
    sd: float  # sample standard deviation (n - 1); NaN for n < 2
    lo: float  # NaN for n < 2: one seed has no interval
    hi: float
    confidence: float

    def contains(self, x: float) -> bool:
        return self.lo <= x <= self.hi

    def to_dict(self) -> dict:
        return asdict(self)


def t_interval(xs: Sequence[float], confidence: float = 0.95) -> Interval:
    """Student t interval of the mean of ``xs``."""
    xs = [float(x) for x in xs]
    if not xs:
        raise ValueError("need at least one value")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return Interval(n, mean, math.nan, math.nan, math.nan, confidence)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(student_t.ppf(0.5 + confidence / 2.0, n - 1)) * sd / math.sqrt(n)
    return Interval(n, mean, sd, mean - half, mean + half, confidence)


@dataclass(frozen=True)
class Paired:
    diff: Interval  # run - baseline, absolute
    rel: Interval  # (run - baseline) / baseline, per seed

    def verdict(self, tol_rel: float) -> str:
        """Whether the run is within ``tol_rel`` (e.g. 0.01) of the baseline:
        "within" if the whole relative interval lies below +tol_rel, "outside" if it lies wholly
        above, else "unresolved" (the interval straddles the tolerance, or n < 2)."""
        r = self.rel
        if r.n < 2 or math.isnan(r.hi):
            return "unresolved"
        if r.hi <= tol_rel:
            return "within"
        if r.lo > tol_rel:
            return "outside"
        return "unresolved"

    def to_dict(self) -> dict:
        return {"diff": self.diff.to_dict(), "rel": self.rel.to_dict()}


def paired_difference(run: Sequence[float], baseline: Sequence[float], confidence: float = 0.95) -> Paired:
    """Paired difference run - baseline over seeds (same order in both)."""
    if len(run) != len(baseline) or not run:
        raise ValueError(f"need equally many (>= 1) run and baseline values, got {len(run)} and {len(baseline)}")
    d = [float(a) - float(b) for a, b in zip(run, baseline)]
    rel = [(float(a) - float(b)) / float(b) for a, b in zip(run, baseline)]
    return Paired(t_interval(d, confidence), t_interval(rel, confidence))


def bands(curves: Sequence[Sequence[float]], confidence: float = 0.95) -> tuple[list[float], list[float], list[float]]:
    """Pointwise mean and t interval (lo, hi) of equally long curves (one per seed)."""
    if not curves or len({len(c) for c in curves}) != 1:
        raise ValueError("need one or more curves of equal length")
    mean, lo, hi = [], [], []
    for col in zip(*curves):
        iv = t_interval(col, confidence)
        mean.append(iv.mean)
        lo.append(iv.lo if iv.n > 1 else iv.mean)
        hi.append(iv.hi if iv.n > 1 else iv.mean)
    return mean, lo, hi


def smooth(xs: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far)."""
    if window < 1:
        raise ValueError("window must be >= 1")
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= window:
            acc -= xs[i - window]
        out.append(acc / min(i + 1, window))
    return out
