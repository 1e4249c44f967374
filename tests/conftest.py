import os

# Triton reads this when a kernel is defined, so it must be set before anything imports triton: the Triton
# tests run the kernels on CPU tensors in the interpreter (no GPU here).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN, so that a kernel that forgets to write an element is caught."""
    return torch.full_like(t, float("nan"))
