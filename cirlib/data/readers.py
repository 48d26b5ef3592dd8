"""Dataset readers for CIRR and FashionIQ, the original image transforms, and the caption rules.

The on-disk layouts are exactly the original's (CLIP4Cir layout):

CIRR, root = the ``cirr_dataset`` folder::

    cirr/captions/cap.rc2.{train,val,test1}.json
    cirr/image_splits/split.rc2.{train,val,test1}.json
    train/<0..99>/train-*.png   dev/dev-*.png   test1/test1-*.png   (paths as listed in the split files)

FashionIQ, root = the ``fashionIQ_dataset`` folder::

    captions/cap.{dress,shirt,toptee}.{train,val,test}.json
    image_splits/split.{dress,shirt,toptee}.{train,val,test}.json
    images/<name>.jpg   (real data; the synthetic world writes <name>.png, both are accepted)

Reading a split parses and validates the JSON only; images are opened lazily, one item at a time, so a split can be
inspected (and the real annotation files tested) without any image on disk. Every bad input raises `DatasetError`
naming the file, the record and what was expected; nothing is dropped silently (the original wrapped every item in a
try/except that returned None and shrank batches without notice).

Quirks of the real annotation files, each handled deliberately:

* CIRR ``img_set.reference_rank`` / ``target_rank`` are not positions in ``members`` (they index some other per-set
  order); they are ignored. ``members`` is kept in file order.
* CIRR ``target_soft`` is ignored, as in the original: in 37 val records it lacks ``target_hard`` (and scores the
  reference instead); ``target_hard`` alone is the ground truth.
* CIRR test1 pairid 27098 has the caption ``" "`` (a single space). CIRR captions are used raw, as in the original,
  so it becomes an empty query ([ENC][SEP]); the record is kept because a test submission must answer every pairid.
* Duplicate records (CIRR test1 pairs with the same reference and caption, FashionIQ test records with the same
  candidate and captions) are distinct queries in the official protocol; they are all kept, one `Query` each.
* FashionIQ empty captions (``""``, one of the two in a few records): kept and joined by the original rule, e.g.
  ``" and is red"`` at validation. This keeps the validation queries identical to the original's.
* Duplicate CIRR pairids or duplicate gallery names in a split file are errors (they would make submissions and
  the one-positive-per-query metrics ambiguous).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import PIL.Image

from cirlib import paths
from cirlib.paths import data_root

CIRR_SPLITS = ("train", "val", "test1")
FIQ_SPLITS = ("train", "val", "test")
FIQ_CATEGORIES = ("dress", "shirt", "toptee")
# The original trains FashionIQ on the three categories jointly, concatenated in this order.
FIQ_TRAIN_ORDER = ("dress", "toptee", "shirt")
CIRR_SET_SIZE = 6  # img_set.members per CIRR record (reference + 5 candidates for Recall_subset)
FIQ_NUM_CAPTIONS = 2


# Characters stripped from both ends of each FashionIQ caption before joining (the original's `strip('.?, ')`).
FIQ_STRIP_CHARS = ".?, "

_CIRR_LAYOUT = """expected CIRR layout under the root (the `cirr_dataset` folder):
  <root>/cirr/captions/cap.rc2.{train,val,test1}.json
  <root>/cirr/image_splits/split.rc2.{train,val,test1}.json
  <root>/train/<n>/train-*.png, <root>/dev/dev-*.png, <root>/test1/test1-*.png
The annotations come from the `cirr_dataset` branch of github.com/Cuberick-Orion/CIRR (its `captions/` and
`image_splits/` folders go under <root>/cirr/). The official image download unpacks `img_raw/train/<n>/`,
`img_raw/dev/` and `img_raw/test1/`: either leave them there (<root>/img_raw/...) or move them directly under <root>;
the paths listed in the split files are read relative to whichever holds them."""

_FIQ_LAYOUT = """expected FashionIQ layout under the root (the `fashionIQ_dataset` folder):
  <root>/captions/cap.{dress,shirt,toptee}.{train,val,test}.json
  <root>/image_splits/split.{dress,shirt,toptee}.{train,val,test}.json
  <root>/images/<name>.jpg (or <name>.png)
The annotations come from github.com/XiaoxiaoGuo/fashion-iq (`captions/` and `image_splits/`)."""


class DatasetError(Exception):
    """Bad dataset input: missing root or file, malformed record, corrupt image, unknown split/category/name."""


# --------------------------------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class Query:
    """One composed query: a reference image, modification caption(s) and (except on test splits) its target."""

    index: int  # row in the caption file
    pair_id: int | None  # CIRR pairid; None for FashionIQ
    reference: str  # reference image name (FashionIQ `candidate`)
    target: str | None  # target image name (CIRR `target_hard`); None on test splits
    captions: tuple[str, ...]  # CIRR: (caption,); FashionIQ: (c1, c2), as written in the file
    members: tuple[str, ...] | None  # CIRR img_set members (6 names, file order); None for FashionIQ
    category: str | None = None  # FashionIQ category of the caption file; None for CIRR


@dataclass(frozen=True)
class DroppedImages:
    """What `missing_images="drop"` removed from a split because image files were missing (see `drop_missing`).

    A dropped query is neither a hit nor a miss: it is not evaluated, and these counts say so in every result file.
    """

    missing: tuple[str, ...]  # image names of this split whose file does not exist
    queries: tuple[Query, ...]  # queries removed: their reference or target image is missing
    gallery: tuple[str, ...]  # gallery names removed (their image is missing)
    queries_before: int  # queries in the caption file (after any query limit)
    gallery_before: int  # gallery images in the split file

    def missing_of(self, query: Query) -> list[str]:
        """The images of `query` (reference, target, img_set members) whose file is missing, in that order."""
        missing = set(self.missing)
        return [name for name in query_images(query) if name in missing]


@dataclass(frozen=True)
class SplitData:
    """A parsed split: queries in caption-file order and the gallery in split-file order ("index_names")."""

    dataset: str  # a registered dataset name ("cirr" | "fashioniq" | ...): `cirlib.data.get_dataset(split_data)`
    split: str  # CIRR: train/val/test1; FashionIQ: train/val/test
    category: str | None  # FashionIQ category; None for CIRR and for the joint FashionIQ (all categories)
    root: Path  # dataset root (the cirr_dataset / fashionIQ_dataset folder)
    queries: list[Query]  # empty when read in gallery-only mode
    gallery: list[str]  # gallery image names, split-file order
    relpaths: Mapping[str, str] | None = field(default=None, repr=False, compare=False)  # CIRR: name -> split path
    # CIRR: the folder the split paths are relative to: the root, or <root>/img_raw (the official download's layout)
    image_root: Path | None = field(default=None, repr=False, compare=False)
    # The annotation files read (split file, caption files), for the provenance of results made from this split.
    source_files: tuple[Path, ...] = field(default=(), repr=False, compare=False)
    # What missing_images="drop" removed; None when nothing was dropped (or the policy is "error").
    dropped: DroppedImages | None = field(default=None, repr=False, compare=False)

    @cached_property
    def gallery_index(self) -> dict[str, int]:
        """Gallery name -> position in `gallery`."""
        return {name: i for i, name in enumerate(self.gallery)}

    @property
    def has_targets(self) -> bool:
        """Whether the queries carry ground-truth targets (False on CIRR test1 and FashionIQ test)."""
        return self.split not in ("test1", "test")

    def image_path(self, name: str) -> Path:
        """Path of a gallery image; the file is not opened. FashionIQ prefers `<name>.jpg`, else an existing `.png`.

        Args:
            name: a gallery image name of this split.
        """
        if name not in self.gallery_index:
            raise DatasetError(
                f"image {name!r} is not in the {self.dataset} {self.split}"
                f"{'' if self.category is None else ' ' + self.category} gallery ({len(self.gallery)} images)"
            )
        if self.relpaths is not None:
            return (self.image_root or self.root) / self.relpaths[name]
        jpg = self.root / "images" / f"{name}.jpg"
        if not jpg.exists():
            png = jpg.with_suffix(".png")
            if png.exists():
                return png
        return jpg

    def missing_images(self) -> list[str]:
        """Gallery names whose image file does not exist (a missing-file report; stats every image)."""
        return [name for name in self.gallery if not self.image_path(name).is_file()]


# --------------------------------------------------------------------------------------------------------------------
# Reading


def load_split(
    dataset: str,
    root: str | os.PathLike | None,
    split: str,
    category: str | None = None,
    *,
    with_queries: bool = True,
) -> SplitData:
    """Parse and validate one split's caption and image-split files (no image is opened).

    Args:
        dataset: a registered dataset name, "cirr" or "fashioniq" (case-insensitive), or a plugin's: its class
            (`cirlib.data.get_dataset`) checks the split and category and reads its layout.
        root: the dataset root (cirr_dataset / fashionIQ_dataset folder); None reads $CIR_DATA.
        split: CIRR "train" | "val" | "test1"; FashionIQ "train" | "val" | "test".
        category: FashionIQ "dress" | "shirt" | "toptee", or None for all three joined in the original training
            order (dress, toptee, shirt; the gallery keeps each name once). Must be None for CIRR.
        with_queries: False reads the gallery only ("classic" mode), so the caption file need not exist.

    The module docstring lists how the quirks of the real files (empty captions, duplicates, ranks, soft targets)
    are handled.
    """
    from cirlib.data.dataset import get_dataset  # the dataset classes call this module's readers

    ds = get_dataset(dataset)
    root_path = resolve_root(root, ds.name, ds.layout, ds.root_marker, ds.root_folder)
    ds.check_split(split)
    ds.check_category(category)
    return ds.load_split(root_path, split, category, with_queries=with_queries)


def resolve_root(root: str | os.PathLike | None, dataset: str, layout: str, marker: str, folder: str) -> Path:
    """The dataset root (None reads $CIR_DATA), refused with the expected `layout` when it is not a folder or is the
    folder that holds the dataset folder (`folder`, recognised by the `marker` subfolder it lacks)."""
    try:
        path = data_root(root)
    except ValueError as e:
        raise DatasetError(f"{e}\n{layout}") from e
    if not path.is_dir():
        raise DatasetError(f"{dataset} dataset root {path} does not exist or is not a folder\n{layout}")
    # A common slip is passing the folder that holds the dataset folder; say so instead of "missing file".
    if marker and not (path / marker).is_dir() and (path / folder).is_dir():
        raise DatasetError(f"{path} has no {marker}/ folder but holds {folder}/: pass root={path / folder}\n{layout}")
    return path


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object_pairs_hook: a JSON object that names a key twice is refused (json.load keeps the last silently,
    so a split file with a duplicated image name would map it to whichever path came last)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _read_json(path: Path, expected: type, layout: str, what: str) -> Any:
    """Read a JSON file whose top level must be `expected` (list or dict); no object in it may repeat a key. A missing
    file is reported with the expected `layout`."""
    if not path.is_file():
        raise DatasetError(f"missing {what} file {path}\n{layout}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise DatasetError(
            f"{path}: the key {e.key!r} appears twice in one JSON object ({what} file); each name must appear once: "
            "fix or re-download the file") from e
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot be read ({e})") from e
    if not isinstance(data, expected):
        raise DatasetError(
            f"{path}: top-level JSON is a {type(data).__name__}, expected a {expected.__name__} ({what})"
        )
    return data


def _record_label(path: Path, i: int, record: Any) -> str:
    label = f"{path} record {i}"
    if isinstance(record, dict):
        for key in ("pairid", "candidate"):
            if key in record:
                label += f" ({key} {record[key]!r:.40})"
    return label


class _Where:
    """Names a caption record in error messages; formatted only when an error is raised (reading stays fast)."""

    __slots__ = ("path", "index", "record")

    def __init__(self, path: Path, index: int, record: Any):
        self.path, self.index, self.record = path, index, record

    def __str__(self) -> str:
        return _record_label(self.path, self.index, self.record)


def _get(record: Any, key: str, kind: type | tuple[type, ...], path: Path, i: int, expected: str) -> Any:
    """Fetch a typed field from a caption record, raising a DatasetError naming file, record and field."""
    if not isinstance(record, dict):
        raise DatasetError(f"{path} record {i}: is a {type(record).__name__}, expected an object with {expected}")
    if key not in record:
        raise DatasetError(f"{_record_label(path, i, record)}: missing field {key!r} (expected {expected})")
    value = record[key]
    # bool is an int subclass; a JSON true is never a valid pairid.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DatasetError(
            f"{_record_label(path, i, record)}: field {key!r} is {type(value).__name__} {value!r:.80}, expected {names}"
        )
    return value


def _require_in_gallery(name: str, role: str, gallery: Mapping[str, Any], label: _Where, split_file: Path) -> None:
    if name not in gallery:
        raise DatasetError(f"{label}: {role} {name!r} is not in the gallery {split_file} ({len(gallery)} images)")


def _safe_relpath(rel: str, name: str, split_file: Path) -> str:
    # Split paths are joined onto the root; an absolute path or '..' would silently read outside the dataset.
    # Plain string checks: Path() per entry would dominate reading the 16,939-entry train split.
    if not rel or os.path.isabs(rel) or rel.startswith("\\") or ".." in rel.replace("\\", "/").split("/"):
        raise DatasetError(
            f"{split_file}: entry {name!r} has path {rel!r}; expected a path relative to the root inside it "
            "(e.g. './dev/dev-244-0-img0.png')"
        )
    return rel


CIRR_RAW_FOLDER = "img_raw"  # the official CIRR image download unpacks train/, dev/ and test1/ under this folder
_ANNOUNCED_RAW: set[Path] = set()  # roots whose img_raw/ layout was already reported in this process


def cirr_image_root(root: Path, relpaths: Mapping[str, str]) -> Path:
    """The folder CIRR's split paths (`./dev/dev-...png`) are relative to: the root as the original arranges it, or
    `<root>/img_raw` as the official download unpacks (used where it exists and the root's own folder does not).

    Nothing is moved or linked; the first time a root is found in the download's layout, one line says so.
    """
    first = next(iter(relpaths.values()), None)
    if first is None:
        return root
    top = first.replace("\\", "/").lstrip("./").split("/", 1)[0]
    raw = root / CIRR_RAW_FOLDER
    if (root / top).is_dir() or not (raw / top).is_dir():
        return root
    if root not in _ANNOUNCED_RAW:
        _ANNOUNCED_RAW.add(root)
        print(f"cirlib: CIRR images found in the official download's layout under {raw}/ (train/, dev/, test1/); "
              "reading them there", file=sys.stderr)
    return raw


def load_cirr_layout(root: Path, split: str, with_queries: bool, dataset: str = "cirr") -> SplitData:
    """One split of the CIRR layout (split and root already checked); `dataset` names the SplitData's dataset."""
    split_file = root / "cirr" / "image_splits" / f"split.rc2.{split}.json"
    raw_split = _read_json(split_file, dict, _CIRR_LAYOUT, "CIRR image-split")
    relpaths: dict[str, str] = {}
    for name, rel in raw_split.items():
        if not isinstance(rel, str):
            raise DatasetError(
                f"{split_file}: entry {name!r} maps to {type(rel).__name__} {rel!r:.80}, expected a relative "
                "path string such as './dev/dev-244-0-img0.png'"
            )
        relpaths[name] = _safe_relpath(rel, name, split_file)
    gallery = list(relpaths)

    queries: list[Query] = []
    sources = [split_file]
    if with_queries:
        cap_file = root / "cirr" / "captions" / f"cap.rc2.{split}.json"
        sources.append(cap_file)
        records = _read_json(cap_file, list, _CIRR_LAYOUT, "CIRR caption")
        has_target = split != "test1"
        expected = "pairid, reference, caption, img_set.members" + (", target_hard" if has_target else "")
        seen_pairids: dict[int, int] = {}
        for i, rec in enumerate(records):
            pairid = _get(rec, "pairid", int, cap_file, i, expected)
            if pairid in seen_pairids:
                raise DatasetError(
                    f"{cap_file} record {i}: pairid {pairid} already used by record {seen_pairids[pairid]}; "
                    "pairids must be unique (they key the test submission)"
                )
            seen_pairids[pairid] = i
            label = _Where(cap_file, i, rec)
            reference = _get(rec, "reference", str, cap_file, i, expected)
            caption = _get(rec, "caption", str, cap_file, i, expected)
            img_set = _get(rec, "img_set", dict, cap_file, i, expected)
            if "members" not in img_set:
                raise DatasetError(f"{label}: img_set has no field 'members' (expected a list of 6 image names)")
            members = img_set["members"]
            if (
                not isinstance(members, list)
                or len(members) != CIRR_SET_SIZE
                or not all(isinstance(m, str) for m in members)
            ):
                raise DatasetError(
                    f"{label}: img_set.members is {members!r:.200}; expected a list of {CIRR_SET_SIZE} image names"
                )
            target = _get(rec, "target_hard", str, cap_file, i, expected) if has_target else None
            _require_in_gallery(reference, "reference", relpaths, label, split_file)
            if target is not None:
                _require_in_gallery(target, "target_hard", relpaths, label, split_file)
            # Members feed Recall_subset, computed on val and test1 only; the original never reads them in training.
            if split != "train":
                if len(set(members)) != CIRR_SET_SIZE:
                    raise DatasetError(f"{label}: img_set.members {members} contains a repeated name")
                for m in members:
                    _require_in_gallery(m, "img_set member", relpaths, label, split_file)
                if reference not in members:
                    raise DatasetError(f"{label}: reference {reference!r} is not among img_set.members {members}")
                if target is not None and target not in members:
                    raise DatasetError(f"{label}: target_hard {target!r} is not among img_set.members {members}")
            queries.append(
                Query(
                    index=i,
                    pair_id=pairid,
                    reference=reference,
                    target=target,
                    captions=(caption,),
                    members=tuple(members),
                )
            )
    return SplitData(
        dataset=dataset, split=split, category=None, root=root, queries=queries, gallery=gallery, relpaths=relpaths,
        image_root=cirr_image_root(root, relpaths), source_files=tuple(sources),
    )


def load_fiq_layout(root: Path, split: str, category: str | None, with_queries: bool, *,
                    train_order: Sequence[str] = FIQ_TRAIN_ORDER, dataset: str = "fashioniq") -> SplitData:
    """One split of the FashionIQ layout (split, category and root already checked): one category, or (None) all of
    `train_order` joined in that order; `dataset` names the SplitData's dataset."""
    categories = tuple(train_order) if category is None else (category,)
    gallery: list[str] = []
    in_gallery: set[str] = set()
    queries: list[Query] = []
    sources: list[Path] = []
    for cat in categories:
        split_file = root / "image_splits" / f"split.{cat}.{split}.json"
        sources.append(split_file)
        names = _read_json(split_file, list, _FIQ_LAYOUT, "FashionIQ image-split")
        cat_names: set[str] = set()
        for j, name in enumerate(names):
            # Names become file names (images/<name>.jpg), so they may not contain a path.
            if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
                raise DatasetError(f"{split_file}: entry {j} is {name!r:.80}; expected an image name (no path)")
            if name in cat_names:
                raise DatasetError(f"{split_file}: image {name!r} (entry {j}) is listed twice")
            cat_names.add(name)
            # shirt and toptee share some names; the joint gallery lists each image once.
            if name not in in_gallery:
                in_gallery.add(name)
                gallery.append(name)
        if with_queries:
            queries.extend(_read_fiq_captions(root, cat, split, cat_names, split_file))
            sources.append(root / "captions" / f"cap.{cat}.{split}.json")
    return SplitData(
        dataset=dataset, split=split, category=category, root=root, queries=queries, gallery=gallery,
        source_files=tuple(sources),
    )


def _read_fiq_captions(root: Path, cat: str, split: str, gallery: set[str], split_file: Path) -> list[Query]:
    cap_file = root / "captions" / f"cap.{cat}.{split}.json"
    records = _read_json(cap_file, list, _FIQ_LAYOUT, "FashionIQ caption")
    has_target = split != "test"
    expected = "candidate, captions (2 strings)" + (", target" if has_target else "")
    queries = []
    for i, rec in enumerate(records):
        label = _Where(cap_file, i, rec)
        reference = _get(rec, "candidate", str, cap_file, i, expected)
        captions = _get(rec, "captions", list, cap_file, i, expected)
        if len(captions) != FIQ_NUM_CAPTIONS or not all(isinstance(c, str) for c in captions):
            raise DatasetError(f"{label}: captions is {captions!r:.200}; expected a list of 2 strings")
        target = _get(rec, "target", str, cap_file, i, expected) if has_target else None
        _require_in_gallery(reference, "candidate (reference)", gallery, label, split_file)
        if target is not None:
            _require_in_gallery(target, "target", gallery, label, split_file)
        queries.append(
            Query(
                index=i,
                pair_id=None,
                reference=reference,
                target=target,
                captions=tuple(captions),
                members=None,
                category=cat,
            )
        )
    return queries


# --------------------------------------------------------------------------------------------------------------------
# Missing images: the two policies of `missing_images`

MISSING_IMAGES_POLICIES = ("error", "drop")
MISSING_SHOWN = 20  # missing files named in an error message; the full list goes to a file


def check_missing_images_policy(value: str) -> str:
    """The `missing_images` setting, validated: "error" (stop before training, listing every missing image) or
    "drop" (leave out the queries whose images are missing, counting them)."""
    if value not in MISSING_IMAGES_POLICIES:
        raise ValueError(f"missing_images={value!r}; expected one of {list(MISSING_IMAGES_POLICIES)}: \"error\" stops "
                         "before training and lists every missing image, \"drop\" leaves out the queries that use them")
    return value


def query_images(query: Query) -> tuple[str, ...]:
    """Every image a query uses: reference, target (if any) and its CIRR img_set members, each once, in that order."""
    names = (query.reference, *(() if query.target is None else (query.target,)), *(query.members or ()))
    return tuple(dict.fromkeys(names))


def drop_missing(sd: SplitData) -> SplitData:
    """The split without the queries and gallery images whose image file is missing (`missing_images="drop"`).

    Every gallery image is stat-ed (not opened). A query is dropped when ANY image it names is missing: its
    reference, its target, or (CIRR) any of its img_set members. Members count because Recall_subset ranks the
    target among the other members: with one missing the query would be ranked among fewer candidates (an easier,
    different task), and neither a hit nor a miss can honestly be recorded; on train the members are stage II's
    `set_negatives`. (A CIRR train member that is not in the train split file is not an image of the split; it is
    never read and never counted.) Missing gallery images leave the gallery. Queries and gallery keep their order,
    so the kept queries of the first N rows are the first kept queries of the whole file (top-k rows still match).

    Returns:
        the split itself when nothing is missing (`dropped` None), else a copy with `dropped` recording exactly what
        was removed and the counts before.
    """
    missing = set(sd.missing_images())
    if not missing:
        return sd
    kept: list[Query] = []
    removed: list[Query] = []
    for q in sd.queries:
        (removed if any(name in missing for name in query_images(q)) else kept).append(q)
    gallery = [name for name in sd.gallery if name not in missing]
    missing_in_order = tuple(name for name in sd.gallery if name in missing)
    dropped = DroppedImages(missing=missing_in_order, queries=tuple(removed), gallery=missing_in_order,
                            queries_before=len(sd.queries), gallery_before=len(sd.gallery))
    return dataclasses.replace(sd, queries=kept, gallery=gallery, dropped=dropped)


def split_label(sd: SplitData) -> str:
    """'cirr val' or 'fashioniq val dress': how messages name a split."""
    return f"{sd.dataset} {sd.split}" + (f" {sd.category}" if sd.category else "")


def write_missing_list(rows: Sequence[tuple[str, Path]], list_file: str | os.PathLike | None, prefix: str) -> Path:
    """Write every missing file as "<where>\t<path>" lines to list_file (None: a new temporary file named prefix...)
    and return its path: the full list an error about missing images points to."""
    if list_file is None:
        import tempfile

        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tsv")
        os.close(fd)
        list_file = name
    return paths.atomic_write_text(list_file, "".join(f"{where}\t{path}\n" for where, path in rows))


def missing_images_error(sets: Sequence[SplitData], list_file: str | os.PathLike | None = None) -> DatasetError | None:
    """One error naming EVERY missing image file of all these splits (None when every file exists).

    The message shows the first `MISSING_SHOWN` paths, the count per split, and what to do; the full list (one path
    a line, with the split) is written to `list_file` (default: a new file in the temporary folder), whose path the
    message gives.

    Args:
        sets: the splits a step reads (e.g. val and train of every category).
        list_file: where to write the full list (a run folder's file when the step has one).
    """
    rows: list[tuple[str, Path]] = []
    per_split: list[str] = []
    seen: set[Path] = set()
    for sd in sets:
        names = sd.missing_images()
        if names:
            per_split.append(f"{split_label(sd)}: {len(names):,} of {len(sd.gallery):,}")
        for name in names:
            path = sd.image_path(name)
            if path not in seen:
                seen.add(path)
                rows.append((split_label(sd), path))
    if not rows:
        return None
    list_path = write_missing_list([(label, path) for label, path in rows], list_file, "cirlib_missing_images_")
    shown = "\n".join(f"  {path}" for _, path in rows[:MISSING_SHOWN])
    more = f"\n  ... and {len(rows) - MISSING_SHOWN:,} more" if len(rows) > MISSING_SHOWN else ""
    first = sets[0]
    return DatasetError(
        f"{len(rows):,} image files named by the splits are missing ({'; '.join(per_split)}), under {first.root}:\n"
        f"{shown}{more}\n"
        f"The full list ({len(rows):,} files) is in {list_path}.\n"
        f"What to do: run `python -m cirlib.data check --dataset {first.dataset} {first.root}` for a report of the "
        "whole download, then restore the files (re-download or re-extract), or set missing_images=\"drop\" to "
        "leave out the queries whose images are missing (the counts are recorded in dropped_queries.json of the run "
        "folder and in every metrics.json; such numbers are not comparable with published ones)."
    )


def raise_if_missing(sets: Sequence[SplitData], list_file: str | os.PathLike | None = None) -> None:
    """Raise `missing_images_error` (every missing file of all these splits, in one error) when any is missing."""
    err = missing_images_error(sets, list_file)
    if err is not None:
        raise err


# --------------------------------------------------------------------------------------------------------------------
# Text


def fiq_caption_join(captions: Sequence[str], rng: random.Random | None = None) -> str:
    """Join FashionIQ's two captions as the original: fixed "C1 and c2" (rng None) or its 4-way random training mix.

    Both captions are stripped of '.?, ' at the ends and the leading one is `str.capitalize()`d. With an rng, one draw
    u picks "C1 and c2" (u < .25), "C2 and c1" (.25 < u < .5), "C1" (.5 < u < .75), else "C2"; exact boundaries fall
    into the last case, as in the original.

    Args:
        captions: the record's 2 captions.
        rng: a seeded generator for the training mix; None gives the validation/test join.
    """
    if len(captions) != FIQ_NUM_CAPTIONS:
        raise ValueError(f"a FashionIQ query has 2 captions, got {len(captions)}: {list(captions)!r}")
    c1, c2 = (c.strip(FIQ_STRIP_CHARS) for c in captions)
    if rng is None:
        return f"{c1.capitalize()} and {c2}"
    u = rng.random()
    if u < 0.25:
        return f"{c1.capitalize()} and {c2}"
    if 0.25 < u < 0.5:
        return f"{c2.capitalize()} and {c1}"
    if 0.5 < u < 0.75:
        return c1.capitalize()
    return c2.capitalize()


def query_text(query: Query, dataset: str, split: str, rng: random.Random | None = None) -> str:
    """The modification text fed to the model, by the original's rules.

    CIRR: the raw caption (no stripping; test1 pairid 27098's " " stays " "). FashionIQ: on "train" the random 4-way
    join drawn from `rng` (required, so training text is never silently deterministic); on val/test "C1 and c2".

    Args:
        query: the query record.
        dataset: a registered dataset name ("cirr", "fashioniq", ...): its class's `query_text` decides.
        split: the split the query comes from.
        rng: seeded generator; required for FashionIQ train, ignored otherwise.
    """
    from cirlib.data.dataset import get_dataset  # the dataset classes call this module's readers

    return get_dataset(dataset).query_text(query, split, rng)


# --------------------------------------------------------------------------------------------------------------------
# Images


def load_image(path: str | os.PathLike) -> PIL.Image.Image:
    """Open an image fully and convert it to RGB.

    Converting before the resize (the original converts after the crop) avoids PIL's nearest-neighbour resampling of
    palette images and alpha fringes; for RGB and greyscale files the result is identical.

    Args:
        path: image file.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"image file not found: {path}")
    try:
        with PIL.Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
        raise DatasetError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
