"""Hostile packets (issue 16, findings 1 and 2's decode side): a forged header with valid CRCs must
not make a receiver allocate more than the tensor it expects (codec.header.Expected), and every
forged field raises PacketError or decodes to the expected shape. Memory is measured as the growth
of the peak RSS in a child process (gradwire.testing.memory)."""
from __future__ import annotations

import pytest
import torch

from gradwire.codec import Expected, PacketError, build_codec
from gradwire.codec.header import build_packet, parse_packet
from gradwire.testing.memory import run_measured

# A prune packet with Rice-coded positions, nnz = 0 and k = 8 whose one gap spans 2**28 elements:
# 131 KB of payload, valid CRCs. Without an expectation the decode allocates the 1 GiB tensor.
FORGE_RICE = """
import torch
from gradwire.codec import build_codec
from gradwire.codec.bitpack import pack_bits
from gradwire.codec.fp import FORMAT_PARAMS
from gradwire.codec.header import build_packet
from gradwire.codec.prune import FLAG_FMT, FLAG_RICE, K_SHIFT, PRUNE_PARAMS
n, k = 2 ** 28, 8
q = n >> k                      # the one gap's quotient: q zero bits, then its terminator
bits = torch.zeros(q + 1, dtype=torch.uint8); bits[-1] = 1
payload = torch.cat([pack_bits(bits, 1), torch.zeros(1, dtype=torch.uint8)])  # + remainder 0
fmt = FORMAT_PARAMS.unpack(FORMAT_PARAMS.pack(4, 3, 7, 1, 1, 0))
params = PRUNE_PARAMS.pack(0.0, FLAG_FMT | FLAG_RICE | k << K_SHIFT, *fmt, 0, 0)
packet = build_packet(6, torch.float32, (n,), params, payload)
codec = build_codec({"name": "prune", "sparsity": 0.8})
del bits
out["packet_bytes"] = int(packet.numel())
"""


def test_forged_rice_packet_is_rejected_before_allocating():
    res = run_measured(FORGE_RICE, """
from gradwire.codec import Expected, PacketError
try:
    codec.decode(packet, expect=Expected((4096,), torch.float32))
    out["error"] = None
except PacketError as e:
    out["error"] = str(e)
""")
    assert res["packet_bytes"] < 140_000
    assert res["error"] and "shape: receiver expects (4096,)" in res["error"], res
    assert res["rss_growth_mib"] < 16, res  # the forged shape alone would cost 1024 MiB


def test_expected_dtype_size_and_shape_are_checked_first():
    codec = build_codec({"name": "fp", "bits": 6})
    p = codec.encode(torch.randn(4, 8))
    assert codec.decode(p, expect=Expected((4, 8), torch.float32)).shape == (4, 8)
    with pytest.raises(PacketError, match=r"src_dtype: receiver expects torch.bfloat16"):
        codec.decode(p, expect=Expected((4, 8), torch.bfloat16))
    with pytest.raises(PacketError, match=r"shape: receiver expects \(8, 4\), packet has \(4, 8\)"):
        codec.decode(p, expect=Expected((8, 4), torch.float32))
    with pytest.raises(PacketError, match="at most 10 bytes"):
        codec.decode(p, expect=Expected((4, 8), torch.float32, max_bytes=10))


CONFIGS = [
    {"name": "identity"}, {"name": "bf16"}, {"name": "fp8_e4m3"}, {"name": "fp8_e5m2"},
    {"name": "fp", "bits": 6}, {"name": "fp", "bits": 3},
    {"name": "prune", "sparsity": 0.8}, {"name": "prune", "sparsity": 0.99, "positions": "rice"},
    {"name": "prune", "sparsity": 0.5, "kept_bits": None, "positions": "rice"},
    {"name": "nm", "n": 2, "m": 4, "value_bits": 8}, {"name": "nm", "n": 1, "m": 2},
    {"name": "nm", "n": 3, "m": 8, "method": "greedy"},
]

# The fuzz loop, run in a child so that its peak RSS is its own. Each codec encodes a 1M-element
# float32 tensor (4 MiB decoded) and decodes it once (setup: working buffers are part of the
# baseline); then seeded forgeries of every header field that sizes an allocation -- shape,
# numel, nnz / n_alpha, the Rice k and flags, FP format bytes, N:M n/m/dim, payload length --
# re-checksummed, each decoded with the receiver's expectation.
FUZZ_SETUP = """
import random, struct, torch
from gradwire.codec import Expected, PacketError, build_codec
from gradwire.codec.header import build_packet, parse_packet
configs = %r
torch.set_num_threads(1)  # one allocator arena: the peak is a function of the seeded work alone
g = torch.Generator().manual_seed(0)
shape = (1024, 1024)
x = (torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(shape, generator=g)))
codecs = [build_codec(c) for c in configs]
packets = [c.encode(x, seed=1) for c in codecs]
expect = Expected(shape, torch.float32)
for c, p in zip(codecs, packets):
    c.decode(p, expect=expect)
"""

FUZZ = """
rnd = random.Random(16)
big = [0, 1, 7, 2**20, 2**28, 2**40, 2**62]
counts = {"error": 0, "decoded": 0, "other": []}
for c, p in zip(codecs, packets):
    h, payload = parse_packet(p)
    for trial in range(60):
        shp, params, pl, dt = list(h.shape), bytearray(h.params), payload, h.src_dtype
        kind = rnd.choice(["shape", "numel", "params", "tail", "payload", "dtype", "counts", "positions"])
        if kind == "shape":
            shp = [rnd.choice(big) for _ in range(rnd.randint(0, 3))]
        elif kind == "numel":
            shp = [rnd.choice(big), 1]
        elif kind == "params" and params:
            for _ in range(rnd.randint(1, 3)):
                params[rnd.randrange(len(params))] = rnd.randrange(256)
        elif kind == "tail" and len(params) >= 16:
            # prune: nnz and n_alpha are the last two u64 fields
            nnz = rnd.choice(big + [h.numel, h.numel - 1])
            params[-16:] = struct.pack("<QQ", nnz, rnd.choice([0, nnz, nnz // 2]))
        elif kind == "counts" and params:
            params[min(4, len(params) - 1)] = rnd.randrange(256)  # prune flag/k byte, nm value flag
        elif kind == "payload":
            cut = rnd.randrange(pl.numel() + 1)
            pl = torch.cat([pl[:cut], torch.randint(0, 256, (rnd.randrange(9),), dtype=torch.uint8)])
        elif kind == "positions" and pl.numel():
            pl = pl.clone()  # bytes at the front: bitmap or Rice streams (prune), N:M index metadata
            for _ in range(rnd.randint(1, 4)):
                pl[rnd.randrange(min(pl.numel(), 64))] = rnd.randrange(256)
        elif kind == "dtype":
            dt = rnd.choice([torch.bfloat16, torch.float16])
        q = build_packet(h.codec_id, dt, shp, bytes(params), pl, flags=h.flags)
        try:
            y = c.decode(q, expect=expect)
        except PacketError:
            counts["error"] += 1
            continue
        except Exception as e:
            counts["other"].append(f"{c.config()} {kind}: {type(e).__name__}: {e}"[:300])
            continue
        counts["decoded"] += 1
        if tuple(y.shape) != shape:
            counts["other"].append(f"{c.config()} {kind}: decoded shape {tuple(y.shape)}")
out.update(counts)
"""


def test_fuzz_forged_headers_every_codec_bounded_memory():
    res = run_measured(FUZZ_SETUP % (CONFIGS,), FUZZ)
    assert res["other"] == [], res["other"]
    assert res["error"] > 0.9 * 60 * len(CONFIGS) - res["decoded"]  # everything was tried
    # The decoded tensor is 4 MiB and the baseline already holds one decode of each codec; what
    # is left is the forgeries that decode plus allocator slack (measured 12.7 MiB with
    # memory.FIXED_MALLOC). A forged 2**28-element shape cost 1028 MiB before the fix.
    assert res["rss_growth_mib"] < 8 * 4, res


@pytest.mark.parametrize("cfg", CONFIGS, ids=[f"{c['name']}{i}" for i, c in enumerate(CONFIGS)])
def test_every_codec_checks_the_expectation(cfg):
    codec = build_codec(cfg)
    x = torch.randn(8, 16)
    p = codec.encode(x, seed=3)
    h, payload = parse_packet(p)
    assert codec.decode(p, expect=Expected((8, 16), torch.float32)).shape == (8, 16)
    # the same packet re-headed with a larger shape of the same payload size would pass every
    # codec check except the expectation
    forged = build_packet(h.codec_id, h.src_dtype, (16, 8), h.params, payload, flags=h.flags)
    with pytest.raises(PacketError, match="shape: receiver expects"):
        codec.decode(forged, expect=Expected((8, 16), torch.float32))
