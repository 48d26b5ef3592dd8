"""How to reproduce a run folder: the code version, a YAML parameters file, and the exact command.

    python -m cirlib.reproduce outputs/stage1/<run> [--write params/reproduce_<run>.yaml]

It reads the run's `config.json` (the config it was trained with) and its provenance record (`provenance.json`, else
the one in `done.json`; `cirlib.provenance`) and prints:

- the git commit the run was made from, with a warning when the working tree was dirty (uncommitted changes are not
  in any commit: the run can then be reproduced only approximately) or when the commit is unknown;
- a YAML file `cirlib.launch` and `cirlib.batch` accept, every value under its notebook's `notebooks:` section, so
  nothing leaks into another step: the training step, plus for a stage-I run the top-k extraction when its top-k
  files record one extraction's settings, and for a stage-II run the evaluation recorded in its `metrics.json`;
- the command (`python -m cirlib.launch STEPS FILE`, or `torchrun --nproc_per_node N ...` for a run made by N
  processes, since batch_size is per process), with `CIR_DATA=<root>` in front when the run read the dataset root
  from $CIR_DATA, and `--outputs` when the run lives outside <repo>/outputs.

A stage-II run needs its stage-I run (and top-k files) first: reproduce that folder too; the command says which.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cirlib import paths
from cirlib.run_folder import STAGES, RunFolder, RunFolderError
from cirlib.workbook import config as config_module
from cirlib.workbook.config import EvaluateConfig, Stage1Config, Stage2TrainConfig, TopKConfig

# launch step name, notebook stem and config class of what a run folder holds
TRAINING = {"stage1": ("train-stage1", "01_stage1_train", Stage1Config),
            "stage2": ("train-stage2", "03_stage2_train", Stage2TrainConfig)}
TOPK = ("topk", "02_stage1_topk", TopKConfig)
EVALUATE = ("evaluate", "04_stage2_evaluate", EvaluateConfig)


class ReproduceError(RunFolderError):
    """The folder is no run folder, or its files cannot be turned into parameters (the message says why)."""


@dataclass(frozen=True)
class Reproduction:
    """How to make a run folder again."""

    run: RunFolder  # the run folder read
    commit: str | None  # the git commit it was made from (None: unknown)
    dirty: bool | None  # whether the working tree differed from the commit (None: unknown)
    steps: tuple[str, ...]  # cirlib.launch steps, in order
    parameters: dict[str, Any]  # the YAML mapping (`notebooks:` sections)
    processes: int  # processes the run was made with
    env: dict[str, str]  # environment variables to set (CIR_DATA when the run read it)
    outputs: str | None  # --outputs value (None: <repo>/outputs)
    warnings: tuple[str, ...]  # what limits the reproduction (dirty tree, unknown code version, ...), one line each
    notes: tuple[str, ...]  # hints, one line each

    @property
    def yaml_text(self) -> str:
        head = (f"# Reproduces {self.run.stage} run {self.run.name!r} ({self.run.path}); made by "
                f"`python -m cirlib.reproduce`.\n# Code: git commit {self.commit or 'unknown'}"
                f"{' (the working tree was dirty)' if self.dirty else ''}.\n")
        return head + yaml.safe_dump(self.parameters, sort_keys=False, default_flow_style=False)

    def command(self, params_file: str | Path) -> list[str]:
        """The argv that recreates the run from the YAML written at `params_file`."""
        launcher = (["python", "-m"] if self.processes <= 1 else
                    ["torchrun", f"--nproc_per_node={self.processes}", "-m"])
        argv = [*launcher, "cirlib.launch", ",".join(self.steps), str(params_file)]
        if self.outputs is not None:
            argv += ["--outputs", self.outputs]
        return argv

    def command_line(self, params_file: str | Path) -> str:
        """`command` as one shell line, with the environment it needs in front."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (env + " " if env else "") + shlex.join(self.command(params_file))

    def report(self, params_file: str | Path) -> str:
        stems = ",".join(p.split("_", 1)[0] for p in self.parameters["notebooks"])
        lines = [f"run:     {self.run.path}",
                 f"code:    git commit {self.commit or 'unknown'}" + (" (dirty working tree)" if self.dirty else ""),
                 *(f"WARNING: {w}" for w in self.warnings),
                 *(f"note:    {n}" for n in self.notes),
                 f"params:  {params_file}", "", self.yaml_text,
                 "command:", f"  {self.command_line(params_file)}",
                 "or through the notebooks:",
                 f"  {shlex.join(['python', '-m', 'cirlib.batch', str(params_file), '--only', stems])}"]
        return "\n".join(lines) + "\n"


def _record(run: RunFolder) -> dict[str, Any] | None:
    if run.provenance_file.is_file():
        return paths.read_json(run.provenance_file, "run provenance record")
    if run.completion_file.is_file():
        return paths.read_json(run.completion_file, "completion record").get("provenance")
    return None


def _fields(values: dict[str, Any], cls: type, source: Path) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ReproduceError(f"{source}: fields {unknown} are not {cls.__name__} fields (a run of another cirlib "
                             "version): check out the commit it was made with and run this command there")
    # in the config's field order (the notebooks' parameters cells), identity fields only
    return {f.name: values[f.name] for f in dataclasses.fields(cls)
            if f.name in values and f.name not in config_module.NOT_IDENTITY}


def _topk_configs(run: RunFolder) -> tuple[list[dict[str, Any]], list[str]]:
    """The distinct extraction settings recorded by the run's top-k files, and the files that record none."""
    from cirlib.workbook import steps  # torch and the models: only when there are top-k files to read

    configs: list[dict[str, Any]] = []
    bare: list[str] = []
    for path, made_by in steps.topk_records(run).items():
        if not made_by or made_by.get("step") != "extract_topk":
            bare.append(path.name)
        elif made_by["config"] not in configs:
            configs.append(made_by["config"])
    return configs, bare


def reproduction(folder: str | Path) -> Reproduction:
    """Read a run folder and say how to make it again (see the module docstring).

    Raises:
        ReproduceError / RunFolderError: not a run folder, no config.json, or fields of another cirlib version.
    """
    path = Path(folder).expanduser()
    run = RunFolder.at(path if path.is_absolute() else paths.REPO_ROOT / path)
    if run.stage not in STAGES or not run.path.is_dir():
        raise ReproduceError(f"{run.path} is not a run folder (expected <outputs>/stage1/<run> or "
                             "<outputs>/stage2/<run>)")
    step, stem, cls = TRAINING[run.stage]
    saved = run.saved_config()
    sections = {stem: _fields(saved, cls, run.config_file)}
    steps = [step]
    notes: list[str] = []
    warnings: list[str] = []
    record = _record(run)
    code = (record or {}).get("code") or {}
    if record is None:
        warnings.append(f"no provenance record in {run.path} (a run of an older cirlib): the code version is unknown")
    elif code.get("commit") is None:
        warnings.append(f"the code version is unknown ({code.get('note', 'not recorded')})")
    if code.get("dirty"):
        changed = code.get("changed")
        named = f": {', '.join(changed)}" if changed else " (the changed files were not recorded)"
        warnings.append(f"the run was made from a dirty working tree (uncommitted changes on top of "
                        f"{code.get('commit')}{named}): this reproduces it only as far as those changes are "
                        "committed")
    if record is not None and record.get("config") != sections[stem]:
        warnings.append(f"{run.provenance_file.name} was written for other settings than config.json: config.json "
                        "(what the run was last started with) is used")
    if run.stage == "stage1":
        configs, bare = _topk_configs(run)
        if len(configs) == 1:
            sections[TOPK[1]] = _fields(configs[0], TOPK[2], run.path)
            steps.append(TOPK[0])
        elif configs:
            notes.append(f"its top-k files were extracted with {len(configs)} different settings "
                         f"({configs}): add them by hand (notebook 02 / step topk)")
        if bare:
            notes.append(f"top-k files {bare} record no extraction settings (an older cirlib)")
    else:
        s1 = saved.get("stage1_checkpoint") or f"outputs/stage1/{saved.get('stage1_run')}"
        notes.append(f"needs its stage-I model and top-k files: reproduce {s1} first "
                     f"(python -m cirlib.reproduce {run.outputs / 'stage1' / str(saved.get('stage1_run'))})"
                     if not saved.get("stage1_checkpoint") else f"needs the stage-I checkpoint {s1}")
        if run.evaluation_file.is_file():
            made_by = paths.read_json(run.evaluation_file, "stage-II evaluation record").get("provenance")
            if made_by and made_by.get("step") == "evaluate":
                sections[EVALUATE[1]] = _fields(made_by["config"], EVALUATE[2], run.evaluation_file)
                steps.append(EVALUATE[0])
    env: dict[str, str] = {}
    data_root = (record or {}).get("data", {}).get("root")
    if not saved.get("data_root"):
        if data_root:
            env[paths.DATA_ENV_VAR] = str(data_root)
        else:
            notes.append(f"the run read its dataset root from ${paths.DATA_ENV_VAR}, which it did not record: set it")
    processes = int((record or {}).get("processes") or 1)
    if processes > 1:
        notes.append(f"made by {processes} processes: batch_size is per process, so launch as many")
    outputs = None if run.outputs.resolve() == paths.OUTPUTS.resolve() else str(run.outputs)
    notes.append("in the same outputs root the finished run is found and reused: give another --outputs, or "
                 "add --set overwrite=true to train it again")
    return Reproduction(run=run, commit=code.get("commit"), dirty=code.get("dirty"), steps=tuple(steps),
                        parameters={"notebooks": sections}, processes=processes, env=env, outputs=outputs,
                        warnings=tuple(warnings), notes=tuple(notes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_folder", type=Path, help="outputs/stage1/<run> or outputs/stage2/<run>")
    parser.add_argument("--write", type=Path, default=None, metavar="PATH",
                        help="write the YAML parameters there (relative to the repository) and name it in the command")
    args = parser.parse_args(argv)
    try:
        rep = reproduction(args.run_folder)
    except (RunFolderError, ValueError, FileNotFoundError) as e:
        print(f"reproduce failed: {e}", file=sys.stderr)
        return 2
    params_file: str | Path = f"reproduce_{rep.run.name}.yaml"
    if args.write is not None:
        target = args.write if args.write.is_absolute() else paths.REPO_ROOT / args.write
        paths.atomic_write_text(target, rep.yaml_text)
        params_file = target
    sys.stdout.write(rep.report(params_file))
    return 0
