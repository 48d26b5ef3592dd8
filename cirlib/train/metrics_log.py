"""The training log of a run: `metrics.jsonl` (append-only, one JSON object per logged step, epoch and validation)
mirrored to `metrics.csv`; both named by `cirlib.run_folder.RunFolder`. Only the main process writes.

A resumed run keeps the records its checkpoint covers and drops the rest: what a crashed run wrote after its last
checkpoint is retrained and logged again, including a last line cut off in the middle by the crash.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from cirlib import paths
from cirlib.run_folder import RunFolder
from cirlib.train.checkpoints import CheckpointError


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of the run's metrics.jsonl, in order."""
    path = RunFolder.at(Path(run_dir).expanduser()).log_file
    if not path.is_file():
        raise FileNotFoundError(f"no metrics log at {path}")
    return _parse(path, path.read_text(encoding="utf-8").splitlines())


def _parse(path: Path, lines: list[str]) -> list[dict[str, Any]]:
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {i + 1} is not valid JSON ({err})") from err
    return records


class MetricsLog:
    """metrics.jsonl (append-only) mirrored to metrics.csv; only the main process writes (`enabled`)."""

    BASE_COLUMNS = ("kind", "epoch", "step", "lr", "loss", "time")

    def __init__(self, run: RunFolder, enabled: bool):
        self.jsonl, self.csv = run.log_file, run.log_csv_file
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        self.columns: list[str] = list(self.BASE_COLUMNS)

    def start(self, keep: int) -> None:
        """Keep the first `keep` records of an existing log (those a checkpoint covers) and drop the rest.

        Lines past `keep` are not parsed: a crash may have cut the last one off mid-write.
        """
        if not self.enabled:
            return
        lines = self.jsonl.read_text(encoding="utf-8").splitlines() if self.jsonl.is_file() else []
        lines = [line for line in lines if line.strip()]
        if len(lines) < keep:
            raise CheckpointError(f"{self.jsonl} has {len(lines)} records but the checkpoint expects at least {keep}: "
                                  "the log was edited or replaced; restore it, or train the run again with "
                                  "overwrite=True")
        self.records = _parse(self.jsonl, lines[:keep])
        for r in self.records:
            self.columns += [k for k in r if k not in self.columns]
        paths.atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.records))
        self._rewrite_csv()

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        try:
            with self.jsonl.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            raise paths.write_failed(self.jsonl, err) from err
        new = [k for k in record if k not in self.columns]
        if new:  # a new column: rewrite the whole CSV with the wider header
            self.columns += new
            self._rewrite_csv()
            return
        try:
            with self.csv.open("a", newline="", encoding="utf-8") as f:
                csv.writer(f).writerow(self._row(record))
        except OSError as err:
            raise paths.write_failed(self.csv, err) from err

    def _row(self, record: dict[str, Any]) -> list[Any]:
        return ["" if record.get(c) is None else record.get(c) for c in self.columns]

    def _rewrite_csv(self) -> None:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(self.columns)
        writer.writerows(self._row(r) for r in self.records)
        paths.atomic_write_text(self.csv, buf.getvalue())
