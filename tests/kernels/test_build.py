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
