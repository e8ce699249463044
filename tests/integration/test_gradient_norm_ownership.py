"""DeepSpeed's gradient clipping must see every pipeline stage's gradients.

``deepspeed.runtime.utils.clip_grad_norm_`` counts a parameter that is not marked model-parallel
only on rank 0 of the pipeline x tensor group. ``launch/train.py`` marks each stage's parameters
(``_own_gradient_norm``); here a stage that is not that rank 0 computes its clipping norm.
"""
import math
import os
import sys

import pytest
import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "launch"))


class _LaterStage:
    """The mpu view of a rank of stage 1: not rank 0 of its pipeline x tensor group."""

    def get_model_parallel_rank(self):
        return 1

    def get_model_parallel_group(self):
        return None  # the default (single-process) group


@pytest.fixture
def single_process_group(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    import deepspeed

    # DeepSpeed's comm layer wraps the torch group; clip_grad_norm_ all-reduces through it.
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False,
                               init_method=f"file://{tmp_path}/rdzv", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _stage(seed):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    net(torch.randn(4, 6)).square().sum().backward()
    return net


def _norm(net):
    return math.sqrt(sum(float(p.grad.double().square().sum()) for p in net.parameters()))


def test_later_stage_gradients_count_in_the_clipping_norm(single_process_group):
    from deepspeed.runtime.utils import clip_grad_norm_

    from train import _own_gradient_norm

    unmarked = _stage(0)
    # Without the marks, DeepSpeed leaves this stage out of the norm entirely (the bug).
    assert float(clip_grad_norm_(unmarked.parameters(), max_norm=1e9, mpu=_LaterStage())) == 0.0

    marked = _stage(0)
    _own_gradient_norm(marked, None)
    got = float(clip_grad_norm_(marked.parameters(), max_norm=1e9, mpu=_LaterStage()))
    assert got == pytest.approx(_norm(marked), rel=1e-6)
