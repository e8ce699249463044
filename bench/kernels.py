"""Benchmark the native kernels against the casts they should rival and their references.

    python bench/kernels.py                      # CPU, 64M bf16 elements -> bench/results/kernels_cpu.json
    python bench/kernels.py --device cuda        # GPU: runs bench/kernels_cuda.py (its own goals)

Goals (issue 4), as ratios measured side by side in one run:
  CPU: FP6 encode (scale, stochastic rounding, packing: fp6_encode_sr) <= 2x the time of
       x.to(torch.float8_e5m2); FP6 decode to bf16 <= 2x the cast float8_e5m2 -> bf16;
       every kernel >= 10x faster than its pure-PyTorch reference. The encode with the fused
       lognormal statistics (fp6_encode_sr_stats: what a policy runs on its statistics steps,
       PolicyConfig.stats_every) is timed against the cast as well and reported beside it.
  GPU: see bench/kernels_cuda.py.
Output allocation: x.to(float8) and the kernels allocate their outputs; with glibc's default
malloc a 48-64 MB output is a fresh mmap whose first-touch page faults cost as much as a cast
(and vary with the machine's transparent-huge-page state). To time compute alone, keep freed
memory in the heap:
    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 python bench/kernels.py ...
The JSON records which allocator regime ran ("malloc_env").
The references are timed on --ref-numel elements (they need ~40 bytes/element of temporaries)
and compared per element; kernels and casts on --numel. Times are medians of --repeat runs; the
goal ratios are medians of per-round ratios, each kernel run alternately with its baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gradwire import _build, ops  # noqa: E402
from gradwire.numerics.fp import FPFormat  # noqa: E402

FP6 = FPFormat(4, 1)  # 1-4-1, the FP6 the paper picks at sigma_log2 ~ 4


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device: str, repeat: int) -> float:
    fn()  # warm-up (allocator, lazy init)
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timeit_paired(fn, base, device: str, repeat: int) -> tuple[float, float, float]:
    """Time fn and base alternately, back to back, ``repeat`` times: (median fn, median base,
    median of the per-round ratios fn/base). On a shared machine the load drifts between
    seconds; a ratio taken within one round sees (nearly) the same load on both sides."""
    fn(), base()
    _sync(device)
    tf, tb = [], []
    for _ in range(repeat):
        for f, acc in ((fn, tf), (base, tb)):
            t0 = time.perf_counter()
            f()
            _sync(device)
            acc.append(time.perf_counter() - t0)
    ratios = [a / b for a, b in zip(tf, tb)]
    return statistics.median(tf), statistics.median(tb), statistics.median(ratios)


def _git_commit() -> str | None:
    """HEAD of the checkout the benchmark ran from (None outside a git checkout)."""
    import subprocess
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--numel", type=int, default=64 * 2**20)
    ap.add_argument("--ref-numel", type=int, default=4 * 2**20)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch.set_num_threads for kernels, casts and references alike (0: torch's "
                         "default). On a loaded shared CPU the multi-threaded references slow down "
                         "far more than the kernels (OpenMP barriers per small op), so --threads 1 "
                         "gives the load-robust speedups")
    args = ap.parse_args()
    if args.device == "cuda":  # the GPU benchmark has its own goals, sizes and timer
        from bench import kernels_cuda

        return kernels_cuda.main(["--out", args.out] if args.out else [])
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dev = args.device
    _build.load_native()
    impls = {op: ops.implementation(op, dev) for op in ops.SCHEMAS}
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(args.numel, generator=g) * torch.exp2(torch.randn(args.numel, generator=g) * 3)).to(torch.bfloat16).to(dev)
    xr = x[: args.ref_numel].clone()
    n, nr = x.numel(), xr.numel()

    packed, _ = ops.fp_encode(x, FP6, "stochastic", scale_exp=4, seed=1)
    packed_r = packed[: (nr * FP6.bits) // 8].clone()
    codes = torch.randint(0, 64, (n,), generator=g, dtype=torch.int64).to(torch.uint8).to(dev)
    codes_r = codes[:nr].clone()
    f8 = x.to(torch.float8_e5m2)
    R = ops.REFERENCES

    kern = {  # name -> (native call on n elements, reference call on nr elements)
        "fp6_encode_sr": (lambda: ops.fp_encode(x, FP6, "stochastic", scale_exp=4, seed=1, with_stats=False),
                          lambda: R["fp_encode"](xr, 4, 1, FP6.bias, True, 4, True, 1, 0, False)),
        "fp6_encode_sr_stats": (lambda: ops.fp_encode(x, FP6, "stochastic", scale_exp=4, seed=1),
                                lambda: R["fp_encode"](xr, 4, 1, FP6.bias, True, 4, True, 1, 0)),
        "fp6_decode_bf16": (lambda: ops.fp_decode(packed, n, FP6, scale_exp=4, dtype=torch.bfloat16),
                            lambda: R["fp_decode"](packed_r, nr, 4, 1, FP6.bias, True, 4, torch.bfloat16)),
        "pack_bits_6": (lambda: ops.pack_bits(codes, 6), lambda: R["pack_bits"](codes_r, 6)),
        "unpack_bits_6": (lambda: ops.unpack_bits(packed, 6, n), lambda: R["unpack_bits"](packed_r, 6, nr)),
        "moment_stats": (lambda: ops.moment_stats(x), lambda: R["moment_stats"](xr)),
        "stochastic_prune": (lambda: ops.stochastic_prune(x, 0.01, seed=1),
                             lambda: R["stochastic_prune"](xr, 0.01, 1, 0)),
        "nm_mvue_24_exact": (lambda: ops.nm_select(x, "mvue_24_exact", seed=1),
                             lambda: R["nm_select"](xr, 1, 1, 0)),
        "nm_mvue_24_approx": (lambda: ops.nm_select(x, "mvue_24_approx", seed=1),
                              lambda: R["nm_select"](xr, 2, 1, 0)),
    }
    res: dict = {
        "device": dev,
        "device_name": torch.cuda.get_device_name() if dev == "cuda" else cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numel": n,
        "ref_numel": nr,
        "dtype": "bfloat16",
        "implementations": impls,
        "command": "python " + " ".join(sys.argv),
        "git_commit": _git_commit(),
        # The CPU is shared: ratios move with the load (1/5/15-minute averages, before the run).
        "load_average_before": list(os.getloadavg()),
        "malloc_env": {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")},
        "seconds": {},
        "ns_per_element": {},
    }
    t_cast = timeit(lambda: x.to(torch.float8_e5m2), dev, args.repeat)
    t_back = timeit(lambda: f8.to(torch.bfloat16), dev, args.repeat)
    t_copy = timeit(lambda: x.clone(), dev, args.repeat)
    res["seconds"].update(cast_bf16_to_fp8e5m2=t_cast, cast_fp8e5m2_to_bf16=t_back, copy_bf16=t_copy)
    speedup = {}
    for name, (native, ref) in kern.items():
        t = timeit(native, dev, args.repeat)
        tr = timeit(ref, dev, max(1, args.repeat // 2))
        res["seconds"][name] = t
        res["seconds"][name + "_reference_at_ref_numel"] = tr
        res["ns_per_element"][name] = 1e9 * t / n
        res["ns_per_element"][name + "_reference"] = 1e9 * tr / nr
        speedup[name] = (tr / nr) / (t / n)
        print(f"{name:<22} {1e3 * t:9.1f} ms   reference {1e9 * tr / nr:7.2f} ns/el   speedup {speedup[name]:8.1f}x", flush=True)
    # The goal ratios: each kernel timed alternately with its baseline (timeit_paired).
    enc_fn, dec_fn = kern["fp6_encode_sr"][0], kern["fp6_decode_bf16"][0]
    encs_fn = kern["fp6_encode_sr_stats"][0]
    enc, t_cast_p, r_enc = timeit_paired(enc_fn, lambda: x.to(torch.float8_e5m2), dev, args.repeat)
    encs, t_cast_s, r_encs = timeit_paired(encs_fn, lambda: x.to(torch.float8_e5m2), dev, args.repeat)
    dec, t_back_p, r_dec = timeit_paired(dec_fn, lambda: f8.to(torch.bfloat16), dev, args.repeat)
    res["paired_seconds"] = {"fp6_encode_sr": enc, "cast_bf16_to_fp8e5m2": t_cast_p,
                             "fp6_encode_sr_stats": encs, "cast_bf16_to_fp8e5m2_beside_stats": t_cast_s,
                             "fp6_decode_bf16": dec, "cast_fp8e5m2_to_bf16": t_back_p}
    res["ratios"] = {
        "encode_over_cast_to_fp8": r_enc,
        "encode_with_stats_over_cast_to_fp8": r_encs,
        "decode_over_cast_from_fp8": r_dec,
        "speedup_over_reference": speedup,
    }
    res["goals"] = {
        "encode_within_2x_cast": r_enc <= 2.0,
        "decode_within_2x_cast": r_dec <= 2.0,
        "every_kernel_10x_reference": all(s >= 10 for s in speedup.values()),
    }
    print(f"paired: encode {1e3 * enc:.1f} ms / cast bf16->fp8 {1e3 * t_cast_p:.1f} ms = {r_enc:.2f}; "
          f"encode with stats {1e3 * encs:.1f} ms / cast {1e3 * t_cast_s:.1f} ms = {r_encs:.2f}; "
          f"decode {1e3 * dec:.1f} ms / cast fp8->bf16 {1e3 * t_back_p:.1f} ms = {r_dec:.2f} "
          f"(medians of {args.repeat} alternating rounds)")
    print(json.dumps(res["goals"]))
    res["load_average_after"] = list(os.getloadavg())
    out = args.out
    if out is None:
        tag = "cpu" if dev == "cpu" else "cuda_" + res["device_name"].replace(" ", "_").lower()
        if args.threads > 0:
            tag += f"_{args.threads}thread"
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"kernels_{tag}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    print("wrote", out)


if __name__ == "__main__":
    main()
