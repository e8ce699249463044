"""The slow-link harness (gradwire.testing.shaped_link, bench/slow_link.py): a namespace of its
own, shaped to the asked rate, a 2-rank job inside it, and nothing left behind."""
from __future__ import annotations

import json
import os
import sys

import pytest

from gradwire.testing.shaped_link import NET_COUNTER_ENV, ShapedNamespace, available

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OK, WHY = available()
needs_netns = pytest.mark.skipif(not OK, reason=f"cannot shape a link here: {WHY}")


@needs_netns
def test_shaped_rate_tiny_job_and_teardown(tmp_path):
    out = tmp_path / "rep.json"
    env = dict(os.environ, PYTHONPATH=ROOT, **{NET_COUNTER_ENV: "lo"})
    with ShapedNamespace(rate_mbit=20) as ns:
        name = ns.name
        assert ns.exists()
        rate = ns.measure_rate()
        assert 0.8 * 20e6 <= rate <= 1.2 * 20e6, rate
        res = ns.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29555",
                      os.path.join(ROOT, "bench", "ddp_job.py"), "--hook", "allreduce", "--steps", "3",
                      "--width", "32", "--depth", "1", "--seq-len", "16", "--out", str(out)],
                     timeout=240, env=env, cwd=ROOT)
        assert res.returncode == 0, res.stdout[-3000:]
        stats = ns.qdisc_stats()
    rep = json.loads(out.read_text())
    per_step = [b - a for a, b in zip(rep["net_tx_bytes"], rep["net_tx_bytes"][1:])]
    # each step all-reduces every gradient: at least the gradient bytes crossed the link
    assert len(per_step) == 3 and min(per_step) >= rep["gradient_bytes_per_replica"], (per_step, rep)
    assert stats["drops"] == 0
    assert not ShapedNamespace(name=name).exists()


@needs_netns
def test_namespace_removed_when_the_body_raises():
    with pytest.raises(RuntimeError, match="boom"):
        with ShapedNamespace(rate_mbit=50) as ns:
            name = ns.name
            raise RuntimeError("boom")
    assert not ShapedNamespace(name=name).exists()


def test_burst_must_exceed_the_mtu():
    with pytest.raises(ValueError, match="MTU"):
        ShapedNamespace(rate_mbit=10, burst_bytes=1500)


def _load_bench(name: str):
    """Import bench/<name>.py without putting bench/ on sys.path: spawned workers inherit
    sys.path, and bench/kernels.py would then shadow other packages' `import kernels`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"gradwire_bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ideal_and_speedups_from_known_runs():
    slow_link = _load_bench("slow_link")

    def row(variant, rate, step, nbytes, bps):
        return {"job": "pipeline", "variant": variant, "rate": rate, "namespace": True, "step_median_s": step,
                "bytes_per_step": nbytes, "link_bps": bps, "tbf_drops": 0, "final_loss": 1.0}

    rows = [row("none", "unlimited", 1.0, 4e6, 1e10), row("fp6", "unlimited", 1.1, 1e6, 1e10),
            row("none", "10", 5.0, 4e6, 1e7), row("fp6", "10", 2.2, 1e6, 1e7)]
    got = {(r["variant"], r["rate"]): r for r in slow_link.analyse(rows)}
    none10, fp610 = got[("none", "10")], got[("fp6", "10")]
    assert none10["ideal_s"] == pytest.approx(1.0 + 3.2)  # compute + 32 Mbit at 10 Mbit/s
    assert fp610["ideal_s"] == pytest.approx(1.1 + 0.8)
    assert none10["of_ideal"] == pytest.approx(4.2 / 5.0)
    assert fp610["speedup"] == pytest.approx(5.0 / 2.2)
    assert fp610["ideal_speedup"] == pytest.approx(4.2 / 1.9)
    assert fp610["of_ideal_speedup"] == pytest.approx((5.0 / 2.2) / (4.2 / 1.9))
    assert "ideal_s" not in got[("none", "unlimited")]
