"""N:M sparsification of neural gradients (MVUE, paper 004) and of activations (greedy).

This module is the semantic oracle that the N:M codec and the C++/CUDA kernels reproduce bit for
bit. All arithmetic is float32 (bf16/fp16 inputs upcast exactly); every random decision comes from
``rng.uniform(seed, counter)``.

Blocks and counters
-------------------
A block is M consecutive elements along ``dim``. Move ``dim`` last (``x.movedim(dim, -1)``), view
it as ``[..., n_blocks, M]``; the flat block index ``b`` is the block's row-major position there.
Every function takes ``offset`` (default 0) so that a chunk of a larger tensor can use its global
block counters: ``ctr = offset + b``. The compact form has exactly N slots per block:
``values`` float32 ``[..., n_blocks, N]`` and ``indices`` uint8 ``[..., n_blocks, N]`` (position in
the block, strictly ascending). Slots that carry nothing ("designated" slots) hold +0.0.

Notation per block: ``x[k]`` the float32 elements, ``A[k] = |x[k]|``, running sums
``c[0] = A[0]; c[k] = c[k-1] + A[k]`` (float32, left to right) and ``S = c[M-1]``.
``first(C, t)`` = the number of k with ``C[k] <= t`` (C is non-decreasing, so this is the first
k with ``C[k] > t``; it is M when there is none). "copysign(v, x)" is C's copysign.

Common rules, in precedence order
---------------------------------
1. Non-finite block (``S`` is NaN or Inf: a NaN/Inf element, or float32 overflow of the sum):
   pivot p = first index of a non-finite element, else (overflow) first index of the largest A.
   Slot value: ``x[p]`` if non-finite, else ``copysign(Inf, x[p])``; the other N-1 slots are the
   lowest indices != p with +0.0. So a NaN/Inf never decodes to a finite number (DESIGN.md).
2. All-zero block (``S == 0``): slots 0..N-1, values +0.0.

MVUE 1:2 (paper 004, Eq. 7)   ``u = uniform(seed, ctr)``
    S = A[0] + A[1]
    keep = 0 if (u * S < A[0]) or (A[1] == 0) else 1      # P(keep 0) = |a| / (|a| + |b|)
    value = copysign(S, x[keep])                          # variance 2|ab| per block

Exact MVUE 2:4 (paper 004, App. A.2 as corrected in NOTES-ON-SEEDS.md)   ``u = uniform(seed, ctr)``
    m  = first index of max(A)                  # ties: lowest index
    A' = A with A'[m] = 0;  c' its running sums; R = c'[3]   # sum of the other three, index order
    if A[m] > R:                                # regime "a4 > a1 + a2 + a3"
        k = first(c', u * R)                    # P(k) = A[k] / R, never m (A'[m] = 0)
        if R == 0: k = lowest index != m, value +0.0          # a single nonzero
        elif k == 4: k = highest index != m with A' > 0       # only by float32 rounding
        slots: (m, x[m]) kept as is, (k, copysign(R, x[k]))
    else:                                       # systematic sampling with q[k] = 2 A[k] / S <= 1
        C  = [2 c[0], 2 c[1], 2 c[2], 2 c[3]]   # unnormalised running sums of q (times S)
        t1 = u * S;  t2 = t1 + S
        i = first(C, t1);  j = first(C, t2)     # exact arithmetic: i < j, A[i] > 0, A[j] > 0
        if j == 4 or j == i: j = highest index != i with A > 0    # only by float32 rounding
        slots: (i, copysign(0.5 * S, x[i])), (j, copysign(0.5 * S, x[j]))
  The first crossing of a non-decreasing running sum lies on an element with A > 0 (its running
  sum grew), so kept slots never carry a zero; the fall-backs fire with probability O(2**-24).

Approx MVUE 2:4 (paper 004, Eq. 25)   ``u1 = uniform(seed, 2*ctr)``, ``u2 = uniform(seed, 2*ctr+1)``
    i = first(c, u1 * S);  if i == 4: i = highest index with A > 0
    A' = A with A'[i] = 0;  c' its running sums;  R = c'[3]
    j = first(c', u2 * R)
    if R == 0: j = lowest index != i, value +0.0;  elif j == 4: j = highest index != i, A' > 0
    D[l] = the four-term running sum of A with A[l] set to 0          # sum of the others of l
    r[l] = A[l] / D[l]
    W[k] = 1 + r[l1] + r[l2] + r[l3]    # l1 < l2 < l3 the indices != k, added left to right
    value[k] = copysign(S / W[k], x[k])   for k in (i, j) with A[k] > 0
  because the inclusion probability of Eq. 25, p[k] = q[k] + sum_{l != k} q[l] A[k] / D[l] with
  q = A / S, equals A[k] W[k] / S, so x[k] / p[k] = sign(x[k]) S / W[k] (no 0/0, one division).

Greedy N:M (activations only, biased): keep the n largest A per block, ties to the lowest index
(NaN ranks as +Inf), values x[k] as they are (no non-finite rule needed: nothing is rescaled).

Closed forms (float64, for tests and analysis): ``mvue_12_variance``, ``mvue_24_exact_variance``,
``mvue_24_approx_variance``, ``mvue_24_approx_inclusion`` (Eq. 10-11, 25).

Dense wrappers (``mvue_12`` ...) scatter the slots into zeros of x's shape and cast to x.dtype
(for bf16/fp16 that cast rounds the kept values, so unbiasedness then holds up to that rounding;
the compact float32 form is exact).
"""
from __future__ import annotations

import torch

from gradwire.numerics import rng

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INF = float("inf")


# ---------------------------------------------------------------------------------------------
# Blocks, counters, compact <-> dense
# ---------------------------------------------------------------------------------------------
def _check_int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return v


def _as_blocks(x: torch.Tensor, m: int, dim: int) -> torch.Tensor:
    """float32 ``[..., n_blocks, m]`` view of x with ``dim`` moved last (validated)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension to form N:M blocks, got a 0-d tensor")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim!r} is out of range for a {x.dim()}-d tensor")
    if x.shape[dim] % m != 0:
        raise ValueError(
            f"N:M blocks of M={m} need x.shape[dim] divisible by {m}; got shape {tuple(x.shape)}, "
            f"dim={dim} (size {x.shape[dim]})"
        )
    xm = x.detach().movedim(dim, -1).to(torch.float32).contiguous()
    return xm.reshape(*xm.shape[:-1], xm.shape[-1] // m, m)


def _random_blocks_of(x: torch.Tensor, m: int, dim: int, seed: int, offset: int) -> torch.Tensor:
    """``_as_blocks`` plus the checks every randomised scheme needs (seed, offset >= 0)."""
    xb = _as_blocks(x, m, dim)
    rng.check_seed(seed)
    _check_int("offset", offset, 0)
    return xb


def _counters(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    n_blocks = blocks.numel() // blocks.shape[-1]
    return torch.arange(offset, offset + n_blocks, dtype=torch.int64, device=blocks.device)


def _running(a: torch.Tensor) -> torch.Tensor:
    """Left-to-right float32 running sums along the last dim (explicit order: torch.cumsum's
    order is not specified, and the kernels must match bit for bit)."""
    cols = [a[..., 0]]
    for k in range(1, a.shape[-1]):
        cols.append(cols[-1] + a[..., k])
    return torch.stack(cols, dim=-1)


def _first(c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Number of running sums <= t (= first index whose running sum exceeds t)."""
    return (c <= t.unsqueeze(-1)).sum(-1)


def _highest_positive(a: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """Highest index k != exclude with a[k] > 0 (a fall-back; callers guarantee one exists)."""
    m = a.shape[-1]
    ar = torch.arange(m, device=a.device)
    ok = (a > 0) & (ar != exclude.unsqueeze(-1))
    return torch.where(ok, ar, -1).amax(-1).clamp_min(0)


def _lowest_other(p: torch.Tensor) -> torch.Tensor:
    return (p == 0).to(torch.int64)  # 1 if p is 0, else 0


def _pair(i, vi, j, vj):
    """Two slots sorted by index -> (values [..., 2], indices uint8 [..., 2])."""
    swap = i > j
    lo, hi = torch.where(swap, j, i), torch.where(swap, i, j)
    vlo, vhi = torch.where(swap, vj, vi), torch.where(swap, vi, vj)
    return torch.stack([vlo, vhi], -1), torch.stack([lo, hi], -1).to(torch.uint8)


def _gather(a: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return a.gather(-1, k.unsqueeze(-1)).squeeze(-1)


def _special_blocks(xb, s, values, indices, n):
    """Apply common rules 1 (non-finite) and 2 (all-zero) of the module docstring."""
    a = xb.abs()
    bad = ~torch.isfinite(s)
    zero = s == 0
    if not (bad.any() or zero.any()):
        return values, indices.to(torch.uint8)
    m = xb.shape[-1]
    pivot = torch.where(torch.isfinite(xb), a, _INF).argmax(-1)  # first non-finite, else first max
    xp = _gather(xb, pivot)
    vp = torch.where(torch.isfinite(xp), torch.copysign(torch.full_like(xp, _INF), xp), xp)
    # slots: pivot plus the lowest n-1 other indices, ascending
    ar = torch.arange(m, device=xb.device).expand(xb.shape)
    order = torch.sort(torch.where(ar == pivot.unsqueeze(-1), -1, ar), dim=-1).values[..., :n]
    bad_idx = torch.sort(torch.where(order == -1, pivot.unsqueeze(-1), order), dim=-1).values
    bad_val = torch.where(bad_idx == pivot.unsqueeze(-1), vp.unsqueeze(-1), 0.0)
    zero_idx = torch.arange(n, device=xb.device).expand(indices.shape)
    values = torch.where(bad.unsqueeze(-1), bad_val, torch.where(zero.unsqueeze(-1), 0.0, values))
    idx = torch.where(bad.unsqueeze(-1), bad_idx, torch.where(zero.unsqueeze(-1), zero_idx, indices.long()))
    return values, idx.to(torch.uint8)


def scatter_blocks(values, indices, m, shape, dim=-1, dtype=torch.float32) -> torch.Tensor:
    """Dense tensor of ``shape`` (``dtype``) from the compact form; dropped positions are zero."""
    shape = tuple(shape)
    if values.dtype != torch.float32 or indices.dtype != torch.uint8 or values.shape != indices.shape:
        raise TypeError("values must be float32 and indices uint8, with the same shape")
    if not shape or not -len(shape) <= dim < len(shape) or shape[dim] % m:
        raise ValueError(f"shape {shape} with dim={dim} cannot hold blocks of {m}")
    moved = shape[:dim % len(shape)] + shape[dim % len(shape) + 1:] + (shape[dim],)
    nb_shape = moved[:-1] + (shape[dim] // m,)
    if tuple(values.shape[:-1]) != nb_shape:
        raise ValueError(f"compact shape {tuple(values.shape)} does not match blocks {nb_shape}")
    if indices.numel() and int(indices.max()) >= m:
        raise ValueError(f"block index out of range for M={m}")
    dense = torch.zeros(nb_shape + (m,), dtype=torch.float32, device=values.device)
    dense.scatter_(-1, indices.long(), values)
    return dense.reshape(moved).movedim(-1, dim).to(dtype).contiguous()


def _dense(select, x, m, dim, **kw):
    values, indices = select(x, dim=dim, **kw)
    return scatter_blocks(values, indices, m, x.shape, dim, x.dtype)


# ---------------------------------------------------------------------------------------------
# MVUE 1:2 (Eq. 7)
# ---------------------------------------------------------------------------------------------
def mvue_12_select(x: torch.Tensor, *, dim: int = -1, seed: int = 0, offset: int = 0):
    """MVUE 1:2 compact form ``(values [..., nb, 1] float32, indices [..., nb, 1] uint8)``."""
    xb = _random_blocks_of(x, 2, dim, seed, offset)
    a = xb.abs()
    s = a[..., 0] + a[..., 1]
    u = rng.uniform(seed, _counters(xb, offset)).reshape(s.shape)
    keep = ((u * s < a[..., 0]) | (a[..., 1] == 0)).logical_not().to(torch.int64)
    v = torch.copysign(s, _gather(xb, keep))
    return _special_blocks(xb, s, v.unsqueeze(-1), keep.unsqueeze(-1), 1)


def mvue_12(x: torch.Tensor, *, dim: int = -1, seed: int = 0, offset: int = 0) -> torch.Tensor:
    """Dense MVUE 1:2 (Eq. 7) of x: shape and dtype of x, one nonzero per pair."""
    return _dense(mvue_12_select, x, 2, dim, seed=seed, offset=offset)


# ---------------------------------------------------------------------------------------------
# Exact MVUE 2:4 (App. A.2, corrected)
# ---------------------------------------------------------------------------------------------
def mvue_24_exact_select(x: torch.Tensor, *, dim: int = -1, seed: int = 0, offset: int = 0):
    """Exact MVUE 2:4 compact form ``(values [..., nb, 2], indices [..., nb, 2])``."""
    xb = _random_blocks_of(x, 4, dim, seed, offset)
    a = xb.abs()
    c = _running(a)
    s = c[..., 3]
    u = rng.uniform(seed, _counters(xb, offset)).reshape(s.shape)
    m = a.argmax(-1)
    a_oth = a.scatter(-1, m.unsqueeze(-1), 0.0)
    c_oth = _running(a_oth)
    r = c_oth[..., 3]

    # Regime a4 > a1 + a2 + a3: keep the max as is plus one other with probability A[k] / R.
    k = _first(c_oth, u * r)
    k = torch.where(k == 4, _highest_positive(a_oth, m), k)
    k = torch.where(r == 0, _lowest_other(m), k)
    vk = torch.where(r == 0, 0.0, torch.copysign(r, _gather(xb, k.clamp_max(3))))
    v2, i2 = _pair(m, _gather(xb, m), k, vk)

    # Regime a4 <= a1 + a2 + a3: systematic sampling of two distinct indices, q = 2 A / S.
    cc = 2.0 * c
    t1 = u * s
    i = _first(cc, t1).clamp_max(3)  # never 4 for S > 0: 2S > u S
    j = _first(cc, t1 + s)
    j = torch.where((j == 4) | (j == i), _highest_positive(a, i), j)
    half = 0.5 * s
    v1, i1 = _pair(i, torch.copysign(half, _gather(xb, i)), j, torch.copysign(half, _gather(xb, j)))

    reg2 = (_gather(a, m) > r).unsqueeze(-1)
    return _special_blocks(xb, s, torch.where(reg2, v2, v1), torch.where(reg2, i2, i1), 2)


def mvue_24_exact(x: torch.Tensor, *, dim: int = -1, seed: int = 0, offset: int = 0) -> torch.Tensor:
    """Dense exact MVUE 2:4 of x: shape and dtype of x, two slots per block of 4."""
    return _dense(mvue_24_exact_select, x, 4, dim, seed=seed, offset=offset)


# ---------------------------------------------------------------------------------------------
# Approx MVUE 2:4 (Eq. 25)
# ---------------------------------------------------------------------------------------------
def _approx_weights(a: torch.Tensor) -> torch.Tensor:
    """W[k] = 1 + sum_{l != k} A[l] / D[l] in the documented float32 order (nonzero blocks)."""
    d = torch.stack([_running(a.index_fill(-1, torch.tensor([l], device=a.device), 0.0))[..., 3]
                     for l in range(4)], -1)
    r = a / d
    w = []
    for k in range(4):
        acc = torch.ones_like(a[..., 0])
        for l in range(4):
            if l != k:
                acc = acc + r[..., l]
        w.append(acc)
    return torch.stack(w, -1)


def mvue_24_approx_select(x: torch.Tensor, *, dim: int = -1, seed: int = 0, offset: int = 0):
    """Approx MVUE 2:4 (Eq. 25) compact form ``(values [..., nb, 2], indices [..., nb, 2])``."""
    xb = _random_blocks_of(x, 4, dim, seed, offset)
    a = xb.abs()
    c = _running(a)
    s = c[..., 3]
    ctr = _counters(xb, offset)
    u1 = rng.uniform(seed, 2 * ctr).reshape(s.shape)
    u2 = rng.uniform(seed, 2 * ctr + 1).reshape(s.shape)
    none = torch.full_like(s, -1, dtype=torch.int64)

    i = _first(c, u1 * s)
    i = torch.where(i == 4, _highest_positive(a, none), i)
    a_oth = a.scatter(-1, i.clamp_max(3).unsqueeze(-1), 0.0)
    c_oth = _running(a_oth)
    r = c_oth[..., 3]
    j = _first(c_oth, u2 * r)
    j = torch.where(j == 4, _highest_positive(a_oth, i), j)
    j = torch.where(r == 0, _lowest_other(i), j)

    w = _approx_weights(a)
    vi = torch.copysign(s / _gather(w, i), _gather(xb, i))
    vj = torch.where(r == 0, 0.0, torch.copysign(s / _gather(w, j), _gather(xb, j)))
    v, idx = _pair(i, vi, j, vj)
    return _special_blocks(xb, s, v, idx, 2)


def mvue_24_approx(x: torch.Tensor, *, dim: int = -1, seed: int = 0, offset: int = 0) -> torch.Tensor:
    """Dense approx MVUE 2:4 (Eq. 25) of x: shape and dtype of x."""
    return _dense(mvue_24_approx_select, x, 4, dim, seed=seed, offset=offset)


# ---------------------------------------------------------------------------------------------
# Greedy N:M (activations)
# ---------------------------------------------------------------------------------------------
def greedy_nm_select(x: torch.Tensor, n: int, m: int, *, dim: int = -1):
    """Keep the n largest |x| of each block of m (ties: lowest index; NaN ranks highest)."""
    _check_int("m", m, 1)
    _check_int("n", n, 1)
    if n > m or m > 256:
        raise ValueError(f"need 1 <= n <= m <= 256 for N:M, got n={n}, m={m}")
    xb = _as_blocks(x, m, dim)
    key = torch.where(torch.isnan(xb), _INF, xb.abs())
    top = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :n]
    idx = torch.sort(top, dim=-1).values
    return xb.gather(-1, idx), idx.to(torch.uint8)


def greedy_nm(x: torch.Tensor, n: int, m: int, *, dim: int = -1) -> torch.Tensor:
    """Dense greedy N:M of x (biased: for activations, never for gradients)."""
    values, indices = greedy_nm_select(x, n, m, dim=dim)
    return scatter_blocks(values, indices, m, x.shape, dim, x.dtype)


# ---------------------------------------------------------------------------------------------
# Closed-form variances (float64), Eq. 10-11 of paper 004
# ---------------------------------------------------------------------------------------------
def _check_block_abs(block_abs: torch.Tensor, m: int) -> torch.Tensor:
    if not isinstance(block_abs, torch.Tensor) or not block_abs.is_floating_point():
        raise TypeError("block_abs must be a floating-point tensor")
    if block_abs.dim() == 0 or block_abs.shape[-1] != m:
        raise ValueError(f"block_abs must have last dim {m}, got shape {tuple(block_abs.shape)}")
    a = block_abs.to(torch.float64)
    if not torch.isfinite(a).all() or (a < 0).any():
        raise ValueError("block_abs must be finite and non-negative")
    return a


def mvue_12_variance(block_abs: torch.Tensor) -> torch.Tensor:
    """Total variance of MVUE 1:2 per block ``[..., 2]``: 2 |a| |b| (paper 004, Sec. 4.1)."""
    a = _check_block_abs(block_abs, 2)
    return 2.0 * a[..., 0] * a[..., 1]


def _others_sums(a: torch.Tensor):
    """D[l] = sum_{j != l} A[j] and E[l, k] = sum_{j not in {l, k}} A[j], formed directly.

    Differences such as S - A[l] cancel catastrophically for blocks like [1e-11, 1e-11, 1e-11, 1],
    where the variances are O(1e-22) and must still be accurate (the ratio scan divides them).
    """
    eye = torch.eye(4, dtype=torch.float64, device=a.device)
    off = 1.0 - eye
    mask3 = off[:, :, None] * off[:, None, :]  # [j, l, k] = [j != l][j != k]
    return a @ off, torch.einsum("...j,jlk->...lk", a, mask3)


def mvue_24_exact_variance(block_abs: torch.Tensor) -> torch.Tensor:
    """Total variance sum_k A^2/p - A^2 of exact MVUE 2:4 per block ``[..., 4]`` (float64).

    If max <= R = S - max: p = 2A/S, variance sum_k A_k (D_k - A_k) / 2 (= S^2/2 - sum A^2).
    Else p = 1 for the max m and A_k/R for the others: sum_{k != m} A_k (R - A_k)
    (= R^2 - sum_{k != m} A_k^2). D_k and R - A_k are sums of the other elements, formed directly.
    """
    a = _check_block_abs(block_abs, 4)
    d, e = _others_sums(a)
    m = a.argmax(-1, keepdim=True)
    mx, r = a.gather(-1, m).squeeze(-1), d.gather(-1, m).squeeze(-1)
    reg1 = (a * (d - a)).sum(-1) * 0.5
    r_minus = e.gather(-2, m.unsqueeze(-1).expand(*m.shape[:-1], 1, 4)).squeeze(-2)  # E[m, k]
    reg2 = (a * r_minus).scatter(-1, m, 0.0).sum(-1)
    return torch.where(mx > r, reg2, reg1)


def mvue_24_approx_inclusion(block_abs: torch.Tensor) -> torch.Tensor:
    """Inclusion probabilities p_k of approx MVUE 2:4, Eq. 25 (float64, 0 for A = 0):
    p_k = q_k + A_k sum_{l != k} q_l / D_l with q = A/S and D_l = S - A_l."""
    a = _check_block_abs(block_abs, 4)
    return torch.where(a > 0, 1.0 - _approx_exclusion(a), 0.0)


def _approx_exclusion(a: torch.Tensor) -> torch.Tensor:
    """1 - p_k = sum_{l != k} q_l (D_l - A_k) / D_l (since sum q = 1): no cancellation."""
    s = a.sum(-1, keepdim=True)
    d, e = _others_sums(a)
    q = torch.where(s > 0, a / s.clamp_min(1e-300), 0.0)
    # E[l, k] = D_l - A_k; terms with D_l = 0 (all mass on l) contribute 0 (then A_k = 0 too).
    frac = torch.where(d.unsqueeze(-1) > 0, e / d.unsqueeze(-1).clamp_min(1e-300), 0.0)
    off = 1.0 - torch.eye(4, dtype=torch.float64, device=a.device)
    return (q.unsqueeze(-1) * frac * off).sum(-2)


def mvue_24_approx_variance(block_abs: torch.Tensor) -> torch.Tensor:
    """Total variance sum_k A^2/p - A^2 = sum_k A^2 (1 - p_k) / p_k of approx MVUE 2:4 per block,
    p from Eq. 25 (float64; 1 - p_k formed without cancellation, see ``_approx_exclusion``)."""
    a = _check_block_abs(block_abs, 4)
    ex = _approx_exclusion(a)
    p = 1.0 - ex
    return torch.where(a > 0, a * a * ex / p.clamp_min(1e-300), 0.0).sum(-1)
