"""Results gathered across ranks without pickle (issue 16, finding 10): ``all_gather_json`` moves
UTF-8 JSON through the packet all-gather, bounded before anything is allocated. launch/train.py
gathers its telemetry with it (test_main_job's multi-rank runs read the gathered report)."""
from __future__ import annotations

import torch.distributed as dist

from gradwire.comm import CommError
from gradwire.comm.collectives import all_gather_json
from gradwire.comm.timeout import set_timeout
from gradwire.testing.launch import run_workers, values


def _gather_worker(rank, world):
    res = {}
    calls = []
    orig = dist.all_gather_object
    dist.all_gather_object = lambda *a, **k: calls.append(a) or orig(*a, **k)  # must stay unused
    try:
        res["got"] = all_gather_json({"rank": rank, "rows": [{"step": 1, "sigma": 1.5}] * rank, "s": "é"})
    finally:
        dist.all_gather_object = orig
    res["pickle_calls"] = len(calls)
    # a peer announcing more than the bound is refused before the buffer exists
    set_timeout(5.0)  # the ranks that pass the check then wait for the one that refused
    try:
        all_gather_json("x" * (1000 if rank == 0 else 1), max_bytes=10_000 if rank == 0 else 100)
        res["big"] = None
    except (CommError, ValueError) as e:
        res["big"] = f"{type(e).__name__}: {e}"
    return res


def test_all_gather_json_round_trips_without_pickle_and_bounds_sizes():
    vals = values(run_workers(_gather_worker, 3, timeout_s=120))
    for r, v in enumerate(vals):
        assert v["got"] == [{"rank": i, "rows": [{"step": 1, "sigma": 1.5}] * i, "s": "é"} for i in range(3)]
        assert v["pickle_calls"] == 0
    for v in vals[1:]:  # rank 0 announced 1002 bytes: refused before the receive buffer exists
        assert "CommError: rank 0 announced a packet of 1002 bytes; expected 0..100" in v["big"], v
    assert vals[0]["big"] is not None  # and rank 0, left waiting, times out instead of hanging
