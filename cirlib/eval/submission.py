"""CIRR test-server submissions: a writer in the server's exact format and a validator.

The server (cirr.cecs.anu.edu.au, see original-system.md section 7 and field.md section 5) takes two JSON files:

    recall_submission_<name>.json         {"version": "rc2", "metric": "recall", "<pairid>": [50 names], ...}
    recall_subset_submission_<name>.json  {"version": "rc2", "metric": "recall_subset", "<pairid>": [3 names], ...}

written with `json.dump(..., sort_keys=True)` and no indent, at most 5 MB each. Every test pair id must be present,
names come from the test1 gallery, the query's reference image is never listed, and the subset lists hold only the
query's img_set members other than the reference.

The validator reads the CIRR annotation JSONs directly (`cap.rc2.test1.json`, `split.rc2.test1.json`) so that it
does not depend on the dataset readers. This module builds the files' content but writes nothing (the caller writes
with cirlib.paths); its command line checks files before an upload:

    python -m cirlib.submission recall_submission_x.json recall_subset_submission_x.json \\
        --captions cap.rc2.test1.json --split split.rc2.test1.json     # or: --data-root <cirr_dataset>
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VERSION = "rc2"
METRIC_RECALL = "recall"
METRIC_SUBSET = "recall_subset"
RECALL_LENGTH = 50  # names per recall list the server expects
SUBSET_LENGTH = 3  # names per recall_subset list
# the server states "5 MB"; decimal megabytes is the stricter reading
MAX_BYTES = 5_000_000
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class SubmissionError(ValueError):
    """A CIRR submission (or the annotations it is checked against) is malformed."""


@dataclass(frozen=True)
class SubmissionQuery:
    """What the validator needs from one test query."""

    pair_id: int
    reference: str
    members: tuple[str, ...]  # the img_set's 6 names, reference included


# ------------------------------------------------------------------------------------------------------- building
@dataclass(frozen=True)
class SubmissionFile:
    """One server file: its name and its JSON document (the caller writes it, e.g. `cirlib.paths.atomic_write_text`)."""

    file_name: str  # recall_submission_<name>.json or recall_subset_submission_<name>.json
    document: dict[str, Any]  # {"version", "metric", "<pairid>": [names]}

    def text(self) -> str:
        """The file's exact content: the original's `json.dump(..., sort_keys=True)`, no indent. Indenting would
        push a 4,148-query recall file past the server's 5 MB."""
        return json.dumps(self.document, sort_keys=True)


def _prediction_dict(
    pair_ids: Sequence[int], lists: Sequence[Sequence[str]], length: int, metric: str
) -> dict[str, Any]:
    if len(lists) != len(pair_ids):
        raise SubmissionError(f"{metric}: {len(lists)} prediction lists for {len(pair_ids)} pair ids")
    out: dict[str, Any] = {"version": VERSION, "metric": metric}
    for i, (pid, names) in enumerate(zip(pair_ids, lists)):
        key = str(int(pid))
        if key in out:
            raise SubmissionError(f"{metric}: pair id {key} appears twice (row {i})")
        names = [str(n) for n in names]
        if len(names) != length:
            raise SubmissionError(f"{metric}: pair id {key} (row {i}) has {len(names)} names, expected {length}")
        if len(set(names)) != len(names):
            raise SubmissionError(f"{metric}: pair id {key} (row {i}) lists a name twice: {names}")
        out[key] = names
    return out


def cirr_submission_files(
    pair_ids: Sequence[int],
    recall_lists: Sequence[Sequence[str]],
    subset_lists: Sequence[Sequence[str]],
    name: str,
    *,
    recall_length: int = RECALL_LENGTH,
) -> tuple[SubmissionFile, SubmissionFile]:
    """The two server files, `recall_submission_<name>.json` and `recall_subset_submission_<name>.json`.

    Args:
        pair_ids: (N,) CIRR test pair ids.
        recall_lists: (N, 50) ranked gallery names per query, best first, reference excluded.
        subset_lists: (N, 3) ranked img_set members per query, reference excluded.
        name: submission name used in both file names.
        recall_length: names per recall list; the server wants 50 (smaller only for synthetic galleries).
    Returns:
        (recall file, subset file).
    """
    if not name or not _NAME_RE.match(name):
        raise SubmissionError(f"submission name must be letters, digits, '.', '_' or '-', got {name!r}")
    pair_ids = [int(p) for p in pair_ids]
    return (
        SubmissionFile(f"recall_submission_{name}.json",
                       _prediction_dict(pair_ids, recall_lists, recall_length, METRIC_RECALL)),
        SubmissionFile(f"recall_subset_submission_{name}.json",
                       _prediction_dict(pair_ids, subset_lists, SUBSET_LENGTH, METRIC_SUBSET)),
    )


# ----------------------------------------------------------------------------------------------- reading queries
def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise SubmissionError(f"{path}: {what} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise SubmissionError(f"{path}: {what} is not valid JSON ({e})") from e


def read_test_queries(captions: str | os.PathLike | Iterable[Any]) -> list[SubmissionQuery]:
    """The test queries from `cap.rc2.test1.json`, or from already-loaded records.

    Args:
        captions: the caption file path; or records that are dicts with 'pairid', 'reference', 'img_set.members'
            (the JSON's own), or objects with `pair_id`, `reference`, `members` (e.g. `cirlib.data.Query`).
    """
    source = "queries"
    if isinstance(captions, (str, os.PathLike)):
        source = str(captions)
        records = _read_json(Path(captions), "CIRR caption file")
        if not isinstance(records, list):
            raise SubmissionError(f"{source}: expected a list of query records, got {type(records).__name__}")
    else:
        records = list(captions)
    queries = []
    for i, rec in enumerate(records):
        try:
            if isinstance(rec, Mapping):
                pid, ref, members = rec["pairid"], rec["reference"], rec["img_set"]["members"]
            else:
                pid, ref, members = rec.pair_id, rec.reference, rec.members
        except (KeyError, TypeError, AttributeError) as e:
            raise SubmissionError(
                f"{source}: record {i} lacks {e}; expected 'pairid', 'reference' and 'img_set.members'"
            ) from e
        if members is None or len(members) < 2 or ref not in members:
            raise SubmissionError(
                f"{source}: record {i} (pairid {pid}) needs img_set members that include its reference {ref!r}, "
                f"got {members!r}"
            )
        queries.append(SubmissionQuery(int(pid), str(ref), tuple(str(m) for m in members)))
    return queries


def read_gallery_names(gallery: str | os.PathLike | Iterable[str]) -> set[str]:
    """Gallery names from `split.rc2.test1.json` (its keys) or from an iterable of names."""
    if isinstance(gallery, (str, os.PathLike)):
        split = _read_json(Path(gallery), "CIRR split file")
        if not isinstance(split, dict):
            raise SubmissionError(f"{gallery}: expected an object mapping image name -> relative path")
        return set(split)
    return {str(g) for g in gallery}


# ---------------------------------------------------------------------------------------------------- validation
def _summarise(code: str, what: str, rows: list[str]) -> str:
    examples = "; ".join(rows[:3])
    return f"[{code}] {len(rows)} {what} (e.g. {examples})"


def validate_cirr_submission(
    path: str | os.PathLike,
    captions_path_or_queries: str | os.PathLike | Iterable[Any],
    gallery_names: str | os.PathLike | Iterable[str],
    *,
    metric: str | None = None,
    recall_length: int = RECALL_LENGTH,
) -> list[str]:
    """Problems that would make the CIRR server reject or mis-score a submission file; empty = ok.

    Each problem is one line starting with a tag such as "[duplicates]" and a count with examples.

    Args:
        path: the submission JSON.
        captions_path_or_queries: `cap.rc2.test1.json` or query records (see `read_test_queries`).
        gallery_names: `split.rc2.test1.json` or the test gallery's names.
        metric: the expected "metric" ("recall" or "recall_subset"); None = trust the file's field, or infer it
            from the list lengths when the field is missing.
        recall_length: names per recall list; the server wants 50.
    """
    path = Path(path)
    queries = read_test_queries(captions_path_or_queries)
    gallery = read_gallery_names(gallery_names)
    if not path.is_file():
        return [f"[missing-file] {path} does not exist"]
    problems: list[str] = []
    size = path.stat().st_size
    if size > MAX_BYTES:
        problems.append(f"[too-large] the file has {size:,} bytes; the server accepts at most {MAX_BYTES:,}")
    try:
        with open(path, encoding="utf-8") as f:
            sub = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return problems + [f"[not-json] cannot parse the file as JSON: {e}"]
    if not isinstance(sub, dict):
        return problems + [f"[not-object] the top level must be a JSON object, got {type(sub).__name__}"]

    if "version" not in sub:
        problems.append(f"[version] no 'version' field; expected {VERSION!r}")
    elif sub["version"] != VERSION:
        problems.append(f"[version] 'version' is {sub['version']!r}, expected {VERSION!r}")

    predictions = {k: v for k, v in sub.items() if k not in ("version", "metric")}
    file_metric = sub.get("metric")
    if "metric" not in sub:
        problems.append(f"[metric] no 'metric' field; expected {METRIC_RECALL!r} or {METRIC_SUBSET!r}")
    elif file_metric not in (METRIC_RECALL, METRIC_SUBSET):
        problems.append(f"[metric] 'metric' is {file_metric!r}, expected {METRIC_RECALL!r} or {METRIC_SUBSET!r}")
    elif metric is not None and file_metric != metric:
        problems.append(f"[metric] 'metric' is {file_metric!r}, but a {metric!r} file was expected")
    if metric is None:
        metric = file_metric if file_metric in (METRIC_RECALL, METRIC_SUBSET) else None
    if metric is None:
        # no usable field: the list lengths say which kind of file this was meant to be
        lengths = [len(v) for v in predictions.values() if isinstance(v, list)]
        metric = METRIC_SUBSET if lengths and max(lengths) <= SUBSET_LENGTH else METRIC_RECALL
    length = SUBSET_LENGTH if metric == METRIC_SUBSET else recall_length

    by_key = {str(q.pair_id): q for q in queries}
    bad_keys = [k for k in predictions if not re.fullmatch(r"[1-9][0-9]*|0", k)]
    if bad_keys:
        problems.append(_summarise("bad-key", "keys are not integer pair ids", [repr(k) for k in bad_keys]))
    missing = [k for k in by_key if k not in predictions]
    if missing:
        problems.append(_summarise("missing-pairids", f"of {len(by_key)} test pair ids have no prediction", missing))
    extra = [k for k in predictions if k not in by_key and k not in bad_keys]
    if extra:
        problems.append(_summarise("extra-pairids", "pair ids are not in the test split", extra))

    rows: dict[str, list[str]] = {
        "not-a-list": [], "length": [], "unknown-names": [], "duplicates": [], "reference": [], "not-in-subset": []
    }
    for key, names in predictions.items():
        q = by_key.get(key)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            rows["not-a-list"].append(f"pairid {key}")
            continue
        if len(names) != length:
            rows["length"].append(f"pairid {key}: {len(names)}")
        unknown = [n for n in names if n not in gallery]
        if unknown:
            rows["unknown-names"].append(f"pairid {key}: {unknown[0]!r}")
        if len(set(names)) != len(names):
            dup = next(n for i, n in enumerate(names) if n in names[:i])
            rows["duplicates"].append(f"pairid {key}: {dup!r}")
        if q is None:
            continue
        if q.reference in names:
            rows["reference"].append(f"pairid {key}: {q.reference!r} at position {names.index(q.reference)}")
        if metric == METRIC_SUBSET:
            allowed = set(q.members) - {q.reference}
            outside = [n for n in names if n not in allowed]
            if outside:
                rows["not-in-subset"].append(f"pairid {key}: {outside[0]!r}")
    what = {
        "not-a-list": "predictions are not lists of name strings",
        "length": f"lists do not have {length} names ({metric})",
        "unknown-names": "lists hold names outside the test gallery",
        "duplicates": "lists contain duplicate names",
        "reference": "lists contain the query's own reference image",
        "not-in-subset": "subset lists hold names outside the query's img_set members minus the reference",
    }
    for code, found in rows.items():
        if found:
            problems.append(_summarise(code, what[code], found))
    return problems


def check_cirr_submission(
    path: str | os.PathLike,
    captions_path_or_queries: str | os.PathLike | Iterable[Any],
    gallery_names: str | os.PathLike | Iterable[str],
    *,
    metric: str | None = None,
    recall_length: int = RECALL_LENGTH,
) -> None:
    """Raise SubmissionError listing every problem `validate_cirr_submission` finds; return None if the file is ok."""
    problems = validate_cirr_submission(
        path, captions_path_or_queries, gallery_names, metric=metric, recall_length=recall_length
    )
    if problems:
        raise SubmissionError(f"{path}: {len(problems)} problem(s) for the CIRR server:\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------------------------------- command line
CAPTIONS_IN_ROOT = ("cirr", "captions", "cap.rc2.test1.json")  # the CIRR layout under a dataset root
SPLIT_IN_ROOT = ("cirr", "image_splits", "split.rc2.test1.json")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m cirlib.submission FILE...`: validate submission files; exit 0 if all are fine, 1 if any has
    problems, 2 if the annotations cannot be read."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m cirlib.submission",
        description="Check CIRR test-server submission files as the server would, before uploading them.")
    parser.add_argument("files", nargs="+", type=Path, help="submission JSON files (recall and/or recall_subset)")
    parser.add_argument("--captions", type=Path, help="cap.rc2.test1.json (default: from --data-root)")
    parser.add_argument("--split", type=Path, help="split.rc2.test1.json (default: from --data-root)")
    parser.add_argument("--data-root", type=Path,
                        help="the CIRR dataset root holding cirr/captions and cirr/image_splits")
    parser.add_argument("--recall-length", type=int, default=RECALL_LENGTH,
                        help=f"names per recall list (the server: {RECALL_LENGTH})")
    args = parser.parse_args(argv)
    captions, split = args.captions, args.split
    if args.data_root is not None:
        captions = captions or args.data_root.joinpath(*CAPTIONS_IN_ROOT)
        split = split or args.data_root.joinpath(*SPLIT_IN_ROOT)
    if captions is None or split is None:
        parser.error("give --captions and --split, or --data-root")
    try:
        queries = read_test_queries(captions)
        gallery = read_gallery_names(split)
    except SubmissionError as err:
        print(f"cannot read the annotations: {err}", file=sys.stderr)
        return 2
    failed = 0
    for path in args.files:
        problems = validate_cirr_submission(path, queries, gallery, recall_length=args.recall_length)
        if problems:
            failed += 1
            print(f"{path}: {len(problems)} problem(s)")
            print("\n".join(f"  {p}" for p in problems))
        else:
            print(f"{path}: ok")
    if failed:
        print(f"{failed} of {len(args.files)} file(s) would be rejected or mis-scored by the CIRR server")
    return 1 if failed else 0
