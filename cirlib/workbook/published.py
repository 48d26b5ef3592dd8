"""Run references: the one place that turns what a setting names as a run into a run folder.

A run reference (`stage1_run`, `stage2_run`, `--stage1`, `--stage2`) is one of

- a run name: `<outputs>/<stage>/<name>/`, as always;
- `hf:<org>/<name>[@revision]`: a model exported by `python -m cirlib.hub export` and published on the Hugging
  Face Hub, fetched through the standard Hub cache (offline when HF_HUB_OFFLINE=1 and cached);
- the path of an exported folder (one holding `cirlib.json`);
- the path of a run folder (`<outputs>/<stage>/<name>`).

An exported folder (or Hub snapshot) is laid out for the Hub (`README.md` card, `config.json`, `model.safetensors`,
tokenizer files, `cirlib.json`; a stage-II one also its validation top-k files and its stage I in `stage1/`). To be
used like a run, it is *materialized* once as a finished run folder under `<outputs>/<stage>/` named after its
source (`hf--<org>--<name>--<commit>`, `folder--<name>--<hash>`): config.json (the exported training config, local
paths left empty: the data root is $CIR_DATA or the caller's), done.json, model/ (the weights, hard-linked or copied,
and `source.json` saying where they came from, which every provenance record of those weights carries) and, for
stage II, the stage-I run it names with the top-k files it was evaluated on.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

from cirlib import paths
from cirlib.data import tokenizer
from cirlib.models import loading
from cirlib.run_folder import SOURCE_FILE, RunFolder, RunFolderError, file_sha256, outputs_root

EXPORT_FILE = "cirlib.json"  # what an exported folder holds beyond the model: stage, run config, evaluation, provenance
CARD_FILE = "README.md"
STAGE1_DIR = "stage1"  # a stage-II export's stage I (z_t, the top-k files' maker)
FORMAT = 1
MODEL_FILES = (loading.CONFIG_FILE, loading.WEIGHTS_FILE, tokenizer.VOCAB_FILE, tokenizer.CONFIG_FILE)
# training-config fields that hold this machine's paths: left empty in an export and in a materialized run
LOCAL_FIELDS = ("data_root", "tokenizer", "pretrained", "init_checkpoint", "stage1_checkpoint", "topk_path",
                "feature_store")
STAGE_NAMES = {1: "stage1", 2: "stage2"}

_SAFE = re.compile(r"[^\w.-]")  # characters a run name made from a folder's name may not hold
_RESOLVED: dict[tuple[str, str, str, str], RunFolder] = {}


def is_export(folder: Path) -> bool:
    """Whether `folder` is an exported model folder (it holds cirlib.json)."""
    return (folder / EXPORT_FILE).is_file()


def read_export(folder: Path) -> dict[str, Any]:
    """An exported folder's cirlib.json, checked for its format and stage."""
    info = paths.read_json(folder / EXPORT_FILE, "exported model record")
    if not isinstance(info, dict) or info.get("format") != FORMAT or info.get("stage") not in STAGE_NAMES:
        raise RunFolderError(f"{folder / EXPORT_FILE}: expected a JSON object with \"format\": {FORMAT} and "
                             f"\"stage\": 1 or 2 (written by python -m cirlib.hub export), found {info!r:.200}")
    return info


def resolve_run(stage: str, ref: str, outputs: str | os.PathLike | None = None, *, data_root: str = "") -> RunFolder:
    """The run folder a run reference names (see the module docstring); Hub and exported models are materialized
    under `outputs` once per process and source.

    Args:
        stage: "stage1" | "stage2".
        ref: a run name, `hf:<repo id>[@revision]`, an exported folder or a run folder's path.
        outputs: the outputs root ("" or None: <repo>/outputs).
        data_root: the dataset root a materialized run records ("" = $CIR_DATA).
    """
    key = (stage, str(ref), str(outputs_root(outputs)), data_root)
    if key not in _RESOLVED:
        _RESOLVED[key] = _resolve(stage, str(ref), outputs, data_root)
    return _RESOLVED[key]


def _resolve(stage: str, ref: str, outputs: str | os.PathLike | None, data_root: str) -> RunFolder:
    if loading.parse_hub_reference(ref):
        try:
            folder, source = loading.hub_snapshot(ref)
        except loading.CheckpointError as err:  # the steps and command lines report run-folder errors
            raise RunFolderError(str(err)) from err
        name = "hf--" + "--".join(source["repo_id"].split("/")) + f"--{source['commit'][:12]}"
        return materialize(stage, folder, {"hub": ref, **source}, outputs, name, data_root)
    if "/" not in ref and os.sep not in ref:
        return RunFolder.of(stage, ref, outputs)
    path = Path(ref).expanduser()
    path = path if path.is_absolute() else paths.REPO_ROOT / path
    if is_export(path):
        digest = hashlib.sha256((path / EXPORT_FILE).read_bytes()).hexdigest()[:12]
        name = f"folder--{_SAFE.sub('_', path.name)}--{digest}"
        return materialize(stage, path, {"folder": str(path.resolve())}, outputs, name, data_root)
    return RunFolder.at(path)


def materialize(stage: str, folder: Path, source: dict[str, Any], outputs: str | os.PathLike | None, name: str,
                data_root: str = "", extra_files: dict[str, Path] | None = None) -> RunFolder:
    """The exported `folder` as a finished run folder `<outputs>/<stage>/<name>` (made once; see module docstring).

    Args:
        extra_files: file name in the run folder -> file (a stage-II export's top-k files, into its stage-I run).
    """
    info = read_export(folder)
    if STAGE_NAMES[info["stage"]] != stage:
        raise RunFolderError(f"{source.get('hub') or folder} holds a stage-{'I' * info['stage']} model, but a "
                             f"{stage} run is asked for here")
    if not info.get("run_config"):
        raise RunFolderError(f"{source.get('hub') or folder} holds a model without a training run (exported "
                             "--from-original): load it with Stage1Model/Stage2Model.from_pretrained, or give its "
                             "original checkpoint file where the setting takes one")
    run = RunFolder.of(stage, name, outputs)
    if run.completion_file.is_file():
        return run
    config = {**info["run_config"], **{f: "" for f in LOCAL_FIELDS if f in info["run_config"]},
              "data_root": data_root, f"{stage}_run": name}
    if stage == "stage2":
        topks = {n: folder / n for n in info.get("topk_files", [])}
        config["stage1_run"] = materialize("stage1", folder / STAGE1_DIR, source, outputs, f"{name}--stage1",
                                           data_root, topks).name
    _publish_once(run, lambda tmp: _write_run(tmp, folder, info, config, source, extra_files or {}))
    return run


def _publish_once(run: RunFolder, fill: Callable[[RunFolder], None]) -> None:
    """Fill a private temporary folder and rename it onto `run` unless another process (a rank of the same launch)
    did first: then its folder, the same files, is kept and ours dropped. No process ever sees a partial run."""
    tmp = run.path.with_name(f".{run.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir(parents=True)
    try:
        fill(RunFolder.at(tmp))
        if not run.path.exists():
            try:
                paths.publish(tmp, run.path)
            except paths.FileWriteError:
                if not run.completion_file.is_file():  # not a faster process's finished copy
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_run(tmp: RunFolder, folder: Path, info: dict[str, Any], config: dict[str, Any], source: dict[str, Any],
               topks: dict[str, Path]) -> None:
    for file in MODEL_FILES:
        if (folder / file).is_file():
            link_or_copy(folder / file, tmp.model_dir / file)
    paths.write_json(tmp.model_dir / SOURCE_FILE, {**source, "exported_run": info.get("run"),
                                                   "weights_sha256": info.get("weights_sha256")})
    weights = file_sha256(tmp.model_dir / loading.WEIGHTS_FILE)  # what is used; `hub verify` compares it to the card
    for file_name, path in topks.items():
        link_or_copy(path, tmp.path / file_name)
    paths.write_json(tmp.config_file, config)
    paths.write_json(tmp.provenance_file, {"published": source, "exported": info.get("provenance")})
    tmp.complete(config, epochs_completed=None, metrics=info.get("metrics", {}), weights_sha256=weights,
                 published=source)


def link_or_copy(src: Path, dst: Path) -> None:
    """`dst` holds `src`'s bytes: a hard link to the real file (a Hub cache's blob) where possible, else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    real = src.resolve()
    if not real.is_file():
        raise RunFolderError(f"{src}: file missing from the exported model")
    try:
        os.link(real, dst)
    except OSError:
        shutil.copyfile(real, dst)
