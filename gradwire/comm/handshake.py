"""Config fingerprints, exchanged once per link or group so that a misconfigured rank fails at
its first exchange with a message naming both configurations (instead of decoding garbage or
failing later with a shape error).

A fingerprint covers everything that changes the layout or size of a packet: the codec's
configuration, the wire version and the caller's ``settings`` (e.g. a boundary's warm-up steps,
during which packets go uncompressed: two ranks that disagree on it would post receives of the
wrong size, and gloo aborts the process on that). A mismatch names each differing setting with
both values, on both ranks, before the first packet.

The peer's fingerprint length is bounded (``MAX_FINGERPRINT_BYTES``) before its buffer is
allocated, and the buffer is zero-filled, so a hostile or corrupt length cannot allocate much and
no uninitialised memory can reach an error message.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

import torch
import torch.distributed as dist

from gradwire.codec.base import Codec
from gradwire.comm.errors import ConfigMismatchError, comm_guard
from gradwire.comm import timeout as timed


def _wire_version() -> Any:
    """The packet-format version of the installed codec package, when it declares one."""
    try:
        from gradwire.codec import header
    except ImportError:  # codec package not installed yet: the codec config alone decides
        return None
    for name in ("FORMAT_VERSION", "VERSION", "WIRE_VERSION"):
        if hasattr(header, name):
            return getattr(header, name)
    return None


MAX_FINGERPRINT_BYTES = 1 << 16  # real ones are a few hundred bytes


def codec_fingerprint(codec: Codec, settings: Mapping[str, Any] | None = None) -> str:
    """Canonical JSON of everything two ends must agree on: codec name, id, config, wire version,
    and ``settings`` (other values that change a packet's layout or size, module docstring).

    A codec may also carry ``format_version`` (a per-codec packet layout version)."""
    desc = {
        "codec": codec.name,
        "codec_id": codec.codec_id,
        "config": codec.config(),
        "format_version": getattr(codec, "format_version", None),
        "wire_version": _wire_version(),
    }
    if settings:
        desc["settings"] = dict(settings)
    return json.dumps(desc, sort_keys=True, default=str)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, Mapping):
        return {prefix or "fingerprint": d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flatten(v, key) if isinstance(v, Mapping) and v else {key: v})
    return out


def describe_mismatch(mine: str, theirs: str, me: int, other: int) -> str:
    """``setting: rank a has X, rank b has Y`` for every differing (dotted) key of two fingerprints."""
    try:
        a, b = _flatten(json.loads(mine)), _flatten(json.loads(theirs))
    except ValueError:  # not JSON (a foreign or much older peer): show it, escaped
        return f"rank {other} sent an unreadable fingerprint {theirs[:200]!r}"
    diffs = [f"{k}: rank {me} has {json.dumps(a.get(k))}, rank {other} has {json.dumps(b.get(k))}"
             for k in sorted(set(a) | set(b)) if a.get(k, _MISSING) != b.get(k, _MISSING)]
    return "; ".join(diffs)


_MISSING = object()


def default_device(group=None) -> torch.device:
    """Where packets live for ``group``'s backend: the current CUDA device under NCCL (it only
    moves CUDA tensors), the CPU otherwise (gloo)."""
    if not dist.is_initialized():
        return torch.device("cpu")
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _to_bytes(s: str, device: torch.device) -> torch.Tensor:
    return torch.tensor(list(s.encode("utf-8")), dtype=torch.uint8, device=device)


def _from_bytes(t: torch.Tensor) -> str:
    # errors="replace": a peer's bytes reach an error message, never a UnicodeDecodeError
    return bytes(t.cpu().tolist()).decode("utf-8", errors="replace")


def _peer_buffer(n: int, peer: int, device: torch.device) -> torch.Tensor:
    """A zero-filled buffer for the peer's fingerprint, after bounding its announced length."""
    if not 0 <= n <= MAX_FINGERPRINT_BYTES:
        raise ConfigMismatchError(f"config handshake: rank {peer} announced a {n}-byte fingerprint; "
                                  f"expected 0..{MAX_FINGERPRINT_BYTES} (not a gradwire peer, or a corrupt stream)")
    return torch.zeros(n, dtype=torch.uint8, device=device)


def exchange_with_peer(fingerprint: str, peer: int, group, device: torch.device) -> str:
    """Swap fingerprints with one peer (both sides call this). Returns the peer's fingerprint.

    The lower rank sends first and the higher rank receives first, so blocking gloo sends
    cannot deadlock. Lengths go first because the two strings may differ in size."""
    me = dist.get_rank(group)
    mine = _to_bytes(fingerprint, device)
    n_mine = torch.tensor([mine.numel()], dtype=torch.int64, device=device)
    n_peer = torch.empty(1, dtype=torch.int64, device=device)
    gpeer = peer if group is None else dist.get_global_rank(group, peer)
    what = f"config handshake with rank {peer}"  # every wait at most gradwire.timeout
    if me < peer:
        timed.send(n_mine, gpeer, group=group, what=what)
        timed.send(mine, gpeer, group=group, what=what)
    timed.recv(n_peer, gpeer, group=group, what=what)
    theirs = _peer_buffer(int(n_peer.item()), peer, device)
    timed.recv(theirs, gpeer, group=group, what=what)
    if me > peer:
        timed.send(n_mine, gpeer, group=group, what=what)
        timed.send(mine, gpeer, group=group, what=what)
    return _from_bytes(theirs)


def check_peer(codec: Codec, peer: int, group=None, device: torch.device | str | None = None, *,
               settings: Mapping[str, Any] | None = None) -> None:
    """Raise ``ConfigMismatchError`` (on both ranks) if ``peer`` runs a different codec config or
    ``settings``. ``device``: where the fingerprint messages live (None: ``default_device(group)``)."""
    mine = codec_fingerprint(codec, settings)
    dev = default_device(group) if device is None else torch.device(device)
    theirs = exchange_with_peer(mine, peer, group, dev)
    if theirs != mine:
        me = dist.get_rank(group)
        raise ConfigMismatchError(
            f"codec config mismatch between rank {me} and rank {peer}: "
            f"{describe_mismatch(mine, theirs, me, peer)} (rank {me} has {mine}; rank {peer} has {theirs})"
        )


# Verified (group, fingerprint) pairs. Keyed by the id of the process-group object, with the
# object itself kept as the value: holding it keeps the id from being reused by a later group
# (ids of garbage-collected objects are recycled), and ``group=None`` is resolved to the current
# default group, so a destroyed and re-initialised default group is handshaken again.
_CHECKED: dict[tuple[int, str], Any] = {}


def _group_object(group):
    return group if group is not None else dist.distributed_c10d._get_default_group()


def check_group(codec: Codec, group=None, device: torch.device | str | None = None, *,
                force: bool = False, settings: Mapping[str, Any] | None = None) -> None:
    """Raise ``ConfigMismatchError`` on every rank of ``group`` unless all fingerprints agree.

    Collective: every rank must call it. Done once per (group, config) unless ``force``; the
    collectives call it at their first use, so this is the "first exchange" check."""
    from gradwire.comm.collectives import all_gather_bytes  # late: collectives imports us

    mine = codec_fingerprint(codec, settings)
    gobj = _group_object(group)
    key = (id(gobj), mine)
    if key in _CHECKED and not force:
        return
    with comm_guard("config handshake (all_gather of codec fingerprints)"):
        dev = default_device(group) if device is None else torch.device(device)
        p = dist.get_world_size(group)
        all_fp = [_from_bytes(t) for t in all_gather_bytes(_to_bytes(mine, dev), group,
                                                           max_sizes=[MAX_FINGERPRINT_BYTES] * p)]
    bad = [r for r, fp in enumerate(all_fp) if fp != all_fp[0]]
    if bad:
        me = dist.get_rank(group)
        other = bad[0] if me == 0 else 0
        if all_fp[other] == mine:  # name a rank that actually differs from this one
            other = next(r for r, fp in enumerate(all_fp) if fp != mine)
        raise ConfigMismatchError(
            f"codec config mismatch in the process group: "
            f"{describe_mismatch(mine, all_fp[other], me, other)} "
            f"(rank {me} has {mine}; rank {other} has {all_fp[other]})"
        )
    _CHECKED[key] = gobj
