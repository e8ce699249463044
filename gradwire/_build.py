"""Find or build the native kernels in csrc/; never raise.

``load_native()`` is called by ``gradwire.ops`` on the first use of an op (not at import: the
first JIT build of the CPU extension takes about a minute). It returns nothing and records, per
backend, whether native kernels are registered and why not (``STATUS``); ``python -m gradwire.ops``
prints it.

How the kernels are found, in order:

1. ``GRADWIRE_FORCE_REFERENCE=1``: nothing is loaded; every op runs its pure-PyTorch reference.
2. A prebuilt library next to this file (``gradwire/_gradwire_cpu*.so``, ``_gradwire_cuda*.so``),
   as an ahead-of-time build (``GRADWIRE_BUILD_EXT=1 pip install .``, see ``extension_sources``)
   would leave it.
3. A JIT build with ``torch.utils.cpp_extension.load`` (ninja), cached under
   ``$GRADWIRE_BUILD_DIR`` or ``~/.cache/gradwire``, in a directory keyed by torch and Python
   version and by a hash of every file under ``csrc/common`` and ``csrc/<backend>`` plus the
   compiler flags (``cache_key``): two checkouts with different sources use different
   directories instead of rebuilding each other's, and a source change is a new directory.
   A file lock serialises concurrent builders of one directory.

The build cache is trusted code (every gradwire process loads the ``.so`` it holds, running its
constructors), so it must be private (``check_private_dir``): the directories gradwire creates
are mode 0700 whatever the umask, and an existing one that is not owned by this user or that
another user can write to (or whose parent others can write without the sticky bit) is refused
with a message in ``STATUS``; the ops then run their pure-PyTorch references.

After loading, ``STATUS`` says what the library actually registered: a library that loads but
registers no kernel for some op says so (``load_native(expected_ops)``), so ``python -m
gradwire.ops`` never reports native kernels that do not serve.

The CUDA extension is only attempted when ``torch.cuda.is_available()``.
"""
from __future__ import annotations

import glob
import hashlib
import os
import stat
import sys
import threading
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
FORCE_REFERENCE_ENV = "GRADWIRE_FORCE_REFERENCE"
BUILD_DIR_ENV = "GRADWIRE_BUILD_DIR"

# -O3 and no -march=native (the cache may be shared between machines) and no -ffast-math
# (bit-exactness with the reference needs IEEE semantics; -ffp-contract=off keeps a*b+c two
# roundings in the vectorised AVX2/AVX-512 clones too). OpenMP drives at::parallel_for.
CPU_CFLAGS = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off"]
CPU_LDFLAGS = ["-fopenmp"]
# --fmad=false: nvcc contracts a*b+c into one FMA by default, which rounds once instead of
# twice and breaks bit-exactness with the reference (e.g. the approx-2:4 inclusion probabilities).
NVCC_FLAGS = ["-O3", "-std=c++17", "--fmad=false"]

# backend -> (native loaded?, reason). Filled by load_native().
STATUS: dict[str, tuple[bool, str]] = {
    "cpu": (False, "not loaded yet (native kernels load on the first op call)"),
    "cuda": (False, "not loaded yet (native kernels load on the first op call)"),
}
_lock = threading.Lock()
_attempted = False


def force_reference() -> bool:
    """True when the documented switch asks for the pure-PyTorch reference everywhere."""
    return os.environ.get(FORCE_REFERENCE_ENV, "").strip() not in ("", "0")


class BuildCacheError(RuntimeError):
    """The build cache cannot be trusted (owner or permissions); nothing is built or loaded."""


def check_private_dir(path: str) -> None:
    """Create ``path`` (mode 0700) if missing; raise ``BuildCacheError`` unless it is a directory
    owned by this user that no other user can write to."""
    if not os.path.lexists(path):
        try:
            os.mkdir(path, 0o700)  # the umask can only remove bits from 0700
        except FileExistsError:  # a concurrent builder made it: check it like any other
            pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise BuildCacheError(f"build cache {path} is not a directory (a symlink or a file)")
    if st.st_uid != os.getuid():
        raise BuildCacheError(f"build cache {path} is owned by uid {st.st_uid}, not by this user "
                              f"(uid {os.getuid()}); set {BUILD_DIR_ENV} to a directory of your own")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise BuildCacheError(f"build cache {path} is writable by other users (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}): anyone could plant a library that every "
                              f"gradwire process loads; run chmod 700 {path} or set {BUILD_DIR_ENV}")


def _check_parent(path: str) -> None:
    """Others must not be able to replace ``path`` itself: its parent is theirs to write only
    with the sticky bit (as /tmp)."""
    parent = os.path.dirname(os.path.abspath(path))
    st = os.stat(parent)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise BuildCacheError(f"build cache {path}: its parent {parent} is writable by other users "
                              f"without the sticky bit (mode {stat.S_IMODE(st.st_mode):04o}), so the "
                              f"cache could be swapped; set {BUILD_DIR_ENV} elsewhere")


def cache_key(backend: str) -> str:
    """Hash of the sources that make up one extension (every file under csrc/common and
    csrc/<backend>, headers included, by relative path and content) and its flags."""
    h = hashlib.sha256()
    h.update(repr((CPU_CFLAGS, CPU_LDFLAGS, NVCC_FLAGS if backend == "cuda" else None)).encode())
    for sub in ("common", backend):
        for path in sorted(glob.glob(os.path.join(CSRC, sub, "**", "*"), recursive=True)):
            if os.path.isfile(path):
                h.update(os.path.relpath(path, CSRC).encode() + b"\0")
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()[:16]


def build_dir(backend: str) -> str:
    """The JIT cache directory for one backend: created private if missing, checked if not
    (``BuildCacheError``), keyed by versions and ``cache_key``."""
    base = os.environ.get(BUILD_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "gradwire")
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
    _check_parent(base)
    tag = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}".replace("+", "_")
    path = base
    for part in (tag, f"{backend}-{cache_key(backend)}"):
        check_private_dir(path)
        path = os.path.join(path, part)
    check_private_dir(path)
    return path


def extension_sources(backend: str) -> list[str]:
    """Source files of one extension, for the JIT build here or an ahead-of-time setup.py build."""
    if backend == "cpu":
        return sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    if backend == "cuda":
        return sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu"))) + sorted(
            glob.glob(os.path.join(CSRC, "cuda", "*.cpp"))
        )
    raise ValueError(f"unknown backend {backend!r}")


def _prebuilt(backend: str) -> str | None:
    hits = glob.glob(os.path.join(os.path.dirname(__file__), f"_gradwire_{backend}*.so"))
    return hits[0] if hits else None


def _load_one(backend: str) -> tuple[bool, str]:
    prebuilt = _prebuilt(backend)
    if prebuilt:
        torch.ops.load_library(prebuilt)
        return True, f"prebuilt library {os.path.basename(prebuilt)}"
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return False, "ninja is not installed (pip install ninja) and no prebuilt library"
    sources = extension_sources(backend)
    if not sources:
        return False, f"no sources under csrc/{backend}"
    path = build_dir(backend)
    kwargs = dict(
        name=f"gradwire_{backend}",
        sources=sources,
        extra_cflags=list(CPU_CFLAGS),  # copies: cpp_extension appends to the lists it is given
        extra_ldflags=list(CPU_LDFLAGS),
        build_directory=path,
        is_python_module=False,
        verbose=os.environ.get("GRADWIRE_BUILD_VERBOSE", "") not in ("", "0"),
    )
    if backend == "cuda":
        kwargs["extra_cuda_cflags"] = list(NVCC_FLAGS)
    cpp_extension.load(**kwargs)
    return True, f"JIT build cached in {path}"


def _registered(expected_ops, backend: str) -> tuple[list[str], list[str]]:
    """(ops with a native kernel for ``backend``'s dispatch key, ops without one)."""
    key = {"cpu": "CPU", "cuda": "CUDA"}[backend]
    have = [op for op in expected_ops if torch._C._dispatch_has_kernel_for_dispatch_key(f"gradwire::{op}", key)]
    return have, [op for op in expected_ops if op not in have]


def _truthful(status: tuple[bool, str], expected_ops, backend: str) -> tuple[bool, str]:
    """A loaded library counts as native only for the ops it registered."""
    ok, why = status
    if not ok or not expected_ops:
        return status
    have, missing = _registered(expected_ops, backend)
    if not have:
        return False, f"{why}, but it registers no {backend} kernel: every op runs the reference"
    if missing:
        return True, f"{why}; no native kernel for {', '.join(missing)} (reference)"
    return status


def load_native(expected_ops=()) -> None:
    """Load (building if needed) every native backend this machine can use. Never raises.

    ``expected_ops``: the op names the library should register (``ops.SCHEMAS``); ``STATUS``
    then reports what it did register."""
    global _attempted
    with _lock:
        if _attempted:
            return
        _attempted = True
        if force_reference():
            for b in STATUS:
                STATUS[b] = (False, f"{FORCE_REFERENCE_ENV}=1 forces the pure-PyTorch reference")
            return
        backends = ["cpu"]
        if torch.cuda.is_available():
            backends.append("cuda")
        else:
            STATUS["cuda"] = (False, "torch.cuda.is_available() is False (no GPU or CPU-only torch)")
        for b in backends:
            try:
                STATUS[b] = _truthful(_load_one(b), list(expected_ops), b)
            except BuildCacheError as exc:
                STATUS[b] = (False, f"refused: {exc}")
            except Exception as exc:  # a failed build must never break the library
                last = traceback.format_exception_only(type(exc), exc)[-1].strip()
                STATUS[b] = (False, f"native build/load failed: {last[:500]}")
