"""CompressedPipelineStage on gloo: GPipe and 1F1B, 2 and 4 stages (one launch per world size).

Checks: every packet a stage receives is byte-identical to the one its neighbour sent, and the
gradient the stage back-propagates is exactly its decode; bytes sent equal the packed sizes; a
stage with another codec config fails at the first step naming both configs; the loss follows an
uncompressed single-process run within a derived tolerance.

Tolerance: codec = bf16 cast (relative error <= u = 2^-8 per element per boundary crossing).
A gradient crossing k boundaries carries relative error <= (1+u)^k - 1 <= 1.02 k u for k <= 3
(plus the propagation through the Jacobians, which only mixes already-perturbed values:
elementwise the perturbation of a product is bounded by the sum of |terms| times the same
factor). The parameter error after t SGD steps is then bounded as in test_integrations.py:
|L_c(t) - L_u(t)| <= 2 ||grad L_u(t)|| eta sum_{s<t} ||e_s||, with ||e_s|| <= 1.02 (p-1) u
||G_s||_abs, where ||G_s||_abs is the norm of the gradient computed with absolute values
(|W| and |activations|) - a majorant of every elementwise rounding effect; we measure
||grad||_2 of the reference and use a further factor 4 for the |W| majorant (the network has
tanh activations with |tanh'| <= 1 and weights of norm ~1).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

from gradwire.codec.registry import build_codec
from gradwire.comm import ConfigMismatchError
from gradwire.integrations.pipelining import CompressedPipelineStage
from gradwire.testing.codecs import ThresholdCodec
from gradwire.testing.launch import run_workers, values
from gradwire.testing.wire import count_wire_bytes

D, B, MB, ETA, STEPS = 16, 16, 4, 0.05, 4
U = 2.0**-8


def _blocks(world):
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(world)]


def _data(step):
    g = torch.Generator().manual_seed(50 + step)
    return torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)


def _loss(out, tgt):
    return ((out - tgt) ** 2).sum()


def _run(rank, world, sched_cls):
    codec = build_codec({"name": "bf16"})
    block = _blocks(world)[rank]
    stage = CompressedPipelineStage(block, rank, world, torch.device("cpu"), codec=codec,
                                    base_seed=3, keep_trace=True)
    sched = sched_cls(stage, n_microbatches=MB, loss_fn=_loss)
    opt = torch.optim.SGD(block.parameters(), lr=ETA)
    losses, wire_bytes = [], []
    for step in range(STEPS):
        x, y = _data(step)
        opt.zero_grad()
        with count_wire_bytes() as wire:
            if rank == 0:
                sched.step(x)
            elif rank == world - 1:
                ls = []
                sched.step(target=y, losses=ls)
                losses.append(sum(v.item() for v in ls))
            else:
                sched.step()
        wire_bytes.append(wire["bytes"])
        opt.step()
    return dict(losses=losses, trace=stage.trace, bytes_sent=stage.bytes_sent,
                raw=stage.raw_bytes_sent, wire=wire_bytes,
                packed=codec.packed_size((B // MB, D), torch.float32))


def _mismatch(rank, world):
    codec = build_codec({"name": "bf16"} if rank == 0 else {"name": "fp8_e4m3"})
    # the handshake runs with the schedule's warm-up, at the first step
    stage = CompressedPipelineStage(_blocks(world)[rank], rank, world, torch.device("cpu"), codec=codec)
    sched = ScheduleGPipe(stage, n_microbatches=MB, loss_fn=_loss)
    x, y = _data(0)
    try:
        sched.step(x) if rank == 0 else sched.step(target=y, losses=[])
    except ConfigMismatchError as e:
        return str(e)
    return None


def _worker(rank, world):
    res = {name: _run(rank, world, cls) for name, cls in (("gpipe", ScheduleGPipe), ("1f1b", Schedule1F1B))}
    res["mismatch"] = _mismatch(rank, world) if world == 2 else None
    try:
        CompressedPipelineStage(nn.Linear(2, 2), 0, 1, torch.device("cpu"), codec=ThresholdCodec())
    except TypeError as e:
        res["variable_rejected"] = str(e)
    return res


def _reference(world):
    """Uncompressed single-process training of the same blocks on the same data."""
    blocks = _blocks(world)
    model = nn.Sequential(*blocks)
    opt = torch.optim.SGD(model.parameters(), lr=ETA)
    losses, gnorms = [], []
    for step in range(STEPS):
        x, y = _data(step)
        opt.zero_grad()
        loss = sum(_loss(model(xm), ym) for xm, ym in zip(x.chunk(MB), y.chunk(MB)))
        (loss / MB).backward()  # the schedules scale gradients by 1/n_microbatches
        losses.append(loss.item())
        gnorms.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm().item())
        opt.step()
    return losses, gnorms


@pytest.mark.parametrize("world", [2, 4])
def test_compressed_pipeline_training(world):
    vals = values(run_workers(_worker, world, timeout_s=400))
    ref_losses, ref_gnorms = _reference(world)
    for name in ("gpipe", "1f1b"):
        r = [v[name] for v in vals]
        for s in range(1, world):  # boundary s-1 <- s
            sent = {(mb, n): pk for mb, n, pk in r[s]["trace"]["sent"]}
            recv = {(mb, n): pk for mb, n, pk in r[s - 1]["trace"]["recv"]}
            assert sent.keys() == recv.keys() and len(sent) == MB * STEPS
            for k in sent:
                assert torch.equal(sent[k], recv[k])  # byte-identical packets
            codec = build_codec({"name": "bf16"})
            for mb, n, dec in r[s - 1]["trace"]["decoded"]:
                assert torch.equal(dec, codec.decode(recv[(mb, n)], dtype=dec.dtype))
            # bytes: each stage > 0 sends MB packets per step, of the predicted packed size
            assert r[s]["bytes_sent"] == STEPS * MB * r[s]["packed"]
            assert r[s]["raw"] == STEPS * B * D * 4
        for s in range(world):
            # on the wire: our packets (stages > 0) + exact fp32 activations (stages < p-1)
            act = MB * (B // MB) * D * 4 if s < world - 1 else 0
            grad = MB * r[s]["packed"] if s > 0 else 0
            # (step 0 also carries torch's one-time shape-inference messages)
            w = r[s]["wire"]
            assert w[0] >= act + grad and all(v == act + grad for v in w[1:]), (name, s, w, act, grad)
        losses = r[-1]["losses"]
        for t in range(STEPS):
            err_bound = [4 * 1.02 * (world - 1) * U * g for g in ref_gnorms]
            tol = 2 * ref_gnorms[t] * MB * ETA * sum(err_bound[:t]) + 1e-4 * abs(ref_losses[t])
            # 1e-4 relative: float32 summation-order differences between the two runs
            assert abs(losses[t] - ref_losses[t]) <= tol, (name, t, losses[t], ref_losses[t], tol)
    if world == 2:
        for m in (vals[0]["mismatch"], vals[1]["mismatch"]):
            assert m and "bf16" in m and "fp8_e4m3" in m
    assert "fixed-rate" in vals[0]["variable_rejected"]


def test_send_seeds_differ_per_step_microbatch_boundary_and_gradient():
    """Every encoded gradient gets its own seed: two gradients of one send (a stage with several
    inputs) must not share rounding noise, nor steps, micro-batches or boundaries."""
    st = object.__new__(CompressedPipelineStage)  # only the seed schedule, no process group
    st.base_seed = 3
    keys = [(n, mb, s, i) for n in range(3) for mb in range(4) for s in range(1, 4) for i in range(3)]
    assert len({st._seed(*k) for k in keys}) == len(keys)
