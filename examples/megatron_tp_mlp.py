"""Megatron-Core tensor parallelism with gradwire: a stack of Megatron MLP blocks
(``ColumnParallelLinear`` -> GELU -> ``RowParallelLinear``, residual) trained on a regression
task, the column layers' backward all-reduce compressed by one call.

    torchrun --nproc_per_node 2 -m examples.megatron_tp_mlp --codec '{"name": "fp", "bits": 8}'
    torchrun --nproc_per_node 2 -m examples.megatron_tp_mlp --codec none   # Megatron's own all-reduce

Not a GPT: Megatron's ``GPTModel`` does not run on a CPU (its attention takes a buffer from
``parallel_state.get_global_memory_buffer()``, allocated on ``torch.cuda.current_device()``;
``megatron/core/transformer/dot_product_attention.py``), and these examples run anywhere.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
from torch import nn

WIDTH, HIDDEN, DEPTH, TOKENS = 32, 64, 2, 16


class MLPBlock(nn.Module):
    def __init__(self, cfg, group):
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        init = nn.init.xavier_normal_
        self.up = ColumnParallelLinear(WIDTH, HIDDEN, config=cfg, init_method=init, bias=True,
                                       gather_output=False, tp_group=group)
        self.down = RowParallelLinear(HIDDEN, WIDTH, config=cfg, init_method=init, bias=True,
                                      input_is_parallel=True, skip_bias_add=False, tp_group=group)

    def forward(self, x):
        h, _ = self.up(x)
        y, _ = self.down(nn.functional.gelu(h))
        return x + y


def train(rank: int, world: int, codec: dict | None, steps: int = 3, lr: float = 0.05) -> dict:
    """All ranks form one tensor-parallel group. ``codec`` None: Megatron's own all-reduce.
    Returns the losses and this rank's final parameters."""
    from megatron.core.model_parallel_config import ModelParallelConfig

    from gradwire.integrations import megatron as gw_mc

    cfg = ModelParallelConfig(tensor_model_parallel_size=world, use_cpu_initialization=True,
                              params_dtype=torch.float32)
    torch.manual_seed(0)  # Megatron's CPU initialisation draws the full weights, then slices
    model = nn.Sequential(*[MLPBlock(cfg, dist.group.WORLD) for _ in range(DEPTH)])
    target = nn.Linear(WIDTH, WIDTH)  # the function to learn (same on every rank: same seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    tp = gw_mc.compress_tensor_parallel(codec) if codec is not None else None
    losses = []
    try:
        for step in range(steps):
            g = torch.Generator().manual_seed(step)  # the same batch on every TP rank
            x = torch.randn(TOKENS, 1, WIDTH, generator=g)
            with torch.no_grad():
                y = target(x)
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        if tp is not None:
            tp.disable()
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return dict(losses=losses, params=params, counters=dict(tp.counters) if tp else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codec", default='{"name": "fp", "bits": 8}', help="JSON codec config, or none")
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    codec = None if args.codec == "none" else json.loads(args.codec)
    out = train(dist.get_rank(), dist.get_world_size(), codec, steps=args.steps)
    if dist.get_rank() == 0:
        print("losses:", " ".join(f"{v:.4f}" for v in out["losses"]))
        if out["counters"]:
            c = out["counters"]
            print(f"TP all-reduces sent {c['bytes_sent']} bytes for {c['raw_bytes']} raw")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
