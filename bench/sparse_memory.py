"""Peak memory of a truly sparse Linear whose dense weight would not fit: 100k x 100k at 99.9%.

The dense float32 weight would be 1e10 * 4 B = 37.3 GiB (and as much again for its gradient);
the SparseLinear holds 1e7 connections. Each configuration runs in a fresh subprocess, so its
peak resident set size (``ru_maxrss``) is its own; the baseline row (imports only, no layer)
shows what the interpreter and torch cost by themselves.

    python bench/sparse_memory.py --out bench/results/sparse_memory.json

Each child: Erdos-Renyi init, ``--steps`` SGD-momentum steps on a regression to a sparse
teacher (batch 32), and one GraBo prune-and-grow with |S| = 10 |P| (|P| = 20% of the active
connections = 2M, so 20M candidate gradients are computed without a dense gradient).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(n: int, density: float, steps: int, method: str, multiplier: float,
          layout: str = "sparse") -> dict:
    import torch
    from torch import nn

    sys.path.insert(0, ROOT)
    from gradwire.sparse.dst import DSTConfig, DynamicSparseTrainer, erdos_renyi_linear

    torch.manual_seed(0)
    out = {"n": n, "density": density, "steps": steps, "method": method, "layout": layout,
           "subset_multiplier": multiplier, "dense_weight_gib": n * n * 4 / 2**30}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["rss_after_import_mib"] = rss0
    if method == "baseline":
        out["peak_rss_mib"] = rss0
        return out
    t = time.perf_counter()
    model = nn.Sequential(erdos_renyi_linear(n, n, density, seed=1, bias=torch.zeros(n),
                                             layout=layout))
    teacher = erdos_renyi_linear(n, n, density, seed=2)
    out["init_s"] = time.perf_counter() - t
    layer = model[0]
    out["nnz"] = layer.nnz
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    dst = DynamicSparseTrainer(model, opt, DSTConfig(method=method, update_every=steps,
                                                     prune_fraction=0.2, t_end=10 * steps,
                                                     subset_multiplier=max(multiplier, 1.0)))
    g = torch.Generator().manual_seed(0)
    losses, step_s = [], []
    for _ in range(steps):
        x = torch.randn(32, n, generator=g)
        with torch.no_grad():
            y = teacher(x)
        t = time.perf_counter()
        opt.zero_grad()
        # Summed over outputs (a mean over 1e5 outputs would shrink every weight's gradient
        # by 1e5); reported per output.
        loss = ((model(x) - y) ** 2).sum(1).mean()
        loss.backward()
        updated = dst.step()
        step_s.append(time.perf_counter() - t)
        losses.append(float(loss.detach()) / n)
    out.update(losses=losses, step_s=step_s, updated_last_step=updated,
               history=[{k: v for k, v in h.items() if k != "per_layer"} for h in dst.history],
               nnz_after=layer.nnz,
               peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--density", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/results/sparse_memory.json"))
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "MULT"))
    ap.add_argument("--layout", default="sparse", choices=("sparse", "masked"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.n, args.density, args.steps, args.child[0],
                               float(args.child[1]), args.layout)))
        return
    rows = []
    for method, mult in (("baseline", 0), ("grabo", 10), ("random", 10), ("set", 1)):
        cmd = [sys.executable, __file__, "--n", str(args.n), "--density", str(args.density),
               "--steps", str(args.steps), "--child", method, str(mult)]
        t = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["wall_s"] = time.perf_counter() - t
        rows.append(row)
        print(f"{method:8s} x{mult:<3} peak RSS {row['peak_rss_mib']:8.0f} MiB  "
              f"(dense weight would be {row['dense_weight_gib']:.1f} GiB)  "
              f"losses {[round(v, 4) for v in row.get('losses', [])]}", flush=True)
    meta = {"command": "python bench/sparse_memory.py " + " ".join(sys.argv[1:]),
            "machine": platform.platform(), "cpus": os.cpu_count(),
            "torch_threads": __import__("torch").get_num_threads(),
            "note": "peak_rss_mib is ru_maxrss of a fresh subprocess per row"}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
