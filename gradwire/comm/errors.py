"""Errors raised by the communication layer.

Every failure of a torch.distributed call made by gradwire surfaces as a ``CommError`` whose
message names the operation and the peer, instead of a bare backend error or a hang.
"""
from __future__ import annotations

import contextlib
import re
from typing import Iterator

import torch.distributed


class CommError(RuntimeError):
    """A gradwire exchange failed."""


class ConfigMismatchError(CommError):
    """Two ranks that exchange packets are configured with different codecs or wire versions."""


class PeerTimeoutError(CommError):
    """A peer did not answer within the process-group timeout, or closed its connection."""


# What gloo and NCCL say when a peer is gone or silent (gloo raises plain ``RuntimeError``s with
# these texts, e.g. "Timed out waiting 3000ms for recv operation to complete", "Application
# timeout caused pair closure", "Connection closed by peer"; NCCL raises ``DistBackendError``).
_PEER_FAILURE = re.compile(r"timed out|timeout|closed|closure|connection|reset by peer|broken pipe|"
                           r"socket|abort|watchdog|remote process|unhandled system error",
                           re.IGNORECASE)
# NCCL reports its usage errors through the same ``DistBackendError`` type: not a peer failure.
_USAGE = re.compile(r"invalid usage|invalid argument", re.IGNORECASE)


def is_peer_failure(e: BaseException) -> bool:
    """True when ``e`` looks like a dead/silent peer or a broken transport, not a programming error
    (a split-size mismatch, a tensor on the wrong device, a bad rank), which must not be reported
    as a timeout."""
    if not isinstance(e, RuntimeError) or _USAGE.search(str(e)):
        return False
    # DistBackendError / DistNetworkError / DistStoreError, or gloo's plain RuntimeError texts
    return isinstance(e, torch.distributed.DistError) or bool(_PEER_FAILURE.search(str(e)))


@contextlib.contextmanager
def comm_guard(what: str) -> Iterator[None]:
    """Turn backend errors raised inside the block into gradwire errors naming ``what``.

    gloo and NCCL report a dead or silent peer as a ``RuntimeError`` (``DistBackendError``) after
    the process group's timeout (``init_process_group(timeout=...)``) or when the socket closes:
    that becomes ``PeerTimeoutError``, keeping the original text and saying which exchange was
    waiting. Any other ``RuntimeError`` from the backend (a usage error such as unequal split
    sizes or a CPU tensor on NCCL) becomes a plain ``CommError`` so that it is not mislabelled
    as a timeout; ``TypeError``/``ValueError`` pass through unchanged.
    """
    try:
        yield
    except PeerTimeoutError as e:  # from a nested guard: say which outer exchange it was part of
        raise PeerTimeoutError(f"{what}: {e}") from e
    except CommError:
        raise
    except RuntimeError as e:
        if not is_peer_failure(e):
            raise CommError(f"{what} failed: {type(e).__name__}: {e}") from e
        from gradwire.comm.timeout import get_timeout

        t = get_timeout()
        limit = "the process-group timeout" if t is None else f"gradwire.timeout = {t:g} s"
        raise PeerTimeoutError(
            f"{what}: a peer did not answer within {limit} or closed its "
            f"connection (did a rank exit, fail or stall?): {type(e).__name__}: {e}"
        ) from e
