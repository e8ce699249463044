"""The config handshake under hostile or mismatched peers (issue 16, findings 2 and 5): a peer's
announced fingerprint length is bounded before anything is allocated, the buffer is zero-filled,
and the fingerprint covers the settings that size a packet (a boundary's warm-up steps), naming
the setting and both values on both ranks before the first packet."""
from __future__ import annotations

import resource

import torch
import torch.distributed as dist

from gradwire.comm import ConfigMismatchError, PacketChannel
from gradwire.comm.handshake import MAX_FINGERPRINT_BYTES, check_peer
from gradwire.testing.codecs import CastCodec
from gradwire.testing.launch import run_workers, values


def _peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _hostile_sender(rank, world, announced, sent_bytes):
    if rank == 0:
        # the lower rank sends first in exchange_with_peer: length, then the bytes
        dist.send(torch.tensor([announced], dtype=torch.int64), 1)
        if sent_bytes is not None:
            dist.send(torch.tensor(list(sent_bytes), dtype=torch.uint8), 1)
            n = torch.empty(1, dtype=torch.int64)
            dist.recv(n, 1)
            dist.recv(torch.empty(int(n.item()), dtype=torch.uint8), 1)
        return None
    # fill the heap with a recognisable pattern first, so that uninitialised memory would show
    junk = torch.full((1 << 20,), 0x41, dtype=torch.uint8)
    del junk
    rss0 = _peak_mib()
    try:
        check_peer(CastCodec(), 0)
        err = None
    except ConfigMismatchError as e:
        err = str(e)
    return {"error": err, "growth_mib": _peak_mib() - rss0}


def test_announced_fingerprint_length_is_bounded_before_allocating():
    res = values(run_workers(_hostile_sender, 2, 1 << 26, None, timeout_s=120))[1]
    assert res["error"] and f"announced a {1 << 26}-byte fingerprint; expected 0..{MAX_FINGERPRINT_BYTES}" \
        in res["error"], res
    assert res["growth_mib"] < 8, res  # the announced length alone would be 64 MiB


def test_short_fingerprint_message_leaves_no_uninitialised_bytes():
    # the peer announces 64 bytes and sends 5: what was not received reads as zeros
    res = values(run_workers(_hostile_sender, 2, 64, b"hello", timeout_s=120))[1]
    err = res["error"]
    assert err and "rank 0 sent an unreadable fingerprint 'hello" in err, err
    tail = err.split("rank 0 has ")[-1]
    assert tail.rstrip(")").startswith("hello") and set(tail.rstrip(")")[5:]) <= {"\x00"}, repr(tail)
    assert "A" not in tail


def _settings_worker(rank, world):
    res = {}
    ch = PacketChannel(CastCodec(), 1 - rank, settings={"warmup_steps": 2 * rank})
    try:
        ch.send(torch.ones(8), 0) if rank == 0 else ch.recv((8,), torch.float32)
    except ConfigMismatchError as e:
        res["p2p"] = str(e)
    return res


def test_packet_channel_settings_mismatch_names_setting_and_values_on_both_ranks():
    for r, v in enumerate(values(run_workers(_settings_worker, 2, timeout_s=120))):
        assert f"settings.warmup_steps: rank {r} has {2 * r}, rank {1 - r} has {2 * (1 - r)}" in v["p2p"], v


def _engine_worker(rank, world):
    """Two DeepSpeed pipeline engines whose gradwire sections differ only in warmup_steps: during
    warm-up one sends identity packets while the other waits for FP6-sized ones (before the fix:
    gloo aborted the process, rc=134). The handshake (what _gw_send_grads/_gw_recv_grads run
    first) must fail on both ranks naming the setting."""
    import gradwire.integrations.deepspeed as gw_ds
    from gradwire.config import parse_gradwire

    cfg = parse_gradwire({"codec": {"name": "fp", "bits": 6}, "warmup_steps": 3 * rank})
    e = object.__new__(gw_ds.GradwirePipelineEngine)  # only the handshake is exercised
    e._gw_checked, e.device = set(), torch.device("cpu")
    e.train_micro_batch_size_per_gpu = lambda: 4
    e.fp16_enabled = e.bfloat16_enabled = lambda: False
    policy = gw_ds.make_policy(cfg, 0)
    try:
        e._gw_handshake(policy, 1 - rank)
    except ConfigMismatchError as err:
        return str(err)
    return None


def test_deepspeed_handshake_covers_warmup_steps():
    for r, msg in enumerate(values(run_workers(_engine_worker, 2, timeout_s=120))):
        assert msg and f"settings.warmup_steps: rank {r} has {3 * r}, rank {1 - r} has {3 * (1 - r)}" in msg, msg
