"""Fuzzed decoding: truncated, bit-flipped, corrupted, mismatched and forged packets always raise
PacketError (never another exception, never a silent result); plus the registry."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from gradwire.codec import PacketError, build_codec, codec_class_for_packet, codec_names
from gradwire.codec.header import build_packet, parse_packet

CONFIGS = [
    {"name": "identity"}, {"name": "bf16"}, {"name": "fp8_e4m3"}, {"name": "fp8_e5m2"},
    {"name": "fp", "bits": 6}, {"name": "fp", "bits": 4, "exp_bits": 3, "rounding": "nearest"},
    {"name": "prune", "sparsity": 0.8}, {"name": "prune", "sparsity": 0.5, "kept_bits": None},
    # Rice-coded positions, forced (the 32-element packets here would pick the bitmap); kept
    # formats differ from the configs above so that mismatched receivers still disagree.
    {"name": "prune", "sparsity": 0.8, "kept_bits": 6, "positions": "rice"},
    {"name": "prune", "sparsity": 0.9, "rounding": "nearest", "positions": "rice"},
    {"name": "nm", "n": 2, "m": 4, "value_bits": 8}, {"name": "nm", "n": 1, "m": 2},
    {"name": "nm", "n": 3, "m": 8, "method": "greedy", "value_bits": 5},
]
IDS = [f"{c['name']}{i}" for i, c in enumerate(CONFIGS)]


def _x(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(4, 8, generator=g) * torch.exp(torch.randn(4, 8, generator=g))).to(dtype)


PACKETS = {i: build_codec(c).encode(_x(i, torch.bfloat16), seed=i) for i, c in enumerate(CONFIGS)}


@pytest.mark.parametrize("i", range(len(CONFIGS)), ids=IDS)
def test_truncations_and_extensions(i):
    codec, p = build_codec(CONFIGS[i]), PACKETS[i]
    codec.decode(p)  # the intact packet decodes
    for n in range(p.numel()):
        with pytest.raises(PacketError):
            codec.decode(p[:n])
    with pytest.raises(PacketError, match="payload_len"):
        codec.decode(torch.cat([p, torch.zeros(3, dtype=torch.uint8)]))


@pytest.mark.parametrize("i", range(len(CONFIGS)), ids=IDS)
def test_every_single_bit_flip(i):
    # CRC-32 detects all single-bit errors, in the header (header CRC) and the payload (payload CRC).
    codec, p = build_codec(CONFIGS[i]), PACKETS[i]
    for byte in range(p.numel()):
        for bit in range(8):
            q = p.clone()
            q[byte] ^= 1 << bit
            with pytest.raises(PacketError):
                codec.decode(q)


@settings(max_examples=150, deadline=None)
@given(i=st.integers(0, len(CONFIGS) - 1), data=st.data())
def test_random_corruption(i, data):
    codec, p = build_codec(CONFIGS[i]), PACKETS[i]
    n = p.numel()
    positions = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=8, unique=True))
    q = p.clone()
    for pos in positions:
        q[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(PacketError):  # miss probability 2**-32 per example; fixed examples never flake
        codec.decode(q)


@pytest.mark.parametrize("i", range(len(CONFIGS)), ids=IDS)
def test_mismatched_receivers(i):
    for j, cfg in enumerate(CONFIGS):
        if j == i:
            continue
        with pytest.raises(PacketError):
            build_codec(cfg).decode(PACKETS[i])


@settings(max_examples=200, deadline=None)
@given(i=st.integers(0, len(CONFIGS) - 1), data=st.data())
def test_forged_packets_with_valid_checksums(i, data):
    """Re-checksummed packets with altered shape / parameters / payload: the codec's own checks
    must reject every inconsistency (PacketError) or decode a tensor of the header's shape; never
    another exception, never a read out of bounds, never a huge allocation."""
    codec, p = build_codec(CONFIGS[i]), PACKETS[i]
    h, payload = parse_packet(p)
    shape = list(h.shape)
    params = bytearray(h.params)
    kind = data.draw(st.sampled_from(["shape", "params", "payload", "dtype", "codec_id"]))
    if kind == "shape":
        shape = data.draw(st.lists(st.sampled_from([0, 1, 2, 3, 4, 8, 16, 33, 2**40, 2**62]), max_size=4))
    elif kind == "params":
        if params:
            k = data.draw(st.integers(0, len(params) - 1))
            params[k] = data.draw(st.integers(0, 255))
        else:
            params = bytearray(data.draw(st.binary(min_size=1, max_size=4)))
    elif kind == "payload":
        cut = data.draw(st.integers(0, payload.numel()))
        extra = data.draw(st.binary(max_size=4))
        payload = torch.cat([payload[:cut], torch.tensor(list(extra), dtype=torch.uint8)])
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])) if kind == "dtype" else h.src_dtype
    cid = data.draw(st.integers(0, 255)) if kind == "codec_id" else h.codec_id
    q = build_packet(cid, dtype, shape, bytes(params), payload, flags=h.flags)
    try:
        y = codec.decode(q)
    except PacketError:
        return
    assert tuple(y.shape) == tuple(shape)


@pytest.mark.parametrize("kept_bits", [8, None])
def test_rice_streams_reject_every_rechecksummed_bit_flip_and_truncation(kept_bits):
    """Below the CRCs: re-checksummed packets whose Rice streams lost bytes or had one bit flipped.
    Every single flip is detectable by construction: a quotient bit adds or removes a code (count
    check), a remainder bit moves the gap sum by 2**j (sum check), a padding bit breaks bitpack's
    zero padding. So each must raise PacketError, never decode."""
    from gradwire.codec.prune import FLAG_RICE, K_SHIFT, PRUNE_PARAMS, PruneCodec

    codec = PruneCodec(0.8, kept_bits=kept_bits, positions="rice")
    g = torch.Generator().manual_seed(1)
    p = codec.encode(torch.randn(300, generator=g) * torch.exp(2 * torch.randn(300, generator=g)), seed=1)
    h, payload = parse_packet(p)
    f = PRUNE_PARAMS.unpack(h.params)
    nnz, k = f[-2], f[1] >> K_SHIFT
    assert f[1] & FLAG_RICE and k > 0
    rice_bytes = payload.numel() - sum([(nnz + 7) // 8, (f[-1] + 7) // 8]) - (nnz - f[-1]) * (1 if kept_bits else 4)

    def repack(pl):
        return build_packet(h.codec_id, h.src_dtype, h.shape, h.params, pl)

    for byte in range(rice_bytes):
        for bit in range(8):
            bad = payload.clone()
            bad[byte] ^= 1 << bit
            with pytest.raises(PacketError):
                codec.decode(repack(bad))
        # drop this byte / insert a zero byte here: the section lengths no longer agree
        with pytest.raises(PacketError):
            codec.decode(repack(torch.cat([payload[:byte], payload[byte + 1:]])))
        with pytest.raises(PacketError):
            codec.decode(repack(torch.cat([payload[:byte], torch.zeros(1, dtype=torch.uint8), payload[byte:]])))


def test_huge_forged_shape_is_rejected_before_allocation():
    codec = build_codec({"name": "fp", "bits": 6})
    h, payload = parse_packet(codec.encode(_x()))
    for shape in [(2**40, 2**20), (2**62,), (10**9, 10**9)]:
        with pytest.raises(PacketError, match="payload_len"):
            codec.decode(build_packet(h.codec_id, h.src_dtype, shape, h.params, payload))


def test_registry_builds_and_round_trips_configs():
    assert codec_names() == sorted(["identity", "bf16", "fp8_e4m3", "fp8_e5m2", "fp", "prune", "nm"])
    x = _x(3)
    for cfg in CONFIGS:
        c = build_codec(cfg)
        c2 = build_codec(c.config())  # config() rebuilds an equal codec
        assert c2.config() == c.config() and type(c2) is type(c)
        p = c.encode(x, seed=5)
        assert torch.equal(p, c2.encode(x, seed=5))
        assert codec_class_for_packet(p) is type(c)
    assert build_codec("fp", bits=5).config() == build_codec({"name": "fp", "bits": 5}).config()


def test_registry_errors():
    with pytest.raises(ValueError, match=r"unknown codec 'fp7'; known codecs: \['bf16', 'fp'"):
        build_codec({"name": "fp7"})
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['bit'\]; accepted: \['bits', 'exp_bits', 'rounding', 'scale', 'split'\]"):
        build_codec("fp", bit=6)
    with pytest.raises(ValueError, match="'name'"):
        build_codec({"bits": 6})
    with pytest.raises(TypeError):
        build_codec(6)
    with pytest.raises(ValueError, match="bits"):
        build_codec("fp", bits=12)
    with pytest.raises(PacketError):
        codec_class_for_packet(build_packet(200, torch.float32, (1,), b"", torch.zeros(4, dtype=torch.uint8)))
