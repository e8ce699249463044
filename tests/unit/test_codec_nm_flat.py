"""N:M with ``dim=None`` (issue 15, item 5): blocks over the flattened tensor, tail zero-padded,
so any shape can cross a boundary (a conv feature map whose last dimension is not a multiple of
M included). Checked bit-exactly against numerics.nm applied to the padded flat tensor."""
import pytest
import torch

from gradwire.codec import PacketError
from gradwire.codec.header import parse_packet
from gradwire.codec.nm import FLAT_DIM, NM_PARAMS, NMCodec
from gradwire.numerics import nm

DENSE = {(1, 2, "mvue"): nm.mvue_12, (2, 4, "mvue"): nm.mvue_24_exact, (2, 4, "mvue_approx"): nm.mvue_24_approx}


def data(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def padded_flat(x, m):
    f = x.reshape(-1)
    return torch.cat([f, f.new_zeros(-f.numel() % m)])


@pytest.mark.parametrize("shape", [(1, 384, 2, 2), (3, 5), (7,), (2, 3, 1)])
@pytest.mark.parametrize("n,m,method", list(DENSE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flat_blocks_equal_numerics_on_the_padded_flat_tensor(shape, n, m, method, dtype):
    x = data(shape, seed=len(shape), dtype=dtype)
    c = NMCodec(n, m, method, dim=None)
    p = c.encode(x, seed=5)
    assert p.numel() == c.packed_size(shape, dtype)
    h, _ = parse_packet(p)
    assert h.shape == shape and NM_PARAMS.unpack(h.params)[3] == FLAT_DIM
    want = DENSE[(n, m, method)](padded_flat(x, m), seed=5)[:x.numel()].reshape(shape)
    torch.testing.assert_close(c.decode(p), want, rtol=0, atol=0)


def test_flat_equals_last_dim_blocks_when_they_coincide():
    x = data((4, 6, 8), seed=3)
    for vb in (None, 8):
        a, b = NMCodec(2, 4, value_bits=vb, dim=None), NMCodec(2, 4, value_bits=vb)
        assert torch.equal(a.decode(a.encode(x, seed=7)), b.decode(b.encode(x, seed=7)))
        assert a.packed_size(x.shape, x.dtype) == b.packed_size(x.shape, x.dtype)


def test_flat_value_bits_and_edge_shapes():
    c = NMCodec(2, 4, value_bits=8, dim=None)
    for shape in [(1, 384, 2, 2), (5,), (), (0, 3)]:
        x = data(shape, seed=1)
        p = c.encode(x, seed=2)
        assert p.numel() == c.packed_size(shape, torch.float32)
        y = c.decode(p)
        assert y.shape == x.shape
        # at most 2 of every 4 flat positions survive
        nz = (padded_flat(y, 4) != 0).reshape(-1, 4).sum(1) if y.numel() else torch.zeros(0)
        assert bool((nz <= 2).all())


def test_flat_and_last_dim_packets_are_not_interchangeable():
    x = data((2, 8))
    with pytest.raises(PacketError, match="dim"):
        NMCodec(2, 4).decode(NMCodec(2, 4, dim=None).encode(x))
    with pytest.raises(PacketError, match="dim"):
        NMCodec(2, 4, dim=None).decode(NMCodec(2, 4).encode(x))
    with pytest.raises(ValueError, match="dim=None"):
        NMCodec(2, 4).encode(data((1, 384, 2, 2)))
    with pytest.raises(ValueError, match="int or None"):
        NMCodec(2, 4, dim="flat")
    assert NMCodec(2, 4, dim=None).config()["dim"] is None
