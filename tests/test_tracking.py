"""Experiment tracking: `fit` sends its training log's records to Accelerate's trackers (TensorBoard by default), read
back here with TensorBoard's own event reader, on the toy task of tests/test_train_loop.py (seconds, CPU)."""
from __future__ import annotations

import sys

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cirlib.train.loop import TrainConfig, fit, parse_trackers, read_metrics, require_trackers
from cirlib.workbook import steps
from cirlib.workbook.config import NOT_IDENTITY, Stage1Config, Stage2TrainConfig, identity
from test_train_loop import ToyTask, _cfg

# What each training-log record kind puts on which TensorBoard tag (the toy task's step also returns "mae").
TAGS = {
    "train": {"train/loss": "loss", "train/lr": "lr", "train/mae": "mae"},
    "epoch": {"epoch/loss": "loss", "epoch/lr": "lr", "epoch/mae": "mae"},
    "val": {"val/mse": "val/mse", "val/score": "val/score", "val/selection": "selection"},
}


def _event_files(run):
    return sorted((run / "tensorboard").glob("events.out.tfevents.*"))


def _scalars(run) -> dict[str, list[tuple[int, float]]]:
    """Every scalar curve of the run's tensorboard/ folder, all its event files merged as TensorBoard does."""
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _expected(records) -> dict[str, list[tuple[int, float]]]:
    """The same curves from metrics.jsonl."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for tag, key in TAGS[r["kind"]].items():
            out.setdefault(tag, []).append((r["step"], r[key]))
    return out


def _assert_curves_equal(got, want) -> None:
    assert sorted(got) == sorted(want)
    for tag in want:
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], tag
        # TensorBoard keeps scalars as float32
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in want[tag]], rel=1e-6), tag


def test_fit_writes_tensorboard_curves_equal_to_the_training_log(tmp_path):
    run = tmp_path / "run"
    fit(ToyTask(), _cfg(epochs=3, max_epoch=3), run)
    records = read_metrics(run)
    assert {r["kind"] for r in records} == {"train", "epoch", "val"}
    assert len(_event_files(run)) == 1  # in <run>/tensorboard/ itself, not a per-project subfolder
    curves = _scalars(run)
    _assert_curves_equal(curves, _expected(records))
    # at global optimizer steps: 64 items / batch 8 = 8 steps per epoch, a train record every 2 (log_every)
    assert [s for s, _ in curves["epoch/loss"]] == [8, 16, 24] == [s for s, _ in curves["val/mse"]]
    assert [s for s, _ in curves["train/loss"]] == list(range(2, 25, 2))
    # the run's settings as hyper-parameters (Accelerate also writes them as hparams.yml beside the events)
    (hparams,) = (run / "tensorboard").glob("*/hparams.yml")
    saved = yaml.safe_load(hparams.read_text())
    assert saved["train/lr"] == 5e-2 and saved["train/epochs"] == 3 and saved["train/max_grad_norm"] == "none"
    assert saved["train/betas"] == "[0.9, 0.999]" and saved["train/trackers"] == "tensorboard"


def test_run_settings_file_is_part_of_the_hyper_parameters(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"preset": "tiny", "nested": {"k": 5}}')  # what the workbook's steps write
    fit(ToyTask(), _cfg(epochs=1, max_epoch=1), run)
    (hparams,) = (run / "tensorboard").glob("*/hparams.yml")
    saved = yaml.safe_load(hparams.read_text())
    assert saved["run/preset"] == "tiny" and saved["run/nested/k"] == 5


def test_trackers_none_writes_no_event_file(tmp_path):
    run = tmp_path / "run"
    fit(ToyTask(), _cfg(epochs=2, trackers="none"), run)
    assert read_metrics(run)  # the training log is still written
    assert not (run / "tensorboard").exists()


@pytest.mark.slow
@pytest.mark.parametrize("resume", ["crash", "time_budget", "more_epochs", "tensorboard_chosen_later"])
def test_a_resumed_run_continues_the_same_curves(tmp_path, resume):
    straight = tmp_path / "straight"
    fit(ToyTask(), _cfg(epochs=4), straight)
    run = tmp_path / "resumed"
    if resume == "crash":  # dies in the middle of epoch 2, after logging steps past its last checkpoint (step 16)
        with pytest.raises(RuntimeError, match="simulated crash"):
            fit(ToyTask(fail_at_step=8 * 2 + 5), _cfg(epochs=4), run)
        assert max(s for s, _ in _scalars(run)["train/loss"]) == 20
        fit(ToyTask(), _cfg(epochs=4), run)
        files = 2
    elif resume == "time_budget":  # one optimizer step per call
        files = 1
        while fit(ToyTask(), _cfg(epochs=4, time_budget_s=1e-9), run).status == "time_budget":
            files += 1
    elif resume == "more_epochs":
        fit(ToyTask(), _cfg(epochs=2), run)
        fit(ToyTask(), _cfg(epochs=4), run)
        files = 2
    else:  # the first half logged to no tracker: TensorBoard is given the whole kept log
        fit(ToyTask(), _cfg(epochs=2, trackers="none"), run)
        fit(ToyTask(), _cfg(epochs=4), run)
        files = 1
    # one event file per call, merged by TensorBoard into the uninterrupted run's curves, at the same global steps
    assert len(_event_files(run)) == files
    _assert_curves_equal(_scalars(run), _scalars(straight))
    _assert_curves_equal(_scalars(run), _expected(read_metrics(run)))


def test_overwrite_restarts_the_curves(tmp_path):
    run = tmp_path / "run"
    fit(ToyTask(), _cfg(epochs=2), run)
    fit(ToyTask(seed=1), _cfg(epochs=2), run, overwrite=True)
    assert len(_event_files(run)) == 1
    _assert_curves_equal(_scalars(run), _expected(read_metrics(run)))


def test_tracker_names_are_checked():
    assert parse_trackers("tensorboard") == ("tensorboard",)
    assert parse_trackers(" tensorboard , wandb,tensorboard") == ("tensorboard", "wandb")
    assert parse_trackers("none") == ()
    for bad in ("tensorbored", "", "none,tensorboard", "comet"):
        with pytest.raises(ValueError, match="tracker"):
            TrainConfig(trackers=bad)
    assert TrainConfig(trackers="comet_ml").trackers == "comet_ml"  # names only: the package is fit's check


@pytest.mark.parametrize("tracker, extra", [("wandb", "wandb"), ("comet_ml", "comet")])
def test_an_uninstalled_tracker_is_refused_up_front_in_one_line(tmp_path, monkeypatch, tracker, extra):
    monkeypatch.setitem(sys.modules, tracker, None)  # not importable, whether or not it is installed here
    task = ToyTask()
    with pytest.raises(ImportError) as err:
        fit(task, _cfg(trackers=f"tensorboard,{tracker}"), tmp_path / "run")
    message = str(err.value)
    assert "\n" not in message and f"the {tracker} package" in message and f"pip install -e '.[{extra}]'" in message
    assert task.calls == 0 and not (tmp_path / "run").exists()  # before any training or file
    with pytest.raises(ImportError, match=rf"pip install -e '\.\[{extra}\]'"):
        require_trackers(tracker)


def test_stage_steps_refuse_an_uninstalled_tracker_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    outputs = str(tmp_path / "outputs")
    nowhere = str(tmp_path / "no-data")  # the data would fail next: the tracker is checked first
    with pytest.raises(ImportError, match=r"pip install -e '\.\[wandb\]'"):
        steps.train_stage1(Stage1Config(data_root=nowhere, preset="tiny", trackers="wandb", outputs=outputs))
    # how a run logs is not what it is: a finished run is reused whatever `trackers` says now
    assert "trackers" in NOT_IDENTITY and "trackers" not in identity(Stage2TrainConfig(trackers="wandb"))

