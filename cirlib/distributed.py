"""Data-parallel helpers: process-group start-up, gathers (with and without gradient), contiguous shards.

Every helper reads torch.distributed's own state (there is no module-level switch): without an initialised process
group, or with one process, a gather returns its input and a shard is everything, so the same code runs unchanged in
a notebook, under `python -m cirlib.launch` and under `torchrun` / `accelerate launch`. Functions marked
*collective* must be called by every process, in the same order.
"""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from accelerate import PartialState

# Rows per all_gather call are chosen so one call moves at most this many bytes per process (bounds device memory).
_GATHER_CHUNK_BYTES = 2**28


def is_distributed() -> bool:
    """True when a process group with more than one process is initialised."""
    return world_size() > 1


def world_size() -> int:
    """Processes in the default group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """True on rank 0: the one process that prints and writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait for every process (collective; a no-op with one process)."""
    if is_distributed():
        dist.barrier()


def launched_world_size() -> int:
    """WORLD_SIZE as set by torchrun / accelerate launch (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_process_group(cpu: bool = False) -> "PartialState":
    """Start (or join) the process group the launcher set up and return Accelerate's `PartialState`.

    CUDA processes use NCCL, one GPU each (cuda:<local rank>); CPU processes (`cpu=True`, or no CUDA) use gloo.
    Call it before anything else creates Accelerate's state: `cirlib.train.fit` and `device()` then reuse it.

    Args:
        cpu: run on the CPU even where CUDA is available (the tests' and the README's CPU command).
    Raises:
        RuntimeError: the launcher asked for several processes but no process group came up.
    """
    from accelerate import PartialState

    if cpu:
        os.environ["ACCELERATE_USE_CPU"] = "true"  # later Accelerator() calls then agree on the device
    state = PartialState(cpu=cpu or not torch.cuda.is_available())
    _check_launch(state.num_processes)
    return state


def device() -> torch.device:
    """This process's device: cuda:<local rank> under a multi-process launch; else the CPU when
    `init_process_group(cpu=True)` asked for it (or $ACCELERATE_USE_CPU is true), CUDA when available, the CPU."""
    if is_distributed() or launched_world_size() > 1:
        from accelerate import PartialState

        state = PartialState()
        _check_launch(state.num_processes)
        return state.device
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_launch(num_processes: int) -> None:
    # Accelerate silently falls back to one process on a CPU-only machine unless asked for gloo; every process would
    # then train the whole run and write the same files.
    launched = launched_world_size()
    if launched > 1 and num_processes != launched:
        raise RuntimeError(
            f"launched as one of WORLD_SIZE={launched} processes, but the process group has {num_processes}: start "
            "the run through `python -m cirlib.launch` (it initialises NCCL on GPUs, gloo on CPUs; pass --cpu to "
            "force the CPU), or call cirlib.distributed.init_process_group() before anything else"
        )


def shard_range(n: int, multiple: int = 1, *, part: int | None = None, parts: int | None = None) -> range:
    """This process's contiguous share of range(n); the shards, in rank order, cover range(n) exactly once.

    Args:
        n: items to split.
        multiple: shard boundaries fall on multiples of this (e.g. the batch size, so every batch is the batch a
            single process would form, and results match it bit for bit); the last shard takes the remainder.
        part, parts: which shard of how many (default: this process's rank and the world size).
    """
    r = rank() if part is None else part
    w = world_size() if parts is None else parts
    if not 0 <= r < w:
        raise ValueError(f"part must be in [0, {w}), got {r}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    blocks = -(-n // multiple)  # ceil: the last block may be partial
    lo_block, hi_block = r * blocks // w, (r + 1) * blocks // w
    return range(min(lo_block * multiple, n), min(hi_block * multiple, n))


def gather_objects(obj: Any) -> list[Any]:
    """Every process's picklable `obj`, in rank order, on every process (collective). Keep it small."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every process (collective), e.g. a decision the main process took."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _comm_device() -> torch.device:
    # NCCL moves CUDA tensors only; gloo moves CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sizes(n: int, device: torch.device) -> list[int]:
    mine = torch.tensor([n], dtype=torch.long, device=device)
    every = [torch.zeros_like(mine) for _ in range(world_size())]
    dist.all_gather(every, mine)
    return [int(s.item()) for s in every]


def _gather_rows(t: torch.Tensor, sizes: list[int], device: torch.device) -> torch.Tensor:
    """Concatenate every rank's rows (rank r holds sizes[r] rows of t's trailing shape) in rank order, on `device`."""
    world, most = len(sizes), max(sizes)
    row_bytes = max(1, math.prod(t.shape[1:]) * t.element_size())
    step = max(1, min(most, _GATHER_CHUNK_BYTES // row_bytes))
    parts: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for start in range(0, most, step):
        n = min(step, most - start)
        buf = torch.zeros((n, *t.shape[1:]), dtype=t.dtype, device=device)
        mine = t[start:start + n]
        buf[:mine.shape[0]] = mine.to(device)
        bufs = [torch.empty_like(buf) for _ in range(world)]
        dist.all_gather(bufs, buf)
        for r in range(world):
            keep = max(0, min(n, sizes[r] - start))
            if keep:
                parts[r].append(bufs[r][:keep].to(t.device))
    return torch.cat([p for rows in parts for p in rows]) if most else t[:0]


def all_gather_no_grad(t: torch.Tensor) -> torch.Tensor:
    """Every process's rows of `t` concatenated in rank order, on every process (collective; no gradient).

    Processes may hold different numbers of rows, none included (an empty shard may have any trailing shape; the
    others' is used). Large tensors move in chunks; the result lives on `t`'s device.
    """
    if not is_distributed():
        return t
    meta = gather_objects((int(t.shape[0]) if t.dim() else 0, tuple(t.shape[1:]), t.dtype))
    full = [m for m in meta if m[0] > 0]
    if not full:
        return t
    tails = {m[1:] for m in full}
    if len(tails) != 1:
        raise ValueError(f"all_gather_no_grad: processes hold rows of different shapes/dtypes {sorted(map(str, tails))}")
    tail, dtype = full[0][1], full[0][2]
    if t.shape[0] == 0:
        t = torch.empty((0, *tail), dtype=dtype, device=t.device)
    with torch.no_grad():
        return _gather_rows(t.detach(), [m[0] for m in meta], _comm_device())


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: all ranks' rows concatenated. Backward: the gradient of the concatenation summed over ranks (each
    rank's loss reads every rank's rows), and this rank's slice of it returned, as open_clip's gather_features.
    An all_reduce rather than reduce_scatter, so it also runs on gloo."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        sizes = _sizes(t.shape[0], t.device)
        ctx.lo, ctx.n = sum(sizes[:rank()]), t.shape[0]
        return _gather_rows(t.contiguous(), sizes, t.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.lo:ctx.lo + ctx.n]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Every process's rows of `t` (N_r, ...) concatenated in rank order, differentiable (collective).

    Gradients reaching the result from every process's loss flow back to the process that owns the rows. With
    the loop's gradient averaging (mean over processes), a loss that is the mean over this process's rows against
    the gathered rows trains exactly as one process holding all rows. With one process this is the identity.
    """
    if not is_distributed():
        return t
    return _AllGatherWithGrad.apply(t)
