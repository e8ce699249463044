"""Step time of a GPT-3-class pipeline job over slow inter-node links, on paper (issue 13, item 5).

    python bench/project_step_time.py            # prints the tables of docs/projection.md

Every input is a named constant below, with where it comes from. Measured here: the codecs'
bits per element (bench/results/codec_bytes.md) and their GPU kernel times (H200,
bench/results/kernels_cuda_nvidia_h200.json). Taken from public datasheets or the GPT-3 paper:
the model shape and the GPU's peak rate. Assumed (stated, not measured): MFU, micro-batch count,
and that boundary transfers are not overlapped with compute (the pessimistic case, which is
where compression can help most; with full overlap a transfer costs nothing until it is longer
than the compute it hides behind).
"""
from __future__ import annotations

import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --- model: GPT-3 175B (Brown et al. 2020, Table 2.1)
LAYERS, HIDDEN, SEQ = 96, 12288, 2048
# --- parallelism: 8 pipeline stages (12 layers each) x 8-way tensor parallel inside a node (NVLink)
STAGES, TP = 8, 8
MICRO_BATCH = 1            # sequences per micro-batch
MICRO_BATCHES = 64         # per pipeline per optimizer step (1F1B)
# --- GPU: H100 SXM, dense bf16 peak 989 TFLOP/s (datasheet); MFU assumed
PEAK_FLOPS, MFU = 989e12, 0.45
# --- links: one inter-node link per node, shared by its 8 GPUs (Megatron's scatter/gather splits
# each boundary tensor over the TP ranks, so the node's whole boundary tensor crosses it)
LINKS_GBIT = (10, 25, 100, 400)  # 100 and 400: the question; 10 and 25: where links are slower
LINK_LATENCY_S = 10e-6
BF16_BYTES = 2


def measured_kernels() -> dict:
    """Seconds per element of the FP6 encode/decode and FP8-class decode on the H200 (bf16)."""
    with open(os.path.join(ROOT, "bench", "results", "kernels_cuda_nvidia_h200.json")) as f:
        r = json.load(f)
    n = r["numel"]
    k = r["kernels"]
    return {"fp6_encode": k["fp6_encode_sr"]["seconds"] / n, "fp6_decode": k["fp6_decode_bf16"]["seconds"] / n,
            "fp8_encode": k["fp8_encode_sr"]["seconds"] / n, "fp8_decode": k["fp8_decode_bf16"]["seconds"] / n}


def project() -> tuple[dict, list[dict]]:
    layers_per_stage = LAYERS // STAGES
    tokens = MICRO_BATCH * SEQ
    # forward FLOPs per stage and micro-batch: 2 x 12 h^2 per token per layer (matmuls) +
    # 4 s h per token per layer (attention scores and values); backward twice the forward
    fwd = layers_per_stage * tokens * (24 * HIDDEN ** 2 + 4 * SEQ * HIDDEN)
    compute_s = 3 * fwd / TP / (PEAK_FLOPS * MFU)  # per micro-batch, forward + backward, per GPU
    elems = tokens * HIDDEN  # one boundary tensor
    raw_bytes = elems * BF16_BYTES
    kern = measured_kernels()
    bits = {"none": 16.0, "fp6": 6.005, "fp8": 8.005}  # bits/element incl. headers (codec_bytes.md)
    codec_s = {"none": 0.0,  # encode on the sender + decode on the receiver, each TP rank its 1/TP share
               "fp6": (kern["fp6_encode"] + kern["fp6_decode"]) * elems / TP,
               "fp8": (kern["fp8_encode"] + kern["fp8_decode"]) * elems / TP}
    slots = MICRO_BATCHES + STAGES - 1  # 1F1B: the critical path holds m + p - 1 micro-batch slots
    rows = []
    for gbit in LINKS_GBIT:
        bps = gbit * 1e9 / 8
        for fwd_c, bwd_c in (("none", "none"), ("none", "fp6"), ("fp8", "fp6")):
            transfer = {c: raw_bytes * bits[c] / 16 / bps + LINK_LATENCY_S for c in (fwd_c, bwd_c)}
            per_slot = compute_s + transfer[fwd_c] + transfer[bwd_c] + codec_s[fwd_c] + codec_s[bwd_c]
            rows.append({"link_gbit": gbit, "forward": fwd_c, "backward": bwd_c,
                         "comm_ms": 1e3 * (transfer[fwd_c] + transfer[bwd_c]),
                         "codec_ms": 1e3 * (codec_s[fwd_c] + codec_s[bwd_c]),
                         "step_s": slots * per_slot})
    for r in rows:
        base = next(b for b in rows if b["link_gbit"] == r["link_gbit"] and b["forward"] == b["backward"] == "none")
        r["vs_uncompressed"] = r["step_s"] / base["step_s"]
    facts = {"compute_ms_per_microbatch": 1e3 * compute_s, "boundary_MB": raw_bytes / 1e6,
             "slots": slots, "bytes_per_flop": 2 * raw_bytes / (3 * fwd)}
    return facts, rows


def main() -> None:
    facts, rows = project()
    print(f"compute per micro-batch per stage: {facts['compute_ms_per_microbatch']:.1f} ms; boundary tensor "
          f"{facts['boundary_MB']:.1f} MB per direction; {facts['slots']} slots per step")
    print("| link (Gbit/s, per node) | forward | backward | comm ms/micro-batch | codec ms | step s | vs uncompressed |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['link_gbit']} | {r['forward']} | {r['backward']} | {r['comm_ms']:.2f} | {r['codec_ms']:.3f} "
              f"| {r['step_s']:.2f} | {r['vs_uncompressed']:.3f} |")


if __name__ == "__main__":
    main()
