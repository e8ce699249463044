"""Linear layers for sparse training: a truly sparse one and a masked-dense one for comparison.

``SparseLinear`` stores only the active connections: ``rows`` (output unit), ``cols`` (input
unit) and ``values``, kept in canonical order (sorted by the linear index ``row * in + col``,
no duplicates). Its forward is a CSR sparse x dense product, its backward uses the transposed CSR
for the input gradient and a sampled dense-dense product (SDDMM, ``torch.sparse.sampled_addmm``)
for the value gradient: ``grad_values[k] = sum_i delta[i, rows[k]] * x[i, cols[k]]``. Neither a
dense ``[out, in]`` weight nor a dense weight gradient is ever built, so memory is
O(nnz + batch * (in + out)) (paper 003, Sec. 3: peak memory on the order of the sparse model).

``MaskedLinear`` is an ``nn.Linear`` whose weight is multiplied by a 0/1 mask in the forward.
It is what the reference DST implementations use (they only *simulate* the memory saving) and
what RigL needs, since RigL reads the dense gradient of every inactive connection.

Both layers can record, on request of the DST engine, the layer input ``x`` and the gradient at
the layer output ``delta`` of one batch; growth then computes gradients of candidate connections
only (``candidate_grad``), the masked layer additionally the dense gradient (``dense_grad``).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["SparseLinear", "MaskedLinear", "sampled_grad", "canonical_order"]



def _make_csr(crow, col, values, size):
    """CSR tensor without per-call warnings or O(nnz) invariant checks.

    torch flags CSR as beta and warns about skipped invariant checks; the layer validates its
    own invariants (sorted, unique, in range) once per topology change in ``set_topology``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def canonical_order(rows: torch.Tensor, cols: torch.Tensor, in_features: int) -> torch.Tensor:
    """Permutation that sorts connections by the linear index ``row * in_features + col``."""
    return torch.argsort(rows.to(torch.int64) * in_features + cols.to(torch.int64), stable=True)


def _crow(rows_sorted: torch.Tensor, n_rows: int) -> torch.Tensor:
    counts = torch.bincount(rows_sorted, minlength=n_rows)
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows_sorted.device)
    torch.cumsum(counts, 0, out=crow[1:])
    return crow


def sampled_grad(delta: torch.Tensor, x: torch.Tensor, rows: torch.Tensor,
                 cols: torch.Tensor) -> torch.Tensor:
    """``g[k] = sum_i delta[i, rows[k]] * x[i, cols[k]]`` without the dense ``delta^T x``.

    This is the weight gradient restricted to the given (output, input) pairs (paper 003,
    Sec. 3: "grad[a, b] = sum_i h[i, a] delta[i, b]"). Pairs may come in any order but must be
    unique. Computed with an SDDMM on a CSR pattern, so memory is O(len(rows)).
    """
    if delta.dim() != 2 or x.dim() != 2 or delta.shape[0] != x.shape[0]:
        raise ValueError(f"delta [B, out] and x [B, in] expected, got {tuple(delta.shape)} "
                         f"and {tuple(x.shape)}")
    if rows.numel() == 0:
        return torch.zeros(0, dtype=x.dtype, device=x.device)
    n_out, n_in = delta.shape[1], x.shape[1]
    r, c = rows.to(torch.int64), cols.to(torch.int64)
    # Candidates usually come sorted (sample_inactive_subset returns them so): an O(n) check
    # saves a full argsort of 1e7+ pairs.
    perm = None if _strictly_increasing(r * n_in + c) else canonical_order(r, c, n_in)
    if perm is not None:
        r, c = r[perm], c[perm]
    pattern = _make_csr(_crow(r, n_out), c, torch.zeros(r.numel(), dtype=x.dtype,
                        device=x.device), (n_out, n_in))
    vals = torch.sparse.sampled_addmm(pattern, delta.t(), x, beta=0.0).values()
    if perm is None:
        return vals
    out = torch.empty_like(vals)
    out[perm] = vals
    return out


def _strictly_increasing(lin: torch.Tensor) -> bool:
    return lin.numel() < 2 or bool((lin[1:] > lin[:-1]).all())


class _SparseLinearFn(torch.autograd.Function):
    """y = x W^T + b with W given as CSR (and its transpose, for the input gradient)."""

    @staticmethod
    def forward(ctx, x, values, bias, layer):
        w = layer._csr(values)
        y = (w @ x.t()).t()
        if bias is not None:
            y = y + bias
        ctx.layer = layer
        ctx.save_for_backward(x, values)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, values = ctx.saved_tensors
        layer = ctx.layer
        dy = dy.contiguous()
        gx = gv = gb = None
        if ctx.needs_input_grad[0]:
            gx = (layer._csr_t(values) @ dy.t()).t()
        if ctx.needs_input_grad[1]:
            pattern = layer._csr(values)
            gv = torch.sparse.sampled_addmm(pattern, dy.t(), x, beta=0.0).values()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = dy.sum(0)
        return gx, gv, gb, None


class _CaptureMixin:
    """Records x and delta of one batch when the DST engine arms ``capture``."""

    def _init_capture(self):
        self.capture = False
        self.captured_x = None
        self.captured_delta = None

    def _record(self, x2d: torch.Tensor, y: torch.Tensor) -> None:
        if not (self.capture and torch.is_grad_enabled() and y.requires_grad):
            return
        self.captured_x = x2d.detach()

        def hook(grad):
            self.captured_delta = grad.detach().reshape(-1, grad.shape[-1])
        y.register_hook(hook)

    def clear_capture(self) -> None:
        self.captured_x = None
        self.captured_delta = None

    def candidate_grad(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Gradient of the loss w.r.t. the weights at (rows, cols), from the captured batch."""
        if self.captured_x is None or self.captured_delta is None:
            raise RuntimeError("no captured batch: arm capture, then run forward and backward")
        return sampled_grad(self.captured_delta, self.captured_x, rows, cols)

    def unit_activity(self) -> tuple[torch.Tensor, torch.Tensor]:
        """GraBo marginals of paper 003 Eq. 7 (unnormalised): sum_i |h_i| and sum_i |delta_i|."""
        if self.captured_x is None or self.captured_delta is None:
            raise RuntimeError("no captured batch: arm capture, then run forward and backward")
        return self.captured_x.abs().sum(0), self.captured_delta.abs().sum(0)


class SparseLinear(_CaptureMixin, nn.Module):
    """Linear layer storing only active connections (COO indices in canonical order + values).

    ``weight[rows[k], cols[k]] = values[k]``; all other weights are zero and take no memory.
    """

    def __init__(self, in_features: int, out_features: int, rows: torch.Tensor,
                 cols: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if not values.is_floating_point():
            raise TypeError(f"values must be floating point, got {values.dtype}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.values = nn.Parameter(torch.empty(0, dtype=values.dtype, device=values.device))
        self.register_buffer("rows", torch.empty(0, dtype=torch.int64, device=values.device))
        self.register_buffer("cols", torch.empty(0, dtype=torch.int64, device=values.device))
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.set_topology(rows, cols, values)
        self._init_capture()

    # ---- topology ----------------------------------------------------------------------------
    def set_topology(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the active set. Sorts into canonical order; rejects duplicates/out-of-range."""
        if not (rows.shape == cols.shape == values.shape and rows.dim() == 1):
            raise ValueError("rows, cols and values must be 1-D of equal length")
        if rows.dtype not in (torch.int32, torch.int64) or cols.dtype != rows.dtype:
            raise TypeError(f"rows/cols must be int32 or int64, got {rows.dtype}, {cols.dtype}")
        if not values.is_floating_point():
            raise TypeError(f"values must be floating point, got {values.dtype}")
        rows, cols = rows.to(torch.int64), cols.to(torch.int64)
        if rows.numel() and (rows.min() < 0 or rows.max() >= self.out_features
                             or cols.min() < 0 or cols.max() >= self.in_features):
            raise ValueError("connection index out of range")
        lin = rows * self.in_features + cols
        if _strictly_increasing(lin):  # already canonical (the DST rewire merges in order)
            self.rows, self.cols = rows.clone(), cols.clone()
            self.values.data = values.detach().clone()
        else:
            perm = torch.argsort(lin, stable=True)
            lin = lin[perm]
            if bool((lin[1:] == lin[:-1]).any()):
                raise ValueError("duplicate connections")
            self.rows = rows[perm]
            self.cols = cols[perm]
            self.values.data = values.detach()[perm].clone()
        self._crow_cache = _crow(self.rows, self.out_features)
        # Transposed pattern for the input gradient, cached until the topology changes.
        self._t_perm = canonical_order(self.cols, self.rows, self.out_features)
        self._t_crow = _crow(self.cols[self._t_perm], self.in_features)
        self._t_cols = self.rows[self._t_perm]

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        return self.nnz / (self.in_features * self.out_features)

    def linear_index(self) -> torch.Tensor:
        return self.rows * self.in_features + self.cols

    def active_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rows, self.cols

    def active_values(self) -> torch.Tensor:
        return self.values.detach()

    def is_active(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Membership of (rows, cols) in the active set, by binary search on the sorted index."""
        lin = self.linear_index()
        q = rows.to(torch.int64) * self.in_features + cols.to(torch.int64)
        if lin.numel() == 0:
            return torch.zeros_like(q, dtype=torch.bool)
        pos = torch.searchsorted(lin, q).clamp_(max=lin.numel() - 1)
        return lin[pos] == q

    def _csr(self, values):
        return _make_csr(self._crow_cache, self.cols, values,
                         (self.out_features, self.in_features))

    def _csr_t(self, values):
        return _make_csr(self._t_crow, self._t_cols, values[self._t_perm],
                         (self.in_features, self.out_features))

    # ---- compute -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected last dim {self.in_features}, got {tuple(x.shape)}")
        if x.dtype != self.values.dtype:
            raise TypeError(f"input dtype {x.dtype} != weight dtype {self.values.dtype}")
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features).contiguous()
        y = _SparseLinearFn.apply(x2d, self.values, self.bias, self)
        self._record(x2d, y)
        return y.reshape(*lead, self.out_features)

    def to_dense(self) -> torch.Tensor:
        """Dense weight, for tests and small layers only (it defeats the point of the layer)."""
        w = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype,
                        device=self.values.device)
        w[self.rows, self.cols] = self.values.detach()
        return w

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor,
                   bias: torch.Tensor | None = None) -> "SparseLinear":
        rows, cols = mask.nonzero(as_tuple=True)
        return cls(weight.shape[1], weight.shape[0], rows, cols, weight.detach()[rows, cols], bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"nnz={self.nnz}, density={self.density:.4g}, bias={self.bias is not None}")


class MaskedLinear(_CaptureMixin, nn.Linear):
    """``nn.Linear`` with ``weight * mask`` in the forward (simulated sparsity, dense memory)."""

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None):
        out_f, in_f = weight.shape
        super().__init__(in_f, out_f, bias=bias is not None, dtype=weight.dtype,
                         device=weight.device)
        if mask.shape != weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight {tuple(weight.shape)}")
        with torch.no_grad():
            self.weight.copy_(weight * mask)
            if bias is not None:
                self.bias.copy_(bias)
        self.register_buffer("mask", mask.to(torch.bool).clone())
        self._init_capture()
        self.captured_dense_grad = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_eff = self.weight * self.mask
        if self.capture and torch.is_grad_enabled():
            # RigL needs the gradient of *every* connection, which the masked weight's own
            # gradient hides (it is multiplied by the mask): capture it before the mask.
            def hook(grad):
                self.captured_dense_grad = grad.detach()
            w_eff.register_hook(hook)
        y = nn.functional.linear(x, w_eff, self.bias)
        self._record(x.reshape(-1, self.in_features), y)
        return y

    def clear_capture(self) -> None:
        super().clear_capture()
        self.captured_dense_grad = None

    def dense_grad(self) -> torch.Tensor:
        if self.captured_dense_grad is None:
            raise RuntimeError("no captured dense gradient: arm capture before forward/backward")
        return self.captured_dense_grad

    @property
    def nnz(self) -> int:
        return int(self.mask.sum())

    def active_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mask.nonzero(as_tuple=True)  # row-major = canonical order

    def active_values(self) -> torch.Tensor:
        r, c = self.active_indices()
        return self.weight.detach()[r, c]

    def is_active(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return self.mask[rows, cols]

    def to_dense(self) -> torch.Tensor:
        return (self.weight * self.mask).detach()
