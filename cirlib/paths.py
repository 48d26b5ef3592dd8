"""Path helpers: filesystem anchors (every path in cirlib derives from the repository root, never the working
directory) and the one implementation of atomic file writing and JSON reading."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = REPO_ROOT / "outputs"
FIGURES = REPO_ROOT / "figures"
NOTEBOOKS = REPO_ROOT / "notebooks"
# The embedded synthetic world is generated here by `make demo` (ignored by git).
SYNTHETIC_ROOT = OUTPUTS / "synthetic"

DATA_ENV_VAR = "CIR_DATA"


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Resolve a dataset root: the explicit argument, else $CIR_DATA; relative paths are anchored at the repo root.

    Raises:
        ValueError: when neither an argument nor $CIR_DATA is given.
    """
    if root is None or str(root) == "":
        env = os.environ.get(DATA_ENV_VAR)
        if not env:
            raise ValueError(
                f"no dataset root given: pass data_root=... or set ${DATA_ENV_VAR} to the folder that holds "
                "the dataset (e.g. .../cirr_dataset or .../fashionIQ_dataset)"
            )
        root = env
    path = Path(root).expanduser()
    if not path.is_absolute():
        path = REPO_ROOT / path
    return path


SHARED_ENV_VAR = "CIRLIB_SHARED"


def shared_dir() -> Path:
    """The shared reference folder (fixtures from the original code, real annotation files, released artifacts).

    Looked for in $CIRLIB_SHARED, then beside the repository (`<repo>/../shared`, where CI lays it), then beside the
    checkout this one was cloned from when that is a local folder (a throw-away clone in /tmp still finds it).
    """
    import subprocess

    candidates = []
    if os.environ.get(SHARED_ENV_VAR):
        candidates.append(Path(os.environ[SHARED_ENV_VAR]).expanduser())
    candidates.append(REPO_ROOT.parent / "shared")
    try:
        origin = subprocess.run(["git", "-C", str(REPO_ROOT), "config", "--get", "remote.origin.url"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        origin = ""
    if origin and Path(origin).is_dir():
        candidates.append(Path(origin).resolve().parent / "shared")
    for path in candidates:
        if path.is_dir():
            return path
    raise FileNotFoundError(
        f"shared reference folder not found (looked in {', '.join(map(str, candidates))}); "
        f"set ${SHARED_ENV_VAR} to the folder that holds fixtures/, data/ and reference/")


# ----------------------------------------------------------------------------------------------------------------------
# Atomic file writing and JSON reading: the one implementation every room uses (a crash never leaves a half-written
# file or folder under its final name). The run-folder layout itself lives in `cirlib.run_folder`.
# ----------------------------------------------------------------------------------------------------------------------


class FileWriteError(OSError):
    """A file could not be written (disk full, read-only folder, ...); the message names the file and what to do."""


def write_failed(path: Path, err: BaseException) -> FileWriteError:
    """The FileWriteError naming `path` for a failed write, with what to do: the one translation of failed writes.

    Args:
        path: the file (or folder) that could not be written, as the user knows it (the final name).
        err: an OSError, or a library's RuntimeError (torch.save and safetensors report a full disk or a read-only
            folder that way): the folder's writability and free space then say which (`_os_error_of`).
    """
    import errno

    os_err = err if isinstance(err, OSError) else _os_error_of(path, err)
    hint = {errno.ENOSPC: "the disk is full: free space or write elsewhere",
            errno.EACCES: "no permission to write there: fix the folder's permissions or choose another folder",
            errno.EROFS: "the file system is read-only: choose another folder"}.get(
        os_err.errno, "if the disk is full, free space; if the folder is read-only, choose a writable output folder")
    return FileWriteError(os_err.errno or 0, f"cannot write {path}: {os_err.strerror or os_err} ({hint})")


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: str | os.PathLike, write: "Callable[[Path], object]") -> Path:
    """Call `write(tmp)` to fill a temporary file beside `path`, then rename it onto `path`.

    Args:
        path: the final file.
        write: writes the complete file at the path it is given (e.g. `lambda p: torch.save(obj, p)`).
    Raises:
        FileWriteError: naming `path` when the folder is not writable or the disk is full.
    """
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save and safetensors report a failed write as RuntimeError
        _discard(tmp)
        raise write_failed(path, err) from err
    except BaseException:
        _discard(tmp)
        raise
    return path


def _os_error_of(path: Path, err: RuntimeError) -> OSError:
    """The OSError behind a library's RuntimeError for a failed write (torch's "inline_container.cc ... strerror"
    says only which C++ file failed): the folder's writability and free space say which."""
    import errno
    import shutil

    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # e.g. a checkpoint folder not yet swapped in
        folder = folder.parent
    if not os.access(folder, os.W_OK):
        return OSError(errno.EACCES if os.access(folder, os.R_OK) else errno.EROFS, "the folder is not writable")
    try:
        if shutil.disk_usage(folder).free < 1 << 20:
            return OSError(errno.ENOSPC, "no space left on the device")
    except OSError:
        pass
    return OSError(errno.EIO, f"the write failed ({str(err).splitlines()[0][:200]})")


def publish(partial: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Rename a fully written file (or a folder, onto a name that does not exist) `partial` onto `final` in one step,
    for writers that must choose the partial file's name themselves (a suffix a library insists on, a `.partial` file
    a reader checks for); else use `atomic_write` or `atomic_dir`.

    Raises:
        FileWriteError: naming `final` when the rename fails.
    """
    final = Path(final)
    try:
        os.replace(partial, final)
    except OSError as err:
        raise write_failed(final, err) from err
    return final


def _discard(tmp: Path) -> None:
    """Remove a half-written temporary file; when its folder cannot even hold it (a file in the way), there is none."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def _json_default(o: object) -> object:
    import numpy as np

    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def to_json_text(obj: object) -> str:
    """The JSON text every cirlib file uses: indented, keys sorted, numpy scalars and paths converted."""
    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default)


def write_json(path: str | os.PathLike, obj: object) -> Path:
    """Write `obj` as JSON, atomically."""
    return atomic_write_text(path, to_json_text(obj) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read a JSON file; a missing or broken file raises an error naming it and what it is.

    Args:
        path: the file.
        what: what the file is, for the message (e.g. "stage-II evaluation record").
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{what} not found: {path}") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the {what} is not valid JSON ({err}); delete it (it is rewritten by the step "
                         "that made it) or restore it") from err


def swap_in_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move a fully written folder `tmp` onto `final`. A folder cannot be renamed onto a non-empty one, so the old one
    steps aside first (`.<name>.old`); a crash between the two renames leaves it there, and `existing_dir` falls back
    to it."""
    import shutil

    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".{final.name}.old")
    try:
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
    except OSError as err:
        raise write_failed(final, err) from err
    if old.exists():
        shutil.rmtree(old)
    return final


def existing_dir(final: str | os.PathLike) -> Path | None:
    """`final`, or the `.<name>.old` copy a crash inside `swap_in_dir` left behind, or None."""
    final = Path(final)
    if final.is_dir():
        return final
    old = final.with_name(f".{final.name}.old")
    return old if old.is_dir() else None


def check_writable(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Create `folder` if needed and prove a file can be written there, before hours of work depend on it."""
    folder = Path(folder)
    probe = folder / f".write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise write_failed(folder, err) from err
    return folder


class atomic_dir:
    """`with atomic_dir(final) as tmp:` fill the folder `tmp`; on success it replaces `final` (`swap_in_dir`), on an
    error it is removed and `final` is untouched."""

    def __init__(self, final: str | os.PathLike):
        self.final = Path(final)
        self.tmp = self.final.with_name(f".{self.final.name}.tmp-{os.getpid()}")

    def __enter__(self) -> Path:
        import shutil

        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        try:
            self.tmp.mkdir(parents=True)
        except OSError as err:
            raise write_failed(self.final, err) from err
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        import shutil

        if exc_type is None:
            swap_in_dir(self.tmp, self.final)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False
