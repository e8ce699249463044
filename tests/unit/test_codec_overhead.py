"""Header overhead and predicted sizes across every codec, at the 64K-element scale of the issue."""
import pytest
import torch

from gradwire.codec import build_codec
from gradwire.codec.header import parse_packet

CONFIGS = [
    {"name": "identity"}, {"name": "bf16"}, {"name": "fp8_e4m3"}, {"name": "fp8_e5m2"},
    {"name": "fp", "bits": 4}, {"name": "fp", "bits": 6}, {"name": "fp", "bits": 8, "scale": "amax"},
    {"name": "prune", "sparsity": 0.9}, {"name": "prune", "sparsity": 0.99},
    {"name": "nm", "n": 2, "m": 4, "value_bits": 8}, {"name": "nm", "n": 1, "m": 2, "value_bits": 4},
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("shape", [(65536,), (64, 32, 32), (2, 2, 2, 8192)])
def test_header_overhead_below_one_percent(cfg, shape):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(shape, generator=g))).to(torch.bfloat16)
    c = build_codec(cfg)
    p = c.encode(x)
    h, _ = parse_packet(p)
    payload_bits_per_element = 8 * (p.numel() - h.header_len) / x.numel()
    if payload_bits_per_element >= 1.0:
        assert h.header_len / p.numel() < 0.01, (h.header_len, p.numel())
    else:
        # Rice-coded prune at S=0.99 sends ~0.11 bits/element: no versioned, checksummed header
        # is 1% of that (it would need 8 bytes). Bound the header itself instead, and keep the
        # 1% claim for the bitmap layout of the same packet.
        assert h.header_len <= 64, h.header_len
        bitmap = build_codec(dict(cfg, positions="bitmap")).encode(x)
        assert parse_packet(bitmap)[0].header_len / bitmap.numel() < 0.01
    if c.fixed_rate:
        assert p.numel() == c.packed_size(shape, x.dtype)
    else:
        assert p.numel() <= c.max_packed_size(shape, x.dtype)


def test_prune_extreme_target_on_fp16():
    # a threshold above the fp16 range is capped instead of failing
    x = torch.tensor([60000.0, -65504.0, 1.0, 2.0] * 8, dtype=torch.float16)
    c = build_codec({"name": "prune", "sparsity": 0.999})
    y = c.decode(c.encode(x))
    assert torch.isfinite(y).all() and y.dtype == torch.float16
