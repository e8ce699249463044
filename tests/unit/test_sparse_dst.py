"""DST engine: exact density, sparse == masked-dense over full DST steps, state reset, RigL."""
import pytest
import torch
from torch import nn

from gradwire.sparse.dst import DSTConfig, DynamicSparseTrainer, sparse_layers, sparsify
from gradwire.sparse.sparse_linear import MaskedLinear, SparseLinear


# Small GEMMs gain nothing from threads on the shared 2-core runner (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _model(layout, density=0.1, seed=3, dtype=torch.float64):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 48), nn.ReLU(),
                      nn.Linear(48, 10)).to(dtype)
    return sparsify(m, density, layout=layout, seed=seed)


def _batch(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 64, generator=g, dtype=dtype), torch.randint(0, 10, (32,), generator=g)


def test_sparsify_exact_density_and_same_init_for_both_layouts():
    ms, mm = _model("sparse"), _model("masked")
    for a, b in zip(sparse_layers(ms), sparse_layers(mm)):
        assert isinstance(a, SparseLinear) and isinstance(b, MaskedLinear)
        assert a.nnz == b.nnz == round(0.1 * a.in_features * a.out_features)
        assert torch.equal(a.to_dense(), b.to_dense())
        assert torch.equal(a.bias, b.bias)
    with pytest.raises(ValueError):
        sparsify(nn.ReLU(), 0.1)
    with pytest.raises(ValueError):
        sparsify(nn.Linear(3, 3), 0.1, layout="csr")


@pytest.mark.parametrize("method", ["grabo", "random", "synflow", "set"])
def test_full_dst_steps_sparse_equals_masked(method):
    """Same seed, same data: weights, masks and optimizer state agree across layouts."""
    runs = []
    for layout in ("sparse", "masked"):
        model = _model(layout)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        dst = DynamicSparseTrainer(model, opt, DSTConfig(method=method, update_every=2,
                                                         prune_fraction=0.3, t_end=50, seed=7))
        n0 = sum(m.nnz for m in dst.layers)
        for t in range(6):
            x, y = _batch(t)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            updated = dst.step()
            assert updated == (t % 2 == 1)
            assert sum(m.nnz for m in dst.layers) == n0  # density held exactly
        assert all(h["pruned"] > 0 for h in dst.history) and len(dst.history) == 3
        runs.append((model, dst))
    (ms, ds), (mm, dm) = runs
    assert [h["per_layer"] for h in ds.history] == [h["per_layer"] for h in dm.history]
    for a, b in zip(ds.layers, dm.layers):
        assert a.nnz == b.nnz and bool(a.is_active(*b.active_indices()).all())  # same masks
        torch.testing.assert_close(a.to_dense(), b.to_dense(), rtol=1e-12, atol=1e-12)


def test_global_redistribution_changes_layer_densities():
    model = _model("sparse")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = DynamicSparseTrainer(model, opt, DSTConfig(method="grabo", update_every=1, t_end=50))
    before = [m.nnz for m in dst.layers]
    for t in range(3):
        x, y = _batch(t)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        dst.step()
    after = [m.nnz for m in dst.layers]
    assert sum(after) == sum(before) and after != before  # global, not per-layer


def test_grown_connections_start_at_zero_with_reset_state():
    model = _model("sparse")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    dst = DynamicSparseTrainer(model, opt, DSTConfig(method="grabo", update_every=2, t_end=50))
    layer = dst.layers[0]
    for t in range(2):
        x, y = _batch(t)
        if t == 1:
            old_lin = layer.linear_index().clone()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if t == 1:
            # Take the optimizer step here, on the old topology, to record the state that the
            # kept connections must carry over; then make dst.step() skip its own step.
            dst.optimizer.step()
            old = {k: v.clone() for k, v in opt.state[layer.values].items() if v.dim() == 1}
            old_vals = layer.values.detach().clone()
            dst.optimizer.step = lambda: None  # step() must not step twice
        dst.step()
    lin = layer.linear_index()
    new = ~torch.isin(lin, old_lin)
    kept_new = torch.isin(lin, old_lin)
    kept_old = torch.isin(old_lin, lin)
    assert int(new.sum()) > 0
    assert torch.count_nonzero(layer.values.detach()[new]) == 0
    for k in ("exp_avg", "exp_avg_sq"):
        st = opt.state[layer.values][k]
        assert st.shape == layer.values.shape
        assert torch.count_nonzero(st[new]) == 0
        assert torch.equal(st[kept_new], old[k][kept_old])
    assert torch.equal(layer.values.detach()[kept_new], old_vals[kept_old])
    assert layer.values.grad is None  # stale gradient of the old shape is dropped


def test_rigl_grows_largest_dense_gradients():
    model = _model("masked")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: weights stay put, easy to check
    dst = DynamicSparseTrainer(model, opt, DSTConfig(method="rigl", update_every=1, t_end=50,
                                                     prune_fraction=0.2))
    x, y = _batch(0)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [m.dense_grad().clone() for m in dst.layers]
    masks = [m.mask.clone() for m in dst.layers]
    dst.step()
    k = dst.history[0]["pruned"]
    scores = torch.cat([g.abs()[~mk] for g, mk in zip(grads, masks)])
    thresh = torch.topk(scores, k).values.min()
    grown = torch.cat([(m.mask & ~mk)[~mk] for m, mk in zip(dst.layers, masks)])
    assert int(grown.sum()) == k
    assert bool((scores[grown] >= thresh).all())


def test_config_and_layout_errors():
    with pytest.raises(ValueError):
        DSTConfig(method="snip")
    with pytest.raises(ValueError):
        DSTConfig(subset_multiplier=0.5)
    with pytest.raises(ValueError):
        DSTConfig(prune_fraction=1.0)
    model = _model("sparse")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="masked"):
        DynamicSparseTrainer(model, opt, DSTConfig(method="rigl"))
    with pytest.raises(ValueError, match="sparsify"):
        DynamicSparseTrainer(nn.Linear(2, 2), opt, DSTConfig())
