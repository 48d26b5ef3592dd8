"""One generic training loop for both stages, on Hugging Face Accelerate.

Nothing here knows about composed image retrieval. A stage is wrapped as a `Task` (its model, which parameters train,
its training data, a `training_step` returning a loss dict, a `validate` returning metrics, and which metric selects
the best checkpoint); `fit(task, cfg, run_dir)` does the rest:

- AdamW over the task's trainable parameters in one group, as the original does, with the learning-rate schedule of
  `cfg.schedule` (see `lr_at`; the default is the original's per-epoch cosine, including its rise past `max_epoch`);
- mixed precision and gradient accumulation through `accelerate.Accelerator`, on one process or several (data
  parallel: the model is not wrapped, its gradients are averaged over processes before each optimizer step, so a
  task may call any of its model's methods; only the main process writes files; logged numbers are reduced);
  `cfg.batch_size` is per process: N processes take consecutive batches of one shuffled order (rank r: batches r,
  r+N, ...), i.e. a global batch of N * batch_size, and a task whose loss couples a batch's samples (a contrastive
  loss) gathers them with `cirlib.distributed.all_gather_with_grad` so that it trains as one process would;
- `run_dir/metrics.jsonl` (append-only, one JSON object per logged step, epoch and validation) mirrored to
  `run_dir/metrics.csv`;
- atomic checkpoints: `run_dir/checkpoints/last/` every epoch (and when a time budget stops the run) and
  `run_dir/checkpoints/best/` whenever the selection metric improves; each holds `model.safetensors` and
  `info.json`, and `last/` also `state.pt` (optimizer, AMP scaler, RNG states, counters; loadable with
  `torch.load(..., weights_only=True)`);
- exact resume: a run interrupted after any epoch (or after any step, when stopped by `time_budget_s`) and resumed
  reaches bit-identical weights and optimizer state to an uninterrupted run;
- `run_dir/DONE` once all epochs ran; a finished run is reused, not retrained, unless `overwrite=True`.

Run folder layout:
    run_dir/metrics.jsonl, metrics.csv, DONE
    run_dir/checkpoints/last/{model.safetensors, state.pt, info.json, <task extra files>}
    run_dir/checkpoints/best/{model.safetensors, info.json, <task extra files>}

Epochs are 0-based in logs and in the schedule (the original's `epoch` in its cosine), while `epochs_completed`
counts finished epochs.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import gather_object
from safetensors.torch import load_model, save_model
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler, default_collate
from tqdm.auto import tqdm

from cirlib.paths import REPO_ROOT
from cirlib.train.runtime import RuntimeInfo, accelerate_mixed_precision, resolve_precision, runtime_info, seed_everything

SCHEDULES = ("cosine_per_epoch", "cosine_per_epoch_clamped", "cosine_per_step", "constant")
CHECKPOINT_FORMAT = "cirlib.train/1"
# Fields that may change between an interrupted run and its resumption without changing what is computed.
RESUMABLE_FIELDS = ("epochs", "time_budget_s", "log_every", "num_workers", "progress")


# ----------------------------------------------------------------------------------------------------------------------
# Configuration and schedule
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10  # epochs to train in total (a resumed run continues up to this many)
    batch_size: int = 32  # micro-batch size per process (original stage I: 512, stage II: 16)
    lr: float = 2e-5  # peak learning rate lr0 (original: 2e-5 for both stages)
    weight_decay: float = 0.05  # AdamW weight decay on every trainable parameter, one group (original: 0.05)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas (original: torch defaults)
    eps: float = 1e-8  # AdamW epsilon (original: torch default)
    # "cosine_per_epoch": the original; lr = min_lr + 0.5*(lr0-min_lr)*(1+cos(pi*epoch/max_epoch)) set at the start of
    # each epoch, which RISES again past max_epoch. "cosine_per_epoch_clamped": the same, held at min_lr past max_epoch.
    # "cosine_per_step": linear warm-up then cosine over max_epoch epochs of optimizer steps, held at min_lr after.
    # "constant": lr0 throughout.
    schedule: str = "cosine_per_epoch"
    max_epoch: int | None = None  # cosine horizon in epochs (the original's blip_max_epoch); None = epochs
    min_lr: float = 0.0  # floor of the cosine (original: 0)
    warmup_steps: int = 0  # cosine_per_step only: linear warm-up over this many optimizer steps
    warmup_epochs: int = 0  # cosine_per_step only: warm-up given in epochs instead (not both)
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
        # JSON round-trips give lists; keep the frozen value hashable and comparable.
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    @property
    def cosine_epochs(self) -> int:
        """The cosine horizon in epochs: max_epoch, or epochs when it is None."""
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


def warmup_steps_for(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Warm-up length in optimizer steps (warmup_epochs converted with `steps_per_epoch`)."""
    return cfg.warmup_steps if cfg.warmup_steps else cfg.warmup_epochs * steps_per_epoch


def lr_at(cfg: TrainConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
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


# ----------------------------------------------------------------------------------------------------------------------
# Task
# ----------------------------------------------------------------------------------------------------------------------


class Task:
    """What `fit` needs from a stage; subclass it, or write any object with the same members (duck typing).

    Required: `model` (the nn.Module whose weights are checkpointed), `trainable_parameters()`, `training_step(batch)`,
    `validate()`, `selection_metric(metrics)`, and training data as EITHER `train_loader(epoch_seed)` (a DataLoader
    built by the task, shuffled with a generator seeded by `epoch_seed`) OR `train_dataset()` (a map-style dataset
    that `fit` batches with `collate`, `cfg.batch_size` and its own per-epoch seeded shuffle). The other members have
    defaults here, and `fit` applies the same defaults to objects that do not subclass Task.

    `self.model` is never wrapped: with several processes, gradients are averaged over processes just before each
    optimizer step, so `training_step` may call any method of the model. `training_step` runs under the run's
    autocast; batches from the loader arrive on the run's device. `validate` runs after `eval_mode()`, under
    `torch.no_grad()`, on every process (its metrics are averaged over processes), with the training RNG streams saved
    and restored around it: validating never changes the training trajectory.
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


def checkpoint_dir(run_dir: str | os.PathLike, which: str = "best") -> Path:
    """Path of a run's "best" or "last" checkpoint folder (it may not exist yet)."""
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    return _anchor(run_dir) / "checkpoints" / which


def load_weights(model: nn.Module, checkpoint: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load `checkpoint/model.safetensors` (or a .safetensors file) into `model` in place; returns the model.

    Raises:
        FileNotFoundError: no weights file there. RuntimeError: missing/unexpected keys when `strict`.
    """
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint weights at {path} (expected a model.safetensors from cirlib.train)")
    missing, unexpected = load_model(model, str(path), strict=False, device="cpu")
    if strict and (missing or unexpected):
        raise RuntimeError(
            f"{path} does not match {type(model).__name__}: missing keys {sorted(missing)[:10]}, "
            f"unexpected keys {sorted(unexpected)[:10]}"
        )
    return model


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of `run_dir/metrics.jsonl`, in order."""
    path = _anchor(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics log at {path}")
    return _read_jsonl(path)


def _anchor(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {i + 1} is not valid JSON ({err})") from err
    return records


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _swap_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place. A folder cannot be os.replace'd onto a non-empty one, so the old
    one steps aside first; a crash between the two renames leaves `.<name>.old`, which `_existing_dir` falls back to."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def _existing_dir(final: Path) -> Path | None:
    if final.is_dir():
        return final
    old = final.with_name(f".{final.name}.old")
    return old if old.is_dir() else None


# ----------------------------------------------------------------------------------------------------------------------
# RNG state capture (as tensors, ints and lists so that weights_only loading works)
# ----------------------------------------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    _, key, pos, has_gauss, cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {
        "python": [version, list(internal), gauss],
        "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": [s.cpu() for s in cuda],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    np_state = state["numpy"]
    key = np_state["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, np_state["pos"], np_state["has_gauss"], np_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            raise ValueError(
                f"checkpoint holds CUDA RNG states for {len(state['cuda'])} devices, this machine has "
                f"{torch.cuda.device_count()}; resume on the same device count (or overwrite=True)"
            )
        torch.cuda.set_rng_state_all(state["cuda"])


def _derive_seed(*parts: int) -> int:
    # Independent, reproducible seeds per (run seed, epoch, purpose) without touching any global generator.
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] % (2**63 - 1))


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


class _MetricsLog:
    """metrics.jsonl (append-only) mirrored to metrics.csv; only the main process writes."""

    BASE_COLUMNS = ("kind", "epoch", "step", "lr", "loss", "time")

    def __init__(self, run_dir: Path, enabled: bool):
        self.jsonl, self.csv = run_dir / "metrics.jsonl", run_dir / "metrics.csv"
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        self.columns: list[str] = list(self.BASE_COLUMNS)

    def start(self, keep: int) -> None:
        """Keep the first `keep` records of an existing log (those a checkpoint covers) and drop the rest."""
        if not self.enabled:
            return
        old = _read_jsonl(self.jsonl) if self.jsonl.is_file() else []
        if len(old) < keep:
            raise ValueError(f"{self.jsonl} has {len(old)} records but the checkpoint expects at least {keep}")
        self.records = old[:keep]
        for r in self.records:
            self.columns += [k for k in r if k not in self.columns]
        _write_text_atomic(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.records))
        self._rewrite_csv()

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")
        new = [k for k in record if k not in self.columns]
        if new:  # a new column: rewrite the whole CSV with the wider header
            self.columns += new
            self._rewrite_csv()
        else:
            with self.csv.open("a", newline="") as f:
                csv.writer(f).writerow(self._row(record))

    def _row(self, record: dict[str, Any]) -> list[Any]:
        return ["" if record.get(c) is None else record.get(c) for c in self.columns]

    def _rewrite_csv(self) -> None:
        tmp = self.csv.with_name(f".{self.csv.name}.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(self.columns)
            writer.writerows(self._row(r) for r in self.records)
        os.replace(tmp, self.csv)


# ----------------------------------------------------------------------------------------------------------------------
# fit
# ----------------------------------------------------------------------------------------------------------------------


def _make_accelerator(cfg: TrainConfig) -> tuple[Accelerator, str]:
    precision = resolve_precision(cfg.precision, PartialState().device)
    mixed = accelerate_mixed_precision(precision)
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision", mixed) != mixed:
        # Accelerate keeps one process-wide state and refuses a second precision; a notebook that trains stage I in
        # fp32 and stage II in bf16 needs a fresh one. The distributed set-up (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=cfg.grad_accumulation_steps,
        rng_types=[],  # our sampler is seeded per epoch; nothing for Accelerate to synchronise
        step_scheduler_with_optimizer=False,
    )
    return accelerator, precision


def _config_mismatch(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    saved_cfg = TrainConfig.from_dict(saved)
    diffs = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in RESUMABLE_FIELDS:
            continue
        a, b = getattr(saved_cfg, f.name), getattr(cfg, f.name)
        if a != b:
            diffs.append(f"{f.name}: {a!r} in the run vs {b!r} now")
    # With max_epoch=None the cosine horizon follows `epochs`, so a change of epochs changes the schedule.
    if saved_cfg.schedule != "constant" and saved_cfg.cosine_epochs != cfg.cosine_epochs:
        diffs.append(
            f"cosine horizon: {saved_cfg.cosine_epochs} epochs in the run vs {cfg.cosine_epochs} now "
            "(set max_epoch explicitly to extend a run)"
        )
    return diffs


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


_GRAD_BUCKET_NUMEL = 2**25  # elements per all-reduce when averaging gradients (128 MiB of fp32)


def _buckets(tensors: list[Tensor], limit: int) -> Iterator[list[Tensor]]:
    bucket, size = [], 0
    for t in tensors:
        if bucket and size + t.numel() > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


def _average_gradients(params: list[nn.Parameter], accelerator: Accelerator) -> None:
    """Average `.grad` over processes in place: what DDP does, without wrapping the model (tasks call its methods)."""
    if accelerator.num_processes == 1:
        return
    world = accelerator.num_processes
    # A parameter unused on one process has grad None there; average it as zeros if any process used it.
    present = torch.tensor([float(p.grad is not None) for p in params], device=accelerator.device)
    torch.distributed.all_reduce(present)
    live = [p for p, n in zip(params, present.tolist()) if n > 0]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for p in live:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        for bucket in _buckets(grads, _GRAD_BUCKET_NUMEL):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            torch.distributed.all_reduce(flat)
            flat /= world
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()


def _broadcast_model(model: nn.Module, accelerator: Accelerator) -> None:
    # Every process starts from rank 0's weights (DDP does this when it wraps a model).
    if accelerator.num_processes == 1:
        return
    with torch.no_grad():
        for t in model.state_dict().values():
            torch.distributed.broadcast(t, src=0)


def fit(task: Task, cfg: TrainConfig, run_dir: str | os.PathLike, resume: bool = True,
        overwrite: bool = False) -> FitResult:
    """Train `task` for `cfg.epochs` epochs, writing logs and checkpoints to `run_dir`.

    Args:
        task: the stage to train (a `Task`, or any object with its members).
        cfg: optimisation, schedule, precision, logging and stopping settings.
        run_dir: the run folder (relative paths are anchored at the repository root).
        resume: continue from `run_dir/checkpoints/last` when it exists; False refuses to touch an existing run.
        overwrite: delete this loop's files in `run_dir` (checkpoints, metrics, DONE) and train from scratch.
    Returns:
        FitResult; on return `task.model` holds the weights of the last step taken (`result.load_best_into(model)`
        loads the selected ones).
    """
    _check_task(task)
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"fit needs a TrainConfig, got {type(cfg).__name__}")
    run_dir = _anchor(run_dir)
    ckpt_root = run_dir / "checkpoints"
    accelerator, precision = _make_accelerator(cfg)
    is_main = accelerator.is_main_process

    if overwrite:
        if is_main:
            for name in ("metrics.jsonl", "metrics.csv", "DONE"):
                (run_dir / name).unlink(missing_ok=True)
            if ckpt_root.exists():
                shutil.rmtree(ckpt_root)
        accelerator.wait_for_everyone()

    # ---- where does this run stand? ---------------------------------------------------------------------------------
    last_dir = _existing_dir(ckpt_root / "last")
    prior = json.loads((last_dir / "info.json").read_text()) if last_dir is not None else None
    done_path = run_dir / "DONE"
    if prior is None and done_path.exists():
        raise FileNotFoundError(
            f"{done_path} marks a finished run but {ckpt_root / 'last'} is missing; pass overwrite=True to retrain"
        )
    if prior is not None:
        if prior.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"{last_dir / 'info.json'}: format {prior.get('format')!r}, expected {CHECKPOINT_FORMAT!r}"
            )
        diffs = _config_mismatch(prior["config"], cfg)
        if diffs:
            raise ValueError(
                f"{run_dir} was trained with a different TrainConfig ({'; '.join(diffs)}); pass overwrite=True to "
                "retrain, or use another run_dir"
            )
        # A partly trained epoch beyond cfg.epochs (a budget stop, then fewer epochs asked) also counts as done.
        if prior["epochs_completed"] >= cfg.epochs:
            load_weights(task.model, last_dir)
            if is_main and not done_path.exists():
                _write_text_atomic(done_path, json.dumps(prior, indent=2))
            accelerator.wait_for_everyone()
            return _result(run_dir, "reused", prior, None)
        if not resume:
            raise FileExistsError(
                f"{run_dir} already holds an unfinished run (epoch {prior['epochs_completed']}, step "
                f"{prior['global_step']}); pass resume=True to continue it or overwrite=True to restart"
            )
        if is_main:
            done_path.unlink(missing_ok=True)  # a shorter earlier run's marker; rewritten when this one finishes

    # ---- model, optimizer, data -------------------------------------------------------------------------------
    model = task.model
    if prior is not None:
        load_weights(model, last_dir)
    model.to(accelerator.device)
    _broadcast_model(model, accelerator)
    params = _collect_parameters(task)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    # The model is not prepared (no DDP wrapper, see _average_gradients); the optimizer is, for AMP loss scaling and
    # for skipping steps inside gradient accumulation.
    optimizer = accelerator.prepare_optimizer(optimizer)
    data = _EpochData(task, cfg, accelerator)
    info_rt = runtime_info(accelerator.device, precision, accelerator.num_processes)

    window, epoch_means = _RunningMeans(accelerator.device), _RunningMeans(accelerator.device)
    log = _MetricsLog(run_dir, enabled=is_main)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)

    # ---- fresh start or resume --------------------------------------------------------------------------------------
    if prior is None:
        start_epoch, batches_done, global_step = 0, 0, 0
        best_metric, best_epoch, best_metrics, last_val, elapsed_before = None, None, None, {}, 0.0
        log.start(keep=0)
        rng_to_restore = None
    else:
        state = torch.load(last_dir / "state.pt", map_location="cpu", weights_only=True)
        start_epoch, batches_done, global_step = state["epochs_completed"], state["batches_done"], state["global_step"]
        best_metric, best_epoch = state["best_metric"], state["best_epoch"]
        best_metrics, last_val = prior.get("best_metrics"), dict(prior.get("last_val_metrics", {}))
        elapsed_before = float(state["elapsed_s"])
        optimizer.load_state_dict(state["optimizer"])
        if state["scaler"] is not None:
            if accelerator.scaler is None:
                raise ValueError(f"{last_dir}: the checkpoint has an fp16 loss-scaler state; precision is {precision}")
            accelerator.scaler.load_state_dict(state["scaler"])
        _hook(task, "load_state_from_checkpoint")(state["task"])
        log.start(keep=state["metrics_records"])
        per_process = state["processes"]
        if len(per_process) != accelerator.num_processes:
            raise ValueError(
                f"{last_dir} was written by {len(per_process)} process(es), this run has {accelerator.num_processes}; "
                "resume with the same number of processes (or overwrite=True)"
            )
        mine = per_process[accelerator.process_index]
        window.load(mine["window"])
        epoch_means.load(mine["epoch"])
        rng_to_restore = mine["rng"]

    _hook(task, "on_fit_start")(accelerator)
    t_start = time.monotonic()
    status = "finished"

    def elapsed() -> float:
        return elapsed_before + time.monotonic() - t_start

    def save_last(epochs_completed: int, batches: int) -> None:
        proc = {"rng": _rng_state(), "window": window.state(), "epoch": epoch_means.state()}
        processes = gather_object([proc])  # every process's RNG streams, so each resumes its own
        info = {
            "format": CHECKPOINT_FORMAT, "epochs_completed": epochs_completed, "batches_done": batches,
            "global_step": global_step, "best_metric": best_metric, "best_epoch": best_epoch,
            "best_metrics": best_metrics, "last_val_metrics": last_val, "elapsed_s": elapsed(),
            "config": cfg.to_dict(), "runtime": info_rt.to_dict(),
        }
        if is_main:
            state = {
                **{k: info[k] for k in ("format", "epochs_completed", "batches_done", "global_step", "best_metric",
                                         "best_epoch", "elapsed_s")},
                "metrics_records": len(log.records),
                "optimizer": optimizer.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "task": _hook(task, "state_dict_for_checkpoint")(),
                "processes": processes,
            }
            _write_checkpoint(ckpt_root / "last", model, task, info, state)
        accelerator.wait_for_everyone()

    epoch_bar = tqdm(total=cfg.epochs, initial=start_epoch, desc="epochs", unit="epoch",
                     disable=not (is_main and cfg.progress))
    # Last, after every set-up step that might draw random numbers, so fresh and resumed runs agree.
    if rng_to_restore is None:
        seed_everything(cfg.seed + accelerator.process_index)
    else:
        _set_rng_state(rng_to_restore)
    for epoch in range(start_epoch, cfg.epochs):
        if not (epoch == start_epoch and batches_done > 0):  # not resuming inside this epoch
            batches_done = 0
            epoch_means.reset()
        # A resumed epoch skips the batches the interrupted run consumed (on the batch sampler: nothing is loaded).
        batches, n_batches = data.loader(epoch, batches_done)
        if n_batches == 0:
            raise ValueError(
                f"{type(task).__name__}'s training data gives no batch in epoch {epoch} (per process, over "
                f"{accelerator.num_processes} process(es)); check its size against the batch size and drop_last"
            )
        steps_per_epoch = math.ceil(n_batches / cfg.grad_accumulation_steps)
        if cfg.max_steps_per_epoch is not None:
            steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
        steps_in_epoch = math.ceil(batches_done / cfg.grad_accumulation_steps)
        _hook(task, "train_mode")()
        step_bar = tqdm(total=steps_per_epoch, initial=steps_in_epoch, desc=f"epoch {epoch}", unit="step",
                        leave=False, disable=not (is_main and cfg.progress))
        stop = False
        if steps_in_epoch < steps_per_epoch:
            iterator = iter(batches)
            for batch in iterator:
                lr = lr_at(cfg, epoch, global_step, steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        out = _check_step_output(task.training_step(batch), task, epoch, global_step)
                    accelerator.backward(out["loss"])
                    if accelerator.sync_gradients:
                        _average_gradients(params, accelerator)
                        if cfg.max_grad_norm is not None:
                            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()  # a no-op on micro-batches that only accumulate
                    optimizer.zero_grad(set_to_none=True)
                batches_done += 1
                window.add(out)
                epoch_means.add(out)
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                steps_in_epoch += 1
                step_bar.update(1)
                if global_step % cfg.log_every == 0:
                    means = window.reduced_means(accelerator)
                    window.reset()
                    _check_finite(means, epoch, global_step)
                    log.append({"kind": "train", "epoch": epoch, "step": global_step, "lr": lr, **means,
                                "time": round(elapsed(), 3)})
                    step_bar.set_postfix(loss=f"{means['loss']:.4g}", lr=f"{lr:.3g}")
                if cfg.time_budget_s is not None:
                    stop = _agreed(accelerator, time.monotonic() - t_start > cfg.time_budget_s)
                if stop or steps_in_epoch >= steps_per_epoch:
                    break
            # We may leave before the loader's own end: close it and unregister it from Accelerate's state.
            iterator.close()
            if batches in accelerator.gradient_state.dataloader_references:
                batches.end()
        step_bar.close()
        if stop and steps_in_epoch < steps_per_epoch:
            status = "time_budget"
            save_last(epoch, batches_done)
            break
        # ---- end of epoch ----
        means = epoch_means.reduced_means(accelerator)
        _check_finite(means, epoch, global_step)
        lr_epoch = lr_at(cfg, epoch, max(global_step - 1, 0), steps_per_epoch)
        log.append({"kind": "epoch", "epoch": epoch, "step": global_step, "lr": lr_epoch, **means,
                    "time": round(elapsed(), 3)})
        if _validation_due(cfg, epoch):
            metrics = _run_validation(task, accelerator)
            selection = float(task.selection_metric(metrics))
            improved = best_metric is None or selection > best_metric
            if improved:
                best_metric, best_epoch, best_metrics = selection, epoch, metrics
            last_val = metrics
            log.append({"kind": "val", "epoch": epoch, "step": global_step, "lr": lr_epoch,
                        **{f"val/{k}": v for k, v in metrics.items()}, "selection": selection,
                        "is_best": improved, "time": round(elapsed(), 3)})
            if is_main and cfg.progress:
                shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
                tqdm.write(f"epoch {epoch}: {shown} | selection={selection:.4g}{' (best)' if improved else ''}")
            if improved:
                if is_main:
                    _write_checkpoint(ckpt_root / "best", model, task, {
                        "format": CHECKPOINT_FORMAT, "epoch": epoch, "epochs_completed": epoch + 1,
                        "global_step": global_step, "selection_metric": selection, "val_metrics": metrics,
                        "config": cfg.to_dict(),
                    }, None)
                accelerator.wait_for_everyone()
        batches_done = 0
        save_last(epoch + 1, 0)
        epoch_bar.update(1)
        if stop and epoch + 1 < cfg.epochs:  # the budget ran out on an epoch's last step: complete and saved
            status = "time_budget"
            break
    epoch_bar.close()

    final = json.loads((ckpt_root / "last" / "info.json").read_text())
    if status == "finished":
        if is_main:
            _write_text_atomic(done_path, json.dumps(final, indent=2))
        accelerator.wait_for_everyone()
    return _result(run_dir, status, final, info_rt)


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
    saved = _rng_state()
    _hook(task, "eval_mode")()
    try:
        with torch.no_grad():
            metrics = task.validate()
    finally:
        _set_rng_state(saved)
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


def _write_checkpoint(final: Path, model: nn.Module, task: Any, info: dict[str, Any],
                      state: dict[str, Any] | None) -> None:
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if state is not None:
        torch.save(state, tmp / "state.pt")
    (tmp / "info.json").write_text(json.dumps(info, indent=2))
    _hook(task, "save_extra_files")(tmp)
    _swap_dir(tmp, final)


def _result(run_dir: Path, status: str, info: dict[str, Any], rt: RuntimeInfo | None) -> FitResult:
    return FitResult(
        run_dir=run_dir, status=status, epochs_completed=info["epochs_completed"], global_step=info["global_step"],
        best_metric=info["best_metric"], best_epoch=info["best_epoch"], best_metrics=info.get("best_metrics"),
        last_val_metrics=dict(info.get("last_val_metrics", {})), elapsed_s=float(info["elapsed_s"]), runtime=rt,
    )
