"""Hugging Face GPT-2 (from a config) in two ``torch.distributed.pipelining`` stages whose
backward boundary gradient is compressed by gradwire.

    torchrun --nproc_per_node 2 -m examples.gpt2_pipelining --codec '{"name": "fp", "bits": 8}'
    torchrun --nproc_per_node 2 -m examples.gpt2_pipelining --codec none   # plain PipelineStage

Stage 0: token and position embeddings and the first half of the blocks (a ``GPT2Model`` with
half the layers and no final LayerNorm), sending hidden states. Stage 1: the other blocks,
the final LayerNorm and the LM head (a ``GPT2Model`` fed ``inputs_embeds``, its own position
embedding zero and frozen: stage 0 added them; the LM head an untied copy of the embedding).
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B

from examples._gpt2 import LAYERS, flat_params, gpt2_config, gpt2_lm, lm_loss, tokens
from gradwire.integrations.pipelining import CompressedPipelineStage


class Head(nn.Module):
    """Stage 0: embeddings + blocks[:k] -> hidden states."""

    def __init__(self, full, k: int):
        from transformers import GPT2Model

        super().__init__()
        # the whole model's config: HF indexes per-layer state by each block's layer_idx
        self.body = GPT2Model(gpt2_config())
        self.body.wte, self.body.wpe = full.transformer.wte, full.transformer.wpe
        self.body.h = nn.ModuleList(full.transformer.h[:k])
        self.body.ln_f = nn.Identity()

    def forward(self, ids):
        return self.body(input_ids=ids).last_hidden_state


class Tail(nn.Module):
    """Stage 1: blocks[k:] + final LayerNorm + LM head -> logits."""

    def __init__(self, full, k: int):
        from transformers import GPT2Model

        super().__init__()
        self.body = GPT2Model(gpt2_config())  # (as in Head)
        self.body.h = nn.ModuleList(full.transformer.h[k:])
        self.body.ln_f = full.transformer.ln_f
        with torch.no_grad():
            self.body.wpe.weight.zero_()
        self.body.wpe.weight.requires_grad_(False)
        self.body.wte.weight.requires_grad_(False)  # unused: the input is inputs_embeds
        self.lm_head = nn.Linear(full.lm_head.in_features, full.lm_head.out_features, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(full.lm_head.weight)

    def forward(self, hidden):
        return self.lm_head(self.body(inputs_embeds=hidden).last_hidden_state)


def train(rank: int, world: int, codec: dict | None, steps: int = 3, lr: float = 0.1, batch: int = 4,
          microbatches: int = 2) -> dict:
    """Two stages on ranks 0 and 1. ``codec`` None: plain ``PipelineStage``s. Returns the losses
    (last stage) and this stage's final parameters."""
    if world != 2:
        raise ValueError(f"this example has two stages: run it on 2 ranks, not {world}")
    full = gpt2_lm()
    stage_mod = Head(full, LAYERS // 2) if rank == 0 else Tail(full, LAYERS // 2)
    dev = torch.device("cpu")
    stage = (PipelineStage(stage_mod, rank, 2, dev) if codec is None
             else CompressedPipelineStage(stage_mod, rank, 2, dev, codec=codec))
    sched = Schedule1F1B(stage, n_microbatches=microbatches, loss_fn=lm_loss)
    opt = torch.optim.SGD([p for p in stage_mod.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        ids = tokens(batch, step)
        opt.zero_grad()
        if rank == 0:
            sched.step(ids)
        else:
            mb: list = []
            sched.step(target=ids, losses=mb)
            losses.append(sum(v.item() for v in mb) / len(mb))
        opt.step()
    return dict(losses=losses, params=flat_params([stage_mod]),
                bytes=(getattr(stage, "bytes_sent", 0), getattr(stage, "raw_bytes_sent", 0)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codec", default='{"name": "fp", "bits": 8}', help="JSON codec config, or none")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    codec = None if args.codec == "none" else json.loads(args.codec)
    out = train(dist.get_rank(), dist.get_world_size(), codec, steps=args.steps)
    if out["losses"]:
        print("losses:", " ".join(f"{v:.4f}" for v in out["losses"]))
    if dist.get_rank() == 1 and codec is not None:
        print(f"stage 1 sent {out['bytes'][0]} gradient bytes for {out['bytes'][1]} raw")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
