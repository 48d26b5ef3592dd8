"""Run pipeline steps from a YAML parameters file, on one process or data-parallel over several (GPUs, nodes).

    python -m cirlib.launch STEPS PARAMS.yaml [--set key=value ...] [--cpu] [--outputs DIR]
    torchrun --nproc_per_node 8 -m cirlib.launch STEPS PARAMS.yaml ...
    accelerate launch --multi_gpu --num_processes 8 -m cirlib.launch STEPS PARAMS.yaml ...

STEPS is one step or several, comma-separated, run in the order given:

    train-stage1   notebook 01: steps.train_stage1   (Stage1Config)
    topk           notebook 02: steps.extract_topk   (TopKConfig)
    train-stage2   notebook 03: steps.train_stage2   (Stage2TrainConfig)
    evaluate       notebook 04: steps.evaluate       (EvaluateConfig)
    submit         notebook 05: steps.submit_cirr    (SubmissionConfig; CIRR only)
    all            train-stage1,topk,train-stage2,evaluate

Each step's config is built from `cirlib.workbook.config` and the YAML alone (no notebook files, no papermill): the
top-level keys that are fields of the config, then the `notebooks:` section of its notebook, then the --set
overrides (values read as YAML: 3, 2.0e-5, true, "text"); `cirlib.batch` uses the same function, so a YAML means
the same run in both runners. --outputs sets the configs' `outputs` field (the root of the run folders).

With several processes each one trains on its share of every global batch (batch_size is per process; the global
batch is processes x batch_size), evaluation is sharded and gathered, and only the main process (rank 0) prints and
writes files. Outputs must lie on a filesystem every node sees.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from cirlib import distributed as dist
from cirlib.run import batch
from cirlib.workbook.config import CONFIGS, NOTEBOOK_CONFIGS
from cirlib.workbook.plan_check import PlanError, check_plan


@dataclasses.dataclass(frozen=True)
class Step:
    notebook: str  # the notebook the step stands for (its config: NOTEBOOK_CONFIGS; its `notebooks:` YAML section)
    call: str  # the cirlib.workbook.steps function it runs
    inputs: str  # inputs.check_inputs step name


STEPS: dict[str, Step] = {
    "train-stage1": Step("01_stage1_train", "train_stage1", "train_stage1"),
    "topk": Step("02_stage1_topk", "extract_topk", "extract_topk"),
    "train-stage2": Step("03_stage2_train", "train_stage2", "train_stage2"),
    "evaluate": Step("04_stage2_evaluate", "evaluate", "evaluate"),
    "submit": Step("05_cirr_submission", "submit_cirr", "submit_cirr"),
}
ALL = ("train-stage1", "topk", "train-stage2", "evaluate")


class LaunchError(ValueError):
    """Bad steps, parameters or overrides (named in the message)."""


def parse_steps(text: str) -> list[str]:
    """'all' or comma-separated step names -> the steps in order."""
    steps: list[str] = []
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        names = ALL if token == "all" else (token,)
        for name in names:
            if name not in STEPS:
                raise LaunchError(f"unknown step {name!r}: one of {', '.join([*STEPS, 'all'])}")
            steps.append(name)
    if not steps:
        raise LaunchError("no step given")
    return steps


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """['key=value', ...] -> {key: YAML value of value}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LaunchError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return out


def step_configs(params: Mapping[str, Any], steps: Sequence[str], overrides: Mapping[str, Any],
                 outputs: str | None = None) -> list[Any]:
    """The config object of each step, from the config classes and the YAML (as `cirlib.batch` plans it).

    Args:
        params: the YAML mapping (as `cirlib.batch` reads it).
        steps: step names (see STEPS).
        overrides: --set values; each key must be a field of at least one step's config and replaces it there.
        outputs: the run folders' root (--outputs), set as the `outputs` field of every config that has one.
    """
    try:
        batch.check_known(params, {f for cls in CONFIGS for f in batch.config_fields(cls)}, "cirlib.workbook.config")
        batch.check_renamed(list(overrides), "--set")
        sections = batch.sections_of(params, list(NOTEBOOK_CONFIGS))
        configs, used = [], set()
        for name in steps:
            stem = STEPS[name].notebook
            cls = NOTEBOOK_CONFIGS[stem]
            declared = batch.config_fields(cls)
            used |= {k for k in overrides if k in declared}
            chosen = batch.step_parameters(params, sections, stem, declared, overrides)
            if outputs is not None and "outputs" in declared:
                chosen["outputs"] = str(outputs)
            configs.append(cls(**chosen))
    except TypeError as e:  # a value of the wrong kind for a field
        raise LaunchError(str(e)) from e
    except batch.BatchError as e:
        raise LaunchError(str(e)) from e
    unused = sorted(set(overrides) - used)
    if unused:
        raise LaunchError(f"--set {unused}: not a parameter of the steps {list(steps)}")
    return configs


def _report(name: str, result: Any) -> dict[str, Any]:
    if name in ("train-stage1", "train-stage2"):
        return {"run_dir": str(result.run_dir), "reused": result.reused, "seconds": round(result.seconds, 1),
                "metrics": result.metrics}
    if name == "topk":
        return {"candidate_recall": result.to_dict(orient="records")}
    if name == "evaluate":
        return {"run_dir": str(result.run_dir), "k": result.k, "stage1": result.stage1, "stage2": result.stage2}
    return {"files": {k: str(v) for k, v in result.items()}}


def run_steps(steps: Sequence[str], configs: Sequence[Any], out: Callable[[str], None] = print) -> list[Any]:
    """Run the steps in order (every process calls this); the main process reports one JSON line per step."""
    from cirlib.data import get_dataset
    from cirlib.workbook import inputs
    from cirlib.workbook import steps as steps_module

    results = []
    for name, cfg in zip(steps, configs):
        if name == "submit" and not get_dataset(steps_module.trained_config(cfg).dataset).has_test_server:
            if dist.is_main_process():
                out(json.dumps({"step": name, "skipped": f"stage-II run {cfg.stage2_run!r} is not on CIRR: test "
                                                          "submissions exist for CIRR only"}))
            results.append(None)
            continue
        inputs.check_inputs(cfg, STEPS[name].inputs)
        result = getattr(steps_module, STEPS[name].call)(cfg)
        if dist.is_main_process():
            out(json.dumps({"step": name, "processes": dist.world_size(), **_report(name, result)},
                           default=str, sort_keys=True))
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("steps", help=f"comma-separated steps: {', '.join(STEPS)}, or all")
    parser.add_argument("params", type=Path, help="YAML parameters file (the one cirlib.batch reads)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter of the steps' configs (repeatable)")
    parser.add_argument("--cpu", action="store_true",
                        help="run on the CPU (gloo between processes) even where CUDA is available")
    parser.add_argument("--outputs", type=Path, default=None,
                        help="run folders under this folder instead of <repo>/outputs (e.g. shared scratch space; "
                             "relative to the repository)")
    args = parser.parse_args(argv)
    try:
        steps = parse_steps(args.steps)
        params, _ = batch.load_params(args.params)
        overrides = parse_overrides(args.overrides)
        dist.init_process_group(cpu=args.cpu)  # before anything else creates Accelerate's state
        # a relative folder is anchored at the repository, as every cirlib path (RunFolder.of)
        configs = step_configs(params, steps, overrides, None if args.outputs is None else str(args.outputs))
        check_plan(configs)  # every step's settings, before the first step runs
    except (LaunchError, batch.BatchError, PlanError) as e:
        print(f"launch failed: {e}", file=sys.stderr)
        return 2
    run_steps(steps, configs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
