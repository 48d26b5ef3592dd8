"""The checkpoint format of the training loop: writing a checkpoint folder atomically, reading it back with errors that
name the damaged file and say what to do, and the RNG streams a bit-identical resume needs.

A checkpoint folder (`RunFolder.checkpoint_dir("last" | "best")`) holds
    model.safetensors   the weights of `task.model` (the run folder's WEIGHTS_FILE)
    info.json           what the checkpoint is: format, counters, best and latest validation, config, runtime
    state.pt            last/ only: optimizer, fp16 loss scaler, the task's extra state, every process's RNG streams
                        and running log sums (tensors, numbers, lists and dicts: loadable with weights_only=True)
plus any files the task writes (`save_extra_files`).

Why not Accelerate's `save_state`/`load_state`: `load_state` loads objects registered with
`register_for_checkpointing` (our counters, log sums, the task's state) with `weights_only=False`, which we never
allow; it catches and only logs a failure to restore the RNG states ("Could not load random states"), which would
silently break the bit-identical resume instead of naming the damaged file; and it writes in place, where a crash
leaves a half-written folder under the final name. This module keeps one folder written whole and swapped in
(`cirlib.paths.atomic_dir`), and everything loaded with `weights_only=True`.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from cirlib import paths
from cirlib.run_folder import WEIGHTS_FILE, RunFolder, RunFolderError

CHECKPOINT_FORMAT = "cirlib.train/2"
# Format 1 kept the log length in state.pt and had no pending validation; its checkpoints still resume.
READABLE_FORMATS = ("cirlib.train/1", CHECKPOINT_FORMAT)
INFO_FILE = "info.json"  # the checkpoint's record (counters, validation, config)
STATE_FILE = "state.pt"  # last/ only: what a resume needs besides the weights


class CheckpointError(RunFolderError):
    """A checkpoint file is missing, damaged or from another run; the message names the file and what to do."""


def checkpoint_dir(run_dir: str | os.PathLike, which: str = "best") -> Path:
    """Path of a run's "best" or "last" checkpoint folder (it may not exist yet)."""
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    return RunFolder.at(Path(run_dir).expanduser()).checkpoint_dir(which)


def _restart_hint(folder: Path) -> str:
    # Not "delete the folder": the run's other checkpoint (best/) and its training log would stay behind and disagree
    # with a run trained afresh; overwrite=True clears all of them together.
    return (f"the checkpoint {folder} is damaged (a crash or a full disk while it was written?): restore the file, or "
            "train this run from scratch with overwrite=True (which clears its checkpoints and training log)")


def _save(path: Path, final: Path, write: Callable[[Path], object]) -> None:
    """`write(path)`; a failure names `final`, the file's name once the folder is swapped in."""
    try:
        write(path)
    except (OSError, RuntimeError) as err:  # torch.save / safetensors report a full disk as RuntimeError
        raise paths.write_failed(final, err) from err


def write_checkpoint(final: Path, model: nn.Module, info: dict[str, Any], state: dict[str, Any] | None,
                     save_extra_files: Callable[[Path], None]) -> None:
    """Write the checkpoint folder `final` whole: built beside it, then swapped in (a crash leaves the old one).

    Args:
        final: RunFolder.checkpoint_dir("last" | "best").
        model: the module whose weights are saved (the task's `model`, unwrapped).
        info: the checkpoint record (JSON).
        state: last/ only: optimizer, scaler, RNG streams... (None for best/).
        save_extra_files: the task's hook writing extra files into the folder being built.
    """
    with paths.atomic_dir(final) as tmp:
        _save(tmp / WEIGHTS_FILE, final / WEIGHTS_FILE,
              lambda p: save_model(model, str(p), metadata={"format": "pt"}))
        if state is not None:
            _save(tmp / STATE_FILE, final / STATE_FILE, lambda p: torch.save(state, p))
        _save(tmp / INFO_FILE, final / INFO_FILE,
              lambda p: p.write_text(paths.to_json_text(info) + "\n", encoding="utf-8"))
        save_extra_files(tmp)


def update_info(folder: Path, info: dict[str, Any]) -> None:
    """Replace the record of an existing checkpoint (after its epoch's validation), atomically."""
    paths.write_json(folder / INFO_FILE, info)


def existing_checkpoint(final: Path) -> Path | None:
    """The checkpoint folder, or the copy a crash during its swap left behind, or None."""
    return paths.existing_dir(final)


def read_info(folder: Path) -> dict[str, Any]:
    """The checkpoint's record; a missing, broken or foreign info.json raises CheckpointError naming it."""
    path = folder / INFO_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # not read_json: its "delete it" does not hold for a checkpoint's record
        raise CheckpointError(f"{path}: cannot read the checkpoint record ({type(err).__name__}: {err}); "
                              f"{_restart_hint(folder)}") from err
    if not isinstance(info, dict) or info.get("format") not in READABLE_FORMATS:
        found = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise CheckpointError(f"{path}: checkpoint format {found!r}, expected one of {READABLE_FORMATS} (written by "
                              "another version of cirlib.train); train this run again with overwrite=True")
    return info


def read_state(folder: Path) -> dict[str, Any]:
    """state.pt of a last/ checkpoint, loaded with weights_only=True; a missing or damaged file raises
    CheckpointError."""
    path = folder / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint cannot be resumed; {_restart_hint(folder)}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch reports a truncated zip as RuntimeError, a bad pickle as UnpicklingError, ...
        raise CheckpointError(f"{path}: cannot read the training state ({type(err).__name__}: {err}); "
                              f"{_restart_hint(folder)}") from err


def load_weights(model: nn.Module, checkpoint: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load `checkpoint/model.safetensors` (or a .safetensors file) into `model` in place; returns the model.

    Raises:
        FileNotFoundError: no weights file there. CheckpointError: the file is damaged (names it).
        RuntimeError: missing/unexpected keys when `strict`.
    """
    path = Path(checkpoint)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint weights at {path} (expected a {WEIGHTS_FILE} from cirlib.train)")
    try:
        missing, unexpected = load_model(model, str(path), strict=False, device="cpu")
    except Exception as err:  # safetensors reports a truncated file as SafetensorError (header or data size)
        raise CheckpointError(f"{path}: cannot read the weights ({type(err).__name__}: {err}); "
                              f"{_restart_hint(path.parent)}") from err
    if strict and (missing or unexpected):
        raise RuntimeError(
            f"{path} does not match {type(model).__name__}: missing keys {sorted(missing)[:10]}, "
            f"unexpected keys {sorted(unexpected)[:10]}"
        )
    return model


# ----------------------------------------------------------------------------------------------------------------------
# RNG streams (as tensors, ints and lists so that weights_only loading works)
# ----------------------------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch and CUDA generator states."""
    version, internal, gauss = random.getstate()
    _, key, pos, has_gauss, cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {
        "python": [version, list(internal), gauss],
        "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": [s.cpu() for s in cuda],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    np_state = state["numpy"]
    key = np_state["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, np_state["pos"], np_state["has_gauss"], np_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            raise ValueError(
                f"checkpoint holds CUDA RNG states for {len(state['cuda'])} devices, this machine has "
                f"{torch.cuda.device_count()}; resume on the same device count (or overwrite=True)"
            )
        torch.cuda.set_rng_state_all(state["cuda"])
