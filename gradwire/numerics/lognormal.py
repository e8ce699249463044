"""Lognormal statistics of neural gradients and the analytic measures built on them (paper 001).

This module is the stable import point (``gradwire.numerics.lognormal``); the implementation is
split by job:

* ``lognormal_fit``: additive moment statistics and the lognormal fit (``moment_stats``,
  ``merge_stats``, ``fit_from_stats``, ``fit_lognormal``, ``LognormalFit``) and the
  Kolmogorov-Smirnov distances to a normal and to a lognormal fit (Table 1);
* ``fp_split``: Eq. (4), the expected relative error of the idealised n-bit FP format of Eq. (2)
  with the mantissa term re-derived, and the optimal exponent/mantissa split (Table 2);
* ``pruning_threshold``: Eq. (8), the expected sparsity of stochastic pruning (Eq. 5) at
  threshold alpha, and its inverse;
* ``sparsity_allocation``: the cosine similarity of stochastic pruning and the heterogeneous
  per-layer sparsity allocation under an element-weighted budget.

Units (docs/architecture.md): ``*_log2`` are statistics of log2|g| (Eq. 2-4), ``*_ln`` of ln|g|
(Eq. 5-8). Statistics cover the finite nonzero entries; zeros and non-finite entries are counted
separately. Scalar analytics use float64 numpy/scipy; tensor passes use torch. The per-layer
scale for a concrete format is ``gradwire.numerics.fp_error.optimal_scale_exp``.
"""
from __future__ import annotations

from gradwire.numerics.fp_split import (
    eq4_expected_error,
    eq4_expected_error_notes,
    mantissa_error_exact,
    mantissa_error_notes,
    optimal_split,
)
from gradwire.numerics.lognormal_fit import (
    KS_MAX_SAMPLES,
    KS_SEED,
    LN2,
    STATS_LEN,
    LognormalFit,
    fit_from_stats,
    fit_lognormal,
    ks_distance_lognormal,
    ks_distance_normal,
    merge_stats,
    moment_stats,
)
from gradwire.numerics.pruning_threshold import pruning_sparsity, pruning_threshold, pruning_threshold_for
from gradwire.numerics.sparsity_allocation import allocate_sparsity, pruning_cosine

__all__ = [
    "KS_MAX_SAMPLES", "KS_SEED", "LN2", "STATS_LEN", "LognormalFit",
    "allocate_sparsity", "eq4_expected_error", "eq4_expected_error_notes", "fit_from_stats",
    "fit_lognormal", "ks_distance_lognormal", "ks_distance_normal", "mantissa_error_exact",
    "mantissa_error_notes", "merge_stats", "moment_stats", "optimal_split", "pruning_cosine",
    "pruning_sparsity", "pruning_threshold", "pruning_threshold_for",
]
