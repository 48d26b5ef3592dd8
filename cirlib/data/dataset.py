"""Datasets as objects: one class per dataset, found by name through the `DATASETS` registry.

A dataset class owns what the rest of cirlib would otherwise decide by comparing names: its splits and categories,
how a split is read (`load_split`), the query text (training and ranking), what is excluded from a query's ranking,
its metrics and their K lists, its submission format (if it has a test server) and its public file hashes and counts
(the data check). Everything else asks the object:

    from cirlib.data.dataset import get_dataset
    ds = get_dataset(split_data)          # or get_dataset("cirr")
    ds.split_categories(cfg.categories)   # (None,) for a dataset without categories

The built-in datasets are `cirlib.data.cirr.CIRR`, `cirlib.data.fashioniq.FashionIQ` and `cirlib.data.circo.CIRCO`;
the synthetic worlds (`cirlib.data.synth`, `synth_circo`) write their layouts. A new dataset is one class registered
with `@DATASETS.register` (in cirlib/data/ or outside cirlib through CIRLIB_PLUGINS, see `cirlib.registry`); a
variant of an existing layout subclasses its class and changes a few attributes.
"""
from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

from cirlib.data.readers import DatasetError, Query, SplitData
from cirlib.registry import Registry, RegistryError

DATASETS: Registry = Registry("dataset", "cirlib.data")


class Dataset:
    """A dataset: class attributes describe it, methods read and score it. Instances hold no state."""

    name: ClassVar[str]  # what configs, YAML files and command lines say ("cirr")
    title: ClassVar[str]  # what messages say ("CIRR")
    splits: ClassVar[tuple[str, ...]]  # split names, train first
    test_split: ClassVar[str | None] = None  # the split whose targets only a server knows
    eval_split: ClassVar[str] = "val"  # the split results are reported on
    categories: ClassVar[tuple[str, ...]] = ()  # () = one gallery per split, no categories
    reported_ks: ClassVar[tuple[int, ...]] = (1, 5, 10, 50)  # Recall@K reported over the full gallery
    selection_key: ClassVar[str] = "selection"  # the metric that picks the best (epoch, fusion weight)
    headline_ks: ClassVar[tuple[int, ...]] = ()  # the K the model is selected and compared on (() = reported_ks)
    excludes_reference: ClassVar[bool] = False  # the reference image is removed from its own ranking
    has_image_sets: ClassVar[bool] = False  # queries carry an img_set (subset ranking, set negatives)
    min_rerank_k: ClassVar[int] = 0  # a re-ranked list must be at least this deep for the reported metrics
    has_test_server: ClassVar[bool] = False  # `submission_files` / `validate_submission` exist
    has_split_data: ClassVar[bool] = True  # `load_split` reads it (False: ranked through a gallery index, CIRCO)
    original_file_prefix: ClassVar[str] = ""  # the original's files: <prefix>_top_200_val[_<category>].pt
    original_category_key: ClassVar[str | None] = None  # the original's top-K key naming the category
    layout: ClassVar[str] = ""  # the expected on-disk layout, for error messages
    root_marker: ClassVar[str] = ""  # a folder every root holds (to recognise the folder that holds the root)
    root_folder: ClassVar[str] = ""  # the root folder's usual name ("cirr_dataset")
    public_sha256: ClassVar[Mapping[str, str | None]] = {}  # annotation file (relative to the root) -> sha256
    public_counts: ClassVar[Mapping[tuple[str, str | None], tuple[int, int]]] = {}  # (split, cat) -> (queries, images)

    def __repr__(self) -> str:
        return f"<dataset {self.name!r} ({type(self).__qualname__})>"

    # ------------------------------------------------------------------------------------------- splits, categories
    def split_categories(self, selected: str | Sequence[str] | None = None) -> tuple[str | None, ...]:
        """The categories a step runs on, one split each: `selected` (comma-separated or a list; empty = all of
        them), or (None,) for a dataset without categories (whatever `selected` says)."""
        if not self.categories:
            return (None,)
        if isinstance(selected, str):
            selected = [c.strip() for c in selected.split(",") if c.strip()]
        return tuple(selected) if selected else self.categories

    def all_splits(self) -> list[tuple[str, str | None]]:
        """Every (split, category) of the public release, categories outermost (the data check's order)."""
        return [(s, c) for c in self.split_categories() for s in self.splits]

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise DatasetError(f"unknown {self.title} split {split!r}; expected one of {list(self.splits)}")

    def check_category(self, category: str | None) -> None:
        """Refuse a category the dataset does not have (None is the joint one, or the only one)."""
        if category is None:
            return
        if not self.categories:
            raise DatasetError(f"{self.title} has no categories; got category={category!r} (pass None)")
        if category not in self.categories:
            raise DatasetError(f"unknown {self.title} category {category!r}; expected one of "
                               f"{list(self.categories)} or None (all of them)")

    # ---------------------------------------------------------------------------------------------------- reading
    def load_split(self, root: Path, split: str, category: str | None = None, *,
                   with_queries: bool = True) -> SplitData:
        """Parse and validate one split's annotation files (no image is opened); see `cirlib.data.load_split`."""
        raise DatasetError(f"{self.title} has no SplitData reader ({type(self).__qualname__}.load_split)")

    # ------------------------------------------------------------------------------------------------- query text
    def query_text(self, query: Query, split: str, rng: random.Random | None = None) -> str:
        """The modification text fed to the model when training on `split` (default: the ranking text)."""
        return self.ranking_text(query)

    def ranking_text(self, query: Query) -> str:
        """The deterministic text a query is ranked with, on every split (default: its first caption)."""
        return query.captions[0]

    # ---------------------------------------------------------------------------------------------------- metrics
    def split_metrics(self, recall: dict[str, float], group_labels: Any = None) -> dict[str, float]:
        """The metrics of one split from its Recall@K (`reported_ks`) and, with image sets, its subset labels."""
        return dict(recall)

    def summary_metrics(self, per_split: Sequence[tuple[str | None, dict[str, float]]]) -> dict[str, float]:
        """The reported metrics from each (category, split metrics), with "selection" (what picks the best epoch)."""
        out: dict[str, float] = {}
        for _, metrics in per_split:
            out.update(metrics)
        if out:
            out["selection"] = sum(out[f"R@{k}"] for k in self.reported_ks) / len(self.reported_ks)
        return out

    # ------------------------------------------------------------------------------------------------ paper tables
    table_note: ClassVar[str] = ""  # what the tables' caption says about the columns (e.g. how "Avg" is computed)

    def table_columns(self) -> tuple[tuple[str, str], ...]:
        """The metric columns of this dataset's results table in papers (`cirlib.workbook.tables`), in the papers'
        order: (metric key as metrics.json names it, or "Avg" for `table_average`; column header)."""
        return tuple((f"R@{k}", f"R@{k}") for k in self.reported_ks)

    def table_average(self, metrics: Mapping[str, float]) -> float | None:
        """The papers' headline average ("Avg") of one result's metrics; None when the dataset has none or a part
        of it is missing (e.g. R@50 of a list re-ranked to depth 32)."""
        return None

    def original_files(self, folder: Path, category: str | None) -> tuple[Path, Path]:
        """The original's validation (stage-I top-K file, stage-II label tensor) in `folder`."""
        tail = "" if category is None else f"_{category}"
        return (folder / f"{self.original_file_prefix}_top_200_val{tail}.pt",
                folder / f"{self.original_file_prefix}_stageII_labels_val{tail}.pt")


def get_dataset(which: str | Any) -> Dataset:
    """The dataset object of a name ("cirr", case-insensitive) or of anything with a `.dataset` name (a SplitData, a
    TopK, a config). Plugins (CIRLIB_PLUGINS) are imported first for an unknown name; raises DatasetError naming the
    known datasets."""
    name = which if isinstance(which, str) else getattr(which, "dataset", which)
    if not isinstance(name, str):
        raise DatasetError(f"a dataset is named by a string, got {name!r}")
    try:
        cls = DATASETS.get(name if name in DATASETS else name.lower())
    except RegistryError as err:
        raise DatasetError(str(err)) from None
    return _instance(cls)


@cache
def _instance(cls: type[Dataset]) -> Dataset:
    return cls()


def dataset_names() -> tuple[str, ...]:
    """Every registered dataset name (plugins imported first)."""
    return DATASETS.names()


def original_topk_dataset(raw: Mapping[str, Any]) -> str:
    """The dataset of one of the original's top-K dicts (no 'cirlib' metadata). Candidates are the classes that name
    the original's files themselves (`original_file_prefix` set in the class, not inherited: CIRR, FashionIQ): the one
    whose category key the dict holds, else the one without a category key."""
    own = [get_dataset(n) for n in dataset_names() if vars(type(get_dataset(n))).get("original_file_prefix")]
    keyed = [d.name for d in own if d.original_category_key is not None and d.original_category_key in raw]
    plain = [d.name for d in own if d.original_category_key is None]
    found = keyed or plain
    if len(found) != 1:
        raise DatasetError(f"cannot tell which dataset an original top-K file is for (candidates: {found})")
    return found[0]
