"""SparseLinear equals the masked-dense Linear, never builds a dense weight, rejects bad input."""
import pytest
import torch
from torch import nn

from gradwire.sparse.sparse_linear import MaskedLinear, SparseLinear, sampled_grad


# Small GEMMs gain nothing from threads on the shared 2-core runner (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _pair(out_f=24, in_f=40, density=0.2, dtype=torch.float64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=dtype)
    mask = torch.rand(out_f, in_f, generator=g) < density
    b = torch.randn(out_f, generator=g, dtype=dtype) if bias else None
    return SparseLinear.from_dense(w, mask, b), MaskedLinear(w, mask, b)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_forward_backward_match_masked_dense(dtype, tol):
    sp, md = _pair(dtype=dtype)
    assert torch.equal(sp.to_dense(), md.to_dense())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 40, generator=g, dtype=dtype)  # leading dims are flattened
    xs, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys, ym = sp(xs), md(xm)
    assert ys.shape == (3, 5, 24)
    torch.testing.assert_close(ys, ym, rtol=tol, atol=tol)
    dy = torch.randn(ys.shape, generator=g, dtype=dtype)
    ys.backward(dy)
    ym.backward(dy)
    torch.testing.assert_close(xs.grad, xm.grad, rtol=tol, atol=tol)
    r, c = sp.active_indices()
    torch.testing.assert_close(sp.values.grad, md.weight.grad[r, c], rtol=tol, atol=tol)
    torch.testing.assert_close(sp.bias.grad, md.bias.grad, rtol=tol, atol=tol)
    # The masked layer's weight gradient is zero off the mask (masked in the forward).
    assert torch.count_nonzero(md.weight.grad[~md.mask]) == 0


def test_gradcheck_float64():
    sp, _ = _pair(out_f=6, in_f=8, density=0.4)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: _apply(sp, x, v, b),
                                    (x, sp.values, sp.bias))


def _apply(layer, x, v, b):
    from gradwire.sparse.sparse_linear import _SparseLinearFn
    return _SparseLinearFn.apply(x, v, b, layer)


def test_sampled_grad_matches_dense_product_in_any_order():
    g = torch.Generator().manual_seed(2)
    delta = torch.randn(16, 7, generator=g, dtype=torch.float64)
    x = torch.randn(16, 9, generator=g, dtype=torch.float64)
    full = delta.t() @ x
    lin = torch.randperm(63, generator=g)[:20]  # distinct pairs, shuffled order
    rows, cols = lin // 9, lin % 9
    torch.testing.assert_close(sampled_grad(delta, x, rows, cols), full[rows, cols],
                               rtol=1e-12, atol=1e-12)
    # Sorted pairs take the no-permutation path: same values, bit for bit.
    srt = torch.sort(lin).values
    torch.testing.assert_close(sampled_grad(delta, x, srt // 9, srt % 9),
                               sampled_grad(delta, x, rows, cols)[torch.argsort(lin)],
                               rtol=0, atol=0)
    assert sampled_grad(delta, x, rows[:0], cols[:0]).numel() == 0
    with pytest.raises(ValueError):
        sampled_grad(delta, x[:3], rows, cols)


def test_huge_layer_never_materialises_dense_weight():
    # A dense 1e6 x 1e6 float32 weight would be 4 TB: this only runs if nothing dense is built.
    n, nnz = 1_000_000, 2000
    g = torch.Generator().manual_seed(3)
    lin = torch.unique(torch.randint(0, n * n, (nnz,), generator=g))
    layer = SparseLinear(n, n, lin // n, lin % n, torch.randn(lin.numel(), generator=g))
    x = torch.zeros(2, n)
    x[:, layer.cols[:50]] = 1.0
    x.requires_grad_()
    y = layer(x)
    y.sum().backward()
    # d(sum y)/d values[k] = sum_i x[i, cols[k]]; d/dx[i, a] = sum of values in column a.
    torch.testing.assert_close(layer.values.grad, x.detach()[:, layer.cols].sum(0))
    col_sums = torch.zeros(n).index_add_(0, layer.cols, layer.values.detach())
    torch.testing.assert_close(x.grad[0], col_sums)
    layer.capture = True
    layer(x.detach()).sum().backward()
    q = layer.candidate_grad(torch.tensor([5, 7]), layer.cols[:2])
    torch.testing.assert_close(q, torch.full((2,), 2.0))


def test_is_active_and_topology_order():
    sp, md = _pair()
    g = torch.Generator().manual_seed(4)
    r = torch.randint(0, 24, (500,), generator=g)
    c = torch.randint(0, 40, (500,), generator=g)
    assert torch.equal(sp.is_active(r, c), md.is_active(r, c))
    lin = sp.linear_index()
    assert bool((lin[1:] > lin[:-1]).all())  # canonical: strictly increasing
    assert sp.nnz == md.nnz == int(md.mask.sum())
    # Already-canonical input (fast path, no sort) and shuffled input give the same layer;
    # a duplicate in sorted input is still rejected.
    perm = torch.randperm(sp.nnz, generator=g)
    a = SparseLinear(40, 24, sp.rows, sp.cols, sp.values.detach())
    b = SparseLinear(40, 24, sp.rows[perm], sp.cols[perm], sp.values.detach()[perm])
    assert torch.equal(a.to_dense(), b.to_dense()) and torch.equal(a.linear_index(), lin)
    with pytest.raises(ValueError, match="duplicate"):
        SparseLinear(40, 24, sp.rows[[0, 0, 1]], sp.cols[[0, 0, 1]], sp.values.detach()[:3])


def test_bad_input_is_rejected():
    sp, _ = _pair(dtype=torch.float32)
    with pytest.raises(ValueError, match="last dim"):
        sp(torch.randn(2, 39))
    with pytest.raises(TypeError, match="dtype"):
        sp(torch.randn(2, 40, dtype=torch.float64))
    one = torch.tensor([1])
    with pytest.raises(ValueError, match="duplicate"):
        SparseLinear(4, 4, torch.tensor([1, 1]), torch.tensor([2, 2]), torch.ones(2))
    with pytest.raises(ValueError, match="out of range"):
        SparseLinear(4, 4, one, torch.tensor([4]), torch.ones(1))
    with pytest.raises(TypeError, match="int32 or int64"):
        SparseLinear(4, 4, one.float(), one.float(), torch.ones(1))
    with pytest.raises(TypeError, match="floating"):
        SparseLinear(4, 4, one, one, torch.ones(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="equal length"):
        SparseLinear(4, 4, one, torch.tensor([1, 2]), torch.ones(1))
    with pytest.raises(ValueError, match="mask shape"):
        MaskedLinear(torch.ones(3, 4), torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="no captured"):
        sp.candidate_grad(one, one)


def test_int32_indices_are_accepted_and_in_a_module():
    layer = SparseLinear(5, 3, torch.tensor([2, 0], dtype=torch.int32),
                         torch.tensor([1, 4], dtype=torch.int32), torch.tensor([2.0, 3.0]))
    model = nn.Sequential(layer, nn.ReLU())
    y = model(torch.ones(1, 5))
    torch.testing.assert_close(y, torch.tensor([[3.0, 0.0, 2.0]]), rtol=0, atol=0)
