"""The bookkeeping of one step writing into one run folder, so that the steps (`cirlib.workbook.steps`) show what they
compute: decisions taken on the main process and shared, the run folder's writability and lock, reuse of a saved
record, the provenance record of what the step writes, and writes by the main process only.

Under several processes every method that says "collective" must be called by all of them, in the same order.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

from cirlib import distributed as dist
from cirlib import paths, provenance
from cirlib.run_folder import RunFolder
from cirlib.workbook.config import identity
from cirlib.workbook.factories import device

T = TypeVar("T")


class StepBook:
    """What step `step` (its name in provenance records) does besides computing, for its run folder `run`."""

    def __init__(self, step: str, run: RunFolder):
        self.step, self.run = step, run

    # ------------------------------------------------------------------------------------------------ processes
    @staticmethod
    def decide(fn: Callable[[], T]) -> T:
        """fn() decided by the main process for all (collective): the others must not see files it writes
        meanwhile."""
        return dist.broadcast_object(fn() if dist.is_main_process() else None)

    @staticmethod
    def on_main(fn: Callable[[], T]) -> T | None:
        """fn() on the main process only (None on the others; not collective)."""
        return fn() if dist.is_main_process() else None

    @staticmethod
    def write(fn: Callable[[], T], *, share: bool = False) -> T | None:
        """fn() (a write) on the main process only, then a barrier (collective); its result on the main process, or
        on every process when `share`."""
        result = fn() if dist.is_main_process() else None
        dist.barrier()
        return dist.broadcast_object(result) if share else result

    @staticmethod
    def say(message: str) -> None:
        """Print `message` once (on the main process)."""
        if dist.is_main_process():
            print(message, flush=True)

    # ------------------------------------------------------------------------------------------------ run folder
    def check_writable(self, what: str) -> None:
        """Refuse (on every process) a run folder this step cannot write; `what` names it (collective)."""
        self.decide(lambda: paths.check_writable(self.run.path, what))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run folder's lock on the main process (the one writer) while the step computes and writes."""
        with self.run.lock() if dist.is_main_process() else contextlib.nullcontext():
            yield

    # ------------------------------------------------------------------------------------------------ reuse
    def reuse(self, saved: Callable[[], dict[str, Any] | None], *, overwrite: bool) -> dict[str, Any] | None:
        """The saved record `saved()` finds on the main process (None: none that fits), shared (collective); None
        without looking when `overwrite`."""
        return None if overwrite else self.decide(saved)

    def reuse_evaluation(self, wanted: Callable[[], Any], *, overwrite: bool) -> dict[str, Any] | None:
        """The run folder's evaluation record (`RunFolder.evaluation_file`, metrics.json) when its "produced_by"
        entry equals `wanted()` (the settings, input hashes and weights hashes that made it); None when there is
        none, it was made otherwise, or `overwrite` (collective; see `reuse`)."""
        return self.reuse(lambda: self.saved_record(self.run.evaluation_file, "produced_by", wanted), overwrite=overwrite)

    @staticmethod
    def saved_record(path: Path, key: str, wanted: Callable[[], Any]) -> dict[str, Any] | None:
        """The JSON record at `path` when its `key` entry equals `wanted()` (None: no file, or another entry)."""
        if not path.is_file():
            return None
        return StepBook.matching(paths.read_json(path, "saved evaluation record"), key, wanted())

    def finished(self, config: Mapping[str, Any], *, overwrite: bool) -> dict[str, Any] | None:
        """The run's completion record when it finished with exactly `config` (collective; see `reuse`)."""
        return self.reuse(lambda: self.run.finished(config), overwrite=overwrite)

    @staticmethod
    def matching(saved: dict[str, Any] | None, key: str, wanted: Any) -> dict[str, Any] | None:
        """`saved` when its `key` entry equals `wanted`, else None."""
        return saved if saved is not None and saved.get(key) == wanted else None

    # ------------------------------------------------------------------------------------------------ records
    def record(self, cfg, sets, *, dataset: str, root: Path, preset: str, precision: str, seed: int | None,
               weights: dict[str, Any] | None = None, inputs: dict[str, Any] | None = None, **extra: Any
               ) -> dict[str, Any]:
        """The provenance record of a result this step writes (`cirlib.provenance.record`): `cfg`'s fields, the files
        it read (weights, inputs, the splits' annotation files), and where and how it ran."""
        return provenance.record(self.step, identity(cfg), weights=weights, inputs=inputs, splits=sets,
                                 dataset=dataset, data_root=root, preset=preset, device=device(),
                                 precision=precision, seed=seed, outputs=cfg.outputs, **extra)

    def start(self, config: Mapping[str, Any], record: Callable[[], dict[str, Any]]) -> None:
        """Begin (or resume) a training run on the main process (`RunFolder.start`), then a barrier (collective)."""
        self.write(lambda: self.run.start(config, record()))

    def write_json(self, path: Path, content: Callable[[], Any]) -> None:
        """Write content() as JSON at `path` on the main process, then a barrier (collective)."""
        self.write(lambda: paths.write_json(path, content()))
