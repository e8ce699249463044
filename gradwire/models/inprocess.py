"""A pipeline whose stages run in one process, compressing every boundary as if it were a wire.

This is what ``launch/train.py`` runs with a single process (DESIGN.md "Launchers"): the model is
cut into the same stages a multi-rank run would use; in backward, the gradient at each stage
boundary is encoded to a packet by the boundary's codec, decoded, and only the decoded tensor
continues backward -- exactly what the previous stage would receive over the wire. The packet
sizes are logged, so the report states the bytes that would have crossed.

Per-boundary seeds follow ``comm.p2p.PacketChannel``: ``derive_seed(seed, counter, boundary)``
with ``counter`` the micro-batch index since the start.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from gradwire.config import GradwireConfig
from gradwire.models.gpt import split_uniform
from gradwire.numerics.rng import derive_seed
from gradwire.report import WireLog


class InProcessPipeline(nn.Module):
    def __init__(self, layers: Sequence[nn.Module], num_stages: int, config: GradwireConfig,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        super().__init__()
        from gradwire.integrations.deepspeed import codec_from_spec

        config.check_boundaries(num_stages)
        self.ranges = split_uniform(len(layers), num_stages)
        self.stages = nn.ModuleList(nn.Sequential(*layers[a:b]) for a, b in self.ranges)
        self.config, self.loss_fn = config, loss_fn
        self.specs = [config.codec_for(b) for b in range(num_stages - 1)]
        self.codecs = [codec_from_spec(s) for s in self.specs]
        self.wire_log = WireLog()
        self.counter = 0  # micro-batches processed (the seed counter)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, step: int, scale: float = 1.0) -> float:
        """One micro-batch: forward through all stages, backward with compressed boundaries.
        Gradients accumulate into the parameters (``loss * scale`` is differentiated)."""
        from gradwire.integrations.deepspeed import predicted_size

        outs, ins = [], []
        h = x
        for i, stage in enumerate(self.stages):
            if i > 0:
                # Cut the graph: stage i sees a leaf, as it would after a receive.
                h = h.detach().requires_grad_(True)
                ins.append(h)
            h = stage(h)
            outs.append(h)
        loss = self.loss_fn(h, y)
        (loss * scale).backward()
        for b in reversed(range(len(self.stages) - 1)):
            g = ins[b].grad
            codec = self.codecs[b]
            packet = codec.encode(g, seed=derive_seed(self.config.seed, self.counter, b))
            pred = predicted_size(codec, g.shape, g.dtype, packet)
            sent = packet.numel() + (0 if codec.fixed_rate else pred - packet.numel())
            self.wire_log.record(step, b, g, packet, pred, self.specs[b].label, sent_bytes=sent)
            outs[b].backward(codec.decode(packet, dtype=g.dtype))
        self.counter += 1
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> float:
        h = x
        for stage in self.stages:
            h = stage(h)
        return float(self.loss_fn(h, y))
