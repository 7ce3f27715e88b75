"""Build keydistill and its compiled extension keydistill._C.

- C++ CPU kernels are always built (csrc/*.cpp + csrc/cpu/*.cpp).
- CUDA kernels (csrc/cuda/*.cu) are added when torch is a CUDA build and nvcc is found, unless
  KEYDISTILL_SKIP_CUDA=1. No GPU is needed to compile: the arch list defaults to 8.0;9.0.
- Without a working compiler the package still installs and runs on the torch backend, unless
  KEYDISTILL_REQUIRE_EXT=1 (as in CI), which makes any build failure fatal.
- KEYDISTILL_REQUIRE_CUDA=1 (as in CI) makes a build that would leave out the CUDA kernels (CPU-only torch, no
  toolkit) fail instead, and tests/ops/test_cuda_build.py then expects a CUDA kernel for every op.

Install: pip install -e . --no-build-isolation   (the build needs the installed torch)
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import sysconfig
import warnings

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def truthy(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def find_cuda_home() -> str | None:
    """The CUDA toolkit folder, i.e. the one holding include/cuda_runtime.h.

    torch guesses CUDA_HOME from `which nvcc`; when nvcc is a wrapper script (as in /usr/local/bin here)
    that guess is wrong, so look at the usual places and take the first real toolkit.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for path in candidates:
        if (
            path
            and os.path.exists(os.path.join(path, "include", "cuda_runtime.h"))
            and os.path.exists(os.path.join(path, "bin", "nvcc"))
        ):
            return path
    return None


def wheel_cuda_includes() -> list[str]:
    """Headers of the nvidia-* wheels torch brings (cuBLAS, cuSPARSE...), which ATen's CUDA headers include."""
    site = sysconfig.get_paths()["purelib"]
    return sorted(p for p in glob.glob(os.path.join(site, "nvidia", "*", "include")) if os.path.isdir(p))


def extensions():
    try:
        import torch  # noqa: F401
    except ImportError:
        warnings.warn(
            "torch is not installed: building keydistill without its compiled kernels (torch backend only)",
            stacklevel=2,
        )
        return [], {}
    cuda_home = None
    if not truthy("KEYDISTILL_SKIP_CUDA"):
        cuda_home = find_cuda_home()
        if cuda_home:
            os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension reads it at import
    import torch
    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    # OpenMP so at::parallel_for really runs in parallel (its OpenMP backend is inline in the headers).
    # The C++ standard is left to torch's builder (torch >= 2.10 needs C++20).
    # No -march=native: AVX2/FMA paths are compiled per function and chosen at run time.
    cxx = ["-O3", "-fopenmp", "-fvisibility=hidden"]
    kwargs = dict(name="keydistill._C", extra_link_args=["-fopenmp"], include_dirs=[os.path.join(HERE, "csrc")])
    with_cuda = (
        bool(cuda_sources)
        and torch.version.cuda is not None
        and cuda_home is not None
        and not truthy("KEYDISTILL_SKIP_CUDA")
    )
    if truthy("KEYDISTILL_REQUIRE_CUDA") and not with_cuda:  # CI: a build without CUDA kernels must not pass
        why = (
            "torch is a CPU-only build"
            if torch.version.cuda is None
            else "KEYDISTILL_SKIP_CUDA is set"
            if truthy("KEYDISTILL_SKIP_CUDA")
            else "no CUDA toolkit (nvcc and include/cuda_runtime.h) was found"
        )
        raise RuntimeError(f"KEYDISTILL_REQUIRE_CUDA=1 but the CUDA kernels cannot be built: {why}")
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        nvcc = ["-O3", "-DKEYDISTILL_WITH_CUDA", "--expt-relaxed-constexpr"]
        if truthy("KEYDISTILL_PTXAS_VERBOSE"):
            nvcc.append("-Xptxas=-v")
        kwargs["include_dirs"] += wheel_cuda_includes()
        ext = cpp_extension.CUDAExtension(
            sources=sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DKEYDISTILL_WITH_CUDA"], "nvcc": nvcc},
            **kwargs,
        )
    else:
        ext = cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
    print(f"keydistill: building _C with {'C++ CPU + CUDA' if with_cuda else 'C++ CPU'} kernels", file=sys.stderr)
    return [ext], {"build_ext": optional_build_ext(cpp_extension.BuildExtension)}


def optional_build_ext(base):
    class OptionalBuildExt(base):
        """A failed compile degrades to the torch backend, unless KEYDISTILL_REQUIRE_EXT=1."""

        def run(self):
            try:
                super().run()
            except Exception as err:  # noqa: BLE001 -- any compiler/toolchain failure
                if truthy("KEYDISTILL_REQUIRE_EXT"):
                    raise
                warnings.warn(f"keydistill._C was not built ({err}); the torch backend will be used", stacklevel=2)

    return (
        OptionalBuildExt.with_options(use_ninja=True) if hasattr(OptionalBuildExt, "with_options") else OptionalBuildExt
    )


ext_modules, cmdclass = extensions()

setup(
    name="keydistill",
    version="0.1.0",
    description="Knowledge distillation through a discrete key bottleneck, with fused kernels",
    packages=find_packages(include=["keydistill", "keydistill.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",
        "transformers>=4.40",
        "safetensors",
        "tqdm",
        "numpy",
        "scipy",
        "scikit-learn",
        "matplotlib",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "hub": ["datasets"],
        "test": ["pytest"],
        "bench": ["faiss-cpu"],
        "onnx": ["onnx", "onnxruntime"],
        "tensorboard": ["tensorboard"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
