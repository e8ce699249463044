"""The Hugging Face GPT-2 examples (examples/), each on 2 gloo ranks for a few steps: the identity
codec trains bit for bit like the uncompressed run, a lossy codec trains (finite losses that
differ from the uncompressed ones)."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from examples import gpt2_ddp, gpt2_deepspeed, gpt2_pipelining  # noqa: E402
from gradwire.testing.launch import run_workers, values  # noqa: E402


def _worker(rank, world, with_deepspeed):
    out = {}
    runs = [("ddp", gpt2_ddp, "identity"), ("pipelining", gpt2_pipelining, "identity")]
    if with_deepspeed:  # the "gradwire" section calls the identity codec "none"
        runs.append(("deepspeed", gpt2_deepspeed, "none"))
    for name, mod, ident in runs:
        out[name] = {k: mod.train(rank, world, cfg) for k, cfg in
                     (("plain", None), ("identity", {"name": ident}), ("fp8", {"name": "fp", "bits": 8}))}
    return out


def test_gpt2_examples_identity_is_bit_identical():
    try:
        import deepspeed  # noqa: F401
        with_deepspeed = True
    except ImportError:
        with_deepspeed = False
    vals = values(run_workers(_worker, 2, with_deepspeed, timeout_s=500))
    for name in ("ddp", "pipelining") + (("deepspeed",) if with_deepspeed else ()):
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
