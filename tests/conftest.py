import os

import torch

# Tests follow the device. Without a GPU the Triton kernels run in the interpreter on CPU tensors, which Triton
# reads when a kernel is defined, so TRITON_INTERPRET must be set before anything imports triton (importing torch
# and asking for CUDA does not). With a GPU the Triton kernels run compiled on CUDA tensors instead.
HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from omniret_kernels import _dispatch, _ext  # noqa: E402

NO_GPU = "no CUDA device: the CUDA backends are tested on a GPU machine only"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (a module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`):
    tiny models run faster on one thread than on two contending on a shared 2-core machine, and a kill test's
    subprocesses (OMP_NUM_THREADS=1) then compute exactly as the in-process run does."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN, so that a kernel that forgets to write an element is caught."""
    return torch.full_like(t, float("nan"))


def device_backends(op: str, cpu=("cpu", "triton")):
    """pytest params (device, backend) for `op`: the CPU backends in `cpu` (Triton in the interpreter when there is
    no GPU), and every CUDA candidate of the dispatch rule on CUDA tensors. A pair that cannot run here is skipped
    with the reason: one reason, NO_GPU, for every CUDA pair on a machine without a GPU."""
    params = []
    for backend in cpu:
        if backend == "triton" and HAS_GPU:
            continue  # with a GPU, Triton is tested on CUDA tensors (below)
        reason = _dispatch.why_not(op, backend, torch.device("cpu"))
        params.append(pytest.param("cpu", backend, id=f"cpu-{backend}",
                                   marks=[pytest.mark.skipif(reason is not None, reason=str(reason))]))
    cuda_backends = list(_dispatch.CANDIDATES[op]["cuda"])
    if _ext.has_kernel(f"{op}_fwd", "CUDA") and "cuda" not in cuda_backends:
        cuda_backends.insert(0, "cuda")  # built but no longer a candidate: still tested while it exists
    for backend in cuda_backends:
        if not HAS_GPU:
            reason = NO_GPU
        else:
            reason = _cuda_reason(op, backend)
        params.append(pytest.param("cuda", backend, id=f"cuda-{backend}",
                                   marks=[pytest.mark.skipif(reason is not None, reason=str(reason))]))
    return params


def _cuda_reason(op, backend):
    """Why `backend` cannot run `op` on this GPU at all (dtype and shape gates are the tests' own business)."""
    device = torch.device("cuda")
    dtype = torch.bfloat16 if backend in _dispatch.FLASH_BACKENDS else torch.float32
    return _dispatch.why_not(op, backend, device, dtype)


def tolerance(dtype: torch.dtype, device, backend: str = "") -> dict:
    """rtol/atol for a result in `dtype` against the float64 reference, by the precision rule of the kernels:
    float64 tight; float32 tight unless it runs on CUDA with matmuls allowed to use tf32
    (torch.get_float32_matmul_precision() != "highest"); bfloat16 and float16 by their own rounding."""
    if dtype == torch.float64:
        return dict(rtol=1e-9, atol=1e-9)
    if dtype == torch.bfloat16:
        return dict(rtol=3e-2, atol=3e-2)
    if dtype == torch.float16:
        return dict(rtol=1e-2, atol=1e-2)
    if torch.device(device).type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        return dict(rtol=5e-3, atol=5e-3)  # tf32: 10-bit mantissa in the products
    return dict(rtol=2e-4, atol=2e-5)
