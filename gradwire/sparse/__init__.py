"""Sparse training: dynamic sparse training (paper 003), transposable N:M weights with MVUE
N:M neural gradients (paper 004), and greedy N:M activations.

Typical use::

    from gradwire.sparse import sparsify, DynamicSparseTrainer, DSTConfig
    model = sparsify(model, density=0.1, layout="sparse")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    dst = DynamicSparseTrainer(model, opt, DSTConfig(method="grabo", update_every=100, t_end=T))
    ...; loss.backward(); dst.step()
"""
from gradwire.sparse.activations import NMReLU, nm_relu
from gradwire.sparse.dst import DSTConfig, DynamicSparseTrainer, sparse_layers, sparsify
from gradwire.sparse.sparse_linear import MaskedLinear, SparseLinear, sampled_grad
from gradwire.sparse.transposable import (TransposableNMLinear, is_transposable_nm,
                                          kept_magnitude, nm_sparse_linear,
                                          transposable_mask_exact, transposable_mask_greedy)

__all__ = ["DSTConfig", "DynamicSparseTrainer", "sparsify", "sparse_layers", "SparseLinear",
           "MaskedLinear", "sampled_grad", "TransposableNMLinear", "nm_sparse_linear",
           "transposable_mask_greedy", "transposable_mask_exact", "is_transposable_nm",
           "kept_magnitude", "nm_relu", "NMReLU"]
