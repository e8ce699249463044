"""The examples (examples/: Hugging Face GPT-2 with DDP, pipelining and DeepSpeed; Megatron-Core
tensor parallelism), each on 2 gloo ranks for 3 steps: the identity codec trains bit for bit like
the uncompressed run, a lossy codec trains (finite losses that differ from the uncompressed
ones). DeepSpeed and Megatron-Core parts run when those packages are installed."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from examples import gpt2_ddp, gpt2_deepspeed, gpt2_pipelining  # noqa: E402
from gradwire.testing.launch import run_workers, values  # noqa: E402


def _optional(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def _worker(rank, world, with_deepspeed, with_megatron):
    out = {}
    runs = [("ddp", gpt2_ddp, "identity"), ("pipelining", gpt2_pipelining, "identity")]
    if with_deepspeed:  # the "gradwire" section calls the identity codec "none"
        runs.append(("deepspeed", gpt2_deepspeed, "none"))
    if with_megatron:
        from examples import megatron_tp_mlp

        runs.append(("megatron", megatron_tp_mlp, "identity"))
    for name, mod, ident in runs:
        out[name] = {k: mod.train(rank, world, cfg) for k, cfg in
                     (("plain", None), ("identity", {"name": ident}), ("fp8", {"name": "fp", "bits": 8}))}
    return out


def test_examples_identity_is_bit_identical():
    with_ds, with_mc = _optional("deepspeed"), _optional("megatron.core")
    vals = values(run_workers(_worker, 2, with_ds, with_mc, timeout_s=500))
    names = ["ddp", "pipelining"] + ["deepspeed"] * with_ds + ["megatron"] * with_mc
    for name in names:
        for v in vals:
            r = v[name]
            assert torch.equal(r["identity"]["params"], r["plain"]["params"]), name
            assert r["identity"]["losses"] == r["plain"]["losses"], name
        last = vals[1][name]  # holds the losses in every example
        assert len(last["plain"]["losses"]) == 3
        assert all(math.isfinite(x) for x in last["fp8"]["losses"])
        assert last["fp8"]["losses"][1:] != last["plain"]["losses"][1:], name
        first = vals[0][name]
        assert not torch.equal(first["fp8"]["params"], first["plain"]["params"]), name
