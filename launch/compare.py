"""Compare main-job runs: a table of final loss, gap to the baseline, and wire compression, and
one PNG with every loss curve.

    python launch/compare.py --baseline reports/baseline/report.json \
        reports/fp6/report.json reports/nm12/report.json --out bench/results/train_compare

"Final loss" is the mean training loss over the last 10% of steps (train.py's report). All runs
of a comparison should share data, seed and model (train.py's defaults do), so the only
difference is what the boundary gradients went through.
"""
from __future__ import annotations

import argparse
import json
import os


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def smooth(xs, k):
    """Trailing mean over k steps (for readable curves; the table uses the raw losses)."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="report.json files")
    p.add_argument("--baseline", required=True, help="report.json of the uncompressed run")
    p.add_argument("--out", required=True, help="folder for comparison.md and comparison.png")
    a = p.parse_args(argv)
    base = _load(a.baseline)
    reps = [base] + [_load(r) for r in a.runs]
    floor = base.get("entropy_floor")
    lines = ["| run | codec | steps | final loss | gap to baseline | compression ratio |",
             "|---|---|---|---|---|---|"]
    for r in reps:
        gap = r["final_loss"] - base["final_loss"]
        lines.append(f"| {r['run']} | {r['codec']} | {r['steps']} | {r['final_loss']:.4f} | "
                     f"{gap:+.4f} | {r['wire']['compression_ratio']:.2f}x |")
    if floor is not None:
        lines.append(f"\nEntropy floor of the data ({base['data']}): {floor:.4f} nats/token.")
    table = "\n".join(lines)
    print(table)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "comparison.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in reps:
        ax.plot(smooth(r["loss"], 25), lw=1.2, label=f"{r['run']} ({r['final_loss']:.3f})")
    if floor is not None:
        ax.axhline(floor, color="k", ls="--", lw=0.8, label=f"entropy floor ({floor:.3f})")
    ax.set(xlabel="step", ylabel="training loss, nats/token (25-step mean)",
           title="main job: loss with compressed pipeline-boundary gradients")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "comparison.png"), dpi=100)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
