"""Greedy N:M activations: ReLU then keep the N largest per block, exact gradient."""
import pytest
import torch

from gradwire.sparse.activations import NMReLU, nm_relu


def _reference(x, n, m):
    """Element-by-element reference: per block of m along the last dim, keep the n largest."""
    r = torch.relu(x).reshape(-1, m).tolist()
    out = []
    for blk in r:
        order = sorted(range(m), key=lambda k: (-blk[k], k))[:n]  # ties: lowest index
        out.append([blk[k] if k in order else 0.0 for k in range(m)])
    return torch.tensor(out, dtype=x.dtype).reshape(x.shape)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 2), (1, 4), (4, 8)])
def test_nm_relu_matches_reference_bit_exact(n, m):
    g = torch.Generator().manual_seed(n * 100 + m)
    x = torch.randn(6, 4 * m, generator=g)
    x[0, :m] = 0.5  # ties inside a block
    y = nm_relu(x, n, m)
    torch.testing.assert_close(y, _reference(x, n, m), rtol=0, atol=0)
    blocks = (y != 0).reshape(-1, m).sum(1)
    assert int(blocks.max()) <= n and bool((y >= 0).all())


def test_other_dim_and_module():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, generator=g)
    y = NMReLU(2, 4, dim=0)(x)
    torch.testing.assert_close(y, nm_relu(x.t().contiguous(), 2, 4).t(), rtol=0, atol=0)
    assert "n=2, m=4" in repr(NMReLU())


def test_gradient_flows_through_kept_positive_entries_only():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 8, generator=g, requires_grad=True)
    y = nm_relu(x)
    dy = torch.randn(4, 8, generator=g)
    y.backward(dy)
    kept = y.detach() != 0
    torch.testing.assert_close(x.grad, dy * kept, rtol=0, atol=0)


def test_bad_input():
    with pytest.raises(ValueError):
        nm_relu(torch.randn(2, 6), 2, 4)  # 6 is not a multiple of 4
    with pytest.raises(ValueError):
        NMReLU(5, 4)
    y = nm_relu(torch.tensor([[float("nan"), 1.0, 2.0, 3.0]]), 2, 4)
    assert torch.isnan(y[0, 0])  # NaN is data: it is not silently dropped
