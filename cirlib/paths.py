"""Filesystem anchors. Every path in cirlib derives from the repository root, never the working directory."""
from __future__ import annotations

import os
from pathlib import Path

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
