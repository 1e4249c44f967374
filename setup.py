"""Builds omniret_kernels._C (CPU, always) and omniret_kernels._C_cuda (when torch has CUDA and nvcc is found).

OMNIRET_BUILD_CUDA=0/1 forces the CUDA extension off/on; TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0;9.0a".
Build against the torch you will run with: `pip install -e . --no-build-isolation`.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

# torch derives CUDA_HOME from `which nvcc` when it is unset; an nvcc linked into /usr/local/bin then gives
# /usr/local, which has no CUDA headers. Prefer the toolkit's own directory when there is one.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - only reached when torch is missing at build time
    sys.exit(
        "omniret needs torch installed before it is built: `pip install torch` first, then "
        "`pip install -e . --no-build-isolation` (build isolation would compile against another torch)."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
INCLUDE = [os.path.join(ROOT, "csrc", "include")]
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-mavx2", "-mfma", "-fno-math-errno"]
LINK_FLAGS = ["-fopenmp"]  # without it at::parallel_for runs on one thread


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _want_cuda():
    forced = os.environ.get("OMNIRET_BUILD_CUDA")
    has_cuda_torch = torch.version.cuda is not None
    has_nvcc = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    has_headers = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime_api.h"))
    if forced == "0":
        return False, "OMNIRET_BUILD_CUDA=0"
    if forced == "1":
        if not (has_cuda_torch and has_nvcc and has_headers):
            sys.exit(
                "OMNIRET_BUILD_CUDA=1 but "
                + ("torch is a CPU build" if not has_cuda_torch else
                   "nvcc was not found (set CUDA_HOME)" if not has_nvcc else
                   f"there are no CUDA headers under CUDA_HOME={CUDA_HOME}")
            )
        return True, "OMNIRET_BUILD_CUDA=1"
    if not has_cuda_torch:
        return False, f"torch {torch.__version__} is a CPU build"
    if not has_nvcc:
        return False, "nvcc not found (set CUDA_HOME=/usr/local/cuda)"
    if not has_headers:
        return False, f"no CUDA headers under CUDA_HOME={CUDA_HOME} (set CUDA_HOME to the toolkit's directory)"
    return True, f"torch {torch.__version__} has CUDA {torch.version.cuda} and nvcc is at {CUDA_HOME}"


ext_modules = [
    CppExtension(
        "omniret_kernels._C",
        sources=_rel(["csrc/ops.cpp"] + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))),
        include_dirs=INCLUDE,
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=LINK_FLAGS,
    )
]
build_cuda, why = _want_cuda()
cu_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
if build_cuda and not cu_sources:
    build_cuda, why = False, "no .cu sources"
if build_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0;9.0a")
    ext_modules.append(
        CUDAExtension(
            "omniret_kernels._C_cuda",
            sources=cu_sources + ["csrc/cuda/register_cuda.cpp"],
            include_dirs=INCLUDE,
            extra_compile_args={
                "cxx": ["-O3", "-std=c++20"],
                "nvcc": ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"],
            },
        )
    )
print(
    "omniret: building extensions: omniret_kernels._C (CPU)"
    + (f", omniret_kernels._C_cuda (CUDA, arch {os.environ['TORCH_CUDA_ARCH_LIST']})" if build_cuda else "")
    + f"; CUDA extension {'on' if build_cuda else 'off'}: {why}",
    file=sys.stderr,
)

setup(
    name="omniret",
    packages=find_packages(include=["omniret", "omniret.*", "omniret_kernels", "omniret_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
