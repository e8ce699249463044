"""The device CRC-32 (gradwire.codec.crc32) equals zlib's, byte for byte, for every length class.

The tensor path is what runs for GPU payloads; here it runs on the CPU tensors directly (the
same integer ops), against zlib."""
from __future__ import annotations

import zlib

import pytest
import torch

from gradwire.codec.crc32 import CHUNK, crc32, crc32_tensor


@pytest.mark.parametrize("n", [1, 2, 3, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK - 1, 3 * CHUNK, 100, 1000, 4096,
                               65537, (1 << 20) + 3, (1 << 21) * CHUNK // CHUNK + 5])
def test_tensor_path_equals_zlib(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
    assert crc32_tensor(x) == zlib.crc32(x.numpy()) & 0xFFFFFFFF


@pytest.mark.parametrize("fill", [0, 255])
def test_constant_payloads(fill):
    for n in (1, 17, 4099):
        x = torch.full((n,), fill, dtype=torch.uint8)
        assert crc32_tensor(x) == zlib.crc32(x.numpy())


def test_dispatch_and_empty():
    x = torch.arange(50, dtype=torch.uint8)
    assert crc32(x) == zlib.crc32(x.numpy()) and crc32(x[::2]) == zlib.crc32(x[::2].contiguous().numpy())
    assert crc32(torch.empty(0, dtype=torch.uint8)) == 0 == crc32_tensor(torch.empty(0, dtype=torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_payload_crc_equals_zlib():
    for n in (1, 17, 1 << 20, (1 << 24) + 9):
        x = torch.randint(0, 256, (n,), dtype=torch.uint8)
        assert crc32(x.cuda()) == zlib.crc32(x.numpy()) & 0xFFFFFFFF
