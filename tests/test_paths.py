"""The one writer (cirlib.paths): every failed write names its file and says why, whichever library wrote it."""
from __future__ import annotations

import collections

import pytest
import torch

from cirlib import paths
from cirlib.paths import FileWriteError

TORCH_FULL_DISK = "[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0"


def _torch_fails(tmp):
    torch.save({"x": torch.zeros(2)}, tmp)
    raise RuntimeError(TORCH_FULL_DISK)  # what torch.save says when the disk fills mid-write


def test_a_torch_write_failure_names_the_file_and_the_full_disk(tmp_path, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda p: usage(10**9, 10**9, 0))
    target = tmp_path / "topk_val.pt"
    with pytest.raises(FileWriteError, match=rf"cannot write {target}.*disk is full") as caught:
        paths.atomic_write(target, _torch_fails)
    assert "inline_container" not in str(caught.value)
    assert not list(tmp_path.iterdir())  # nothing half-written left beside it


def test_another_library_failure_still_names_the_file(tmp_path):
    target = tmp_path / "labels.pt"
    with pytest.raises(FileWriteError, match=rf"cannot write {target}: .*unexpected pos 64 vs 0"):
        paths.atomic_write(target, _torch_fails)


def test_a_checkpoint_or_log_write_failure_is_translated_as_any_file_write(tmp_path, monkeypatch):
    """One translation of failed writes: a checkpoint's torch/safetensors RuntimeError and a metrics log's OSError
    say what atomic_write says for the same failure (errno, the file, what to do)."""
    import errno

    from torch import nn

    from cirlib.train import checkpoints, metrics_log

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda p: usage(10**9, 10**9, 0))

    def full(*args, **kwargs):
        raise RuntimeError(TORCH_FULL_DISK)

    monkeypatch.setattr(checkpoints, "save_model", full)
    final = tmp_path / "run" / "checkpoints" / "last"
    with pytest.raises(FileWriteError, match=rf"cannot write {final / 'model.safetensors'}: .*disk is full") as ckpt:
        checkpoints.write_checkpoint(final, nn.Linear(1, 1), {}, None, lambda p: None)
    with pytest.raises(FileWriteError) as plain:
        paths.atomic_write(tmp_path / "model.safetensors", full)
    assert ckpt.value.errno == plain.value.errno == errno.ENOSPC and "inline_container" not in str(ckpt.value)
    assert str(ckpt.value).split(": ", 1)[1] == str(plain.value).split(": ", 1)[1]
    # the metrics log: an OSError while appending, said as atomic_write says it
    from cirlib.run_folder import RunFolder

    log = metrics_log.MetricsLog(RunFolder.at(tmp_path / "logrun"), enabled=True)
    (tmp_path / "logrun" / "metrics.jsonl").mkdir(parents=True)  # a folder where the file goes: cannot be opened
    with pytest.raises(FileWriteError, match=rf"cannot write {log.jsonl}: .*\(if the disk is full, free space; if "
                                             r"the folder is read-only, choose a writable output folder\)"):
        log.append({"kind": "train"})
