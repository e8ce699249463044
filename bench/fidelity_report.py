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
                v = [r["boundaries"][b].get(k, math.nan) for r in rs]
                v = [x for x in v if x is not None and not math.isnan(x)]
                return sum(v) / len(v) if v else math.nan
            per_b.append({k: m(k) for k in ("cosine", "analytic_cosine", "added_var", "analytic_added_var",
                                             "sparsity", "analytic_sparsity", "sigma_log2", "expected_cosine",
                                             "expected_sparsity", "atp_predicted_sparsity")})
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


def _noise_ratio(c_comp: float | None, c_batch: float | None) -> float:
    """Compression noise over minibatch noise in the stage-0 parameter gradient, from two cosines:
    two independent batch gradients g + n1, g + n2 have cosine 1 / (1 + r), r = E|n|^2 / |g|^2;
    the compressed gradient of one batch has cosine c to it, so its added variance is
    (1/c^2 - 1) |g + n|^2 = (1/c^2 - 1)(1 + r) |g|^2, and the ratio is that over r |g|^2.
    1.0 means the codec adds as much noise as the minibatch already has (like halving the batch)."""
    if c_comp is None or c_batch is None or not (0 < c_batch < 1) or not (0 < c_comp <= 1):
        return math.nan
    r = 1.0 / c_batch - 1.0
    return (1.0 / c_comp ** 2 - 1.0) * (1.0 + r) / r


def table(rs: list[dict]) -> list[str]:
    """Two tables: the training outcome, and what the codec did to the gradients."""
    from gradwire.fidelity.stats import Interval

    a = ["| arm | optimizer | stages | seeds | final loss | vs baseline (paired, 95% CI) | within 1%? | "
         "val loss | val vs baseline (95% CI) | bits/elem | sparsity achieved / target |", "|" + "---|" * 11]
    b = ["| arm | sigma(log2\|g\|) | boundary cos: measured / exact expected / lognormal model | "
         "added var: measured / lognormal model | param-grad cos stage 0 | batch-vs-batch cos | "
         "codec / minibatch noise | ATP on a lognormal would zero | per boundary: cos (sigma, sparsity) |",
         "|" + "---|" * 9]
    for r in rs:
        opt = r["optimizer"]
        o = f"{opt['type']} lr {opt.get('lr', float('nan')):g}"
        if "paired_loss" in r:
            vs, verdict = _pct(Interval(**r["paired_loss"]["rel"])), r["verdict_loss"]
            vv = _pct(Interval(**r["paired_val"]["rel"]))
        else:
            vs, verdict, vv = "(baseline)", "", ""
        fl = sum(r["final_loss"]) / len(r["final_loss"])
        fv = sum(r["final_val"]) / len(r["final_val"])
        tgt = r["target_sparsity"]
        sp = f"{_f(_bmean(r, 'sparsity'), 3)} / {_f(tgt, 3) if tgt is not None else '--'}"
        a.append(f"| {r['arm']} | {o} | {r['stages']} | {','.join(map(str, r['seeds']))} | {fl:.4f} | {vs} | "
                 f"{verdict} | {fv:.4f} | {vv} | {r['bits_per_element']:.2f} | {sp} |")
        if "paired_loss" not in r:
            continue
        b.append(f"| {r['arm']} | {_f(_bmean(r, 'sigma_log2'), 2)} | {_f(_bmean(r, 'cosine'), 3)} / "
                 f"{_f(_bmean(r, 'expected_cosine'), 3)} / {_f(_bmean(r, 'analytic_cosine'), 3)} | "
                 f"{_f(_bmean(r, 'added_var'), 3)} / {_f(_bmean(r, 'analytic_added_var'), 3)} | "
                 f"{_f(r.get('param_cos_stage0'), 3)} | {_f(r.get('batch_cos_stage0'), 3)} | "
                 f"{_f(_noise_ratio(r.get('param_cos_stage0'), r.get('batch_cos_stage0')), 2)} | "
                 f"{_f(_bmean(r, 'atp_predicted_sparsity'), 3)} | "
                 + ("; ".join(f"b{i}: {_f(bd['cosine'], 2)} ({_f(bd['sigma_log2'], 2)}, {_f(bd['sparsity'], 2)})"
                              for i, bd in enumerate(r["boundaries"])) if len(r["boundaries"]) > 1 else "") + " |")
    return a + [""] + b


def plot(data: dict, rs: list[dict], out_dir: str) -> list[str]:
    """Per (task, steps): left, the training loss of each arm (mean over seeds, 95% t band);
    right, the paired difference to its baseline arm (per-seed difference of the smoothed curves,
    mean and 95% t band), which removes the seed-to-seed spread that dominates the left panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    groups = sorted({(r["task"], r["steps"]) for r in rs})
    for task, steps in groups:
        arms = [r for r in rs if (r["task"], r["steps"]) == (task, steps)]
        fig, (ax, dx) = plt.subplots(1, 2, figsize=(15, 6))
        cmap = plt.get_cmap("tab20")
        for i, r in enumerate(arms):
            color, ls = cmap(i % 20), ("-", "--", ":")[i // 20 % 3]
            curves = [smooth(data[(task, steps, r["arm"])][s]["losses"], 25) for s in r["seeds"]]
            mean, lo, hi = bands(curves)
            x = range(1, len(mean) + 1)
            ax.plot(x, mean, lw=1, color=color, ls=ls, label=f"{r['arm']} (n={len(curves)})")
            ax.fill_between(x, lo, hi, color=color, alpha=0.10, lw=0)
            if r.get("baseline"):
                base = [smooth(data[(task, steps, r["baseline"])][s]["losses"], 25) for s in r["seeds"]]
                diffs = [[a - b for a, b in zip(c, bc)] for c, bc in zip(curves, base)]
                dm, dlo, dhi = bands(diffs)
                dx.plot(x, dm, lw=1, color=color, ls=ls, label=f"{r['arm']} - {r['baseline']}")
                dx.fill_between(x, dlo, dhi, color=color, alpha=0.10, lw=0)
        floor = next(iter(data[(task, steps, arms[0]["arm"])].values())).get("entropy_floor")
        if floor:
            ax.axhline(floor, color="k", ls="--", lw=0.7, label="entropy floor")
        ax.set(xlabel="step", ylabel="training loss (nats/token, 25-step mean)",
               title=f"{task}, {steps} steps: mean over seeds, 95% t band")
        dx.axhline(0, color="k", lw=0.7)
        dx.set(xlabel="step", ylabel="paired difference to the baseline arm (nats/token)",
               title="run - baseline, same seeds: mean, 95% t band")
        dx.set_ylim(-0.3, 1.2)
        ax.legend(fontsize=7, ncol=2)
        dx.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        p = os.path.join(out_dir, f"fidelity_{task}_{steps}.png")
        fig.savefig(p, dpi=80)
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
    # the longest runs of each task first: the 1000-step main job, then text, then shorter runs
    order = sorted({(r["task"], r["steps"]) for r in rs}, key=lambda ts: (ts[0] == "markov" and ts[1] < 1000, ts[0], -ts[1]))
    for task, steps in order:
        sub = [r for r in rs if (r["task"], r["steps"]) == (task, steps)]
        md += [f"## {task}, {steps} steps ({sub[0]['data']})", "",
               f"![loss curves](fidelity_{task}_{steps}.png)", ""] + table(sub) + [""]
    md += ["Columns. Outcome table: *final loss* = mean training loss over the last 10% of steps (the main "
           "job's measure), mean over seeds; *vs baseline* = mean of the per-seed relative differences to the "
           "paired baseline arm (same seeds, optimizer and learning rate), with the 95% Student t interval over "
           "seeds; *within 1%?* = `within` if the interval's upper end is <= +1%, `outside` if its lower end is "
           "> +1%, else `unresolved`; *val* = the same for the held-out loss at the end (stdlib: the corpus's "
           "validation split; markov: a separately seeded sample); *bits/elem* = bytes on the wire per boundary "
           "element (fp32 = 32), warm-up included; *sparsity* = exact zeros the receiver decodes, mean over "
           "compressed tensors. Gradient table: *boundary cos* = cosine between the boundary gradient and what "
           "the receiver decodes (mean over compressed tensors and boundaries), beside the exact conditional "
           "expectation for the same tensor and threshold (`numerics.pruning_regime`) and the analytic cosine of "
           "a lognormal fitted to it (`sparsity_allocation.pruning_cosine`); *added var* = "
           "\\|g_hat - g\\|^2 / \\|g\\|^2 beside 1/cos^2 - 1 of the lognormal model; *param-grad cos* = "
           "cosine between the compressed and the exact parameter gradient of stage 0 (the stage behind every "
           "boundary) on the same step, weights and batch; *batch-vs-batch* = cosine between exact gradients of "
           "two independent batches (the minibatch noise); *codec / minibatch noise* = the variance the codec "
           "adds to the stage-0 gradient over the minibatch variance, from those two cosines "
           "(`fidelity_report._noise_ratio`; 1.0 is like halving the batch); *ATP on a lognormal* = the "
           "sparsity ATP's normal-model threshold would reach on a lognormal with each tensor's fit (what the "
           "numerics tests predict for it)."]
    mp = os.path.join(out_dir, "fidelity.md")
    with open(mp, "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    return [mp, jp] + pngs
