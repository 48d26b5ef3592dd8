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
