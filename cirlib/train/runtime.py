"""Device, precision and seeding: decided in one place, and recorded with every run.

`seed_everything` seeds every global generator the pipeline touches (python `random`, numpy, torch CPU and CUDA);
`resolve_precision` turns the user's choice ("auto", "fp32", "bf16", "fp16") into a concrete one for a device; and
`RuntimeInfo` is the record of those choices that goes into a run's folder next to its config.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

PRECISIONS = ("fp32", "bf16", "fp16")  # concrete precisions; "auto" resolves to one of these
# Hugging Face Accelerate names the same choices differently ("no" is full fp32).
_ACCELERATE_NAMES = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def seed_everything(seed: int) -> None:
    """Seed python `random`, numpy's global generator and torch (CPU and every CUDA device).

    Args:
        seed: a non-negative integer; numpy needs it below 2**32, so larger values are rejected.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)
    # torch.manual_seed also seeds all CUDA devices (lazily, so it is safe before CUDA initialises).
    torch.manual_seed(seed)


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """Turn a precision request into a concrete precision for `device`.

    Args:
        precision: "auto" (bf16 on a CUDA device that supports it, else fp16 on CUDA; fp32 on CPU), "fp32", "bf16"
            or "fp16".
        device: the training device, e.g. "cpu", "cuda", torch.device("cuda", 0).
    Returns:
        One of "fp32", "bf16", "fp16".
    Raises:
        ValueError: unknown precision, or fp16 requested off CUDA (there is no loss-scaled fp16 training on CPU).
    """
    device = torch.device(device)
    if precision not in ("auto", *PRECISIONS):
        raise ValueError(f"unknown precision {precision!r}; expected 'auto' or one of {PRECISIONS}")
    on_cuda = device.type == "cuda"
    if precision == "auto":
        if not on_cuda:
            # CPU autocast is slower than fp32 for most of our kernels and changes numerics; keep CPU runs exact.
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and not on_cuda:
        raise ValueError(
            f"precision 'fp16' needs a CUDA device (got {device}); use 'fp32' or 'bf16' on this device"
        )
    if precision == "bf16" and on_cuda and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision 'bf16' is not supported by CUDA device {device}; use 'fp16' or 'fp32'")
    return precision


def accelerate_mixed_precision(precision: str) -> str:
    """Map a concrete precision ("fp32", "bf16", "fp16") to Accelerate's `mixed_precision` name ("no", ...)."""
    if precision not in _ACCELERATE_NAMES:
        raise ValueError(f"expected a resolved precision in {PRECISIONS}, got {precision!r}")
    return _ACCELERATE_NAMES[precision]


@dataclass(frozen=True)
class RuntimeInfo:
    """What a run actually ran on; written next to the run's config so results can be traced to their hardware."""

    device: str  # e.g. "cpu", "cuda:0"
    device_name: str  # CUDA device name, or the CPU architecture
    precision: str  # resolved: "fp32" | "bf16" | "fp16"
    torch_version: str  # torch.__version__
    num_threads: int  # torch intra-op threads
    num_processes: int  # data-parallel processes (1 = single process)
    cpu_count: int  # logical CPUs visible to this process

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def runtime_info(device: str | torch.device, precision: str, num_processes: int = 1) -> RuntimeInfo:
    """Collect a RuntimeInfo for `device` and an already resolved `precision`.

    Args:
        device: the training device.
        precision: a concrete precision ("fp32", "bf16", "fp16"), e.g. from `resolve_precision`.
        num_processes: number of data-parallel processes.
    """
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"expected a resolved precision in {PRECISIONS}, got {precision!r}")
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        device_str = f"cuda:{index}"
    else:
        name = platform.machine() or "unknown"
        device_str = str(device)
    return RuntimeInfo(
        device=device_str,
        device_name=name,
        precision=precision,
        torch_version=torch.__version__,
        num_threads=torch.get_num_threads(),
        num_processes=int(num_processes),
        cpu_count=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
    )
