"""Packets are device-independent: encoding on CUDA gives the CPU bytes, on the tensor's device."""
import pytest
import torch

from gradwire.codec import build_codec

CONFIGS = [
    {"name": "identity"}, {"name": "bf16"}, {"name": "fp8_e4m3"}, {"name": "fp8_e5m2"},
    {"name": "fp", "bits": 6}, {"name": "fp", "bits": 4, "scale": "amax"},
    {"name": "fp", "bits": 3}, {"name": "fp", "bits": 5}, {"name": "fp", "bits": 7}, {"name": "fp", "bits": 8},
    {"name": "fp", "bits": 6, "rounding": "nearest"},
    {"name": "prune", "sparsity": 0.9}, {"name": "prune", "sparsity": 0.8, "kept_bits": None},
    {"name": "nm", "n": 2, "m": 4, "value_bits": 8}, {"name": "nm", "n": 1, "m": 2},
    {"name": "nm", "n": 2, "m": 4, "method": "mvue_approx"},
    {"name": "nm", "n": 2, "m": 8, "method": "greedy", "value_bits": 5},
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_packets_equal_cpu_packets(cfg, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(24, 40, generator=g) * torch.exp(2 * torch.randn(24, 40, generator=g))).to(dtype)
    x[3, 5] = float("nan")
    c = build_codec(cfg)
    p_cpu = c.encode(x, seed=7)
    p_gpu = c.encode(x.cuda(), seed=7)
    assert p_gpu.device.type == "cuda"
    assert torch.equal(p_gpu.cpu(), p_cpu)
    y_gpu = c.decode(p_gpu)
    assert y_gpu.device.type == "cuda"
    torch.testing.assert_close(y_gpu.cpu(), c.decode(p_cpu), rtol=0, atol=0, equal_nan=True)


# Odd sizes: partial bit-packing groups, one element, prime lengths. N:M shapes keep the last
# dimension a multiple of M=8 (the codec's block axis).
ODD_SHAPES = [(1,), (7,), (4099,), (3, 333), (13, 24)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_packets_equal_cpu_packets_odd_sizes(cfg, dtype):
    c = build_codec(cfg)
    for shape in ODD_SHAPES:
        if cfg["name"] == "nm" and shape[-1] % cfg.get("m", 4):
            continue
        g = torch.Generator().manual_seed(sum(shape))
        x = (torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(shape, generator=g))).to(dtype)
        p_cpu = c.encode(x, seed=11)
        p_gpu = c.encode(x.cuda(), seed=11)
        assert torch.equal(p_gpu.cpu(), p_cpu), shape
        torch.testing.assert_close(c.decode(p_gpu).cpu(), c.decode(p_cpu), rtol=0, atol=0, equal_nan=True)
