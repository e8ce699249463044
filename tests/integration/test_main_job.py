"""The main job end to end on CPU: one process (in-process stages), two DeepSpeed pipeline
ranks (``deepspeed --num_gpus 2``, gloo), and ``mpirun -n 2``; plus the configuration errors
that must stop it before training. Small step counts: each launch costs ~30-90 s of start-up
on two shared cores, so each runs once and several checks read its report.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "launch", "train.py")
SMALL = ["--steps", "30", "--depth", "2", "--no-progress"]
MICRO, GAS, SEQ, WIDTH = 8, 2, 32, 64  # configs/*.json batch settings and train.py defaults


def _free_port():
    # a fresh rendezvous port per launch, so concurrent CI jobs do not collide on 29500
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(cmd, timeout=420):
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def _codec(name):
    from gradwire.config import load_config
    from gradwire.integrations.deepspeed import codec_from_spec

    _, gw = load_config(os.path.join(ROOT, "configs", name + ".json"))
    return codec_from_spec(gw.codec_for(0))


def _check_report(rep, config, steps=30):
    assert rep["steps"] == steps and len(rep["loss"]) == steps
    per_step = rep["wire"]["per_step"]
    assert sorted(map(int, per_step)) == list(range(steps))
    codec = _codec(config)
    raw = MICRO * SEQ * WIDTH * 4  # one fp32 boundary gradient per micro-batch
    for s, d in per_step.items():
        assert d["raw"] == GAS * raw, (s, d)
        assert d["sent"] == d["predicted"], (s, d)
        if codec.fixed_rate:
            # measured bytes == the codec's own packed size for this shape, every step
            assert d["sent"] == GAS * codec.packed_size((MICRO, SEQ, WIDTH), torch.float32), (s, d)
        else:
            assert d["sent"] <= GAS * (codec.max_packed_size((MICRO, SEQ, WIDTH), torch.float32) + 8)
    # The loss decreases: the first five steps' mean beats the last five's by a clear margin
    # (a deterministic, seeded run; starting loss is ln(16) = 2.77).
    first, last = sum(rep["loss"][:5]) / 5, sum(rep["loss"][-5:]) / 5
    assert last < first - 0.05, (first, last)
    for png in ("loss.png", "sigma.png", "formats.png", "bytes.png"):
        assert os.path.getsize(os.path.join(rep["_dir"], png)) > 1000


def _load(d):
    with open(os.path.join(d, "report.json"), encoding="utf-8") as f:
        rep = json.load(f)
    rep["_dir"] = str(d)
    return rep


def test_single_process_under_deepspeed_launcher(tmp_path):
    rc, out = _run(["deepspeed", "--master_port", str(_free_port()), TRAIN, "--config", "configs/fp6.json", "--report-dir", str(tmp_path), *SMALL])
    assert rc == 0, out[-3000:]
    rep = _load(tmp_path)
    assert rep["mode"] == "in-process" and rep["ranks"] == 1 and rep["stages"] == 2
    assert "compression ratio" in out and "final loss" in out
    _check_report(rep, "fp6")
    assert rep["wire"]["compression_ratio"] > 4.5  # 32-bit -> 6-bit payload plus a header


def test_two_pipeline_ranks_deepspeed_num_gpus_2(tmp_path):
    rc, out = _run(["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), TRAIN, "--config", "configs/fp6.json",
                    "--report-dir", str(tmp_path), *SMALL])
    assert rc == 0, out[-3000:]
    rep = _load(tmp_path)
    assert rep["mode"] == "deepspeed-pipeline" and rep["ranks"] == 2
    assert rep["codec_impl"] == ["gradwire.codec.fp.FPCodec"]
    _check_report(rep, "fp6")
    # what stage 1 sent is exactly what stage 0 received, and what the telemetry says
    assert sum(rep["bytes_sent_by_rank"]) == sum(rep["bytes_received_by_rank"]) == rep["wire"]["sent_bytes"]


def test_data_parallel_all_reduce_compressed_replicas_stay_identical(tmp_path):
    # 2 ranks, 1 stage: two data-parallel replicas whose gradient all-reduce goes through the
    # FP8 two-phase compressed all-reduce; every replica decodes the same packets.
    rc, out = _run(["torchrun", "--nproc_per_node", "2", "--master_port", str(_free_port()), TRAIN,
                    "--config", "configs/fp6-dp-fp8.json", "--stages", "1", "--report-dir", str(tmp_path), *SMALL])
    assert rc == 0, out[-3000:]
    rep = _load(tmp_path)
    dp = rep["data_parallel"]
    assert rep["ranks"] == 2 and rep["stages"] == 1 and dp["size"] == 2 and dp["codec"] == "fp8"
    # 8-bit payload for 32-bit gradients: 4x less than a plain all-reduce, minus headers
    assert 3.8 < dp["raw_bytes"] / dp["bytes_sent"] <= 4.0, dp
    (s0, c0), (s1, c1) = rep["param_checksum_by_rank"]
    assert s0 == s1 == 0 and c0 == c1  # bit-identical replicas (float64 sum of every weight)
    first, last = sum(rep["loss"][:5]) / 5, sum(rep["loss"][-5:]) / 5
    assert last < first - 0.05, (first, last)


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not on PATH")
def test_mpirun_two_ranks_variable_size_codec(tmp_path):
    # prune80 is variable-size: its packets travel length-first; both ends must agree.
    rc, out = _run(["mpirun", "-n", "2", "-env", "MASTER_PORT", str(_free_port()), sys.executable, TRAIN, "--config", "configs/prune80.json",
                    "--report-dir", str(tmp_path), *SMALL])
    assert rc == 0, out[-3000:]
    rep = _load(tmp_path)
    assert rep["mode"] == "deepspeed-pipeline" and rep["ranks"] == 2
    _check_report(rep, "prune80")
    assert sum(rep["bytes_sent_by_rank"]) == sum(rep["bytes_received_by_rank"]) == rep["wire"]["sent_bytes"]
    assert rep["wire"]["compression_ratio"] > 3


def _write(tmp_path, section):
    with open(os.path.join(ROOT, "configs", "fp6.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["gradwire"] = section
    p = tmp_path / "c.json"
    p.write_text(json.dumps(cfg))
    return str(p)


@pytest.mark.parametrize("section, extra, env, expect", [
    ({"codec": {"name": "fp", "bitz": 6}}, [], {}, "unknown key 'bitz'; did you mean 'bits'"),
    ({"codec": {"name": "fp", "bits": 12}}, [], {}, "gradwire.codec.bits must be in [3, 8], got 12"),
    ({"codec": {"name": "nm", "n": 1, "m": 8}}, [], {}, "method 'mvue' exists for 1:2 or 2:4 only"),
    ({"codec": {"name": "nm", "n": 1, "m": 8, "method": "greedy"}}, ["--width", "60", "--heads", "4"], {},
     "need --width divisible by 8"),
    ({"codec": {"name": "fp", "bits": 6}}, ["--stages", "3"], {"WORLD_SIZE": "2"},
     "3 pipeline stages x 1 tensor-parallel ranks = 3 does not divide the 2 ranks"),
    ({"codec": {"name": "fp", "bits": 6}, "boundaries": {"4": {"bits": 8}}}, [], {},
     "boundary 4 does not exist with 2 pipeline stages"),
])
def test_bad_configs_fail_before_training(tmp_path, section, extra, env, expect, capsys, monkeypatch):
    # train.main() in this process (the checks run before any process group or model exists);
    # one case below goes through the real command line for the exit status.
    sys.path.insert(0, os.path.dirname(TRAIN))
    import train

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    path = _write(tmp_path, section)
    rc = train.main(["--config", path, "--report-dir", str(tmp_path / "r"), "--steps", "5", *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert expect in err and "configuration error" in err, err
    assert not (tmp_path / "r").exists()  # nothing trained, nothing written


def test_bad_config_exit_status_from_the_command_line(tmp_path):
    path = _write(tmp_path, {"codec": {"name": "fp", "bits": 6}, "refresh_evry": 10})
    p = subprocess.run([sys.executable, TRAIN, "--config", path, "--steps", "5"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "unknown key 'refresh_evry'; did you mean 'refresh_every'" in p.stderr


def test_text_file_data_in_process(tmp_path, capsys):
    # --data FILE: character-level training on a text file, one process, tiny settings.
    sys.path.insert(0, os.path.dirname(TRAIN))
    import train

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    out = tmp_path / "r"
    rc = train.main(["--config", os.path.join(ROOT, "configs", "nm24.json"), "--data", str(text),
                     "--steps", "4", "--depth", "1", "--width", "16", "--heads", "2", "--seq-len", "16",
                     "--report-dir", str(out), "--no-progress"])
    assert rc == 0
    rep = _load(out)
    assert rep["data"] == "text:t.txt" and rep["entropy_floor"] is None
    assert rep["model"]["vocab"] == len(set(text.read_text()))
    assert rep["wire"]["per_boundary"]["0"]["format"] == "nm2:4-mvue"
    with pytest.raises(SystemExit):
        train.main(["--config", os.path.join(ROOT, "configs", "nm24.json"), "--steps", "0"])
    assert train.main(["--config", os.path.join(ROOT, "configs", "nm24.json"), "--data", str(tmp_path / "none.txt")]) == 2
    assert "is not a file" in capsys.readouterr().err


@pytest.mark.parametrize("config", sorted(os.path.basename(p)[:-5] for p in
                                          __import__("glob").glob(os.path.join(ROOT, "configs", "*.json"))))
def test_every_shipped_config_trains_in_process(tmp_path, config):
    # Two steps of a tiny model, 3 in-process stages (2 boundaries: overrides and heterogeneous
    # allocation have something to act on); the bytes counted must be what the codecs produce.
    sys.path.insert(0, os.path.dirname(TRAIN))
    import train

    rc = train.main(["--config", os.path.join(ROOT, "configs", config + ".json"), "--steps", "2",
                     "--depth", "1", "--width", "16", "--heads", "2", "--seq-len", "8", "--stages", "3",
                     "--report-dir", str(tmp_path), "--no-progress"])
    assert rc == 0
    rep = _load(tmp_path)
    assert set(rep["wire"]["per_boundary"]) == {"0", "1"}
    for d in rep["wire"]["per_step"].values():
        assert d["sent"] == d["predicted"] > 0
