"""One generic training loop for both stages, on Hugging Face Accelerate.

Nothing here knows about composed image retrieval. A stage is wrapped as a `Task` (its model, which parameters train,
its training data, a `training_step` returning a loss dict, a `validate` returning metrics, and which metric selects
the best checkpoint); `fit(task, cfg, run_dir)` does the rest:

- AdamW over the task's trainable parameters in one group, as the original does, with the learning-rate schedule of
  `cfg.schedule` (`cirlib.train.schedules`: torch's LambdaLR over `lr_at`, or torch's OneCycleLR for SPRC's
  "onecycle", which also cycles AdamW's beta1; the default is the original's per-epoch cosine, including its rise
  past `max_epoch`);
- data parallelism through `accelerate.Accelerator.prepare`: the task's training step runs as the forward of one
  module holding `task.model` (`_TrainingStep`), which Accelerate wraps in DistributedDataParallel on several
  processes, so DDP broadcasts the start weights and averages gradients. `cfg.batch_size` is per process: N processes
  take consecutive batches of one shuffled order (rank r: batches r, r+N, ...), a global batch of N * batch_size; a
  task whose loss couples a batch's samples (a contrastive loss) gathers them with
  `cirlib.distributed.all_gather_with_grad`, so that it trains as one process would. Only the main process writes
  files; logged numbers are reduced over processes;
- gradient accumulation through Accelerate (`accumulate`, `backward`); mixed precision through torch's autocast and
  GradScaler (see `_Precision` for why not Accelerate's);
- the run folder's files, all named by `cirlib.run_folder.RunFolder`: the training log (`cirlib.train.metrics_log`)
  and atomic checkpoints (`cirlib.train.checkpoints`): `checkpoints/last/` after every epoch (and when a time budget
  stops the run), written BEFORE the epoch's validation so a failing validation never loses the epoch, and
  `checkpoints/best/` whenever the selection metric improves;
- experiment tracking through Accelerate's trackers (`cfg.trackers`): every record of the training log also goes to
  TensorBoard (event files in the run folder's `tensorboard/`; `tensorboard --logdir outputs/`) and/or Weights &
  Biases or Comet, at the same global steps, on the main process; a resumed run continues the same curves;
- exact resume: a run interrupted after any epoch (or after any step, when stopped by `time_budget_s`, or during a
  validation) and resumed reaches bit-identical weights and optimizer state to an uninterrupted run;
- one writer: the main process holds the run folder's lock (`RunFolder.lock`) for the whole call, after checking the
  folder is writable, before any training;
- a finished run (its last checkpoint covers `cfg.epochs` epochs and their validation) is reused, not retrained,
  unless `overwrite=True`.

Epochs are 0-based in logs and in the schedule (the original's `epoch` in its cosine), while `epochs_completed`
counts finished epochs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.tracking import TensorBoardTracker
from accelerate.utils import ProjectConfiguration, gather_object
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler, default_collate

from cirlib import distributed as dist
from cirlib import paths
from cirlib.progress import progress_bar, progress_write
from cirlib.run_folder import RunFolder, RunFolderError
from cirlib.train.checkpoints import (CHECKPOINT_FORMAT, CheckpointError, checkpoint_dir, existing_checkpoint,
                                      load_weights, read_info, read_state, rng_state, set_rng_state, update_info,
                                      write_checkpoint)
from cirlib.train.metrics_log import MetricsLog, read_metrics
from cirlib.train.runtime import RuntimeInfo, resolve_precision, runtime_info, seed_everything
from cirlib.train.schedules import SCHEDULES, cycles_beta1, lr_at, make_scheduler, warmup_steps_for

__all__ = ["TrainConfig", "Task", "FitResult", "fit", "lr_at", "warmup_steps_for", "epoch_seed", "checkpoint_dir",
           "load_weights", "read_metrics", "CheckpointError", "SCHEDULES", "TRACKERS", "parse_trackers",
           "require_trackers", "tracker_scalars"]

# Fields that may change between an interrupted run and its resumption without changing what is computed.
RESUMABLE_FIELDS = ("epochs", "time_budget_s", "log_every", "num_workers", "progress", "trackers")

# Experiment trackers `fit` can log to besides metrics.jsonl, by Accelerate's name: (the module that must be
# importable, the pip extra of cirlib that installs it; "" = a core dependency).
TRACKERS: dict[str, tuple[str, str]] = {"tensorboard": ("tensorboard", ""), "wandb": ("wandb", "wandb"),
                                        "comet_ml": ("comet_ml", "comet")}
TRACKER_PROJECT = "cirlib"  # the W&B / Comet project the runs go to (TensorBoard: the run folder's tensorboard/)


# ----------------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10  # epochs to train in total (a resumed run continues up to this many)
    # How the training data is batched: `fit` batches a task's `train_dataset()` with these; a task that batches
    # itself (`train_loader`, the stage tasks) must build its loader with the same values, which `fit` checks.
    batch_size: int = 32  # micro-batch size per process (original stage I: 512, stage II: 16)
    lr: float = 2e-5  # peak learning rate lr0 (original: 2e-5 for both stages)
    weight_decay: float = 0.05  # AdamW weight decay on every trainable parameter, one group (original: 0.05)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas (original: torch defaults)
    eps: float = 1e-8  # AdamW epsilon (original: torch default)
    # "cosine_per_epoch": the original; lr = min_lr + 0.5*(lr0-min_lr)*(1+cos(pi*epoch/max_epoch)) set at the start of
    # each epoch, which RISES again past max_epoch. "cosine_per_epoch_clamped": the same, held at min_lr past max_epoch.
    # "cosine_per_step": linear warm-up then cosine over max_epoch epochs of optimizer steps, held at min_lr after.
    # "constant": lr0 throughout. "onecycle": torch's OneCycleLR (SPRC's), a cycle of max_epoch epochs rising from
    # lr/div_factor to lr over its first pct_start, then falling to lr/(div_factor*final_div_factor), both by cosine.
    schedule: str = "cosine_per_epoch"
    # The schedule's horizon in epochs: the cosine period (the original's blip_max_epoch), or onecycle's cycle, which
    # may be longer than the run but not shorter (SPRC CIRR: 80 epochs, of which it trains 50); None = epochs.
    max_epoch: int | None = None
    min_lr: float = 0.0  # floor of the cosine (original: 0)
    warmup_steps: int = 0  # cosine_per_step only: linear warm-up over this many optimizer steps
    warmup_epochs: int = 0  # cosine_per_step only: warm-up given in epochs instead (not both)
    # onecycle only (torch's OneCycleLR arguments and defaults; SPRC CIRR: 0.02, 25, FashionIQ: 1.5/epochs, 100):
    onecycle_pct_start: float = 0.3  # share of the cycle spent rising to lr, in (0, 1)
    onecycle_div_factor: float = 25.0  # the cycle starts at lr / div_factor (>= 1)
    onecycle_final_div_factor: float = 1e4  # and ends at lr / (div_factor * final_div_factor) (>= 1)
    onecycle_momentum: bool = True  # cycle AdamW's beta1 0.95 -> 0.85 -> 0.95 against the lr (betas[0] unused)
    grad_accumulation_steps: int = 1  # micro-batches per optimizer step (original: 1)
    precision: str = "auto"  # "auto" (bf16/fp16 on CUDA, fp32 on CPU), "fp32", "bf16", "fp16"
    max_grad_norm: float | None = None  # clip the global gradient norm; None = off (the original)
    validate_every: int | None = 1  # validate after every N epochs and after the last; None = never
    seed: int = 0  # seeds the global RNGs at the start of a fresh run and the per-epoch shuffling
    log_every: int = 50  # write a "train" record every N optimizer steps
    max_steps_per_epoch: int | None = None  # cap on optimizer steps per epoch (smoke runs); None = whole epoch
    time_budget_s: float | None = None  # stop after the step that exceeds this many seconds of this call, checkpoint
    num_workers: int = 0  # DataLoader worker processes
    drop_last: bool = True  # drop the last incomplete batch (original: True)
    progress: bool = True  # tqdm bars and one line per validation (main process only)
    # Where the training log's records also go: "tensorboard" (event files in <run>/tensorboard/), "wandb",
    # "comet_ml", several comma-separated, or "none". How to log, not what is computed: a resumed run may change it.
    trackers: str = "tensorboard"

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"TrainConfig: {msg}")

        need(isinstance(self.epochs, int) and self.epochs >= 1, f"epochs must be an int >= 1, got {self.epochs!r}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             f"betas must be two values in [0, 1), got {self.betas}")
        need(self.eps > 0, f"eps must be > 0, got {self.eps}")
        need(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        need(self.max_epoch is None or self.max_epoch >= 1, f"max_epoch must be None or >= 1, got {self.max_epoch}")
        need(0 <= self.min_lr <= self.lr, f"min_lr must be in [0, lr], got {self.min_lr}")
        need(self.warmup_steps >= 0 and self.warmup_epochs >= 0, "warmup_steps and warmup_epochs must be >= 0")
        need(not (self.warmup_steps and self.warmup_epochs), "give warmup_steps or warmup_epochs, not both")
        need(
            self.schedule == "cosine_per_step" or not (self.warmup_steps or self.warmup_epochs),
            f"warm-up is only defined for schedule='cosine_per_step' (got schedule={self.schedule!r})",
        )
        self._check_onecycle(need)
        need(self.grad_accumulation_steps >= 1,
             f"grad_accumulation_steps must be >= 1, got {self.grad_accumulation_steps}")
        need(self.precision in ("auto", "fp32", "bf16", "fp16"), f"unknown precision {self.precision!r}")
        need(self.max_grad_norm is None or self.max_grad_norm > 0,
             f"max_grad_norm must be None or > 0, got {self.max_grad_norm}")
        need(self.validate_every is None or self.validate_every >= 1,
             f"validate_every must be None or >= 1, got {self.validate_every}")
        need(isinstance(self.seed, int) and 0 <= self.seed < 2**31,
             f"seed must be an int in [0, 2**31), got {self.seed!r}")
        need(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        need(
            self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1,
            f"max_steps_per_epoch must be None or >= 1, got {self.max_steps_per_epoch}",
        )
        need(self.time_budget_s is None or self.time_budget_s > 0,
             f"time_budget_s must be None or > 0, got {self.time_budget_s}")
        need(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        parse_trackers(self.trackers)  # names only; whether the packages are installed is fit's check
        # JSON round-trips give lists; keep the frozen value hashable and comparable.
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    def _check_onecycle(self, need: Any) -> None:
        """The onecycle fields: set only with schedule="onecycle", in the ranges torch's OneCycleLR computes."""
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name.startswith("onecycle_")}
        changed = [n for n, default in defaults.items() if getattr(self, n) != default]
        if self.schedule != "onecycle":
            need(not changed, f"{', '.join(changed)} only apply to schedule='onecycle' (got schedule="
                              f"{self.schedule!r}); leave them at their defaults")
            return
        need(isinstance(self.onecycle_pct_start, (int, float)) and 0 < self.onecycle_pct_start < 1,
             f"onecycle_pct_start must be in (0, 1), got {self.onecycle_pct_start!r}")
        for name in ("onecycle_div_factor", "onecycle_final_div_factor"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and value >= 1, f"{name} must be >= 1, got {value!r}")
        need(isinstance(self.onecycle_momentum, bool),
             f"onecycle_momentum must be True or False, got {self.onecycle_momentum!r}")
        need(self.min_lr == 0, f"min_lr={self.min_lr} is not used by schedule='onecycle' (its floor is lr / "
                               "(onecycle_div_factor * onecycle_final_div_factor)); leave it 0")
        need(self.cosine_epochs >= self.epochs,
             f"schedule='onecycle' cannot run past its cycle: max_epoch={self.cosine_epochs} epochs, epochs="
             f"{self.epochs}; set max_epoch >= epochs (None = epochs)")

    @property
    def cosine_epochs(self) -> int:
        """The schedule's horizon in epochs (cosine period or onecycle's cycle): max_epoch, or epochs when None."""
        return self.max_epoch if self.max_epoch is not None else self.epochs

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


# ----------------------------------------------------------------------------------------------------------------------
# Experiment trackers
# ----------------------------------------------------------------------------------------------------------------------


def parse_trackers(spec: str) -> tuple[str, ...]:
    """'tensorboard,wandb' -> ('tensorboard', 'wandb'); 'none' -> (). Unknown names are refused."""
    names = [t.strip() for t in spec.split(",") if t.strip()] if isinstance(spec, str) else []
    if names == ["none"]:
        return ()
    unknown = [n for n in names if n not in TRACKERS]
    if not names or unknown:
        raise ValueError(f"trackers={spec!r}: unknown tracker(s) {unknown or names}; give one or several of "
                         f"{sorted(TRACKERS)}, comma-separated, or 'none'")
    return tuple(dict.fromkeys(names))


def require_trackers(spec: str) -> tuple[str, ...]:
    """`parse_trackers`, and a one-line refusal of a tracker whose package is not installed (Accelerate would skip it
    silently), naming the pip extra that installs it. Call it before any work."""
    names = parse_trackers(spec)
    for name in names:
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            how = f"pip install -e '.[{extra}]'" if extra else f"pip install -e . (cirlib depends on {module})"
            raise ImportError(f"trackers={spec!r} needs the {module} package, which is not installed: {how}")
    return names


def tracker_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of one training-log record as tracker scalars, named by kind: a "train" record gives train/loss,
    train/lr and the step's other outputs (train/<name>); an "epoch" record epoch/loss, epoch/lr, ...; a "val"
    record its val/<metric> values and val/selection. Bookkeeping (epoch, step, time, is_best) stays out: the step is
    the tracker's x axis, and trackers keep their own wall time."""
    kind = record["kind"]
    skip = {"kind", "epoch", "step", "time", "is_best"} | ({"lr"} if kind == "val" else set())
    out = {}
    for key, value in record.items():
        if key in skip or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[key if key.startswith(f"{kind}/") else f"{kind}/{key}"] = float(value)
    return out


def _flat_hparams(values: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested settings as the flat {name: bool, int, float or str} that TensorBoard's hparams (and every tracker)
    takes: nested names joined with '/', lists as JSON, None as 'none'."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat_hparams(value, name + "/"))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        elif value is None:
            out[name] = "none"
        else:
            out[name] = json.dumps(value, default=str)
    return out


class _RunTensorBoard(TensorBoardTracker):
    """Accelerate's TensorBoard tracker writing into the run folder's tensorboard/ itself (the tracker Accelerate makes
    by name writes into <logging_dir>/<project name>/, and the project name is W&B's and Comet's project)."""

    def __init__(self, logging_dir: Path):
        super().__init__("", logging_dir)

    def resume_at(self, step: int) -> None:
        """A resumed run: its new event file starts with a purge marker at `step` (torch's SummaryWriter purge_step),
        so TensorBoard drops the earlier files' events from that step on (what a crashed run logged past its
        checkpoint) and shows the ones logged again from the kept log instead: the curves equal metrics.jsonl."""
        self.init_kwargs["purge_step"] = step


# ----------------------------------------------------------------------------------------------------------------------
# Task
# ----------------------------------------------------------------------------------------------------------------------


class Task:
    """What `fit` needs from a stage; subclass it, or write any object with the same members (duck typing).

    Required: `model` (the nn.Module whose weights are checkpointed), `trainable_parameters()`, `training_step(batch)`,
    `validate()`, `selection_metric(metrics)`, and training data as EITHER `train_loader(epoch_seed)` (a DataLoader
    built by the task with `cfg`'s batch_size, drop_last and num_workers, shuffled with a generator seeded by
    `epoch_seed`) OR `train_dataset()` (a map-style dataset
    that `fit` batches with `collate`, `cfg.batch_size` and its own per-epoch seeded shuffle). The other members have
    defaults here, and `fit` applies the same defaults to objects that do not subclass Task.

    `self.model` itself is never wrapped or patched: `fit` runs `training_step` as the forward of a module holding
    the model, which Accelerate wraps in DDP on several processes, so `training_step` may call any method of the
    model and its gradients are still averaged over processes. Every trainable parameter must belong to `model`.
    `training_step` runs under the run's autocast; batches from the loader arrive on the run's device. `validate`
    runs after `eval_mode()`, under `torch.no_grad()`, on every process (its metrics are averaged over processes),
    with the training RNG streams saved and restored around it: validating never changes the training trajectory.
    """

    model: nn.Module

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        """Parameters the optimizer updates (all with requires_grad=True); freezing is the task's business."""
        raise NotImplementedError(f"{type(self).__name__} must implement trainable_parameters")

    def training_step(self, batch: Any) -> dict[str, Tensor]:
        """Forward one micro-batch; returns {"loss": scalar Tensor with grad, **other scalars to log}."""
        raise NotImplementedError(f"{type(self).__name__} must implement training_step")

    def validate(self) -> dict[str, float]:
        """Evaluate the current model; returns metrics by name."""
        raise NotImplementedError(f"{type(self).__name__} must implement validate")

    def selection_metric(self, metrics: dict[str, float]) -> float:
        """The number (higher is better) that picks the best checkpoint from `validate`'s metrics."""
        raise NotImplementedError(f"{type(self).__name__} must implement selection_metric")

    # Training data: define one of `train_loader(epoch_seed) -> DataLoader` or `train_dataset() -> Dataset`.
    # A dataset that draws random numbers should derive them from (its seed, epoch, index), e.g. via a
    # `set_epoch(epoch)` method, which `fit` (and Accelerate's loader) call at the start of every epoch; resume is then
    # exact mid-epoch and with worker processes too.

    def collate(self, items: list[Any]) -> Any:
        """Turn a list of dataset items into a batch (train_dataset mode; default: torch's default_collate)."""
        return default_collate(items)

    def train_mode(self) -> None:
        """Put modules in the mode training needs; override to keep e.g. a frozen encoder in eval mode."""
        self.model.train()

    def eval_mode(self) -> None:
        """Put modules in the mode validation needs (also auxiliary modules the task holds outside `model`)."""
        self.model.eval()

    def on_fit_start(self, accelerator: Accelerator) -> None:
        """Called once the model is on `accelerator.device`: move auxiliary modules, keep the handle, etc."""

    def state_dict_for_checkpoint(self) -> dict[str, Any]:
        """Extra task state saved with `checkpoints/last` (tensors, numbers, strings, lists, dicts only)."""
        return {}

    def load_state_from_checkpoint(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict_for_checkpoint` returned."""
        if state:
            raise NotImplementedError(
                f"{type(self).__name__} saved extra checkpoint state (keys {sorted(state)}) but does not override "
                "load_state_from_checkpoint to restore it"
            )

    def save_extra_files(self, directory: Path) -> None:
        """Write extra files into a checkpoint folder being built (e.g. config.json, a tokenizer); default none."""


_REQUIRED_TASK_MEMBERS = ("model", "trainable_parameters", "training_step", "validate", "selection_metric")


def _hook(task: Any, name: str) -> Any:
    """The task's own `name` method, else Task's default bound to it (for duck-typed tasks)."""
    own = getattr(task, name, None)
    if own is not None:
        return own
    return getattr(Task, name).__get__(task)


def _check_task(task: Any) -> None:
    missing = [m for m in _REQUIRED_TASK_MEMBERS if not hasattr(task, m)]
    if missing:
        raise TypeError(f"{type(task).__name__} is not a training task: it lacks {missing} (see cirlib.train.Task)")
    if not isinstance(task.model, nn.Module):
        raise TypeError(f"{type(task).__name__}.model must be an nn.Module, got {type(task.model).__name__}")
    has_loader, has_dataset = hasattr(task, "train_loader"), hasattr(task, "train_dataset")
    if has_loader == has_dataset:
        raise TypeError(
            f"{type(task).__name__} must define exactly one of train_loader(epoch_seed) and train_dataset() "
            f"(it defines {'both' if has_loader else 'neither'})"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Results and checkpoint helpers
# ----------------------------------------------------------------------------------------------------------------------



# ----------------------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FitResult:
    run_dir: Path
    status: str  # "finished" (all epochs ran now), "reused" (already finished, not retrained), "time_budget" (stopped)
    epochs_completed: int  # finished epochs
    global_step: int  # optimizer steps taken in total
    best_metric: float | None  # best selection metric so far (None without validation)
    best_epoch: int | None  # 0-based epoch whose validation gave best_metric
    best_metrics: dict[str, float] | None = None  # all validation metrics of that epoch
    last_val_metrics: dict[str, float] = field(default_factory=dict)  # metrics of the latest validation
    elapsed_s: float = 0.0  # training wall time over all calls on this run
    runtime: RuntimeInfo | None = None  # where this call ran (None when reused)

    @property
    def last_checkpoint(self) -> Path:
        return checkpoint_dir(self.run_dir, "last")

    @property
    def best_checkpoint(self) -> Path | None:
        """The best checkpoint folder, or None when no validation has run yet."""
        path = checkpoint_dir(self.run_dir, "best")
        return path if path.is_dir() else None

    def load_best_into(self, model: nn.Module) -> Path:
        """Load the best checkpoint's weights into `model` (the last one's when nothing was validated); returns it."""
        path = self.best_checkpoint or self.last_checkpoint
        load_weights(model, path)
        return path


def _result(run: RunFolder, status: str, info: dict[str, Any], rt: RuntimeInfo | None) -> FitResult:
    return FitResult(
        run_dir=run.path, status=status, epochs_completed=info["epochs_completed"], global_step=info["global_step"],
        best_metric=info["best_metric"], best_epoch=info["best_epoch"], best_metrics=info.get("best_metrics"),
        last_val_metrics=dict(info.get("last_val_metrics", {})), elapsed_s=float(info["elapsed_s"]), runtime=rt,
    )


def _derive_seed(*parts: int) -> int:
    # Independent, reproducible seeds per (run seed, epoch, purpose) without touching any global generator.
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] % (2**63 - 1))


LOADER_SETTINGS = ("batch_size", "drop_last", "num_workers")


def _check_loader_settings(task_name: str, loader: DataLoader, cfg: TrainConfig) -> None:
    """A task that batches itself (`train_loader`) must batch as the config it is trained and recorded with says.

    Raises:
        ValueError: naming each setting where the loader and the TrainConfig differ.
    """
    diffs = [f"{k}={getattr(loader, k)!r} in the loader vs {getattr(cfg, k)!r} in the TrainConfig"
             for k in LOADER_SETTINGS if getattr(loader, k) != getattr(cfg, k)]
    if diffs:
        raise ValueError(f"{task_name}.train_loader() does not batch as the TrainConfig says ({'; '.join(diffs)}): "
                         "build the task and the TrainConfig from the same settings")


class _EpochShuffleSampler(Sampler[int]):
    """A permutation of range(n) fixed by (seed, epoch): the same on every process and in a resumed run.

    It draws from its own generator, never from global RNG state, and has no `generator` attribute, so Accelerate
    leaves it alone. `set_epoch` is there because Accelerate's loader calls it with the epoch we set on the loader.
    """

    def __init__(self, n: int, seed: int, epoch: int):
        self.n, self.seed, self.epoch = n, seed, epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(_derive_seed(self.seed, self.epoch, 0))
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class _RunningMeans:
    """Per-process sums of the logged step outputs; means are reduced over processes when read."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def add(self, values: dict[str, Tensor]) -> None:
        for k, v in values.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count += 1

    def reset(self) -> None:
        self.sums, self.count = {}, 0

    def state(self) -> dict[str, Any]:
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "count": self.count}

    def load(self, state: dict[str, Any]) -> None:
        self.sums = {k: v.to(self.device) for k, v in state["sums"].items()}
        self.count = int(state["count"])

    def reduced_means(self, accelerator: Accelerator) -> dict[str, float]:
        keys = sorted(self.sums)
        packed = torch.stack(
            [self.sums[k] for k in keys] + [torch.tensor(float(self.count), device=self.device)]
        ) if keys else torch.tensor([float(self.count)], device=self.device)
        total = accelerator.reduce(packed, reduction="sum")
        n = float(total[-1])
        return {k: float(total[i]) / n for i, k in enumerate(keys)} if n > 0 else {}




def _config_mismatch(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    saved_cfg = TrainConfig.from_dict(saved)
    diffs = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in RESUMABLE_FIELDS or f.name == "max_epoch":  # max_epoch: compared as the horizon it gives
            continue
        a, b = getattr(saved_cfg, f.name), getattr(cfg, f.name)
        if a != b:
            diffs.append(f"{f.name}: {a!r} in the run vs {b!r} now")
    # With max_epoch=None the cosine horizon follows `epochs`, so a change of epochs changes the schedule; max_epoch
    # set to the run's horizon keeps it, whatever `epochs` becomes.
    if saved_cfg.schedule != "constant" and saved_cfg.cosine_epochs != cfg.cosine_epochs:
        keep = (f"set max_epoch={saved_cfg.cosine_epochs} to extend it under its own schedule, or "
                if saved_cfg.max_epoch is None and cfg.max_epoch is None and cfg.schedule != "onecycle" else "")
        diffs.append(
            f"cosine horizon (max_epoch): {saved_cfg.cosine_epochs} epochs in the run vs {cfg.cosine_epochs} now: "
            f"the steps trained so far followed the run's horizon; {keep}start a new run from this one's weights "
            "(init_checkpoint) to train under another horizon"
        )
    return diffs


def _extension_problem(info: dict[str, Any], cfg: TrainConfig) -> str | None:
    """Why extending a run to cfg.epochs would be wasted: its schedule has ended at a learning rate of 0."""
    done = info["epochs_completed"]
    if (cfg.epochs <= done or cfg.schedule not in ("cosine_per_step", "cosine_per_epoch_clamped")
            or cfg.min_lr > 0 or done < cfg.cosine_epochs):
        return None
    return (f"its {cfg.schedule} schedule ended at lr {cfg.min_lr} after max_epoch={cfg.cosine_epochs} epochs and "
            f"{done} are done: epochs {done + 1}-{cfg.epochs} would train at lr 0 and change nothing. Train longer "
            "in a new run started from this one's weights (init_checkpoint), or retrain with overwrite=True and "
            f"max_epoch={cfg.epochs}")


def _collect_parameters(task: Any) -> list[nn.Parameter]:
    params = list(task.trainable_parameters())
    if not params:
        raise ValueError(f"{type(task).__name__}.trainable_parameters() returned no parameters")
    seen: set[int] = set()
    for i, p in enumerate(params):
        if not isinstance(p, nn.Parameter) or not p.requires_grad:
            raise ValueError(
                f"{type(task).__name__}.trainable_parameters() item {i} is not a parameter with requires_grad=True "
                f"(got {type(p).__name__}, requires_grad={getattr(p, 'requires_grad', None)})"
            )
        if id(p) in seen:
            raise ValueError(f"{type(task).__name__}.trainable_parameters() lists parameter {i} twice")
        seen.add(id(p))
    owned = {id(p) for p in task.model.parameters()}
    outside = [i for i, p in enumerate(params) if id(p) not in owned]
    if outside:
        raise ValueError(
            f"{type(task).__name__}.trainable_parameters() items {outside[:10]} are not parameters of its `model`: "
            "only the model's gradients are averaged over processes; make the module that holds them part of `model`"
        )
    return params


def _check_step_output(out: Any, task: Any, epoch: int, step: int) -> dict[str, Tensor]:
    where = f"{type(task).__name__}.training_step (epoch {epoch}, step {step})"
    if not isinstance(out, dict) or "loss" not in out:
        keys = f" with keys {sorted(out)}" if isinstance(out, dict) else ""
        raise TypeError(f"{where} must return a dict with a 'loss' tensor, got {type(out).__name__}{keys}")
    device = out["loss"].device if isinstance(out["loss"], Tensor) else None
    values = {}
    for k, v in out.items():
        if not isinstance(v, Tensor):
            v = torch.tensor(float(v), device=device)
        if v.numel() != 1:
            raise ValueError(f"{where}: output {k!r} must be a scalar, got shape {tuple(v.shape)}")
        values[k] = v.reshape(())
    if not values["loss"].requires_grad:
        raise ValueError(f"{where}: 'loss' does not require grad (is every trainable parameter frozen or detached?)")
    return values


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed `fit` passes to `task.train_loader` for `epoch`: a function of the run seed and the epoch only."""
    return _derive_seed(seed, epoch, 2)


class _EpochData:
    """Each epoch's prepared loader, from the task's `train_loader(epoch_seed)` or from its `train_dataset()`."""

    def __init__(self, task: Any, cfg: TrainConfig, accelerator: Accelerator):
        self.task, self.cfg, self.accelerator = task, cfg, accelerator
        self.dataset = None
        if hasattr(task, "train_dataset"):
            dataset = task.train_dataset()
            if not isinstance(dataset, Sized):
                raise TypeError(f"{type(task).__name__}.train_dataset() must return a map-style Dataset with __len__")
            self.dataset, self.collate = dataset, _hook(task, "collate")

    def loader(self, epoch: int, skip_batches: int) -> tuple[Iterable[Any], int]:
        """The epoch's batches (this process's share, the first `skip_batches` skipped) and its full batch count."""
        cfg = self.cfg
        if self.dataset is None:
            loader = self.task.train_loader(epoch_seed(cfg.seed, epoch))
            if not isinstance(loader, DataLoader):
                raise TypeError(f"{type(self.task).__name__}.train_loader() must return a torch DataLoader, "
                                f"got {type(loader).__name__}")
            _check_loader_settings(type(self.task).__name__, loader, cfg)
        else:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            loader = DataLoader(
                self.dataset, batch_size=cfg.batch_size,
                sampler=_EpochShuffleSampler(len(self.dataset), cfg.seed, epoch), drop_last=cfg.drop_last,
                collate_fn=self.collate, num_workers=cfg.num_workers,
                # Its own generator feeds the worker seeds, so iterating never draws from the global RNG.
                generator=torch.Generator().manual_seed(_derive_seed(cfg.seed, epoch, 1)),
                pin_memory=self.accelerator.device.type == "cuda",
            )
        prepared = self.accelerator.prepare_data_loader(loader)
        # Accelerate's loader re-applies set_epoch(its iteration counter) to the sampler or dataset on every pass;
        # give it the true epoch, or a dataset with set_epoch would see epoch 0 every time.
        prepared.set_epoch(epoch)
        n_batches = len(prepared)
        if skip_batches:
            prepared = self.accelerator.skip_first_batches(prepared, skip_batches)
        return prepared, n_batches


# ----------------------------------------------------------------------------------------------------------------------
# fit, and the parts it is made of
# ----------------------------------------------------------------------------------------------------------------------


def fit(task: Task, cfg: TrainConfig, run_dir: str | os.PathLike, resume: bool = True,
        overwrite: bool = False) -> FitResult:
    """Train `task` for `cfg.epochs` epochs, writing the training log and checkpoints into the run folder `run_dir`.

    Args:
        task: the stage to train (a `Task`, or any object with its members).
        cfg: optimisation, schedule, precision, logging and stopping settings.
        run_dir: the run folder (relative paths are anchored at the repository root).
        resume: continue from its last checkpoint when there is one; False refuses to touch an unfinished run.
        overwrite: delete this loop's files in `run_dir` (checkpoints, training log) and train from scratch.
    Returns:
        FitResult; on return `task.model` holds the weights of the last step taken (`result.load_best_into(model)`
        loads the selected ones).
    Raises:
        RunFolderError: another process is training this run folder (the lock), or a checkpoint is damaged
            (CheckpointError, naming the file). FileWriteError: the folder is not writable or the disk is full.
    """
    _check_task(task)
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"fit needs a TrainConfig, got {type(cfg).__name__}")
    trackers = require_trackers(cfg.trackers)
    run = RunFolder.at(Path(run_dir).expanduser())
    accelerator = _make_accelerator(cfg, run, trackers)
    with _own_run_folder(run, accelerator):
        if overwrite:
            _on_main(accelerator, lambda: _clear_training_files(run))
        last_dir, info = _where_run_stands(run, cfg, resume, accelerator)
        if info is not None and _finished(info, cfg):
            load_weights(task.model, last_dir)
            return _result(run, "reused", info, None)
        return _Trainer(task, cfg, run, accelerator, last_dir, info).train()


def _make_accelerator(cfg: TrainConfig, run: RunFolder, trackers: tuple[str, ...]) -> Accelerator:
    return Accelerator(
        log_with=[_RunTensorBoard(run.tensorboard_dir) if t == "tensorboard" else t for t in trackers] or None,
        project_config=ProjectConfiguration(project_dir=str(run.path), logging_dir=str(run.tensorboard_dir)),
        mixed_precision="no",  # process-wide in Accelerate; each fit applies its own precision (see _Precision)
        gradient_accumulation_steps=cfg.grad_accumulation_steps,
        rng_types=[],  # our sampler is seeded per epoch; nothing for Accelerate to synchronise
        step_scheduler_with_optimizer=False,
        # A task may leave some of its model's trainable parameters unused in a step (e.g. a head only validation
        # reads); DDP must not wait for their gradients.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


class _Precision:
    """Autocast and fp16 loss scaling for one `fit` call, with torch's own tools.

    Accelerate's mixed precision is process-wide: the first Accelerator fixes it and a later one asking for another is
    refused unless the private `AcceleratorState._reset_state` is called. A notebook trains stage I in fp32 and stage
    II in bf16 in one kernel, so the Accelerator always runs at "no" and each fit applies its precision here:
    torch.autocast around the training step and, for fp16, torch.amp.GradScaler (what Accelerate itself would use).
    """

    def __init__(self, precision: str, device: torch.device):
        self.name = precision
        self.device_type = device.type
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scale(self, loss: Tensor) -> Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss


class _TrainingStep(nn.Module):
    """The task's training step as the forward of one module, for `accelerator.prepare`.

    `task.model` is its submodule, so on several processes DDP (which wraps this module) broadcasts rank 0's weights
    at the start and averages the gradients of every parameter of `task.model` however `training_step` reaches them
    (`self.model.encode_image(...)`, a loss over gathered targets): DDP's hooks sit on the parameters, and calling
    the step through the wrapper tells DDP that a backward follows. The task keeps its plain, unpatched model.
    """

    def __init__(self, task: Any):
        super().__init__()
        self.model = task.model
        object.__setattr__(self, "_task", task)  # a plain reference, never registered as a submodule

    def forward(self, batch: Any) -> Any:
        return self._task.training_step(batch)


def _on_main(accelerator: Accelerator, action: Any) -> None:
    """Run `action()` on the main process only; if it fails there, every process raises (none waits forever at the
    next collective for a main process that has stopped)."""
    error: BaseException | None = None
    if accelerator.is_main_process:
        try:
            action()
        except Exception as err:  # re-raised below on this process, reported to the others
            error = err
    failed = dist.broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if failed is not None:
        raise RunFolderError(f"the main process stopped: {failed}")


@contextlib.contextmanager
def _own_run_folder(run: RunFolder, accelerator: Accelerator) -> Iterator[None]:
    """Prove the run folder writable and hold its lock (main process) for the whole call, before any training."""
    with contextlib.ExitStack() as stack:
        def take() -> None:
            paths.check_writable(run.path, f"run folder {run.path}")
            stack.enter_context(run.lock())

        _on_main(accelerator, take)
        yield


def _clear_training_files(run: RunFolder) -> None:
    for path in (run.log_file, run.log_csv_file):
        path.unlink(missing_ok=True)
    if run.checkpoints_dir.exists():
        shutil.rmtree(run.checkpoints_dir)
    _clear_tracker_files(run)


def _clear_tracker_files(run: RunFolder) -> None:
    # The TensorBoard curves of a run that restarts from scratch (W&B and Comet start a new run of their own).
    if run.tensorboard_dir.exists():
        shutil.rmtree(run.tensorboard_dir)


def _where_run_stands(run: RunFolder, cfg: TrainConfig, resume: bool,
                      accelerator: Accelerator) -> tuple[Path | None, dict[str, Any] | None]:
    """The last checkpoint and its record (None, None for a fresh run), checked against `cfg`."""
    final = run.checkpoint_dir("last")
    found = existing_checkpoint(final)
    if found is not None and found != final:  # a crash inside the folder swap left the previous one aside
        _on_main(accelerator, lambda: paths.publish(found, final))
    if existing_checkpoint(final) is None:
        return None, None
    info = read_info(final)
    _refuse_other_config(run, info, cfg)
    if not _finished(info, cfg) and not resume:
        raise FileExistsError(
            f"{run.path} already holds an unfinished run (epoch {info['epochs_completed']}, step "
            f"{info['global_step']}); pass resume=True to continue it or overwrite=True to restart"
        )
    return final, info


def _refuse_other_config(run: RunFolder, info: dict[str, Any], cfg: TrainConfig) -> None:
    diffs = _config_mismatch(info["config"], cfg)
    if diffs:
        raise ValueError(
            f"{run.path} was trained with a different TrainConfig ({'; '.join(diffs)}); pass overwrite=True to "
            "retrain, or use another run_dir"
        )
    wasted = _extension_problem(info, cfg)
    if wasted:
        raise ValueError(f"{run.path} is not extended: {wasted}")


def refuse_other_config(run_dir: str | os.PathLike, cfg: TrainConfig) -> None:
    """Raise the ValueError `fit(..., overwrite=False)` would raise for a run folder whose last checkpoint was trained
    with another TrainConfig, touching nothing: a step calls this before it rewrites the run's config, so that a
    refused change leaves the folder as it was."""
    run = RunFolder.at(Path(run_dir).expanduser())
    found = existing_checkpoint(run.checkpoint_dir("last"))
    if found is not None:
        _refuse_other_config(run, read_info(found), cfg)


def _finished(info: dict[str, Any], cfg: TrainConfig) -> bool:
    # A partly trained epoch beyond cfg.epochs (a budget stop, then fewer epochs asked) also counts as done; an epoch
    # whose validation has not run yet does not.
    return info["epochs_completed"] >= cfg.epochs and info.get("pending_validation") is None


@dataclass
class _Progress:
    """Where the run stands: what checkpoints/last/info.json records, and where a resumed run starts."""

    epochs_completed: int = 0  # finished epochs
    batches_done: int = 0  # micro-batches of epoch `epochs_completed` trained already (a stop inside an epoch)
    global_step: int = 0  # optimizer steps taken
    steps_per_epoch: int | None = None  # optimizer steps per epoch (known once an epoch has started)
    best_metric: float | None = None  # best selection metric so far
    best_epoch: int | None = None  # its epoch
    best_metrics: dict[str, float] | None = None  # that validation's metrics
    last_val_metrics: dict[str, float] = field(default_factory=dict)  # the latest validation's metrics
    pending_validation: int | None = None  # an epoch saved whose validation has not finished (it runs on resume)
    elapsed_s: float = 0.0  # training wall time of earlier calls

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> "_Progress":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in info.items() if k in names})


class _Trainer:
    """One `fit` call that trains: set-up, restore, the epochs, their checkpoints and validations."""

    def __init__(self, task: Any, cfg: TrainConfig, run: RunFolder, accelerator: Accelerator, last_dir: Path | None,
                 info: dict[str, Any] | None):
        self.task, self.cfg, self.run, self.acc = task, cfg, run, accelerator
        self.is_main = accelerator.is_main_process
        self.last_dir, self.info = run.checkpoint_dir("last"), info
        self.progress = _Progress.from_info(info) if info is not None else _Progress()
        precision = resolve_precision(cfg.precision, accelerator.device)
        self.precision = _Precision(precision, accelerator.device)
        self.runtime = runtime_info(accelerator.device, precision, accelerator.num_processes)
        _collect_parameters(task)  # a task without trainable parameters fails before anything moves
        if last_dir is not None:
            load_weights(task.model, last_dir)
        # On several processes: DDP around the step (rank 0's weights broadcast now, gradients averaged in backward).
        self.step_module = accelerator.prepare_model(_TrainingStep(task))
        self.params = _collect_parameters(task)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                           weight_decay=cfg.weight_decay)
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None  # made once the epoch length is known
        self.data = _EpochData(task, cfg, accelerator)
        self.window, self.epoch_means = _RunningMeans(accelerator.device), _RunningMeans(accelerator.device)
        self.log = MetricsLog(run, enabled=self.is_main)
        self.t_start = time.monotonic()

    # ---- the run ------------------------------------------------------------------------------------------------
    def train(self) -> FitResult:
        try:
            self._start()
            self._start_trackers()
            status = self._epochs()
        finally:
            self._end_trackers()
            # Drop the DDP wrapper (its hooks on the task's parameters) and Accelerate's references to it.
            self.step_module = None
            self.acc.free_memory()
        return _result(self.run, status, self._info(), self.runtime)

    def _start(self) -> None:
        """Fresh run or the state of checkpoints/last; the RNG streams are set last, after every set-up step that
        might draw from them, so fresh and resumed runs agree."""
        rng = None
        if self.info is None:
            self.log.start(keep=0)
        else:
            rng = self._restore(read_state(self.last_dir))
        _hook(self.task, "on_fit_start")(self.acc)
        self.t_start = time.monotonic()
        if rng is None:
            seed_everything(self.cfg.seed + self.acc.process_index)
        else:
            set_rng_state(rng)

    def _start_trackers(self) -> None:
        """Open the experiment trackers (main process), each holding the whole kept log. A fresh run starts with an
        empty tensorboard/ folder, as its log starts empty. A resumed run writes a new event file beside the earlier
        ones (TensorBoard merges a folder's files) from the step it resumes at, with the kept log's records from
        there on; a tracker that holds nothing of this run yet (a new W&B or Comet run, or TensorBoard chosen only
        now) is given the whole kept log first."""
        if self.info is None:
            _on_main(self.acc, lambda: _clear_tracker_files(self.run))
        if not self.acc.log_with:
            return
        continued = self.info is not None and any(self.run.tensorboard_dir.glob("events.out.tfevents.*"))
        resumed_at = self.progress.global_step
        for tracker in self.acc.log_with:
            if continued and isinstance(tracker, _RunTensorBoard):
                tracker.resume_at(resumed_at)
        hparams = {"train": self.cfg.to_dict()}
        if self.run.config_file.is_file():  # the settings the run folder was started with (the workbook's steps)
            hparams["run"] = paths.read_json(self.run.config_file, "run config")
        self.acc.init_trackers(
            TRACKER_PROJECT, config=_flat_hparams(hparams),
            init_kwargs={"wandb": {"name": f"{self.run.stage}/{self.run.name}", "dir": str(self.run.path)}},
        )
        for tracker in self.acc.trackers:
            first = resumed_at if continued and isinstance(tracker, _RunTensorBoard) else 0
            for record in self.log.records:
                scalars = tracker_scalars(record)
                if record["step"] >= first and scalars:
                    tracker.log(scalars, step=record["step"])  # main process only (Accelerate)

    def _end_trackers(self) -> None:
        # Each tracker's own finish (closes TensorBoard's writer), not `accelerator.end_training()`: that also
        # destroys the process group, which the steps after training (top-K extraction in the same launch) still use.
        trackers, self.acc.trackers = self.acc.trackers, []
        for tracker in trackers:
            tracker.finish()

    def _emit(self, record: dict[str, Any]) -> None:
        """One training-log record to every sink: metrics.jsonl (and .csv) and the experiment trackers."""
        self.log.append(record)
        self._to_trackers(record)

    def _to_trackers(self, record: dict[str, Any]) -> None:
        scalars = tracker_scalars(record)
        if scalars and self.acc.trackers:
            self.acc.log(scalars, step=record["step"])  # main process only (Accelerate)

    def _restore(self, state: dict[str, Any]) -> dict[str, Any]:
        p, path = self.progress, self.last_dir / "state.pt"
        if (state.get("epochs_completed"), state.get("global_step")) != (p.epochs_completed, p.global_step):
            raise CheckpointError(f"{path} (epoch {state.get('epochs_completed')}, step {state.get('global_step')}) "
                                  f"does not belong to the record beside it (epoch {p.epochs_completed}, step "
                                  f"{p.global_step}); train this run again with overwrite=True")
        p.batches_done = state["batches_done"]
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"] is not None:
            if self.precision.scaler is None:
                raise ValueError(f"{path}: the checkpoint has an fp16 loss-scaler state; precision is "
                                 f"{self.precision.name}")
            self.precision.scaler.load_state_dict(state["scaler"])
        _hook(self.task, "load_state_from_checkpoint")(state["task"])
        # Format 1 kept the log's length in state.pt.
        self.log.start(keep=self.info.get("metrics_records", state.get("metrics_records", 0)))
        per_process = state["processes"]
        if len(per_process) != self.acc.num_processes:
            raise ValueError(
                f"{path} was written by {len(per_process)} process(es), this run has {self.acc.num_processes}; "
                "resume with the same number of processes (or overwrite=True)"
            )
        mine = per_process[self.acc.process_index]
        self.window.load(mine["window"])
        self.epoch_means.load(mine["epoch"])
        return mine["rng"]

    def _epochs(self) -> str:
        """Train the remaining epochs; returns "finished" or "time_budget"."""
        p, cfg = self.progress, self.cfg
        if p.pending_validation is not None:  # the last call stopped inside this validation; its epoch is saved
            self._validate(p.pending_validation)
        bar = progress_bar(total=cfg.epochs, initial=min(p.epochs_completed, cfg.epochs), desc="epochs",
                           unit="epoch", disable=not (self.is_main and cfg.progress))
        try:
            for epoch in range(p.epochs_completed, cfg.epochs):
                stopped, complete = self._train_epoch(epoch)
                if not complete:  # the time budget stopped the run inside the epoch (saved there)
                    return "time_budget"
                self._end_epoch(epoch)
                bar.update(1)
                if stopped and epoch + 1 < cfg.epochs:  # the budget ran out on an epoch's last step
                    return "time_budget"
        finally:
            bar.close()
        return "finished"

    # ---- one epoch ----------------------------------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> tuple[bool, bool]:
        """Train (the rest of) `epoch`; returns (the time budget says stop, the epoch is complete). A stop inside the
        epoch is checkpointed here."""
        p, cfg, acc = self.progress, self.cfg, self.acc
        if p.batches_done == 0:
            self.epoch_means.reset()
        # A resumed epoch skips the batches the interrupted run consumed (on the batch sampler: nothing is loaded).
        batches, n_batches = self.data.loader(epoch, p.batches_done)
        steps_per_epoch = self._epoch_length(epoch, n_batches)
        steps_in_epoch = math.ceil(p.batches_done / cfg.grad_accumulation_steps)
        _hook(self.task, "train_mode")()
        bar = progress_bar(total=steps_per_epoch, initial=steps_in_epoch, desc=f"epoch {epoch}", unit="step",
                           leave=False, disable=not (self.is_main and cfg.progress))
        stop = False
        if steps_in_epoch < steps_per_epoch:
            iterator = iter(batches)
            for batch in iterator:
                out = self._forward_backward(batch, epoch)
                p.batches_done += 1
                self.window.add(out)
                self.epoch_means.add(out)
                if not acc.sync_gradients:
                    continue
                used = self._optimizer_step()
                p.global_step += 1
                steps_in_epoch += 1
                bar.update(1)
                if p.global_step % cfg.log_every == 0:
                    self._log_window(epoch, used, bar)
                if cfg.time_budget_s is not None:
                    stop = _agreed(acc, time.monotonic() - self.t_start > cfg.time_budget_s)
                if stop or steps_in_epoch >= steps_per_epoch:
                    break
            # We may leave before the loader's own end: close it and unregister it from Accelerate's state.
            iterator.close()
            if batches in acc.gradient_state.dataloader_references:
                batches.end()
        bar.close()
        complete = steps_in_epoch >= steps_per_epoch
        if not complete:
            self._save_last()
        return stop, complete

    def _epoch_length(self, epoch: int, n_batches: int) -> int:
        """Optimizer steps in `epoch`; the first call makes the lr scheduler, which needs every epoch equally long."""
        cfg, p = self.cfg, self.progress
        if n_batches == 0:
            raise ValueError(
                f"{type(self.task).__name__}'s training data gives no batch in epoch {epoch} (per process, over "
                f"{self.acc.num_processes} process(es)); check its size against the batch size and drop_last"
            )
        steps = math.ceil(n_batches / cfg.grad_accumulation_steps)
        if cfg.max_steps_per_epoch is not None:
            steps = min(steps, cfg.max_steps_per_epoch)
        if p.steps_per_epoch is not None and steps != p.steps_per_epoch:
            raise ValueError(
                f"{type(self.task).__name__}'s training data gives {steps} optimizer steps in epoch {epoch} but "
                f"{p.steps_per_epoch} in earlier epochs; the lr schedule counts steps per epoch, so every epoch must "
                "have the same number of batches"
            )
        p.steps_per_epoch = steps
        if self.scheduler is None:
            self.scheduler = make_scheduler(self.optimizer, cfg, steps, p.global_step)
        return steps

    def _forward_backward(self, batch: Any, epoch: int) -> dict[str, Tensor]:
        # Inside `accumulate`, DDP skips the gradient all-reduce on micro-batches that only accumulate; `backward`
        # divides the loss by the accumulation steps.
        with self.acc.accumulate(self.step_module):
            with self.precision.autocast():
                out = _check_step_output(self.step_module(batch), self.task, epoch, self.progress.global_step)
            self.acc.backward(self.precision.scale(out["loss"]))
        return out

    def _optimizer_step(self) -> dict[str, float]:
        """Clip, step, zero the gradients, advance the schedule; returns the lr the step used ("lr"), and its AdamW
        beta1 ("beta1") when the schedule cycles it."""
        group = self.optimizer.param_groups[0]
        used = {"lr": float(group["lr"])}
        if cycles_beta1(self.cfg):
            used["beta1"] = float(group["betas"][0])
        scaler = self.precision.scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)  # clip (and compare) true gradients
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return used

    def _log_window(self, epoch: int, used: dict[str, float], bar: Any) -> None:
        means = self.window.reduced_means(self.acc)
        self.window.reset()
        _check_finite(means, epoch, self.progress.global_step)
        self._emit({"kind": "train", "epoch": epoch, "step": self.progress.global_step, **used, **means,
                    "time": round(self._elapsed(), 3)})
        bar.set_postfix(loss=f"{means['loss']:.4g}", lr=f"{used['lr']:.3g}")

    def _end_epoch(self, epoch: int) -> None:
        """Log the epoch, save checkpoints/last, THEN validate: a failing validation never loses the epoch."""
        p = self.progress
        means = self.epoch_means.reduced_means(self.acc)
        _check_finite(means, epoch, p.global_step)
        self._emit({"kind": "epoch", "epoch": epoch, "step": p.global_step, "lr": self._epoch_lr(epoch),
                    **means, "time": round(self._elapsed(), 3)})
        p.epochs_completed, p.batches_done = epoch + 1, 0
        p.pending_validation = epoch if _validation_due(self.cfg, epoch) else None
        self._save_last()
        if p.pending_validation is not None:
            self._validate(epoch)

    def _epoch_lr(self, epoch: int) -> float:
        # The lr of the epoch's last step (per-epoch schedules: the epoch's lr).
        return lr_at(self.cfg, epoch, max(self.progress.global_step - 1, 0), self.progress.steps_per_epoch or 1)

    def _validate(self, epoch: int) -> None:
        """Validate the weights of checkpoints/last, keep the best, and record the validation in last/info.json."""
        p = self.progress
        metrics = _run_validation(self.task, self.acc)
        selection = float(self.task.selection_metric(metrics))
        improved = p.best_metric is None or selection > p.best_metric
        if improved:
            p.best_metric, p.best_epoch, p.best_metrics = selection, epoch, metrics
        p.last_val_metrics = metrics
        self._emit({"kind": "val", "epoch": epoch, "step": p.global_step, "lr": self._epoch_lr(epoch),
                    **{f"val/{k}": v for k, v in metrics.items()}, "selection": selection,
                    "is_best": improved, "time": round(self._elapsed(), 3)})
        if self.is_main and self.cfg.progress:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            progress_write(f"epoch {epoch}: {shown} | selection={selection:.4g}{' (best)' if improved else ''}")
        if improved:
            best = {"format": CHECKPOINT_FORMAT, "epoch": epoch, "epochs_completed": epoch + 1,
                    "global_step": p.global_step, "selection_metric": selection, "val_metrics": metrics,
                    "config": self.cfg.to_dict()}
            _on_main(self.acc, lambda: write_checkpoint(self.run.checkpoint_dir("best"), self.task.model, best, None,
                                                        _hook(self.task, "save_extra_files")))
        p.pending_validation = None
        _on_main(self.acc, lambda: update_info(self.last_dir, self._info()))

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def _elapsed(self) -> float:
        return self.progress.elapsed_s + time.monotonic() - self.t_start

    def _info(self) -> dict[str, Any]:
        """checkpoints/last/info.json: the progress, the log length it covers, the config and where it ran."""
        p = dataclasses.asdict(self.progress)
        p.pop("batches_done")  # state.pt's (with the RNG streams it goes with)
        return {"format": CHECKPOINT_FORMAT, **p, "elapsed_s": self._elapsed(),
                "metrics_records": len(self.log.records), "config": self.cfg.to_dict(),
                "runtime": self.runtime.to_dict()}

    def _save_last(self) -> None:
        """checkpoints/last: weights, info.json and state.pt (optimizer, scaler, every process's RNG streams)."""
        p = self.progress
        proc = {"rng": rng_state(), "window": self.window.state(), "epoch": self.epoch_means.state()}
        processes = gather_object([proc])  # every process's RNG streams, so each resumes its own
        info = self._info()

        def write() -> None:
            state = {
                "format": CHECKPOINT_FORMAT, "epochs_completed": p.epochs_completed, "batches_done": p.batches_done,
                "global_step": p.global_step,
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.precision.scaler.state_dict() if self.precision.scaler is not None else None,
                "task": _hook(self.task, "state_dict_for_checkpoint")(),
                "processes": processes,
            }
            write_checkpoint(self.last_dir, self.task.model, info, state, _hook(self.task, "save_extra_files"))

        _on_main(self.acc, write)


def _agreed(accelerator: Accelerator, flag: bool) -> bool:
    # Every process must take the same branch (collectives follow), so a stop on any process stops all.
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor(float(flag), device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def _validation_due(cfg: TrainConfig, epoch: int) -> bool:
    if cfg.validate_every is None:
        return False
    return (epoch + 1) % cfg.validate_every == 0 or epoch + 1 == cfg.epochs


def _run_validation(task: Any, accelerator: Accelerator) -> dict[str, float]:
    saved = rng_state()
    _hook(task, "eval_mode")()
    try:
        with torch.no_grad():
            metrics = task.validate()
    finally:
        set_rng_state(saved)
        _hook(task, "train_mode")()
    if not isinstance(metrics, dict) or not metrics:
        raise TypeError(f"{type(task).__name__}.validate() must return a non-empty dict of floats, got {metrics!r}")
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
    values = accelerator.reduce(values, reduction="mean")
    return {k: float(values[i]) for i, k in enumerate(keys)}


def _check_finite(means: dict[str, float], epoch: int, step: int) -> None:
    loss = means.get("loss")
    if loss is not None and not math.isfinite(loss):
        raise FloatingPointError(f"training loss is {loss} at epoch {epoch}, step {step}; stopping (the last "
                                 "checkpoint is from before this)")
