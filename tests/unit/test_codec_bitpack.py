"""Bit packing: the stream layout of docs/architecture.md, pinned bytes, round trips, bad input."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from gradwire.codec.bitpack import pack_bits, packed_nbytes, unpack_bits


def _reference_pack(codes: list[int], bits: int) -> bytes:
    """The layout spelled out bit by bit: code i -> stream bits [i*b, (i+1)*b), LSB first."""
    out = bytearray((len(codes) * bits + 7) // 8)
    for i, c in enumerate(codes):
        for k in range(bits):
            j = i * bits + k
            out[j // 8] |= ((c >> k) & 1) << (j % 8)
    return bytes(out)


def test_pinned_bytes():
    # FP6: 4 codes in 3 bytes. 0b000001, 0b000010, 0b000011, 0b111111 ->
    # stream = 000001 | 000010<<6 | 000011<<12 | 111111<<18 = 0xFC3081
    got = pack_bits(torch.tensor([1, 2, 3, 63], dtype=torch.uint8), 6)
    assert got.tolist() == [0x81, 0x30, 0xFC]
    # 4-bit: low nibble first
    assert pack_bits(torch.tensor([0x1, 0xA, 0x3], dtype=torch.uint8), 4).tolist() == [0xA1, 0x03]
    # 1-bit: LSB first
    assert pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.uint8), 1).tolist() == [0x81, 0x01]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 23, 64, 101])
def test_matches_bitwise_reference_and_round_trips(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.numel() == packed_nbytes(n, bits) == (n * bits + 7) // 8
    assert bytes(packed.tolist()) == _reference_pack(codes.tolist(), bits)
    assert torch.equal(unpack_bits(packed, n, bits), codes)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.lists(st.integers(0, 255), max_size=70))
def test_property_round_trip(bits, raw):
    codes = torch.tensor([c % (1 << bits) for c in raw], dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert bytes(packed.tolist()) == _reference_pack(codes.tolist(), bits)
    assert torch.equal(unpack_bits(packed, len(raw), bits), codes)


def test_multidim_input_is_flattened_row_major():
    codes = torch.arange(12, dtype=torch.uint8).reshape(3, 4)
    assert torch.equal(pack_bits(codes, 4), pack_bits(codes.reshape(-1), 4))


def test_bad_input():
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.zeros(3, dtype=torch.uint8), 0)
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.zeros(3, dtype=torch.uint8), 9)
    with pytest.raises(TypeError, match="uint8"):
        pack_bits(torch.zeros(3, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match=r"< 2\*\*3"):
        pack_bits(torch.tensor([8], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 3, 5)
    with pytest.raises(ValueError, match="padding"):
        unpack_bits(torch.tensor([0x81, 0xFF], dtype=torch.uint8), 3, 5)  # 15 bits used, bit 15 set
    with pytest.raises(TypeError):
        unpack_bits(torch.zeros(2, 2, dtype=torch.uint8), 3, 5)
