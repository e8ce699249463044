"""Telemetry of what crosses the wire, and the end-of-run report (JSON + PNG plots + a table).

``WireLog`` records one row per encoded boundary tensor: the step, boundary, bytes of the
uncompressed tensor, bytes of the packet actually sent, the codec's predicted size for that
shape (``packed_size``, or the sent size for variable-size codecs, whose length travels first),
sigma of log2|g| and the format label. Rows from all ranks merge by concatenation.
"""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import torch


@dataclass(frozen=True)
class WireRow:
    step: int
    boundary: int
    raw_bytes: int
    sent_bytes: int
    predicted_bytes: int
    sigma_log2: float
    fmt: str


def _sigma_log2_tensor(x: torch.Tensor) -> torch.Tensor:
    """0-d float32 tensor on ``x.device``: the sample standard deviation of log2|x| over the
    finite nonzero entries (NaN with fewer than two), computed with masks rather than boolean
    indexing, which would read the count back to the host (a device synchronisation)."""
    a = x.detach().float().abs().reshape(-1)
    m = (a > 0) & torch.isfinite(a)
    n = m.sum()
    lg = torch.where(m, torch.log2(torch.where(m, a, torch.ones_like(a))), torch.zeros_like(a))
    mean = lg.sum() / n.clamp(min=1)
    var = (torch.where(m, lg - mean, torch.zeros_like(a)) ** 2).sum() / (n - 1).clamp(min=1)
    return torch.where(n >= 2, var.sqrt(), torch.full_like(var, float("nan")))


def sigma_log2(x: torch.Tensor) -> float:
    """Standard deviation of log2|x| over finite nonzero entries (paper 001, Eq. 2-4 units)."""
    return float(_sigma_log2_tensor(x))


class WireLog:
    """Rows of wire telemetry. ``record`` never synchronises a GPU: a row's sigma stays a device
    scalar until ``rows`` is read (end of a step or of the run), when all pending sigmas are
    copied to the host at once."""

    def __init__(self) -> None:
        self._rows: list[WireRow] = []
        self._pending: list[tuple[tuple, torch.Tensor]] = []  # (row fields but sigma, sigma)

    @property
    def rows(self) -> list[WireRow]:
        if self._pending:
            sig = torch.stack([t.to("cpu", torch.float64) for _, t in self._pending]).tolist()
            for (f, _), sg in zip(self._pending, sig):
                self._rows.append(WireRow(*f[:5], sg, f[5]))
            self._pending = []
        return self._rows

    def record(self, step: int, boundary: int, x: torch.Tensor, packet: torch.Tensor,
               predicted: int, fmt: str, sent_bytes: int | None = None) -> None:
        sent = int(packet.numel()) if sent_bytes is None else int(sent_bytes)
        fields = (int(step), int(boundary), x.numel() * x.element_size(), sent, int(predicted), fmt)
        if x.device.type == "cpu":
            _ = self.rows  # keep row order
            self._rows.append(WireRow(*fields[:5], sigma_log2(x), fmt))
        else:
            self._pending.append((fields, _sigma_log2_tensor(x)))

    def extend(self, rows: Iterable[WireRow | dict]) -> None:
        mine = self.rows  # pending rows first, in recording order
        for r in rows:
            mine.append(r if isinstance(r, WireRow) else WireRow(**r))

    def per_step(self) -> dict[int, dict[str, int]]:
        """step -> {"raw": bytes, "sent": bytes, "predicted": bytes} summed over boundaries."""
        out: dict[int, dict[str, int]] = defaultdict(lambda: {"raw": 0, "sent": 0, "predicted": 0})
        for r in self.rows:
            d = out[r.step]
            d["raw"] += r.raw_bytes
            d["sent"] += r.sent_bytes
            d["predicted"] += r.predicted_bytes
        return dict(sorted(out.items()))

    def step_totals(self, step: int) -> tuple[int, int]:
        raw = sum(r.raw_bytes for r in self.rows if r.step == step)
        sent = sum(r.sent_bytes for r in self.rows if r.step == step)
        return raw, sent

    def boundaries(self) -> list[int]:
        return sorted({r.boundary for r in self.rows})


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(log: WireLog, losses: Sequence[float], info: dict[str, Any]) -> dict[str, Any]:
    """The report dictionary (what ``report.json`` holds)."""
    steps = log.per_step()
    raw = sum(d["raw"] for d in steps.values())
    sent = sum(d["sent"] for d in steps.values())
    tail = max(1, len(losses) // 10)
    per_boundary = {}
    for b in log.boundaries():
        rows = [r for r in log.rows if r.boundary == b]
        per_boundary[str(b)] = {
            "format": rows[-1].fmt,
            "raw_bytes": sum(r.raw_bytes for r in rows),
            "sent_bytes": sum(r.sent_bytes for r in rows),
            "mean_sigma_log2": _mean([r.sigma_log2 for r in rows]),
        }
    return {
        **info,
        "steps": len(losses),
        "loss": list(map(float, losses)),
        "final_loss": _mean(list(losses[-tail:])),  # mean of the last 10% of steps
        "wire": {
            "raw_bytes": raw,
            "sent_bytes": sent,
            "compression_ratio": raw / sent if sent else float("nan"),
            "mb_per_step": sent / max(1, len(steps)) / 1e6,
            "per_step": {str(k): v for k, v in steps.items()},
            "per_boundary": per_boundary,
        },
        "rows": [asdict(r) for r in log.rows],
    }


def summary_table(rep: dict[str, Any], baseline: dict[str, Any] | None = None) -> str:
    w = rep["wire"]
    lines = [
        f"{'run':<28}{rep.get('run', '?')}",
        f"{'codec':<28}{rep.get('codec', '?')}",
        f"{'steps':<28}{rep['steps']}",
        f"{'final loss (last 10%)':<28}{rep['final_loss']:.4f}",
    ]
    if rep.get("entropy_floor") is not None:
        lines.append(f"{'entropy floor':<28}{rep['entropy_floor']:.4f}")
    if baseline is not None:
        lines.append(f"{'baseline final loss':<28}{baseline['final_loss']:.4f} "
                     f"(gap {rep['final_loss'] - baseline['final_loss']:+.4f})")
    lines += [
        f"{'wire MB/step':<28}{w['mb_per_step']:.4f}",
        f"{'uncompressed MB/step':<28}{w['raw_bytes'] / max(1, rep['steps']) / 1e6:.4f}",
        f"{'compression ratio':<28}{w['compression_ratio']:.2f}x",
    ]
    dp = rep.get("data_parallel")
    if dp and dp.get("bytes_sent"):
        lines.append(f"{'data-parallel all-reduce':<28}{dp['codec']} x{dp['size']}: "
                     f"{dp['bytes_sent'] / max(1, rep['steps']) / 1e6:.4f} MB/step, "
                     f"{dp['raw_bytes'] / dp['bytes_sent']:.2f}x")
    for b, d in w["per_boundary"].items():
        lines.append(f"  boundary {b:<17}{d['format']:<16} sigma(log2|g|) {d['mean_sigma_log2']:.2f}  "
                     f"{d['raw_bytes'] / max(1, d['sent_bytes']):.2f}x")
    width = max(len(s) for s in lines)
    return "\n".join(["=" * width] + lines + ["=" * width])


def write_report(out_dir: str, rep: dict[str, Any], baseline: dict[str, Any] | None = None) -> list[str]:
    """Write ``report.json`` and the PNG plots into ``out_dir``; returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "report.json")]
    with open(paths[0], "w", encoding="utf-8") as f:
        json.dump(rep, f, indent=1)

    def save(fig, name):
        p = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rep["loss"], label=rep.get("codec", "run"), lw=1)
    if baseline is not None:
        ax.plot(baseline["loss"], label=f"baseline ({baseline.get('codec', '')})", lw=1, alpha=0.8)
    if rep.get("entropy_floor") is not None:
        ax.axhline(rep["entropy_floor"], color="k", ls="--", lw=0.8, label="entropy floor")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="training loss")
    ax.legend()
    save(fig, "loss.png")

    rows = rep["rows"]
    bounds = sorted({r["boundary"] for r in rows})
    fig, ax = plt.subplots(figsize=(6, 4))
    for b in bounds:
        pts = [(r["step"], r["sigma_log2"]) for r in rows if r["boundary"] == b]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], ".", ms=2, label=f"boundary {b}")
    ax.set(xlabel="step", ylabel="sigma of log2|g|", title="per-boundary gradient spread")
    if bounds:
        ax.legend()
    save(fig, "sigma.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    fmts = sorted({r["fmt"] for r in rows})
    for b in bounds:
        pts = [(r["step"], fmts.index(r["fmt"])) for r in rows if r["boundary"] == b]
        ax.plot([p[0] for p in pts], [p[1] + 0.05 * b for p in pts], ".", ms=2, label=f"boundary {b}")
    ax.set_yticks(range(len(fmts)), fmts)
    ax.set(xlabel="step", title="chosen format per boundary")
    if bounds:
        ax.legend()
    save(fig, "formats.png")

    per = rep["wire"]["per_step"]
    xs = sorted(int(k) for k in per)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [per[str(k)]["raw"] / 1e6 for k in xs], label="uncompressed")
    ax.plot(xs, [per[str(k)]["sent"] / 1e6 for k in xs], label="sent")
    ax.set(xlabel="step", ylabel="MB per step (all boundaries)", title="bytes on the wire")
    ax.legend()
    save(fig, "bytes.png")
    return paths
