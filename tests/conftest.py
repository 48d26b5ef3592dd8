"""Shared test set-up: offline hub, few threads, and the location of the shared reference data."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from cirlib.paths import REPO_ROOT  # noqa: E402

SHARED = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared reference folder laid beside the repository (CI clones the repo next to a copy of it)."""
    if not SHARED.is_dir():
        raise FileNotFoundError(f"shared reference data not found at {SHARED}; the tests need it beside the repo")
    return SHARED
