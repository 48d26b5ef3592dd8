"""The generic training loop (cirlib.train) and runtime helpers, on a toy regression task that trains in seconds."""
from __future__ import annotations

import csv
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cirlib.train.runtime import RuntimeInfo, resolve_precision, runtime_info, seed_everything
from cirlib.train.loop import (FitResult, Task, TrainConfig, checkpoint_dir, epoch_seed, fit, load_weights, lr_at,
                          read_metrics)


# ----------------------------------------------------------------------------------------------------------------------
# A toy task: y = x @ w + noise, an MLP with dropout (so exact resume needs the RNG state), validation = -MSE.
# ----------------------------------------------------------------------------------------------------------------------


class _Pairs(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


class ToyTask(Task):
    def __init__(self, n: int = 64, dim: int = 6, dropout: float = 0.2, seed: int = 0, val_scores=None,
                 fail_at_step: int | None = None, frozen_first: bool = False):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(dim, 1, generator=g)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ w + 0.05 * torch.randn(n, 1, generator=g)
        self.vx = torch.randn(32, dim, generator=g)
        self.vy = self.vx @ w
        torch.manual_seed(seed)
        # `net` is the plain module; during fit `model` may be wrapped (DDP), so only the forward goes through it.
        self.net = nn.Sequential(nn.Linear(dim, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 1))
        self.model = self.net
        self.val_scores = list(val_scores) if val_scores is not None else None  # scripted validation results
        self.fail_at_step = fail_at_step  # raise inside training_step on this call (simulated crash)
        self.frozen_first = frozen_first  # freeze the first Linear and keep it in eval mode
        if frozen_first:
            self.net[0].requires_grad_(False)
        self.calls = 0
        self.val_calls = 0
        self.modes: list[tuple[bool, bool]] = []  # (first layer training?, model training?) seen by training_step
        self.val_snapshots: list[dict[str, torch.Tensor]] = []

    def trainable_parameters(self):
        return [p for p in self.net.parameters() if p.requires_grad]

    def train_dataset(self) -> Dataset:
        return _Pairs(self.x, self.y)

    def train_mode(self) -> None:
        self.net.train()
        if self.frozen_first:
            self.net[0].eval()

    def training_step(self, batch):
        self.calls += 1
        if self.fail_at_step is not None and self.calls == self.fail_at_step:
            raise RuntimeError("simulated crash")
        self.modes.append((self.net[0].training, self.net.training))
        pred = self.model(batch["x"])  # (B, 1)
        loss = F.mse_loss(pred, batch["y"])
        return {"loss": loss, "mae": (pred - batch["y"]).abs().mean().detach()}

    def validate(self) -> dict[str, float]:
        self.val_calls += 1
        self.val_snapshots.append({k: v.detach().clone() for k, v in self.net.state_dict().items()})
        mse = F.mse_loss(self.net(self.vx), self.vy).item()
        score = self.val_scores.pop(0) if self.val_scores is not None else -mse
        return {"mse": mse, "score": score}

    def selection_metric(self, metrics: dict[str, float]) -> float:
        return metrics["score"]


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=4, batch_size=8, lr=5e-2, weight_decay=0.01, max_epoch=4, log_every=2, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _optimizer_state(run_dir) -> dict:
    return torch.load(checkpoint_dir(run_dir, "last") / "state.pt", weights_only=True)["optimizer"]


def _assert_same_optimizer(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for k in a["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k]), (i, k)


def _strip_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


# ----------------------------------------------------------------------------------------------------------------------
# runtime
# ----------------------------------------------------------------------------------------------------------------------


def test_seed_everything_reproduces_all_generators():
    seed_everything(123)
    a = (random.random(), np.random.rand(), torch.rand(3))
    seed_everything(123)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    with pytest.raises(ValueError, match="seed"):
        seed_everything(-1)


def test_resolve_precision_and_runtime_info():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("half", "cpu")
    info = runtime_info("cpu", "fp32")
    assert isinstance(info, RuntimeInfo)
    assert info.device == "cpu" and info.precision == "fp32" and info.torch_version == torch.__version__
    assert info.num_threads == torch.get_num_threads() and info.num_processes == 1
    assert json.loads(json.dumps(info.to_dict()))["precision"] == "fp32"


# ----------------------------------------------------------------------------------------------------------------------
# config and schedules
# ----------------------------------------------------------------------------------------------------------------------


def test_cosine_per_epoch_matches_original_and_rises_past_max_epoch():
    cfg = TrainConfig(lr=1.0, epochs=10, max_epoch=4, schedule="cosine_per_epoch")
    r2 = math.sqrt(2)
    expected = [1.0, (2 + r2) / 4, 0.5, (2 - r2) / 4, 0.0, (2 - r2) / 4, 0.5, (2 + r2) / 4, 1.0, (2 + r2) / 4]
    got = [lr_at(cfg, e, step=123, steps_per_epoch=7) for e in range(10)]  # step is ignored per epoch
    assert got == pytest.approx(expected, abs=1e-12)
    # min_lr shifts the floor: lr = min + 0.5*(lr0-min)*(1+cos)
    cfg_min = TrainConfig(lr=1.0, min_lr=0.2, epochs=4, max_epoch=4)
    assert lr_at(cfg_min, 2, 0, 1) == pytest.approx(0.6)
    assert lr_at(cfg_min, 4, 0, 1) == pytest.approx(0.2)


def test_cosine_per_epoch_clamped_stays_at_minimum():
    cfg = TrainConfig(lr=1.0, epochs=8, max_epoch=4, schedule="cosine_per_epoch_clamped")
    got = [lr_at(cfg, e, 0, 1) for e in range(8)]
    assert got[:5] == pytest.approx([1.0, (2 + math.sqrt(2)) / 4, 0.5, (2 - math.sqrt(2)) / 4, 0.0], abs=1e-12)
    assert got[5:] == [0.0, 0.0, 0.0]


def test_cosine_per_step_with_warmup():
    # 2 epochs x 5 steps = horizon 10 steps; 2 warm-up steps then cosine over the remaining 8.
    cfg = TrainConfig(lr=1.0, epochs=3, max_epoch=2, schedule="cosine_per_step", warmup_steps=2)
    got = [lr_at(cfg, s // 5, s, steps_per_epoch=5) for s in range(12)]
    assert got[0] == pytest.approx(0.5) and got[1] == pytest.approx(1.0)  # linear warm-up reaching lr0
    assert got[2] == pytest.approx(1.0)  # cosine starts at its top
    assert got[6] == pytest.approx(0.5)  # half-way through the 8 cosine steps
    assert all(a > b for a, b in zip(got[2:10], got[3:10]))  # strictly decreasing
    assert got[10:] == [0.0, 0.0]  # held at min_lr past the horizon
    cfg_ep = TrainConfig(lr=1.0, epochs=3, max_epoch=2, schedule="cosine_per_step", warmup_epochs=1)
    assert [lr_at(cfg_ep, 0, s, 4) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_train_config_validation_and_roundtrip():
    with pytest.raises(ValueError, match="warm-up is only defined"):
        TrainConfig(schedule="cosine_per_epoch", warmup_steps=3)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(schedule="cosine_per_step", warmup_steps=1, warmup_epochs=1)
    with pytest.raises(ValueError, match="grad_accumulation_steps"):
        TrainConfig(grad_accumulation_steps=0)
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"epochs": 2, "lr0": 1.0})
    cfg = TrainConfig(epochs=3, betas=[0.8, 0.9], max_grad_norm=1.0)
    assert cfg.betas == (0.8, 0.9)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ----------------------------------------------------------------------------------------------------------------------
# fit: training, logs, checkpoints
# ----------------------------------------------------------------------------------------------------------------------


def test_fit_trains_logs_and_applies_schedule(tmp_path):
    task = ToyTask()
    cfg = _cfg(epochs=6, max_epoch=4)  # past max_epoch the original cosine rises again
    result = fit(task, cfg, tmp_path / "run")
    assert isinstance(result, FitResult) and result.status == "finished"
    assert result.epochs_completed == 6 and result.global_step == 6 * 8  # 64 items / batch 8
    assert result.runtime is not None and result.runtime.precision == "fp32"

    records = read_metrics(tmp_path / "run")
    epochs = [r for r in records if r["kind"] == "epoch"]
    trains = [r for r in records if r["kind"] == "train"]
    vals = [r for r in records if r["kind"] == "val"]
    assert [r["epoch"] for r in epochs] == list(range(6)) and len(vals) == 6
    assert len(trains) == 6 * 8 // 2  # log_every=2
    for r in records:
        assert {"kind", "epoch", "step", "lr", "time"} <= r.keys()
    for r in trains + epochs:
        assert {"loss", "mae"} <= r.keys() and math.isfinite(r["loss"])
    assert {"val/mse", "val/score", "selection", "is_best"} <= vals[0].keys()
    # The lr each epoch actually used is the schedule's value, including the rise at epoch 5.
    assert [r["lr"] for r in epochs] == pytest.approx([lr_at(cfg, e, 0, 8) for e in range(6)])
    assert epochs[5]["lr"] > epochs[4]["lr"] == pytest.approx(0.0)
    # Loss decreases.
    assert epochs[-1]["loss"] < 0.5 * epochs[0]["loss"]
    assert vals[-1]["val/mse"] < vals[0]["val/mse"]

    # The CSV mirrors the JSONL: same rows, header covering every field.
    with (tmp_path / "run" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records)
    assert {"kind", "epoch", "step", "lr", "loss", "time", "mae", "val/mse", "selection"} <= set(rows[0])
    assert [row["kind"] for row in rows] == [r["kind"] for r in records]
    assert float(rows[-1]["val/mse"]) == pytest.approx(vals[-1]["val/mse"])
    # The last checkpoint records the run as finished: every epoch trained and validated, the whole log covered.
    info = json.loads((checkpoint_dir(tmp_path / "run", "last") / "info.json").read_text())
    assert info["epochs_completed"] == 6 and info["pending_validation"] is None
    assert info["metrics_records"] == len(records)
    # The model left in the task holds the final weights, which are also the last checkpoint's.
    last_weights = load_file(str(checkpoint_dir(tmp_path / "run", "last") / "model.safetensors"))
    _assert_same_state(_weights(task.model), last_weights)


def test_checkpoint_files_are_safetensors_and_weights_only(tmp_path):
    task = ToyTask()
    fit(task, _cfg(epochs=2), tmp_path / "run")
    last = checkpoint_dir(tmp_path / "run", "last")
    assert {p.name for p in last.iterdir()} == {"model.safetensors", "state.pt", "info.json"}
    with safe_open(str(last / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(task.model.state_dict())
    state = torch.load(last / "state.pt", weights_only=True)
    assert state["epochs_completed"] == 2 and state["batches_done"] == 0 and state["global_step"] == 16
    assert {"optimizer", "scaler", "processes", "task"} <= state.keys()
    rng = state["processes"][0]["rng"]
    assert {"python", "numpy", "torch", "cuda"} <= rng.keys()
    assert len(state["optimizer"]["state"]) == len(list(task.model.parameters()))
    info = json.loads((last / "info.json").read_text())
    assert info["config"]["epochs"] == 2 and info["epochs_completed"] == 2 and info["global_step"] == 16
    assert {"best_metric", "best_epoch", "last_val_metrics", "metrics_records", "pending_validation"} <= info.keys()
    # No temporary or displaced folders are left behind by the atomic swap.
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["best", "last"]


def test_best_checkpoint_follows_selection_metric(tmp_path):
    task = ToyTask(val_scores=[0.1, 0.5, 0.3, 0.7, 0.2])
    result = fit(task, _cfg(epochs=5, max_epoch=5), tmp_path / "run")
    assert result.best_epoch == 3 and result.best_metric == pytest.approx(0.7)
    best = checkpoint_dir(tmp_path / "run", "best")
    assert result.best_checkpoint == best
    info = json.loads((best / "info.json").read_text())
    assert info["epoch"] == 3 and info["selection_metric"] == pytest.approx(0.7)
    # The best folder holds the weights validated at epoch 3, not the final ones.
    _assert_same_state(load_file(str(best / "model.safetensors")), task.val_snapshots[3])
    assert not torch.equal(task.val_snapshots[3]["0.weight"], task.model.state_dict()["0.weight"])
    vals = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "val"]
    assert [r["is_best"] for r in vals] == [True, True, False, True, False]
    fresh = ToyTask()
    load_weights(fresh.model, best)
    _assert_same_state(_weights(fresh.model), task.val_snapshots[3])
    assert result.best_metrics == {"mse": pytest.approx(result.best_metrics["mse"]), "score": pytest.approx(0.7)}
    other = ToyTask(seed=5)
    assert result.load_best_into(other.model) == best
    _assert_same_state(_weights(other.model), task.val_snapshots[3])


def test_validate_every_and_final_epoch(tmp_path):
    task = ToyTask()
    fit(task, _cfg(epochs=5, max_epoch=5, validate_every=2), tmp_path / "run")
    vals = [r["epoch"] for r in read_metrics(tmp_path / "run") if r["kind"] == "val"]
    assert vals == [1, 3, 4]  # every 2nd epoch, plus the last


def test_frozen_modules_keep_task_mode_and_values(tmp_path):
    task = ToyTask(frozen_first=True, val_scores=[0.0, 0.0, 0.0])
    frozen_before = task.model[0].weight.detach().clone()
    fit(task, _cfg(epochs=3, max_epoch=3), tmp_path / "run")
    # training_step saw the frozen layer in eval mode and the rest in train mode, also after each validation.
    assert len(task.modes) == 3 * 8 and set(task.modes) == {(False, True)}
    assert torch.equal(task.model[0].weight, frozen_before)
    assert len(_optimizer_state(tmp_path / "run")["state"]) == 2  # only the last Linear's weight and bias


def test_max_steps_per_epoch(tmp_path):
    task = ToyTask()
    result = fit(task, _cfg(epochs=2, max_steps_per_epoch=3), tmp_path / "run")
    assert result.global_step == 6 and task.calls == 6


# ----------------------------------------------------------------------------------------------------------------------
# resume, reuse, overwrite
# ----------------------------------------------------------------------------------------------------------------------


def test_resume_after_epochs_is_bit_identical(tmp_path):
    straight = ToyTask()
    fit(straight, _cfg(epochs=4), tmp_path / "straight")

    first = ToyTask()
    r1 = fit(first, _cfg(epochs=2), tmp_path / "split")
    assert r1.status == "finished" and r1.epochs_completed == 2
    torch.manual_seed(999)  # a new process would have different global RNG state; resume must restore its own
    second = ToyTask()
    r2 = fit(second, _cfg(epochs=4), tmp_path / "split")
    assert r2.status == "finished" and r2.epochs_completed == 4 and r2.global_step == 32
    assert second.calls == 16  # only epochs 2 and 3 were trained
    assert json.loads((checkpoint_dir(tmp_path / "split", "last") / "info.json").read_text())["epochs_completed"] == 4

    _assert_same_state(_weights(second.model), _weights(straight.model))
    _assert_same_optimizer(_optimizer_state(tmp_path / "split"), _optimizer_state(tmp_path / "straight"))
    assert _strip_time(read_metrics(tmp_path / "split")) == _strip_time(read_metrics(tmp_path / "straight"))


def test_resume_after_simulated_crash_is_bit_identical(tmp_path):
    straight = ToyTask()
    fit(straight, _cfg(epochs=4), tmp_path / "straight")

    crashing = ToyTask(fail_at_step=8 * 2 + 5)  # dies in the middle of epoch 2 (0-based)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(crashing, _cfg(epochs=4), tmp_path / "crash")
    info = json.loads((checkpoint_dir(tmp_path / "crash", "last") / "info.json").read_text())
    assert info["epochs_completed"] == 2
    resumed = ToyTask()
    fit(resumed, _cfg(epochs=4), tmp_path / "crash")
    _assert_same_state(_weights(resumed.model), _weights(straight.model))
    _assert_same_optimizer(_optimizer_state(tmp_path / "crash"), _optimizer_state(tmp_path / "straight"))
    # Log lines written after the last checkpoint by the crashed run are dropped, not duplicated.
    assert _strip_time(read_metrics(tmp_path / "crash")) == _strip_time(read_metrics(tmp_path / "straight"))


@pytest.mark.slow
def test_time_budget_stops_and_resumes_mid_epoch_exactly(tmp_path):
    straight = ToyTask()
    fit(straight, _cfg(epochs=3, max_epoch=3, grad_accumulation_steps=2), tmp_path / "straight")

    run = tmp_path / "budget"
    task = ToyTask()
    result = fit(task, _cfg(epochs=3, max_epoch=3, grad_accumulation_steps=2, time_budget_s=1e-9), run)
    assert result.status == "time_budget" and result.global_step == 1 and task.calls == 2  # one optimizer step
    state = torch.load(checkpoint_dir(run, "last") / "state.pt", weights_only=True)
    assert state["epochs_completed"] == 0 and state["batches_done"] == 2
    calls = 1
    while result.status == "time_budget":
        task = ToyTask()
        result = fit(task, _cfg(epochs=3, max_epoch=3, grad_accumulation_steps=2, time_budget_s=1e-9), run)
        calls += 1
        assert calls < 50
    assert result.status == "finished" and result.global_step == 3 * 4
    _assert_same_state(_weights(task.model), _weights(straight.model))
    _assert_same_optimizer(_optimizer_state(run), _optimizer_state(tmp_path / "straight"))
    assert _strip_time(read_metrics(run)) == _strip_time(read_metrics(tmp_path / "straight"))


def test_finished_run_is_reused_unless_overwrite(tmp_path):
    run = tmp_path / "run"
    trained = ToyTask()
    fit(trained, _cfg(epochs=2), run)
    n_records = len(read_metrics(run))

    again = ToyTask()
    result = fit(again, _cfg(epochs=2), run)
    assert result.status == "reused" and again.calls == 0 and again.val_calls == 0
    assert result.epochs_completed == 2 and result.best_metric is not None
    _assert_same_state(_weights(again.model), _weights(trained.model))  # final weights loaded into the task
    assert len(read_metrics(run)) == n_records

    redo = ToyTask(seed=1)
    result = fit(redo, _cfg(epochs=2), run, overwrite=True)
    assert result.status == "finished" and redo.calls == 16
    assert len(read_metrics(run)) == n_records  # restarted log, not appended
    _assert_same_state(_weights(redo.model), load_file(str(checkpoint_dir(run, "last") / "model.safetensors")))


def test_refuses_to_clobber_or_mix_configs(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(ToyTask(fail_at_step=12), _cfg(epochs=3), run)
    with pytest.raises(FileExistsError, match="resume=True"):
        fit(ToyTask(), _cfg(epochs=3), run, resume=False)
    with pytest.raises(ValueError, match="lr"):
        fit(ToyTask(), _cfg(epochs=3, lr=0.5), run)
    with pytest.raises(ValueError, match="cosine horizon"):
        fit(ToyTask(), _cfg(epochs=3, max_epoch=None), run)


def test_max_epoch_counts_as_the_horizon_it_gives(tmp_path):
    """A run with max_epoch=None (horizon = epochs) is extended by naming its horizon, as the refusal says."""
    run = tmp_path / "run"
    fit(ToyTask(), _cfg(epochs=2, max_epoch=None), run)
    with pytest.raises(ValueError, match=r"set max_epoch=2 to extend it"):
        fit(ToyTask(), _cfg(epochs=3, max_epoch=None), run)
    assert fit(ToyTask(), _cfg(epochs=3, max_epoch=2, schedule="cosine_per_epoch"), run).epochs_completed == 3


@pytest.mark.parametrize("schedule", ["cosine_per_step", "cosine_per_epoch_clamped"])
def test_extending_a_schedule_that_ended_at_lr_0_is_refused_up_front(tmp_path, schedule):
    from cirlib.train.loop import refuse_other_config

    run = tmp_path / "run"
    fit(ToyTask(), _cfg(epochs=1, max_epoch=1, schedule=schedule), run)
    task = ToyTask()
    for check in (lambda c: refuse_other_config(run, c), lambda c: fit(task, c, run)):
        with pytest.raises(ValueError, match=r"would train at lr 0.*init_checkpoint.*max_epoch=2"):
            check(_cfg(epochs=2, max_epoch=1, schedule=schedule))
    assert task.calls == 0
    with pytest.raises(ValueError, match=r"horizon \(max_epoch\): 1 epochs in the run vs 2 now.*init_checkpoint"):
        fit(task, _cfg(epochs=2, max_epoch=2, schedule=schedule), run)
    # the original's per-epoch cosine rises again past max_epoch: extending it trains
    fit(ToyTask(), _cfg(epochs=1, max_epoch=1), tmp_path / "orig")
    assert fit(ToyTask(), _cfg(epochs=2, max_epoch=1), tmp_path / "orig").epochs_completed == 2


def test_gradient_accumulation_matches_big_batch(tmp_path):
    big = ToyTask(dropout=0.0)
    fit(big, _cfg(epochs=2, batch_size=8, grad_accumulation_steps=1), tmp_path / "big")
    acc = ToyTask(dropout=0.0)
    res = fit(acc, _cfg(epochs=2, batch_size=4, grad_accumulation_steps=2), tmp_path / "acc")
    assert res.global_step == 16 and acc.calls == 32
    wa, wb = _weights(acc.model), _weights(big.model)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), (k, (wa[k] - wb[k]).abs().max())
    assert not torch.equal(wa["0.weight"], ToyTask(dropout=0.0).model.state_dict()["0.weight"])


def test_bad_task_outputs_give_clear_errors(tmp_path):
    class NoLoss(ToyTask):
        def training_step(self, batch):
            return {"mse": F.mse_loss(self.model(batch["x"]), batch["y"])}

    class NothingTrainable(ToyTask):
        def trainable_parameters(self):
            return []

    with pytest.raises(TypeError, match="'loss'"):
        fit(NoLoss(), _cfg(epochs=1), tmp_path / "a")
    with pytest.raises(ValueError, match="returned no parameters"):
        fit(NothingTrainable(), _cfg(epochs=1), tmp_path / "b")
    with pytest.raises(TypeError, match="not a training task"):
        fit(object(), _cfg(epochs=1), tmp_path / "c")
    with pytest.raises(ValueError, match="gives no batch"):
        fit(ToyTask(n=4), _cfg(epochs=1), tmp_path / "d")


def test_precision_switch_in_one_process_and_forward_left_unpatched(tmp_path):
    # A notebook may train one stage in bf16 and the next in fp32 in the same kernel.
    task = ToyTask()
    result = fit(task, _cfg(epochs=1, precision="bf16", max_steps_per_epoch=2, progress=True), tmp_path / "bf16")
    assert result.runtime.precision == "bf16" and result.global_step == 2
    assert task.model is task.net and task.model(task.vx).dtype == torch.float32  # no autocast left on forward
    assert task.net[0].weight.dtype == torch.float32  # master weights stay fp32
    result = fit(ToyTask(), _cfg(epochs=1, precision="fp32", max_steps_per_epoch=2), tmp_path / "fp32")
    assert result.runtime.precision == "fp32"


def test_worker_processes_do_not_change_the_trajectory(tmp_path):
    inline = ToyTask()
    fit(inline, _cfg(epochs=2, num_workers=0), tmp_path / "w0")
    workers = ToyTask()
    fit(workers, _cfg(epochs=2, num_workers=1), tmp_path / "w1")
    _assert_same_state(_weights(workers.model), _weights(inline.model))


# ----------------------------------------------------------------------------------------------------------------------
# A duck-typed task that builds its own loader (the train_loader(epoch_seed) mode), with per-epoch data randomness
# ----------------------------------------------------------------------------------------------------------------------


class _NoisyPairs(_Pairs):
    """Inputs jittered by noise drawn from (epoch, index), like a per-epoch caption shuffle."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        super().__init__(x, y)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 * self.epoch + i)
        return {"x": self.x[i] + 0.1 * torch.randn(self.x.shape[1:], generator=g), "y": self.y[i],
                "epoch": self.epoch}


class LoaderTask:
    """Not a Task subclass: fit must take it as it is (like cirlib.tasks), with an auxiliary module outside `model`."""

    def __init__(self):
        base = ToyTask()
        self.model, self.x, self.y, self.vx, self.vy = base.net, base.x, base.y, base.vx, base.vy
        self.aux = nn.Dropout(0.5)  # held outside `model`, e.g. a frozen stage-I model
        self.dataset = _NoisyPairs(self.x, self.y)
        self.seeds: list[int] = []
        self.epochs_in_batches: list[int] = []
        self.aux_training_in_validate: list[bool] = []

    def trainable_parameters(self):
        return list(self.model.parameters())

    def train_loader(self, seed: int) -> DataLoader:
        self.seeds.append(seed)
        g = torch.Generator().manual_seed(seed)
        return DataLoader(self.dataset, batch_size=8, shuffle=True, drop_last=True, generator=g)

    def train_mode(self) -> None:
        self.model.train()
        self.aux.train()

    def eval_mode(self) -> None:
        self.model.eval()
        self.aux.eval()

    def training_step(self, batch):
        self.epochs_in_batches += batch["epoch"].tolist()
        pred = self.model(self.aux(batch["x"]))
        return {"loss": F.mse_loss(pred, batch["y"])}

    def validate(self) -> dict[str, float]:
        self.aux_training_in_validate.append(self.aux.training)
        return {"neg_mse": -F.mse_loss(self.model(self.vx), self.vy).item()}

    def selection_metric(self, metrics: dict[str, float]) -> float:
        return metrics["neg_mse"]


@pytest.mark.slow
def test_task_built_loader_mode_resumes_exactly(tmp_path):
    cfg = _cfg(epochs=3, max_epoch=3)
    straight = LoaderTask()
    fit(straight, cfg, tmp_path / "straight")
    # One loader per epoch, seeded by (run seed, epoch); the dataset saw the true epoch, not Accelerate's count.
    assert straight.seeds == [epoch_seed(cfg.seed, e) for e in range(3)] and len(set(straight.seeds)) == 3
    assert sorted(set(straight.epochs_in_batches)) == [0, 1, 2]
    assert straight.aux_training_in_validate == [False, False, False]  # the task's eval_mode hook ran

    run = tmp_path / "budget"
    result = fit(LoaderTask(), _cfg(epochs=3, max_epoch=3, time_budget_s=1e-9), run)
    assert result.status == "time_budget" and result.global_step == 1
    for _ in range(40):
        task = LoaderTask()
        result = fit(task, _cfg(epochs=3, max_epoch=3, time_budget_s=1e-9), run)
        if result.status != "time_budget":
            break
    assert result.status == "finished" and result.global_step == 3 * 8
    _assert_same_state(_weights(task.model), _weights(straight.model))
    _assert_same_optimizer(_optimizer_state(run), _optimizer_state(tmp_path / "straight"))
    assert _strip_time(read_metrics(run)) == _strip_time(read_metrics(tmp_path / "straight"))


def test_a_task_that_batches_itself_must_batch_as_the_config_says(tmp_path):
    # LoaderTask batches 8 per step, drops the last batch, loads in the main process, as stage I and II tasks batch
    # with the workbook's batch_size and num_workers: a TrainConfig saying otherwise is refused before any training.
    with pytest.raises(ValueError, match=r"batch_size=8 in the loader vs 4.*drop_last=True in the loader vs False.*"
                                         r"num_workers=0 in the loader vs 2"):
        fit(LoaderTask(), _cfg(epochs=1, batch_size=4, drop_last=False, num_workers=2), tmp_path / "run")
    assert not checkpoint_dir(tmp_path / "run", "last").exists()
    recorded = fit(LoaderTask(), _cfg(epochs=1), tmp_path / "ok")
    assert recorded.status == "finished"


def test_task_must_define_one_data_source(tmp_path):
    class Both(LoaderTask):
        def train_dataset(self):
            return self.dataset

    with pytest.raises(TypeError, match="exactly one of train_loader"):
        fit(Both(), _cfg(epochs=1), tmp_path / "both")


# ----------------------------------------------------------------------------------------------------------------------
# Run files: validation after the save, damaged or unwritable files named, one writer per run folder
# ----------------------------------------------------------------------------------------------------------------------


class FailingValidationTask(ToyTask):
    """Validation raises on its `fail_at`-th call, like a validation image gone missing."""

    def __init__(self, fail_at: int, **kw):
        super().__init__(**kw)
        self.fail_at = fail_at

    def validate(self):
        if self.val_calls + 1 == self.fail_at:
            self.val_calls += 1
            raise FileNotFoundError("validation image missing: dev-123-0-img0.png")
        return super().validate()


def test_failing_validation_keeps_the_epoch_just_trained(tmp_path):
    cfg = _cfg(epochs=3, max_epoch=3)
    straight = ToyTask()
    straight_result = fit(straight, cfg, tmp_path / "straight")

    run = tmp_path / "run"
    failing = FailingValidationTask(fail_at=2)  # the validation after epoch 1 fails
    with pytest.raises(FileNotFoundError, match="validation image missing"):
        fit(failing, cfg, run)
    info = json.loads((checkpoint_dir(run, "last") / "info.json").read_text())
    assert info["epochs_completed"] == 2 and info["pending_validation"] == 1  # saved before validating
    resumed = ToyTask()
    result = fit(resumed, cfg, run)
    assert result.status == "finished"
    assert resumed.calls == 8 and resumed.val_calls == 2  # epoch 2 trained; the pending validation of epoch 1 ran
    _assert_same_state(_weights(resumed.model), _weights(straight.model))
    _assert_same_optimizer(_optimizer_state(run), _optimizer_state(tmp_path / "straight"))
    assert _strip_time(read_metrics(run)) == _strip_time(read_metrics(tmp_path / "straight"))
    assert (result.best_epoch, result.best_metric) == (straight_result.best_epoch, straight_result.best_metric)


@pytest.mark.parametrize("damaged", ["state.pt", "model.safetensors", "info.json"])
def test_damaged_checkpoint_file_is_named_with_what_to_do(tmp_path, damaged):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(ToyTask(fail_at_step=12), _cfg(epochs=3), run)
    path = checkpoint_dir(run, "last") / damaged
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])  # a crash or a full disk while it was written
    task = ToyTask()
    with pytest.raises(Exception) as caught:
        fit(task, _cfg(epochs=3), run)
    message = str(caught.value)
    assert str(path) in message and "overwrite=True" in message, message
    assert "delete" not in message, message  # deleting last/ alone leaves best/ and the log of the damaged run behind
    assert task.calls == 0
    from cirlib.train.checkpoints import CheckpointError

    assert isinstance(caught.value, CheckpointError)
    assert fit(ToyTask(), _cfg(epochs=3), run, overwrite=True).status == "finished"  # the advice works


def test_partial_last_log_line_after_a_crash_does_not_block_resume(tmp_path):
    straight = ToyTask()
    fit(straight, _cfg(epochs=4), tmp_path / "straight")
    run = tmp_path / "crash"
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(ToyTask(fail_at_step=8 * 2 + 5), _cfg(epochs=4), run)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "epoch": 2, "st')  # the crash cut the last line off
    resumed = ToyTask()
    fit(resumed, _cfg(epochs=4), run)
    _assert_same_state(_weights(resumed.model), _weights(straight.model))
    assert _strip_time(read_metrics(run)) == _strip_time(read_metrics(tmp_path / "straight"))


def test_disk_full_while_saving_a_checkpoint_names_the_file(tmp_path, monkeypatch):
    def disk_full(obj, f, *args, **kwargs):  # what torch raises when the disk fills up mid-write
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")

    monkeypatch.setattr(torch, "save", disk_full)
    run = tmp_path / "run"
    with pytest.raises(OSError, match="disk is full") as caught:
        fit(ToyTask(), _cfg(epochs=1), run)
    assert str(checkpoint_dir(run, "last") / "state.pt") in str(caught.value)
    from cirlib.paths import FileWriteError

    assert isinstance(caught.value, FileWriteError)
    assert not (run / "checkpoints").exists() or list((run / "checkpoints").iterdir()) == []  # nothing half-written


def test_unwritable_run_folder_is_refused_before_training(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    from cirlib.paths import FileWriteError

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    task = ToyTask()
    with pytest.raises(FileWriteError, match=str(blocker / "run")):
        fit(task, _cfg(epochs=1), blocker / "run")
    assert task.calls == 0

    # A read-only folder (simulated: tests run as root, where permissions do not stop writes).
    real_write_bytes = Path.write_bytes

    def read_only(self, data):
        if self.parent == tmp_path / "ro":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    with pytest.raises(FileWriteError, match="read-only") as caught:
        fit(task, _cfg(epochs=1), tmp_path / "ro")
    assert str(tmp_path / "ro") in str(caught.value) and task.calls == 0


def test_second_writer_of_a_run_folder_is_refused(tmp_path):
    import os

    from cirlib.run_folder import RunFolder, RunFolderError

    run = tmp_path / "run"
    task = ToyTask()
    with RunFolder.at(run).lock():  # another process training this run folder
        with pytest.raises(RunFolderError, match=rf"{run} is in use by another process \(pid {os.getpid()}\)"):
            fit(task, _cfg(epochs=1), run)
    assert task.calls == 0 and not (run / "metrics.jsonl").exists()
    assert fit(task, _cfg(epochs=1), run).status == "finished"
    with RunFolder.at(run).lock():  # fit let go of the lock when it returned
        pass
