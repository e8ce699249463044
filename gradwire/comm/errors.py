"""Errors raised by the communication layer.

Every failure of a torch.distributed call made by gradwire surfaces as a ``CommError`` whose
message names the operation and the peer, instead of a bare backend error or a hang.
"""
from __future__ import annotations

import contextlib
from typing import Iterator


class CommError(RuntimeError):
    """A gradwire exchange failed."""


class ConfigMismatchError(CommError):
    """Two ranks that exchange packets are configured with different codecs or wire versions."""


class PeerTimeoutError(CommError):
    """A peer did not answer within the process-group timeout, or closed its connection."""


@contextlib.contextmanager
def comm_guard(what: str) -> Iterator[None]:
    """Turn backend errors raised inside the block into ``PeerTimeoutError`` naming ``what``.

    gloo and NCCL report a dead or silent peer as a ``RuntimeError`` (``DistBackendError``) after
    the process group's timeout (``init_process_group(timeout=...)``) or when the socket closes;
    we keep the original text and say which exchange was waiting.
    """
    try:
        yield
    except PeerTimeoutError as e:  # from a nested guard: say which outer exchange it was part of
        raise PeerTimeoutError(f"{what}: {e}") from e
    except CommError:
        raise
    except RuntimeError as e:
        raise PeerTimeoutError(
            f"{what}: a peer did not answer within the process-group timeout or closed its "
            f"connection (did a rank exit or fail?): {type(e).__name__}: {e}"
        ) from e
