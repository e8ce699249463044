"""The GPT decoder of ``gpt`` with Megatron-style tensor parallelism inside every block.

Each ``Block`` becomes a ``TPBlock`` whose four projections are split over the ranks of one
tensor-parallel group (Megatron-LM, Shoeybi et al. 2019, Sec. 3):

* ``qkv`` and ``fc1`` are ``ColumnParallelLinear`` without output gather: each rank computes
  its ``heads / tp`` attention heads and ``4 width / tp`` MLP units. Their backward all-reduce of
  the input gradient (the gradient of the LayerNorm output, shape [batch, seq, width]) is the
  compressed collective: gradwire's two-phase all-reduce with the tensor-parallel codec.
* ``proj`` and ``fc2`` are ``RowParallelLinear``: forward all-reduces the partial outputs
  exactly; backward needs no communication.

LayerNorms, the two row-parallel biases, the embedding and the head stay replicated. Every TP
rank decodes the same all-reduce packets, so the gradients of replicated parameters -- and the
parameters themselves after each optimizer step -- stay bit-identical across the group.

Weights are sharded from the full ``gpt_layers(cfg, seed)`` initialisation, so a TP model starts
from exactly the weights of the unsplit one (what the tp=1 vs tp=2 comparison relies on).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from gradwire.codec.base import Codec
from gradwire.integrations.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from gradwire.models.gpt import Block, GPTConfig, gpt_layers

# Layer ids of the TP collectives start here so their seeds, derive_seed(seed, step, layer_id),
# never coincide with a pipeline boundary's derive_seed(seed, step, boundary).
TP_LAYER_ID_BASE = 1 << 20


def check_tp_shape(cfg: GPTConfig, tp: int) -> None:
    """Raise ValueError (saying what to change) when ``cfg`` cannot be split over ``tp`` ranks."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor-parallel size must be a positive integer, got {tp!r}")
    if cfg.heads % tp:
        ok = [t for t in range(1, cfg.heads + 1) if cfg.heads % t == 0]
        raise ValueError(f"--heads {cfg.heads} is not divisible by tensor-parallel size {tp}: "
                         f"each TP rank computes heads/tp whole heads; use --tp in {ok} or "
                         f"--heads a multiple of {tp}")
    if cfg.width % tp:
        raise ValueError(f"--width {cfg.width} is not divisible by tensor-parallel size {tp}; "
                         f"use a width that is a multiple of {tp}")


def _qkv_rank_major(w: torch.Tensor, width: int, tp: int) -> torch.Tensor:
    """Reorder the fused [q; k; v] rows to [q_0; k_0; v_0; q_1; k_1; v_1; ...] so that the
    contiguous 1/tp row chunk ``ColumnParallelLinear`` keeps holds rank r's heads of q, k and v
    (a plain chunk would give rank 0 all of q and half of k)."""
    rest = w.shape[1:]
    return w.reshape(3, tp, width // tp, *rest).transpose(0, 1).reshape(3 * width, *rest).contiguous()


class TPBlock(nn.Module):
    """``gpt.Block`` (pre-LN causal attention + GELU MLP) with its projections split over
    ``group``; ``codec_factory()`` gives the codec of each column-parallel backward all-reduce."""

    def __init__(self, block: Block, codec_factory: Callable[[], Codec], group, *, base_seed: int,
                 layer_id: int):
        super().__init__()
        tp = dist.get_world_size(group)
        d = block.qkv.in_features
        self.heads, self.tp, self.width = block.heads, tp, d
        self.ln1, self.ln2 = block.ln1, block.ln2
        w, b = block.qkv.weight.detach(), block.qkv.bias.detach()
        self.qkv = ColumnParallelLinear(_qkv_rank_major(w, d, tp), _qkv_rank_major(b, d, tp), codec_factory(),
                                        group=group, base_seed=base_seed, layer_id=layer_id)
        self.proj = RowParallelLinear(block.proj.weight.detach(), block.proj.bias.detach(), codec_factory(),
                                      group=group, base_seed=base_seed, layer_id=layer_id + 1)
        self.fc1 = ColumnParallelLinear(block.fc1.weight.detach(), block.fc1.bias.detach(), codec_factory(),
                                        group=group, base_seed=base_seed, layer_id=layer_id + 2)
        self.fc2 = RowParallelLinear(block.fc2.weight.detach(), block.fc2.bias.detach(), codec_factory(),
                                     group=group, base_seed=base_seed, layer_id=layer_id + 3)
        # Sharded parameters are "model parallel" to DeepSpeed: its gradient-norm clipping counts
        # them on every TP rank and the replicated ones on TP rank 0 only.
        for p in (self.qkv.weight, self.qkv.bias, self.proj.weight, self.fc1.weight, self.fc1.bias,
                  self.fc2.weight):
            p.tensor_model_parallel = True

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        dl, hl = d // self.tp, self.heads // self.tp  # local width and heads
        q, k, v = self.qkv(self.ln1(h)).split(dl, dim=-1)
        q, k, v = (z.view(b, t, hl, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(att.transpose(1, 2).reshape(b, t, dl))
        return h + self.fc2(F.gelu(self.fc1(self.ln2(h))))

    def comms(self):
        """The ``TPComm`` of the two compressed collectives (row-parallel layers send nothing
        in backward; their comms stay at zero bytes)."""
        return [self.qkv.comm, self.fc1.comm]


def tp_gpt_layers(cfg: GPTConfig, group, codec_factory: Callable[[], Codec], *, seed: int = 0,
                  base_seed: int = 0) -> list[nn.Module]:
    """``gpt_layers(cfg, seed)`` with every block tensor-parallel over ``group`` (the same
    ``depth + 2`` layer list, so pipeline partitioning is unchanged)."""
    check_tp_shape(cfg, dist.get_world_size(group))
    layers = gpt_layers(cfg, seed=seed)
    out: list[nn.Module] = []
    for i, layer in enumerate(layers):
        if isinstance(layer, Block):
            layer = TPBlock(layer, codec_factory, group, base_seed=base_seed,
                            layer_id=TP_LAYER_ID_BASE + 4 * i)
        out.append(layer)
    return out


def tp_comms(module: nn.Module) -> list:
    """Every compressed TP collective's ``TPComm`` in ``module`` (in module order)."""
    return [c for m in module.modules() if isinstance(m, TPBlock) for c in m.comms()]


def replicated_parameters(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) of the parameters every TP rank holds whole, in module order."""
    return [(n, p) for n, p in module.named_parameters() if not getattr(p, "tensor_model_parallel", False)]


def new_tp_groups(world: int, tp: int):
    """Create the tensor-parallel process groups, each ``tp`` consecutive ranks (the innermost
    axis of pipeline x data x tensor, as DeepSpeed's ``PipeModelDataParallelTopology`` lays out
    its 'model' axis); returns this rank's group. Every rank must call it (``new_group`` is
    collective and must see every group in the same order)."""
    me, mine = dist.get_rank(), None
    for start in range(0, world, tp):
        g = dist.new_group(ranks=list(range(start, start + tp)))
        if start <= me < start + tp:
            mine = g
    return mine
