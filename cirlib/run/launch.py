"""Run pipeline steps from a YAML parameters file, on one process or data-parallel over several (GPUs, nodes).

    python -m cirlib.launch STEPS PARAMS.yaml [--set key=value ...] [--cpu] [--outputs DIR]
    torchrun --nproc_per_node 8 -m cirlib.launch STEPS PARAMS.yaml ...
    accelerate launch --multi_gpu --num_processes 8 -m cirlib.launch STEPS PARAMS.yaml ...

STEPS is one step or several, comma-separated, run in the order given:

    train-stage1   notebook 01: steps.train_stage1   (Stage1Config)
    topk           notebook 02: steps.extract_topk   (Stage1Config)
    train-stage2   notebook 03: steps.train_stage2   (Stage2Config)
    evaluate       notebook 04: steps.evaluate       (Stage2Config)
    submit         notebook 05: steps.submit_cirr    (Stage2Config; CIRR only)
    all            train-stage1,topk,train-stage2,evaluate

Each step receives exactly the parameters its notebook receives from `python -m cirlib.batch` with the same YAML
(top-level keys, run_name_stage1 / run_name_stage2, the `notebooks:` section of its notebook), then the --set
overrides (values read as YAML: 3, 2.0e-5, true, "text"). So a YAML means the same run in both runners.

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

from cirlib.run import batch
from cirlib import distributed as dist
from cirlib import paths


@dataclasses.dataclass(frozen=True)
class Step:
    notebook: str  # the notebook whose parameters the step receives
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


def step_configs(params: Mapping[str, Any], steps: Sequence[str], overrides: Mapping[str, Any]) -> list[Any]:
    """The config object of each step, built from what its notebook would receive, then the overrides.

    Args:
        params: the YAML mapping (as `cirlib.batch` reads it).
        steps: step names (see STEPS).
        overrides: --set values; run_name_stage1 / run_name_stage2 act at the top level, any other key must be a
            field of at least one step's config and replaces that field there.
    """
    top = dict(params)
    top.update({k: v for k, v in overrides.items() if k in batch.BATCH_KEYS})
    fields_ = {k: v for k, v in overrides.items() if k not in batch.BATCH_KEYS}
    notebooks = {p.stem: p for p in batch.notebook_paths()}
    missing = sorted({STEPS[n].notebook for n in steps} - set(notebooks))
    if missing:
        raise LaunchError(f"notebooks {missing} not found in {paths.NOTEBOOKS}")
    wanted = [notebooks[STEPS[n].notebook] for n in steps]
    plan = batch.plan_batch(top, list(dict.fromkeys(wanted)))
    configs, used = [], set()
    for nb in wanted:
        declared = batch.declared_parameters(nb)
        cls = batch.config_class(declared)
        if cls is None:
            raise LaunchError(f"{nb.name}: its parameters are not the fields of one cirlib.config class")
        chosen = dict(plan[nb])
        mine = {k: v for k, v in fields_.items() if k in declared}
        used |= mine.keys()
        chosen.update(mine)
        batch.check_types(nb, declared, chosen)
        configs.append(cls(**chosen))
    unused = sorted(set(fields_) - used)
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
    from cirlib.workbook import inputs
    from cirlib.workbook import steps as steps_module

    results = []
    for name, cfg in zip(steps, configs):
        if name == "submit" and cfg.dataset != "cirr":
            if dist.is_main_process():
                out(json.dumps({"step": name, "skipped": f"dataset={cfg.dataset!r}: test submissions exist for CIRR only"}))
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
        if args.outputs is not None:  # a relative folder is anchored at the repository, as every cirlib path
            out = args.outputs.expanduser()
            paths.OUTPUTS = out if out.is_absolute() else paths.REPO_ROOT / out
        configs = step_configs(params, steps, overrides)
    except (LaunchError, batch.BatchError) as e:
        print(f"launch failed: {e}", file=sys.stderr)
        return 2
    run_steps(steps, configs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
