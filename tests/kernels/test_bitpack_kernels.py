"""C++ pack/unpack: bytes identical to the reference and to codec.bitpack; malformed input refused."""
from __future__ import annotations

import pytest
import torch

from gradwire import ops
from tests.kernels._native import require_native_cpu

SIZES = (0, 1, 2, 3, 5, 7, 8, 9, 15, 17, 63, 65, 1000, 65536 + 13)  # odd sizes and chunk edges


@pytest.fixture(autouse=True)
def _native():
    require_native_cpu()


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_bit_exact(bits):
    g = torch.Generator().manual_seed(bits)
    for n in SIZES:
        codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
        packed = ops.pack_bits(codes, bits)
        assert packed.numel() == (n * bits + 7) // 8
        assert torch.equal(packed, ops.REFERENCES["pack_bits"](codes, bits)), (bits, n)
        assert torch.equal(ops.unpack_bits(packed, bits, n), codes), (bits, n)
        assert torch.equal(ops.REFERENCES["unpack_bits"](packed, bits, n), codes), (bits, n)


def test_layout_pinned_and_matches_codec_bitpack():
    # docs/architecture.md: LSB-first stream. 3-bit codes 1..4 -> bits 100 010 110 001 -> bytes.
    codes = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    assert ops.pack_bits(codes, 3).tolist() == [0b11010001, 0b1000]
    try:
        from gradwire.codec import bitpack
    except ImportError:  # pragma: no cover - codec layer absent
        pytest.skip("gradwire.codec.bitpack not present")
    g = torch.Generator().manual_seed(7)
    for bits in range(1, 9):
        c = torch.randint(0, 1 << bits, (1001,), generator=g, dtype=torch.int64).to(torch.uint8)
        assert torch.equal(ops.pack_bits(c, bits), bitpack.pack_bits(c, bits)), bits


def test_noncontiguous_and_shaped_codes():
    c = torch.randint(0, 32, (40, 30), dtype=torch.int64).to(torch.uint8)
    t = c.t()  # non-contiguous: packed in row-major order of the transposed view
    assert torch.equal(ops.pack_bits(t, 5), ops.pack_bits(t.contiguous().reshape(-1), 5))


def test_malformed_input_refused():
    with pytest.raises(TypeError, match="uint8"):
        ops.pack_bits(torch.zeros(4, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="bits"):
        ops.pack_bits(torch.zeros(4, dtype=torch.uint8), 9)
    with pytest.raises(RuntimeError, match="does not fit"):
        ops.pack_bits(torch.tensor([1, 16], dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="bytes"):
        ops.unpack_bits(torch.zeros(3, dtype=torch.uint8), 6, 5)  # 5 codes of 6 bits need 4 bytes
    with pytest.raises(RuntimeError, match="padding"):
        ops.unpack_bits(torch.tensor([0xFF], dtype=torch.uint8), 3, 2)  # 6 bits used, 2 set above
    with pytest.raises(ValueError, match="padding"):
        ops.REFERENCES["unpack_bits"](torch.tensor([0xFF], dtype=torch.uint8), 3, 2)
