"""Shared test set-up: offline hub, no display, and the location of the shared reference data."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from cirlib import paths  # noqa: E402
from cirlib.verify_original import config_from_fixture  # noqa: E402


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared reference folder (beside the repo in CI; see cirlib.paths.shared_dir); missing is an error."""
    return paths.shared_dir()


@pytest.fixture(scope="session")
def fixture_dir(shared_dir: Path) -> Path:
    """The public oracle fixture made by running the original code (fixtures/original-tiny)."""
    path = shared_dir / "fixtures" / "original-tiny"
    if not path.is_dir():
        raise FileNotFoundError(f"public oracle fixture missing at {path}")
    return path


@pytest.fixture(scope="session")
def fixture_config(fixture_dir: Path):
    """The ModelConfig of the public fixture's config.json."""
    return config_from_fixture(json.loads((fixture_dir / "config.json").read_text()))
