"""report.WireLog: rows, the sigma of log2|g| per row, and no host synchronisation while
recording on an accelerator (checked with ``meta`` tensors, which cannot be read back at all)."""
import math

import torch

from gradwire.report import WireLog, WireRow, sigma_log2


def _ref_sigma(x):
    a = x.detach().double().abs().reshape(-1)
    a = a[(a > 0) & torch.isfinite(a)]
    return float("nan") if a.numel() < 2 else float(torch.log2(a).std())


def test_sigma_log2_matches_the_float64_reference():
    g = torch.Generator().manual_seed(0)
    big = torch.randn(4096, generator=g) * torch.exp(2 * torch.randn(4096, generator=g))
    cases = [big, big.bfloat16(), torch.tensor([0.0, 2.0, 8.0, float("nan"), -float("inf")])]
    for x in cases:
        # float32 sums of n <= 4096 terms of size <= ~30: relative error well under 1e-5
        assert math.isclose(sigma_log2(x), _ref_sigma(x), rel_tol=1e-5), x.dtype
    for x in (torch.zeros(5), torch.tensor([1.0, float("inf")]), torch.tensor([3.0])):
        assert math.isnan(sigma_log2(x))  # fewer than two finite nonzero entries


def test_record_defers_the_host_read_on_accelerators():
    log = WireLog()
    pk = torch.zeros(3, dtype=torch.uint8)
    log.record(0, 0, torch.tensor([1.0, 4.0]), pk, 3, "a")
    # a meta tensor cannot be copied to the host: recording it must not try
    log.record(1, 1, torch.ones(4, device="meta"), pk, 3, "b")
    assert len(log._pending) == 1
    fields, _ = log._pending[0]
    log._pending[0] = (fields, torch.tensor(0.5))  # what the device would hold; read at `rows`
    rows = log.rows
    assert rows == [WireRow(0, 0, 8, 3, 3, 1.4142135381698608, "a"), WireRow(1, 1, 16, 3, 3, 0.5, "b")]
    log.extend([{"step": 2, "boundary": 0, "raw_bytes": 1, "sent_bytes": 1, "predicted_bytes": 1,
                 "sigma_log2": 0.0, "fmt": "c"}])
    assert [r.step for r in log.rows] == [0, 1, 2] and log.per_step()[1]["raw"] == 16
