"""Transposable N:M weight masks and the all-GEMMs-sparse training layer of paper 004.

A training step of a linear layer has three GEMMs (paper 004, Sec. 1):
  forward   y  = x W^T       reduces over ``in``:  W must be N:M along rows
  backward  dx = dy W        reduces over ``out``: W must be N:M along columns
  update    dW = dy^T x      reduces over the batch: dy must be N:M along the batch
A *transposable* mask (Hubara et al. 2021) is N:M along rows and columns of every MxM block, so
the same sparse W serves the first two; MVUE N:M of the neural gradient (paper 004 Eq. 7, 25,
App. A.2; ``gradwire.numerics.nm``) serves the third without biasing the weight gradient.

Masks:
- ``transposable_mask_greedy``: visit a block's entries by descending |w|, accept while the row
  and the column each hold fewer than N (the 2-approximation of Hubara et al.), then complete
  the blocks where that ends short (it can) with alternating swaps.
- ``transposable_mask_exact``: the maximum kept magnitude, i.e. the min-cost flow / maximum
  weight b-matching. For M <= 4 by enumerating every valid pattern (90 for 2:4), otherwise by
  the transportation LP (its polytope is integral, so the LP optimum is a 0/1 mask).
"""
from __future__ import annotations

import itertools
from functools import lru_cache

import torch
from torch import nn

from gradwire.numerics import nm, rng

__all__ = ["transposable_mask_greedy", "transposable_mask_exact", "is_transposable_nm",
           "kept_magnitude", "nm_sparse_linear", "TransposableNMLinear", "GRAD_NM"]

GRAD_NM = {"mvue12": (nm.mvue_12, 2), "mvue24": (nm.mvue_24_exact, 4),
           "mvue24_approx": (nm.mvue_24_approx, 4)}


def _check(w: torch.Tensor, n: int, m: int) -> None:
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(w.shape)}")
    if not 1 <= n <= m:
        raise ValueError(f"need 1 <= n <= m, got n={n}, m={m}")
    if w.shape[0] % m or w.shape[1] % m:
        raise ValueError(f"both weight dims must be multiples of m={m}, got {tuple(w.shape)}")
    if w.is_floating_point() and not bool(torch.isfinite(w).all()):
        raise ValueError("weight has non-finite entries")


def _blocks(w: torch.Tensor, m: int) -> torch.Tensor:
    """[out, in] -> [n_blocks, m*m], each row an MxM block in row-major order."""
    o, i = w.shape
    return w.reshape(o // m, m, i // m, m).permute(0, 2, 1, 3).reshape(-1, m * m)


def _unblocks(b: torch.Tensor, shape, m: int) -> torch.Tensor:
    o, i = shape
    return b.reshape(o // m, i // m, m, m).permute(0, 2, 1, 3).reshape(o, i)


def transposable_mask_greedy(w: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Greedy transposable N:M mask (bool, shape of w): exactly n per row and column per block.

    Pass 1 (Hubara et al. 2021): visit each block's entries by descending |w| (ties: lowest
    index), accept while the row and the column each hold fewer than n. This maximal b-matching
    keeps at least 1/2 of the optimal magnitude, but it can end short: a row r and a column c
    each hold n-1 with (r, c) already taken (measured: ~16% of 2:4 blocks of Gaussian weights).
    Pass 2 completes such blocks with the best alternating swap: drop a kept (r', c'), take
    (r, c') and (r', c), which fills row r and column c and leaves r', c' full. See
    ``_complete``; blocks it cannot complete fall back to the exact mask.
    """
    _check(w, n, m)
    a = _blocks(w.detach().abs().to(torch.float64).cpu(), m)
    nb = a.shape[0]
    order = torch.sort(a, dim=1, descending=True, stable=True).indices
    row_cnt = torch.zeros(nb, m, dtype=torch.int64)
    col_cnt = torch.zeros(nb, m, dtype=torch.int64)
    mask = torch.zeros(nb, m * m, dtype=torch.bool)
    for step in range(m * m):  # m*m Python steps, each vectorised over all blocks
        idx = order[:, step:step + 1]
        r, c = idx // m, idx % m
        ok = (row_cnt.gather(1, r) < n) & (col_cnt.gather(1, c) < n)
        mask.scatter_(1, idx, ok)  # each entry is visited once: assignment is enough
        row_cnt.scatter_add_(1, r, ok.long())
        col_cnt.scatter_add_(1, c, ok.long())
    mask = _complete(a, mask.reshape(nb, m, m), n, m).reshape(nb, m * m)
    return _unblocks(mask, w.shape, m).to(w.device)


def _complete(a: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Fill blocks whose rows/columns hold fewer than n by best-gain alternating swaps."""
    a = a.reshape(-1, m, m)
    for _ in range(n * m):
        short = (mask.sum(2) < n).any(1)
        if not bool(short.any()):
            return mask
        idx = short.nonzero(as_tuple=True)[0]
        mk, ab = mask[idx], a[idx]
        k = idx.numel()
        ar = torch.arange(k)
        r = torch.argmax((mk.sum(2) < n).to(torch.int8), dim=1)   # a short row
        c = torch.argmax((mk.sum(1) < n).to(torch.int8), dim=1)   # a short column
        direct = ~mk[ar, r, c]
        # Swap candidates (r', c'): kept, with (r, c') and (r', c) free; r' != r, c' != c.
        free_rc = ~mk[ar, r, :]                       # [k, m] over c'
        free_cr = ~mk[ar, :, c]                       # [k, m] over r'
        ok = mk & free_cr[:, :, None] & free_rc[:, None, :]
        ok[ar, r, :] = False
        ok[ar, :, c] = False
        gain = ab[ar, r, :][:, None, :] + ab[ar, :, c][:, :, None] - ab
        gain = torch.where(ok, gain, torch.tensor(-float("inf"), dtype=gain.dtype))
        best = torch.argmax(gain.reshape(k, -1), dim=1)
        has = torch.isfinite(gain.reshape(k, -1)[ar, best])
        rp, cp = best // m, best % m
        sw = has & ~direct
        mk[ar[direct], r[direct], c[direct]] = True
        mk[ar[sw], rp[sw], cp[sw]] = False
        mk[ar[sw], r[sw], cp[sw]] = True
        mk[ar[sw], rp[sw], c[sw]] = True
        stuck = ~direct & ~has
        if bool(stuck.any()):
            ex = _exact_blocks(ab[stuck].reshape(-1, m * m), n, m).reshape(-1, m, m)
            mk[stuck] = ex
        mask[idx] = mk
    return mask


@lru_cache(maxsize=None)
def _patterns(n: int, m: int) -> torch.Tensor:
    """Every m x m 0/1 matrix with n ones in each row and each column, as [K, m*m] float64."""
    rows = [sum(1 << j for j in comb) for comb in itertools.combinations(range(m), n)]
    out = []
    for choice in itertools.product(rows, repeat=m):
        if all(sum((r >> j) & 1 for r in choice) == n for j in range(m)):
            out.append([(r >> j) & 1 for r in choice for j in range(m)])
    return torch.tensor(out, dtype=torch.float64)


def _exact_lp(block: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Maximum-weight b-matching of one block by the transportation LP (integral polytope)."""
    from scipy.optimize import linprog
    a_eq = torch.zeros(2 * m, m * m, dtype=torch.float64)
    for k in range(m):
        a_eq[k, k * m:(k + 1) * m] = 1      # row k holds n
        a_eq[m + k, k::m] = 1               # column k holds n
    res = linprog(-block.numpy(), A_eq=a_eq.numpy(), b_eq=[n] * (2 * m), bounds=(0, 1),
                  method="highs")
    if res.status != 0:
        raise RuntimeError(f"transportation LP failed: {res.message}")
    return torch.from_numpy(res.x) > 0.5


def transposable_mask_exact(w: torch.Tensor, n: int = 2, m: int = 4,
                            chunk: int = 1 << 16) -> torch.Tensor:
    """Optimal transposable N:M mask: maximum kept sum |w| in each MxM block."""
    _check(w, n, m)
    a = _blocks(w.detach().abs().to(torch.float64).cpu(), m)
    return _unblocks(_exact_blocks(a, n, m, chunk), w.shape, m).to(w.device)


def _exact_blocks(a: torch.Tensor, n: int, m: int, chunk: int = 1 << 16) -> torch.Tensor:
    """Optimal masks of blocks ``a`` [n_blocks, m*m] (|w|, float64) as bool [n_blocks, m*m]."""
    if a.shape[0] == 0:
        return torch.zeros(a.shape, dtype=torch.bool)
    if m <= 4:
        pats = _patterns(n, m)
        best = torch.cat([torch.argmax(a[s:s + chunk] @ pats.t(), dim=1)
                          for s in range(0, a.shape[0], chunk)])
        return pats[best] > 0.5
    return torch.stack([_exact_lp(blk, n, m) for blk in a])


def is_transposable_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """True when every row and every column of every MxM block holds exactly n kept entries."""
    _check(mask, n, m)
    b = _blocks(mask.to(torch.int64), m).reshape(-1, m, m)
    return bool((b.sum(2) == n).all() and (b.sum(1) == n).all())


def kept_magnitude(w: torch.Tensor, mask: torch.Tensor) -> float:
    """Sum of |w| kept by the mask (the objective both mask finders maximise)."""
    return float((w.detach().abs().to(torch.float64) * mask).sum())


class _NMSparseLinearFn(torch.autograd.Function):
    """All three GEMMs N:M sparse: masked W forward and backward, MVUE N:M dy in the update."""

    @staticmethod
    def forward(ctx, x, weight, mask, bias, grad_nm, seed, grad_dim):
        w_s = weight * mask
        ctx.save_for_backward(x, w_s)
        ctx.cfg = (grad_nm, seed, grad_dim, bias is not None)
        return nn.functional.linear(x, w_s, bias)

    @staticmethod
    def backward(ctx, dy):
        x, w_s = ctx.saved_tensors
        grad_nm, seed, grad_dim, has_bias = ctx.cfg
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = dy @ w_s                       # transposable mask: w_s^T is N:M as well
        if ctx.needs_input_grad[1]:
            fn, _ = GRAD_NM[grad_nm]
            dy_s = fn(dy, dim=grad_dim, seed=seed)  # unbiased: E[dy_s] = dy
            gw = dy_s.t() @ x
        if has_bias and ctx.needs_input_grad[3]:
            gb = dy.sum(0)  # a reduction, not a GEMM: kept exact
        return gx, gw, None, gb, None, None, None


def nm_sparse_linear(x, weight, mask, bias=None, *, grad_nm="mvue24", seed=0, grad_dim=0):
    """``linear(x, weight * mask, bias)`` whose weight gradient uses an MVUE N:M ``dy``.

    x is [B, in]; ``grad_dim=0`` puts the N:M blocks along the batch, the reduction dimension
    of the update GEMM dW = dy^T x (so B must be a multiple of M). The weight gradient is dense
    (straight-through to the pruned weights too), so a mask recomputed from |W| can change.
    """
    if grad_nm not in GRAD_NM:
        raise ValueError(f"grad_nm must be one of {sorted(GRAD_NM)}, got {grad_nm!r}")
    if x.dim() != 2:
        raise ValueError(f"x must be [batch, in], got shape {tuple(x.shape)}")
    m = GRAD_NM[grad_nm][1]
    if x.shape[grad_dim] % m:
        raise ValueError(f"dim {grad_dim} of x ({x.shape[grad_dim]}) must be a multiple of {m}")
    rng.check_seed(seed)
    return _NMSparseLinearFn.apply(x, weight, mask.to(weight.dtype), bias, grad_nm, seed,
                                   grad_dim)


class TransposableNMLinear(nn.Linear):
    """Linear layer trained with transposable N:M weights and MVUE N:M neural gradients.

    The paper 004 Table 3 configuration (transposable 2:4 weights + MVUE 1:2 or approx 2:4
    gradients). The mask is recomputed from |W| every ``mask_every`` training forwards; each
    training forward draws a fresh seed ``derive_seed(seed, step)`` for the gradient sampling.
    """

    def __init__(self, in_features, out_features, bias=True, *, n=2, m=4, grad_nm="mvue24",
                 exact_mask=False, mask_every=100, seed=0, **kw):
        super().__init__(in_features, out_features, bias=bias, **kw)
        if out_features % m or in_features % m:
            raise ValueError(f"in and out features must be multiples of m={m}")
        if grad_nm not in GRAD_NM:
            raise ValueError(f"grad_nm must be one of {sorted(GRAD_NM)}, got {grad_nm!r}")
        self.n, self.m, self.grad_nm, self.exact_mask = n, m, grad_nm, exact_mask
        self.mask_every, self.seed, self.step = int(mask_every), rng.check_seed(seed), 0
        self.register_buffer("mask", torch.ones_like(self.weight, dtype=torch.bool))
        self.update_mask()

    @torch.no_grad()
    def update_mask(self) -> None:
        find = transposable_mask_exact if self.exact_mask else transposable_mask_greedy
        self.mask = find(self.weight, self.n, self.m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return nn.functional.linear(x, self.weight * self.mask, self.bias)
        if self.step and self.step % self.mask_every == 0:
            self.update_mask()
        seed = rng.derive_seed(self.seed, self.step)
        self.step += 1
        lead = x.shape[:-1]
        y = nm_sparse_linear(x.reshape(-1, self.in_features), self.weight, self.mask, self.bias,
                             grad_nm=self.grad_nm, seed=seed)
        return y.reshape(*lead, self.out_features)
