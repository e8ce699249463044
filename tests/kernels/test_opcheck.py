"""torch.library.opcheck on every gradwire op (schema, fake kernel, dispatch registrations)."""
from __future__ import annotations

import pytest
import torch

from gradwire import ops
from tests.kernels._native import lognormal_sample, require_native_cpu


def _samples():
    x = lognormal_sample(37, seed=1)
    xn = torch.nan_to_num(x, nan=0.0)
    codes = torch.randint(0, 64, (37,), dtype=torch.int64).to(torch.uint8)
    # opcheck compares eager and traced outputs with assert_close(equal_nan=False), so the
    # decode samples avoid the NaN code (32 for 6-bit formats); NaN decoding is tested elsewhere.
    codes[codes == 32] = 0
    packed6 = ops.REFERENCES["pack_bits"](codes, 6)
    return {
        "pack_bits": [(codes, 6), (codes[:0], 3)],
        "unpack_bits": [(packed6, 6, 37)],
        "fp_encode": [(x, 4, 1, 7, True, 3, True, 11, 5), (x.to(torch.bfloat16), 5, 2, 15, False, 0, False, 0, 0),
                      (x.to(torch.float16), 4, 1, 7, True, 3, True, 11, 5, False)],
        "fp_decode": [(packed6, 37, 4, 1, 7, True, 3, torch.float32), (packed6, 37, 3, 2, 3, False, -2, torch.bfloat16)],
        "moment_stats": [(x,), (x.to(torch.float16),)],
        "rng_u32": [(5, torch.arange(40, dtype=torch.int64))],
        # NaN passes through pruning and opcheck's comparison is not NaN-equal: drop it here.
        "nm_select": [(xn.reshape(-1)[:36], 0, 3, 1), (xn.reshape(-1)[:36], 1, 0, 0), (xn.reshape(-1)[:36].to(torch.float16), 2, 9, 4)],
        "stochastic_prune": [(xn, 0.5, 3, 7), (xn.to(torch.bfloat16), 0.25, 0, 0), (xn, 0.0, 1, 0)],
    }


@pytest.mark.parametrize("name", list(ops.SCHEMAS))
def test_opcheck(name):
    require_native_cpu()
    op = getattr(torch.ops.gradwire, name).default
    for args in _samples()[name]:
        torch.library.opcheck(op, args)


def test_every_op_has_a_sample():
    assert set(_samples()) == set(ops.SCHEMAS)
