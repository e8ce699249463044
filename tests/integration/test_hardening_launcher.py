"""launch/train.py under careless configs and arguments (issue 16, findings 7, 8 and 10): every
config or argument error is one line on stderr and exit 2, before anything trains; DeepSpeed keys
that single-process mode cannot honour are refused; typos of top-level keys get "did you mean"."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "launch", "train.py")


def _base():
    with open(os.path.join(ROOT, "configs", "fp6.json"), encoding="utf-8") as f:
        return json.load(f)


def _main(args, capsys, tmp_path):
    sys.path.insert(0, os.path.dirname(TRAIN))
    import train

    rc = train.main([*args, "--report-dir", str(tmp_path / "r"), "--steps", "2", "--no-progress"])
    err = capsys.readouterr().err
    return rc, err


BAD = [
    ({"train_micro_batch_size_per_gpu": 0}, "train_micro_batch_size_per_gpu must be an integer >= 1, got 0"),
    ({"train_micro_batch_size_per_gpu": -4}, "train_micro_batch_size_per_gpu must be an integer >= 1, got -4"),
    ({"train_micro_batch_size_per_gpu": "eight"}, "got 'eight'"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be an integer >= 1, got 0"),
    ({"optimizer": {"type": "Adam", "params": {"lr": -1}}}, "lr must be a finite number >= 0, got -1"),
    ({"optimizer": {"type": "Adam", "params": {"lr": float("nan")}}}, "lr must be a finite number >= 0, got nan"),
    ({"optimizer": {"type": "Adam", "params": {"lrr": 1e-3}}}, "unexpected keyword argument 'lrr'"),
    ({"optimizer": {"type": "Lion", "params": {"lr": 1e-3}}}, "single-process mode knows Adam, AdamW, SGD"),
    ({"fp16": {"enabled": True}}, "fp16.enabled: single-process mode"),
    ({"bf16": {"enabled": True}}, "bf16.enabled: single-process mode"),
    ({"scheduler": {"type": "WarmupLR"}}, "scheduler: single-process mode"),
    ({"gradient_clippin": 1.0}, "unknown top-level key 'gradient_clippin'; did you mean 'gradient_clipping'"),
    ({"train_batch_size": 7}, "DeepSpeed rejects the config: Check batch related parameters"),
]


@pytest.mark.parametrize("mod,expect", BAD, ids=[str(m)[:40] for m, _ in BAD])
def test_bad_deepspeed_keys_exit_2_with_one_line(mod, expect, tmp_path, capsys):
    cfg = {**_base(), **mod}
    p = tmp_path / "c.json"
    p.write_text(json.dumps(cfg))
    rc, err = _main(["--config", str(p)], capsys, tmp_path)
    assert rc == 2, err
    assert expect in err and err.count("\n") == 1 and "configuration error" in err, err
    assert not (tmp_path / "r").exists()


def test_misspelt_gradwire_section_is_refused(tmp_path, capsys):
    cfg = _base()
    cfg["gradwyre"] = cfg.pop("gradwire")  # used to train uncompressed and exit 0
    p = tmp_path / "c.json"
    p.write_text(json.dumps(cfg))
    rc, err = _main(["--config", str(p)], capsys, tmp_path)
    assert rc == 2 and "unknown top-level key 'gradwyre'; did you mean 'gradwire'" in err, err


def test_unrelated_unknown_key_is_reported_not_fatal(tmp_path, capsys):
    cfg = {**_base(), "my_notes": "run 3"}
    p = tmp_path / "c.json"
    p.write_text(json.dumps(cfg))
    rc, err = _main(["--config", str(p), "--depth", "1", "--width", "16"], capsys, tmp_path)
    assert rc == 0 and "DeepSpeed ignores unknown top-level keys ['my_notes']" in err, err


def test_sgd_trains_in_process(tmp_path, capsys):
    cfg = {**_base(), "optimizer": {"type": "SGD", "params": {"lr": 0.01}}}
    p = tmp_path / "c.json"
    p.write_text(json.dumps(cfg))
    rc, err = _main(["--config", str(p), "--depth", "1", "--width", "16"], capsys, tmp_path)
    assert rc == 0, err
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert len(rep["loss"]) == 2 and all(torch.isfinite(torch.tensor(rep["loss"]))), rep["loss"]


FILES = [
    ("latin1", lambda p: p.write_bytes('{"a": "\u00e9"}'.encode("latin-1")), "not UTF-8 text"),
    ("deep", lambda p: p.write_text("[" * 100_000 + "]" * 100_000), "nested too deeply"),
    ("bigint", lambda p: p.write_text('{"train_micro_batch_size_per_gpu": ' + "9" * 5000 + "}"),
     "unreadable JSON value"),
    ("dir", lambda p: p.mkdir(), "is a directory"),
]


@pytest.mark.parametrize("name,make,expect", FILES, ids=[f[0] for f in FILES])
def test_unreadable_config_files(name, make, expect, tmp_path, capsys):
    p = tmp_path / name
    make(p)
    rc, err = _main(["--config", str(p)], capsys, tmp_path)
    assert rc == 2 and expect in err and err.count("\n") == 1, err


@pytest.mark.parametrize("args,expect", [
    (["--vocab", "64", "--order", "3"], "--vocab/--order: 262144 contexts"),
    (["--order", "0"], "--vocab/--order: need vocab >= 2, order >= 1"),
    (["--stages", "8"], "raise --depth or lower --stages"),
])
def test_bad_arguments_exit_2_with_one_line(args, expect, tmp_path, capsys):
    rc, err = _main(["--config", os.path.join(ROOT, "configs", "fp6.json"), *args], capsys, tmp_path)
    assert rc == 2 and expect in err and err.count("\n") == 1, err


def test_argparse_errors_are_one_line_exit_2():
    for args in (["--steps", "x"], ["--stages", "0"], []):
        p = subprocess.run([sys.executable, TRAIN, *args] + (["--config", "configs/fp6.json"] if args else []),
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and "argument error" in p.stderr, p.stderr


def test_meta_tensors_get_a_clear_error():
    from gradwire.codec import PacketError, build_codec

    for cfg in ({"name": "fp", "bits": 6}, {"name": "prune", "sparsity": 0.5}, {"name": "nm", "n": 1, "m": 2},
                {"name": "bf16"}, {"name": "identity"}, {"name": "fp8_e4m3"}):
        c = build_codec(cfg)
        with pytest.raises(ValueError, match="meta tensor"):
            c.encode(torch.empty(4, 8, device="meta"))
        with pytest.raises(PacketError, match="meta tensor"):
            c.decode(torch.empty(64, dtype=torch.uint8, device="meta"))
