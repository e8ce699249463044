"""fidelity.md / fidelity.json / loss-curve plots from the cached runs of ``bench/fidelity.py``.

Groups cached results by (task, steps, arm), pairs each arm with its baseline arm seed by seed
(only seeds where both ran), and computes the paired 95% t intervals
(``gradwire.fidelity.stats``). Nothing here trains; it only reads the cache.
"""
from __future__ import annotations

import glob
import json
import math
import os
from collections import defaultdict

from gradwire.fidelity.stats import bands, paired_difference, smooth

TOL = 0.01  # the goal: within 1% of the uncompressed final loss


def load(cache: str) -> dict:
    """(task, steps, arm) -> {seed: result}."""
    out: dict = defaultdict(dict)
    for path in sorted(glob.glob(os.path.join(cache, "*.json"))):
        with open(path, encoding="utf-8") as f:
            r = json.load(f)
        s = r["spec"]
        out[(s["task"], s["steps"], r["arm"])][s["seed"]] = r
    return out


def _f(x, nd=4):
    return "--" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _pct(iv):
    if iv.n < 2:
        return f"{100 * iv.mean:+.2f}% (n=1)"
    return f"{100 * iv.mean:+.2f}% [{100 * iv.lo:+.2f}, {100 * iv.hi:+.2f}]"


def _target(r) -> float | None:
    """Target sparsity of the run's codec (mean over boundaries), None if it does not prune."""
    from gradwire.fidelity.trainer import load_configs

    spec = r["spec"]
    _, gw = load_configs(spec["config"], spec.get("gradwire"))
    c = gw.codec
    if c.name == "prune":
        return c.sparsity
    if c.name == "nm":
        return 1 - c.n / c.m
    return None


def rows(data: dict, arms: dict) -> list[dict]:
    out = []
    for (task, steps, arm), by_seed in sorted(data.items()):
        base_arm = arms.get(arm, {}).get("baseline")
        base = data.get((task, steps, base_arm), {}) if base_arm else {}
        seeds = sorted(s for s in by_seed if (not base_arm or s in base))
        if not seeds:
            continue
        rs = [by_seed[s] for s in seeds]
        row = {"task": task, "steps": steps, "arm": arm, "baseline": base_arm, "seeds": seeds,
               "final_loss": [r["final_loss"] for r in rs], "final_val": [r["final_val"] for r in rs],
               "bits_per_element": sum(r["wire"]["bits_per_element"] for r in rs) / len(rs),
               "target_sparsity": _target(rs[0]), "optimizer": rs[0]["optimizer"], "stages": rs[0]["spec"]["stages"],
               "seconds": sum(r["seconds"] for r in rs) / len(rs), "commit": sorted({r.get("commit", "?") for r in rs}),
               "data": rs[0]["data"]}
        if base_arm:
            bl = [base[s]["final_loss"] for s in seeds]
            bv = [base[s]["final_val"] for s in seeds]
            pl, pv = paired_difference(row["final_loss"], bl), paired_difference(row["final_val"], bv)
            row.update(baseline_loss=bl, baseline_val=bv, paired_loss=pl.to_dict(), paired_val=pv.to_dict(),
                       verdict_loss=pl.verdict(TOL), verdict_val=pv.verdict(TOL))
        nb = len(rs[0]["boundaries"])
        per_b = []
        for b in range(nb):
            def m(k):
                v = [r["boundaries"][b][k] for r in rs]
                v = [x for x in v if x is not None and not math.isnan(x)]
                return sum(v) / len(v) if v else math.nan
            per_b.append({k: m(k) for k in ("cosine", "analytic_cosine", "added_var", "analytic_added_var",
                                             "sparsity", "analytic_sparsity", "sigma_log2")})
        row["boundaries"] = per_b
        pg = [r["param_grad"] for r in rs if r.get("param_grad")]
        if pg:
            row["param_cos_stage0"] = sum(p["cos_stage"][0] for p in pg) / len(pg)
            row["batch_cos_stage0"] = sum(p["batch_cos_stage"][0] for p in pg) / len(pg)
        out.append(row)
    return out


def _bmean(row, k):
    v = [b[k] for b in row["boundaries"] if not math.isnan(b[k])]
    return sum(v) / len(v) if v else math.nan


def table(rs: list[dict]) -> list[str]:
    lines = ["| arm | opt | stages | seeds | final loss | vs baseline (paired, 95% CI) | within 1%? | "
             "val loss vs baseline | boundary cos meas / lognormal | added var meas / lognormal | "
             "sparsity achieved / target | bits/elem | param-grad cos stage 0 (batch-vs-batch) |",
             "|" + "---|" * 13]
    for r in rs:
        opt = r["optimizer"]
        o = f"{opt['type']} {opt.get('lr', ''):g}"
        if "paired_loss" in r:
            from gradwire.fidelity.stats import Interval

            rel = Interval(**r["paired_loss"]["rel"])
            relv = Interval(**r["paired_val"]["rel"])
            vs, verdict, vv = _pct(rel), r["verdict_loss"], _pct(relv)
        else:
            vs, verdict, vv = "(baseline)", "", ""
        fl = sum(r["final_loss"]) / len(r["final_loss"])
        tgt = r["target_sparsity"]
        sp = f"{_f(_bmean(r, 'sparsity'), 3)} / {_f(tgt, 3) if tgt is not None else '--'}"
        lines.append(
            f"| {r['arm']} | {o} | {r['stages']} | {','.join(map(str, r['seeds']))} | {fl:.4f} | {vs} | {verdict} | {vv} | "
            f"{_f(_bmean(r, 'cosine'), 3)} / {_f(_bmean(r, 'analytic_cosine'), 3)} | "
            f"{_f(_bmean(r, 'added_var'), 3)} / {_f(_bmean(r, 'analytic_added_var'), 3)} | {sp} | "
            f"{r['bits_per_element']:.2f} | {_f(r.get('param_cos_stage0'), 3)} ({_f(r.get('batch_cos_stage0'), 3)}) |")
    return lines


def plot(data: dict, rs: list[dict], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    groups = sorted({(r["task"], r["steps"]) for r in rs})
    for task, steps in groups:
        arms = [r for r in rs if (r["task"], r["steps"]) == (task, steps)]
        fig, ax = plt.subplots(figsize=(9, 5.5))
        for r in arms:
            curves = [smooth(data[(task, steps, r["arm"])][s]["losses"], 25) for s in r["seeds"]]
            mean, lo, hi = bands(curves)
            x = range(1, len(mean) + 1)
            line, = ax.plot(x, mean, lw=1, label=f"{r['arm']} (n={len(curves)})")
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
        floor = next(iter(data[(task, steps, arms[0]["arm"])].values())).get("entropy_floor")
        if floor:
            ax.axhline(floor, color="k", ls="--", lw=0.7, label="entropy floor")
        ax.set(xlabel="step", ylabel="training loss (nats/token, 25-step mean)",
               title=f"{task}, {steps} steps: mean over seeds, 95% t band")
        ax.set_ylim(top=min(ax.get_ylim()[1], 3.2))
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        p = os.path.join(out_dir, f"fidelity_{task}_{steps}.png")
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    return paths


def write_report(cache: str, out_dir: str, arms: dict, notes_path: str | None = None) -> list[str]:
    data = load(cache)
    rs = rows(data, arms)
    os.makedirs(out_dir, exist_ok=True)
    jp = os.path.join(out_dir, "fidelity.json")
    with open(jp, "w", encoding="utf-8") as f:
        json.dump({"tolerance_rel": TOL, "rows": rs}, f, indent=1)
    pngs = plot(data, rs, out_dir)
    notes_path = notes_path or os.path.join(out_dir, "fidelity_notes.md")
    notes = open(notes_path, encoding="utf-8").read() if os.path.exists(notes_path) else ""
    md = ["# Training fidelity (generated by `bench/fidelity.py`; prose in `fidelity_notes.md`)", "", notes, ""]
    for task, steps in sorted({(r["task"], r["steps"]) for r in rs}):
        sub = [r for r in rs if (r["task"], r["steps"]) == (task, steps)]
        md += [f"## {task}, {steps} steps ({sub[0]['data']})", "",
               f"![loss curves](fidelity_{task}_{steps}.png)", ""] + table(sub) + [""]
    md += ["Columns: *final loss* = mean training loss over the last 10% of steps, mean over seeds; "
           "*vs baseline* = mean of the per-seed relative differences to the paired baseline arm, with the "
           "95% Student t interval over seeds; *within 1%?* = `within` if the interval's upper end is <= +1%, "
           "`outside` if its lower end is > +1%, else `unresolved`; *val loss* = the same for the "
           "validation loss at the end; *boundary cos* = cosine between the boundary gradient and what the "
           "receiver decodes (mean over compressed tensors and boundaries) beside the analytic pruning cosine "
           "of a lognormal fitted to the same tensor at the threshold used; *added var* = "
           "||g_hat - g||^2 / ||g||^2 beside 1/cos^2 - 1 of that analytic cosine; *param-grad cos* = cosine "
           "between the compressed and the exact parameter gradient of stage 0 on the same step and weights, "
           "with the cosine between exact gradients of two independent batches in brackets (the minibatch "
           "noise level)."]
    mp = os.path.join(out_dir, "fidelity.md")
    with open(mp, "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    return [mp, jp] + pngs
