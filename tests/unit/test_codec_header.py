"""The wire header: layout, validation, clear errors."""
import struct
import zlib

import pytest
import torch

from gradwire.codec.header import (
    FIXED_SIZE,
    MAGIC,
    PacketError,
    build_packet,
    check_config,
    header_size,
    parse_packet,
    varint,
)


def _packet(shape=(3, 5), params=b"\x01\x02\x03", payload=b"hello world", dtype=torch.bfloat16):
    return build_packet(7, dtype, shape, params, torch.tensor(list(payload), dtype=torch.uint8), flags=5)


def test_layout_pinned():
    p = _packet()
    raw = bytes(p.tolist())
    hlen = header_size((3, 5), 3)
    assert hlen == 33  # 24 fixed + 2 varint dims + 3 params + 4 crc
    assert raw[:4] == MAGIC
    fields = struct.unpack("<4sBBBBBBHQI", raw[:FIXED_SIZE])
    assert fields == (MAGIC, 1, 7, 5, 2, 2, 3, hlen, 11, zlib.crc32(b"hello world"))
    assert raw[24:26] == b"\x03\x05"
    assert raw[26:29] == b"\x01\x02\x03"
    assert struct.unpack("<I", raw[hlen - 4:hlen])[0] == zlib.crc32(raw[: hlen - 4])
    assert raw[hlen:] == b"hello world"


def test_varints():
    assert [varint(v) for v in (0, 1, 127, 128, 300, 65536)] == [
        b"\x00", b"\x01", b"\x7f", b"\x80\x01", b"\xac\x02", b"\x80\x80\x04"]
    assert len(varint(2**63 - 1)) == 9
    with pytest.raises(ValueError, match="dimensions"):
        varint(-1)
    shape = (0, 1, 300, 2**40, 2**63 - 1)
    h, _ = parse_packet(build_packet(1, torch.float32, shape, b"", torch.zeros(0, dtype=torch.uint8)))
    assert h.shape == shape


def _forge_header(shape_bytes: bytes, ndim: int, params=b"") -> torch.Tensor:
    """A header with valid CRCs around an arbitrary shape field."""
    hlen = FIXED_SIZE + len(shape_bytes) + len(params) + 4
    body = struct.pack("<4sBBBBBBHQI", MAGIC, 1, 1, 0, 1, ndim, len(params), hlen, 0, 0) + shape_bytes + params
    body += struct.pack("<I", zlib.crc32(body))
    return torch.tensor(list(body), dtype=torch.uint8)


def test_malformed_shape_fields():
    parse_packet(_forge_header(b"\xac\x02", 1))  # well formed
    with pytest.raises(PacketError, match="minimal varint"):
        parse_packet(_forge_header(b"\x80\x00", 1))
    with pytest.raises(PacketError, match="end of the shape field"):
        parse_packet(_forge_header(b"\x05\x80", 2))
    assert parse_packet(_forge_header(b"\xff" * 8 + b"\x7f", 1))[0].shape == (2**63 - 1,)  # 9 x 7 bits
    with pytest.raises(PacketError, match="at most 9 bytes"):
        parse_packet(_forge_header(b"\xff" * 9 + b"\x01\x05", 2))
    with pytest.raises(PacketError, match="filling"):
        parse_packet(_forge_header(b"\x05\x05\x05", 2))
    with pytest.raises(PacketError, match="header_len"):
        parse_packet(_forge_header(b"\x05", 2))


def test_parse_round_trip():
    h, payload = parse_packet(_packet())
    assert (h.codec_id, h.flags, h.src_dtype, h.shape, h.params, h.payload_len) == (
        7, 5, torch.bfloat16, (3, 5), b"\x01\x02\x03", 11)
    assert h.numel == 15
    assert bytes(payload.tolist()) == b"hello world"


def test_zero_dim_and_empty():
    h, payload = parse_packet(build_packet(1, torch.float32, (), b"", torch.zeros(4, dtype=torch.uint8)))
    assert h.shape == () and h.numel == 1 and payload.numel() == 4
    h, payload = parse_packet(build_packet(1, torch.float16, (0, 3), b"", torch.zeros(0, dtype=torch.uint8)))
    assert h.shape == (0, 3) and h.numel == 0 and payload.numel() == 0


def test_every_truncation_and_every_bit_flip_is_detected():
    p = _packet()
    for n in range(p.numel()):
        with pytest.raises(PacketError):
            parse_packet(p[:n])
    with pytest.raises(PacketError, match="payload_len"):
        parse_packet(torch.cat([p, torch.zeros(1, dtype=torch.uint8)]))
    # CRC-32 detects every single-bit error, so no flip anywhere can go unnoticed.
    for byte in range(p.numel()):
        for bit in range(8):
            q = p.clone()
            q[byte] ^= 1 << bit
            with pytest.raises(PacketError):
                parse_packet(q)


def test_error_messages_name_field_expected_found():
    p = _packet()
    q = p.clone()
    q[0] = ord("X")
    with pytest.raises(PacketError, match=r"magic: expected b'GWPK', found b'XWPK'"):
        parse_packet(q)
    q = p.clone()
    q[4] = 9
    with pytest.raises(PacketError, match="version: expected 1, found 9"):
        parse_packet(q)
    q = p.clone()
    q[-1] ^= 1
    with pytest.raises(PacketError, match="payload_crc"):
        parse_packet(q)
    q = p.clone()
    q[24] ^= 1  # a shape byte: caught by the header CRC
    with pytest.raises(PacketError, match="header_crc"):
        parse_packet(q)


def test_not_a_packet():
    with pytest.raises(PacketError, match="torch.Tensor"):
        parse_packet(b"GWPK")
    with pytest.raises(PacketError, match="uint8"):
        parse_packet(torch.zeros(64, dtype=torch.int32))
    with pytest.raises(PacketError, match="at least"):
        parse_packet(torch.zeros(0, dtype=torch.uint8))


def test_build_rejects_bad_arguments():
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        build_packet(1, torch.float64, (2,), b"", torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(TypeError, match="payload"):
        build_packet(1, torch.float32, (2,), b"", torch.zeros(2, dtype=torch.int8))
    with pytest.raises(ValueError, match="dimensions"):
        build_packet(1, torch.float32, (1,) * 17, b"", torch.zeros(2, dtype=torch.uint8))


def test_check_config_names_both_configs():
    check_config({"bits": 6, "r": "n"}, {"bits": 6, "r": "n"}, ["bits"])
    with pytest.raises(PacketError, match=r"mismatch on \['bits'\].*'bits': 5.*'bits': 6"):
        check_config({"bits": 5}, {"bits": 6}, ["bits"])
