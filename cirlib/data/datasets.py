"""torch Datasets over a split: gallery images, training triplets, validation queries."""
from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import PIL.Image
import torch
from torch.utils.data import Dataset

from cirlib.data.dataset import get_dataset
from cirlib.data.readers import DatasetError, SplitData, load_image, query_text, split_label

# --------------------------------------------------------------------------------------------------------------------
# torch Datasets


def _open(data: SplitData, name: str, transform: Callable, role: str) -> torch.Tensor:
    try:
        return transform(load_image(data.image_path(name)))
    except DatasetError as e:
        raise DatasetError(f"{e} (while loading {role} {name!r} of {split_label(data)})") from e


class GalleryDataset(Dataset):
    """Gallery images in split-file order ("classic" mode): items {"name": str, "image": (3, S, S)}."""

    def __init__(self, split_data: SplitData, transform: Callable[[PIL.Image.Image], torch.Tensor]):
        self.data = split_data
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data.gallery)

    def __getitem__(self, i: int) -> dict[str, Any]:
        name = self.data.gallery[i]
        return {"name": name, "image": _open(self.data, name, self.transform, "gallery image")}


class TripletDataset(Dataset):
    """Training triplets: items {"reference", "target", "reference_image", "target_image", "text"}.

    FashionIQ training text is drawn from a generator seeded by (seed, epoch, index), so an item's text does not
    depend on worker count or visiting order; call `set_epoch` to draw fresh joins each epoch.
    """

    def __init__(self, split_data: SplitData, transform: Callable[[PIL.Image.Image], torch.Tensor], seed: int):
        if not split_data.has_targets:
            raise DatasetError(f"{split_label(split_data)} has no targets; triplets need a train or val split")
        if not split_data.queries:
            raise DatasetError(
                f"{split_label(split_data)} has no queries (read with with_queries=False, or an empty caption file)"
            )
        self.data = split_data
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose caption draws `__getitem__` returns."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.data.queries)

    def text(self, i: int) -> str:
        """Query text of item i for the current seed and epoch (no image is opened)."""
        # String seeds hash with SHA-512 inside `random`, so they are stable across processes (unlike hash()).
        rng = random.Random(f"{self.seed}:{self.epoch}:{i}")
        return query_text(self.data.queries[i], self.data.dataset, self.data.split, rng)

    def __getitem__(self, i: int) -> dict[str, Any]:
        q = self.data.queries[i]
        assert q.target is not None  # guaranteed by has_targets and the reader
        return {
            "reference": q.reference,
            "target": q.target,
            "reference_image": _open(self.data, q.reference, self.transform, f"reference of query {q.index}"),
            "target_image": _open(self.data, q.target, self.transform, f"target of query {q.index}"),
            "text": self.text(i),
        }


class QueryDataset(Dataset):
    """Queries without images ("relative" evaluation mode): items {"index", "pair_id", "reference", "target",
    "text", "members"}. The text is the dataset's ranking text on every split (FashionIQ: the fixed "C1 and c2" join,
    also on the train split)."""

    def __init__(self, split_data: SplitData):
        self.data = split_data

    def __len__(self) -> int:
        return len(self.data.queries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        q = self.data.queries[i]
        text = get_dataset(self.data).ranking_text(q)
        return {
            "index": q.index,
            "pair_id": q.pair_id,
            "reference": q.reference,
            "target": q.target,
            "text": text,
            "members": None if q.members is None else list(q.members),
        }


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate dataset items: tensors are stacked (B, ...), every other field becomes a list of length B.

    torch's default collate rejects None (FashionIQ pair_id, test targets) and transposes lists of names, so use this.

    Args:
        batch: items from one of the datasets above, all with the same keys.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out
