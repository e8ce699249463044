"""How long gradwire waits for a peer: the ``"gradwire": {"timeout": seconds}`` setting.

Without it every gradwire wait lasts as long as the process group allows (DeepSpeed's default
is 10 minutes, changed only by its ``DEEPSPEED_TIMEOUT`` environment variable, in minutes; torch's
``init_process_group(timeout=...)`` otherwise), so a stalled -- not dead -- peer held the survivor
for that long. With it, every exchange gradwire makes (config handshake, packet sends and
receives, the collectives' all-to-alls) is issued asynchronously and waited for at most that
long, then fails with ``PeerTimeoutError`` naming the exchange. ``launch/train.py`` also gives the
same value to ``deepspeed.init_distributed``, so DeepSpeed's own waits use it too.
"""
from __future__ import annotations

import datetime
import math
from typing import Iterable

_TIMEOUT_S: float | None = None


def check_timeout(seconds) -> float | None:
    """``seconds`` as a float > 0 (None: no gradwire timeout); ValueError otherwise."""
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not (
            math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"timeout must be a number of seconds > 0, got {seconds!r}")
    return float(seconds)


def set_timeout(seconds: float | None) -> None:
    """Set the process-wide gradwire wait limit (None: the process group's own timeout)."""
    global _TIMEOUT_S
    _TIMEOUT_S = check_timeout(seconds)


def get_timeout() -> float | None:
    return _TIMEOUT_S


def wait_all(works: Iterable, what: str) -> None:
    """Wait for each ``torch.distributed`` work handle, each for at most the gradwire timeout;
    backend errors (a timeout included) become gradwire errors naming ``what``."""
    from gradwire.comm.errors import PeerTimeoutError, comm_guard

    t = _TIMEOUT_S
    with comm_guard(what):
        for w in works:
            if t is None:
                w.wait()
            elif w.wait(timeout=datetime.timedelta(seconds=t)) is False:  # backends that return
                raise PeerTimeoutError(f"{what}: no answer within gradwire.timeout = {t:g} s")


def send(tensor, dst: int, *, group=None, tag: int = 0, what: str) -> None:
    """Blocking send of ``tensor`` to global rank ``dst``, waiting at most the gradwire timeout.

    Without a timeout this is ``dist.send`` itself (what the wire-byte counter of the tests
    wraps); with one, ``isend`` plus a timed wait (a blocking send has no timeout argument)."""
    import torch.distributed as dist

    from gradwire.comm.errors import comm_guard

    if _TIMEOUT_S is None:
        with comm_guard(what):
            dist.send(tensor, dst, group=group, tag=tag)
        return
    with comm_guard(what):
        work = dist.isend(tensor, dst, group=group, tag=tag)
    wait_all([work], what)


def recv(tensor, src: int, *, group=None, tag: int = 0, what: str) -> None:
    """Blocking receive into ``tensor`` from global rank ``src`` (as ``send``)."""
    import torch.distributed as dist

    from gradwire.comm.errors import comm_guard

    if _TIMEOUT_S is None:
        with comm_guard(what):
            dist.recv(tensor, src, group=group, tag=tag)
        return
    with comm_guard(what):
        work = dist.irecv(tensor, src, group=group, tag=tag)
    wait_all([work], what)
