"""Hugging Face GPT-2 (from a config) trained with DistributedDataParallel and gradwire's hook.

    torchrun --nproc_per_node 2 -m examples.gpt2_ddp --codec '{"name": "fp", "bits": 8}'  # repo root
    torchrun --nproc_per_node 2 -m examples.gpt2_ddp --codec none      # plain DDP, for comparison
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from examples._gpt2 import flat_params, gpt2_lm, tokens
from gradwire.integrations.ddp import GradwireDDPState, gradwire_allreduce_hook


def train(rank: int, world: int, codec: dict | None, steps: int = 3, lr: float = 0.1, batch: int = 4) -> dict:
    """``codec`` None: plain DDP. Returns the losses and the final parameters."""
    model = gpt2_lm()
    ddp = DistributedDataParallel(model)
    state = None
    if codec is not None:
        state = GradwireDDPState(codec, base_seed=0)
        ddp.register_comm_hook(state, gradwire_allreduce_hook)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        ids = tokens(batch, step, rank)
        opt.zero_grad()
        loss = ddp(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return dict(losses=losses, params=flat_params([model]), counters=state.counters if state else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codec", default='{"name": "fp", "bits": 8}', help="JSON codec config, or none")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    codec = None if args.codec == "none" else json.loads(args.codec)
    out = train(dist.get_rank(), dist.get_world_size(), codec, steps=args.steps)
    if dist.get_rank() == 0:
        print("losses:", " ".join(f"{v:.4f}" for v in out["losses"]))
        if out["counters"]:
            c = out["counters"]
            print(f"sent {c['sent_bytes']} bytes for {c['raw_bytes']} raw ({c['raw_bytes'] / max(c['sent_bytes'], 1):.2f}x)")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
