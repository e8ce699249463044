"""Greedy N:M activations for inference-style use (paper 004, Sec. 5): ReLU, then N:M.

After ReLU, keep the N largest values of every block of M consecutive elements along ``dim``
(``gradwire.numerics.nm.greedy_nm``). Greedy is biased, which is fine for activations (it
minimises the MSE of the block) but not for gradients (paper 004 Table 2): use MVUE there.
The backward passes the gradient through the kept, positive entries only, i.e. it is the exact
derivative of the function computed, with the (piecewise constant) selection held fixed.
"""
from __future__ import annotations

import torch
from torch import nn

from gradwire.numerics import nm

__all__ = ["nm_relu", "NMReLU"]


def nm_relu(x: torch.Tensor, n: int = 2, m: int = 4, *, dim: int = -1) -> torch.Tensor:
    """``relu(x)`` with only the n largest of each m-block along ``dim`` kept (others zero).

    ValueError when ``x.shape[dim]`` is not a multiple of m or n > m (from ``greedy_nm``).
    """
    r = torch.relu(x)
    keep = nm.greedy_nm(r.detach(), n, m, dim=dim) != 0
    return r * keep


class NMReLU(nn.Module):
    """Module form of ``nm_relu`` (e.g. to replace ``nn.ReLU`` in a deployed model)."""

    def __init__(self, n: int = 2, m: int = 4, dim: int = -1):
        super().__init__()
        if not 1 <= n <= m:
            raise ValueError(f"need 1 <= n <= m, got n={n}, m={m}")
        self.n, self.m, self.dim = n, m, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nm_relu(x, self.n, self.m, dim=self.dim)

    def extra_repr(self) -> str:
        return f"n={self.n}, m={self.m}, dim={self.dim}"
