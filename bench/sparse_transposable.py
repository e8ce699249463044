"""Quality of the greedy transposable N:M mask against the exact one (kept sum of |w|).

    python bench/sparse_transposable.py --out bench/results/sparse_transposable.json

For Gaussian and heavy-tailed (lognormal-scaled) 1024x1024 weights, reports the ratio
kept|w|(greedy) / kept|w|(exact) over the whole matrix and its minimum over blocks, the
fraction of blocks where greedy is suboptimal, and the time of each mask finder (CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    import torch

    from gradwire.sparse.transposable import (_blocks, transposable_mask_exact,
                                              transposable_mask_greedy)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/results/sparse_transposable.json"))
    args = ap.parse_args()
    rows = []
    for n, m in ((2, 4), (1, 4), (3, 4)):
        for dist in ("gaussian", "heavy"):
            g = torch.Generator().manual_seed(0)
            w = torch.randn(args.size, args.size, generator=g)
            if dist == "heavy":
                w = w * torch.exp(2 * torch.randn(w.shape, generator=g))
            t = time.perf_counter()
            gm = transposable_mask_greedy(w, n, m)
            t_g = time.perf_counter() - t
            t = time.perf_counter()
            em = transposable_mask_exact(w, n, m)
            t_e = time.perf_counter() - t
            a = _blocks(w.abs().double(), m)
            kg = (a * _blocks(gm, m)).sum(1)
            ke = (a * _blocks(em, m)).sum(1)
            ratio = kg / ke
            row = {"n": n, "m": m, "weights": dist, "ratio_total": float(kg.sum() / ke.sum()),
                   "ratio_min_block": float(ratio.min()),
                   "frac_blocks_suboptimal": float((ratio < 1 - 1e-12).double().mean()),
                   "greedy_s": t_g, "exact_s": t_e}
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump({"command": "python bench/sparse_transposable.py " + " ".join(sys.argv[1:]),
                   "size": args.size, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
