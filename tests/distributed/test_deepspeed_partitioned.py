"""GradwirePipelineEngine's choice of the tensors a stage sends backward, checked without ranks
against DeepSpeed's receiver contract (deepspeed/runtime/pipe/engine.py, ``_exec_recv_grads``):
with partitioned gradients (tensor parallelism inside DeepSpeed's grid) the receiver expects the
partition metadata, the local part, then one gradient per floating-point tail output; without,
one gradient per floating-point output; the attention mask (last) never has one."""
import pytest
import torch

pytest.importorskip("deepspeed")

import gradwire.integrations.deepspeed as gw_ds  # noqa: E402


class _FakePartition:
    """Stands in for DeepSpeed's PartitionedTensor (which needs a process group): meta is int64,
    the local part is the first half of the flattened gradient."""

    def __init__(self, tensor, group):
        self.tensor = tensor

    def to_meta(self):
        return torch.tensor([2, *self.tensor.shape], dtype=torch.long)

    def data(self):
        return self.tensor.reshape(-1)[: self.tensor.numel() // 2]


class _Grid:
    def get_slice_parallel_group(self):
        return None


def _engine(inputs, partitioned, mask):
    e = object.__new__(gw_ds.GradwirePipelineEngine)  # no DeepSpeed construction: only the method
    e.pipe_buffers = {"inputs": [inputs]}
    e.is_grad_partitioned, e.has_attention_mask, e.has_bool_tensors = partitioned, mask, False
    e.grid = _Grid()
    return e


def _leaf(*shape, dtype=torch.float32, grad=True):
    t = torch.arange(int(torch.tensor(shape).prod()), dtype=dtype).reshape(shape)
    if grad:
        t.requires_grad_(True)
        t.grad = torch.full(shape, 0.5, dtype=dtype)
    return t


def test_partitioned_gradients_skip_integer_tail_inputs(monkeypatch):
    monkeypatch.setattr(gw_ds, "_PartitionedTensor", _FakePartition)
    hidden, extra = _leaf(2, 4), _leaf(3)
    pos_ids = _leaf(2, dtype=torch.long, grad=False)  # integer input: no gradient
    mask = torch.ones(2, 2, dtype=torch.bool)
    out = _engine((hidden, pos_ids, extra, mask), True, True)._grads_to_send(0)
    # meta, local part, then the float tail (extra); nothing for pos_ids or the mask
    assert [t.dtype for t in out] == [torch.long, torch.float32, torch.float32]
    assert torch.equal(out[0], torch.tensor([2, 2, 4])) and torch.equal(out[1], hidden.grad.reshape(-1)[:4])
    assert out[2] is extra.grad
    # the same without a mask: the integer input is still skipped
    out = _engine((hidden, pos_ids), True, False)._grads_to_send(0)
    assert [t.dtype for t in out] == [torch.long, torch.float32]
    # a float tail input without a gradient is an error naming the problem, not a crash on None
    with pytest.raises(RuntimeError, match="no gradient"):
        _engine((hidden, _leaf(3, grad=False), mask), True, True)._grads_to_send(0)


def test_unpartitioned_gradients_follow_deepspeed_order():
    a, b = _leaf(2, 3), _leaf(4)
    ids = _leaf(2, dtype=torch.long, grad=False)
    mask = torch.ones(2, dtype=torch.bool)
    assert [t is g for t, g in zip(_engine((a, ids, b, mask), False, True)._grads_to_send(0),
                                   (a.grad, b.grad))] == [True, True]
    assert _engine(a, False, False)._grads_to_send(0)[0] is a.grad


def test_heterogeneous_sparsity_across_ranks_is_refused_not_ignored():
    from deepspeed.pipe import PipelineModule

    from gradwire.config import ConfigError

    class Fake(PipelineModule):
        def __init__(self, stages):  # no process group: initialize fails before using one
            torch.nn.Module.__init__(self)
            self.num_stages = stages

    section = {"codec": {"name": "prune", "sparsity": 0.9, "heterogeneous": True}}
    with pytest.raises(ConfigError, match="heterogeneous"):
        gw_ds.initialize(model=Fake(3), config={"gradwire": section})
    # one boundary: the allocation is trivially the budget, nothing to refuse
    gw_ds.check_heterogeneous(gw_ds.parse_gradwire(section), 2)
