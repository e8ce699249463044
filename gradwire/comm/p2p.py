"""Point-to-point packet transport between two ranks.

Two wire protocols (DESIGN.md, "Fixed-rate codecs need no handshake"):

* fixed size: the receiver knows the packet size (``Codec.packed_size``) and receives into a
  pre-allocated buffer; one message per packet.
* variable size: an int64 length goes first, then the packet; two messages per packet.

Both ends must issue the same sends and receives in the same order: receives match by
(peer, tag) in posting order on gloo. NCCL ignores tags: messages between two ranks match in
issue order only, so two channels between the same pair must not interleave their messages. ``async_op=True`` returns a ``PendingOps`` handle (useful on NCCL,
where isend/irecv overlap compute; gloo point-to-point has no futures, only ``wait``).

``PacketChannel`` adds what a boundary needs on top: a config handshake at the first exchange,
per-step seeds from ``derive_seed`` and byte counters.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from gradwire.codec.base import Codec
from gradwire.comm.errors import CommError, comm_guard
from gradwire.comm.handshake import check_peer, default_device  # noqa: F401 (re-exported)
from gradwire.comm import timeout as timed
from gradwire.comm.timeout import wait_all
from gradwire.numerics.rng import derive_seed

LENGTH_BYTES = 8  # the int64 length prefix of a variable-size packet


def _check_packet(packet: torch.Tensor) -> None:
    if not isinstance(packet, torch.Tensor) or packet.dtype != torch.uint8 or packet.dim() != 1:
        raise TypeError(f"a packet is a 1-D uint8 tensor, got {getattr(packet, 'dtype', type(packet))}"
                        f" of shape {tuple(getattr(packet, 'shape', ()))}")


def _global(peer: int, group) -> int:
    return peer if group is None else dist.get_global_rank(group, peer)


class PendingOps:
    """Handles of in-flight sends/receives; ``wait()`` returns the received packet (or None).

    Holds the tensors being sent (the packet and, for the variable-size protocol, the length
    prefix, which the caller never sees) until ``wait``: the caching allocator must not hand
    their memory to another tensor while an asynchronous NCCL send may still read it."""

    def __init__(self, works: Sequence, result: torch.Tensor | None, what: str,
                 keep: Sequence[torch.Tensor] = ()):
        self._works, self._result, self._what = list(works), result, what
        self._keep = list(keep)

    def wait(self) -> torch.Tensor | None:
        wait_all(self._works, self._what)
        self._keep = []
        return self._result


def send_packet(packet: torch.Tensor, dst: int, *, group=None, tag: int = 0,
                with_length: bool = False, async_op: bool = False) -> PendingOps | None:
    """Send ``packet`` to rank ``dst`` (group rank). ``with_length`` selects the variable-size
    protocol. Returns ``PendingOps`` when ``async_op`` (keep ``packet`` alive until waited)."""
    _check_packet(packet)
    g = _global(dst, group)
    what = f"send of a {packet.numel()}-byte packet to rank {dst}"
    msgs = []
    if with_length:
        msgs.append(torch.tensor([packet.numel()], dtype=torch.int64, device=packet.device))
    msgs.append(packet)
    if async_op:
        with comm_guard(what):
            return PendingOps([dist.isend(m, g, group=group, tag=tag) for m in msgs], None, what, msgs)
    for m in msgs:
        timed.send(m, g, group=group, tag=tag, what=what)  # at most gradwire.timeout
    return None


def recv_packet(src: int, *, out: torch.Tensor | None = None, group=None, tag: int = 0,
                device: torch.device | str = "cpu", max_size: int | None = None,
                async_op: bool = False) -> torch.Tensor | PendingOps:
    """Receive a packet from rank ``src`` (group rank).

    With ``out`` (a pre-allocated uint8 buffer of the exact packet size) the fixed-size protocol
    is used; without it the variable-size one (length first; ``max_size`` bounds the length so a
    corrupt or mismatched prefix cannot make us allocate an absurd buffer). ``async_op`` is only
    available for the fixed-size protocol: the variable one must read the length before it can
    allocate.
    """
    g = _global(src, group)
    if out is not None:
        _check_packet(out)
        what = f"receive of a {out.numel()}-byte packet from rank {src}"
        if async_op:
            with comm_guard(what):
                return PendingOps([dist.irecv(out, g, group=group, tag=tag)], out, what)
        timed.recv(out, g, group=group, tag=tag, what=what)
        return out
    if async_op:
        raise ValueError("async receive needs a pre-allocated `out` buffer (fixed-size protocol)")
    n = torch.empty(1, dtype=torch.int64, device=device)
    timed.recv(n, g, group=group, tag=tag, what=f"receive of a packet length from rank {src}")
    size = int(n.item())
    if size < 0 or (max_size is not None and size > max_size):
        raise CommError(f"rank {src} announced a packet of {size} bytes; expected 0..{max_size} "
                        f"(codec mismatch or corrupt stream)")
    # zeros: a peer that sends fewer bytes than it announced leaves no uninitialised memory in
    # the packet (whose bytes may end up in a PacketError message)
    buf = torch.zeros(size, dtype=torch.uint8, device=device)
    timed.recv(buf, g, group=group, tag=tag, what=f"receive of a {size}-byte packet from rank {src}")
    return buf


class PacketChannel:
    """One direction of one boundary: this rank encodes and sends to ``peer``, or receives from
    ``peer`` and decodes, with the same codec on both ends.

    The first ``send``/``recv`` swaps config fingerprints with the peer (both ends raise
    ``ConfigMismatchError`` naming both configs on disagreement). Fixed-rate codecs use the
    fixed-size protocol with a buffer reused across steps; others send the length first.
    The seed of step ``s`` is ``derive_seed(base_seed, s, boundary_id)`` on both ends.
    """

    def __init__(self, codec: Codec, peer: int, *, group=None, tag: int = 0, base_seed: int = 0,
                 boundary_id: int = 0, device: torch.device | str | None = None,
                 settings: dict | None = None):
        if not isinstance(codec, Codec):
            raise TypeError(f"codec must be a gradwire Codec, got {type(codec).__name__}")
        if not isinstance(peer, int) or peer < 0:
            raise ValueError(f"peer must be a rank >= 0, got {peer!r}")
        self.codec, self.peer, self.group, self.tag = codec, peer, group, tag
        self.base_seed, self.boundary_id = base_seed, boundary_id
        # None: the group backend's device (CUDA under NCCL, CPU under gloo), see default_device
        self.device = default_device(group) if device is None else torch.device(device)
        self._checked = False
        self.settings = dict(settings or {})  # more values both ends must agree on (handshake)
        self._buf: torch.Tensor | None = None
        self.bytes_sent = 0  # packet bytes (plus length prefixes) this rank put on the wire
        self.bytes_received = 0
        self.raw_bytes = 0  # what the uncompressed tensors would have cost

    def handshake(self) -> None:
        """Swap config fingerprints with the peer now (otherwise done at the first exchange)."""
        if not self._checked:
            check_peer(self.codec, self.peer, self.group, self.device, settings=self.settings)
            self._checked = True

    def seed(self, step: int) -> int:
        return derive_seed(self.base_seed, step, self.boundary_id)

    def send(self, x: torch.Tensor, step: int, *, fit=None) -> torch.Tensor:
        """Encode ``x`` and send it; returns the packet (what the peer will decode)."""
        self.handshake()
        packet = self.codec.encode(x, seed=self.seed(step), fit=fit)
        fixed = self.codec.fixed_rate
        send_packet(packet, self.peer, group=self.group, tag=self.tag, with_length=not fixed)
        self.bytes_sent += packet.numel() + (0 if fixed else LENGTH_BYTES)
        self.raw_bytes += x.numel() * x.element_size()
        return packet

    def recv_packet(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """Receive the next packet for a tensor of ``shape``/``dtype`` (not decoded)."""
        self.handshake()
        if self.codec.fixed_rate:
            size = self.codec.packed_size(shape, dtype)
            if self._buf is None or self._buf.numel() != size:
                self._buf = torch.empty(size, dtype=torch.uint8, device=self.device)
            packet = recv_packet(self.peer, out=self._buf, group=self.group, tag=self.tag).clone()
            self.bytes_received += size
        else:
            packet = recv_packet(self.peer, group=self.group, tag=self.tag, device=self.device,
                                 max_size=self.codec.max_packed_size(shape, dtype))
            self.bytes_received += packet.numel() + LENGTH_BYTES
        return packet

    def recv(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """Receive and decode the next tensor of ``shape``/``dtype``: the packet's header is
        checked against them before the decode allocates (``codec.header.Expected``)."""
        from gradwire.codec.header import Expected

        expect = Expected(tuple(shape), dtype)
        out = self.codec.decode(self.recv_packet(shape, dtype), dtype=dtype, expect=expect)
        if tuple(out.shape) != tuple(shape):
            raise CommError(f"rank {self.peer} sent a tensor of shape {tuple(out.shape)}, "
                            f"expected {tuple(shape)}")
        return out
