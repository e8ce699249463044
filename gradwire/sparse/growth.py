"""Sampling for dynamic sparse training: sparse initialisation and grow-candidate subsets.

Every random decision draws from ``gradwire.numerics.rng`` (counter-based), so a topology is a
pure function of (seed, inputs) and the sparse and masked-dense layouts agree bit for bit.
Nothing here builds a dense ``[out, in]`` tensor: connections are (row, col) index pairs and
sampling works on the two unit marginals (paper 003, Sec. 3: "the probability of sampling each
connection is never explicitly represented, only the probability of sampling each unit").
"""
from __future__ import annotations

import math

import torch

from gradwire.numerics import rng

# Random draws are generated this many at a time: the hash makes several int64 temporaries
# per draw, which for 1e7+ draws at once would dominate peak memory.
_CHUNK = 1 << 20
# Most draws one rejection round of sample_inactive_subset makes (bounds its peak memory).
_ROUND_CAP = 1 << 24

__all__ = ["uniform64", "sample_units", "sample_pairs", "sample_inactive_subset",
           "erdos_renyi_topology", "fan_in_normal_init", "layer_densities", "cosine_prune_fraction",
           "first_occurrence_unique", "invert_cdf"]


def uniform64(seed: int, n: int, offset: int = 0, device=None) -> torch.Tensor:
    """n float64 uniforms in [0, 1) with 48 random bits (two 24-bit draws per value).

    24 bits are too coarse for inverse-CDF sampling over 1e5+ units (a unit of probability
    1e-5 would be quantised to multiples of 6e-8); 48 bits make the quantisation negligible.
    """
    out = torch.empty(n, dtype=torch.float64, device=device)
    for s in range(0, n, _CHUNK):  # chunks bound the hash's int64 temporaries
        k = min(_CHUNK, n - s)
        idx = torch.arange(2 * (offset + s), 2 * (offset + s + k), dtype=torch.int64,
                           device=device)
        u = (rng.random_u32(seed, idx) >> 8).to(torch.float64).reshape(k, 2)
        out[s:s + k] = (u[:, 0] + u[:, 1] * 2.0**-24) * 2.0**-24
    return out


def sample_units(weights: torch.Tensor, n: int, seed: int, offset: int = 0) -> torch.Tensor:
    """n i.i.d. unit indices with P(i) = weights[i] / sum(weights), by inverse CDF.

    Zero-weight units are never drawn (their CDF interval is empty). ValueError when the
    weights are negative, non-finite or all zero.
    """
    w = weights.detach().to(torch.float64).reshape(-1)
    if w.numel() == 0 or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("unit weights must be finite, non-negative and non-empty")
    total = w.sum()
    if not total > 0:
        raise ValueError("unit weights are all zero")
    cdf = torch.cumsum(w, 0) / total
    u = uniform64(seed, n, offset, device=w.device)
    return invert_cdf(cdf, u).clamp_(max=w.numel() - 1)


def invert_cdf(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``torch.searchsorted(cdf, u, right=True)``, bit for bit, via a guide table.

    A binary search per draw over 1e5 units is ~17 cache-missing probes; with 1e7+ draws it
    dominated the grow step. The table holds the answer at the K + 1 grid points j / K (K a
    power of two, so ``floor(u * K)`` and j / K are exact in float64). The answer is monotone
    in u, so a draw in [b / K, (b + 1) / K) whose two grid answers agree has that answer;
    only draws in cells holding a CDF step (at most len(cdf) of the K cells, so a fraction
    below len(cdf) / K of the mass) fall back to the binary search.
    """
    k_bits = max(10, min(22, (8 * cdf.numel()).bit_length()))
    k = 1 << k_bits
    if u.numel() < k:  # the table would cost more than it saves
        return torch.searchsorted(cdf, u, right=True)
    grid = torch.arange(k + 1, dtype=torch.float64, device=u.device) * (1.0 / k)
    guide = torch.searchsorted(cdf, grid, right=True)
    # One gather per draw: a cell's answer, or -1 where its two grid answers differ.
    table = torch.where(guide[1:] == guide[:-1], guide[:-1], -1)
    # floor (u >= 0); the clamp only matters for u == 1, which the answer's monotonicity
    # still covers (its cell [1 - 1/K, 1] ends at grid point K).
    idx = table[(u * k).to(torch.int64).clamp_(max=k - 1)]
    amb = (idx < 0).nonzero().squeeze(1)
    idx[amb] = torch.searchsorted(cdf, u[amb], right=True)
    return idx


def sample_pairs(f: torch.Tensor, g: torch.Tensor, n: int, seed: int,
                 offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n (row, col) pairs with row ~ g (output units) and col ~ f (input units) independent.

    This is paper 003 Eq. 1 / 3 / 7: the joint law is f[col] * g[row]. Rows use even draw
    offsets, columns odd ones, so the two streams never share counters.
    """
    rows = sample_units(g, n, rng.derive_seed(seed, 0), offset)
    cols = sample_units(f, n, rng.derive_seed(seed, 1), offset)
    return rows, cols


def first_occurrence_unique(lin: torch.Tensor) -> torch.Tensor:
    """Distinct values of ``lin`` in order of first appearance (so truncation stays random)."""
    if lin.numel() == 0:
        return lin
    uniq, inv = torch.unique(lin, return_inverse=True)
    pos = torch.arange(lin.numel(), device=lin.device)
    first = torch.full((uniq.numel(),), lin.numel(), dtype=torch.int64, device=lin.device)
    first.scatter_reduce_(0, inv, pos, reduce="amin")
    return uniq[torch.argsort(first)]


def _merge_sorted(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Union of two sorted, disjoint int64 tensors, sorted, in O(|a| + |b| log |a|)."""
    if a.numel() == 0 or b.numel() == 0:
        return b if a.numel() == 0 else a
    out = torch.empty(a.numel() + b.numel(), dtype=a.dtype, device=a.device)
    at_b = torch.searchsorted(a, b) + torch.arange(b.numel(), device=b.device)
    is_a = torch.ones(out.numel(), dtype=torch.bool, device=a.device)
    is_a[at_b] = False
    out[at_b] = b
    out[is_a] = a
    return out


def sample_inactive_subset(f: torch.Tensor, g: torch.Tensor, size: int, is_active, seed: int,
                           max_rounds: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``size`` distinct inactive pairs drawn from f x g by rejection (paper 003 Eq. 1).

    ``is_active(rows, cols) -> bool`` tells the active set. The result is the set of the first
    ``size`` distinct inactive pairs of the i.i.d. draw sequence ``sample_pairs(f, g, ., seed)``
    (successive sampling without replacement), returned sorted by the linear index
    ``row * in + col``. The set depends only on the draw sequence, not on how it is cut into
    rounds. Fewer than ``size`` come back only when the rounds run out (the subset asks for
    most of the inactive mass): the caller copes with that.

    Each round sorts its own draws once (deduplication, first occurrence = smallest draw
    position by a stable sort) and tests membership with sorted queries, which is cache
    friendly for a binary search over a sorted active set; the pairs chosen so far stay a
    sorted key array, merged with each round's new ones, never re-deduplicated.
    """
    n_in = f.numel()
    chosen = torch.empty(0, dtype=torch.int64, device=f.device)  # sorted keys
    drawn = 0
    rate = 1.0  # new distinct inactive pairs per draw, as seen in the last round
    for _ in range(max_rounds):
        need = size - chosen.numel()
        if need <= 0:
            break
        # Draw what the last acceptance rate says is needed, +5% and +64 so that one more
        # round is rarely required; capped to bound memory (~10 int64 temporaries a draw).
        n = min(int(need / max(rate, 1e-3) * 1.05) + 64, _ROUND_CAP)
        r, c = sample_pairs(f, g, n, seed, offset=drawn)
        drawn += n
        keys, pos = torch.sort(r * n_in + c, stable=True)
        del r, c
        first = torch.ones(n, dtype=torch.bool, device=f.device)
        first[1:] = keys[1:] != keys[:-1]
        sel = first.nonzero().squeeze(1)
        keys, pos = keys[sel], pos[sel]  # stable sort: pos is each key's first draw
        ok = is_active(keys // n_in, keys % n_in).logical_not_()
        if chosen.numel():
            j = torch.searchsorted(chosen, keys).clamp_(max=chosen.numel() - 1)
            ok &= chosen[j] != keys
        sel = ok.nonzero().squeeze(1)
        keys, pos = keys[sel], pos[sel]
        rate = keys.numel() / n
        if keys.numel() > need:  # keep the first `need` in draw order (pos are distinct)
            keys = keys[pos <= torch.kthvalue(pos, need).values]
        chosen = _merge_sorted(chosen, keys)
    return chosen // n_in, chosen % n_in


def erdos_renyi_topology(out_features: int, in_features: int, nnz: int,
                         seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A uniform random G(n, M) bipartite graph: ``nnz`` distinct (row, col) pairs.

    Draws random linear indices with 64 random bits each (modulo bias below 2**-30 for any
    layer under 2**34 connections), keeps them in first-appearance order, repeats until ``nnz``
    distinct ones exist: a uniform random nnz-subset without a dense mask (paper 003 Sec. 4.1).
    """
    total = out_features * in_features
    if not 0 <= nnz <= total:
        raise ValueError(f"nnz={nnz} out of range for a {out_features}x{in_features} layer")
    chosen = torch.empty(0, dtype=torch.int64)
    drawn = 0
    while chosen.numel() < nnz:
        n = max(int(1.2 * (nnz - chosen.numel())) + 64, 64)
        lin = torch.empty(n, dtype=torch.int64)
        for s in range(0, n, _CHUNK):  # chunks bound the hash's int64 temporaries
            k = min(_CHUNK, n - s)
            idx = torch.arange(2 * (drawn + s), 2 * (drawn + s + k), dtype=torch.int64)
            bits = rng.random_u32(seed, idx).reshape(k, 2)
            lin[s:s + k] = (((bits[:, 0] >> 1) << 32) | bits[:, 1]) % total  # 63 bits, >= 0
        drawn += n
        chosen = first_occurrence_unique(torch.cat([chosen, lin]))[:nnz]
    return chosen // in_features, chosen % in_features


def fan_in_normal_init(rows: torch.Tensor, out_features: int, seed: int, gain: float = math.sqrt(2),
                       dtype=torch.float32) -> torch.Tensor:
    """Weights ~ N(0, gain^2 / fan_in[row]) with fan_in the *actual* number of inputs of the row.

    Evci et al. (2019) scaling, as used by paper 003 Sec. 4.1: a sparse unit with few inputs
    gets larger weights, so activations keep the variance a dense init would give them.
    Normals by Box-Muller from the counter-based uniforms.
    """
    n = rows.numel()
    fan_in = torch.bincount(rows, minlength=out_features).clamp_(min=1).to(torch.float64)
    u = uniform64(seed, 2 * n).reshape(2, n) if n else torch.zeros(2, 0, dtype=torch.float64)
    z = torch.sqrt(-2.0 * torch.log1p(-u[0])) * torch.cos(2 * math.pi * u[1])
    return (z * gain / torch.sqrt(fan_in[rows])).to(dtype)


def layer_densities(shapes: list[tuple[int, int]], density: float,
                    distribution: str = "uniform") -> list[float]:
    """Per-layer densities whose connection-weighted mean is ``density``.

    ``uniform``: every layer gets ``density`` (paper 003 Sec. 4.1). ``erdos_renyi``: density
    proportional to (n_in + n_out) / (n_in * n_out) (Mocanu et al. 2018), layers that would
    exceed 1 are made dense and the rest rescaled.
    """
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if distribution == "uniform":
        return [density] * len(shapes)
    if distribution != "erdos_renyi":
        raise ValueError(f"unknown distribution {distribution!r}")
    sizes = [o * i for o, i in shapes]
    raw = [(o + i) / (o * i) for o, i in shapes]
    dense: set[int] = set()
    while True:
        budget = density * sum(sizes) - sum(sizes[j] for j in dense)
        free = sum(raw[j] * sizes[j] for j in range(len(shapes)) if j not in dense)
        eps = budget / free
        over = [j for j in range(len(shapes)) if j not in dense and eps * raw[j] > 1]
        if not over:
            return [1.0 if j in dense else eps * raw[j] for j in range(len(shapes))]
        dense.update(over)


def cosine_prune_fraction(step: int, initial: float, t_end: int) -> float:
    """RigL / paper 003 schedule: initial/2 * (1 + cos(pi * step / t_end)), zero from t_end on."""
    if step >= t_end:
        return 0.0
    return 0.5 * initial * (1.0 + math.cos(math.pi * step / t_end))
