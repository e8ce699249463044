"""A stalled (not dead) peer (issue 16, finding 6): with ``"gradwire": {"timeout": s}`` every
gradwire wait gives up after s seconds with a PeerTimeoutError naming the exchange and the
setting, instead of waiting for the process group's timeout (DeepSpeed's: 10 minutes)."""
from __future__ import annotations

import time

import pytest
import torch

from gradwire.comm import PacketChannel, PeerTimeoutError, compressed_all_reduce
from gradwire.comm.timeout import set_timeout
from gradwire.config import ConfigError, parse_gradwire
from gradwire.testing.codecs import CastCodec
from gradwire.testing.launch import run_workers, values

STALL_S, TIMEOUT_S, PG_TIMEOUT_S = 12.0, 2.0, 20.0


def _stall_worker(rank, world, case):
    set_timeout(TIMEOUT_S)
    if rank == 0:  # alive but stalled: never answers within the survivors' patience
        time.sleep(STALL_S)
        return None
    t0 = time.monotonic()
    try:
        if case == "p2p":
            PacketChannel(CastCodec(), 0).recv((8,), torch.float32)
        else:
            compressed_all_reduce(torch.ones(64), CastCodec())
    except PeerTimeoutError as e:
        return {"error": str(e), "elapsed": time.monotonic() - t0}
    return {"error": None}


@pytest.mark.parametrize("case,world", [("p2p", 2), ("collective", 3)])
def test_stalled_peer_times_out_after_the_gradwire_timeout(case, world):
    res = values(run_workers(_stall_worker, world, case, pg_timeout_s=PG_TIMEOUT_S, timeout_s=120))
    for v in res[1:]:
        assert v["error"] and "gradwire.timeout = 2 s" in v["error"] and "config handshake" in v["error"], v
        assert v["elapsed"] < STALL_S - 2, v  # gave up long before the stall (and the 20 s group timeout)


def test_timeout_key_is_validated():
    assert parse_gradwire({"timeout": 30}).timeout == 30.0
    assert parse_gradwire({}).timeout is None
    for bad in (0, -1, "10", float("nan"), True):
        with pytest.raises(ConfigError, match="gradwire.timeout must be a number of seconds > 0"):
            parse_gradwire({"timeout": bad})
