"""The main job with tensor parallelism inside the pipeline stages (``launch/train.py --tp``).

Three launches (each costs most of its time in start-up on two shared cores):

* 4 ranks, 2 stages x TP 2, FP6 at the pipeline boundary and FP8 for the TP all-reduces: the
  loss falls, TP ranks of each stage end with bit-identical replicated parameters, and every TP
  byte counted is the codec's packed size of the two-phase all-reduce chunks.
* 2 ranks, 1 stage x TP 2, identity codec, against the same model unsplit (one process): the
  losses agree within a float tolerance (only the reduction order differs).

Plus one TP block against the unsplit block in two spawned gloo processes (forward and every
gradient), and the topology / shape errors that must stop the job before training.
"""
import json
import os
import sys

import pytest
import torch

from test_main_job import TRAIN, _free_port, _load, _run, _write

MICRO, GAS, SEQ, WIDTH = 8, 2, 32, 64  # configs/fp6.json batch settings and train.py defaults
STEPS, DEPTH = 30, 2


def _config(tmp_path, tp_codec, boundary_codec):
    return _write(tmp_path, {"seed": 0, "codec": boundary_codec,
                             "tensor_parallel": {"size": 2, "codec": tp_codec}})


def _allreduce_bytes_per_rank(codec, n, p, me):
    """Bytes rank ``me`` sends in one two-phase all-reduce of ``n`` elements (fixed-rate codec):
    phase 1 its packets of the other ranks' chunks, phase 2 its own reduced chunk to p - 1 ranks.
    n is a multiple of p here, so every chunk has n / p elements."""
    assert n % p == 0
    chunk = codec.packed_size((n // p,), torch.float32)
    return (p - 1) * chunk + (p - 1) * chunk


def _codec(spec):
    from gradwire.config import parse_codec
    from gradwire.integrations.deepspeed import codec_from_spec

    return codec_from_spec(parse_codec(spec))


def _check_tp(rep, codec, blocks_per_stage, stages, steps):
    tp = rep["tensor_parallel"]
    assert tp["size"] == 2 and len(tp["by_rank"]) == 2 * stages
    # one all-reduce per column-parallel layer (qkv, fc1) per block per micro-batch
    n_coll = steps * GAS * blocks_per_stage * 2
    per = _allreduce_bytes_per_rank(codec, MICRO * SEQ * WIDTH, 2, 0)
    for r in tp["by_rank"]:
        assert r["collectives"] == n_coll, r
        assert r["sent"] == n_coll * per, (r, per)
        # what a plain ring all-reduce of the fp32 gradient sends: 2 (p-1)/p * N * 4 bytes
        assert r["raw"] == n_coll * MICRO * SEQ * WIDTH * 4, r
    assert tp["bytes_sent"] == sum(r["sent"] for r in tp["by_rank"])
    # TP ranks are consecutive (rank = stage * 2 + tp_rank) and hold bit-identical replicated
    # parameters (SHA-256 over their bytes); the two stages hold different layers.
    for s in range(stages):
        pair = [r for r in tp["by_rank"] if r["stage"] == s]
        assert [r["rank"] for r in pair] == [2 * s, 2 * s + 1] and [r["tp_rank"] for r in pair] == [0, 1]
        assert pair[0]["replicated_sha256"] == pair[1]["replicated_sha256"], pair


def test_two_stages_by_tp2_fp8_all_reduce(tmp_path):
    cfg = _config(tmp_path, {"name": "fp", "bits": 8}, {"name": "fp", "bits": 6})
    out_dir = tmp_path / "rep"
    rc, out = _run(["torchrun", "--nproc_per_node", "4", "--master_port", str(_free_port()), TRAIN,
                    "--config", cfg, "--stages", "2", "--tp", "2", "--report-dir", str(out_dir),
                    "--steps", str(STEPS), "--depth", str(DEPTH), "--no-progress"])
    assert rc == 0, out[-3000:]
    rep = _load(out_dir)
    assert rep["ranks"] == 4 and rep["stages"] == 2 and rep["data_parallel"]["size"] == 1
    assert "tensor parallel: 2 ranks/stage, codec fp8" in out
    _check_tp(rep, _codec({"name": "fp", "bits": 8}), blocks_per_stage=1, stages=2, steps=STEPS)
    # FP8 payload for fp32 gradients: at most 4x, minus the per-packet headers
    assert 3.9 < rep["tensor_parallel"]["raw_bytes"] / rep["tensor_parallel"]["bytes_sent"] <= 4.0
    # Pipeline boundary: each TP rank of stage 1 sends the whole boundary gradient to its peer in
    # stage 0 (partitioned sends are off), so two FP6 packets per micro-batch, each its packed size.
    fp6 = _codec({"name": "fp", "bits": 6}).packed_size((MICRO, SEQ, WIDTH), torch.float32)
    assert rep["bytes_sent_by_rank"] == [0, 0, STEPS * GAS * fp6, STEPS * GAS * fp6]
    assert rep["bytes_received_by_rank"] == [STEPS * GAS * fp6, STEPS * GAS * fp6, 0, 0]
    assert rep["wire"]["sent_bytes"] == 2 * STEPS * GAS * fp6
    # The loss falls (seeded, deterministic run; it starts near ln 16 = 2.77): mean of the last
    # five steps below the first five by a clear margin (measured: 2.87 -> 2.70).
    first, last = sum(rep["loss"][:5]) / 5, sum(rep["loss"][-5:]) / 5
    assert last < first - 0.05, (first, last)


def test_tp2_identity_codec_matches_unsplit_model(tmp_path):
    none = {"name": "none"}
    cfg = _config(tmp_path, none, none)
    steps = 15  # enough to see updates compound; start-up dominates the launch time anyway
    common = ["--config", cfg, "--stages", "1", "--steps", str(steps), "--depth", str(DEPTH), "--no-progress"]
    rc, out = _run([sys.executable, TRAIN, *common, "--tp", "1", "--report-dir", str(tmp_path / "tp1")])
    assert rc == 0, out[-3000:]
    rc, out = _run(["torchrun", "--nproc_per_node", "2", "--master_port", str(_free_port()), TRAIN,
                    *common, "--report-dir", str(tmp_path / "tp2")])  # tp 2 from the config
    assert rc == 0, out[-3000:]
    ref, tp = _load(tmp_path / "tp1"), _load(tmp_path / "tp2")
    assert ref["mode"] == "in-process" and tp["ranks"] == 2 and tp["tensor_parallel"]["size"] == 2
    _check_tp(tp, _codec(none), blocks_per_stage=DEPTH, stages=1, steps=steps)
    a, b = torch.tensor(ref["loss"], dtype=torch.float64), torch.tensor(tp["loss"], dtype=torch.float64)
    # Same initial weights and data; TP changes only float32 summation order (the row-parallel
    # partial sums, the all-reduce of the input gradients). Step 0 is the forward of identical
    # weights: differences are rounding-level (|loss| ~ 3, float32 eps 1.2e-7, a few hundred
    # accumulations: < 1e-5). Later steps compound those differences through Adam (whose update
    # normalises tiny gradient differences); measured max |diff| is 2.3e-5 over steps 0-9 and
    # 2.0e-4 over 30 steps, so we allow about 10x that. A mis-sharded layer (wrong head order, a
    # missing all-reduce) changes the step-0 loss or the first updates by far more.
    diff = (a - b).abs()
    assert diff[0] < 1e-5, diff[0]
    assert diff[:10].max() < 2.5e-4, diff[:10]
    assert len(diff) == steps and diff.max() < 2e-3, diff


def _train_main():
    sys.path.insert(0, os.path.dirname(TRAIN))
    import train

    return train


FP6 = {"codec": {"name": "fp", "bits": 6}}


@pytest.mark.parametrize("section, extra, world, expect", [
    (FP6, ["--tp", "2"], "1", "tensor parallelism 2 needs stages x 2 ranks"),
    (FP6, ["--tp", "2", "--stages", "2"], "6",
     "2 pipeline stages x 2 tensor-parallel ranks = 4 does not divide the 6 ranks"),
    (FP6, ["--tp", "3", "--stages", "1"], "3", "--heads 4 is not divisible by tensor-parallel size 3"),
    (FP6, ["--tp", "0"], "2", "--tp must be >= 1"),
    # 1 stage x TP 2 x 2 replicas with an fp data-parallel codec: measured to let the TP ranks'
    # replicated weights drift apart (per-packet scales over buckets that mix shards), so refused
    ({**FP6, "data_parallel": {"name": "fp", "bits": 8}}, ["--tp", "2", "--stages", "1"], "4",
     "with --tp > 1 use 'bf16' or 'none' for data_parallel"),
])
def test_bad_tp_layouts_fail_before_training(tmp_path, section, extra, world, expect, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", world)
    cfg = _write(tmp_path, section)
    rc = _train_main().main(["--config", cfg, "--report-dir", str(tmp_path / "r"), "--steps", "5", *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert expect in err and "configuration error" in err, err
    assert not (tmp_path / "r").exists()


def test_bad_tp_section_fails_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = _write(tmp_path, {"tensor_parallel": {"size": 2, "codec": {"name": "fp", "bitz": 8}}})
    rc = _train_main().main(["--config", cfg, "--report-dir", str(tmp_path / "r"), "--steps", "5"])
    err = capsys.readouterr().err
    assert rc == 2 and "gradwire.tensor_parallel.codec" in err and "did you mean 'bits'" in err, err
    with open(cfg, encoding="utf-8") as f:
        assert json.load(f)["gradwire"]["tensor_parallel"]["size"] == 2


def _tp_block_worker(rank, world, init_file, out_dir):
    """One rank: a TPBlock against the unsplit Block built from the same seed, identity codec."""
    import torch.distributed as dist

    from gradwire.codec.registry import build_codec
    from gradwire.models.gpt import GPTConfig, gpt_layers
    from gradwire.models.tp_gpt import TPBlock, _qkv_rank_major

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = GPTConfig(vocab=16, seq_len=8, width=32, depth=1, heads=4)
        ref = gpt_layers(cfg, seed=3)[1]
        tpb = TPBlock(gpt_layers(cfg, seed=3)[1], lambda: build_codec("identity"), None,
                      base_seed=0, layer_id=0)
        h = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(5))
        h_ref, h_tp = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
        g = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(6))
        y_ref, y_tp = ref(h_ref), tpb(h_tp)
        y_ref.backward(g)
        y_tp.backward(g)
        # the sharded grads must be this rank's slices of the unsplit block's grads
        shard = lambda t, dim: t.chunk(world, dim=dim)[rank]  # noqa: E731
        pairs = {
            "out": (y_tp, y_ref), "grad_in": (h_tp.grad, h_ref.grad),
            "ln1.weight": (tpb.ln1.weight.grad, ref.ln1.weight.grad),
            "proj.bias": (tpb.proj.bias.grad, ref.proj.bias.grad),
            "qkv.weight": (tpb.qkv.weight.grad, shard(_qkv_rank_major(ref.qkv.weight.grad, 32, world), 0)),
            "proj.weight": (tpb.proj.weight.grad, shard(ref.proj.weight.grad, 1)),
            "fc1.weight": (tpb.fc1.weight.grad, shard(ref.fc1.weight.grad, 0)),
            "fc2.weight": (tpb.fc2.weight.grad, shard(ref.fc2.weight.grad, 1)),
        }
        # error relative to the largest reference value of each tensor
        err = {k: float((a - b).abs().max() / b.abs().max()) for k, (a, b) in pairs.items()}
        torch.save(err, os.path.join(out_dir, f"err{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_tp_block_matches_unsplit_block(tmp_path):
    # Forward output, input gradient and every parameter gradient of a TP-2 block equal the
    # unsplit block's up to float32 summation order: relative to each tensor's largest value the
    # differences are about one float32 eps (1.2e-7): measured <= 2.2e-7. We allow 2e-6 (~16 eps);
    # a wrong shard or a missing reduction is off by O(1) relative.
    import torch.multiprocessing as mp

    mp.spawn(_tp_block_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        err = torch.load(tmp_path / f"err{r}.pt")
        assert len(err) == 8 and all(v < 2e-6 for v in err.values()), (r, err)
