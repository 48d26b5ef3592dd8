"""Learning-rate schedules of the training loop: the values (`lr_at`) and the torch scheduler that applies them.

`lr_at` is the one definition of every schedule's value. `make_scheduler` hands it to torch's `LambdaLR`, which sets
the optimizer's learning rate after each optimizer step; a run resumed at optimizer step s rebuilds the scheduler at s
(`LambdaLR(..., last_epoch=s - 1)`), so the schedule needs no state of its own in a checkpoint.

Why our own values and not a library's schedule: "constant" is `LambdaLR` with factor 1. The original's per-epoch
cosine ("cosine_per_epoch") RISES again past `max_epoch`, which no library schedule does, and its clamped variant is
kept next to it. "cosine_per_step" is close to transformers' `get_cosine_with_min_lr_schedule_with_warmup` but not
equal: ours reaches lr0 on the LAST warm-up step (lr0 * (s + 1) / warm, transformers' starts at 0) and holds min_lr
past the horizon (transformers' cosine climbs back), and our tests and runs depend on those values.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch.optim.lr_scheduler import LambdaLR

if TYPE_CHECKING:
    from cirlib.train.loop import TrainConfig

SCHEDULES = ("cosine_per_epoch", "cosine_per_epoch_clamped", "cosine_per_step", "constant")


def warmup_steps_for(cfg: "TrainConfig", steps_per_epoch: int) -> int:
    """Warm-up length in optimizer steps (warmup_epochs converted with `steps_per_epoch`)."""
    return cfg.warmup_steps if cfg.warmup_steps else cfg.warmup_epochs * steps_per_epoch


def lr_at(cfg: "TrainConfig", epoch: int, step: int, steps_per_epoch: int) -> float:
    """Learning rate used for the optimizer step `step` taken during `epoch`.

    Args:
        cfg: the training config (schedule, lr, min_lr, max_epoch, warm-up).
        epoch: 0-based epoch index (per-epoch schedules read only this).
        step: 0-based global optimizer-step index (cosine_per_step reads only this).
        steps_per_epoch: optimizer steps per epoch (for the per-step horizon and warm-up in epochs).
    """
    lr0, lo = cfg.lr, cfg.min_lr
    if cfg.schedule == "constant":
        return lr0
    if cfg.schedule in ("cosine_per_epoch", "cosine_per_epoch_clamped"):
        e = epoch if cfg.schedule == "cosine_per_epoch" else min(epoch, cfg.cosine_epochs)
        # The original's BLIP cosine_lr_schedule; unclamped, cos() passes pi and the lr climbs back (its quirk).
        return lo + 0.5 * (lr0 - lo) * (1.0 + math.cos(math.pi * e / cfg.cosine_epochs))
    # cosine_per_step
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    warm = warmup_steps_for(cfg, steps_per_epoch)
    if step < warm:
        return lr0 * (step + 1) / warm  # reaches lr0 on the last warm-up step
    horizon = cfg.cosine_epochs * steps_per_epoch
    if step >= horizon or horizon <= warm:
        return lo
    return lo + 0.5 * (lr0 - lo) * (1.0 + math.cos(math.pi * (step - warm) / (horizon - warm)))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: "TrainConfig", steps_per_epoch: int,
                   global_step: int = 0) -> LambdaLR:
    """torch's `LambdaLR` applying `lr_at` to every parameter group, positioned for optimizer step `global_step`.

    Call `scheduler.step()` after each optimizer step. Every group's base lr is `cfg.lr`, so the factor is
    `lr_at(...) / cfg.lr` (equal to `lr_at` up to the last bit). Optimizer step s belongs to epoch
    s // steps_per_epoch: every epoch of a run has the same number of steps (`fit` checks it).

    Args:
        optimizer: the run's optimizer.
        cfg: the training config.
        steps_per_epoch: optimizer steps per epoch.
        global_step: optimizer steps already taken (a resumed run); the optimizer's lr is set for this step.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr  # the base lr LambdaLR multiplies; set here so a resumed run needs no state

    if cfg.schedule == "constant":
        def factor(step: int) -> float:
            return 1.0
    else:
        def factor(step: int) -> float:
            return lr_at(cfg, step // steps_per_epoch, step, steps_per_epoch) / cfg.lr

    return LambdaLR(optimizer, factor, last_epoch=global_step - 1)
