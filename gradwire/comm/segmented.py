"""Two-phase compressed all-reduce of a flat buffer made of independent segments, returning a
future (the form a DDP communication hook needs).

``compressed_all_reduce`` (collectives.py) treats one tensor as one stream: chunk j of the
whole tensor goes to rank j, and its packets' scales and rounding noise depend on which elements
share a chunk. A DDP bucket is a concatenation of parameter gradients whose grouping DDP changes
(its bucket rebuild after the first iteration, and every fresh DDP after a checkpoint resume
starts from the initial grouping again). Here each segment (one parameter's gradient) is chunked,
encoded and seeded on its own, so what a segment's elements go through depends only on that
segment and its seed, never on its neighbours in the buffer. Per bucket the wire traffic is still
one all_to_all per phase (plus one size exchange per phase for variable-size codecs), with one
packet per (segment, chunk).

Phase 1 (synchronous): rank i encodes chunk j of every segment with ``derive_seed(seed_k, 1, i, j)``
and sends it to rank j; rank j decodes, sums in float32 in rank order (reproducible), and
re-encodes its chunk of segment k with ``derive_seed(seed_k, 2, j)``. Phase 2 (asynchronous):
the all-gather of those packets; the returned future's callback decodes every packet into
``out`` (every rank decodes the same packets, so ``out`` is bit-identical on all ranks) and
resolves to ``out``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist

from gradwire.codec.base import Codec
from gradwire.comm.collectives import _check_input, _decode, _decode_sum, _encode, _ensure_checked, chunk_bounds
from gradwire.comm.errors import CommError, comm_guard
from gradwire.comm.timeout import wait_all
from gradwire.numerics.rng import derive_seed


def _align(codec: Codec) -> int:
    # N:M codecs need whole blocks: chunks are multiples of M, a segment's last chunk is padded
    return int(getattr(codec, "m", 1)) if codec.name == "nm" else 1


def _padded(n: int, align: int) -> int:
    return -(-n // align) * align


def _packed(codec: Codec, n: int, dtype: torch.dtype, align: int) -> int:
    return 0 if n == 0 else codec.packed_size((_padded(n, align),), dtype)


def _max_packed(codec: Codec, n: int, dtype: torch.dtype, align: int) -> int:
    return 0 if n == 0 else codec.max_packed_size((_padded(n, align),), dtype)


def _encode_chunk(codec: Codec, x: torch.Tensor, seed: int, align: int) -> torch.Tensor:
    """Encode a 1-D chunk, zero-padded to a multiple of ``align`` (zeros add nothing to sums)."""
    if x.numel() % align:
        x = torch.cat([x, x.new_zeros(align - x.numel() % align)])
    return _encode(codec, x, seed, None)


def _exchange(send: list[list[torch.Tensor]], recv_sizes: list[list[int]] | None, group, device,
              what: str, async_op: bool = False, max_sizes: list[list[int]] | None = None):
    """all_to_all of several packets per destination: ``send[j]`` is the list of packets for rank
    j. ``recv_sizes[j]``: the sizes rank j sends us (None: exchanged first, one int64 each, and
    each checked against ``max_sizes[j]`` before the receive buffer exists).
    Returns (list per source of its packets, or a future of that list when ``async_op``)."""
    p = len(send)
    if recv_sizes is None:
        k = len(send[0])
        s_in = torch.tensor([t.numel() for pk in send for t in pk], dtype=torch.int64, device=device)
        s_out = torch.empty(p * k, dtype=torch.int64, device=device)
        with comm_guard(f"all_to_all of packet sizes ({what})"):
            work = dist.all_to_all_single(s_out, s_in, group=group, async_op=True)
        wait_all([work], f"all_to_all of packet sizes ({what})")  # at most gradwire.timeout
        flat_sizes = [int(v) for v in s_out.tolist()]
        recv_sizes = [flat_sizes[j * k:(j + 1) * k] for j in range(p)]
        for j, sizes in enumerate(recv_sizes):
            for seg, v in enumerate(sizes):
                top = max_sizes[j][seg] if max_sizes is not None else None
                if v < 0 or (top is not None and v > top):
                    raise CommError(f"rank {j} announced a {v}-byte packet for segment {seg} ({what}); "
                                    f"expected 0..{top} (codec mismatch or corrupt stream)")
    out = torch.empty(sum(map(sum, recv_sizes)), dtype=torch.uint8, device=device)
    parts = [t.reshape(-1) for pk in send for t in pk]
    inp = torch.cat(parts) if parts else out[:0]
    in_split = [sum(t.numel() for t in pk) for pk in send]
    out_split = [sum(s) for s in recv_sizes]

    def split(buf: torch.Tensor) -> list[list[torch.Tensor]]:
        return [list(torch.split(b, s)) for b, s in zip(torch.split(buf, out_split), recv_sizes)]

    with comm_guard(f"all_to_all of packets ({what}, {sum(in_split)} bytes out)"):
        work = dist.all_to_all_single(out, inp, output_split_sizes=out_split, input_split_sizes=in_split,
                                      group=group, async_op=True)
    if not async_op:
        wait_all([work], f"all_to_all of packets ({what})")
        return split(out), sum(in_split)
    # _keep: the send buffer must stay alive until the asynchronous collective has read it
    def done(f: torch.futures.Future, _keep: torch.Tensor = inp) -> list[list[torch.Tensor]]:
        f.value()  # re-raises a failed collective
        return split(out)

    return work.get_future().then(done), sum(in_split)


def segmented_all_reduce(flat: torch.Tensor, segments: Sequence[tuple[int, int]], seeds: Sequence[int],
                         codec: Codec, *, out: torch.Tensor, group=None, check_config: bool = True,
                         trace: dict | None = None) -> torch.futures.Future:
    """Sum ``flat`` (1-D) over the ranks of ``group``; write the sum into ``out`` (may be ``flat``).

    ``segments``: (offset, length) pairs covering the parts of ``flat`` to reduce (each reduced
    on its own, see the module doc); ``seeds``: one per segment. Returns a future resolving to
    ``out``. ``trace``, if given, receives ``phase1_recv`` / ``phase2_recv`` (the packets this
    rank decoded; phase 2 in segment-major order, so their decodes concatenate to ``out``),
    ``bytes_sent`` and ``raw_bytes`` (what a ring all-reduce of ``flat`` sends per rank).
    """
    _check_input(flat, "segmented_all_reduce")
    if flat.dim() != 1 or out.shape != flat.shape or out.dtype != flat.dtype:
        raise ValueError(f"flat and out must be 1-D tensors of one shape and dtype, got "
                         f"{tuple(flat.shape)} {flat.dtype} and {tuple(out.shape)} {out.dtype}")
    if len(seeds) != len(segments):
        raise ValueError(f"need one seed per segment: {len(segments)} segments, {len(seeds)} seeds")
    for a, n in segments:
        if a < 0 or n < 0 or a + n > flat.numel():
            raise ValueError(f"segment ({a}, {n}) lies outside the {flat.numel()}-element buffer")
    p, me = dist.get_world_size(group), dist.get_rank(group)
    if check_config:
        _ensure_checked(codec, group, flat.device)
    align, dtype, dev = _align(codec), flat.dtype, flat.device
    bounds = [chunk_bounds(n, p, align) for _, n in segments]  # per segment: p (start, end)
    x = flat.detach()
    # send1[j][k]: chunk j of segment k, for rank j
    send1 = [[_encode_chunk(codec, x[a + bd[j][0]:a + bd[j][1]], derive_seed(s, 1, me, j), align)
              for (a, _), bd, s in zip(segments, bounds, seeds)]
             for j in range(p)]
    fixed = codec.fixed_rate
    mine = [bd[me][1] - bd[me][0] for bd in bounds]
    sizes1 = [[_packed(codec, n, dtype, align) for n in mine]] * p if fixed else None
    max1 = None if fixed else [[_max_packed(codec, n, dtype, align) for n in mine]] * p
    got1, sent1 = _exchange(send1, sizes1, group, dev, "phase 1", max_sizes=max1)
    pk2 = []
    for k, ((a, _), bd, s) in enumerate(zip(segments, bounds, seeds)):
        part = _decode_sum(codec, [got1[r][k] for r in range(p)], (_padded(mine[k], align),), dev, dtype)
        pk2.append(_encode_chunk(codec, part[:mine[k]].to(dtype), derive_seed(s, 2, me), align))
    sizes2 = ([[_packed(codec, bd[j][1] - bd[j][0], dtype, align) for bd in bounds] for j in range(p)]
              if fixed else None)
    max2 = None if fixed else [[_max_packed(codec, bd[j][1] - bd[j][0], dtype, align) for bd in bounds]
                               for j in range(p)]
    fut, sent2 = _exchange([pk2] * p, sizes2, group, dev, "phase 2", async_op=True, max_sizes=max2)
    sent_me = sum(t.numel() for t in send1[me]) + sum(t.numel() for t in pk2)
    size_msgs = 0 if fixed else 2 * 8 * (p - 1) * len(segments)

    def decode_into_out(f: torch.futures.Future) -> torch.Tensor:
        got2 = f.value()
        for k, ((a, _), bd) in enumerate(zip(segments, bounds)):
            for j, (b0, b1) in enumerate(bd):
                pk = got2[j][k]
                if b1 == b0:
                    continue
                # header checked against the chunk's shape and dtype before the decode allocates
                dec = _decode(codec, pk, (_padded(b1 - b0, align),), dtype, dtype)
                if dec.numel() != _padded(b1 - b0, align):
                    raise CommError(f"rank {j} sent {dec.numel()} elements for chunk {j} of segment "
                                    f"{k}, expected {_padded(b1 - b0, align)}")
                out[a + b0:a + b1] = dec.reshape(-1)[:b1 - b0]
        if trace is not None:
            trace["phase2_recv"] = [got2[j][k] for k in range(len(segments)) for j in range(p)]
        return out

    if trace is not None:
        n_raw = sum(n for _, n in segments)
        trace.update(phase1_recv=got1, bytes_sent=sent1 + sent2 - sent_me + size_msgs,
                     raw_bytes=2 * (p - 1) * math.ceil(n_raw / p) * flat.element_size())
    return fut.then(decode_into_out)
