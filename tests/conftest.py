"""Shared test set-up: offline hub, no display, and the location of the shared reference data."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from cirlib import paths  # noqa: E402
from cirlib.tools.verify_original import config_from_fixture  # noqa: E402


# The tests' tensors are tiny: a second intra-op thread gains nothing, and on a shared two-core machine two threads
# spinning against other processes made single tests up to 60x slower (test_stage2's oracle checks: 0.2 s vs 12 s).
# One thread for the whole session, so that a test's time no longer depends on what ran before it.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared reference folder (beside the repo in CI; see cirlib.paths.shared_dir); missing is an error."""
    return paths.shared_dir()


def _shared_subdir(shared_dir: Path, relative: str, what: str) -> Path:
    path = shared_dir / relative
    if not path.is_dir():
        raise FileNotFoundError(f"{what} missing at {path}")
    return path


@pytest.fixture(scope="session")
def fixture_dir(shared_dir: Path) -> Path:
    """The public oracle fixture made by running the original code (fixtures/original-tiny)."""
    return _shared_subdir(shared_dir, "fixtures/original-tiny", "public oracle fixture")


@pytest.fixture(scope="session")
def real(shared_dir: Path) -> Path:
    """The real CIRR and FashionIQ annotation files (data/real-annotations; no images)."""
    return _shared_subdir(shared_dir, "data/real-annotations", "real annotation files")


@pytest.fixture(scope="session")
def fixture_config(fixture_dir: Path):
    """The ModelConfig of the public fixture's config.json."""
    return config_from_fixture(json.loads((fixture_dir / "config.json").read_text()))


@pytest.fixture()
def vit_calls(monkeypatch):
    """The batch size of every call into any ViT (`timm`'s `forward_features`), to assert what was (not) encoded."""
    from timm.models.vision_transformer import VisionTransformer

    calls: list[int] = []
    original = VisionTransformer.forward_features

    def counting(self, x):
        calls.append(x.shape[0])
        return original(self, x)

    monkeypatch.setattr(VisionTransformer, "forward_features", counting)
    return calls


def _brute_force_search(query: torch.Tensor, gallery: torch.Tensor, excluded: list[set[int]], k: int):
    """Per query: each image's best vector (plain loops), excluded rows dropped, best first, ties in gallery order."""
    scores, rows = [], []
    for n, q in enumerate(query.tolist()):
        per_image = [max(sum(a * b for a, b in zip(q, v)) for v in image) for image in gallery.tolist()]
        order = sorted((g for g in range(len(per_image)) if g not in excluded[n]), key=lambda g: -per_image[g])[:k]
        rows.append(order)
        scores.append([per_image[g] for g in order])
    return scores, rows


@pytest.fixture(scope="session")
def brute_force_search():
    """A first-stage search written out: (query (N, D), gallery (G, V, D), excluded rows per query, k) ->
    (scores, rows) lists, each image scored by its best vector (the reference the searches are checked against)."""
    return _brute_force_search
