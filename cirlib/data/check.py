"""Check a downloaded CIRR or FashionIQ folder in one pass: layout, annotation files, every image the splits name.

    python -m cirlib.data check --dataset cirr|fashioniq ROOT [--workers N] [--problems-file FILE]

The report gives, per split (and FashionIQ category), the queries and gallery images found against the public
release's counts; whether each annotation file is byte-identical to the public release (sha256) or modified; and ALL
missing or unreadable images (exists, opens, decodes fully, non-zero size), each with the number of queries whose
reference or target it is, written in full to a tab-separated file. It ends with what to do. The exit code is 1 when
anything would stop a run (an annotation file that does not parse, a missing or unreadable image), else 0.

Images are checked by several worker processes (decoding 100k images is the slow part); annotation files are
parsed by the same readers the pipeline uses, so a file the check accepts is a file the pipeline reads.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import os
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image

from cirlib import paths
from cirlib.data.dataset import dataset_names, get_dataset
from cirlib.data.readers import CIRR_RAW_FOLDER, DatasetError, SplitData, load_split
from cirlib.progress import progress_bar

# The public release's sha256 of each annotation file and (queries, gallery images) of each split are the dataset
# classes' `public_sha256` and `public_counts` (shared/data/real-annotations/README.md). CIRR's train captions (28,225
# queries) were not in our reference copy, so their hash is unknown: such a file is reported as "not compared".
_CHUNK = 64  # images per task sent to a worker process


@dataclass(frozen=True)
class ImageProblem:
    """A missing or unreadable image and what it breaks."""

    split: str
    category: str | None
    name: str
    path: Path
    problem: str  # "missing" | "empty file" | "unreadable: <error>"
    queries_affected: int  # distinct queries of this split whose reference or target it is


@dataclass
class SplitCheck:
    split: str
    category: str | None
    queries: int | None  # None when the caption file could not be read
    expected_queries: int | None
    images: int | None
    expected_images: int | None
    missing: int = 0
    unreadable: int = 0
    queries_affected: int = 0  # distinct queries with a missing/unreadable reference or target
    error: str | None = None  # an annotation problem that stops a run


@dataclass
class CheckReport:
    """What `check_dataset` found; `blocking` is True when a run on this folder would stop."""

    dataset: str
    root: Path
    annotation_files: list[dict]  # {"file", "status": identical|modified|missing|not compared, "sha256"}
    splits: list[SplitCheck]
    problems: list[ImageProblem]
    notes: list[str] = field(default_factory=list)
    problems_file: Path | None = None

    @property
    def blocking(self) -> bool:
        return bool(self.problems) or any(s.error for s in self.splits)

    def text(self) -> str:
        """The report as a person reads it."""
        lines = [f"{self.dataset} at {self.root}"]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append("annotation files:")
        for f in self.annotation_files:
            lines.append(f"  {f['status']:<14} {f['file']}")
        lines.append("splits (found / public release):")
        for s in self.splits:
            where = s.split + (f" {s.category}" if s.category else "")
            q = "?" if s.queries is None else f"{s.queries:,}"
            g = "?" if s.images is None else f"{s.images:,}"
            eq = "?" if s.expected_queries is None else f"{s.expected_queries:,}"
            eg = "?" if s.expected_images is None else f"{s.expected_images:,}"
            lines.append(f"  {where:<14} queries {q} / {eq}   images {g} / {eg}   missing {s.missing:,}   "
                         f"unreadable {s.unreadable:,}   queries affected {s.queries_affected:,}")
            if s.error:
                lines.append(f"    ERROR: {s.error}")
        if self.problems:
            kinds = Counter(p.problem.split(":")[0] for p in self.problems)
            lines.append(f"{len(self.problems):,} image problems ({', '.join(f'{n:,} {k}' for k, n in kinds.items())})"
                         f"; the full list: {self.problems_file}")
            for p in sorted(self.problems, key=lambda p: -p.queries_affected)[:10]:
                lines.append(f"  {p.problem:<10.60} {p.path}  ({p.queries_affected} queries)")
            if len(self.problems) > 10:
                lines.append(f"  ... {len(self.problems) - 10:,} more in {self.problems_file}")
        lines.append("what to do:")
        lines += [f"  - {a}" for a in self.advice()]
        return "\n".join(lines)

    def advice(self) -> list[str]:
        out = []
        if any(s.error for s in self.splits):
            out.append("fix or re-download the annotation files named above (the public copies: CIRR's "
                       "`cirr_dataset` branch, FashionIQ's repository); a run stops at the first broken record")
        modified = [f["file"] for f in self.annotation_files if f["status"] == "modified"]
        if modified:
            out.append(f"{len(modified)} annotation file(s) differ from the public release: numbers computed on "
                       "them are not comparable with published ones")
        if self.problems:
            out.append(f"restore the {len(self.problems):,} images listed in {self.problems_file} (re-download, or "
                       "re-extract the archive); a run stops before training, listing every missing image, unless "
                       "it is told missing_images=\"drop\" (queries whose images are missing are left out and "
                       "counted in every result file; such numbers are not comparable with published ones)")
        if not out:
            out.append("nothing: every annotation file parses and every image named by the splits opens")
        return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _inspect(path: str) -> str | None:
    """None when the image opens and decodes fully, else what is wrong with it (runs in a worker process)."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        return "missing"
    except OSError as err:
        return f"unreadable: {err}"
    if size == 0:
        return "empty file"
    try:
        with PIL.Image.open(p) as im:
            im.load()  # decode every pixel: a truncated file opens but fails here
            if im.width < 1 or im.height < 1:
                return f"unreadable: size {im.width}x{im.height}"
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as err:
        return f"unreadable: {type(err).__name__}: {err}"
    return None


def _inspect_chunk(chunk: list[str]) -> list[str | None]:
    return [_inspect(p) for p in chunk]


def _read_split(dataset: str, root: Path, split: str, category: str | None) -> tuple[SplitData | None, str | None]:
    """The split with its queries; else its gallery alone and why the queries could not be read."""
    try:
        return load_split(dataset, root, split, category), None
    except DatasetError as err:
        try:
            return load_split(dataset, root, split, category, with_queries=False), str(err)
        except DatasetError as err2:
            return None, str(err2)


def _refuse_unwritable(problems_file: Path) -> None:
    """Raise FileWriteError naming `problems_file` and why when it could not be written."""
    why = None
    if problems_file.is_dir():
        why = "it is a folder; give a file name"
    else:
        try:
            paths.check_writable(problems_file.parent, "folder of the problems file")
        except paths.FileWriteError as err:
            why = str(err)
    if why is not None:
        raise paths.FileWriteError(errno.EACCES, f"cannot write the problems file {problems_file}: {why}")


def _query_rows_of(data: SplitData) -> dict[str, set[int]]:
    """Image name -> the rows of the queries whose reference or target it is."""
    rows: dict[str, set[int]] = {}
    for i, q in enumerate(data.queries):
        for name in (q.reference, q.target):
            if name is not None:
                rows.setdefault(name, set()).add(i)
    return rows


def check_dataset(dataset: str, root: str | os.PathLike, *, workers: int | None = None, progress: bool = True,
                  problems_file: str | os.PathLike | None = None) -> CheckReport:
    """Check a dataset folder; see the module docstring. Never raises for what it finds: it reports it.

    Args:
        dataset: a registered dataset name ("cirr", "fashioniq"): its class knows its splits, public hashes, counts.
        root: the dataset root (cirr_dataset / fashionIQ_dataset folder).
        workers: image-checking processes (default: the CPU count, at most 8; 0 checks in this process).
        progress: show a progress bar over the images.
        problems_file: where the full list of image problems goes (default
            `outputs/data_check/<dataset>_image_problems.tsv`).
    Raises:
        FileNotFoundError: no folder at `root`.
        FileWriteError: `problems_file` could not be written (checked first, before any image is read).
    """
    ds = get_dataset(dataset)
    dataset = ds.name
    root = paths.data_root(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist")
    default = paths.OUTPUTS / "data_check" / f"{dataset}_image_problems.tsv"
    problems_out = Path(problems_file) if problems_file else default
    _refuse_unwritable(problems_out)  # before the long part, not after it
    notes = []
    if (root / "world.json").is_file():
        notes.append("a synthetic world written by cirlib.synth: its annotation files are its own, not the public ones")
    if ds.has_image_sets and (root / CIRR_RAW_FOLDER).is_dir() and not (root / "dev").is_dir():
        notes.append("images are read under img_raw/ (the official download's layout, used as it is)")

    annotation_files = []
    for rel, want in ds.public_sha256.items():
        path = root / rel
        if not path.is_file():
            annotation_files.append({"file": rel, "status": "missing", "sha256": None})
            continue
        have = _sha256(path)
        status = "not compared" if want is None else ("identical" if have == want else "modified")
        annotation_files.append({"file": rel, "status": status, "sha256": have})

    # every image file once; each (split, category, name) knows its file and how many queries use it as reference
    # or target (FashionIQ shirt and toptee share some names, so one file may serve several galleries)
    checks: list[SplitCheck] = []
    path_of: dict[tuple[str, str | None, str], str] = {}
    users: dict[tuple[str, str | None, str], set[int]] = {}  # the query rows whose reference or target it is
    for split, category in ds.all_splits():
        data, error = _read_split(dataset, root, split, category)
        expected = ds.public_counts.get((split, category), (None, None))
        if data is None:
            checks.append(SplitCheck(split, category, None, expected[0], None, expected[1], error=error))
            continue
        queries = None if error else len(data.queries)
        checks.append(SplitCheck(split, category, queries, expected[0], len(data.gallery), expected[1], error=error))
        query_rows = _query_rows_of(data)
        for name in data.gallery:
            path_of[(split, category, name)] = str(data.image_path(name))
            users[(split, category, name)] = query_rows.get(name, set())

    all_paths = list(dict.fromkeys(path_of.values()))
    chunks = [all_paths[i:i + _CHUNK] for i in range(0, len(all_paths), _CHUNK)]
    n_workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    results: list[str | None] = []
    with progress_bar(total=len(all_paths), desc=f"{dataset} images", unit="img", disable=not progress) as bar:
        if n_workers > 0 and len(chunks) > 1:
            with ProcessPoolExecutor(max_workers=n_workers) as pool:
                for out in pool.map(_inspect_chunk, chunks):
                    results.extend(out)
                    bar.update(len(out))
        else:
            for chunk in chunks:
                results.extend(_inspect_chunk(chunk))
                bar.update(len(chunk))
    problem_of = {p: r for p, r in zip(all_paths, results) if r is not None}

    problems: list[ImageProblem] = []
    by_split = {(s.split, s.category): s for s in checks}
    affected: dict[tuple[str, str | None], set[int]] = {key: set() for key in by_split}
    for key, path in path_of.items():
        problem = problem_of.get(path)
        if problem is None:
            continue
        split, category, name = key
        s = by_split[(split, category)]
        if problem == "missing":
            s.missing += 1
        else:
            s.unreadable += 1
        affected[(split, category)] |= users[key]
        problems.append(ImageProblem(split, category, name, Path(path), problem, len(users[key])))
    for key, hit in affected.items():
        by_split[key].queries_affected = len(hit)  # a query whose reference and target both fail counts once

    report = CheckReport(dataset, root, annotation_files, checks, problems, notes)
    if problems:
        rows = ["split\tcategory\tname\tpath\tproblem\tqueries_affected"]
        rows += [f"{p.split}\t{p.category or '-'}\t{p.name}\t{p.path}\t{p.problem}\t{p.queries_affected}"
                 for p in problems]
        report.problems_file = paths.atomic_write_text(problems_out, "\n".join(rows) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cirlib.data check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    checkable = [n for n in dataset_names() if get_dataset(n).public_sha256]
    parser.add_argument("--dataset", required=True, choices=checkable)
    parser.add_argument("root", type=Path, help="the cirr_dataset or fashionIQ_dataset folder")
    parser.add_argument("--workers", type=int, default=None, help="image-checking processes (default: CPU count)")
    parser.add_argument("--problems-file", type=Path, default=None,
                        help="where to write every image problem (default outputs/data_check/<dataset>_image_problems.tsv)")
    args = parser.parse_args(argv)
    try:
        report = check_dataset(args.dataset, args.root, workers=args.workers, problems_file=args.problems_file)
    except (ValueError, FileNotFoundError, paths.FileWriteError) as err:
        print(f"check failed: {err}", file=sys.stderr)
        return 2
    print(report.text())
    return 1 if report.blocking else 0
