"""CompressedPipelineStage under every schedule torch 2.13 ships (issue 15, items 4 and 6), on 2
gloo ranks in one launch.

Per schedule: the identity codec trains bit-identically to plain ``PipelineStage``s (losses and
parameters), which also shows the handshake fits the schedule's own protocol (V-shaped schedules
put adjacent stages on one rank: no handshake, no encoding there); a lossy fixed-rate codec
(bf16) delivers exactly what was sent (every received packet byte-identical to its sent packet,
every gradient the stage back-propagates exactly its decode), and the stage counted one packet
per cross-rank gradient; forward-only runs without any gradient traffic. A stage given a config
mapping and one built from ``pipeline()``'s result (``from_pipe``) work the same way; a codec
mismatch is reported on both ranks at the first step, naming both configs.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
    ScheduleZBVZeroBubble,
    _ScheduleForwardOnly,
)

from gradwire.codec.registry import build_codec
from gradwire.comm import ConfigMismatchError
from gradwire.integrations.pipelining import CompressedPipelineStage
from gradwire.testing.launch import run_workers, values

D, B, MB, LR, STEPS = 8, 16, 4, 0.05, 2
# name -> (schedule class, stages per rank, layout: "loop" (i % world) or "v" (r, 2w-1-r))
SCHEDULES = {
    "gpipe": (ScheduleGPipe, 1, "loop"),
    "1f1b": (Schedule1F1B, 1, "loop"),
    "interleaved_1f1b": (ScheduleInterleaved1F1B, 2, "loop"),
    "looped_bfs": (ScheduleLoopedBFS, 2, "loop"),
    "interleaved_zb": (ScheduleInterleavedZeroBubble, 2, "loop"),
    "zbv": (ScheduleZBVZeroBubble, 2, "v"),
    "dualpipev": (ScheduleDualPipeV, 2, "v"),
    "forward_only": (_ScheduleForwardOnly, 1, "loop"),
}


def _blocks(n):
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(n)]


def _data(step):
    g = torch.Generator().manual_seed(50 + step)
    return torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)


def _loss(out, tgt):
    return ((out - tgt) ** 2).sum()


def _my_stages(rank, world, per_rank, layout):
    n = world * per_rank
    if layout == "v":
        return n, [rank, n - 1 - rank]
    return n, [rank + k * world for k in range(per_rank)]


def _run(rank, world, name, codec):
    """Train STEPS steps; codec None: plain PipelineStages. Returns losses, params, stage traces."""
    cls, per_rank, layout = SCHEDULES[name]
    n, mine = _my_stages(rank, world, per_rank, layout)
    blocks = _blocks(n)
    dev = torch.device("cpu")
    stages = [PipelineStage(blocks[i], i, n, dev) if codec is None
              else CompressedPipelineStage(blocks[i], i, n, dev, codec=codec, base_seed=4, keep_trace=True)
              for i in mine]
    params = [p for i in mine for p in blocks[i].parameters()]
    forward_only = name == "forward_only"
    kw = {} if forward_only else {"loss_fn": _loss}
    sched = cls(stages[0] if per_rank == 1 else stages, n_microbatches=MB, **kw)
    opt = torch.optim.SGD(params, lr=LR)
    losses, outs = [], []
    for step in range(STEPS):
        x, y = _data(step)
        opt.zero_grad()
        args = (x,) if 0 in mine else ()
        kwargs = {"target": y, "losses": []} if (n - 1) in mine and not forward_only else {}
        with torch.no_grad() if forward_only else torch.enable_grad():
            out = sched.step(*args, **kwargs)
        if (n - 1) in mine:
            outs.append(out.detach().clone())
            if kwargs:
                losses.append([v.detach().clone() for v in kwargs["losses"]])
        opt.step()
    traces = {i: (s.trace, s.bytes_sent) for i, s in zip(mine, stages)} if codec is not None else {}
    return dict(losses=losses, outs=outs, params=torch.cat([p.detach().reshape(-1) for p in params]),
                traces=traces, mine=mine, n=n)


def _from_pipe(rank, world):
    """pipeline() -> from_pipe: same losses as hand-built stages of the same blocks."""
    from torch.distributed.pipelining import pipe_split, pipeline

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = _blocks(2)

        def forward(self, x):
            x = self.a(x)
            pipe_split()
            return self.b(x)

    x, y = _data(0)
    pipe = pipeline(Net(), mb_args=(x.chunk(MB)[0],))
    stage = CompressedPipelineStage.from_pipe(pipe, rank, torch.device("cpu"), codec={"name": "bf16"})
    sched = ScheduleGPipe(stage, n_microbatches=MB, loss_fn=_loss)
    losses = []
    if rank == 0:
        sched.step(x)
    else:
        sched.step(target=y, losses=losses)
    return [v.item() for v in losses]


def _mismatch(rank, world):
    codec = {"name": "bf16"} if rank == 0 else {"name": "fp8_e4m3"}
    stage = CompressedPipelineStage(_blocks(2)[rank], rank, 2, torch.device("cpu"), codec=codec)
    sched = ScheduleGPipe(stage, n_microbatches=MB, loss_fn=_loss)
    x, y = _data(0)
    try:
        sched.step(x) if rank == 0 else sched.step(target=y, losses=[])
    except ConfigMismatchError as e:
        return str(e)
    return None


def _conv_nm(rank, world, dim):
    """A conv feature-map boundary (mb, 6, 2, 2): N:M 2:4 over the flattened gradient works; N:M
    along the last dimension (2, not a multiple of 4) is refused on both ranks when the schedule
    builds the backward buffers, before any gradient is sent."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh()),
              nn.Sequential(nn.Flatten(), nn.Linear(24, 1))]
    codec = {"name": "nm", "n": 2, "m": 4, "dim": dim}
    stage = CompressedPipelineStage(blocks[rank], rank, 2, torch.device("cpu"), codec=codec, keep_trace=True)
    sched = Schedule1F1B(stage, n_microbatches=MB, loss_fn=lambda o, t: ((o - t) ** 2).sum())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(B, 3, 2, 2, generator=g), torch.randn(B, 1, generator=g)
    try:
        sched.step(x) if rank == 0 else sched.step(target=y, losses=[])
    except ValueError as e:
        return str(e)
    return stage.trace


def _worker(rank, world):
    res = {"conv_flat": _conv_nm(rank, world, None), "conv_lastdim": _conv_nm(rank, world, -1)}
    for name in SCHEDULES:
        res[name] = {"plain": _run(rank, world, name, None),
                     "identity": _run(rank, world, name, {"name": "identity"}),
                     "bf16": _run(rank, world, name, build_codec({"name": "bf16"}))}
    res["from_pipe"] = _from_pipe(rank, world)
    res["from_pipe_ref"] = _run(rank, world, "gpipe", {"name": "bf16"})["losses"][:1]
    res["mismatch"] = _mismatch(rank, world)
    return res


def _check_bf16_wire(vals, name):
    """Every cross-rank gradient packet arrives byte-identical; the stage uses exactly its decode."""
    codec = build_codec({"name": "bf16"})
    traces = {i: t for v in vals for i, t in v[name]["bf16"]["traces"].items()}
    n, world = vals[0][name]["bf16"]["n"], len(vals)
    owner = {i: r for r, v in enumerate(vals) for i in v[name]["bf16"]["mine"]}
    crossings = 0
    for s in range(1, n):
        sent = {(mb, k): pk for mb, k, pk in traces[s][0]["sent"]}
        recv = {(mb, k): pk for mb, k, pk in traces[s - 1][0]["recv"]}
        if owner[s] == owner[s - 1]:  # same rank (V layout): handed over in memory, not encoded
            assert not sent and not recv, (name, s)
            continue
        crossings += 1
        assert sent.keys() == recv.keys() and len(sent) == MB * STEPS, (name, s, len(sent))
        for k in sent:
            assert torch.equal(sent[k], recv[k]), (name, s, k)
        for mb, k, dec in traces[s - 1][0]["decoded"]:
            assert torch.equal(dec, codec.decode(recv[(mb, k)], dtype=dec.dtype))
        assert traces[s][1] == MB * STEPS * codec.packed_size((B // MB, D), torch.float32)
    # the V layout keeps one boundary (its bottom, stages world-1 and world) on one rank
    assert crossings == (n - 2 if SCHEDULES[name][2] == "v" else n - 1), (name, crossings)


def test_every_schedule():
    vals = values(run_workers(_worker, 2, timeout_s=500))
    for name in SCHEDULES:
        last = next(v[name] for v in vals if v[name]["plain"]["n"] - 1 in v[name]["plain"]["mine"])
        assert last["plain"]["outs"], name
        for v in vals:  # identity: bit-identical to uncompressed PipelineStages
            r = v[name]
            assert torch.equal(r["identity"]["params"], r["plain"]["params"]), name
        for a, b in zip(last["identity"]["outs"], last["plain"]["outs"]):
            assert torch.equal(a, b), name
        for a, b in zip(last["identity"]["losses"], last["plain"]["losses"]):
            assert all(torch.equal(p, q) for p, q in zip(a, b)), name
        if name == "forward_only":
            assert all(t[1] == 0 and not t[0]["sent"] for v in vals for t in v[name]["bf16"]["traces"].values())
            continue
        _check_bf16_wire(vals, name)
        # bf16 did change the gradients of the stages below the last boundary (non-vacuous)
        first = next(v[name] for v in vals if 0 in v[name]["plain"]["mine"])
        assert not torch.equal(first["bf16"]["params"], first["plain"]["params"]), name
    ref = [sum(t.item() for t in vals[1]["from_pipe_ref"][0])]
    assert len(vals[1]["from_pipe"]) == MB and abs(sum(vals[1]["from_pipe"]) - ref[0]) <= 1e-5 * abs(ref[0])
    codec = build_codec({"name": "nm", "n": 2, "m": 4, "dim": None})
    sent, recv = vals[1]["conv_flat"]["sent"], vals[0]["conv_flat"]["recv"]
    assert len(sent) == len(recv) == MB
    assert all(a[:2] == b[:2] and torch.equal(a[2], b[2]) for a, b in zip(sent, recv))
    for (_, _, pk), (_, _, dec) in zip(recv, vals[0]["conv_flat"]["decoded"]):
        assert dec.shape == (B // MB, 6, 2, 2) and torch.equal(dec, codec.decode(pk))
    for v in vals:
        assert "shape (4, 6, 2, 2)" in v["conv_lastdim"] and "divisible by 4" in v["conv_lastdim"]
    for m in (vals[0]["mismatch"], vals[1]["mismatch"]):
        assert m and "bf16" in m and "fp8_e4m3" in m
