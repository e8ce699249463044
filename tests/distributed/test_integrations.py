"""DDP hook and tensor-parallel layers train a small model on gloo (2 and 4 ranks, one launch
per world size): the gradients each rank uses are exactly the decode of the packets it
received, replicated results are bit-identical across ranks, bytes on the wire equal the packed
sizes, and the loss follows the uncompressed run within a derived tolerance.

Loss tolerance (both integrations). The codec is the bf16 cast: each rounding has relative
error <= u = 2^-8 (8 significant bits), so an all-reduced gradient has elementwise error
|e| <= u (sum_r |g_r| + |g|) (1.01 covers second-order terms), checked at every step. With SGD at
rate eta, after t steps ||theta_c - theta_u|| <= eta * sum_s ||e_s|| * (1 + eta*lam)^t, and to
first order |L_c - L_u| <= ||grad L|| * ||theta_c - theta_u||. With eta*lam*t <= ln 2 (small
model, eta = 0.02, t <= 6; lam = the curvature, O(1) here) the growth factor is <= 2, so we assert
|L_c(t) - L_u(t)| <= 2 * ||grad L_u(t)|| * eta * sum_{s<t} ||e_s|| + 1e-6 (float32 noise of
the two runs' loss evaluations) with ||e_s|| measured against the exact gradient.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.distributed as dist
from torch import nn

from gradwire.codec.registry import build_codec
from gradwire.comm import check_group
from gradwire.integrations.ddp import GradwireDDPState, gradwire_allreduce_hook
from gradwire.integrations.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from gradwire.testing.launch import run_workers, values
from gradwire.testing.wire import count_wire_bytes

U = 2.0**-8
ETA, STEPS = 0.02, 6


def _init(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) / shape[-1] ** 0.5


# ---------------------------------------------------------------- DDP
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8), nn.Tanh(), nn.Linear(8, 1))


def _ddp_run(rank, world, hook: bool, min_numel: int = 0):
    model = _mlp()
    ref = copy.deepcopy(model)  # plain replica: exact local gradients at the same parameters
    state = GradwireDDPState({"name": "bf16"}, base_seed=5, keep_trace=True, min_numel=min_numel)
    # Two buckets (305 and 512 elements) in the first iteration; DDP's rebuild after it merges
    # them (its first rebuilt bucket may hold 1 MiB), so later steps have one bucket of 817.
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb_list=[0.0012] * 4)
    if hook:
        ddp.register_comm_hook(state, gradwire_allreduce_hook)
        check_group(state.codec)  # one-time config handshake, kept out of the byte counts
    opt = torch.optim.SGD(ddp.parameters(), lr=ETA)
    g = torch.Generator().manual_seed(100 + rank)
    losses, gnorms, errs, checks, kinds = [], [], [], [], []
    params = list(model.parameters())
    index = {id(p): i for i, p in enumerate(params)}  # model param -> same position in ref
    for step in range(STEPS):
        x, y = torch.randn(32, 16, generator=g), torch.randn(32, 1, generator=g)
        ref.load_state_dict(model.state_dict())
        lref = nn.functional.mse_loss(ref(x), y)
        lref.backward()
        ref_grads = [p.grad.clone() for p in ref.parameters()]
        local = torch.cat([g.reshape(-1) for g in ref_grads])
        allg = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(allg, local)
        exact = torch.stack(allg).double().mean(0)
        mag = torch.stack(allg).double().abs().mean(0)
        ref.zero_grad()
        opt.zero_grad()
        with count_wire_bytes() as wire:
            loss = nn.functional.mse_loss(ddp(x), y)
            loss.backward()
        lsum = loss.detach().clone()
        dist.all_reduce(lsum)
        losses.append(lsum.item() / world)
        used = torch.cat([p.grad.reshape(-1) for p in params]).double()
        gnorms.append(exact.norm().item())
        errs.append((used - exact).norm().item())
        if hook:
            # the hook averaged the decode of the gathered packets; those are the grads used
            by_id = {id(p): p for p in params}
            traced = 0
            kinds.append(sorted((b, "plain" if tr.get("plain") else "packed", len(tr["param_ids"]))
                                for b, tr in state.trace.items()))
            for b, tr in state.trace.items():
                if tr.get("plain"):  # min_numel: the plain all-reduce of the same bucket, exactly
                    want = torch.cat([ref_grads[index[i]].reshape(-1) for i in tr["param_ids"]])
                    dist.all_reduce(want)
                    got = torch.cat([by_id[i].grad.reshape(-1) for i in tr["param_ids"]])
                    checks.append(("plain", torch.equal(got, want / world)))
                    continue
                dec = torch.cat([state.codec.decode(pk, dtype=torch.float32).reshape(-1)
                                 for pk in tr["phase2_recv"] if pk.numel()]) / world
                grads = torch.cat([by_id[i].grad.reshape(-1) for i in tr["param_ids"]])
                checks.append(("decode", torch.equal(dec, grads)))
                traced += tr["bytes_sent"]
            checks.append(("wire", wire["bytes"], traced))
            # elementwise bound of the compressed mean gradient vs the exact mean (module doc)
            checks.append(("bound", bool(((used - exact).abs() <= U * (mag + exact.abs()) * 1.01 + 1e-12).all())))
        opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    state.trace = {}
    return dict(losses=losses, gnorms=gnorms, errs=errs, checks=checks, params=flat, kinds=kinds,
                pickled=pickle.dumps(state) if hook else None, counters=dict(state.counters),
                iteration=state.iteration)


# ---------------------------------------------------------------- tensor parallel
H, F, S = 16, 32, 8


class _TPNet(nn.Module):
    """Linear (replicated) -> ColumnParallel -> gelu -> RowParallel: the replicated first layer
    trains on the compressed input gradient of the column layer."""

    def __init__(self, codec, sp: bool, tp: bool):
        super().__init__()
        self.pre = nn.Linear(H, H)
        with torch.no_grad():
            self.pre.weight.copy_(_init(1, H, H))
            self.pre.bias.zero_()
        w1, b1, w2, b2 = _init(2, F, H), _init(3, F), _init(4, H, F), _init(5, H)
        if tp:
            self.col = ColumnParallelLinear(w1, b1, codec, sequence_parallel=sp, layer_id=0, keep_trace=True)
            self.row = RowParallelLinear(w2, b2, codec, sequence_parallel=sp, layer_id=1, keep_trace=True)
        else:
            self.col, self.row = nn.Linear(H, F), nn.Linear(F, H)
            with torch.no_grad():
                for m, w, b in ((self.col, w1, b1), (self.row, w2, b2)):
                    m.weight.copy_(w)
                    m.bias.copy_(b)

    def forward(self, x):
        self.h = self.pre(x)
        self.h.retain_grad()
        return self.row(nn.functional.gelu(self.col(self.h)))


def _tp_run(rank, world, sp: bool):
    codec = build_codec({"name": "bf16"})
    net, ref = _TPNet(codec, sp, True), _TPNet(codec, sp, False)
    opt = torch.optim.SGD(net.parameters(), lr=ETA)
    check_group(codec)  # one-time config handshake, kept out of the byte counts
    opt_ref = torch.optim.SGD(ref.parameters(), lr=ETA)
    g = torch.Generator().manual_seed(7)  # the same data on every rank (replicated input)
    out = dict(losses=[], ref_losses=[], ref_gnorms=[], errs=[], checks=[], h_grads=[], pre=[])
    for step in range(STEPS):
        x, y = torch.randn(S, H, generator=g), torch.randn(S, H, generator=g)
        xs, ys = (x.chunk(world)[rank], y.chunk(world)[rank]) if sp else (x, y)
        with count_wire_bytes() as wire:
            loss = ((net(xs) - ys) ** 2).sum() / (S * H)
            loss.backward()
        lsum = loss.detach().clone()
        if sp:
            dist.all_reduce(lsum)
        out["losses"].append(lsum.item())
        # exact gradient of h at the compressed run's parameters, from a full copy
        exact_net = _TPNet(codec, sp, False)
        with torch.no_grad():
            exact_net.pre.load_state_dict(net.pre.state_dict())
            for full, shard, dim in ((exact_net.col, net.col, 0), (exact_net.row, net.row, 1)):
                parts = [torch.empty_like(shard.weight) for _ in range(world)]
                dist.all_gather(parts, shard.weight.detach().contiguous())
                full.weight.copy_(torch.cat(parts, dim=dim))
            parts = [torch.empty_like(net.col.bias) for _ in range(world)]
            dist.all_gather(parts, net.col.bias.detach().contiguous())
            exact_net.col.bias.copy_(torch.cat(parts))
            exact_net.row.bias.copy_(net.row.bias)
        le = ((exact_net(x) - y) ** 2).sum() / (S * H)
        le.backward()
        hg = net.h.grad
        eg = exact_net.h.grad.chunk(world)[rank] if sp else exact_net.h.grad
        tr = net.col.comm.trace
        c = out["checks"]
        if sp:
            acc = torch.zeros_like(hg)
            for pk in tr["recv"]:
                acc += codec.decode(pk, dtype=torch.float32)
            c.append(torch.equal(hg, acc))  # reduce-scatter: rank-ordered fp32 sum of decodes
            rtr = net.row.comm.trace  # row backward: compressed all-gather of the output grad
            c.append(len(rtr["recv"]) == world)
        else:
            dec = torch.cat([codec.decode(pk, dtype=torch.float32).reshape(-1) for pk in tr["phase2_recv"]
                             if pk.numel()]).reshape(hg.shape)
            c.append(torch.equal(hg, dec))
        traced = tr["bytes_sent"] + (net.row.comm.trace["bytes_sent"] if sp else 0)
        c.append(wire["bytes"] == traced)
        out["errs"].append((hg.double() - eg.double()).norm().item())
        out["h_grads"].append(hg.clone())
        # uncompressed reference trajectory
        ref_loss = ((ref(x) - y) ** 2).sum() / (S * H)
        opt_ref.zero_grad()
        ref_loss.backward()
        out["ref_losses"].append(ref_loss.item())
        out["ref_gnorms"].append(torch.cat([p.grad.reshape(-1) for p in ref.parameters()]).norm().item())
        opt_ref.step()
        if sp:  # replicated parameters see a slice of the sequence: sum their weight gradients
            # (exactly, as Megatron does for sequence-parallel replicated parameters)
            for prm in list(net.pre.parameters()) + [net.row.bias]:
                dist.all_reduce(prm.grad)
        opt.step()
        opt.zero_grad()
        out["pre"].append(torch.cat([p.detach().reshape(-1) for p in net.pre.parameters()]))
    out["bytes"] = (net.col.comm.bytes_sent, net.col.comm.raw_bytes)
    return out


def _dtensor_run(rank, world):
    """CompressedColwiseParallel via parallelize_module: the input gradient is exactly the
    decode of the gathered packets (no second, uncompressed DTensor all-reduce), identical on
    all ranks, and within the bf16 bound of the exact gradient."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from gradwire.integrations.tensor_parallel import CompressedColwiseParallel

    codec = build_codec({"name": "bf16"})
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    m, ref = nn.Linear(8, 4 * world), nn.Linear(8, 4 * world)
    ref.load_state_dict(m.state_dict())
    style = CompressedColwiseParallel(codec, keep_trace=True)
    parallelize_module(m, mesh, style)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    (m(x) ** 2).sum().backward()
    yr = ref(x.detach())
    exact = (2 * yr) @ ref.weight  # d/dx sum(y^2)
    partials = [(2 * yr[:, 4 * r:4 * r + 4]) @ ref.weight[4 * r:4 * r + 4] for r in range(world)]
    mag = sum(q.abs() for q in partials)
    dec = torch.cat([codec.decode(pk, dtype=torch.float32).reshape(-1)
                     for pk in style.comm.trace["phase2_recv"] if pk.numel()]).reshape(x.shape)
    return dict(equal_decode=torch.equal(x.grad, dec), grad=x.grad,
                within=bool(((x.grad - exact).abs() <= U * (mag + exact.abs()) * 1.01 + 1e-6).all()))


def _worker(rank, world):
    res = {"dtensor": _dtensor_run(rank, world), "ddp": _ddp_run(rank, world, True), "ddp_plain": _ddp_run(rank, world, False),
           "ddp_min400": _ddp_run(rank, world, True, 400), "ddp_min_all": _ddp_run(rank, world, True, 10**6),
           "tp": _tp_run(rank, world, False), "tp_sp": _tp_run(rank, world, True)}
    # bad arguments to the hook state
    errs = []
    for kw in ({"codec": 3}, {"codec": {"name": "bf16"}, "min_numel": -1}, {"codec": {"name": "nope"}}):
        try:
            GradwireDDPState(**kw)
        except (TypeError, ValueError) as e:
            errs.append(str(e))
    res["state_errors"] = errs
    return res


def _loss_tolerance(gnorms, errs, t):
    return 2 * gnorms[t] * ETA * sum(errs[:t]) + 1e-6


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_and_tensor_parallel_training(world):
    vals = values(run_workers(_worker, world, timeout_s=400))
    # --- DDP
    d = [v["ddp"] for v in vals]
    for v in d:
        bad = [c for c in v["checks"] if not (c[1] == c[2] if c[0] == "wire" else c[1])]
        assert v["checks"] and not bad, bad
        assert torch.equal(v["params"], d[0]["params"])  # replicas bit-identical
        assert v["losses"] == d[0]["losses"]
    plain = vals[0]["ddp_plain"]
    for t in range(STEPS):
        assert abs(d[0]["losses"][t] - plain["losses"][t]) <= _loss_tolerance(plain["gnorms"], d[0]["errs"], t)
    assert d[0]["counters"]["sent_bytes"] > 0 and d[0]["counters"]["compressed_buckets"] == STEPS + 1
    # several buckets in the first step (each its own seed and packets), one after DDP's rebuild
    assert d[0]["kinds"][0] == [(0, "packed", 5), (1, "packed", 1)], d[0]["kinds"]
    assert all(k == [(0, "packed", 6)] for k in d[0]["kinds"][1:]), d[0]["kinds"]
    # min_numel: small buckets take the plain all-reduce (bit-exact), the others are compressed;
    # the step counter (hence the seeds) advances even when the last bucket is a plain one
    for key, plain, packed in (("ddp_min400", 1, STEPS), ("ddp_min_all", STEPS + 1, 0)):
        m = [v[key] for v in vals]
        for v in m:
            bad = [c for c in v["checks"] if not (c[1] == c[2] if c[0] == "wire" else c[1])]
            assert v["checks"] and not bad, (key, bad)
            assert torch.equal(v["params"], m[0]["params"]) and v["iteration"] == STEPS
            assert (v["counters"]["plain_buckets"], v["counters"]["compressed_buckets"]) == (plain, packed)
        assert any(c[0] == "plain" for c in m[0]["checks"])
    assert vals[0]["ddp_min400"]["kinds"][0] == [(0, "plain", 5), (1, "packed", 1)]
    st = pickle.loads(d[0]["pickled"])  # survives pickling without the process group
    assert st.process_group is None and st.codec.config() == build_codec({"name": "bf16"}).config()
    assert st.iteration == STEPS
    assert len(vals[0]["state_errors"]) == 3
    # --- DTensor ColwiseParallel variant
    for v in vals:
        assert v["dtensor"]["equal_decode"] and v["dtensor"]["within"]
        assert torch.equal(v["dtensor"]["grad"], vals[0]["dtensor"]["grad"])
    # --- tensor parallel, with and without sequence parallelism
    for key in ("tp", "tp_sp"):
        r = [v[key] for v in vals]
        for v in r:
            assert v["checks"] and all(v["checks"]), (key, v["checks"])
            for a, b in zip(v["pre"], r[0]["pre"]):
                assert torch.equal(a, b)  # the replicated layer stays bit-identical
            assert v["losses"] == r[0]["losses"]
        if key == "tp":
            for v in r[1:]:
                for a, b in zip(v["h_grads"], r[0]["h_grads"]):
                    assert torch.equal(a, b)
        for t in range(STEPS):
            tol = _loss_tolerance(r[0]["ref_gnorms"], [sum(v["errs"][s] ** 2 for v in r) ** 0.5 if key == "tp_sp"
                                                        else r[0]["errs"][s] for s in range(STEPS)], t)
            assert abs(r[0]["losses"][t] - r[0]["ref_losses"][t]) <= tol, (key, t)
        sent, raw = r[0]["bytes"]
        assert 0 < sent < raw
