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
