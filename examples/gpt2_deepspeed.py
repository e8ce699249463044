"""Hugging Face GPT-2 (from a config) as a DeepSpeed ``PipelineModule`` of two stages, with
gradwire's ``initialize`` in place of ``deepspeed.initialize``.

    torchrun --nproc_per_node 2 -m examples.gpt2_deepspeed --codec '{"name": "fp", "bits": 6}'
    torchrun --nproc_per_node 2 -m examples.gpt2_deepspeed --codec none   # plain deepspeed.initialize

The layers: embeddings (token + position), the GPT-2 blocks (Hugging Face's own ``GPT2Block``
modules, causal attention without a mask), and the final LayerNorm with an untied LM head.
The codec goes in the ``"gradwire"`` section of the DeepSpeed config.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch import nn

from examples._gpt2 import SEQ, flat_params, gpt2_lm, lm_loss, tokens


class Embed(nn.Module):
    def __init__(self, full):
        super().__init__()
        self.wte, self.wpe = full.transformer.wte, full.transformer.wpe

    def forward(self, ids):
        return self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))


class Block(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, h):
        out = self.block(h)
        return out[0] if isinstance(out, tuple) else out


class Final(nn.Module):
    def __init__(self, full):
        super().__init__()
        self.ln_f = full.transformer.ln_f
        self.lm_head = nn.Linear(full.lm_head.in_features, full.lm_head.out_features, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(full.lm_head.weight)

    def forward(self, h):
        return self.lm_head(self.ln_f(h))


def layers():
    full = gpt2_lm()
    return [Embed(full), *[Block(b) for b in full.transformer.h], Final(full)]


def train(rank: int, world: int, codec: dict | None, steps: int = 3, lr: float = 0.1, micro: int = 2,
          gas: int = 2) -> dict:
    """Two pipeline stages on 2 ranks (the process group already initialised). ``codec`` None:
    plain ``deepspeed.initialize``. Returns the losses and this stage's final parameters."""
    import deepspeed
    from deepspeed.pipe import PipelineModule

    import gradwire.integrations.deepspeed as gw_ds

    os.environ.setdefault("LOCAL_RANK", str(rank))  # DeepSpeed reads it; one process per "device"
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    net = PipelineModule(layers=layers(), num_stages=2, loss_fn=lm_loss, partition_method="uniform")
    cfg = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
           "steps_per_print": 10 ** 9}
    if codec is not None:
        cfg["gradwire"] = {"codec": codec, "seed": 0}
    init = deepspeed.initialize if codec is None else gw_ds.initialize
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    engine, _, _, _ = init(model=net, config=cfg, optimizer=opt)

    def batches(step):
        ids = tokens(micro * gas, step)
        for k in range(gas):
            mb = ids[k * micro:(k + 1) * micro]
            yield mb, mb  # inputs for stage 0, labels for the last stage

    losses = [float(engine.train_batch(data_iter=batches(step))) for step in range(steps)]
    return dict(losses=losses, params=flat_params([engine.module]), seq=SEQ)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codec", default='{"name": "fp", "bits": 6}', help="JSON codec config, or none")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    codec = None if args.codec == "none" else json.loads(args.codec)
    out = train(dist.get_rank(), dist.get_world_size(), codec, steps=args.steps)
    if dist.get_rank() == 0:
        print("losses:", " ".join(f"{v:.4f}" for v in out["losses"]))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
