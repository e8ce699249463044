"""The fidelity suite's statistics on inputs with known answers (issue 17)."""
import math
import random

import pytest

from gradwire.fidelity.stats import bands, paired_difference, smooth, t_interval

T975_2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (table value)


def test_t_interval_known_answer():
    iv = t_interval([1.0, 2.0, 3.0])
    assert iv.n == 3 and iv.mean == pytest.approx(2.0) and iv.sd == pytest.approx(1.0)
    half = T975_2 / math.sqrt(3)
    assert iv.lo == pytest.approx(2.0 - half, rel=1e-9) and iv.hi == pytest.approx(2.0 + half, rel=1e-9)


def test_one_value_has_no_interval():
    iv = t_interval([0.5])
    assert iv.mean == 0.5 and math.isnan(iv.lo) and math.isnan(iv.hi)
    assert paired_difference([1.1], [1.0]).verdict(0.01) == "unresolved"


def test_paired_difference_is_the_interval_of_the_differences():
    base = [1.30, 1.40, 1.35]
    run = [b + d for b, d in zip(base, [0.01, 0.02, 0.03])]
    p = paired_difference(run, base)
    assert p.diff.mean == pytest.approx(0.02) and p.diff.sd == pytest.approx(0.01)
    assert p.diff.hi - p.diff.mean == pytest.approx(T975_2 * 0.01 / math.sqrt(3))
    rel = [d / b for d, b in zip([0.01, 0.02, 0.03], base)]
    assert p.rel.mean == pytest.approx(sum(rel) / 3)
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])


def test_verdicts():
    base = [1.0, 1.0, 1.0]
    assert paired_difference([1.001, 1.002, 1.003], base).verdict(0.01) == "within"
    assert paired_difference([1.10, 1.11, 1.12], base).verdict(0.01) == "outside"
    assert paired_difference([0.99, 1.00, 1.05], base).verdict(0.01) == "unresolved"


def test_paired_interval_coverage_monte_carlo():
    # 4000 experiments of 3 seeds: correlated pairs (shared seed effect), true shift 0.02.
    # Coverage of a 95% interval is Binomial(4000, 0.95): sd 0.0034, so +-0.014 is 4 sd.
    rng = random.Random(17)
    hits, trials = 0, 4000
    for _ in range(trials):
        seed_effect = [rng.gauss(1.3, 0.05) for _ in range(3)]
        base = [s + rng.gauss(0, 0.004) for s in seed_effect]
        run = [s + 0.02 + rng.gauss(0, 0.004) for s in seed_effect]
        hits += paired_difference(run, base).diff.contains(0.02)
    assert abs(hits / trials - 0.95) < 0.014


def test_bands_and_smooth():
    mean, lo, hi = bands([[1.0, 2.0], [3.0, 2.0]])
    assert mean == [2.0, 2.0]
    assert hi[0] - mean[0] == pytest.approx(12.706204736174707 * math.sqrt(2) / math.sqrt(2))  # t(0.975, 1)
    assert lo[1] == hi[1] == 2.0  # no spread
    assert smooth([1, 2, 3, 4], 2) == [1.0, 1.5, 2.5, 3.5]
    m1, l1, h1 = bands([[1.0, 2.0]])  # one seed: the band is the curve
    assert l1 == h1 == m1
