"""Learning-rate schedules of the training loop: the values (`lr_at`) and the torch scheduler that applies them.

`lr_at` is the one definition of every schedule's value. `make_scheduler` hands it to torch's `LambdaLR`, which sets
the optimizer's learning rate after each optimizer step; a run resumed at optimizer step s rebuilds the scheduler at s
(`LambdaLR(..., last_epoch=s - 1)`), so the schedule needs no state of its own in a checkpoint.

Why our own values and not a library's schedule: "constant" is `LambdaLR` with factor 1. The original's per-epoch
cosine ("cosine_per_epoch") RISES again past `max_epoch`, which no library schedule does, and its clamped variant is
kept next to it. "cosine_per_step" is close to transformers' `get_cosine_with_min_lr_schedule_with_warmup` but not
equal: ours reaches lr0 on the LAST warm-up step (lr0 * (s + 1) / warm, transformers' starts at 0) and holds min_lr
past the horizon (transformers' cosine climbs back), and our tests and runs depend on those values.

"onecycle" is SPRC's schedule and is torch's own `OneCycleLR`, not a re-derivation: over a cycle of `max_epoch`
epochs (None: the run's epochs) the lr climbs with a cosine from lr / div_factor to lr in the first pct_start of the
cycle, then falls with a cosine to lr / (div_factor * final_div_factor); with `onecycle_momentum` (torch's
`cycle_momentum`, on by default as in SPRC) AdamW's beta1 moves the other way, 0.95 -> 0.85 -> 0.95, and the
configured beta1 is not used. SPRC's CIRR run: lr 1e-5, pct_start 1/50, div_factor 25 over a cycle of 80 epochs of
which it trains 50; FashionIQ: lr 2e-5, pct_start 1.5/epochs, div_factor 100 over its 30 epochs. `OneCycleLR`
computes step s's lr and beta1 from s alone (closed form), so a run resumed at step s builds it once to write the
cycle's bounds into the optimizer's groups and again with `last_epoch=s - 1`: the values of an uninterrupted run, to
the bit, again with no schedule state in the checkpoint. torch cannot step past the cycle, so `TrainConfig` refuses
a cycle shorter than the run.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

if TYPE_CHECKING:
    from cirlib.train.loop import TrainConfig

SCHEDULES = ("cosine_per_epoch", "cosine_per_epoch_clamped", "cosine_per_step", "constant", "onecycle")


def cycles_beta1(cfg: "TrainConfig") -> bool:
    """Whether the schedule moves AdamW's beta1 step by step (onecycle with `onecycle_momentum`)."""
    return cfg.schedule == "onecycle" and cfg.onecycle_momentum


def warmup_steps_for(cfg: "TrainConfig", steps_per_epoch: int) -> int:
    """Warm-up length in optimizer steps (warmup_epochs converted with `steps_per_epoch`)."""
    return cfg.warmup_steps if cfg.warmup_steps else cfg.warmup_epochs * steps_per_epoch


def lr_at(cfg: "TrainConfig", epoch: int, step: int, steps_per_epoch: int) -> float:
    """Learning rate used for the optimizer step `step` taken during `epoch`.

    Args:
        cfg: the training config (schedule, lr, min_lr, max_epoch, warm-up, onecycle settings).
        epoch: 0-based epoch index (per-epoch schedules read only this).
        step: 0-based global optimizer-step index (cosine_per_step and onecycle read only this).
        steps_per_epoch: optimizer steps per epoch (for the per-step horizon and warm-up in epochs).
    """
    lr0, lo = cfg.lr, cfg.min_lr
    if cfg.schedule == "constant":
        return lr0
    if cfg.schedule == "onecycle":
        return onecycle_values(cfg, step, steps_per_epoch)[0]
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


def _onecycle(optimizer: torch.optim.Optimizer, cfg: "TrainConfig", steps_per_epoch: int,
              last_epoch: int = -1) -> OneCycleLR:
    """torch's `OneCycleLR` with the config's settings, over `cfg.cosine_epochs` epochs of `steps_per_epoch` steps."""
    total = cfg.cosine_epochs * steps_per_epoch
    if float(cfg.onecycle_pct_start * total) == 1.0:
        # torch's first phase would then end at step 0 and divide by its zero length there.
        raise ValueError(f"onecycle_pct_start={cfg.onecycle_pct_start} puts exactly 1 of the cycle's {total} steps "
                         "in its rising phase, which torch's OneCycleLR cannot compute (it divides by 0); choose "
                         "another onecycle_pct_start")
    return OneCycleLR(optimizer, max_lr=cfg.lr, epochs=cfg.cosine_epochs, steps_per_epoch=steps_per_epoch,
                      pct_start=float(cfg.onecycle_pct_start), div_factor=cfg.onecycle_div_factor,
                      final_div_factor=cfg.onecycle_final_div_factor, cycle_momentum=cfg.onecycle_momentum,
                      last_epoch=last_epoch)


def make_onecycle(optimizer: torch.optim.Optimizer, cfg: "TrainConfig", steps_per_epoch: int,
                  global_step: int = 0) -> OneCycleLR:
    """torch's `OneCycleLR` for `cfg`, positioned for optimizer step `global_step`: the optimizer's lr (and beta1,
    with `onecycle_momentum`) are step `global_step`'s, as in an uninterrupted run.

    The first construction writes the cycle's bounds (initial, max and min lr; beta1's range) into every parameter
    group; the second, at `last_epoch=global_step - 1`, computes step `global_step`'s values from them in closed form.
    """
    scheduler = _onecycle(optimizer, cfg, steps_per_epoch)
    if global_step:
        scheduler = _onecycle(optimizer, cfg, steps_per_epoch, last_epoch=global_step - 1)
    return scheduler


def onecycle_values(cfg: "TrainConfig", step: int, steps_per_epoch: int) -> tuple[float, float]:
    """(lr, AdamW beta1) of optimizer step `step` under the "onecycle" schedule, from torch's `OneCycleLR` on a
    throwaway AdamW with the config's lr and betas (beta1 is the configured one when momentum does not cycle)."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=cfg.lr, betas=cfg.betas)
    group = make_onecycle(optimizer, cfg, steps_per_epoch, step).optimizer.param_groups[0]
    return float(group["lr"]), float(group["betas"][0])


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: "TrainConfig", steps_per_epoch: int,
                   global_step: int = 0) -> LRScheduler:
    """The torch scheduler applying `cfg.schedule` to every parameter group, positioned for optimizer step
    `global_step`: torch's `OneCycleLR` for "onecycle" (`make_onecycle`), else `LambdaLR` over `lr_at`.

    Call `scheduler.step()` after each optimizer step. For `LambdaLR` every group's base lr is `cfg.lr`, so the factor
    is `lr_at(...) / cfg.lr` (equal to `lr_at` up to the last bit). Optimizer step s belongs to epoch
    s // steps_per_epoch: every epoch of a run has the same number of steps (`fit` checks it).

    Args:
        optimizer: the run's optimizer.
        cfg: the training config.
        steps_per_epoch: optimizer steps per epoch.
        global_step: optimizer steps already taken (a resumed run); the optimizer's lr is set for this step.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    if cfg.schedule == "onecycle":
        return make_onecycle(optimizer, cfg, steps_per_epoch, global_step)
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr  # the base lr LambdaLR multiplies; set here so a resumed run needs no state

    if cfg.schedule == "constant":
        def factor(step: int) -> float:
            return 1.0
    else:
        def factor(step: int) -> float:
            return lr_at(cfg, step // steps_per_epoch, step, steps_per_epoch) / cfg.lr

    return LambdaLR(optimizer, factor, last_epoch=global_step - 1)
