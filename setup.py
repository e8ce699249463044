"""gradwire: compression of neural gradients across model-parallel boundaries.

The native kernels in csrc/ are compiled on first use by ``gradwire._build`` (cached under
``~/.cache/gradwire`` or ``$GRADWIRE_BUILD_DIR``). Set ``GRADWIRE_BUILD_EXT=1`` at install time to
compile the CPU extension ahead of time instead.
"""
import glob
import os

from setuptools import find_packages, setup


def _native_extensions():
    """Ahead-of-time build of csrc/ when GRADWIRE_BUILD_EXT=1 (needs torch in the build env:
    ``GRADWIRE_BUILD_EXT=1 pip install --no-build-isolation .``). Without it, gradwire._build
    compiles the kernels on first use; the flags here must stay those of gradwire/_build.py."""
    if os.environ.get("GRADWIRE_BUILD_EXT", "") in ("", "0"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cflags = ["-O3", "-std=c++17", "-ffp-contract=off", "-fopenmp"]
    exts = [
        CppExtension(
            "gradwire._gradwire_cpu",
            sorted(glob.glob("csrc/cpu/*.cpp")),
            extra_compile_args=cflags,
            extra_link_args=["-fopenmp"],
        )
    ]
    if torch.cuda.is_available() or os.environ.get("GRADWIRE_BUILD_CUDA", "") not in ("", "0"):
        exts.append(
            CUDAExtension(
                "gradwire._gradwire_cuda",
                sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp")),
                extra_compile_args={"cxx": cflags, "nvcc": ["-O3", "-std=c++17", "--fmad=false"]},
            )
        )
    return exts, {"build_ext": BuildExtension}


_EXT_MODULES, _CMDCLASS = _native_extensions()

setup(
    name="gradwire",
    version="0.1.0",
    description="Compress neural gradients crossing pipeline and tensor-parallel boundaries",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["gradwire", "gradwire.*"]),
    install_requires=[
        # torch is installed first, for your platform (see README); any 2.4+ build works.
        "torch>=2.4",
        "numpy>=1.24",
        "scipy>=1.10",
        "deepspeed>=0.14",
        "mpi4py>=4.0",
        "mpich>=4.1",  # an MPI runtime (mpirun) that installs from PyPI
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "ninja>=1.11",  # torch.utils.cpp_extension builds with ninja
    ],
    ext_modules=_EXT_MODULES,
    cmdclass=_CMDCLASS,
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.2",  # a hung collective fails its test instead of the CI run
            "hypothesis>=6.100",
            "scikit-learn>=1.3",  # the digits data set used by tests and benchmarks (ships with it)
            "megatron-core>=0.16,<0.17",  # tests of gradwire.integrations.megatron
            "transformers>=4.40",  # examples/ (GPT-2 from a config; nothing is downloaded)
        ],
        # gradwire.integrations.megatron: the patched backward follows 0.16's code (version-checked)
        "megatron": ["megatron-core>=0.16,<0.17"],
        "examples": ["transformers>=4.40"],
    },
)
