"""GPU benchmark of the CUDA kernels: bandwidth beside a device-to-device copy, in one run.

    python bench/kernels.py --device cuda            # -> bench/results/kernels_cuda_<gpu>.json
    python bench/kernels_cuda.py [--numel N] [--repeat R] [--out FILE]

Goals (issue 14), as ratios measured side by side in one run:
  * every kernel on the encode and decode side of every codec moves >= 80% of the bytes per
    second (read + written) of a device-to-device copy of the bf16 input;
  * FP6 encode of bf16 (stochastic rounding, packing) takes less time than copying the bf16 input
    (it writes 0.75 instead of 2 bytes per element); torch's ``x.to(torch.float8_e4m3fn)`` is
    timed beside it.

How it times: CUDA events around ``--inner`` back-to-back calls (one call's launch latency is
hidden behind the previous call's work), median over ``--repeat`` rounds, each kernel
alternating with its copy baseline (``paired``) so both see the same clocks and thermal state.
The harness checks itself and records it under "harness": the event pair around an empty
region, the copy timed one call at a time and ``--inner`` at a time (they must agree), and for
every kernel the host time to enqueue one call against its GPU time (a kernel whose enqueue takes
about as long as its execution would be measured launch-bound: "launch_bound" flags it).

Codec level (``--codec-numel``): ``Codec.encode``/``decode`` of every registry codec, header and
CRC-32 included, timed wall-clock with a synchronisation (they read the payload back to the host
for the checksum), reported beside the kernels so the cost outside them is visible.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gradwire import _build, ops  # noqa: E402
from gradwire.numerics.fp import FPFormat  # noqa: E402

FORMATS = {"fp4": FPFormat(3, 0), "fp6": FPFormat(4, 1), "fp8": FPFormat(4, 3)}
CODEC_CONFIGS = {
    "identity": {"name": "identity"}, "bf16": {"name": "bf16"},
    "fp8_e4m3": {"name": "fp8_e4m3"}, "fp8_e5m2": {"name": "fp8_e5m2"},
    "fp4": {"name": "fp", "bits": 4}, "fp6": {"name": "fp", "bits": 6}, "fp8": {"name": "fp", "bits": 8},
    "prune80": {"name": "prune", "sparsity": 0.8},
    "nm24_fp8": {"name": "nm", "n": 2, "m": 4, "value_bits": 8}, "nm12": {"name": "nm", "n": 1, "m": 2},
}


def sources_digest() -> str:
    """sha256 over csrc/ (paths and contents, sorted)."""
    import hashlib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(os.path.join(root, "csrc"))):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def gpu_time(fn, inner: int) -> float:
    """Seconds per call: CUDA events around ``inner`` back-to-back calls."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / inner


def enqueue_time(fn, inner: int) -> float:
    """Host seconds to enqueue one call (the GPU idle at the start, so nothing blocks)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / inner


def paired(fn, base, inner: int, repeat: int) -> tuple[float, float, float]:
    """(median fn, median base, median per-round ratio fn/base), fn and base alternating."""
    fn(), base()
    torch.cuda.synchronize()
    tf, tb = [], []
    for _ in range(repeat):
        tf.append(gpu_time(fn, inner))
        tb.append(gpu_time(base, inner))
    return statistics.median(tf), statistics.median(tb), statistics.median(a / b for a, b in zip(tf, tb))


def kernel_table(x: torch.Tensor) -> dict:
    """name -> (call, bytes read + written), all on the bf16 input ``x`` (fp32 rows say so)."""
    n = x.numel()
    x32 = x.float()
    kern = {
        "copy_bf16": (lambda: x.clone(), 4 * n),
        "cast_bf16_to_fp8e4m3fn": (lambda: x.to(torch.float8_e4m3fn), 3 * n),
        "cast_bf16_to_fp8e5m2": (lambda: x.to(torch.float8_e5m2), 3 * n),
    }
    f8 = x.to(torch.float8_e4m3fn)
    kern["cast_fp8e4m3fn_to_bf16"] = (lambda: f8.to(torch.bfloat16), 3 * n)
    for name, fmt in FORMATS.items():
        pb = (n * fmt.bits + 7) // 8
        packed, _ = ops.fp_encode(x, fmt, "stochastic", scale_exp=4, seed=1)
        kern[f"{name}_encode_sr"] = (
            lambda fmt=fmt: ops.fp_encode(x, fmt, "stochastic", scale_exp=4, seed=1, with_stats=False), 2 * n + pb)
        kern[f"{name}_encode_sr_stats"] = (
            lambda fmt=fmt: ops.fp_encode(x, fmt, "stochastic", scale_exp=4, seed=1), 2 * n + pb)
        kern[f"{name}_decode_bf16"] = (
            lambda fmt=fmt, packed=packed: ops.fp_decode(packed, n, fmt, scale_exp=4, dtype=torch.bfloat16),
            pb + 2 * n)
    fp6 = FORMATS["fp6"]
    pb6 = (n * 6 + 7) // 8
    packed6, _ = ops.fp_encode(x, fp6, "stochastic", scale_exp=4, seed=1)
    kern["fp6_encode_nearest"] = (lambda: ops.fp_encode(x, fp6, "nearest", scale_exp=4, with_stats=False), 2 * n + pb6)
    kern["fp6_encode_sr_fp32"] = (
        lambda: ops.fp_encode(x32, fp6, "stochastic", scale_exp=4, seed=1, with_stats=False), 4 * n + pb6)
    kern["fp6_decode_fp32"] = (lambda: ops.fp_decode(packed6, n, fp6, scale_exp=4, dtype=torch.float32), pb6 + 4 * n)
    codes = torch.randint(0, 64, (n,), dtype=torch.uint8, device=x.device)
    kern["pack_bits_6"] = (lambda: ops.pack_bits(codes, 6), n + pb6)
    kern["unpack_bits_6"] = (lambda: ops.unpack_bits(packed6, 6, n), pb6 + n)
    kern["moment_stats"] = (lambda: ops.moment_stats(x), 2 * n)
    kern["stochastic_prune"] = (lambda: ops.stochastic_prune(x, 0.01, seed=1), 4 * n)
    # values float32 [nb, N] + indices uint8 [nb, N]: 2.5 bytes per input element for 1:2 and 2:4
    for scheme in ("mvue_12", "mvue_24_exact", "mvue_24_approx"):
        kern[f"nm_{scheme}"] = (lambda s=scheme: ops.nm_select(x, s, seed=1), 2 * n + (n * 5) // 2)
    return kern


def codec_level(numel: int, repeat: int, copy_bps: float) -> dict:
    """Encode/decode wall time of every codec (header and CRC-32 included) on bf16 gradients."""
    from gradwire.codec import build_codec

    g = torch.Generator(device="cuda").manual_seed(1)
    x = (torch.randn(numel, device="cuda", generator=g)
         * torch.exp2(3 * torch.randn(numel, device="cuda", generator=g))).to(torch.bfloat16)
    out = {}
    for name, cfg in CODEC_CONFIGS.items():
        c = build_codec(cfg)
        packet = c.encode(x, seed=1)

        def wall(fn):
            fn()
            torch.cuda.synchronize()
            ts = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
            return statistics.median(ts)

        te = wall(lambda: c.encode(x, seed=1))
        td = wall(lambda: c.decode(packet))
        moved_e = 2 * numel + packet.numel()
        out[name] = {"encode_s": te, "decode_s": td, "packet_bytes": packet.numel(),
                     "bits_per_element": 8 * packet.numel() / numel,
                     "encode_fraction_of_copy_bw": moved_e / te / copy_bps,
                     "decode_fraction_of_copy_bw": moved_e / td / copy_bps}
        print(f"codec {name:<10} encode {1e3 * te:8.2f} ms  decode {1e3 * td:8.2f} ms  "
              f"({out[name]['encode_fraction_of_copy_bw']:.2f} / {out[name]['decode_fraction_of_copy_bw']:.2f} of copy bw)",
              flush=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=256 * 2**20, help="bf16 elements (default 256M = 512 MB: "
                    "each kernel runs far longer than a launch, and the data is ~8x the L2)")
    ap.add_argument("--codec-numel", type=int, default=32 * 2**20)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--inner", type=int, default=10, help="back-to-back calls per timed region")
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # kernels.py passes it through
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernels_cuda.py: no CUDA device")
    _build.load_native()
    impls = {op: ops.implementation(op, "cuda") for op in ops.SCHEMAS}
    if any(v != "native" for v in impls.values()):
        raise SystemExit(f"CUDA kernels not loaded ({_build.STATUS['cuda'][1]}): {impls}")
    g = torch.Generator(device="cuda").manual_seed(0)
    n = args.numel
    x = (torch.randn(n, device="cuda", generator=g) * torch.exp2(3 * torch.randn(n, device="cuda", generator=g))).to(torch.bfloat16)
    kern = kernel_table(x)
    copy = kern["copy_bf16"][0]
    props = torch.cuda.get_device_properties(0)
    res: dict = {
        "device": "cuda", "device_name": torch.cuda.get_device_name(), "sm_count": props.multi_processor_count,
        "capability": f"{props.major}.{props.minor}", "torch": torch.__version__,
        "cuda": torch.version.cuda, "numel": n, "dtype": "bfloat16", "implementations": impls,
        "command": "python " + " ".join(sys.argv), "inner": args.inner, "repeat": args.repeat,
    }
    try:
        from bench.kernels import _git_commit
        res["git_commit"] = _git_commit()
    except Exception:  # the JSON is still useful without it
        res["git_commit"] = None
    # A copy of the checkout (a remote GPU machine) may carry a stale .git: the digest of the
    # kernel sources says which code ran whatever git says.
    res["csrc_sha256"] = sources_digest()

    # Harness self-check: what the timer adds, and whether single calls agree with batched ones.
    empty = statistics.median(gpu_time(lambda: None, 1) for _ in range(args.repeat))
    copy_1 = statistics.median(gpu_time(copy, 1) for _ in range(args.repeat))
    copy_k = statistics.median(gpu_time(copy, args.inner) for _ in range(args.repeat))
    res["harness"] = {"empty_event_pair_s": empty, "copy_one_call_s": copy_1,
                      f"copy_{args.inner}_calls_per_call_s": copy_k,
                      "one_call_over_batched": copy_1 / copy_k}

    rows, goals = {}, {}
    for name, (fn, nbytes) in kern.items():
        t, tc, ratio = paired(fn, copy, args.inner, args.repeat)
        host = enqueue_time(fn, args.inner)
        bw, copy_bw = nbytes / t, 4 * n / tc
        rows[name] = {"seconds": t, "copy_seconds_beside": tc, "time_over_copy": ratio, "bytes_moved": nbytes,
                      "GBps": bw / 1e9, "copy_GBps_beside": copy_bw / 1e9, "fraction_of_copy_bw": bw / copy_bw,
                      "host_enqueue_s": host, "launch_bound": host >= 0.5 * t}
        print(f"{name:<26} {1e6 * t:9.1f} us  {bw / 1e9:8.1f} GB/s  {bw / copy_bw:5.2f} of copy  "
              f"time/copy {ratio:5.2f}  host {1e6 * host:6.1f} us", flush=True)
        if name.startswith(("fp", "stochastic_prune", "nm_", "pack_", "unpack_", "moment_")):
            goals[f"{name}_80pct_copy_bw"] = bw / copy_bw >= 0.8
    res["kernels"] = rows
    enc, copy_t, r = paired(kern["fp6_encode_sr"][0], copy, args.inner, args.repeat)
    encs, copy_ts, rs = paired(kern["fp6_encode_sr_stats"][0], copy, args.inner, args.repeat)
    cast, _, rcast = paired(kern["fp6_encode_sr"][0], kern["cast_bf16_to_fp8e4m3fn"][0], args.inner, args.repeat)
    res["fp6_encode_vs_copy"] = {"encode_s": enc, "copy_s": copy_t, "encode_over_copy": r,
                                 "encode_with_stats_s": encs, "copy_beside_stats_s": copy_ts,
                                 "encode_with_stats_over_copy": rs,
                                 "encode_over_cast_to_fp8e4m3fn": rcast}
    goals["fp6_encode_faster_than_copy"] = r < 1.0
    goals["fp6_encode_with_stats_faster_than_copy"] = rs < 1.0
    res["goals"] = goals
    res["codec_level"] = codec_level(args.codec_numel, max(3, args.repeat // 3), 4 * n / copy_t)
    print(f"fp6 encode / copy = {r:.3f} (with stats {rs:.3f}); fp6 encode / x.to(float8_e4m3fn) = {rcast:.3f}")
    print(json.dumps(goals))
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   "kernels_cuda_" + res["device_name"].replace(" ", "_").lower() + ".json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    print("wrote", out)


if __name__ == "__main__":
    main()
