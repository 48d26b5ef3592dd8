"""CIRCO's on-disk layout: the annotation files, the gallery of COCO 2017 unlabeled images, and missing images.

The layout of the public release (root = the `CIRCO` folder)::

    <root>/annotations/{val,test}.json
    <root>/COCO2017_unlabeled/unlabeled2017/<12-digit zero-padded image id>.jpg
    <root>/COCO2017_unlabeled/annotations/image_info_unlabeled2017.json   (COCO's image list; optional)

The gallery of both splits is the whole unlabeled set (about 123k images): COCO's image list when it is there, else
every `<12 digits>.jpg` of the image folder. The records' schema (`id`, `reference_img_id`, `relative_caption`,
`shared_concept`, val: `target_img_id`, `gt_img_ids`, `semantic_aspects`) is parsed by one parser,
`cirlib.eval.circo.read_annotations` (the eval room imports nothing from cirlib);
this module knows where the files are (and holds the `CIRCO` dataset class), which images form the gallery, and whether every image a query names is in
the gallery and on disk. `cirlib.workbook.circo_eval.load_circo` joins the two.

Missing images follow the readers' `missing_images` policies: "error" stops, naming every missing file (the first
`MISSING_SHOWN` in the message, all of them in a list file); "drop" leaves the missing images out of the gallery and
leaves out the queries whose reference (or, on val, any ground truth) is missing, and says how many.
An image id that a query names but COCO's image list does not hold is always an error: the annotation file and the
image list disagree, which no download problem explains.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from cirlib.data.readers import MISSING_SHOWN, DatasetError, check_missing_images_policy, write_missing_list
from cirlib.data.dataset import DATASETS, Dataset
from cirlib.eval import circo as eval_circo

SPLITS = ("val", "test")
ANNOTATIONS_DIR = "annotations"
IMAGE_DIR = "COCO2017_unlabeled/unlabeled2017"
IMAGE_LIST = "COCO2017_unlabeled/annotations/image_info_unlabeled2017.json"
_IMAGE_NAME = re.compile(r"^(\d{12})\.jpg$")

LAYOUT = f"""expected CIRCO layout under the root (the `CIRCO` folder of github.com/miccunifi/CIRCO):
  <root>/{ANNOTATIONS_DIR}/{{val,test}}.json
  <root>/{IMAGE_DIR}/<12-digit image id>.jpg     (COCO 2017 unlabeled images, unlabeled2017.zip)
  <root>/{IMAGE_LIST}   (optional; from image_info_unlabeled2017.zip: without it the gallery is the folder's jpgs)"""


def image_name(image_id: int) -> str:
    """COCO's file name of an image id: 12 digits, zero-padded, `.jpg`."""
    return f"{int(image_id):012d}.jpg"


def annotation_file(root: str | os.PathLike, split: str) -> Path:
    """`<root>/annotations/<split>.json`, which must exist.

    Args:
        root: the CIRCO root; split: "val" or "test".
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown CIRCO split {split!r}; expected one of {list(SPLITS)}")
    path = Path(root) / ANNOTATIONS_DIR / f"{split}.json"
    if not path.is_file():
        raise DatasetError(f"CIRCO annotation file not found: {path}\n{LAYOUT}")
    return path


@dataclass(frozen=True)
class CircoGallery:
    """The retrieval gallery: image id -> file, in id order.

    `names` gives the same images keyed by their path relative to `image_dir` (what a gallery index built from the
    folder calls them), and `id_of` turns such a name back into the COCO id.
    """

    root: Path
    image_dir: Path  # <root>/COCO2017_unlabeled/unlabeled2017
    files: dict[int, Path]  # image id -> file, id order
    source: Path  # the image list read, or the image folder listed
    listed: frozenset[int] = field(default=frozenset(), repr=False)  # every id of the image list (empty: folder mode)
    missing: tuple[int, ...] = ()  # listed ids whose file is missing (left out under missing_images="drop")
    ignored: int = 0  # folder mode: files of the folder that are not `<12 digits>.jpg`

    def __len__(self) -> int:
        return len(self.files)

    @property
    def from_list(self) -> bool:
        """Whether the gallery is COCO's image list (else the folder's files)."""
        return self.source.is_file()

    @property
    def names(self) -> dict[str, Path]:
        """Index name (posix path relative to `image_dir`) -> file, for every gallery image."""
        return {self.name(i): p for i, p in self.files.items()}

    def name(self, image_id: int) -> str:
        """The index name of a gallery image id."""
        path = self.files.get(image_id)
        if path is None:
            raise DatasetError(f"image id {image_id} is not in the CIRCO gallery ({self.source})")
        try:
            return path.relative_to(self.image_dir).as_posix()
        except ValueError:  # a list entry whose file_name points elsewhere: the name is the path itself
            return path.as_posix()

    def id_of(self, name: str) -> int:
        """The image id of an index name (`name` of it)."""
        ids = self._ids_by_name
        if name not in ids:
            raise DatasetError(f"{name!r} is not an image of the CIRCO gallery ({self.source})")
        return ids[name]

    @cached_property
    def _ids_by_name(self) -> dict[str, int]:
        return {self.name(i): i for i in self.files}


def _read_image_list(path: Path, image_dir: Path) -> dict[int, Path]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: COCO's image list is not valid JSON ({err})") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("images"), list):
        raise DatasetError(f"{path}: expected COCO's image list {{'images': [{{'id': ..., 'file_name': ...}}, ...]}}")
    files: dict[int, Path] = {}
    for i, im in enumerate(raw["images"]):
        image_id = im.get("id") if isinstance(im, dict) else None
        file_name = im.get("file_name") if isinstance(im, dict) else None
        if not isinstance(image_id, int) or isinstance(image_id, bool) or not isinstance(file_name, str):
            raise DatasetError(f"{path}: images[{i}] is {im!r}; expected {{'id': <int>, 'file_name': <str>, ...}}")
        if image_id in files:
            raise DatasetError(f"{path}: images[{i}]: image id {image_id} is listed twice")
        files[image_id] = image_dir / file_name
    return dict(sorted(files.items()))


def _missing_error(missing: Sequence[tuple[str, Path]], what: str, root: Path,
                   list_file: str | os.PathLike | None) -> DatasetError:
    """One error naming every missing file: the first MISSING_SHOWN in the message, all in `list_file`."""
    list_path = write_missing_list(missing, list_file, "cirlib_circo_missing_")
    shown = "\n".join(f"  {path} ({where})" for where, path in missing[:MISSING_SHOWN])
    more = f"\n  ... and {len(missing) - MISSING_SHOWN:,} more" if len(missing) > MISSING_SHOWN else ""
    return DatasetError(
        f"{len(missing):,} {what} under {root}:\n{shown}{more}\nThe full list is in {list_path}.\n"
        "What to do: restore the files (re-extract unlabeled2017.zip), or set missing_images=\"drop\" to leave the "
        "missing images out of the gallery and leave out the queries that name them (counted in the result file; "
        "such numbers are not comparable with published ones).")


def read_gallery(root: str | os.PathLike, *, missing_images: str = "error",
                 list_file: str | os.PathLike | None = None) -> CircoGallery:
    """The gallery: COCO's image list when `<root>/COCO2017_unlabeled/annotations/image_info_unlabeled2017.json` is
    there (every listed file is stat-ed), else every `<12 digits>.jpg` in the image folder.

    Args:
        root: the CIRCO root.
        missing_images: "error" (a listed image whose file is missing stops, naming every such file) or "drop" (they
            leave the gallery, recorded in `missing`).
        list_file: where the full list of missing files goes (default: a new file in the temporary folder).
    """
    check_missing_images_policy(missing_images)
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"CIRCO root {root} does not exist\n{LAYOUT}")
    image_dir = root / IMAGE_DIR
    image_list = root / IMAGE_LIST
    if image_list.is_file():
        files = _read_image_list(image_list, image_dir)
        missing = [i for i, p in files.items() if not p.is_file()]
        if missing and missing_images == "error":
            raise _missing_error([(f"image id {i}", files[i]) for i in missing],
                                 f"image files listed in {image_list} are missing", root, list_file)
        gone = set(missing)
        return CircoGallery(root, image_dir, {i: p for i, p in files.items() if i not in gone}, image_list,
                            listed=frozenset(files), missing=tuple(missing))
    if not image_dir.is_dir():
        raise DatasetError(f"no CIRCO images: neither {image_list} nor the folder {image_dir} exists\n{LAYOUT}")
    files, ignored = {}, 0
    with os.scandir(image_dir) as entries:
        for entry in entries:
            m = _IMAGE_NAME.match(entry.name)
            if m and entry.is_file():
                files[int(m.group(1))] = image_dir / entry.name
            else:
                ignored += 1
    if not files:
        raise DatasetError(f"{image_dir} holds no COCO image (<12 digits>.jpg) and {image_list} does not exist\n"
                           f"{LAYOUT}")
    return CircoGallery(root, image_dir, dict(sorted(files.items())), image_dir, ignored=ignored)


class _Query(Protocol):
    """What the checks read of a parsed CIRCO record (`cirlib.eval.circo.CircoQuery`)."""

    id: int
    reference_img_id: int
    gt_img_ids: tuple[int, ...]


@dataclass(frozen=True)
class DroppedQuery:
    """A query left out under missing_images="drop": its id and the image ids of it that are missing."""

    id: int
    missing: tuple[int, ...]


def query_image_ids(query: _Query) -> tuple[int, ...]:
    """Every image a query names: its reference, then its ground truths (val), each once."""
    return tuple(dict.fromkeys((query.reference_img_id, *query.gt_img_ids)))


def check_query_images(queries: Sequence[_Query], gallery: CircoGallery, source: str | os.PathLike, *,
                       missing_images: str = "error", list_file: str | os.PathLike | None = None,
                       ) -> tuple[list[Any], list[DroppedQuery]]:
    """The queries whose images are all in the gallery, and those left out (missing_images="drop").

    An id outside COCO's image list is an error under either policy (naming the file, the query and the id); an id
    whose file is missing (a listed image dropped by `read_gallery`, or in folder mode no `<id>.jpg`) stops under
    "error", naming every such image, and drops the query under "drop".

    Args:
        queries: parsed records (`cirlib.eval.circo.read_annotations`) of the annotation file `source`.
        gallery: `read_gallery`'s result.
        source: the annotation file, for messages.
    """
    check_missing_images_policy(missing_images)
    if gallery.from_list:
        unlisted = [(q.id, i) for q in queries for i in query_image_ids(q) if i not in gallery.listed]
        if unlisted:
            shown = "; ".join(f"query {q} names image id {i}" for q, i in unlisted[:MISSING_SHOWN])
            raise DatasetError(f"{source}: {len(unlisted)} image id(s) are not in COCO's image list {gallery.source} "
                               f"({shown}): the annotation file and the image list do not belong together")
    kept, dropped = [], []
    for q in queries:
        gone = tuple(i for i in query_image_ids(q) if i not in gallery.files)
        if gone:
            dropped.append(DroppedQuery(q.id, gone))
        else:
            kept.append(q)
    if dropped and missing_images == "error":
        rows = [(f"query {d.id} of {Path(source).name}", gallery.image_dir / image_name(i))
                for d in dropped for i in d.missing]
        raise _missing_error(rows, f"image files named by {source} are missing", gallery.root, list_file)
    return kept, dropped


def source_files(root: str | os.PathLike, splits: Iterable[str]) -> list[Path]:
    """The annotation files (and COCO's image list when present) a CIRCO result was made from, for its provenance."""
    root = Path(root)
    files = [annotation_file(root, s) for s in splits]
    if (root / IMAGE_LIST).is_file():
        files.append(root / IMAGE_LIST)
    return files


@DATASETS.register
class CIRCO(Dataset):
    """CIRCO: evaluation only (val and test over one gallery of COCO 2017 unlabeled images), several ground truths
    per query, mAP@K; read and ranked by `cirlib.workbook.circo_eval` (notebook 09), not by `load_split`."""

    name = "circo"
    title = "CIRCO"
    splits = SPLITS
    test_split = "test"
    reported_ks = eval_circo.KS
    selection_key = "mAP@10"  # CIRCO's headline metric
    excludes_reference = True  # its reference is never a ground truth (a setting of notebook 09: exclude_reference)
    has_test_server = True
    has_split_data = False  # no `load_split`: ranked through a gallery index (`cirlib.workbook.circo_eval`)
    layout = LAYOUT
    root_marker, root_folder = ANNOTATIONS_DIR, "CIRCO"

    def load_split(self, root: Path, split: str, category: str | None = None, *, with_queries: bool = True):
        raise DatasetError("CIRCO has no training split and no SplitData reader: it is evaluated by "
                           "`cirlib.workbook.circo_eval` (notebook 09), which reads `annotation_file` and "
                           "`read_gallery` of cirlib.data.circo")

    def ranking_text(self, query: Any, use_shared_concept: bool = False) -> str:
        """The relative caption, or "<shared concept>, <relative caption>" (a query of `eval.circo.read_annotations`)."""
        return (f"{query.shared_concept}, {query.relative_caption}" if use_shared_concept
                else query.relative_caption)

    table_note = "mAP@K over every ground truth of a query"

    def table_columns(self) -> tuple[tuple[str, str], ...]:
        """mAP@5/10/25/50, as CIRCO papers print them."""
        return tuple((f"mAP@{k}", f"mAP@{k}") for k in self.reported_ks)

    def metrics(self, predictions: dict[int, Sequence[int]], queries: Sequence[Any]) -> dict[str, Any]:
        """mAP@K and Recall@K over `reported_ks`, semantic mAP@10 (`cirlib.eval.circo.circo_metrics`)."""
        return eval_circo.circo_metrics(predictions, queries, self.reported_ks)

    def submission_document(self, predictions: dict[int, Sequence[int]]) -> dict[str, list[int]]:
        return eval_circo.submission_document(predictions)

    def validate_submission(self, document: dict[str, Any], queries: Sequence[Any],
                            gallery: set[int] | None = None) -> list[str]:
        """Every problem that would make the test server refuse `document` (empty: it is valid)."""
        return eval_circo.validate_submission(document, queries, gallery)
