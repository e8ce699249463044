"""_build: the reference switch, the status command, and failures recorded instead of raised."""
from __future__ import annotations

import os
import subprocess
import sys

from gradwire import _build

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_status(env_extra):
    env = dict(os.environ, PYTHONPATH=ROOT, **env_extra)
    return subprocess.run([sys.executable, "-m", "gradwire.ops"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


def test_force_reference_switch_and_status_command():
    res = _run_status({"GRADWIRE_FORCE_REFERENCE": "1"})
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "GRADWIRE_FORCE_REFERENCE=1 forces the pure-PyTorch reference" in out
    assert "native" not in out.replace("native kernels", "")  # every op served by the reference
    assert "fp_encode     reference" in out


def test_status_command_reports_native_cpu():
    res = _run_status({})
    assert res.returncode == 0, res.stderr
    assert "[cpu] native kernels loaded" in res.stdout, res.stdout
    assert "fp_encode     native" in res.stdout
    assert "[cuda]" in res.stdout  # says why CUDA is or is not native


def test_failed_build_is_recorded_not_raised(monkeypatch):
    monkeypatch.setattr(_build, "_prebuilt", lambda backend: None)
    monkeypatch.setattr(_build, "extension_sources", lambda backend: [])
    ok, why = _build._load_one("cpu")
    assert not ok and "no sources" in why
    monkeypatch.setattr(_build, "extension_sources", lambda backend: ["/nonexistent/x.cpp"])
    monkeypatch.setattr(_build, "_attempted", False)
    monkeypatch.setattr(_build, "STATUS", dict(_build.STATUS))
    monkeypatch.setattr(_build, "build_dir", lambda backend: str(os.path.join(os.sep, "tmp", "gw_bad_build")))
    _build.load_native()  # must not raise
    ok, why = _build.STATUS["cpu"]
    assert not ok and "failed" in why


def test_reference_mode_serves_the_same_bytes():
    # Under the switch every op runs its pure-PyTorch reference; results equal the native ones.
    code = (
        "import torch; from gradwire import ops; from gradwire.numerics.fp import FPFormat\n"
        "x = torch.linspace(-3, 3, 1001)\n"
        "p, s = ops.fp_encode(x, FPFormat(4, 1), 'stochastic', seed=4)\n"
        "v, i = ops.nm_select(x[:1000], 'mvue_24_exact', seed=1)\n"
        "assert ops.implementation('fp_encode') == 'reference'\n"
        "torch.save((p, s[[0, 3, 4]], v, i), __import__('sys').argv[1])\n"
    )
    import tempfile

    import torch

    from gradwire import ops
    from gradwire.numerics.fp import FPFormat

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ref.pt")
        env = dict(os.environ, PYTHONPATH=ROOT, GRADWIRE_FORCE_REFERENCE="1")
        res = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                             env=env, cwd=ROOT, timeout=600)
        assert res.returncode == 0, res.stderr
        p_ref, counts_ref, v_ref, i_ref = torch.load(path)
    x = torch.linspace(-3, 3, 1001)
    p, s = ops.fp_encode(x, FPFormat(4, 1), "stochastic", seed=4)
    v, i = ops.nm_select(x[:1000], "mvue_24_exact", seed=1)
    assert torch.equal(p, p_ref) and torch.equal(s[[0, 3, 4]], counts_ref)
    assert torch.equal(v, v_ref) and torch.equal(i, i_ref)
