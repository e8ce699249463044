"""Compressed collectives: two-phase all-reduce, reduce-scatter and all-gather of packets.

Packed bytes are never reduced by a reduction collective (DESIGN.md): every rank decodes the
packets it receives to float32 and sums them itself, in rank order 0..p-1 so that the sum is
reproducible. All packet exchanges go through ``all_to_all_single`` with per-rank split sizes,
which gloo and NCCL both support with unequal sizes (gloo's ``all_gather`` needs equal sizes),
so nothing is padded and the bytes on the wire are exactly the packet sizes.

Two-phase all-reduce of N elements over p ranks (packed ratio r = packet bytes / raw bytes):

1. split the flat tensor into p chunks; encode chunk j and send it to rank j (all_to_all);
2. rank j decodes the p packets of chunk j, sums them in float32 in rank order, re-encodes
   the sum once and sends that single packet to every rank (all-gather);
3. every rank decodes the p gathered packets, its own included, so all ranks end with
   bit-identical results.

Each rank sends (p-1) chunk packets in each phase: 2 (p-1)/p * r * N bytes of the raw size.
Seeds: phase 1 chunk j on rank i uses ``derive_seed(seed, 1, i, j)``, phase 2 on rank j uses
``derive_seed(seed, 2, j)``, so stochastic rounding is independent across ranks and chunks.
"""
from __future__ import annotations

import math
import time
from typing import Any, Sequence

import torch
import torch.distributed as dist

from gradwire.codec.base import Codec
from gradwire.comm.errors import CommError, comm_guard
from gradwire.comm.timeout import wait_all
from gradwire.numerics.rng import derive_seed


def _ensure_checked(codec: Codec, group, device) -> None:
    """Config handshake on the first collective of this codec config on this group."""
    from gradwire.comm.handshake import check_group

    check_group(codec, group, device)


def exchange_packets(packets: Sequence[torch.Tensor], group=None, *, sizes_known:
                     Sequence[int] | None = None, max_sizes: Sequence[int] | None = None
                     ) -> list[torch.Tensor]:
    """All-to-all of byte strings: ``packets[j]`` goes to rank j; returns what each rank sent us.

    ``sizes_known``: the sizes we will receive, when the protocol fixes them (fixed-rate codecs);
    otherwise the sizes are exchanged first (one int64 per pair), and ``max_sizes`` (per source
    rank, e.g. the codec's ``max_packed_size``) bounds them before the receive buffer exists.
    """
    p = dist.get_world_size(group)
    if len(packets) != p:
        raise ValueError(f"need one packet per rank ({p}), got {len(packets)}")
    device = packets[0].device
    send_sizes = [int(t.numel()) for t in packets]
    if sizes_known is None:
        s_in = torch.tensor(send_sizes, dtype=torch.int64, device=device)
        s_out = torch.empty(p, dtype=torch.int64, device=device)
        with comm_guard("all_to_all of packet sizes"):
            work = dist.all_to_all_single(s_out, s_in, group=group, async_op=True)
        wait_all([work], "all_to_all of packet sizes")  # at most gradwire.timeout
        recv_sizes = [int(v) for v in s_out.tolist()]
        for r, v in enumerate(recv_sizes):
            if v < 0 or (max_sizes is not None and v > max_sizes[r]):
                raise CommError(f"rank {r} announced a packet of {v} bytes; expected 0.."
                                f"{None if max_sizes is None else max_sizes[r]} (codec mismatch or corrupt stream)")
    else:
        recv_sizes = [int(v) for v in sizes_known]
    out = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=device)
    inp = torch.cat([t.reshape(-1) for t in packets]) if packets else out[:0]
    what = f"all_to_all of packets ({sum(send_sizes)} bytes out)"
    with comm_guard(what):
        work = dist.all_to_all_single(out, inp, output_split_sizes=recv_sizes,
                                      input_split_sizes=send_sizes, group=group, async_op=True)
    wait_all([work], what)
    return list(torch.split(out, recv_sizes))


def all_gather_bytes(data: torch.Tensor, group=None, *, sizes_known: Sequence[int] | None = None,
                     max_sizes: Sequence[int] | None = None) -> list[torch.Tensor]:
    """All-gather of one byte string per rank, of possibly unequal sizes, without padding."""
    p = dist.get_world_size(group)
    return exchange_packets([data] * p, group, sizes_known=sizes_known, max_sizes=max_sizes)


MAX_JSON_BYTES = 64 << 20  # per rank, for all_gather_json: telemetry, not tensors


def all_gather_json(obj: Any, group=None, *, device=None, max_bytes: int = MAX_JSON_BYTES) -> list[Any]:
    """Every rank's JSON-able ``obj``, in rank order: UTF-8 JSON through ``all_gather_bytes``.

    Instead of ``dist.all_gather_object``, which unpickles what peers send (a peer could run code
    in this process); lengths are bounded by ``max_bytes`` before anything is allocated."""
    import json

    from gradwire.comm.handshake import default_device

    dev = default_device(group) if device is None else torch.device(device)
    raw = json.dumps(obj).encode("utf-8")
    if len(raw) > max_bytes:
        raise ValueError(f"all_gather_json: {len(raw)} bytes exceed max_bytes={max_bytes}")
    mine = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(dev) if raw else torch.empty(0, dtype=torch.uint8, device=dev)
    got = all_gather_bytes(mine, group, max_sizes=[max_bytes] * dist.get_world_size(group))
    return [json.loads(bytes(t.cpu().numpy()).decode("utf-8")) for t in got]


def chunk_bounds(n: int, p: int, align: int = 1) -> list[tuple[int, int]]:
    """Split ``n`` elements into ``p`` contiguous chunks, each a multiple of ``align`` long
    except possibly the last non-empty one (block codecs need whole blocks per chunk)."""
    c = math.ceil(n / (p * align)) * align if n else 0
    return [(min(i * c, n), min((i + 1) * c, n)) for i in range(p)]


def _sent(sizes: Sequence[int], me: int) -> int:
    return sum(s for j, s in enumerate(sizes) if j != me)


def _size_bytes(codec: Codec, p: int, phases: int = 1) -> int:
    """The int64 sizes a variable-size codec exchanges before its packets, per phase."""
    return 0 if codec.fixed_rate else phases * 8 * (p - 1)


def _check_input(t: torch.Tensor, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: expected a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{what}: expected a floating-point tensor, got {t.dtype}")


def _encode(codec: Codec, x: torch.Tensor, seed: int, fit) -> torch.Tensor:
    # An empty chunk (n < p) is an empty packet: nothing to encode, nothing to send.
    return x.new_empty(0, dtype=torch.uint8) if x.numel() == 0 else codec.encode(x, seed=seed, fit=fit)


def _expected(codec: Codec, shapes: Sequence[Sequence[int]], dtype) -> list[int] | None:
    if not codec.fixed_rate:
        return None
    return [0 if math.prod(s) == 0 else codec.packed_size(tuple(s), dtype) for s in shapes]


def _max_sizes(codec: Codec, shapes: Sequence[Sequence[int]], dtype) -> list[int]:
    """Upper bounds of the packets of a variable-size codec (one per source rank)."""
    return [0 if math.prod(s) == 0 else codec.max_packed_size(tuple(s), dtype) for s in shapes]


def _decode(codec: Codec, packet: torch.Tensor, shape, src_dtype, out_dtype) -> torch.Tensor:
    """Decode a packet that must hold a ``src_dtype`` tensor of ``shape``: the header is checked
    against both before the decode allocates (``codec.header.Expected``)."""
    from gradwire.codec.header import Expected

    return codec.decode(packet, dtype=out_dtype, expect=Expected(tuple(shape), src_dtype))


def _decode_sum(codec: Codec, packets: Sequence[torch.Tensor], shape, device, src_dtype) -> torch.Tensor:
    """float32 sum of the decoded packets, in rank order (the reproducible reduction)."""
    acc = torch.zeros(shape, dtype=torch.float32, device=device)
    for r, pk in enumerate(packets):
        if pk.numel() == 0:
            continue
        part = _decode(codec, pk, shape, src_dtype, torch.float32)
        if tuple(part.shape) != tuple(shape):
            raise CommError(f"rank {r} sent a chunk of shape {tuple(part.shape)}, expected {tuple(shape)}")
        acc += part
    return acc


def compressed_all_reduce(tensor: torch.Tensor, codec: Codec, *, group=None, seed: int = 0,
                          fit: Any = None, align: int | None = None, check_config: bool = True,
                          trace: dict | None = None) -> torch.Tensor:
    """Sum ``tensor`` over the ranks of ``group`` with compressed packets (two-phase, above).

    ``align``: chunk lengths are multiples of it (default: the codec's block size ``m`` for N:M
    codecs, else 1); the flat tensor is zero-padded to a multiple of it (zeros add nothing to
    the sum and are dropped from the result).
    Returns a new tensor of ``tensor``'s shape and dtype, bit-identical on every rank. ``trace``,
    if given, receives ``phase1_recv`` / ``phase2_recv`` (the packets this rank decoded),
    ``bytes_sent`` and ``raw_bytes`` (what a plain ring all-reduce would send per rank:
    2 (p-1)/p * N * itemsize).
    """
    _check_input(tensor, "compressed_all_reduce")
    p, me = dist.get_world_size(group), dist.get_rank(group)
    if check_config:
        _ensure_checked(codec, group, tensor.device)
    if align is None:
        align = int(getattr(codec, "m", 1)) if codec.name == "nm" else 1
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise ValueError(f"align must be an int >= 1, got {align!r}")
    n = tensor.numel()
    flat = tensor.detach().reshape(-1)
    if n % align:
        flat = torch.cat([flat, flat.new_zeros(align - n % align)])
    bounds = chunk_bounds(flat.numel(), p, align)
    shapes = [(b - a,) for a, b in bounds]
    clock = [time.perf_counter()]  # phase timings for the trace (encode / exchange / decode)
    out1 = [_encode(codec, flat[a:b], derive_seed(seed, 1, me, j), fit) for j, (a, b) in enumerate(bounds)]
    clock.append(time.perf_counter())
    recv_sizes = None if not codec.fixed_rate else [_expected(codec, [shapes[me]], tensor.dtype)[0]] * p
    got1 = exchange_packets(out1, group, sizes_known=recv_sizes,
                            max_sizes=_max_sizes(codec, [shapes[me]] * p, tensor.dtype))
    clock.append(time.perf_counter())
    mine = _decode_sum(codec, got1, shapes[me], tensor.device, tensor.dtype).to(tensor.dtype)
    pk2 = _encode(codec, mine, derive_seed(seed, 2, me), fit)
    clock.append(time.perf_counter())
    got2 = all_gather_bytes(pk2, group, sizes_known=_expected(codec, shapes, tensor.dtype),
                            max_sizes=_max_sizes(codec, shapes, tensor.dtype))
    clock.append(time.perf_counter())
    parts = [_decode(codec, pk, s, tensor.dtype, tensor.dtype) if pk.numel() else flat.new_empty(0)
             for pk, s in zip(got2, shapes)]
    result = torch.cat([q.reshape(-1) for q in parts])[:n].reshape(tensor.shape)
    clock.append(time.perf_counter())
    if trace is not None:
        d = [b - a for a, b in zip(clock, clock[1:])]
        trace.update(seconds_codec=d[0] + d[2] + d[4], seconds_exchange=d[1] + d[3])
        trace.update(phase1_recv=got1, phase2_recv=got2, phase1_sent_sizes=[t.numel() for t in out1],
                     bytes_sent=_sent([t.numel() for t in out1], me) + (p - 1) * pk2.numel()
                     + _size_bytes(codec, p, phases=2),
                     raw_bytes=2 * (p - 1) * math.ceil(n / p) * tensor.element_size())
    return result


def compressed_reduce_scatter(tensor: torch.Tensor, codec: Codec, *, group=None, seed: int = 0,
                              fit: Any = None, check_config: bool = True,
                              trace: dict | None = None) -> torch.Tensor:
    """Sum over ranks and scatter along dim 0 (sequence parallelism): ``tensor`` has shape
    ``[p*k, ...]``; rank j returns the float32 rank-ordered sum of the decoded j-th slices, in
    ``tensor.dtype``, of shape ``[k, ...]``. One phase: (p-1)/p * r * N bytes sent per rank."""
    _check_input(tensor, "compressed_reduce_scatter")
    p, me = dist.get_world_size(group), dist.get_rank(group)
    if tensor.dim() == 0 or tensor.shape[0] % p:
        raise ValueError(f"reduce-scatter needs dim 0 divisible by the world size {p}, "
                         f"got shape {tuple(tensor.shape)}")
    if check_config:
        _ensure_checked(codec, group, tensor.device)
    slices = list(tensor.detach().chunk(p, dim=0))
    outp = [_encode(codec, s.contiguous(), derive_seed(seed, 1, me, j), fit) for j, s in enumerate(slices)]
    got = exchange_packets(outp, group, sizes_known=_expected(codec, [slices[me].shape] * p, tensor.dtype),
                           max_sizes=_max_sizes(codec, [slices[me].shape] * p, tensor.dtype))
    result = _decode_sum(codec, got, slices[me].shape, tensor.device, tensor.dtype).to(tensor.dtype)
    if trace is not None:
        trace.update(recv=got, bytes_sent=_sent([t.numel() for t in outp], me) + _size_bytes(codec, p),
                     raw_bytes=(p - 1) * slices[me].numel() * tensor.element_size())
    return result


def compressed_all_gather(tensor: torch.Tensor, codec: Codec, *, group=None, seed: int = 0,
                          fit: Any = None, check_config: bool = True,
                          trace: dict | None = None) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, through packets. Every rank, the sender
    included, decodes the same packets, so the result is bit-identical on all ranks."""
    _check_input(tensor, "compressed_all_gather")
    p, me = dist.get_world_size(group), dist.get_rank(group)
    if check_config:
        _ensure_checked(codec, group, tensor.device)
    pk = _encode(codec, tensor.detach().contiguous(), derive_seed(seed, 3, me), fit)
    got = all_gather_bytes(pk, group, sizes_known=_expected(codec, [tensor.shape] * p, tensor.dtype),
                           max_sizes=_max_sizes(codec, [tensor.shape] * p, tensor.dtype))
    parts = [_decode(codec, g, tensor.shape, tensor.dtype, tensor.dtype) for g in got]
    if trace is not None:
        trace.update(recv=got, bytes_sent=(p - 1) * pk.numel() + _size_bytes(codec, p),
                     raw_bytes=(p - 1) * tensor.numel() * tensor.element_size())
    return torch.cat(parts, dim=0)
