"""Benchmark the native kernels against the casts they should rival and their references.

    python bench/kernels.py                      # CPU, 64M bf16 elements -> bench/results/kernels_cpu.json
    python bench/kernels.py --device cuda        # GPU -> bench/results/kernels_cuda_<gpu>.json

Goals (issue 4), as ratios measured side by side in one run:
  CPU: FP6 encode (scale, stochastic rounding, packing, fused stats) <= 2x the time of
       x.to(torch.float8_e5m2); FP6 decode to bf16 <= 2x the cast float8_e5m2 -> bf16;
       every kernel >= 10x faster than its pure-PyTorch reference.
  GPU: >= 80% of device-to-device copy bandwidth (bytes read + written per second).
The references are timed on --ref-numel elements (they need ~40 bytes/element of temporaries)
and compared per element; kernels and casts on --numel. Times are medians of --repeat runs.
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
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch.set_num_threads for kernels, casts and references alike (0: torch's "
                         "default). On a loaded shared CPU the multi-threaded references slow down "
                         "far more than the kernels (OpenMP barriers per small op), so --threads 1 "
                         "gives the load-robust speedups")
    args = ap.parse_args()
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
        # The CPU is shared: ratios move with the load (1/5/15-minute averages, before the run).
        "load_average_before": list(os.getloadavg()),
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
    enc, dec = res["seconds"]["fp6_encode_sr_stats"], res["seconds"]["fp6_decode_bf16"]
    res["ratios"] = {
        "encode_over_cast_to_fp8": enc / t_cast,
        "decode_over_cast_from_fp8": dec / t_back,
        "speedup_over_reference": speedup,
    }
    res["goals"] = {
        "encode_within_2x_cast": enc / t_cast <= 2.0,
        "decode_within_2x_cast": dec / t_back <= 2.0,
        "every_kernel_10x_reference": all(s >= 10 for s in speedup.values()),
    }
    if dev == "cuda":
        # bandwidth: bytes read + written per second, vs a device-to-device copy of x.
        copy_bw = 2 * x.element_size() * n / t_copy
        enc_bw = (x.element_size() * n + packed.numel()) / enc
        dec_bw = (packed.numel() + 2 * n) / dec
        res["bandwidth_GBps"] = {"copy": copy_bw / 1e9, "encode": enc_bw / 1e9, "decode": dec_bw / 1e9}
        res["goals"]["encode_80pct_copy_bw"] = enc_bw >= 0.8 * copy_bw
        res["goals"]["decode_80pct_copy_bw"] = dec_bw >= 0.8 * copy_bw
    print(f"cast bf16->fp8 {1e3 * t_cast:.1f} ms, fp8->bf16 {1e3 * t_back:.1f} ms; "
          f"encode/cast {enc / t_cast:.2f}, decode/cast {dec / t_back:.2f}")
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
