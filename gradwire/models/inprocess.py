"""A pipeline whose stages run in one process, compressing every boundary as if it were a wire.

This is what ``launch/train.py`` runs with a single process (DESIGN.md "Launchers"): the model is
cut into the same stages a multi-rank run would use; in backward, the gradient at each stage
boundary is encoded to a packet by the boundary's codec, decoded, and only the decoded tensor
continues backward -- exactly what the previous stage would receive over the wire. The packet
sizes are logged, so the report states the bytes that would have crossed.

Each boundary has a ``policy.BoundaryPolicy`` (as in the multi-rank engine): step = micro-batch
index since the start, seeds ``derive_seed(seed, step, boundary)``, fits refreshed on its
schedule, and, for ``"heterogeneous"`` pruning, sparsities re-allocated across boundaries.
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
        from gradwire.integrations.deepspeed import make_policy

        config.check_boundaries(num_stages)
        self.ranges = split_uniform(len(layers), num_stages)
        self.stages = nn.ModuleList(nn.Sequential(*layers[a:b]) for a, b in self.ranges)
        self.config, self.loss_fn = config, loss_fn
        self.specs = [config.codec_for(b) for b in range(num_stages - 1)]
        self.policies = [make_policy(config, b) for b in range(num_stages - 1)]
        # Heterogeneous pruning (paper 001 Sec. 5.3): boundaries whose spec asks for it share one
        # element-weighted sparsity budget, re-allocated after every refresh of their fits.
        self.hetero = [p for p, s in zip(self.policies, self.specs) if s.name == "prune" and s.heterogeneous]
        self.hetero_budget = next((s.sparsity for s in self.specs if s.name == "prune" and s.heterogeneous), None)
        self.allocations: list[tuple[int, list[float]]] = []
        self.wire_log = WireLog()
        self.counter = 0  # micro-batches processed (the seed counter)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, step: int, scale: float = 1.0) -> float:
        """One micro-batch: forward through all stages, backward with compressed boundaries.
        Gradients accumulate into the parameters (``loss * scale`` is differentiated)."""
        from gradwire.comm.p2p import LENGTH_BYTES
        from gradwire.integrations.deepspeed import _label

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
            policy, step_b = self.policies[b], self.counter
            packet = policy.encode(g, step_b)
            fixed = policy.packed_size(g.shape, g.dtype, step_b)
            # What would cross a wire: the packet, plus the length prefix of a variable-size codec.
            sent = packet.numel() + (0 if fixed is not None else LENGTH_BYTES)
            self.wire_log.record(step, b, g, packet, fixed if fixed is not None else sent,
                                 _label(policy, step_b), sent_bytes=sent)
            outs[b].backward(policy.decode(packet, dtype=g.dtype))
        if self.hetero and self.counter % self.config.refresh_every == 0 and self.counter > 0:
            from gradwire.policy import allocate_heterogeneous

            self.allocations.append((self.counter, allocate_heterogeneous(self.hetero, self.hetero_budget)))
        self.counter += 1
        return float(loss.detach())

    @property
    def codecs(self):
        return [p.codec for p in self.policies]

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> float:
        h = x
        for stage in self.stages:
            h = stage(h)
        return float(self.loss_fn(h, y))
