"""Count the bytes a rank actually hands to torch.distributed for other ranks (test helper).

Wraps ``all_to_all_single``, ``send`` and the pipelining schedules' ``_batch_p2p`` (the isend
ops it issues; ``dist.isend`` itself cannot be wrapped: ``P2POp`` checks its identity) in the
calling process, so tests can check
that the bytes on the wire equal the packed sizes the codec predicts."""
from __future__ import annotations

import contextlib

import torch.distributed as dist


@contextlib.contextmanager
def count_wire_bytes():
    box = {"bytes": 0}
    from torch.distributed.pipelining import schedules

    orig = dist.all_to_all_single, dist.send, schedules._batch_p2p

    def a2a(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        me, p = dist.get_rank(group), dist.get_world_size(group)
        splits = input_split_sizes or [input.numel() // p] * p
        box["bytes"] += sum(s for j, s in enumerate(splits) if j != me) * input.element_size()
        return orig[0](output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    def send(tensor, dst=None, group=None, tag=0, **kw):
        box["bytes"] += tensor.numel() * tensor.element_size()
        return orig[1](tensor, dst, group=group, tag=tag, **kw)

    def batch_p2p(ops, *a, **kw):
        box["bytes"] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops
                            if op.op is dist.isend)
        return orig[2](ops, *a, **kw)

    dist.all_to_all_single, dist.send, schedules._batch_p2p = a2a, send, batch_p2p
    try:
        yield box
    finally:
        dist.all_to_all_single, dist.send, schedules._batch_p2p = orig
