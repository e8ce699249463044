"""Compressed two-phase all-reduce versus the plain all-reduce, on gloo ranks of this machine.

    python bench/comm_allreduce.py --mb 64 --ranks 4 --codecs fp8_e4m3,bf16

For each codec: bytes each rank hands to the backend (counted by wrapping the torch.distributed
calls), the ratio to the plain ring all-reduce's 2 (p-1)/p * N bytes (expected: r = packet bytes
/ raw bytes, i.e. the compressed all-reduce moves 2 (p-1)/p * r * N), and wall times: plain
all-reduce, compressed total, and its split into codec work (encode + decode-sum + re-encode +
decode) and exchange. Median of ``--repeats`` runs after one warm-up. Writes
bench/results/comm_allreduce.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from gradwire.codec.registry import build_codec  # noqa: E402
from gradwire.comm import check_group, compressed_all_reduce  # noqa: E402
from gradwire.testing.launch import run_workers, values  # noqa: E402
from gradwire.testing.wire import count_wire_bytes  # noqa: E402


def _bench(rank, world, n, codecs, repeats):
    torch.set_num_threads(1)  # ranks share the machine's cores
    g = torch.Generator().manual_seed(rank)
    x = (torch.randn(n, generator=g) * torch.exp(1.5 * torch.randn(n, generator=g))).to(torch.bfloat16)
    out = {}
    times = []
    for i in range(repeats + 1):
        y = x.clone()
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(y)
        times.append(time.perf_counter() - t0)
    plain_bytes = 2 * (world - 1) * (n // world) * 2  # ring all-reduce: 2 (p-1)/p * N * 2 bytes
    # gloo's all_reduce cannot be counted from Python: the ring model is the reference
    out["plain"] = dict(seconds=statistics.median(times[1:]), bytes_model=plain_bytes)
    for name in codecs:
        codec = build_codec({"name": name} if ":" not in name else
                            dict(zip(("name", "bits"), (name.split(":")[0], int(name.split(":")[1])))))
        check_group(codec)
        tot, cod, exch, wires = [], [], [], []
        for i in range(repeats + 1):
            tr = {}
            dist.barrier()
            t0 = time.perf_counter()
            with count_wire_bytes() as wire:
                compressed_all_reduce(x, codec, seed=i, trace=tr)
            tot.append(time.perf_counter() - t0)
            cod.append(tr["seconds_codec"])
            exch.append(tr["seconds_exchange"])
            wires.append(wire["bytes"])
        r = codec.packed_size((n // world,), torch.bfloat16) / (n // world * 2)
        out[name] = dict(seconds=statistics.median(tot[1:]), seconds_codec=statistics.median(cod[1:]),
                         seconds_exchange=statistics.median(exch[1:]), wire_bytes=wires[-1],
                         packet_ratio_r=r, predicted_bytes=2 * (world - 1) * r * (n // world) * 2)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=64.0, help="tensor size in MB of bf16")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--codecs", default="fp8_e4m3,bf16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "comm_allreduce"))
    a = ap.parse_args()
    n = int(a.mb * 2**20 / 2) // a.ranks * a.ranks
    res = values(run_workers(_bench, a.ranks, n, a.codecs.split(","), a.repeats,
                             pg_timeout_s=600, timeout_s=3000))
    rows = []
    for key in res[0]:
        secs = max(r[key]["seconds"] for r in res)  # the slowest rank bounds the collective
        if key == "plain":
            rows.append(dict(codec="plain all_reduce", seconds=secs, bytes_per_rank=res[0][key]["bytes_model"]))
            continue
        wire = [r[key]["wire_bytes"] for r in res]
        rows.append(dict(codec=key, seconds=secs,
                         seconds_codec=max(r[key]["seconds_codec"] for r in res),
                         seconds_exchange=max(r[key]["seconds_exchange"] for r in res),
                         bytes_per_rank=max(wire), bytes_per_rank_min=min(wire),
                         predicted=res[0][key]["predicted_bytes"], r=res[0][key]["packet_ratio_r"]))
    plain = rows[0]["bytes_per_rank"]
    for row in rows[1:]:
        row["ratio_to_plain"] = row["bytes_per_rank"] / plain
    meta = dict(mb=a.mb, ranks=a.ranks, elements=n, dtype="bfloat16", backend="gloo",
                torch=torch.__version__, cpu_count=os.cpu_count(), command=" ".join(sys.argv))
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = [f"# compressed all-reduce, {a.mb:g} MB bf16, {a.ranks} gloo ranks ({meta['cpu_count']} cores)", "",
             "| codec | r | bytes/rank (counted) | predicted 2(p-1)/p r N | / plain | total s | codec s | exchange s |",
             "|---|---|---|---|---|---|---|---|",
             f"| plain all_reduce | 1 | {plain} (model) | - | 1 | {rows[0]['seconds']:.3f} | - | - |"]
    for row in rows[1:]:
        lines.append(f"| {row['codec']} | {row['r']:.6f} | {row['bytes_per_rank']} | {row['predicted']:.0f} | "
                     f"{row['ratio_to_plain']:.6f} | {row['seconds']:.3f} | {row['seconds_codec']:.3f} | "
                     f"{row['seconds_exchange']:.3f} |")
    lines += ["", f"command: `{meta['command']}`"]
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
