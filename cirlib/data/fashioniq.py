"""FashionIQ (github.com/XiaoxiaoGuo/fashion-iq): the dataset class. Its layout is read by
`cirlib.data.readers.load_fiq_layout`; a variant with other categories subclasses `FashionIQ` and sets `categories`,
`train_order` and `public_*`."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Mapping, Sequence

from cirlib.data import readers
from cirlib.data.dataset import DATASETS, Dataset
from cirlib.eval import metrics as M


@DATASETS.register
class FashionIQ(Dataset):
    """FashionIQ: one gallery per category and split, two captions per query joined into one text, R@10/R@50 per
    category and their means."""

    name = "fashioniq"
    title = "FashionIQ"
    splits = readers.FIQ_SPLITS
    test_split = "test"
    categories = readers.FIQ_CATEGORIES
    train_order = readers.FIQ_TRAIN_ORDER  # the original trains the categories jointly, concatenated in this order
    reported_ks = (1, 5, 10, 50)
    headline_ks = (10, 50)  # average_recall = (avg R@10 + avg R@50) / 2
    min_rerank_k = 50  # reported as R@10 and R@50 over the re-ranked list
    original_file_prefix = "fiq"
    original_category_key = "dress_types"
    layout = readers._FIQ_LAYOUT
    root_marker, root_folder = "captions", "fashionIQ_dataset"
    public_sha256 = {
        "image_splits/split.dress.train.json": "dcb1c7329003e85e39a3010147a620cee4b7de6a5ddf2626f253bc9a2cdd78e5",
        "image_splits/split.dress.val.json": "21ff91d53c23859da91bfd49f3acc139b7f3a3dc944fc4e4a80194468cf14bab",
        "image_splits/split.dress.test.json": "1d1d3af24b9ec4ed3f7805c53a870148df9b51e232b32912505d8ae54718353d",
        "image_splits/split.shirt.train.json": "1552c05d866d31b43321a719b2cb8a65f02c53e9a6bc355861fe1d62498b9983",
        "image_splits/split.shirt.val.json": "b82effbf7352a6f828b38c45eb32e53d726bd4d6fd81d6290c81eeb2c68e3234",
        "image_splits/split.shirt.test.json": "8d243830e80e77c23c8dc9a85db87813230d38da146f0706082db812f591968b",
        "image_splits/split.toptee.train.json": "aa9b3a55332340f21360fb6a3fe174badd27ce389fe7d78d890bf2b9032ffe05",
        "image_splits/split.toptee.val.json": "ee42b2505275dd7a19b11ddb88c9264aab2d77f4e59b075fb1c7c3095d02f412",
        "image_splits/split.toptee.test.json": "25a30d4f4013a04026585399b10980db7cba39dfaad0d97a0671a62e2125ddbf",
        "captions/cap.dress.train.json": "1691bd52e5bbda755b0c1f14d1024000be2c57a0cc29511a327af1372636a946",
        "captions/cap.dress.val.json": "5e5117d45695df9c3ca91fac3e0bc49e6422ae9c8b3793f0ac9b3ab83adb7de9",
        "captions/cap.dress.test.json": "190240b3b4d115cd4f80de65ab78ca18a3f8581c041cbeea6f5a1f57ee4f5a48",
        "captions/cap.shirt.train.json": "0999ce5da01a38f0cef1547941b738f4c56e225fdd9b8e03e2a6edaf292f94c3",
        "captions/cap.shirt.val.json": "7b7ca3797b85dddfd83e74cdb4454cb63e3e7c09acef2590155efbacea6d7feb",
        "captions/cap.shirt.test.json": "27c7551b005d4befa53135a7ddee5e31c97821eafd3ceb3fec514e7ac0ad83a7",
        "captions/cap.toptee.train.json": "6daa171a9e744823087780a3b69b8b697bd05526adb6dd55a38ee6c4904ab348",
        "captions/cap.toptee.val.json": "b4e09f428e6c255cc4b4ec46e77908305ab83075d82840c960be81af15cdc5eb",
        "captions/cap.toptee.test.json": "db822aa52340ce1f09c3000064f79b60b6c476b50b98bf34200dd2996c06e146",
    }
    public_counts = {
        ("train", "dress"): (5985, 11452), ("val", "dress"): (2017, 3817), ("test", "dress"): (2024, 3818),
        ("train", "shirt"): (5988, 19036), ("val", "shirt"): (2038, 6346), ("test", "shirt"): (2038, 6346),
        ("train", "toptee"): (6027, 16121), ("val", "toptee"): (1961, 5373), ("test", "toptee"): (2056, 5374),
    }

    def load_split(self, root: Path, split: str, category: str | None = None, *,
                   with_queries: bool = True) -> readers.SplitData:
        return readers.load_fiq_layout(root, split, category, with_queries, train_order=self.train_order,
                                       dataset=self.name)

    def query_text(self, query: readers.Query, split: str, rng: random.Random | None = None) -> str:
        """On "train" the original's random 4-way join drawn from `rng` (required, so training text is never
        silently deterministic); on val/test "C1 and c2"."""
        if split == self.splits[0]:
            if rng is None:
                raise ValueError(f"{self.title} training text is randomised: pass a seeded random.Random as rng")
            return readers.fiq_caption_join(query.captions, rng)
        return self.ranking_text(query)

    def ranking_text(self, query: readers.Query) -> str:
        """The fixed "C1 and c2" join, on every split (also train, when mining negatives from its top-K)."""
        return readers.fiq_caption_join(query.captions)

    table_note = "Avg = (Avg R@10 + Avg R@50) / 2, the means over the categories"

    def table_columns(self) -> tuple[tuple[str, str], ...]:
        """R@10 and R@50 per category, their means over the categories and Avg, as FashionIQ papers print them."""
        per_category = [(f"{c}_R@{k}", f"{c.capitalize()} R@{k}") for c in self.categories for k in self.headline_ks]
        return (*per_category, *((f"avg_R@{k}", f"Avg R@{k}") for k in self.headline_ks), ("Avg", "Avg"))

    def table_average(self, metrics: Mapping[str, float]) -> float | None:
        """(avg R@10 + avg R@50) / 2 (the original's `average_recall`), or None without either mean."""
        means = [f"avg_R@{k}" for k in self.headline_ks]
        return sum(float(metrics[m]) for m in means) / len(means) if set(means) <= set(metrics) else None

    def summary_metrics(self, per_split: Sequence[tuple[str | None, dict[str, float]]]) -> dict[str, float]:
        """Per-category R@K as "<category>_R@K", their means "avg_R@K", and average_recall = selection."""
        if not per_split:
            return {}
        out = M.fashioniq_summary(dict(per_split))
        out["selection"] = out["average_recall"]
        return out
