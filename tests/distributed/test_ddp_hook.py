"""The DDP hook as a drop-in (issue 15, items 1-3), on 2 gloo ranks in one launch:

1. wrapped in torch's optimizer-overlap wrapper (``_hook_then_optimizer``, which steps the
   optimizer on ``bucket.gradients()`` when the hook's future completes), every codec trains
   exactly as the same hook followed by a plain optimizer step: bit-identical parameters, and
   replicas bit-identical. (Before the fix the wrapper read the un-averaged local gradients.)
   The identity codec is bit-identical to DDP without a hook (2 ranks: a + b commutes, and the
   division by 2 is exact).
2. float64 parameters and sparse embedding gradients take the plain all-reduce: a mixed model
   trains bit-identically to plain DDP on those parameters, and the buckets are counted as plain.
3. A hook state pickled after k steps and loaded, with the model, into a fresh DDP (whose first
   iteration has DDP's initial bucket layout again, not the rebuilt one) continues bit-identically
   to the uninterrupted run.
Plus the warm-up (``start_iter``): the first iterations are exactly plain DDP; and torch's
``fp16_compress_wrapper`` composes with the gradwire hook.
"""
from __future__ import annotations

import copy
import pickle

import torch
import torch.distributed as dist
from torch import nn

from gradwire.integrations.ddp import GradwireDDPState, gradwire_allreduce_hook
from gradwire.testing.launch import run_workers, values

LR, STEPS = 0.05, 4
CODECS = {
    "identity": {"name": "identity"},
    "bf16": {"name": "bf16"},
    "fp8": {"name": "fp8_e4m3"},
    "fp6": {"name": "fp", "bits": 6},
    "prune": {"name": "prune", "sparsity": 0.5},  # variable size
    "nm24": {"name": "nm", "n": 2, "m": 4, "method": "mvue"},  # a 30-element bias: padded tail
}
# Small buckets: several per step before DDP's rebuild, a different grouping after it.
BUCKETS = dict(bucket_cap_mb_list=[0.002] * 8)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 30), nn.Tanh(), nn.Linear(30, 30), nn.Tanh(), nn.Linear(30, 1))


def _batch(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(24, 16, generator=g), torch.randn(24, 1, generator=g)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _train(ddp, steps, rank, opt=None, first=0):
    for step in range(first, first + steps):
        x, y = _batch(rank, step)
        ddp.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        if opt is not None:
            opt.step()


def _overlap_case(rank, cfg):
    """(hook + SGD.step, hook wrapped in _hook_then_optimizer) final parameters."""
    from torch.distributed.algorithms.ddp_comm_hooks.optimizer_overlap_hooks import (
        _hook_then_optimizer,
        _OptimizerHookState,
    )
    from torch.distributed.optim.functional_sgd import _FunctionalSGD

    model = _mlp()
    ddp = nn.parallel.DistributedDataParallel(model, **BUCKETS)
    ddp.register_comm_hook(GradwireDDPState(cfg, base_seed=3), gradwire_allreduce_hook)
    _train(ddp, STEPS, rank, torch.optim.SGD(model.parameters(), lr=LR))
    model2 = _mlp()
    ddp2 = nn.parallel.DistributedDataParallel(model2, **BUCKETS)
    opt_state = _OptimizerHookState(_FunctionalSGD(list(model2.parameters()), lr=LR))
    ddp2.register_comm_hook(GradwireDDPState(cfg, base_seed=3),
                            _hook_then_optimizer(gradwire_allreduce_hook, opt_state))
    _train(ddp2, STEPS, rank)  # the wrapper steps the optimizer inside backward
    return _flat(model), _flat(model2)


def _plain_run(rank, model_fn, steps=STEPS):
    model = model_fn()
    ddp = nn.parallel.DistributedDataParallel(model, **BUCKETS)
    _train(ddp, steps, rank, torch.optim.SGD(model.parameters(), lr=LR))
    return model


class _Mixed(nn.Module):
    """A float64 layer and a sparse embedding beside float32 layers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(40, 16, sparse=True)
        self.a = nn.Linear(16, 30)
        self.b = nn.Linear(30, 1).double()

    def forward(self, x):
        idx = (x.abs() * 10).long().clamp(max=39)[:, :4]
        h = torch.tanh(self.a(x + self.emb(idx).mean(1)))
        return self.b(h.double()).float()


def _mixed_case(rank, cfg, steps):
    model = _Mixed()
    ddp = nn.parallel.DistributedDataParallel(model, **BUCKETS)
    state = GradwireDDPState(cfg)
    ddp.register_comm_hook(state, gradwire_allreduce_hook)
    _train(ddp, steps, rank, torch.optim.SGD(model.parameters(), lr=LR))
    ref = dict(_plain_run(rank, _Mixed, steps).named_parameters())
    same = {n: torch.equal(p, ref[n]) for n, p in model.named_parameters()}
    return dict(same=same, counters=state.counters, params=_flat(model))


def _resume_case(rank, cfg):
    model = _mlp()
    ddp = nn.parallel.DistributedDataParallel(model, **BUCKETS)
    ddp.register_comm_hook(GradwireDDPState(cfg, base_seed=9), gradwire_allreduce_hook)
    _train(ddp, STEPS, rank, torch.optim.SGD(model.parameters(), lr=LR))
    uninterrupted = _flat(model)
    # interrupted: k steps, checkpoint (model + pickled hook state), fresh DDP, the rest
    k = STEPS // 2
    model = _mlp()
    ddp = nn.parallel.DistributedDataParallel(model, **BUCKETS)
    state = GradwireDDPState(cfg, base_seed=9)
    ddp.register_comm_hook(state, gradwire_allreduce_hook)
    _train(ddp, k, rank, torch.optim.SGD(model.parameters(), lr=LR))
    ckpt = pickle.dumps((copy.deepcopy(model.state_dict()), state))
    del ddp, model, state
    sd, state = pickle.loads(ckpt)
    model = _mlp()
    model.load_state_dict(sd)
    ddp = nn.parallel.DistributedDataParallel(model, **BUCKETS)
    ddp.register_comm_hook(state, gradwire_allreduce_hook)
    _train(ddp, STEPS - k, rank, torch.optim.SGD(model.parameters(), lr=LR), first=k)
    return uninterrupted, _flat(model), state.iteration


def _warmup_case(rank):
    per_step, counters = [], None
    for hook in (True, False):
        model = _mlp()
        ddp = nn.parallel.DistributedDataParallel(model, **BUCKETS)
        state = GradwireDDPState({"name": "fp", "bits": 6}, start_iter=2)
        if hook:
            ddp.register_comm_hook(state, gradwire_allreduce_hook)
            counters = state.counters
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        params = []
        for step in range(3):
            _train(ddp, 1, rank, opt, first=step)
            params.append(_flat(model))
        per_step.append(params)
    return dict(equal=[torch.equal(a, b) for a, b in zip(*per_step)], counters=counters)


def _fp16_wrapper_case(rank):
    """torch's fp16_compress_wrapper around the gradwire hook: the wrapper hands the hook a new
    float16 buffer and copies the hook's result back. With the identity codec the gradients are
    the float16 sum of the float16 local gradients (summed in float32 in rank order, rounded to
    float16), halved in float16, as gradwire's two-phase all-reduce specifies."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_wrapper

    model = _mlp()
    ref = copy.deepcopy(model)
    ddp = nn.parallel.DistributedDataParallel(model, **BUCKETS)
    ddp.register_comm_hook(GradwireDDPState(CODECS["identity"]), fp16_compress_wrapper(gradwire_allreduce_hook))
    x, y = _batch(rank, 0)
    nn.functional.mse_loss(ref(x), y).backward()
    local = torch.cat([p.grad.reshape(-1) for p in ref.parameters()]).half()
    both = [torch.empty_like(local) for _ in range(2)]
    dist.all_gather(both, local)
    want = ((both[0].float() + both[1].float()).half() / 2).float()
    nn.functional.mse_loss(ddp(x), y).backward()
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    return torch.equal(got, want), torch.equal(got, local.float())


def _worker(rank, world):
    res = {"overlap": {name: _overlap_case(rank, cfg) for name, cfg in CODECS.items()}}
    res["plain"] = _flat(_plain_run(rank, _mlp))
    # bf16, one step: float64 / sparse parameters exactly plain, the float32 layer compressed;
    # identity, several steps: everything exactly plain DDP
    res["mixed"] = {"bf16": _mixed_case(rank, CODECS["bf16"], 1), "identity": _mixed_case(rank, CODECS["identity"], STEPS)}
    res["resume"] = {name: _resume_case(rank, CODECS[name]) for name in ("fp8", "fp6", "prune", "nm24")}
    res["warmup"] = _warmup_case(rank)
    res["fp16_wrapper"] = _fp16_wrapper_case(rank)

    errs = []
    for kw in ({"start_iter": -1}, {"start_iter": 1.5}):
        try:
            GradwireDDPState({"name": "bf16"}, **kw)
        except ValueError as e:
            errs.append(str(e))
    res["errors"] = errs
    return res


def test_ddp_hook_drop_in():
    vals = values(run_workers(_worker, 2, timeout_s=400))
    for name in CODECS:
        a0, b0 = vals[0]["overlap"][name]
        for v in vals:
            a, b = v["overlap"][name]
            assert torch.equal(a, b), f"{name}: optimizer-overlap wrapper diverges from hook + step"
            assert torch.equal(a, a0) and torch.equal(b, b0), f"{name}: replicas differ"
        assert not torch.equal(a0, _flat(_mlp())), name  # it trained
    assert torch.equal(vals[0]["overlap"]["identity"][0], vals[0]["plain"])  # identity == no hook
    # lossy codecs do change the result (the comparison above is not vacuous)
    assert not torch.equal(vals[0]["overlap"]["fp6"][0], vals[0]["plain"])
    for v in vals:
        m, mi = v["mixed"]["bf16"], v["mixed"]["identity"]
        assert m["same"] == {"emb.weight": True, "a.weight": False, "a.bias": False,
                             "b.weight": True, "b.bias": True}, m["same"]
        assert all(mi["same"].values()), mi["same"]
        by = mi["counters"]["plain_by_reason"]
        assert by["sparse"] == STEPS and by["dtype"] == STEPS and mi["counters"]["compressed_buckets"] == STEPS
        assert torch.equal(m["params"], vals[0]["mixed"]["bf16"]["params"])
        for name, (full, resumed, it) in v["resume"].items():
            assert torch.equal(full, resumed), f"{name}: resumed run differs from the uninterrupted one"
            assert it == STEPS
        assert v["fp16_wrapper"] == (True, False)  # the reduced float16 result, not the local one
        w = v["warmup"]
        assert w["equal"] == [True, True, False], w["equal"]  # plain for 2 iterations, then fp6
        assert w["counters"]["plain_by_reason"]["warmup"] >= 2
        assert len(v["errors"]) == 2 and "start_iter" in v["errors"][0]
