"""Dynamic sparse training: SET, RigL and guided subset growth (paper 003).

Usage, wrapping a model and its optimizer in three lines::

    model = sparsify(model, density=0.1, layout="sparse", seed=0)     # before the optimizer
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    dst = DynamicSparseTrainer(model, opt, DSTConfig(method="grabo", update_every=100, t_end=T))
    for x, y in data:
        opt.zero_grad(); loss_fn(model(x), y).backward()
        dst.step()            # optimizer step, plus prune-and-grow on update steps

Methods (``DSTConfig.method``):
- ``set``: grow uniformly random inactive connections (Mocanu et al. 2018); no gradients.
- ``rigl``: grow the inactive connections with the largest dense gradient (Evci et al. 2020).
  Needs the dense gradient, so only ``MaskedLinear`` layers (layout="masked").
- ``random`` / ``synflow`` / ``grabo``: sample a subset S of inactive connections from the unit
  marginals f x g (paper 003 Eq. 1, 3, 7), |S| = subset_multiplier x |P|, compute the gradient
  on S only and grow the largest |grad|. Works on ``SparseLinear`` without any dense tensor.

Prune and grow are global (paper 003 Sec. 4.1): the |P| smallest-magnitude active weights over
all layers are pruned, each layer's subset size is proportional to its number of possible
connections |W_l|, and the |P| best candidates over all subsets are grown. Grown connections
start at zero with their optimizer state reset. The pruned fraction is cosine-annealed to zero
at ``t_end``. Candidates are drawn among connections inactive *before* pruning, so a weight
just pruned cannot come straight back, and |P| = min(target, number of candidates), so the
number of active connections is preserved exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gradwire.numerics import rng
from gradwire.sparse.growth import (cosine_prune_fraction, erdos_renyi_topology,
                                    fan_in_normal_init, layer_densities, sample_inactive_subset,
                                    uniform64)
from gradwire.sparse.sparse_linear import MaskedLinear, SparseLinear

__all__ = ["DSTConfig", "DynamicSparseTrainer", "sparsify", "erdos_renyi_linear", "sparse_layers",
           "synflow_marginals"]

METHODS = ("set", "rigl", "random", "synflow", "grabo")


@dataclass(frozen=True)
class DSTConfig:
    """Schedule and growth rule. Defaults follow paper 003 Sec. 4.1 (GraBo, |S| = 10 |P|)."""
    method: str = "grabo"
    update_every: int = 1000
    prune_fraction: float = 0.2
    t_end: int = 10**9
    subset_multiplier: float = 10.0
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.update_every < 1 or self.t_end < 1:
            raise ValueError("update_every and t_end must be >= 1")
        if not 0 <= self.prune_fraction < 1:
            raise ValueError(f"prune_fraction must be in [0, 1), got {self.prune_fraction}")
        if self.subset_multiplier < 1:
            raise ValueError("subset_multiplier must be >= 1 (|S| >= |P|)")
        rng.check_seed(self.seed)


def sparse_layers(model: nn.Module) -> list[nn.Module]:
    """The SparseLinear / MaskedLinear modules of a model, in registration order."""
    return [m for m in model.modules() if isinstance(m, (SparseLinear, MaskedLinear))]


def sparsify(model: nn.Module, density: float, *, layout: str = "sparse",
             distribution: str = "uniform", seed: int = 0, dtype=None) -> nn.Module:
    """Replace every ``nn.Linear`` by an Erdos-Renyi sparse layer, in place; returns the model.

    Topology: uniform random G(n, M) graph per layer; weights: fan-in-aware normal init; the
    bias stays dense and keeps its original values (paper 003 Sec. 4.1 keeps biases dense).
    ``layout="sparse"`` gives SparseLinear, ``"masked"`` MaskedLinear with the *same*
    connections and values for the same seed.
    """
    if layout not in ("sparse", "masked"):
        raise ValueError(f"layout must be 'sparse' or 'masked', got {layout!r}")
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if type(child) is nn.Linear]
    if not targets:
        raise ValueError("model has no nn.Linear layer to sparsify")
    shapes = [tuple(c.weight.shape) for _, _, c in targets]
    dens = layer_densities(shapes, density, distribution)
    for li, ((parent, name, lin), d) in enumerate(zip(targets, dens)):
        out_f, in_f = lin.weight.shape
        bias = lin.bias.detach() if lin.bias is not None else None
        setattr(parent, name, erdos_renyi_linear(in_f, out_f, d, layout=layout, seed=seed,
                                                 layer_index=li, bias=bias,
                                                 dtype=dtype or lin.weight.dtype))
    return model


def erdos_renyi_linear(in_features: int, out_features: int, density: float, *,
                       layout: str = "sparse", seed: int = 0, layer_index: int = 0,
                       bias: torch.Tensor | None = None, dtype=torch.float32) -> nn.Module:
    """One Erdos-Renyi sparse layer built without any dense tensor (for layout="sparse").

    nnz = round(density * in * out) (at least 1) uniformly random connections, fan-in-aware
    normal weights; ``bias`` is copied (None: no bias). This is what ``sparsify`` uses, and
    the way to build a layer whose dense weight would not fit in memory.
    """
    if layout not in ("sparse", "masked"):
        raise ValueError(f"layout must be 'sparse' or 'masked', got {layout!r}")
    nnz = max(1, round(density * out_features * in_features))
    rows, cols = erdos_renyi_topology(out_features, in_features, nnz,
                                      rng.derive_seed(seed, layer_index, 0))
    vals = fan_in_normal_init(rows, out_features, rng.derive_seed(seed, layer_index, 1),
                              dtype=dtype)
    bias = bias.to(dtype) if bias is not None else None
    if layout == "sparse":
        return SparseLinear(in_features, out_features, rows, cols, vals, bias)
    w = torch.zeros(out_features, in_features, dtype=dtype)
    w[rows, cols] = vals
    return MaskedLinear(w, _mask(out_features, in_features, rows, cols), bias)


def _mask(out_f, in_f, rows, cols):
    m = torch.zeros(out_f, in_f, dtype=torch.bool)
    m[rows, cols] = True
    return m


def synflow_marginals(layers: list[nn.Module]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """SynFlow unit marginals (paper 003 Eq. 3) for a chain of layers: (f over inputs, g over outputs).

    f_l = 1^T prod_{k<l} |W_k| (afferent flow into layer l's inputs), g_l = prod_{k>l} |W_k| 1
    (efferent flow from its outputs), computed with sparse mat-vecs in float64 and renormalised
    after every layer (the paper, App. G, notes overflow otherwise). The layers must chain:
    in_features of layer l == out_features of layer l-1.
    """
    for a, b in zip(layers, layers[1:]):
        if b.in_features != a.out_features:
            raise ValueError("synflow needs a chain of layers (in_features == previous out)")

    def absmv(layer, v, transpose):
        r, c = layer.active_indices()
        w = layer.active_values().abs().to(torch.float64)
        if transpose:  # v over outputs -> over inputs
            return torch.zeros(layer.in_features, dtype=torch.float64).index_add_(0, c, w * v[r])
        return torch.zeros(layer.out_features, dtype=torch.float64).index_add_(0, r, w * v[c])

    fs, v = [], torch.ones(layers[0].in_features, dtype=torch.float64)
    for layer in layers:
        fs.append(v / v.sum())
        v = absmv(layer, v, False)
        v = v / v.sum().clamp(min=1e-300)
    gs, v = [], torch.ones(layers[-1].out_features, dtype=torch.float64)
    for layer in reversed(layers):
        gs.append(v / v.sum())
        v = absmv(layer, v, True)
        v = v / v.sum().clamp(min=1e-300)
    return list(zip(fs, reversed(gs)))


class DynamicSparseTrainer:
    """Drives ``optimizer.step()`` and, every ``update_every`` steps, a global prune-and-grow."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: DSTConfig):
        self.model, self.optimizer, self.config = model, optimizer, config
        self.layers = sparse_layers(model)
        if not self.layers:
            raise ValueError("model has no sparse layer: call sparsify() first")
        if config.method == "rigl" and not all(isinstance(m, MaskedLinear) for m in self.layers):
            raise ValueError("rigl needs the dense gradient: use layout='masked' "
                             "(SparseLinear supports set/random/synflow/grabo)")
        self.t = 0
        self.n_updates = 0
        self.history: list[dict] = []
        self._arm()

    def _needs_batch(self) -> bool:
        return self.config.method != "set"

    def _is_update_step(self, t: int) -> bool:
        c = self.config
        return (t + 1) % c.update_every == 0 and t + 1 < c.t_end

    def _arm(self) -> None:
        arm = self._needs_batch() and self._is_update_step(self.t)
        for m in self.layers:
            m.capture = arm

    def step(self) -> bool:
        """One optimizer step; returns True when this step also rewired the topology."""
        self.optimizer.step()
        updated = False
        if self._is_update_step(self.t):
            frac = cosine_prune_fraction(self.t + 1, self.config.prune_fraction, self.config.t_end)
            self.update(frac)
            updated = True
        for m in self.layers:
            m.clear_capture()
        self.t += 1
        self._arm()
        return updated

    # ---- prune and grow ------------------------------------------------------------------------
    def _candidates(self, n_target: int, seed: int):
        """Per layer: (rows, cols, score) of grow candidates; the best |score| are grown."""
        c, layers = self.config, self.layers
        sizes = torch.tensor([m.in_features * m.out_features for m in layers], dtype=torch.float64)
        mult = 1.0 if c.method == "set" else c.subset_multiplier
        quota = _largest_remainder(sizes / sizes.sum() * (mult * n_target))
        flows = synflow_marginals(layers) if c.method == "synflow" else None
        out = []
        for li, (m, q) in enumerate(zip(layers, quota)):
            s = rng.derive_seed(seed, li)
            if c.method == "rigl":
                # Every inactive connection is a candidate, but a global top-n_target pick can
                # only use a layer's own top-n_target: keep those (avoids listing 1e8 indices).
                score = m.dense_grad().abs().masked_fill(m.mask, -1.0).reshape(-1)
                kk = min(n_target, m.in_features * m.out_features - m.nnz)
                top = torch.topk(score, kk, sorted=False)
                out.append((top.indices // m.in_features, top.indices % m.in_features,
                            top.values))
                continue
            if c.method == "grabo":
                f, g = m.unit_activity()
            elif c.method == "synflow":
                f, g = flows[li]
            else:
                f, g = torch.ones(m.in_features), torch.ones(m.out_features)
            r, cc = sample_inactive_subset(f, g, int(q), m.is_active, s)
            if c.method == "set":
                # SET grows at random: random priorities instead of gradients.
                out.append((r, cc, uniform64(rng.derive_seed(s, 2), r.numel())))
            else:
                out.append((r, cc, m.candidate_grad(r, cc).abs()))
        return out

    @torch.no_grad()
    def update(self, fraction: float) -> dict:
        """Global prune of ``fraction`` of the active weights, then global growth of as many."""
        layers = self.layers
        seed = rng.derive_seed(self.config.seed, self.n_updates)
        self.n_updates += 1
        n_active = sum(m.nnz for m in layers)
        target = int(fraction * n_active)
        info = {"step": self.t + 1, "fraction": fraction, "pruned": 0}
        if target == 0:
            self.history.append(info)
            return info
        cands = self._candidates(target, seed)
        # Global growth: the best candidates over all layers by |score|.
        scores = torch.cat([s.to(torch.float64) for _, _, s in cands])
        k = min(target, scores.numel())
        grow_global = torch.zeros(scores.numel(), dtype=torch.bool)
        grow_global[torch.topk(scores, k, sorted=False).indices] = True
        # Global prune: the k smallest |w| over all layers.
        mags = torch.cat([m.active_values().abs().to(torch.float64) for m in layers])
        prune_global = torch.zeros(mags.numel(), dtype=torch.bool)
        prune_global[torch.topk(mags, k, largest=False, sorted=False).indices] = True
        po = go = 0
        per_layer = []
        for m, (r, c, s) in zip(layers, cands):
            prune = prune_global[po:po + m.nnz]
            grow = grow_global[go:go + s.numel()]
            po += m.nnz
            go += s.numel()
            per_layer.append((int(prune.sum()), int(grow.sum())))
            _rewire(m, self.optimizer, prune, r[grow], c[grow])
        info.update(pruned=k, per_layer=per_layer, density=self.density())
        self.history.append(info)
        return info

    def density(self) -> float:
        return (sum(m.nnz for m in self.layers)
                / sum(m.in_features * m.out_features for m in self.layers))


def _largest_remainder(x: torch.Tensor) -> list[int]:
    """Round non-negative reals to integers with the same (rounded) sum."""
    base = torch.floor(x)
    rem = int(round(float(x.sum()))) - int(base.sum())
    order = torch.argsort(x - base, descending=True)
    base[order[:max(rem, 0)]] += 1
    return [int(v) for v in base]


def _rewire(m, optimizer, prune: torch.Tensor, grow_rows: torch.Tensor,
            grow_cols: torch.Tensor) -> None:
    """Drop the active connections flagged in ``prune``; add (grow_rows, grow_cols) at zero.

    Optimizer state follows the weights: kept connections keep theirs, grown ones start from a
    zero state (paper 003 Sec. 4.1; a stale momentum would otherwise kick the new weight).
    """
    if isinstance(m, SparseLinear):
        p = m.values
        keep = ~prune
        gr, gc = grow_rows.to(torch.int64), grow_cols.to(torch.int64)
        gk = gr * m.in_features + gc
        g_perm = torch.argsort(gk, stable=True)  # usually sorted already; only |P| long
        gr, gc, gk = gr[g_perm], gc[g_perm], gk[g_perm]
        # Kept connections are in canonical order already: merge the grown ones in by binary
        # search (O(nnz + |P| log nnz)) instead of sorting all nnz again. Keys are distinct
        # (growth draws inactive pairs only), so this is exactly the canonical order.
        n_new = gk.numel()
        n_tot = int(keep.sum()) + n_new
        at_new = torch.searchsorted(m.linear_index()[keep], gk) + torch.arange(n_new)
        at_old = torch.ones(n_tot, dtype=torch.bool)
        at_old[at_new] = False
        at_old = at_old.nonzero().squeeze(1)

        def merged(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            out = old.new_empty(n_tot)
            out[at_old] = old[keep]
            out[at_new] = new
            return out

        rows, cols = merged(m.rows, gr), merged(m.cols, gc)
        vals = merged(p.detach(), p.new_zeros(n_new))
        state = optimizer.state.get(p, {})
        old_shape = p.shape
        for key, v in list(state.items()):
            if torch.is_tensor(v) and v.shape == old_shape:
                state[key] = merged(v, v.new_zeros(n_new))
        m.set_topology(rows, cols, vals)
        p.grad = None
        return
    # MaskedLinear: same shapes, edit mask, weights and state in place.
    r, c = m.active_indices()
    pr, pc = r[prune], c[prune]
    m.mask[pr, pc] = False
    m.mask[grow_rows, grow_cols] = True
    m.weight.data[pr, pc] = 0
    m.weight.data[grow_rows, grow_cols] = 0
    state = optimizer.state.get(m.weight, {})
    for v in state.values():
        if torch.is_tensor(v) and v.shape == m.weight.shape:
            v[pr, pc] = 0
            v[grow_rows, grow_cols] = 0
    if m.weight.grad is not None:
        m.weight.grad = None

