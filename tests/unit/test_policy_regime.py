"""The policy acts on the measured gradient when pruning leaves its cheap regime (issue 17)."""
import warnings

import pytest
import torch

from gradwire.numerics.pruning_regime import expected_cosine
from gradwire.policy import BoundaryPolicy, PolicyConfig, PruningRegimeWarning


def _gauss(seed, n=8192):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def _wide(seed, n=8192, sigma_ln=3.0):  # lognormal magnitudes, sigma(log2|g|) ~ 4.3
    g = torch.Generator().manual_seed(seed)
    return torch.exp(sigma_ln * torch.randn(n, generator=g)) * torch.sign(torch.randn(n, generator=g))


def _run(policy, tensors):
    out = []
    for step, x in enumerate(tensors):
        out.append(policy.decode(policy.encode(x, step)))
    return out


def test_warns_once_on_gaussian_gradients():
    p = BoundaryPolicy(codec={"name": "prune", "sparsity": 0.8}, refresh_every=2)
    with pytest.warns(PruningRegimeWarning, match="expected cosine of only 0.5") as rec:
        _run(p, [_gauss(s) for s in range(6)])
    assert len([w for w in rec if issubclass(w.category, PruningRegimeWarning)]) == 1
    assert [e["step"] for e in p.events] == [0, 2, 4]
    assert all(0.4 < e["expected_cosine"] < 0.6 and e["applied_sparsity"] == 0.8 for e in p.events)
    assert p.codec.sparsity == 0.8  # warning only: nothing changed


def test_silent_where_pruning_is_cheap():
    p = BoundaryPolicy(codec={"name": "prune", "sparsity": 0.8}, refresh_every=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PruningRegimeWarning)
        _run(p, [_wide(s) for s in range(4)])
    assert all(e["expected_cosine"] > 0.95 for e in p.events)


def test_min_cosine_caps_and_releases():
    p = BoundaryPolicy(PolicyConfig(codec={"name": "prune", "sparsity": 0.8}, refresh_every=2, min_cosine=0.9,
                                    warn_cosine=None))
    xs = [_gauss(s) for s in range(4)]
    ys = _run(p, xs)
    capped = p.events[-1]["applied_sparsity"]
    assert 0.3 < capped < 0.6 and p.codec.sparsity == capped and p.target_sparsity == 0.8
    # the tensors after the refresh get (in expectation) the floor; one draw of 8192 elements
    # scatters by ~0.005 around it
    cos = [float(x @ y) / float(x.norm() * y.norm()) for x, y in zip(xs[-2:], ys[-2:])]
    assert min(cos) > 0.87
    x = xs[-1]
    assert expected_cosine(x, p.codec.threshold(x, p.fit)) >= 0.9
    _run_from = len(xs)
    for k, x in enumerate([_wide(s) for s in range(4)]):  # wide gradients: back to the configured 0.8
        p.decode(p.encode(x, _run_from + k))
    assert p.codec.sparsity == 0.8 and p.telemetry()["expected_cosine"] > 0.95


def test_set_sparsity_moves_the_target_and_bad_floors_fail():
    p = BoundaryPolicy(codec={"name": "prune", "sparsity": 0.8})
    p.set_sparsity(0.7)
    assert p.target_sparsity == 0.7
    for bad in (0.0, 1.5, True):
        with pytest.raises(ValueError):
            PolicyConfig(codec={"name": "prune", "sparsity": 0.8}, min_cosine=bad)
        with pytest.raises(ValueError):
            p.set_min_cosine(bad)


def test_other_codecs_are_not_checked():
    p = BoundaryPolicy(codec={"name": "fp", "bits": 6}, refresh_every=1)
    _run(p, [_gauss(s) for s in range(3)])
    assert p.events == []


def test_config_key_reaches_the_policy():
    from gradwire.config import ConfigError, parse_gradwire
    from gradwire.integrations.deepspeed import codec_from_spec, make_policy

    gw = parse_gradwire({"codec": {"name": "prune", "sparsity": 0.8, "min_cosine": 0.9}})
    assert gw.codec.min_cosine == 0.9 and gw.codec.label == "prune0.8-cos0.9"
    assert make_policy(gw, 0).min_cosine == 0.9
    assert codec_from_spec(gw.codec).sparsity == 0.8  # a policy setting, not a codec parameter
    assert make_policy(parse_gradwire({"codec": {"name": "prune", "sparsity": 0.8}}), 0).min_cosine is None
    for bad in (0, 1.2, "0.9", True):
        with pytest.raises(ConfigError, match="min_cosine"):
            parse_gradwire({"codec": {"name": "prune", "sparsity": 0.8, "min_cosine": bad}})
    with pytest.raises(ConfigError, match="unknown key 'min_cosine'"):
        parse_gradwire({"codec": {"name": "fp", "bits": 6, "min_cosine": 0.9}})
