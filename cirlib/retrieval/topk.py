"""The stage-I -> stage-II hand-off: a validated top-K artifact that reads and writes the original's file format.

A top-K file is a `torch.save`d dict in the original's exact layout (original-system.md section 4.2), so the original
code reads our files and we read the original's released ones:

    'sorted_index_names'  numpy `<U` array (N, K), gallery names best first
    'target_names'        list[str] (N)           (absent for test splits)
    'index_names'         list[str] (G)           the gallery in split-file order
    'labels'              torch.bool (N, K)       (absent for test splits)
    'group_labels'        torch.bool (N, 5)       CIRR with targets only
    'split'               str
    'dress_types'         str                     FashionIQ only (the category)

plus our own metadata under 'cirlib' (format version, dataset, category, k, scores, stage-I run name, whether the
reference was removed, the CIRR subset names, the cirlib version, and after stage II the stage-II scores). Two records
say what made the file: `provenance`, the narrow key reuse decisions compare (weights hash, settings), and
`produced_by`, the full `cirlib.provenance` record (commit, package versions, annotation hashes, ...), which is only
kept and shown: comparing it would make every commit invalidate every file.

The same format holds the stage-II result (`outputs/stage2/<run>/reranked_<split>[_<category>].pt`): the K re-ranked
candidates in STAGE-I order with their stage-I `scores` and their `stage2_scores` (plus `group_stage2_scores` for the
CIRR subset). A pair's stage-II score does not depend on the other candidates, so `reranked(fusion_weight, k)`
re-orders any k' <= K with any fusion weight from the file alone; it is the one place a ranked list is re-ordered.

The original has no 'cirlib' key; its dataset is then inferred from the presence of 'dress_types'. In memory (`TopK`)
names are numpy string arrays and labels/scores CPU torch tensors, as in the file.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from cirlib.data.dataset import DATASETS, Dataset, get_dataset, original_topk_dataset
from cirlib.eval.metrics import fuse_scores
from cirlib.paths import atomic_write

FORMAT_VERSION = 1
ORIGINAL_KEYS = (
    "sorted_index_names", "target_names", "index_names", "labels", "group_labels", "split", "dress_types"
)


class TopKError(ValueError):
    """A top-K file or object is malformed, or does not match what the caller expects."""


def _dataset(name: Any) -> Dataset:
    """The dataset object of a top-K's dataset name (an unknown one is a TopKError)."""
    if not isinstance(name, str) or name not in DATASETS:
        raise TopKError(f"dataset must be one of {DATASETS.names()} (registered datasets), got {name!r}")
    return get_dataset(name)


def _numpy_string_array_globals() -> list:
    """The only non-torch globals a top-K pickle may use: what rebuilding a numpy `<U` array needs."""
    reconstruct = np._core.multiarray._reconstruct
    return [
        reconstruct,
        # files written under numpy 1.x (the original's) name the same function by its old module path
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        np.dtypes.StrDType,
    ]


def read_topk_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Read a top-K file's raw dict (ours or the original's) with `weights_only=True`; no validation.

    Args:
        path: a `.pt` file written by `TopK.save` or by the original's validate.py.
    """
    path = Path(path)
    if not path.is_file():
        raise TopKError(f"{path}: top-K file not found")
    try:
        with torch.serialization.safe_globals(_numpy_string_array_globals()):
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # re-raised with the file name; torch's own message is kept as the cause
        raise TopKError(
            f"{path}: cannot be read as a top-K file with weights_only=True ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(raw, dict):
        raise TopKError(f"{path}: expected a dict (the top-K layout), got {type(raw).__name__}")
    return raw


def _cirlib_version() -> str:
    try:
        return metadata.version("cirlib")
    except metadata.PackageNotFoundError:
        # running from a source checkout that was never pip-installed: the version is genuinely unknown
        return "0+unknown"


def _names_matrix(x: Any, what: str) -> np.ndarray:
    arr = np.asarray(x.tolist() if isinstance(x, torch.Tensor) else x)
    if arr.ndim != 2:
        raise TopKError(f"{what} must be a 2-D (N, K) array of names, got shape {arr.shape}")
    if arr.size and arr.dtype.kind != "U":
        raise TopKError(f"{what} must hold strings (numpy '<U'), got dtype {arr.dtype}")
    return arr.astype(str)


def _bool_matrix(x: Any, what: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.dtype != np.bool_:
        raise TopKError(f"{what} must be boolean, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr)


def _readonly(arr: np.ndarray) -> np.ndarray:
    arr = np.array(arr, copy=True)
    arr.flags.writeable = False
    return arr


def _own_tensor(arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    # a private CPU copy: callers' arrays never alias the artifact, and saving writes exactly (N, K) elements
    return torch.from_numpy(np.array(arr, copy=True, order="C")).to(dtype)


def _float_matrix(x: Any, what: str, shape: tuple[int, int]) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        # numpy has no bfloat16/half of its own; scores are stored as float32 anyway
        x = x.detach().cpu().float().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.shape != shape or not np.issubdtype(arr.dtype, np.floating):
        raise TopKError(f"{what} must be float (N, K) = {shape}, got {arr.dtype} {arr.shape}")
    return _own_tensor(arr, torch.float32)


@dataclass(frozen=True, eq=False)
class TopK:
    """Top-K candidates for every query of one split (one category for FashionIQ), and after stage II their scores.

    Row i is query i in caption-file order. Names are read-only numpy string arrays; labels and scores are CPU torch
    tensors (as in the original's file); all are private copies of what was passed in (numpy or torch). Build a new
    TopK (`head`, `rows`, `sliced`, `reordered`, `reranked`, `dataclasses.replace`) instead of mutating. Missing
    labels are derived from `target_names`; given labels are checked against them.
    """

    # a registered dataset name ("cirr" | "fashioniq" | ...; `cirlib.data.get_dataset`); None: a gallery index's
    # ranked list (`workbook.search.rank`)
    dataset: str | None
    split: str  # CIRR "train" | "val" | "test1"; FashionIQ "train" | "val" | "test"
    category: str | None  # FashionIQ category ("dress", ...); None for CIRR
    sorted_index_names: np.ndarray  # (N, K) str, gallery names best first
    index_names: tuple[str, ...]  # (G,) the gallery in split-file order
    target_names: tuple[str, ...] | None = None  # (N,) None for test splits
    scores: torch.Tensor | None = None  # (N, K) float32 stage-I scores, None when unknown (original files)
    labels: torch.Tensor | None = None  # (N, K) bool, True at the target; all-False row = target not in top-K
    group_labels: torch.Tensor | None = None  # (N, 5) bool, CIRR subset in stage-I order, True at the target
    group_names: np.ndarray | None = None  # (N, 5) str, CIRR non-reference img_set members in stage-I order
    reference_removed: bool | None = None  # None -> the original's convention: CIRR True, FashionIQ False
    stage1_run: str | None = None  # name of the stage-I run that produced the ranking
    # what produced the file (JSON-able): e.g. the stage-I weights' sha256, the config hash; reuse decisions read it
    provenance: dict[str, Any] | None = None
    # the full record of what produced the file (`cirlib.provenance.record`): described, never compared for reuse
    produced_by: dict[str, Any] | None = None
    # (N, K) float32 stage-II score of each candidate (column-aligned with sorted_index_names); None before stage II
    stage2_scores: torch.Tensor | None = None
    # (N, 5) float32 stage-II score of each CIRR subset member (column-aligned with group_names); None before stage II
    group_stage2_scores: torch.Tensor | None = None
    # (N, K) int64 position of each candidate in index_names (derived, e.g. to gather gallery features)
    candidate_index: np.ndarray = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        ds = None if self.dataset is None else _dataset(self.dataset)
        if ds is not None and ds.categories and not self.category:
            raise TopKError(f"a {ds.title} top-K needs its category (one of {', '.join(ds.categories)})")
        if ds is not None and not ds.categories and self.category is not None:
            raise TopKError(f"a {ds.title} top-K has no category, got {self.category!r}")
        if ds is not None and not ds.has_image_sets and (self.group_labels is not None or self.group_names is not None):
            raise TopKError(f"group_labels / group_names are the ranking of a query's image set; {ds.title} has none")
        if self.reference_removed is None:
            set_("reference_removed", ds is not None and ds.excludes_reference)

        names = _names_matrix(self.sorted_index_names, "sorted_index_names")
        n, k = names.shape
        if k < 1:
            raise TopKError("sorted_index_names has K = 0 columns")
        set_("sorted_index_names", _readonly(names))
        set_("index_names", tuple(str(x) for x in self.index_names))
        position = {name: i for i, name in enumerate(self.index_names)}
        if len(position) != len(self.index_names):
            raise TopKError("index_names holds duplicate gallery names")
        # a dict lookup is several times faster than np.isin on string arrays for full-size (4k x 200) files
        index = np.fromiter(
            (position.get(x, -1) for x in names.ravel().tolist()), dtype=np.int64, count=names.size
        ).reshape(n, k)
        unknown = np.flatnonzero(index.ravel() < 0)
        if unknown.size:
            i, j = divmod(int(unknown[0]), k)
            raise TopKError(
                f"sorted_index_names[{i}, {j}] = {str(names[i, j])!r} is not in index_names "
                f"({unknown.size} such entries)"
            )
        # duplicates in a row would make the labels ambiguous and the re-ranking meaningless
        srt = np.sort(index, axis=1)
        dup_rows = np.flatnonzero((srt[:, 1:] == srt[:, :-1]).any(axis=1))
        if dup_rows.size:
            raise TopKError(f"row {int(dup_rows[0])} of sorted_index_names repeats a name ({dup_rows.size} such rows)")
        set_("candidate_index", _readonly(index))

        if self.target_names is not None:
            targets = tuple(str(t) for t in self.target_names)
            if len(targets) != n:
                raise TopKError(f"target_names has {len(targets)} entries, expected N = {n} (one per query)")
            set_("target_names", targets)
            derived = names == np.asarray(targets, dtype=str)[:, None]  # (N, K)
            if self.labels is None:
                set_("labels", derived)
            else:
                given = _bool_matrix(self.labels, "labels")
                if given.shape != (n, k):
                    raise TopKError(f"labels has shape {given.shape}, expected (N, K) = {(n, k)}")
                bad = np.flatnonzero((given != derived).any(axis=1))
                if bad.size:
                    raise TopKError(
                        f"labels row {int(bad[0])} does not mark where target {targets[bad[0]]!r} sits in "
                        f"sorted_index_names ({bad.size} such rows)"
                    )
        if self.labels is not None:
            lab = _bool_matrix(self.labels, "labels")
            if lab.shape != (n, k):
                raise TopKError(f"labels has shape {lab.shape}, expected (N, K) = {(n, k)}")
            many = np.flatnonzero(lab.sum(axis=1) > 1)
            if many.size:
                raise TopKError(f"labels row {int(many[0])} has more than one True ({many.size} such rows)")
            set_("labels", _own_tensor(lab, torch.bool))

        for name in ("scores", "stage2_scores"):
            if getattr(self, name) is not None:
                set_(name, _float_matrix(getattr(self, name), name, (n, k)))

        if self.group_names is not None:
            gn = _names_matrix(self.group_names, "group_names")
            if gn.shape[0] != n:
                raise TopKError(f"group_names has {gn.shape[0]} rows, expected N = {n}")
            set_("group_names", _readonly(gn))
            if self.target_names is not None:
                derived = gn == np.asarray(self.target_names, dtype=str)[:, None]
                if self.group_labels is None:
                    set_("group_labels", derived)
                elif not np.array_equal(_bool_matrix(self.group_labels, "group_labels"), derived):
                    raise TopKError("group_labels do not mark the targets' positions in group_names")
        if self.group_labels is not None:
            gl = _bool_matrix(self.group_labels, "group_labels")
            if gl.ndim != 2 or gl.shape[0] != n:
                raise TopKError(f"group_labels must be (N, 5) with N = {n}, got {gl.shape}")
            bad = np.flatnonzero(gl.sum(axis=1) != 1)
            if bad.size:
                raise TopKError(
                    f"group_labels row {int(bad[0])} must have exactly one True (the target is always an img_set "
                    f"member), has {int(gl[bad[0]].sum())}"
                )
            if self.group_names is not None and gl.shape != self.group_names.shape:
                raise TopKError(f"group_labels {gl.shape} and group_names {self.group_names.shape} differ in shape")
            set_("group_labels", _own_tensor(gl, torch.bool))
        if self.group_stage2_scores is not None:
            if self.group_names is None:
                raise TopKError("group_stage2_scores score the CIRR subset members, but group_names is missing")
            set_("group_stage2_scores", _float_matrix(self.group_stage2_scores, "group_stage2_scores",
                                                      tuple(self.group_names.shape)))

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def k(self) -> int:
        """Candidates per query (columns)."""
        return int(self.sorted_index_names.shape[1])

    @property
    def num_queries(self) -> int:
        """Queries (rows)."""
        return int(self.sorted_index_names.shape[0])

    # ------------------------------------------------------------------------------------------------ transforms
    def head(self, n: int) -> TopK:
        """The first n queries (rows), e.g. when a run evaluated only part of the split.

        Args:
            n: 1 <= n <= self.num_queries.
        """
        if not 1 <= n <= self.num_queries:
            raise TopKError(f"cannot take the first {n} of {self.num_queries} queries")
        return self if n == self.num_queries else self.rows(range(n))

    def rows(self, rows: Sequence[int]) -> TopK:
        """Only the given queries (rows), in that order, e.g. the few shown in a qualitative grid.

        Args:
            rows: row indices, each in 0..num_queries-1.
        """
        idx = np.asarray(list(rows), dtype=np.int64).reshape(-1)
        bad = idx[(idx < 0) | (idx >= self.num_queries)]
        if bad.size:
            raise TopKError(f"query rows {bad.tolist()[:5]} outside 0..{self.num_queries - 1}")
        if idx.size == 0:
            raise TopKError("rows: no rows given (a top-K holds at least one query)")
        pick_t = torch.from_numpy(idx)
        pick = lambda a: None if a is None else a[pick_t if isinstance(a, torch.Tensor) else idx]  # noqa: E731
        return dataclasses.replace(
            self,
            sorted_index_names=pick(self.sorted_index_names),
            target_names=None if self.target_names is None else tuple(self.target_names[i] for i in idx),
            scores=pick(self.scores),
            labels=pick(self.labels),
            group_labels=pick(self.group_labels),
            group_names=pick(self.group_names),
            stage2_scores=pick(self.stage2_scores),
            group_stage2_scores=pick(self.group_stage2_scores),
        )

    def sliced(self, k: int) -> TopK:
        """The first k candidates of every row (the original's `[:, :K]`).

        Args:
            k: 1 <= k <= self.k.
        """
        if not 1 <= k <= self.k:
            raise TopKError(f"cannot take the top {k} of a top-{self.k} list (need 1 <= k <= {self.k})")
        if k == self.k:
            return self
        cut = lambda a: None if a is None else a[:, :k]  # noqa: E731
        return dataclasses.replace(
            self, sorted_index_names=cut(self.sorted_index_names), scores=cut(self.scores), labels=cut(self.labels),
            stage2_scores=cut(self.stage2_scores),
        )

    def reordered(self, order: np.ndarray | torch.Tensor, group_order: np.ndarray | torch.Tensor | None = None) -> TopK:
        """The same candidates in a new per-row order; every per-candidate field moves with its candidate.

        Args:
            order: (N, K) int, each row a permutation of 0..K-1; new column j = old column order[i, j].
            group_order: (N, 5) int, the same for the CIRR subset (group_names), or None to keep it.
        """
        idx = _permutation(order, self.sorted_index_names.shape, "order")
        take = lambda a, i: None if a is None else torch.take_along_dim(a, torch.from_numpy(i), dim=1)  # noqa: E731
        out = dataclasses.replace(
            self,
            sorted_index_names=np.take_along_axis(self.sorted_index_names, idx, axis=1),
            labels=take(self.labels, idx),
            scores=take(self.scores, idx),
            stage2_scores=take(self.stage2_scores, idx),
        )
        if group_order is None:
            return out
        if self.group_names is None:
            raise TopKError("group_order re-orders the CIRR subset, but this top-K has no group_names")
        gidx = _permutation(group_order, self.group_names.shape, "group_order")
        return dataclasses.replace(
            out,
            group_names=np.take_along_axis(self.group_names, gidx, axis=1),
            group_labels=take(self.group_labels, gidx),
            group_stage2_scores=take(self.group_stage2_scores, gidx),
        )

    def final_scores(self, fusion_weight: float = 0.0) -> torch.Tensor:
        """(N, K) float32 scores that order a stage-II re-ranking, column-aligned with sorted_index_names.

        Args:
            fusion_weight: w in w * z(stage I) + (1 - w) * z(stage II), each score row z-scored (cosine and logit
                scales differ); 0 = the stage-II score itself (the original). z-scores do not depend on the column
                order, so the value of a candidate is the same before and after `reranked`.
        """
        if self.stage2_scores is None:
            raise TopKError("this top-K holds no stage-II scores (a stage-I file, or the original's): nothing to "
                            "re-rank by; the re-ranked file of a stage-II evaluation holds them")
        if fusion_weight == 0:
            return self.stage2_scores
        if self.scores is None:
            raise TopKError("score fusion needs stage-I scores, which this top-K file (an original one?) lacks")
        # float64 numpy fusion, then float32: the numbers the evaluation has always ranked by
        fused = fuse_scores(self.scores.numpy(), self.stage2_scores.numpy(), fusion_weight, normalize=True)
        return torch.as_tensor(fused, dtype=torch.float32)

    def reranked(self, fusion_weight: float = 0.0, k: int | None = None) -> TopK:
        """The stage-II re-ranking: the first k candidates of each row sorted by `final_scores(fusion_weight)`.

        Ties keep the incoming (stage-I) order. The CIRR subset is sorted by its stage-II scores alone (as the
        original). The result holds every field re-ordered (scores, stage2_scores, labels, group_*).

        Args:
            fusion_weight: see `final_scores`.
            k: candidates re-ranked per query (1..K); None = all K.
        """
        topk = self if k is None else self.sliced(k)
        order = torch.sort(topk.final_scores(fusion_weight), dim=1, descending=True, stable=True).indices
        group_order = None
        if topk.group_stage2_scores is not None:
            group_order = torch.sort(topk.group_stage2_scores, dim=1, descending=True, stable=True).indices
        return topk.reordered(order, group_order)

    def reranked_then_rest(self, rest: TopK, fusion_weight: float, length: int) -> np.ndarray:
        """(N, length) names: this top-K's re-ranking (`reranked(fusion_weight)`), then `rest`'s names past column
        `self.k` in `rest`'s order, the first `length` of them (a test server's whole lists).

        Args:
            rest: the candidate list this top-K's K columns were taken from (its first K names, same rows).
            fusion_weight: see `final_scores`.
            length: names per query, 1 <= length <= max(self.k, rest.k).
        """
        if rest.num_queries != self.num_queries or not np.array_equal(rest.sorted_index_names[:, :self.k],
                                                                       self.sorted_index_names):
            raise TopKError(f"rest ({rest.num_queries} x {rest.k}) does not start with this top-K's "
                            f"{self.num_queries} x {self.k} names: it is not the list they were taken from")
        if not 1 <= length <= max(self.k, rest.k):
            raise TopKError(f"length={length}: the lists hold {max(self.k, rest.k)} names per query")
        head = self.reranked(fusion_weight).sorted_index_names
        return np.concatenate([head, rest.sorted_index_names[:, self.k:]], axis=1)[:, :length]

    # ------------------------------------------------------------------------------------------------ save / load
    def to_dict(self) -> dict[str, Any]:
        """The dict `save` writes: the original's keys plus our 'cirlib' metadata."""
        out: dict[str, Any] = {"sorted_index_names": np.ascontiguousarray(self.sorted_index_names, dtype=str)}
        if self.target_names is not None:
            out["target_names"] = list(self.target_names)
        out["index_names"] = list(self.index_names)
        if self.labels is not None:
            # a fresh contiguous tensor: the original saved a view, dragging the whole N x G storage into the file
            out["labels"] = self.labels.contiguous().clone()
        if _dataset(self.dataset).has_image_sets and self.group_labels is not None:
            out["group_labels"] = self.group_labels.contiguous().clone()
        out["split"] = self.split
        category_key = _dataset(self.dataset).original_category_key
        if category_key is not None:
            out[category_key] = self.category
        out["cirlib"] = {
            "format_version": FORMAT_VERSION,
            "dataset": self.dataset,
            "category": self.category,
            "k": self.k,
            "scores": None if self.scores is None else self.scores.contiguous().clone(),
            "stage1_run": self.stage1_run,
            "provenance": None if self.provenance is None else dict(self.provenance),
            "produced_by": None if self.produced_by is None else dict(self.produced_by),
            "reference_removed": bool(self.reference_removed),
            "group_names": None if self.group_names is None else np.ascontiguousarray(self.group_names, dtype=str),
            "stage2_scores": None if self.stage2_scores is None else self.stage2_scores.contiguous().clone(),
            "group_stage2_scores": (None if self.group_stage2_scores is None
                                    else self.group_stage2_scores.contiguous().clone()),
            "cirlib_version": _cirlib_version(),
        }
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the file atomically (`cirlib.paths.atomic_write`); returns the path.

        Args:
            path: destination `.pt` file; its folder is created if needed.
        """
        content = self.to_dict()
        return atomic_write(path, lambda tmp: torch.save(content, tmp))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> TopK:
        """Build from a raw top-K dict (ours or the original's); errors name `source`."""
        try:
            return cls._from_dict(raw)
        except TopKError as e:
            raise TopKError(f"{source}: {e}") from e

    @classmethod
    def _from_dict(cls, raw: dict[str, Any]) -> TopK:
        missing = [key for key in ("sorted_index_names", "index_names", "split") if key not in raw]
        if missing:
            raise TopKError(f"missing keys {missing}; a top-K file has {list(ORIGINAL_KEYS)} (+ 'cirlib')")
        meta = raw.get("cirlib")
        if meta is not None:
            if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
                found = meta.get("format_version") if isinstance(meta, dict) else meta
                raise TopKError(
                    f"'cirlib' metadata has format_version {found!r}, this cirlib reads version {FORMAT_VERSION}"
                )
            dataset = meta.get("dataset")
            category = meta.get("category")
        else:
            # the original's own files: only FashionIQ ones carry 'dress_types'
            dataset = original_topk_dataset(raw)
            category = raw.get("dress_types")
            meta = {}
        category_key = _dataset(dataset).original_category_key
        if category_key is not None and raw.get(category_key) != category:
            raise TopKError(f"'dress_types' = {raw.get('dress_types')!r} disagrees with cirlib category {category!r}")
        if isinstance(category, str) and "," in category:
            raise TopKError(f"'dress_types' = {category!r} joins several categories; a top-K holds one category")
        return cls(
            dataset=dataset,
            split=raw["split"],
            category=category,
            sorted_index_names=raw["sorted_index_names"],
            index_names=tuple(raw["index_names"]),
            target_names=None if raw.get("target_names") is None else tuple(raw["target_names"]),
            scores=meta.get("scores"),
            labels=raw.get("labels"),
            group_labels=raw.get("group_labels"),
            group_names=meta.get("group_names"),
            reference_removed=meta.get("reference_removed"),
            stage1_run=meta.get("stage1_run"),
            provenance=meta.get("provenance"),
            produced_by=meta.get("produced_by"),
            stage2_scores=meta.get("stage2_scores"),
            group_stage2_scores=meta.get("group_stage2_scores"),
        )

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        dataset: str | None = None,
        split: str | None = None,
        category: str | None = None,
        index_names: list[str] | tuple[str, ...] | None = None,
        k: int | None = None,
    ) -> TopK:
        """Read and validate a top-K file (ours or the original's); each given keyword must match the file.

        Args:
            path: the `.pt` file.
            dataset, split, category: expected values; a mismatch raises TopKError.
            index_names: the expected gallery order (the split file's); the first differing position is reported.
            k: keep the first k columns; more than the file holds raises TopKError.
        """
        path = Path(path)
        topk = cls.from_dict(read_topk_dict(path), source=str(path))
        expected = {"dataset": dataset, "split": split, "category": category}
        for field_name, want in expected.items():
            have = getattr(topk, field_name)
            if want is not None and have != want:
                raise TopKError(f"{path}: {field_name} is {have!r}, expected {want!r}")
        if index_names is not None:
            _check_gallery_order(topk.index_names, tuple(str(x) for x in index_names), path)
        if k is not None:
            if k > topk.k:
                raise TopKError(f"{path}: holds the top {topk.k} per query, but K = {k} was requested")
            topk = topk.sliced(k)
        return topk


def _permutation(order: np.ndarray | torch.Tensor, shape: tuple[int, ...], what: str) -> np.ndarray:
    idx = order.detach().cpu().numpy() if isinstance(order, torch.Tensor) else np.asarray(order)
    if idx.shape != tuple(shape) or not np.issubdtype(idx.dtype, np.integer):
        raise TopKError(f"{what} must be integer (N, K) = {tuple(shape)}, got {idx.dtype} {idx.shape}")
    if (np.sort(idx, axis=1) != np.arange(shape[1])[None, :]).any():
        raise TopKError(f"{what} must permute each row's columns (a re-ranking cannot add or drop candidates)")
    return idx.astype(np.int64)


def _check_gallery_order(have: tuple[str, ...], want: tuple[str, ...], path: Path) -> None:
    if have == want:
        return
    for i, (a, b) in enumerate(zip(have, want)):
        if a != b:
            raise TopKError(
                f"{path}: gallery order differs from the expected index_names first at position {i}: "
                f"file has {a!r}, expected {b!r} (was the top-K made from another split file?)"
            )
    raise TopKError(
        f"{path}: gallery has {len(have)} names, expected {len(want)}; "
        f"they agree on the first {min(len(have), len(want))}"
    )
