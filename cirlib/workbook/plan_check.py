"""Check a plan of steps before the first one runs: each step's settings against the TrainConfig it makes and the
dataset it runs on, and a stage II against the first stage it reads (`factories.check_stage2_fits`), so that
`python -m cirlib.launch all` (or a batch) refuses `--set k=16` on FashionIQ, or the dual re-ranker over SPRC, before
stage I trains, not after it.

The dataset of a step that reads a run folder (top-k extraction, evaluation, submission) is the one the plan's own
training step of that run uses, or, when the plan does not train it, the finished run's saved config; when neither
exists yet the step checks itself when it runs.
"""
from __future__ import annotations

from typing import Any, Sequence

from cirlib.run_folder import RunFolder
from cirlib.workbook import steps
from cirlib.workbook.published import resolve_run
from cirlib.workbook.config import EvaluateConfig, Stage1Config, Stage2TrainConfig, SubmissionConfig, TopKConfig
from cirlib.workbook.evaluation import refuse_unsupported
from cirlib.workbook.factories import check_stage2_fits


class PlanError(ValueError):
    """A step of the plan would be refused when it runs (the message names the step, the fields and why)."""


def _saved(run: RunFolder) -> dict[str, Any] | None:
    return run.saved_config() if run.config_file.is_file() else None


def _dataset_of(cfg: Any, planned: dict[tuple[str, str], Any]) -> tuple[str, str] | None:
    """(dataset, categories) a step runs on, from the plan's training step of its run or the run's saved config."""
    if isinstance(cfg, (Stage1Config, Stage2TrainConfig)):
        return cfg.dataset, cfg.categories
    key = ("stage1", cfg.stage1_run) if isinstance(cfg, TopKConfig) else ("stage2", cfg.stage2_run)
    source = planned.get(key)
    if source is None:
        source = _saved(resolve_run(key[0], key[1], cfg.outputs))
        return None if source is None else (source["dataset"], source.get("categories", ""))
    return source.dataset, source.categories


def check_plan(configs: Sequence[Any]) -> None:
    """Raise PlanError naming every step whose settings would be refused when it runs.

    Args:
        configs: the step configs in the order they will run (a training step's must also make a valid TrainConfig).
    """
    planned: dict[tuple[str, str], Any] = {}
    problems = []
    for cfg in configs:
        if isinstance(cfg, Stage1Config):
            planned[("stage1", cfg.stage1_run)] = cfg
        elif isinstance(cfg, Stage2TrainConfig):
            planned[("stage2", cfg.stage2_run)] = cfg
        try:
            if isinstance(cfg, Stage1Config) and cfg.epochs > 0:
                steps._stage1_train_config(cfg)
            elif isinstance(cfg, Stage2TrainConfig) and cfg.epochs > 0:
                steps._train_config(cfg)
            if isinstance(cfg, Stage2TrainConfig):
                check_stage2_fits(cfg, planned.get(("stage1", cfg.stage1_run)))
            if isinstance(cfg, (TopKConfig, Stage2TrainConfig, EvaluateConfig, SubmissionConfig)):
                found = _dataset_of(cfg, planned)
                if found is not None:
                    refuse_unsupported(cfg, *found)
        except ValueError as err:
            problems.append(f"{type(cfg).__name__}: {err}")
    if problems:
        raise PlanError("refused before any step ran: " + "; ".join(problems))
