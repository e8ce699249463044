"""Megatron-Core integration on 2 gloo ranks (CPU): what of Megatron runs here.

Tensor parallelism (Megatron's own ColumnParallelLinear / RowParallelLinear,
``use_cpu_initialization=True``): with ``compress_tensor_parallel`` the input gradient of the
column layer is the decode of the compressed all-reduce (identity: bit-identical to Megatron's
own all-reduce; bf16: within the derived bound of the exact sum, identical on both ranks), the
weight gradients are untouched, and ``disable()`` restores Megatron's Function.
Pipeline parallelism: ``CompressedP2PCommunicator`` driven through the calls Megatron's 1F1B
schedule makes (send_forward / recv_forward, send_forward_recv_backward /
send_backward_recv_forward, recv_backward / send_backward), batched and unbatched: activations
arrive exactly, gradients as the decode of the sent packet. And Megatron's own 1F1B schedule
(``forward_backward_pipelining_without_interleaving``) with the communicator: identity
bit-identical to Megatron's P2PCommunicator, bf16 gradients exactly the codec's round trip of
the uncompressed ones. Megatron hard-codes CUDA in two places on that path, which a test-only
shim (``_cpu_torch``, applied in the worker processes only) maps to the CPU:
``schedules.py`` ``total_num_tokens = torch.zeros([], dtype=torch.int, device="cuda")`` (in
``forward_backward_pipelining_without_interleaving``) and ``p2p_communication.py``
``torch.cuda.current_device()`` (Megatron's own communicator's receive buffers; gradwire's
communicator allocates on the group's device itself) and its ``torch.cuda.synchronize()`` after
batched p2p (``batch_p2p_sync``; gradwire's calls it only when CUDA is available). Not run here: the interleaved schedule and
sequence parallelism (Megatron allocates its reduce-scatter output on
``torch.cuda.current_device()``), which need a GPU.
"""
from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core")

from gradwire.codec.registry import build_codec  # noqa: E402
from gradwire.integrations import megatron as gw_mc  # noqa: E402
from gradwire.testing.launch import run_workers, values  # noqa: E402

U = 2.0**-8
SHAPE = (4, 2, 8)  # (seq, micro batch, hidden): Megatron's p2p tensor layout


def _tp_layers(world):
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    cfg = ModelParallelConfig(tensor_model_parallel_size=world, use_cpu_initialization=True,
                              params_dtype=torch.float32)
    torch.manual_seed(0)
    col = ColumnParallelLinear(8, 16, config=cfg, init_method=torch.nn.init.xavier_normal_, bias=True,
                               gather_output=False, tp_group=dist.group.WORLD)
    row = RowParallelLinear(16, 8, config=cfg, init_method=torch.nn.init.xavier_normal_, bias=True,
                            input_is_parallel=True, skip_bias_add=False, tp_group=dist.group.WORLD)
    return col, row


def _tp_step(world):
    col, row = _tp_layers(world)
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(1), requires_grad=True)
    h, _ = col(x)
    h.retain_grad()
    y, _ = row(torch.tanh(h))
    (y ** 2).sum().backward()
    partial = h.grad @ col.weight.detach()  # this rank's input gradient before the all-reduce
    return x.grad, col.weight.grad, partial


def _tp(rank, world):
    from megatron.core.tensor_parallel import layers

    original = layers.LinearWithGradAccumulationAndAsyncCommunication
    ref_x, ref_w, partial = _tp_step(world)
    parts = [torch.empty_like(partial) for _ in range(world)]
    dist.all_gather(parts, partial)
    out = {}
    for name in ("identity", "bf16"):
        state = gw_mc.compress_tensor_parallel({"name": name}, keep_trace=True)
        try:
            gx, gw, _ = _tp_step(world)
        finally:
            state.disable()
        codec = build_codec({"name": name})
        dec = torch.cat([codec.decode(pk, dtype=torch.float32).reshape(-1) for pk in state.last_trace["phase2_recv"]
                         if pk.numel()]).reshape(gx.shape)
        out[name] = dict(x=gx, equal_decode=torch.equal(gx, dec), w_same=torch.equal(gw, ref_w),
                         counters=dict(state.counters))
    out["ref_x"], out["exact"] = ref_x, sum(p.double() for p in parts)
    out["mag"] = sum(p.double().abs() for p in parts)
    out["restored"] = layers.LinearWithGradAccumulationAndAsyncCommunication is original
    return out


def _pp(rank, world, batch: bool, codec_cfg):
    from megatron.core.model_parallel_config import ModelParallelConfig

    cfg = ModelParallelConfig(pipeline_model_parallel_size=world, pipeline_dtype=torch.float32,
                              batch_p2p_comm=batch)
    comm = gw_mc.CompressedP2PCommunicator(dist.group.WORLD, cfg, codec=codec_cfg, base_seed=7)
    g = torch.Generator().manual_seed(10 + rank)
    acts = [torch.randn(SHAPE, generator=g) for _ in range(2)]
    grads = [torch.randn(SHAPE, generator=g) for _ in range(2)]
    got = {}
    if rank == 0:  # first stage: forward out, gradients in
        comm.send_forward(acts[0], is_last_stage=False)
        got["g0"] = comm.send_forward_recv_backward(acts[1], SHAPE, is_last_stage=False)
        got["g1"] = comm.recv_backward(SHAPE, is_last_stage=False)
    else:  # last stage: activations in, gradients out
        got["a0"] = comm.recv_forward(SHAPE, is_first_stage=False)
        got["a1"] = comm.send_backward_recv_forward(grads[0], SHAPE, is_first_stage=False)
        comm.send_backward(grads[1], is_first_stage=False)
    return dict(acts=acts, grads=grads, got=got, bytes=comm.bytes_sent, raw=comm.raw_bytes_sent)


def _cpu_torch():
    """Test-only: a ``torch`` for Megatron's modules whose ``"cuda"`` allocations go to the CPU."""
    real = torch

    def to_cpu(fn):
        def call(*a, **kw):
            if str(kw.get("device", "")).startswith("cuda"):
                kw["device"] = "cpu"
            return fn(*a, **kw)
        return call

    class Cuda:
        def current_device(self):
            return "cpu"

        def synchronize(self, *a, **kw):  # nothing asynchronous on the CPU
            return None

        def __getattr__(self, name):
            return getattr(real.cuda, name)

    class Torch(types.ModuleType):
        cuda = Cuda()

        def __getattr__(self, name):
            v = getattr(real, name)
            return to_cpu(v) if name in ("zeros", "empty", "ones", "tensor") else v

    return Torch("torch")


def _schedule(rank, world, codec_cfg, solo):
    """Megatron's 1F1B over 2 stages (one Linear each), 4 micro-batches. codec None: Megatron's
    own P2PCommunicator. Returns the losses, the weight gradient, the gradients rank 0 received."""
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel import p2p_communication, schedules
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.transformer_config import TransformerConfig

    schedules.torch = p2p_communication.torch = _cpu_torch()
    cfg = TransformerConfig(num_layers=world, hidden_size=SHAPE[2], num_attention_heads=1,
                            pipeline_model_parallel_size=world, pipeline_dtype=torch.float32,
                            use_cpu_initialization=True)
    torch.manual_seed(0)
    model = [torch.nn.Linear(SHAPE[2], SHAPE[2]) for _ in range(world)][rank]
    model.config, model.model_type = cfg, ModelType.encoder_or_decoder
    inputs = {}
    model.set_input_tensor = lambda t: inputs.update(x=t[0] if isinstance(t, list) else t)
    comm = (P2PCommunicator(dist.group.WORLD, cfg) if codec_cfg is None
            else gw_mc.CompressedP2PCommunicator(dist.group.WORLD, cfg, codec=codec_cfg, base_seed=3))
    received = []
    communicate = comm._communicate

    def recording(**kw):
        out = communicate(**kw)
        if out[1] is not None:
            received.append(out[1].detach().clone())
        return out

    comm._communicate = recording
    pg = ProcessGroupCollection()
    pg.tp = pg.cp = pg.dp_cp = solo
    pg.pp, pg.embd, pg.pos_embd = dist.group.WORLD, None, None
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)) for _ in range(4)]

    def forward_step(it, m):
        x, y = next(it)
        out = m(x if rank == 0 else inputs["x"])
        return out, lambda o: (((o - y) ** 2).mean(), {"loss": ((o - y) ** 2).mean().detach()})

    losses = schedules.forward_backward_pipelining_without_interleaving(
        forward_step_func=forward_step, data_iterator=iter(data), model=model, num_microbatches=4,
        seq_length=SHAPE[0], micro_batch_size=SHAPE[1], p2p_communicator=comm, pg_collection=pg)
    return dict(losses=[d["loss"] for d in losses], wgrad=model.weight.grad.clone(), received=received)


def _worker(rank, world):
    res = {"tp": _tp(rank, world)}
    solo = [dist.new_group([r]) for r in range(world)][rank]  # this rank alone: tp, cp, dp
    res["schedule"] = {name: _schedule(rank, world, None if name == "plain" else {"name": name}, solo)
                       for name in ("plain", "identity", "bf16")}
    for batch in (True, False):
        for name in ("identity", "bf16"):
            res[("pp", batch, name)] = _pp(rank, world, batch, {"name": name})
    try:
        gw_mc.CompressedP2PCommunicator(dist.group.WORLD, None, codec={"name": "prune", "sparsity": 0.5})
    except TypeError as e:
        res["variable_refused"] = str(e)
    from megatron.core import package_info

    real, package_info.__version__ = package_info.__version__, "0.17.0"
    try:
        gw_mc.compress_tensor_parallel({"name": "bf16"})
    except RuntimeError as e:
        res["version_refused"] = str(e)
    finally:
        package_info.__version__ = real
    return res


def test_megatron_tensor_and_pipeline_parallel_on_cpu():
    vals = values(run_workers(_worker, 2, timeout_s=300))
    for v in vals:
        t = v["tp"]
        assert t["restored"]
        assert torch.equal(t["identity"]["x"], t["ref_x"])  # 2 ranks: a + b either way
        for name in ("identity", "bf16"):
            assert t[name]["equal_decode"] and t[name]["w_same"], name
            assert t[name]["counters"]["all_reduces"] == 1 and t[name]["counters"]["bytes_sent"] > 0
        err = (t["bf16"]["x"].double() - t["exact"]).abs()
        assert bool((err <= U * (t["mag"] + t["exact"].abs()) * 1.01 + 1e-12).all())
        assert not torch.equal(t["bf16"]["x"], t["ref_x"])  # bf16 did round
        assert torch.equal(t["bf16"]["x"], vals[0]["tp"]["bf16"]["x"])  # identical on both ranks
    for batch in (True, False):
        for name in ("identity", "bf16"):
            r0, r1 = vals[0][("pp", batch, name)], vals[1][("pp", batch, name)]
            assert torch.equal(r1["got"]["a0"], r0["acts"][0]) and torch.equal(r1["got"]["a1"], r0["acts"][1])
            codec = build_codec({"name": name})
            for i in range(2):
                from gradwire.numerics.rng import derive_seed

                want = codec.decode(codec.encode(r1["grads"][i], seed=derive_seed(7, i, 1)))
                assert torch.equal(r0["got"][f"g{i}"], want), (batch, name, i)
            if name == "identity":
                assert torch.equal(r0["got"]["g0"], r1["grads"][0])
            assert r1["bytes"] == 2 * codec.packed_size(SHAPE, torch.float32) and r1["raw"] == 2 * 4 * 64
    for v in vals:  # Megatron's own 1F1B schedule
        r = v["schedule"]
        for a, b in zip(r["identity"]["losses"] + [r["identity"]["wgrad"]], r["plain"]["losses"] + [r["plain"]["wgrad"]]):
            assert torch.equal(a, b)
    r0, r1 = vals[0]["schedule"], vals[1]["schedule"]
    assert len(r0["plain"]["received"]) == 4 and len(r1["plain"]["losses"]) == 4
    bf16 = build_codec({"name": "bf16"})
    for got, plain in zip(r0["bf16"]["received"], r0["plain"]["received"]):
        assert torch.equal(got, bf16.decode(bf16.encode(plain)))  # the last stage sent the same gradients
    assert all(torch.equal(a, b) for a, b in zip(r1["bf16"]["losses"], r1["plain"]["losses"]))
    assert torch.equal(r1["bf16"]["wgrad"], r1["plain"]["wgrad"])
    assert not torch.equal(r0["bf16"]["wgrad"], r0["plain"]["wgrad"])  # bf16 reached the first stage
    assert "fixed-rate" in vals[0]["variable_refused"]
    assert "0.17.0" in vals[0]["version_refused"]

