"""Capture neural gradients (loss gradients w.r.t. layer outputs) from a real network.

Paper 001's claims (lognormal |g|, Table 1) are about these tensors, so the tests and benchmarks
need real ones. ``capture_neural_gradients`` trains any model for a few steps and records, per
chosen layer, the gradient of the loss w.r.t. that layer's output at every step. A forward hook
registers a tensor hook on the output, so the capture sees exactly what backward propagates
(what a pipeline stage would send upstream), without changing the computation.

``digits_mlp_gradients`` does this for an MLP on scikit-learn's digits (8x8 images, shipped with
scikit-learn, no download): a few seconds on a CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)


def capture_neural_gradients(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    layer_names: Sequence[str] | None = None,
    losses: list[float] | None = None,
) -> dict[str, list[torch.Tensor]]:
    """Run forward/backward (and ``optimizer.step()`` if given) on each ``(inputs, targets)``
    batch, returning ``{layer name: [grad of loss w.r.t. that layer's output, one per step]}``.

    ``layer_names`` picks modules by their ``named_modules()`` name; by default every Linear and
    Conv layer. Captured tensors are detached float copies on the model's device. Each step's
    loss is appended to ``losses`` when a list is given. Hooks are removed on exit, also on error.
    A module called k times in one forward (shared weights) contributes k tensors per step, in
    the order backward reaches them (reverse call order); a layer whose output does not require
    grad contributes none.
    """
    modules = dict(model.named_modules())
    if layer_names is None:
        layer_names = [n for n, m in modules.items() if isinstance(m, DEFAULT_LAYER_TYPES)]
    missing = [n for n in layer_names if n not in modules]
    if missing:
        raise ValueError(f"no such layers in the model: {missing}")
    if not layer_names:
        raise ValueError("no layers to capture (no Linear/Conv layers; pass layer_names)")
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in layer_names}

    def forward_hook(name: str):
        def hook(_module, _inputs, output):
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"layer {name!r} returns {type(output).__name__}, not a Tensor")
            if output.requires_grad:
                output.register_hook(lambda g: captured[name].append(g.detach().clone()))
        return hook

    handles = [modules[n].register_forward_hook(forward_hook(n)) for n in layer_names]
    try:
        model.train()
        for inputs, targets in batches:
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            if optimizer is not None:
                optimizer.step()
            if losses is not None:
                losses.append(float(loss.detach()))
    finally:
        for h in handles:
            h.remove()
    return captured


@dataclass
class CapturedRun:
    """The result of ``digits_mlp_gradients``: the gradients, the trained model, the losses."""

    gradients: dict[str, list[torch.Tensor]]
    model: nn.Module
    losses: list[float] = field(default_factory=list)


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (float32 [1797, 64] standardised per pixel, int64 labels)."""
    from sklearn.datasets import load_digits  # local: sklearn is a dev dependency only

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)  # constant border pixels have std 0
    return x, torch.tensor(data.target, dtype=torch.int64)


def digits_mlp(hidden: Sequence[int] = (256, 256, 128), *, seed: int = 0) -> nn.Sequential:
    """An MLP 64 -> hidden... -> 10 with ReLU, initialised from ``seed``."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # nn.Linear init draws from the global generator
    try:
        layers: list[nn.Module] = []
        width = 64
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 10))
        return nn.Sequential(*layers)
    finally:
        torch.random.set_rng_state(gen_state)


def digits_mlp_gradients(seed: int = 0, steps: int = 300, *, batch_size: int = 64,
                         hidden: Sequence[int] = (256, 256, 128), lr: float = 0.05,
                         capture_every: int = 1) -> CapturedRun:
    """Train ``digits_mlp`` with SGD (momentum 0.9) on digits for ``steps`` minibatches and
    capture the neural gradient of every Linear layer at every ``capture_every``-th step.

    Deterministic for a given seed (own generator for shuffling, seeded init). 300 steps of
    batch 64 is ~11 epochs: the net is trained (loss well below 0.1), which is when gradients
    are heavy-tailed (well-classified samples contribute tiny gradients).
    """
    if steps < 1 or batch_size < 1 or capture_every < 1:
        raise ValueError("steps, batch_size and capture_every must be >= 1")
    x, y = load_digits_tensors()
    model = digits_mlp(hidden, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)

    def batches():
        order = torch.randperm(x.shape[0], generator=gen)
        pos = 0
        for _ in range(steps):
            if pos + batch_size > order.numel():
                order, pos = torch.randperm(x.shape[0], generator=gen), 0
            idx = order[pos:pos + batch_size]
            pos += batch_size
            yield x[idx], y[idx]

    losses: list[float] = []
    grads = capture_neural_gradients(model, batches(), nn.functional.cross_entropy, optimizer=opt, losses=losses)
    if capture_every > 1:
        grads = {k: v[capture_every - 1::capture_every] for k, v in grads.items()}
    return CapturedRun(grads, model, losses)
