"""Builds omniret_kernels._C (CPU, always) and omniret_kernels._C_cuda (when torch has CUDA and nvcc is found).

OMNIRET_BUILD_CUDA=0/1 forces the CUDA extension off/on; TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0+PTX": SASS for
sm_80 (runs on every 8.x GPU: A100, A10, L4, L40, RTX 30xx/40xx) and sm_90 (H100/H200), plus compute_90 PTX that the
driver JIT-compiles on newer GPUs (Blackwell 10.x/12.x). Not 9.0a: the kernels use no sm_90a-only instruction, and
compute_90a PTX ("9.0a+PTX") is architecture-specific, so it would JIT on nothing but 9.0. The extension records what
it carries: omniret_kernels._C_cuda.built_archs() (csrc/cuda/cuda_build_info.cpp).
Build against the torch you will run with: `pip install -e . --no-build-isolation`.
"""
import glob
import os
import re
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


def _cuda_build_targets():
    """The -gencode code= targets torch builds for TORCH_CUDA_ARCH_LIST, e.g. ['sm_80', 'sm_90', 'compute_90']."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    targets = set()
    for flag in _get_cuda_arch_flags():  # -gencode=arch=compute_90,code=sm_90 (or code=[sm_90,compute_90])
        if ",code=" in flag:
            targets.update(re.findall(r"(?:sm|compute)_\w+", flag.split(",code=", 1)[1]))
    return sorted(targets, key=lambda t: (int(re.search(r"\d+", t).group()), t.startswith("compute"), t))


if build_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    cuda_targets = _cuda_build_targets()
    ext_modules.append(
        CUDAExtension(
            "omniret_kernels._C_cuda",
            # one glue file per op (csrc/cuda/<op>_glue.cpp) + the module and its build-info op
            sources=cu_sources + _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))),
            include_dirs=INCLUDE,
            extra_compile_args={
                "cxx": ["-O3", "-std=c++20", "-DOMNIRET_CUDA_BUILD_ARCHS=" + ",".join(cuda_targets)],
                "nvcc": ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"],
            },
        )
    )
print(
    "omniret: building extensions: omniret_kernels._C (CPU)"
    + (f", omniret_kernels._C_cuda (CUDA, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}: "
       f"{','.join(cuda_targets)})" if build_cuda else "")
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
