"""The JIT build cache is trusted code (issue 16, findings 9 and 10): it is created private
whatever the umask, refused when others could write to it or own it, keyed by the sources'
content and flags, and the status command says which implementation really serves each op."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import pytest

from gradwire import _build

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


def test_cache_dirs_are_private_under_umask_000(tmp_path, monkeypatch):
    base = tmp_path / "cache"
    monkeypatch.setenv(_build.BUILD_DIR_ENV, str(base))
    old = os.umask(0)
    try:
        path = _build.build_dir("cpu")
    finally:
        os.umask(old)
    assert path.startswith(str(base)) and os.path.isdir(path)
    p = path
    while p != str(tmp_path):  # the base and every directory below it
        assert _mode(p) == 0o700, (p, oct(_mode(p)))
        p = os.path.dirname(p)


def test_writable_by_others_is_refused(tmp_path, monkeypatch):
    base = tmp_path / "cache"
    base.mkdir()
    os.chmod(base, 0o777)
    monkeypatch.setenv(_build.BUILD_DIR_ENV, str(base))
    with pytest.raises(_build.BuildCacheError, match="writable by other users.*chmod 700"):
        _build.build_dir("cpu")
    os.chmod(base, 0o700)
    inner = os.path.dirname(_build.build_dir("cpu"))
    os.chmod(inner, 0o775)  # a group-writable level below the base is refused as well
    with pytest.raises(_build.BuildCacheError, match="writable by other users"):
        _build.build_dir("cpu")


def test_parent_writable_without_sticky_bit_is_refused(tmp_path, monkeypatch):
    parent = tmp_path / "shared"
    parent.mkdir()
    os.chmod(parent, 0o777)
    monkeypatch.setenv(_build.BUILD_DIR_ENV, str(parent / "cache"))
    with pytest.raises(_build.BuildCacheError, match="without the sticky bit"):
        _build.build_dir("cpu")
    os.chmod(parent, 0o1777)  # like /tmp: others cannot rename our directory
    assert os.path.isdir(_build.build_dir("cpu"))


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a directory to another user")
def test_foreign_owner_is_refused(tmp_path, monkeypatch):
    base = tmp_path / "cache"
    base.mkdir(mode=0o700)
    os.chown(base, 65534, 65534)
    monkeypatch.setenv(_build.BUILD_DIR_ENV, str(base))
    with pytest.raises(_build.BuildCacheError, match="owned by uid 65534"):
        _build.build_dir("cpu")


PLANT_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *m = getenv("GW_PLANT_MARKER");
    if (m) { FILE *f = fopen(m, "w"); if (f) { fputs("ran", f); fclose(f); } }
}
"""


def _compile_plant(tmp_path):
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "plant.c"
    src.write_text(PLANT_C)
    so = tmp_path / "plant.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(so), str(src)], check=True, capture_output=True)
    return so


def test_planted_library_in_a_world_writable_cache_never_runs(tmp_path):
    """Before: a .so planted where the cache keeps the build ran its constructor in every gradwire
    process. Now the world-writable cache is refused before anything is built or loaded."""
    so = _compile_plant(tmp_path)
    base = tmp_path / "cache"
    base.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT, GRADWIRE_BUILD_DIR=str(base), GW_PLANT_MARKER=str(tmp_path / "ran"))
    # where the build would be: <base>/<tag>/cpu-<key>/gradwire_cpu.so, laid out with the real
    # names, then the base opened to everyone (as under umask 000 before the fix)
    code = ("import os; from gradwire import _build; os.environ['GRADWIRE_BUILD_DIR'] = __import__('sys').argv[1];"
            "print(_build.build_dir('cpu'))")
    path = subprocess.run([sys.executable, "-c", code, str(base)], env=env, cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    shutil.copy(so, os.path.join(path, "gradwire_cpu.so"))
    os.chmod(base, 0o777)
    res = subprocess.run([sys.executable, "-m", "gradwire.ops"], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "[cpu] native kernels unavailable: refused: build cache" in res.stdout, res.stdout
    assert "fp_encode     reference" in res.stdout
    assert not (tmp_path / "ran").exists()


def test_status_reports_a_library_that_registers_nothing(tmp_path):
    """A library that loads but registers no kernel must not be reported as native kernels."""
    so = _compile_plant(tmp_path)
    code = ("from gradwire import _build, ops; _build._prebuilt = lambda b: %r if b == 'cpu' else None;"
            "print(ops.status())" % str(so))
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    assert "[cpu] native kernels unavailable: prebuilt library plant.so, but it registers no cpu kernel" \
        in res.stdout, res.stdout
    assert "native kernels loaded" not in res.stdout


def test_cache_key_follows_source_content_and_flags(tmp_path, monkeypatch):
    copy = tmp_path / "csrc"
    shutil.copytree(_build.CSRC, copy)
    monkeypatch.setattr(_build, "CSRC", str(copy))
    k0 = _build.cache_key("cpu")
    assert _build.cache_key("cpu") == k0  # stable
    shutil.copytree(copy, tmp_path / "other" / "csrc")  # another checkout, same sources
    monkeypatch.setattr(_build, "CSRC", str(tmp_path / "other" / "csrc"))
    assert _build.cache_key("cpu") == k0  # shares the cache instead of rebuilding it
    hdr = tmp_path / "other" / "csrc" / "common" / "rng.h"
    hdr.write_text(hdr.read_text() + "\n// changed\n")  # a header counts, not just .cpp files
    assert _build.cache_key("cpu") != k0
    monkeypatch.setattr(_build, "CSRC", str(copy))
    monkeypatch.setattr(_build, "CPU_CFLAGS", _build.CPU_CFLAGS + ["-DX"])
    assert _build.cache_key("cpu") != k0
