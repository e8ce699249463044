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
   ``$GRADWIRE_BUILD_DIR`` or ``~/.cache/gradwire``, keyed by torch and Python version; torch
   rebuilds only when a source changes, and a file lock serialises concurrent builders.

The CUDA extension is only attempted when ``torch.cuda.is_available()``.
"""
from __future__ import annotations

import glob
import os
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


def build_dir(backend: str) -> str:
    """The JIT cache directory for one backend (created if missing)."""
    base = os.environ.get(BUILD_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "gradwire")
    tag = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}".replace("+", "_")
    path = os.path.join(base, tag, backend)
    os.makedirs(path, exist_ok=True)
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
    kwargs = dict(
        name=f"gradwire_{backend}",
        sources=sources,
        extra_cflags=CPU_CFLAGS,
        extra_ldflags=CPU_LDFLAGS,
        build_directory=build_dir(backend),
        is_python_module=False,
        verbose=os.environ.get("GRADWIRE_BUILD_VERBOSE", "") not in ("", "0"),
    )
    if backend == "cuda":
        kwargs["extra_cuda_cflags"] = NVCC_FLAGS
    cpp_extension.load(**kwargs)
    return True, f"JIT build cached in {build_dir(backend)}"


def load_native() -> None:
    """Load (building if needed) every native backend this machine can use. Never raises."""
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
                STATUS[b] = _load_one(b)
            except Exception as exc:  # a failed build must never break the library
                last = traceback.format_exception_only(type(exc), exc)[-1].strip()
                STATUS[b] = (False, f"native build/load failed: {last[:500]}")
