"""Shared test set-up: offline hub, no display, and the location of the shared reference data."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from cirlib import paths  # noqa: E402


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared reference folder (beside the repo in CI; see cirlib.paths.shared_dir); missing is an error."""
    return paths.shared_dir()
