"""GraBo versus RigL as the subset grows: accuracy (digits) and peak memory (a large layer).

    python bench/sparse_subset.py --out bench/results/sparse_subset

Accuracy: MLP 64-256-256-10 on scikit-learn's digits (1347 train / 450 test), 98% sparsity
(density 0.02, the sparsity of paper 003 Fig. 2), 30 epochs of SGD momentum, prune-and-grow
every 20 steps with the pruned fraction cosine-annealed from 0.3 to 0 at 75% of training; mean
and standard deviation over ``--seeds`` seeds. GraBo and Random subset sizes are
``multiplier x |P|``, reported also as a fraction of |W| (the x-axis of paper 003 Fig. 2).

Memory: one 10k x 10k layer at density 0.01 (1M connections), batch 32, two SGD steps with a
prune-and-grow on the second: RigL on the masked-dense layer (it needs the dense gradient)
versus GraBo on SparseLinear at each multiplier. ``ru_maxrss`` of a fresh subprocess per row
(bench/sparse_memory.py ``child``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MULTS = (1, 2, 4, 10)


def train_digits(method: str, density: float, mult: float, seed: int, epochs: int = 30) -> dict:
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    from gradwire.sparse import DSTConfig, DynamicSparseTrainer, sparsify

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1347], perm[1347:]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    if method != "dense":
        sparsify(model, density, layout="masked" if method == "rigl" else "sparse", seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    steps = epochs * (len(tr) // 64)
    dst = None
    if method not in ("dense", "static"):
        dst = DynamicSparseTrainer(model, opt, DSTConfig(
            method=method, update_every=20, prune_fraction=0.3, t_end=int(0.75 * steps),
            subset_multiplier=max(mult, 1), seed=seed))
    g = torch.Generator().manual_seed(seed)
    t = time.perf_counter()
    for _ in range(epochs):
        p = tr[torch.randperm(len(tr), generator=g)]
        for i in range(0, len(p) - 63, 64):
            b = p[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[b]), y[b]).backward()
            dst.step() if dst else opt.step()
    with torch.no_grad():
        acc = float((model(x[te]).argmax(1) == y[te]).float().mean())
    n_pruned = sum(h["pruned"] for h in dst.history) if dst else 0
    return {"method": method, "multiplier": mult, "seed": seed, "acc": acc,
            "train_s": time.perf_counter() - t, "total_pruned": n_pruned}


def memory_row(method: str, mult: float, layout: str, n: int, density: float) -> dict:
    cmd = [sys.executable, os.path.join(ROOT, "bench/sparse_memory.py"), "--n", str(n),
           "--density", str(density), "--steps", "2", "--layout", layout,
           "--child", method, str(mult)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    import torch
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/results/sparse_subset"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--density", type=float, default=0.02)
    ap.add_argument("--mem-n", type=int, default=10_000)
    ap.add_argument("--mem-density", type=float, default=0.01)
    ap.add_argument("--memory-only", action="store_true",
                    help="redo the memory rows, keep the accuracy rows of --out.json")
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny GEMMs; threads only contend on a shared machine

    configs = [("dense", 0), ("static", 0), ("set", 1), ("rigl", 0)]
    configs += [(m, k) for m in ("grabo", "random") for k in MULTS]
    acc_rows = []
    acc_command = "python bench/sparse_subset.py " + " ".join(sys.argv[1:])
    if args.memory_only:  # keep the accuracy rows (and their command) of an earlier run
        with open(args.out + ".json") as f:
            old = json.load(f)
        acc_rows, configs = old["accuracy"], []
        acc_command = old["meta"].get("accuracy_command", old["meta"]["command"])
    for method, mult in configs:
        runs = [train_digits(method, args.density, mult, s) for s in range(args.seeds)]
        a = torch.tensor([r["acc"] for r in runs], dtype=torch.float64)
        row = {"method": method, "multiplier": mult, "acc_mean": float(a.mean()),
               "acc_std": float(a.std()) if len(runs) > 1 else 0.0, "runs": runs}
        acc_rows.append(row)
        print(f"{method:7s} x{mult:<3} acc {row['acc_mean']:.4f} +- {row['acc_std']:.4f}",
              flush=True)

    mem_rows = [memory_row("baseline", 0, "sparse", args.mem_n, args.mem_density),
                memory_row("rigl", 0, "masked", args.mem_n, args.mem_density)]
    mem_rows += [memory_row("grabo", k, "sparse", args.mem_n, args.mem_density) for k in MULTS]
    for r in mem_rows:
        print(f"{r['method']:8s} {r['layout']:6s} x{r['subset_multiplier']:<4} "
              f"peak RSS {r['peak_rss_mib']:7.0f} MiB", flush=True)

    meta = {"command": "python bench/sparse_subset.py " + " ".join(sys.argv[1:]),
            "accuracy_command": acc_command,
            "machine": platform.platform(), "cpus": os.cpu_count(),
            "digits_density": args.density, "seeds": args.seeds,
            "mem_layer": [args.mem_n, args.mem_n], "mem_density": args.mem_density}
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "accuracy": acc_rows, "memory": mem_rows}, f, indent=1)
    write_table(args.out + ".md", meta, acc_rows, mem_rows, args)
    plot(args.out + ".png", acc_rows, mem_rows, args)


def _subset_fraction(mult, density, prune=0.3):
    """|S| / |W| at the first (largest) update: mult * prune * density."""
    return mult * prune * density


def write_table(path, meta, acc_rows, mem_rows, args):
    lines = ["# GraBo vs RigL as the subset grows", "",
             f"Accuracy: `{meta['accuracy_command']}`; memory: `{meta['command']}`", "",
             f"## Accuracy, digits MLP at density {args.density} ({args.seeds} seeds)", "",
             "| method | subset multiplier | subset / W (first update) | test accuracy |",
             "|---|---|---|---|"]
    for r in acc_rows:
        frac = (f"{_subset_fraction(r['multiplier'], args.density):.4f}"
                if r["method"] in ("grabo", "random") else "-")
        lines.append(f"| {r['method']} | {r['multiplier'] or '-'} | {frac} | "
                     f"{r['acc_mean']:.4f} +- {r['acc_std']:.4f} |")
    lines += ["", f"## Peak memory, {args.mem_n}x{args.mem_n} layer at density "
              f"{args.mem_density} (fresh process per row)", "",
              "| method | layout | subset multiplier | peak RSS MiB | above baseline MiB |",
              "|---|---|---|---|---|"]
    base = mem_rows[0]["peak_rss_mib"]
    for r in mem_rows:
        lines.append(f"| {r['method']} | {r['layout']} | {r['subset_multiplier'] or '-'} | "
                     f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] - base:.0f} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(path, acc_rows, mem_rows, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for method, style in (("grabo", "o-"), ("random", "s--")):
        rs = [r for r in acc_rows if r["method"] == method]
        xs = [_subset_fraction(r["multiplier"], args.density) for r in rs]
        ax1.errorbar(xs, [r["acc_mean"] for r in rs], yerr=[r["acc_std"] for r in rs],
                     fmt=style, label=method, capsize=3)
    for r, color in zip([r for r in acc_rows if r["method"] in ("dense", "rigl", "set",
                                                               "static")],
                        ("k", "r", "g", "gray")):
        ax1.axhline(r["acc_mean"], color=color, ls=":", label=r["method"])
    ax1.set_xscale("log")
    ax1.set_xlabel("|S| / |W| at the first update")
    ax1.set_ylabel("test accuracy")
    ax1.set_title(f"digits MLP, density {args.density}")
    ax1.legend(fontsize=8)
    base = mem_rows[0]["peak_rss_mib"]
    gr = [r for r in mem_rows if r["method"] == "grabo"]
    ax2.plot([r["subset_multiplier"] for r in gr], [r["peak_rss_mib"] - base for r in gr], "o-",
             label="GraBo (SparseLinear)")
    rigl = [r for r in mem_rows if r["method"] == "rigl"][0]
    ax2.axhline(rigl["peak_rss_mib"] - base, color="r", ls=":", label="RigL (masked dense)")
    ax2.set_xscale("log")
    ax2.set_xlabel("subset multiplier |S| / |P|")
    ax2.set_ylabel("peak RSS above baseline (MiB)")
    ax2.set_title(f"{args.mem_n}x{args.mem_n} layer, density {args.mem_density}")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
