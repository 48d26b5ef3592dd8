"""The training-log figure and table of notebooks 01 and 03."""
from __future__ import annotations

import json

import pytest

from cirlib.workbook.training_log import plot_training_log, read_training_log


def _log(run, records):
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


TRAIN = [{"kind": "train", "epoch": 0, "step": s, "loss": 2.0 - 0.1 * s, "lr": 1e-3} for s in range(1, 5)]
EPOCH = [{"kind": "epoch", "epoch": 0, "step": 4, "loss": 1.8, "lr": 1e-3}]


def test_no_empty_validation_panel_when_validation_is_off(tmp_path):
    _log(tmp_path / "r", TRAIN + EPOCH)
    fig = plot_training_log(tmp_path / "r")
    assert [ax.get_title() for ax in fig.axes] == ["loss", "learning rate"]


def test_validation_panel_when_there_are_validation_records(tmp_path):
    _log(tmp_path / "r", TRAIN + EPOCH + [{"kind": "val", "epoch": 0, "step": 4, "val/R@1": 12.5}])
    fig = plot_training_log(tmp_path / "r")
    assert [ax.get_title() for ax in fig.axes] == ["loss", "learning rate", "validation"]
    assert fig.axes[2].get_lines()[0].get_ydata().tolist() == [12.5]


def test_an_untrained_run_says_so(tmp_path):
    (tmp_path / "r").mkdir()
    fig = plot_training_log(tmp_path / "r")
    assert any("not trained" in t.get_text() for ax in fig.axes for t in ax.texts)


def test_a_broken_line_names_the_file(tmp_path):
    _log(tmp_path / "r", TRAIN)
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "tr\n{"kind": "train"}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 5"):
        read_training_log(tmp_path / "r")
