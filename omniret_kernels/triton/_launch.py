"""Launchers size themselves: the first config (in the launcher's order of preference) whose compiled kernel fits
the shared memory a block may opt in to on this device is launched; none fitting is a ValueError before launch.

The limit is the device's own `shared_memory_per_block_optin` on CUDA; while omniret_kernels.compile_check
compiles for a mock sm_80 / sm_90 target it is that target's limit. Each candidate is compiled without launching
(`kernel.warmup`), and its `metadata.shared` (exact, what the launch would request) is compared with the limit, so
no launch can raise OutOfResources for shared memory. The choice is cached per kernel, specialization and device.
Under TRITON_INTERPRET (CPU tensors, no compiler) the first config runs: shared memory does not exist there.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

from omniret_kernels._checks import KernelLimitError

# cudaDevAttrMaxSharedMemoryPerBlockOptin by compute capability (A100, H100): the compile check's targets.
SMEM_OPTIN_BY_ARCH = {80: 166_912, 90: 232_448}


class Config(NamedTuple):
    constexprs: tuple  # ((name, value), ...): the block sizes passed to the kernel
    num_warps: int
    num_stages: int


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def target_arch():
    from omniret_kernels.compile_check import target_arch as compile_check_arch
    return compile_check_arch()


def shared_memory_limit(device: torch.device) -> int:
    arch = target_arch()
    if arch is not None:
        return SMEM_OPTIN_BY_ARCH[arch]
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    return SMEM_OPTIN_BY_ARCH[80]


_chosen: dict = {}


def launch_fitting(kernel, grid, args: tuple, kwargs: dict, configs: list[Config], device: torch.device,
                   what: str) -> Config:
    """Launch kernel[grid](*args, **kwargs, **config) with the first config that fits; return that config."""
    if _interpreting():
        config = configs[0]
    else:
        limit = shared_memory_limit(device)
        key = (kernel, tuple(sorted(kwargs.items(), key=str)), tuple(configs), str(device), target_arch())
        config = _chosen.get(key)
        if config is None:
            needs = []
            for candidate in configs:
                compiled = kernel.warmup(*args, grid=grid, **kwargs, **dict(candidate.constexprs),
                                         num_warps=candidate.num_warps, num_stages=candidate.num_stages)
                needs.append(compiled.metadata.shared)
                if compiled.metadata.shared <= limit:
                    config = _chosen[key] = candidate
                    break
            else:
                raise KernelLimitError(f"{what}: no Triton config fits this device's shared memory per block "
                                 f"({limit} B opt-in limit; the smallest config needs {min(needs)} B)")
    kernel[grid](*args, **kwargs, **dict(config.constexprs), num_warps=config.num_warps, num_stages=config.num_stages)
    return config
