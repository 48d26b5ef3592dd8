"""The run folder: the one module that knows the layout of `<outputs>/<stage>/<run>/` and every file name in it.

    outputs/stage1/<run>/                     outputs/stage2/<run>/
      config.json          training config      config.json            training config
      provenance.json      what produced it     provenance.json        (code, weights, data hashes, packages, ...)
      done.json            completion record    done.json              completion record
      metrics.jsonl, metrics.csv  training log  metrics.jsonl, metrics.csv
      checkpoints/{last,best}/  resumable state checkpoints/{last,best}/
      model/               final weights        model/   (+ source.json when made from a published model)
      metrics.json         final evaluation     metrics.json           stage I vs stage II (evaluation record)
      topk_<split>[_<category>].pt  top-k files stage2_labels_<split>[_<category>].pt   label tensors
      candidate_recall.json                     reranked_<split>[_<category>].pt        re-ranked top-K (top-k format)
      .lock                one writer at a time stage2_labels_<...>.provenance.json   each label tensor's sidecar
                                                submission/                            CIRR test-server files
                                                submission_<name>.provenance.json      each submission's sidecar
                                                circo/                                 CIRCO metrics and server files

outputs/rerank/<name>/ (a re-ranking of imported candidates by a stage-II run): provenance.json, metrics.json
(imported vs re-ranked, the gain analysis), reranked_<split>[_<category>].pt, dropped_queries.json, submission/, .lock

A result's provenance record (`cirlib.provenance`) also sits in done.json and metrics.json ("provenance") and in each
top-k file's metadata; sha256 results of large files are cached under `<outputs>/.cache/` (`hash_cache_file`).

"Finished" has one definition (`RunFolder.finished`): the completion record `done.json`, written last, holds exactly
the config being asked for. A run that is (re)started removes its completion record before anything else, so an
interrupted extension of a finished run is never taken for finished. Atomic writes and JSON reading are the path
helpers' (`cirlib.paths`); this module decides where things go.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from cirlib import paths

STAGES = ("stage1", "stage2")  # the training stages: run folders with a model
RERANK_STAGE = "rerank"  # result folders of re-rankings of imported candidates (`workbook.rerank_any`), no model
CONFIG_FILE = "config.json"
PROVENANCE_FILE = "provenance.json"  # beside config.json: what produced the run (config.json stays the bare config)
SIDECAR_SUFFIX = ".provenance.json"  # <file stem> + this: the provenance sidecar of a result file without metadata
HASH_CACHE_FILE = ".cache/sha256.json"  # under the outputs root: sha256 of large files by (path, size, mtime)
COMPLETION_FILE = "done.json"
LOG_FILE = "metrics.jsonl"
LOG_CSV_FILE = "metrics.csv"
CHECKPOINTS = "checkpoints"
MODEL_DIR = "model"
WEIGHTS_FILE = "model.safetensors"  # inside model/ and each checkpoint folder
SOURCE_FILE = "source.json"  # inside model/ of a run made from a published model: its Hub repo id and revision
EVALUATION_FILE = "metrics.json"
CANDIDATE_RECALL_FILE = "candidate_recall.json"
SUBMISSION_DIR = "submission"
CIRCO_DIR = "circo"  # CIRCO results: metrics_<name>.json, <split>_<name>_<stage>.json (+ .provenance.json sidecars)
LOCK_FILE = ".lock"
TENSORBOARD_DIR = "tensorboard"
DROPPED_QUERIES_FILE = "dropped_queries.json"  # what missing_images="drop" left out, per step and split
MISSING_IMAGES_FILE = "missing_images.tsv"  # every missing image, when missing_images="error" stopped a step


class RunFolderError(RuntimeError):
    """A run folder is in use, broken, or does not hold what a step needs (the message names the file)."""


def _suffix(split: str, category: str | None) -> str:
    return f"{split}" + (f"_{category}" if category else "")


def outputs_root(outputs: str | os.PathLike | None = None) -> Path:
    """The outputs root: `outputs` anchored at the repository when relative, or <repo>/outputs when empty."""
    if outputs is None or str(outputs) == "":
        return paths.OUTPUTS
    path = Path(outputs).expanduser()
    return path if path.is_absolute() else paths.REPO_ROOT / path


def config_hash(config: Mapping[str, Any]) -> str:
    """A short stable hash of a config's fields (sorted-key JSON)."""
    text = json.dumps(dict(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def hash_cache_file(outputs: str | os.PathLike | None = None) -> Path:
    """The outputs root's on-disk sha256 cache (see `cirlib.provenance.file_sha256`)."""
    return outputs_root(outputs) / HASH_CACHE_FILE


def sidecar_file(result: str | os.PathLike) -> Path:
    """The provenance sidecar of a result file that has no room for metadata: `<stem>.provenance.json` beside it."""
    result = Path(result)
    return result.with_name(result.stem + SIDECAR_SUFFIX)


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def remember_sha256(path: str | os.PathLike, size: int, mtime_ns: int, digest: str) -> None:
    """Seed this process's sha256 cache with a digest known from elsewhere (the on-disk cache)."""
    _SHA_CACHE[(str(Path(path).resolve()), int(size), int(mtime_ns))] = digest


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, cached by (path, size, mtime) for this process: a weights file is hashed once."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


@dataclass(frozen=True)
class RunFolder:
    """`<outputs>/<stage>/<name>/` and the names of everything in it. Nothing is created until something is written."""

    stage: str  # "stage1" | "stage2"
    name: str  # the run's name
    outputs: Path  # the outputs root

    @classmethod
    def of(cls, stage: str, name: str, outputs: str | os.PathLike | None = None) -> "RunFolder":
        """The run folder of `name` under the outputs root (`outputs`, default <repo>/outputs)."""
        if stage not in (*STAGES, RERANK_STAGE):
            raise ValueError(f"unknown stage {stage!r}; one of {(*STAGES, RERANK_STAGE)}")
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"a run name is a plain folder name, got {name!r}")
        return cls(stage, name, outputs_root(outputs))

    @classmethod
    def at(cls, path: str | os.PathLike) -> "RunFolder":
        """The layout applied to any folder (tests, a training loop given a bare folder): `<outputs>/<stage>/<name>`
        read off the path itself."""
        path = Path(path)
        if not path.is_absolute():
            path = paths.REPO_ROOT / path
        return cls(path.parent.name, path.name, path.parent.parent)

    @property
    def path(self) -> Path:
        return self.outputs / self.stage / self.name

    # ------------------------------------------------------------------------------------------------ file names
    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def provenance_file(self) -> Path:
        """What produced the run (`cirlib.provenance` record), written with config.json at every (re)start."""
        return self.path / PROVENANCE_FILE

    @property
    def completion_file(self) -> Path:
        return self.path / COMPLETION_FILE

    @property
    def log_file(self) -> Path:
        return self.path / LOG_FILE

    @property
    def log_csv_file(self) -> Path:
        return self.path / LOG_CSV_FILE

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS

    def checkpoint_dir(self, which: str) -> Path:
        """checkpoints/last or checkpoints/best."""
        if which not in ("last", "best"):
            raise ValueError(f"checkpoint is 'last' or 'best', got {which!r}")
        return self.checkpoints_dir / which

    @property
    def model_dir(self) -> Path:
        return self.path / MODEL_DIR

    @property
    def weights_file(self) -> Path:
        return self.model_dir / WEIGHTS_FILE

    @property
    def evaluation_file(self) -> Path:
        return self.path / EVALUATION_FILE

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD_DIR

    @property
    def dropped_queries_file(self) -> Path:
        """The queries and gallery images missing_images="drop" left out (counts, rows, pair ids, missing names)."""
        return self.path / DROPPED_QUERIES_FILE

    @property
    def missing_images_file(self) -> Path:
        """Every missing image file, written when missing_images="error" stopped a step before it started."""
        return self.path / MISSING_IMAGES_FILE

    def topk_file(self, split: str, category: str | None = None) -> Path:
        """A stage-I top-k file (the original's format plus our metadata)."""
        return self.path / f"topk_{_suffix(split, category)}.pt"

    def topk_files(self) -> list[Path]:
        """Every top-k file in the run folder, by name."""
        return sorted(self.path.glob("topk_*.pt"))

    @property
    def candidate_recall_file(self) -> Path:
        return self.path / CANDIDATE_RECALL_FILE

    def labels_file(self, split: str, category: str | None = None) -> Path:
        """A stage-II label tensor: bare (N, K) bool, the original's analysis format."""
        return self.path / f"stage2_labels_{_suffix(split, category)}.pt"

    def reranked_file(self, split: str, category: str | None = None) -> Path:
        """The re-ranked top-K of an evaluation, in the top-k file format (names, stage-I and stage-II scores)."""
        return self.path / f"reranked_{_suffix(split, category)}.pt"

    def labels_provenance_file(self, split: str, category: str | None = None) -> Path:
        """The sidecar of a label tensor (bare tensors have no room for metadata)."""
        return sidecar_file(self.labels_file(split, category))

    @property
    def submission_dir(self) -> Path:
        return self.path / SUBMISSION_DIR

    def submission_provenance_file(self, name: str) -> Path:
        """The sidecar of the submission files named `name` (outside submission/, which holds the server's files
        only)."""
        return self.path / f"{SUBMISSION_DIR}_{name}{SIDECAR_SUFFIX}"

    @property
    def circo_dir(self) -> Path:
        """CIRCO results of the run (`cirlib.workbook.circo_eval`): metrics and server-format files per name."""
        return self.path / CIRCO_DIR

    def circo_metrics_file(self, name: str) -> Path:
        """The val metrics of both stages, with settings and provenance."""
        return self.circo_dir / f"metrics_{name}.json"

    def circo_predictions_file(self, split: str, name: str, stage: str) -> Path:
        """A ranking in CIRCO's server format ({"<query id>": [50 image ids]}); on test, the file to submit."""
        return self.circo_dir / f"{split}_{name}_{stage}.json"

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK_FILE

    # ------------------------------------------------------------------------------------------------ state
    def exists(self) -> bool:
        return self.path.is_dir()

    def finished(self, config: Mapping[str, Any]) -> dict[str, Any] | None:
        """The completion record when the run finished with exactly `config` (all fields equal), else None.

        Args:
            config: the config being asked for, as a dict of its fields.
        """
        if not self.completion_file.is_file():
            return None
        record = paths.read_json(self.completion_file, "completion record")
        if not isinstance(record, dict) or record.get("config") != json.loads(json.dumps(dict(config), default=str)):
            return None
        if not self.model_dir.is_dir():
            return None
        return record

    def start(self, config: Mapping[str, Any], provenance: Mapping[str, Any] | None = None) -> None:
        """Begin (or resume) training: drop the completion record first, then write the config being trained (and
        beside it, when given, the provenance record of this start: `provenance_file`)."""
        paths.check_writable(self.path, f"run folder of {self.stage} run {self.name!r}")
        self.completion_file.unlink(missing_ok=True)
        if provenance is not None:
            paths.write_json(self.provenance_file, dict(provenance))
        else:  # a record of an earlier start would describe another run
            self.provenance_file.unlink(missing_ok=True)
        paths.write_json(self.config_file, dict(config))

    def complete(self, config: Mapping[str, Any], **record: Any) -> dict[str, Any]:
        """Write the completion record (last, atomically): the config it finished with and what the step reports."""
        full = {"config": dict(config), "config_hash": config_hash(config), "finished_at": time.time(), **record}
        paths.write_json(self.completion_file, full)
        return full

    def saved_config(self) -> dict[str, Any]:
        """The training config the run was (last) started with."""
        if not self.config_file.is_file():
            made_by = "01_stage1_train" if self.stage == "stage1" else "03_stage2_train"
            raise RunFolderError(f"no {self.config_file}: run notebook {made_by} for {self.stage} run {self.name!r}")
        return paths.read_json(self.config_file, f"{self.stage} run config")

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run folder's lock: a second process writing the same run folder is refused, naming the holder."""
        paths.check_writable(self.path, f"run folder of {self.stage} run {self.name!r}")
        with folder_lock(self.lock_file, f"run folder {self.path}",
                         "wait for it to finish, or stop it, before starting this run again"):
            yield


class LockedError(RunFolderError):
    """Another process holds the lock of what this one would write (the message names it and the holder's pid)."""


@contextmanager
def folder_lock(lock_file: str | os.PathLike, what: str, advice: str = "wait for it to finish",
                wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (created; it records the holder's pid): the one lock of run folders,
    feature-store builds, gallery-index builds and evaluations.

    Args:
        what, advice: for the message when another process holds it.
        wait: None: raise LockedError at once when another process holds it; else call wait(message) and block until
            the lock is free (e.g. a feature store another process is building: reused once it is built).
    """
    import fcntl

    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            if wait is None:
                raise LockedError(f"{what} is in use by another process (pid {holder}): {advice}") from None
            wait(f"{what} is in use by another process (pid {holder}): waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
