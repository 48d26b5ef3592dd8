"""What produced a result: one JSON-able record that every result file carries.

    {"format": 1, "step": "train_stage1", "created_at": "2025-...Z",
     "cirlib_version": "0.1.0",
     "code": {"commit": "<40 hex>", "dirty": false, "repository": "/path/to/checkout"},
     "config": {...the step's config fields...}, "config_hash": "<16 hex>",
     "preset": "blip-base",
     "weights": {"pretrained": {"path": ".../model_base.pth", "sha256": "...", "bytes": 895...}, ...},
     "inputs": {"topk_val": {"path": ".../topk_val.pt", "sha256": "...", "bytes": ...}},
     "data": {"dataset": "cirr", "root": "/data/cirr_dataset",
              "annotations": {"/data/cirr_dataset/cirr/captions/cap.rc2.val.json": "<sha256>", ...},
              "splits": [{"split": "val", "category": null, "queries": 4181, "gallery": 2297, "dropped": null}]},
     "packages": {"python": "3.12.3", "torch": "2.6.0", "transformers": ..., "timm": ..., "accelerate": ...,
                  "numpy": ...},
     "device": {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "index": 0},
     "precision": "bf16", "processes": 8, "seed": 0}

Where it lives (file names are `cirlib.run_folder`'s): `provenance.json` beside a run's `config.json` (config.json
itself stays exactly the config, read back by `RunFolder.saved_config`), the `"provenance"` key of `done.json` and of
`metrics.json`, `produced_by` in a top-k file's `cirlib` metadata (its `provenance` is the narrower reuse key, which
must not change with every commit), and a `<file>.provenance.json` sidecar beside each stage-II label tensor and each
CIRR submission. The record describes; it never decides reuse (that stays with the narrower keys the steps compare).

Git is asked once per process (`git rev-parse HEAD`, `git status --porcelain`); where the code is not a git checkout
or git is absent, the record says so instead of failing. Files are hashed once per process (`run_folder.file_sha256`)
and weights files of 64 MiB and more also once per machine: a small cache under `<outputs>/.cache/` keyed by
(resolved path, size, mtime) spares every process and step re-reading a 900 MB BLIP file.
"""
from __future__ import annotations

import datetime
import functools
import platform
import subprocess
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol

import torch

from cirlib import distributed as dist
from cirlib import paths
from cirlib import run_folder
from cirlib.run_folder import config_hash

FORMAT_VERSION = 1
PACKAGES = ("torch", "transformers", "timm", "accelerate", "numpy")  # versions every record names (+ python)
DISK_CACHE_MIN_BYTES = 64 << 20  # files this large are also remembered on disk (weights; not caption files)
GIT_TIMEOUT_S = 20.0
MAX_CHANGED_LISTED = 20  # changed paths a provenance record lists (the rest are counted)


class _Split(Protocol):
    """What a record reads from a `cirlib.data.SplitData` (the data room is not imported here)."""

    dataset: str
    split: str
    category: str | None
    root: Path
    queries: list
    gallery: list
    source_files: tuple[Path, ...]
    dropped: Any


# ------------------------------------------------------------------------------------------------ code and packages
def cirlib_version() -> str:
    """The installed cirlib version; "0+unknown" for a source checkout that was never pip-installed."""
    try:
        return metadata.version("cirlib")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@functools.lru_cache(maxsize=None)
def _git_state(repo: str) -> tuple[tuple[str, Any], ...]:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, check=True,
                              timeout=GIT_TIMEOUT_S).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=normal").splitlines()
                   if line.strip()]
    except FileNotFoundError:
        return (("commit", None), ("dirty", None), ("repository", repo),
                ("note", "git is not installed: the code version is unknown"))
    except subprocess.CalledProcessError as e:
        reason = (e.stderr or "").strip().splitlines()[-1:] or [f"exit status {e.returncode}"]
        return (("commit", None), ("dirty", None), ("repository", repo),
                ("note", f"not a git checkout (git said: {reason[0]}): the code version is unknown"))
    except subprocess.TimeoutExpired:
        return (("commit", None), ("dirty", None), ("repository", repo),
                ("note", f"git did not answer within {GIT_TIMEOUT_S:.0f} s: the code version is unknown"))
    listed = tuple(changed[:MAX_CHANGED_LISTED]) + (
        (f"... and {len(changed) - MAX_CHANGED_LISTED} more",) if len(changed) > MAX_CHANGED_LISTED else ())
    return (("commit", commit), ("dirty", bool(changed)), ("repository", repo), ("changed", listed))


def code_version(repo: str | Path | None = None) -> dict[str, Any]:
    """The git commit of the code and whether the working tree differs from it (asked once per process).

    Returns {"commit": 40-hex, "dirty": bool, "repository": path, "changed": [paths that differ from the commit, as
    `git status` names them, at most MAX_CHANGED_LISTED]}, or commit/dirty None and a "note" saying why (no git, not a
    checkout). Never raises for a missing git.

    Args:
        repo: the checkout to ask (default: the repository cirlib runs from).
    """
    state = dict(_git_state(str(repo or paths.REPO_ROOT)))
    if "changed" in state:
        state["changed"] = list(state["changed"])
    return state


def package_versions() -> dict[str, str | None]:
    """Python's and the main libraries' versions (None for one that is not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_info(device: str | torch.device | None) -> dict[str, Any]:
    """{"type": "cpu" | "cuda" | ..., "name": GPU name or CPU architecture, "index": CUDA index or None}."""
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return {"type": "cuda", "name": torch.cuda.get_device_name(index), "index": index,
                "cuda": torch.version.cuda}
    return {"type": dev.type, "name": platform.machine() or "unknown", "index": dev.index}


# ------------------------------------------------------------------------------------------------ file hashes
def _cache_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path), st.st_size, st.st_mtime_ns


def _read_cache(cache: Path) -> dict[str, str]:
    if not cache.is_file():
        return {}
    try:
        data = paths.read_json(cache, "sha256 cache")
    except ValueError as e:  # a broken cache costs a re-hash, never a result
        warnings.warn(f"{e}; starting it afresh", stacklevel=3)
        return {}
    return data if isinstance(data, dict) else {}


def file_sha256(path: str | Path, outputs: str | Path | None = None,
                min_bytes: int = DISK_CACHE_MIN_BYTES) -> str:
    """sha256 of a file: once per process (`run_folder.file_sha256`), and for files of `min_bytes` and more once per
    (resolved path, size, mtime) on this machine, remembered in `<outputs>/.cache/sha256.json`.

    Args:
        path: the file.
        outputs: the outputs root whose cache to use ("" or None: <repo>/outputs).
        min_bytes: smaller files are hashed without the disk cache (caption files change rarely and hash fast).
    """
    path = Path(path).resolve()
    key = _cache_key(path)
    if key[1] < min_bytes:
        return run_folder.file_sha256(path)
    cache_file = run_folder.hash_cache_file(outputs)
    text_key = "|".join(map(str, key))
    known = _read_cache(cache_file).get(text_key)
    if known is not None:
        run_folder.remember_sha256(path, key[1], key[2], known)
        return known
    digest = run_folder.file_sha256(path)
    cache = _read_cache(cache_file)  # again: another process may have added entries meanwhile
    cache = {k: v for k, v in cache.items() if not k.startswith(f"{path}|")}  # older versions of this file
    cache[text_key] = digest
    try:
        paths.write_json(cache_file, cache)
    except paths.FileWriteError as e:  # the hash is right; only the next process pays for it again
        warnings.warn(f"sha256 cache not written ({e}); the file will be hashed again by the next process",
                      stacklevel=2)
    return digest


def weights_file(path: str | Path) -> Path:
    """The file a weights setting reads: the file itself, or for a folder written by `save_pretrained` (or a run
    folder holding `model/`) its `model.safetensors`."""
    path = Path(path)
    if path.is_dir():
        folder = path / run_folder.MODEL_DIR if (path / run_folder.MODEL_DIR).is_dir() else path
        return folder / run_folder.WEIGHTS_FILE
    return path


def file_entry(path: str | Path, outputs: str | Path | None = None) -> dict[str, Any]:
    """{"path", "sha256", "bytes"} of a file that was read (a weights folder: its weights file), and "source" (Hub
    repo id and revision, or exported folder) for the weights of a published model (`workbook.published`).

    Raises:
        FileNotFoundError: naming the file (a file that was read exists; one that does not was not read).
    """
    given = weights_file(path)
    file = given.resolve()
    if not file.is_file():
        raise FileNotFoundError(f"cannot record what produced a result: {file} (from {path}) does not exist")
    source = given.parent / run_folder.SOURCE_FILE  # weights of a published model: its repo id and revision
    return {"path": str(file), "sha256": file_sha256(file, outputs), "bytes": file.stat().st_size,
            **({"source": paths.read_json(source, "published model source")} if source.is_file() else {})}


# ------------------------------------------------------------------------------------------------ data
def dropped_counts(split: _Split) -> dict[str, Any] | None:
    """What `missing_images="drop"` removed from a split, as counts (None: nothing dropped)."""
    dropped = split.dropped
    if dropped is None:
        return None
    return {"queries_dropped": len(dropped.queries), "queries_before": dropped.queries_before,
            "gallery_dropped": len(dropped.gallery), "gallery_before": dropped.gallery_before,
            "missing_images": len(dropped.missing)}


def data_record(splits: Iterable[_Split], dataset: str | None = None, root: str | Path | None = None
                ) -> dict[str, Any]:
    """The dataset, its root, the sha256 of every annotation file read, and each split's size and dropped counts."""
    splits = list(splits)
    files = sorted({Path(f).resolve() for s in splits for f in s.source_files})
    return {
        "dataset": dataset if dataset is not None else (splits[0].dataset if splits else None),
        "root": str(Path(root).resolve()) if root is not None else (str(splits[0].root) if splits else None),
        "annotations": {str(f): run_folder.file_sha256(f) for f in files},
        "splits": [{"split": s.split, "category": s.category, "queries": len(s.queries), "gallery": len(s.gallery),
                    "dropped": dropped_counts(s)} for s in splits],
    }


# ------------------------------------------------------------------------------------------------ the record
def record(step: str, config: Mapping[str, Any], *, weights: Mapping[str, str | Path | None] | None = None,
           inputs: Mapping[str, str | Path | None] | None = None, splits: Iterable[_Split] = (),
           dataset: str | None = None, data_root: str | Path | None = None, preset: str | None = None,
           device: str | torch.device | None = None, precision: str | None = None, seed: int | None = None,
           outputs: str | Path | None = None, **extra: Any) -> dict[str, Any]:
    """The provenance record of one result (see the module docstring for its fields).

    Args:
        step: the step that made the result (e.g. "train_stage1", "evaluate").
        config: the step's config fields (e.g. `workbook.config.identity(cfg)`); hashed with `config_hash`.
        weights: role -> weights file (or model folder) read, e.g. {"pretrained": ".../model_base.pth",
            "stage1": run.weights_file}; None values (a setting left empty) are skipped.
        inputs: role -> other files read (e.g. top-k files), hashed like weights.
        splits: the `SplitData` read (annotation files, sizes, dropped counts).
        dataset, data_root: the dataset and its resolved root (default: the first split's).
        preset: the model preset / backbone.
        device, precision, seed: where and how it ran (precision resolved, e.g. "fp32").
        outputs: the outputs root whose hash cache to use.
        extra: more JSON-able fields (e.g. "stage2_config").
    """
    config = dict(config)
    return {
        "format": FORMAT_VERSION,
        "step": step,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cirlib_version": cirlib_version(),
        "code": code_version(),
        "config": config,
        "config_hash": config_hash(config),
        "preset": preset,
        "weights": {role: file_entry(p, outputs) for role, p in (weights or {}).items() if p},
        "inputs": {role: file_entry(p, outputs) for role, p in (inputs or {}).items() if p},
        "data": data_record(splits, dataset, data_root),
        "packages": package_versions(),
        "device": device_info(device),
        "precision": precision,
        "processes": dist.world_size(),
        "seed": seed,
        **extra,
    }
