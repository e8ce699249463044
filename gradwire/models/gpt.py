"""A small GPT-style decoder as a flat list of layers, so pipeline engines can cut it anywhere.

Layers: ``Embedding`` (tokens -> hidden), ``depth`` x ``Block`` (pre-LayerNorm causal
self-attention + GELU MLP, residual), ``Head`` (LayerNorm + vocabulary projection). Every
boundary between two layers carries a float hidden state of shape [batch, seq, width]: the
tensor whose backward gradient gradwire compresses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 32
    seq_len: int = 32
    width: int = 64
    depth: int = 4
    heads: int = 4

    def __post_init__(self):
        for k in ("vocab", "seq_len", "width", "depth", "heads"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"GPTConfig.{k} must be a positive integer, got {v!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")


class Embedding(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab, cfg.width)
        self.pos = nn.Parameter(torch.zeros(cfg.seq_len, cfg.width))
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dtype != torch.long or tokens.dim() != 2:
            raise TypeError(f"tokens must be int64 [batch, seq], got {tokens.dtype} {tuple(tokens.shape)}")
        if tokens.shape[1] > self.pos.shape[0]:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds seq_len {self.pos.shape[0]}")
        return self.tok(tokens) + self.pos[: tokens.shape[1]]


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.ln1, self.ln2 = nn.LayerNorm(cfg.width), nn.LayerNorm(cfg.width)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.fc1 = nn.Linear(cfg.width, 4 * cfg.width)
        self.fc2 = nn.Linear(4 * cfg.width, cfg.width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return h + self.fc2(F.gelu(self.fc1(self.ln2(h))))


class Head(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln = nn.LayerNorm(cfg.width)
        self.out = nn.Linear(cfg.width, cfg.vocab)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(h))


def gpt_layers(cfg: GPTConfig, seed: int = 0) -> list[nn.Module]:
    """The decoder as a list of ``depth + 2`` modules, initialised from ``seed`` (identical on
    every rank, so each stage builds the same weights without a broadcast)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [Embedding(cfg)] + [Block(cfg) for _ in range(cfg.depth)] + [Head(cfg)]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy in nats."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def split_uniform(n_layers: int, n_stages: int) -> list[tuple[int, int]]:
    """[start, stop) layer ranges of ``n_stages`` contiguous stages, sizes differing by <= 1."""
    if not 1 <= n_stages <= n_layers:
        raise ValueError(f"cannot split {n_layers} layers into {n_stages} stages")
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        stop = start + base + (1 if s < extra else 0)
        out.append((start, stop))
        start = stop
    return out
