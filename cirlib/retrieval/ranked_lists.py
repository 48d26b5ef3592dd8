"""Other systems' ranked lists in, ours out: readers, checks and exporters of ranked candidate lists.

A ranked list is, per query, gallery image names best first (and, in some formats, a score per name). Formats are
`ListFormat` classes in the `LIST_FORMATS` registry (a new one is one class; `detect_format` tells the built-in
ones apart by suffix and first bytes):

    cirr    the CIRR server JSON {"version": "rc2", "metric": "recall", "<pair id>": [names, ...], ...}; its
            `recall_subset` file (3 names of the query's img_set) is read beside it when present (`subset_path`)
    circo   the CIRCO server JSON {"<query id>": [COCO image ids (ints), ...], ...}; ids become gallery names
            `cirlib.data.circo.image_name(id)` ("000000000123.jpg")
    trec    a TREC run, one candidate a line: `qid Q0 docid rank score tag` (whitespace-separated), ordered by rank
    topk    our top-K `.pt` files and the original's (`cirlib.retrieval.topk.TopK`); rows are the split's queries in
            order, so they are matched by row, not by id
    jsonl   one {"query": id, "candidates": [[name, score], ...]} a line (or [name, ...] without scores)

Query ids (`split_query_ids`): CIRR the pair id ("12063"), CIRCO the query id ("0"), FashionIQ
"<category>:<row>" with row the 0-based row of the query in its caption file `cap.<category>.<split>.json`
("dress:17"). A JSON number as a query id is read as its decimal string.

`read_ranked_lists` says what a file holds; `import_candidates` matches it to a split (`SplitQueries`) and checks it
before any model runs, listing every problem at once in one `RankedListError`: queries of the split missing from the
file (or, with missing_queries="drop", left out and reported), ids the split does not have, names outside the
gallery, a name twice in one list, lists shorter than K. A list that still holds the query's own reference image on
a dataset that excludes it (CIRR, CIRCO) is a warning with the count: the "R@1 near 0, R@5 high" signature of a
protocol error. `write_ranked_lists` exports a `TopK` (stage I, or stage II re-ranked) to any format; export then
import gives the same names, and the same scores in the formats that hold scores (TREC, JSONL: floats written
with `repr`, which reads back exactly).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cirlib.data import get_dataset
from cirlib.data.circo import image_name
from cirlib.data.readers import SplitData
from cirlib.eval import submission
from cirlib.eval.protocol import rows_holding_reference
from cirlib.paths import atomic_write_text
from cirlib.registry import Registry, RegistryError
from cirlib.retrieval.topk import TopK, TopKError
from cirlib.run_folder import file_sha256

LIST_FORMATS: Registry = Registry("ranked-list format", "cirlib.retrieval.ranked_lists")
MISSING_QUERY_POLICIES = ("error", "drop")
SHOWN = 5  # examples shown per kind of problem
_CIRR_FIELDS = ("version", "metric")
_INT_KEY = re.compile(r"[0-9]+", re.ASCII)
_CIRCO_NAME = re.compile(r"([0-9]+)\.jpg", re.ASCII)


class RankedListError(ValueError):
    """A ranked-list file is malformed or does not fit the split; the message lists every problem found."""


_KINDS = {  # what each kind of problem means, for the message
    "keys-twice": "keys appear twice", "bad-keys": "keys are not query ids", "bad-lists": "values are not lists",
    "fields": "lines without 6 fields", "rank": "ranks that are not integers", "score": "scores that are not numbers",
    "duplicate-rank": "ranks repeated within a query", "empty": "empty file", "not-json": "lines that are not JSON",
    "query": "lines without a query id", "candidates": "malformed candidate lists",
    "query-twice": "queries listed twice", "mixed-scores": "lines mix scored and bare candidates",
    "queries-twice": "queries listed twice", "unknown-queries": "query ids the split does not have",
    "missing-queries": "queries of the split missing from the file (missing_queries='drop' leaves them out)",
    "other-split": "top-K file of another split",
    "row-count": "row count differs", "row-targets": "rows whose target differs from the split's",
    "unknown-names": "names outside the gallery", "duplicates": "names listed twice in one list",
    "short-lists": "lists shorter than K", "subset-missing": "queries without a recall_subset list",
    "subset-names": "recall_subset lists outside the query's img_set", "no-queries": "nothing to import",
}


class _Problems:
    """Problems collected by kind (each with its examples), raised together as one RankedListError."""

    def __init__(self) -> None:
        self.kinds: dict[str, list[str]] = {}

    def add(self, kind: str, example: str) -> None:
        self.kinds.setdefault(kind, []).append(example)

    def raise_if_any(self, source: Any, what: str) -> None:
        if not self.kinds:
            return
        count = sum(len(v) for v in self.kinds.values())
        lines = [f"[{kind}] {len(ex)} {_KINDS.get(kind, kind)}: {'; '.join(ex[:SHOWN])}"
                 f"{' ...' if len(ex) > SHOWN else ''}" for kind, ex in self.kinds.items()]
        raise RankedListError(f"{source}: {count} problem(s) {what}:\n  " + "\n  ".join(lines))


# ------------------------------------------------------------------------------------------------- what a file says
@dataclass(frozen=True)
class RankedLists:
    """What a ranked-list file says, before it is matched to a split."""

    format: str  # one of FORMATS
    source: Path | None  # the file read (None: built in memory)
    queries: tuple[str, ...]  # query ids as strings, file order (topk: row numbers "0".., matched by row)
    names: tuple[tuple[str, ...], ...]  # per query, candidate image names best first
    scores: tuple[tuple[float, ...], ...] | None = None  # per query, aligned with names; None: the format has none
    subset: dict[str, tuple[str, ...]] | None = None  # CIRR recall_subset file's lists (pair id -> names), when read
    meta: dict[str, Any] = field(default_factory=dict)  # CIRR "version"/"metric", TREC "tag", "sha256", ...
    warnings: tuple[str, ...] = ()  # oddities that are not errors (e.g. TREC ranks that disagree with the scores)
    topk: TopK | None = None  # the whole file, for format "topk" (with stage-II scores, if any)

    @property
    def by_row(self) -> bool:
        """Whether the lists are matched to the split's queries by row (top-K files), not by query id."""
        return self.format == "topk"


def subset_path(path: str | os.PathLike) -> Path:
    """The CIRR recall_subset file beside a recall file: `recall_submission_x.json` ->
    `recall_subset_submission_x.json`, `..._recall.json` -> `..._recall_subset.json`, else `<stem>_subset<suffix>`."""
    path = Path(path)
    name = path.name
    if name.startswith("recall_submission_"):
        return path.with_name("recall_subset_" + name[len("recall_"):])
    if "recall" in name:
        head, _, tail = name.rpartition("recall")
        return path.with_name(f"{head}recall_subset{tail}")
    return path.with_name(f"{path.stem}_subset{path.suffix}")


def _load_json(path: Path) -> tuple[Any, list[str]]:
    """The parsed file and the object keys that appear twice (which plain `json.load` silently overwrites)."""
    twice: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                twice.append(key)
            out[key] = value
        return out

    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=pairs), twice
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RankedListError(f"{path}: not valid JSON ({e})") from e


def _json_kind(path: Path) -> str:
    doc, _ = _load_json(path)
    if isinstance(doc, dict):
        if any(k in doc for k in _CIRR_FIELDS):
            return "cirr"
        items = [v for v in doc.values() if isinstance(v, list) and v]
        if items and len(items) == len(doc):
            if all(isinstance(x, int) and not isinstance(x, bool) for v in items for x in v):
                return "circo"
            if all(isinstance(x, str) for v in items for x in v):
                return "cirr"
    raise RankedListError(f"{path}: a JSON file that is neither a CIRR server file ({{'version', 'metric', "
                          f"'<pair id>': [names]}}) nor a CIRCO one ({{'<query id>': [image ids]}}); "
                          f"pass the format (one of {', '.join(FORMATS)})")


def _first_line(head: bytes) -> str:
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff")
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _is_jsonl_line(line: str) -> bool:
    try:
        return isinstance(obj := json.loads(line), dict) and "query" in obj
    except json.JSONDecodeError:
        return False


def detect_format(path: str | os.PathLike) -> str:
    """The format of a ranked-list file (one of FORMATS), from its suffix and first bytes; a RankedListError when
    the file fits none."""
    path = Path(path)
    if not path.is_file():
        raise RankedListError(f"{path}: ranked-list file not found")
    suffix = path.suffix.lower()
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if suffix in (".pt", ".pth") or head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "topk"  # torch.save's zip container, or a legacy pickle
    first = _first_line(head)
    if suffix == ".jsonl" or _is_jsonl_line(first):
        return "jsonl"
    if first.startswith("{"):
        return _json_kind(path)
    if len(first.split()) == 6 or suffix in (".trec", ".run"):
        return "trec"
    raise RankedListError(f"{path}: cannot tell the format of this ranked-list file (first line {first[:80]!r}); "
                          f"pass it explicitly, one of {', '.join(FORMATS)}")


def _query_key(key: str) -> str | None:
    """A JSON key as a decimal query id ("012" -> "12"), or None when it is not one."""
    return str(int(key)) if _INT_KEY.fullmatch(key) else None


def _read_server_json(path: Path, what: str, skip: tuple[str, ...], item: Callable[[Any], str | None],
                      items: str) -> tuple[dict[str, Any], list[str], list[tuple[str, ...]]]:
    """(the document, query ids, name lists) of a {"<id>": [items]} JSON file; `item` turns an entry into a name
    (None: a bad entry), `items` says what the lists should hold."""
    doc, twice = _load_json(path)
    if not isinstance(doc, dict):
        raise RankedListError(f"{path}: expected the {what} object {{'<query id>': [...]}}, got {type(doc).__name__}")
    problems = _Problems()
    for key in twice:
        problems.add("keys-twice", f"{key!r} (JSON keeps only the last list)")
    queries, names = [], []
    for key, value in doc.items():
        if key in skip:
            continue
        qid = _query_key(key)
        got = [item(x) for x in value] if isinstance(value, list) else [None]
        if qid is None:
            problems.add("bad-keys", f"{key!r} is not an integer query id")
        elif None in got:
            problems.add("bad-lists", f"query {key}: expected a list of {items}, "
                                      f"got {json.dumps(value)[:80]}")
        else:
            queries.append(qid)
            names.append(tuple(got))
    problems.raise_if_any(path, f"in the {what}")
    return doc, queries, names


def _read_cirr(path: Path) -> RankedLists:
    doc, queries, names = _read_server_json(path, "CIRR server JSON", _CIRR_FIELDS,
                                            lambda x: x if isinstance(x, str) else None, "image names")
    meta = {k: doc[k] for k in _CIRR_FIELDS if k in doc}
    metric = meta.get("metric", submission.METRIC_RECALL)
    if metric not in (submission.METRIC_RECALL, submission.METRIC_SUBSET):
        raise RankedListError(f"{path}: 'metric' is {metric!r}, expected {submission.METRIC_RECALL!r} or "
                              f"{submission.METRIC_SUBSET!r}")
    return RankedLists("cirr", path, tuple(queries), tuple(names), meta=meta)


def _circo_name(x: Any) -> str | None:
    return image_name(x) if isinstance(x, int) and not isinstance(x, bool) and x >= 0 else None


def _read_circo(path: Path) -> RankedLists:
    _, queries, names = _read_server_json(path, "CIRCO server JSON", (), _circo_name, "integer image ids")
    return RankedLists("circo", path, tuple(queries), tuple(names))


def _trec_line(fields: list[str], where: str, problems: _Problems) -> tuple[int, float] | None:
    """(rank, score) of a TREC line's fields, or None after recording why not."""
    if len(fields) != 6:
        problems.add("fields", f"{where}: {len(fields)} fields, expected 6 (qid Q0 docid rank score tag)")
        return None
    try:
        rank = int(fields[3])
    except ValueError:
        problems.add("rank", f"{where}: rank {fields[3]!r} is not an integer")
        return None
    try:
        score = float(fields[4])
    except ValueError:
        score = math.nan
    if not math.isfinite(score):
        problems.add("score", f"{where}: score {fields[4]!r} is not a finite number")
        return None
    return rank, score


def _read_trec(path: Path) -> RankedLists:
    problems = _Problems()
    rows: dict[str, list[tuple[int, float, str, int]]] = {}  # qid -> (rank, score, name, line)
    tags: set[str] = set()
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        parsed = _trec_line(fields, f"line {line_no}", problems)
        if parsed is not None:
            rows.setdefault(fields[0], []).append((parsed[0], parsed[1], fields[2], line_no))
            tags.add(fields[5])
    disagree = []
    for qid, entries in rows.items():
        entries.sort(key=lambda e: e[0])
        for before, after in zip(entries, entries[1:]):
            if before[0] == after[0]:
                problems.add("duplicate-rank", f"line {after[3]}: query {qid} has rank {after[0]} again "
                                               f"(first on line {before[3]})")
        if any(a[1] < b[1] for a, b in zip(entries, entries[1:])):
            disagree.append(qid)
    if not rows and not problems.kinds:
        problems.add("empty", "no line of the form `qid Q0 docid rank score tag`")
    problems.raise_if_any(path, "in the TREC run")
    warnings = () if not disagree else (
        f"{path}: in {len(disagree)} queries the ranks disagree with the score order (e.g. query {disagree[0]}); "
        "the lists follow the ranks as written",)
    return RankedLists("trec", path, tuple(rows), tuple(tuple(e[2] for e in v) for v in rows.values()),
                       tuple(tuple(e[1] for e in v) for v in rows.values()),
                       meta={"tag": next(iter(tags)) if len(tags) == 1 else sorted(tags)}, warnings=warnings)


def _jsonl_candidates(cands: Any) -> tuple[list[str], list[float] | None] | None:
    """(names, scores or None) of a JSONL line's candidates, or None when they are malformed."""
    if not isinstance(cands, list):
        return None
    if all(isinstance(c, str) for c in cands):
        return list(cands), None
    pairs = [c for c in cands if isinstance(c, list) and len(c) == 2 and isinstance(c[0], str)
             and isinstance(c[1], (int, float)) and not isinstance(c[1], bool) and math.isfinite(c[1])]
    if len(pairs) != len(cands):
        return None
    return [c[0] for c in pairs], [float(c[1]) for c in pairs]


def _jsonl_record(line: str, where: str, problems: _Problems) -> tuple[str, list[str], list[float] | None] | None:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        problems.add("not-json", f"{where}: {e}")
        return None
    qid = obj.get("query") if isinstance(obj, dict) else None
    if not isinstance(qid, (str, int)) or isinstance(qid, bool):
        problems.add("query", f"{where}: expected {{'query': <id>, 'candidates': [...]}}, got {line[:80]!r}")
        return None
    cands = _jsonl_candidates(obj.get("candidates"))
    if cands is None:
        problems.add("candidates", f"{where} (query {qid}): 'candidates' must be [[name, score], ...] or "
                                   f"[name, ...], got {json.dumps(obj.get('candidates'))[:80]}")
        return None
    return str(qid), cands[0], cands[1]


def _read_jsonl(path: Path) -> RankedLists:
    problems = _Problems()
    lines: dict[str, int] = {}
    names, scores = [], []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        rec = None if not line.strip() else _jsonl_record(line, f"line {line_no}", problems)
        if rec is None:
            continue
        if rec[0] in lines:
            problems.add("query-twice", f"line {line_no}: query {rec[0]} again (first on line {lines[rec[0]]})")
            continue
        lines[rec[0]] = line_no
        names.append(tuple(rec[1]))
        scores.append(rec[2])
    with_scores = [s is not None for s in scores]
    if any(with_scores) and not all(with_scores):
        odd = [f"line {n}" for (q, n), s in zip(lines.items(), with_scores) if s != with_scores[0]]
        problems.add("mixed-scores", f"lines mix [name, score] and bare names; unlike line {min(lines.values())}: "
                                     + ", ".join(odd[:SHOWN]))
    if not lines and not problems.kinds:
        problems.add("empty", "no {'query': ..., 'candidates': [...]} line")
    problems.raise_if_any(path, "in the JSONL file")
    return RankedLists("jsonl", path, tuple(lines), tuple(names),
                       tuple(tuple(s) for s in scores) if all(with_scores) else None)


def _read_topk(path: Path) -> RankedLists:
    try:
        topk = TopK.load(path)
    except TopKError as e:
        raise RankedListError(str(e)) from e
    names = tuple(tuple(row) for row in topk.sorted_index_names.tolist())
    scores = None if topk.scores is None else tuple(tuple(row) for row in topk.scores.double().tolist())
    meta = {"dataset": topk.dataset, "split": topk.split, "category": topk.category, "stage1_run": topk.stage1_run}
    return RankedLists("topk", path, tuple(str(i) for i in range(topk.num_queries)), names, scores, meta=meta,
                       topk=topk)




def _with_subset(lists: RankedLists, subset_file: Path | None) -> RankedLists:
    """A CIRR recall file's lists with its recall_subset file's (`subset_file`, else the one beside it if any)."""
    if lists.meta.get("metric") == submission.METRIC_SUBSET:
        raise RankedListError(f"{lists.source}: a recall_subset file (3 names per query); read the recall file "
                              f"(50 names per query): its subset file is read beside it")
    path = subset_file if subset_file is not None else subset_path(lists.source)
    if subset_file is None and not path.is_file():
        return lists
    if not path.is_file():
        raise RankedListError(f"{path}: CIRR recall_subset file not found")
    sub = _read_cirr(path)
    if sub.meta.get("metric", submission.METRIC_SUBSET) != submission.METRIC_SUBSET:
        raise RankedListError(f"{path}: not a CIRR recall_subset file (expected 'metric': 'recall_subset')")
    meta = {**lists.meta, "subset_source": str(path), "subset_sha256": file_sha256(path)}
    return dataclasses.replace(lists, subset=dict(zip(sub.queries, sub.names)), meta=meta)


def read_ranked_lists(path: str | os.PathLike, format: str = "auto", *,
                      subset_file: str | os.PathLike | None = None) -> RankedLists:
    """Read a ranked-list file; its sha256 is in `meta["sha256"]`.

    Args:
        path: the file.
        format: one of FORMATS, or "auto" (`detect_format`).
        subset_file: CIRR only: the recall_subset file; None = the one beside `path` (`subset_path`) if it exists.
    """
    path = Path(path)
    if not path.is_file():
        raise RankedListError(f"{path}: ranked-list file not found")
    fmt = _format(detect_format(path) if format == "auto" else format, "'auto' or ")
    if subset_file is not None and not fmt.has_subset_file:
        raise RankedListError(f"subset_file is the CIRR recall_subset file; {path} is read as {fmt.name}")
    lists = fmt.read(path, None if subset_file is None else Path(subset_file))
    return dataclasses.replace(lists, meta={**lists.meta, "sha256": file_sha256(path)})


# ------------------------------------------------------------------------------------------------- what a split says
def _query_id(query: Any, category: str | None) -> str:
    """A query's id: CIRR pair id, CIRCO id, else "<category>:<caption-file row>" (the row alone without one)."""
    pair_id = getattr(query, "pair_id", None)
    if pair_id is not None:
        return str(pair_id)
    if isinstance(getattr(query, "id", None), int):
        return str(query.id)
    cat = getattr(query, "category", None) or category
    return f"{cat}:{query.index}" if cat else str(query.index)


def split_query_ids(sd: Any) -> list[str]:
    """The query ids of a split, in its query order: CIRR str(pair_id); FashionIQ f"{category}:{row}" (row: the
    0-based row of the caption file); CIRCO str(query id).

    Args:
        sd: a `SplitData`, or anything with `.queries` (CIRCO: `cirlib.eval.circo.CircoQuery` records), or the
            query records themselves.
    """
    queries = getattr(sd, "queries", sd)
    return [_query_id(q, getattr(sd, "category", None)) for q in queries]


@dataclass(frozen=True)
class SplitQueries:
    """What a split says about its queries, dataset-neutral: what `import_candidates` checks a file against."""

    dataset: str  # a registered dataset name
    split: str
    category: str | None
    query_ids: tuple[str, ...]  # row order = the split's query order
    references: tuple[str, ...]  # gallery name of each query's reference
    gallery: tuple[str, ...]  # gallery names in split-file order (TopK.index_names)
    targets: tuple[str, ...] | None = None  # single-target datasets; None for test splits / CIRCO
    group_names: tuple[tuple[str, ...], ...] | None = None  # CIRR img_set members minus the reference (TopK order)

    def __post_init__(self) -> None:
        n = len(self.query_ids)
        lengths = {"references": len(self.references), "targets": len(self.targets or self.query_ids),
                   "group_names": len(self.group_names or self.query_ids)}
        bad = {k: v for k, v in lengths.items() if v != n}
        if bad or n == 0:
            raise RankedListError(f"{self.dataset} {self.split}: {n} query ids, but {bad or 'no queries'}")
        if len(set(self.query_ids)) != n:
            twice = sorted({q for q in self.query_ids if self.query_ids.count(q) > 1})
            raise RankedListError(f"{self.dataset} {self.split}: query ids {twice[:SHOWN]} appear twice")

    @property
    def title(self) -> str:
        """"CIRR val", "FashionIQ val dress": for messages."""
        return " ".join(x for x in (get_dataset(self.dataset).title, self.split, self.category) if x)

    @classmethod
    def from_split(cls, sd: SplitData) -> SplitQueries:
        """From a split read with its queries (`cirlib.data.load_split`; CIRR, FashionIQ, plug-in datasets)."""
        if not sd.queries:
            raise RankedListError(f"{sd.dataset} {sd.split}: the split was read without queries")
        ds = get_dataset(sd)
        targets = [q.target for q in sd.queries]
        groups = None
        if ds.has_image_sets and all(q.members for q in sd.queries):
            groups = tuple(tuple(m for m in q.members if m != q.reference) for q in sd.queries)
        return cls(sd.dataset, sd.split, sd.category, tuple(split_query_ids(sd)),
                   tuple(q.reference for q in sd.queries), tuple(sd.gallery),
                   tuple(targets) if sd.has_targets and None not in targets else None, groups)

    @classmethod
    def from_circo(cls, queries: Sequence[Any], gallery_names: Sequence[str], split: str) -> SplitQueries:
        """From CIRCO records (`cirlib.eval.circo.read_annotations`, or `CircoSplit.queries`) and the gallery's
        names (`image_name(id)` style, e.g. `list(CircoGallery.names)`). CIRCO has several ground truths per query,
        so `targets` is None; they are scored by `cirlib.eval.circo`."""
        return cls("circo", split, None, tuple(split_query_ids(queries)),
                   tuple(image_name(q.reference_img_id) for q in queries), tuple(gallery_names))


# ------------------------------------------------------------------------------------------------------------ import
@dataclass(frozen=True)
class ImportedCandidates:
    """A ranked-list file matched to a split: the top-K artifact stage II re-ranks, and what was left out."""

    topk: TopK  # rows = kept queries in split order, K columns; imported scores when the file had them
    rows: tuple[int, ...]  # which split rows were kept (all, unless dropped)
    dropped_queries: tuple[str, ...]  # query ids missing from the file and left out (missing_queries="drop")
    warnings: tuple[str, ...]  # e.g. references left in the lists (with the count)


def _match_rows(lists: RankedLists, queries: SplitQueries, missing_queries: str,
                problems: _Problems) -> tuple[list[int], list[int], list[str]]:
    """(split rows kept, their rows in the file, query ids dropped), recording id mismatches in `problems`."""
    if lists.by_row:
        _check_topk_file(lists, queries, problems)
        file_row = {q: i for i, q in enumerate(queries.query_ids[:len(lists.queries)])}
    else:
        file_row = {}
        for i, q in enumerate(lists.queries):
            if q in file_row:
                problems.add("queries-twice", f"query {q} (lists {file_row[q]} and {i})")
            file_row.setdefault(q, i)
        known = set(queries.query_ids)
        for q in (q for q in file_row if q not in known):
            problems.add("unknown-queries", f"query {q} is not a {queries.title} query (ids look like "
                                            f"{queries.query_ids[0]!r})")
    missing = [q for q in queries.query_ids if q not in file_row]
    if missing and missing_queries == "error":
        for q in missing:
            problems.add("missing-queries", f"query {q}")
    kept = [i for i, q in enumerate(queries.query_ids) if q in file_row]
    return kept, [file_row[queries.query_ids[i]] for i in kept], missing


def _check_topk_file(lists: RankedLists, queries: SplitQueries, problems: _Problems) -> None:
    """A top-K file (matched by row) must be of the same dataset, split and category, row for row."""
    for key in ("dataset", "split", "category"):
        if lists.meta.get(key) != getattr(queries, key):
            problems.add("other-split", f"the file's {key} is {lists.meta.get(key)!r}, the split's "
                                        f"{getattr(queries, key)!r}")
    if len(lists.queries) != len(queries.query_ids):
        problems.add("row-count", f"{len(lists.queries)} rows for {len(queries.query_ids)} queries "
                                  "(a top-K file's rows are the split's queries, in order)")
    theirs = lists.topk.target_names if lists.topk is not None else None
    if theirs is not None and queries.targets is not None:
        for i, (a, b) in enumerate(zip(theirs, queries.targets)):
            if a != b:
                problems.add("row-targets", f"row {i} (query {queries.query_ids[i]}): target {a!r}, the split's {b!r}")


def _check_list(qid: str, names: Sequence[str], reference: str, gallery: set[str], k: int,
                problems: _Problems) -> None:
    """Record what is wrong with one query's list: names outside the gallery, a name twice, fewer than k names."""
    if len(names) < k:
        problems.add("short-lists", f"query {qid}: {len(names)} names, K = {k}")
    distinct = set(names)
    if len(distinct) == len(names) and distinct - gallery <= {reference}:
        return  # the common case, without a loop over the names
    seen: dict[str, int] = {}
    for j, name in enumerate(names):
        if name not in gallery and name != reference:
            problems.add("unknown-names", f"query {qid}: {name!r} at position {j} is not in the gallery")
        if name in seen:
            problems.add("duplicates", f"query {qid}: {name!r} at positions {seen[name]} and {j}")
        seen.setdefault(name, j)


def _subset_groups(lists: RankedLists, queries: SplitQueries, kept: list[int],
                   problems: _Problems) -> list[tuple[str, ...]] | None:
    """Each kept query's img_set members minus the reference, the subset file's ranking first (then the rest in
    member order); None when the split has no image sets."""
    if queries.group_names is None:
        return None
    groups = [queries.group_names[i] for i in kept]
    if lists.subset is None:
        return groups
    out = []
    for i, members in zip(kept, groups):
        qid = queries.query_ids[i]
        ranked = lists.subset.get(qid)
        if ranked is None:
            problems.add("subset-missing", f"query {qid} has no list in the recall_subset file")
        elif not set(ranked) <= set(members) or len(set(ranked)) != len(ranked):
            problems.add("subset-names", f"query {qid}: {list(ranked)} are not distinct img_set members "
                                         f"other than the reference {list(members)}")
        else:
            members = tuple(ranked) + tuple(m for m in members if m not in ranked)
        out.append(members)
    return out


def _reference_warning(queries: SplitQueries, kept: list[int], holding: np.ndarray, names: np.ndarray) -> str:
    first = int(holding[0])
    qid, ref = queries.query_ids[kept[first]], queries.references[kept[first]]
    position = names[first].tolist().index(ref)
    return (f"{len(holding)} of {len(kept)} lists hold the query's own reference image (e.g. query {qid}: "
            f"{ref!r} at position {position}); {get_dataset(queries.dataset).title} excludes the reference from the "
            "ranking, so these lists were made without that step (the 'R@1 near 0, R@5 high' signature)")


def import_candidates(lists: RankedLists, queries: SplitQueries, *, k: int,
                      missing_queries: str = "error") -> ImportedCandidates:
    """Match ranked lists to a split and build the top-K artifact of their first k names.

    Every problem is collected first and raised as one RankedListError: split queries missing from the file (unless
    missing_queries="drop"), ids the split does not have, names outside the gallery, a name twice in a list, lists
    shorter than k, and CIRR subset lists that are not the query's img_set members. References left in the lists
    are a warning (datasets that exclude the reference).

    Args:
        lists: `read_ranked_lists`'s result.
        queries: the split (`SplitQueries.from_split` / `from_circo`).
        k: candidates per query kept (the first k of each list).
        missing_queries: "error" or "drop" (queries without a list are left out, named in `dropped_queries`).
    """
    if missing_queries not in MISSING_QUERY_POLICIES:
        raise RankedListError(f"missing_queries={missing_queries!r}, expected one of {list(MISSING_QUERY_POLICIES)}")
    if k < 1:
        raise RankedListError(f"k={k}: at least one candidate per query")
    problems = _Problems()
    kept, file_rows, missing = _match_rows(lists, queries, missing_queries, problems)
    gallery = set(queries.gallery)
    for i, r in zip(kept, file_rows):
        _check_list(queries.query_ids[i], lists.names[r], queries.references[i], gallery, k, problems)
    groups = _subset_groups(lists, queries, kept, problems)
    if not kept and not problems.kinds:
        problems.add("no-queries", f"none of the {len(queries.query_ids)} queries of the split has a list")
    problems.raise_if_any(lists.source or "<ranked lists>", f"importing {lists.format} lists into {queries.title} "
                                                            f"at K = {k}")
    topk, warnings = _imported_topk(lists, queries, kept, file_rows, groups, k, len(missing))
    return ImportedCandidates(topk, tuple(kept), tuple(missing) if missing_queries == "drop" else (), warnings)


def _imported_topk(lists: RankedLists, queries: SplitQueries, kept: list[int], file_rows: list[int],
                   groups: list[tuple[str, ...]] | None, k: int, dropped: int) -> tuple[TopK, tuple[str, ...]]:
    """The top-K of the checked lists' first k names (split rows `kept`, file rows `file_rows`), and the warnings."""
    names = np.asarray([lists.names[r][:k] for r in file_rows], dtype=str)
    holding = rows_holding_reference(names, [queries.references[i] for i in kept])
    warnings = list(lists.warnings)
    if holding.size and get_dataset(queries.dataset).excludes_reference:
        warnings.append(_reference_warning(queries, kept, holding, names))
    record = {"format": lists.format, "source": str(lists.source), "k": k, "dropped_queries": dropped,
              **{key: lists.meta[key] for key in ("sha256", "subset_source", "subset_sha256") if key in lists.meta}}
    topk = TopK(
        dataset=queries.dataset, split=queries.split, category=queries.category, sorted_index_names=names,
        index_names=queries.gallery,
        target_names=None if queries.targets is None else [queries.targets[i] for i in kept],
        scores=None if lists.scores is None else np.asarray([lists.scores[r][:k] for r in file_rows]),
        group_names=None if groups is None else np.asarray(groups, dtype=str),
        reference_removed=not holding.size,
        provenance={"imported": record},
    )
    return topk, tuple(warnings)


# ------------------------------------------------------------------------------------------------------------ export
@dataclass(frozen=True)
class _Ranking:
    names: list[list[str]]  # (N, L) best first
    scores: list[list[float]] | None  # (N, L), None when the TopK has none
    subset: list[list[str]] | None  # (N, 5) CIRR img_set members, ranked


def _ranking(topk: TopK, stage: str, fusion_weight: float, length: int | None) -> _Ranking:
    """The ranking an export writes: stage I's as stored, or stage II's (`TopK.reranked(fusion_weight)`, scored by
    `final_scores`), cut to its first `length` names."""
    if stage == "auto":
        stage = "stage2" if topk.stage2_scores is not None else "stage1"
    if stage not in ("stage1", "stage2"):
        raise RankedListError(f"stage={stage!r}, expected 'auto', 'stage1' or 'stage2'")
    ranked = topk.reranked(fusion_weight) if stage == "stage2" else topk
    scores = ranked.final_scores(fusion_weight) if stage == "stage2" else ranked.scores
    cut = slice(None, length)
    return _Ranking(
        ranked.sorted_index_names[:, cut].tolist(),
        None if scores is None else scores[:, cut].double().tolist(),
        None if ranked.group_names is None else ranked.group_names.tolist(),
    )


def _int_ids(query_ids: Sequence[str], what: str) -> list[int]:
    bad = [q for q in query_ids if not _INT_KEY.fullmatch(str(q))]
    if bad:
        raise RankedListError(f"{what} lists are keyed by integer query ids; got {bad[:SHOWN]}")
    return [int(q) for q in query_ids]


def _circo_id(name: str) -> int:
    m = _CIRCO_NAME.fullmatch(Path(name).name)
    if m is None:
        raise RankedListError(f"{name!r} is not a CIRCO gallery name (<COCO image id>.jpg)")
    return int(m.group(1))


def _no_spaces(values: Sequence[str], what: str) -> None:
    bad = [v for v in values if not v or any(c.isspace() for c in v)]
    if bad:
        raise RankedListError(f"a TREC run's fields are whitespace-separated: {what} {bad[:SHOWN]} cannot be written")


def _write_cirr(path: Path, ids: Sequence[str], r: _Ranking, tag: str) -> Path:
    pair_ids = [str(p) for p in _int_ids(ids, "CIRR")]
    files = [(path, submission.METRIC_RECALL, r.names)]
    if r.subset is not None:
        files.append((subset_path(path), submission.METRIC_SUBSET, [row[:submission.SUBSET_LENGTH]
                                                                    for row in r.subset]))
    for file, metric, lists in files:
        doc = {"version": submission.VERSION, "metric": metric, **dict(zip(pair_ids, lists))}
        atomic_write_text(file, submission.SubmissionFile(file.name, doc).text())
    return path


def _write_circo(path: Path, ids: Sequence[str], r: _Ranking, tag: str) -> Path:
    doc = {str(q): [_circo_id(n) for n in row] for q, row in zip(_int_ids(ids, "CIRCO"), r.names)}
    return atomic_write_text(path, json.dumps(doc))


def _write_trec(path: Path, ids: Sequence[str], r: _Ranking, tag: str) -> Path:
    _no_spaces(list(ids), "query ids")
    _no_spaces([n for row in r.names for n in row], "names")
    _no_spaces([tag], "tag")
    lines = []
    for i, q in enumerate(ids):
        row = r.names[i]
        scores = r.scores[i] if r.scores is not None else [float(len(row) - j) for j in range(len(row))]
        lines += [f"{q} Q0 {n} {j + 1} {s!r} {tag}" for j, (n, s) in enumerate(zip(row, scores))]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def _write_jsonl(path: Path, ids: Sequence[str], r: _Ranking, tag: str) -> Path:
    rows = []
    for i, q in enumerate(ids):
        cands = r.names[i] if r.scores is None else [[n, s] for n, s in zip(r.names[i], r.scores[i])]
        rows.append(json.dumps({"query": q, "candidates": cands}))
    return atomic_write_text(path, "\n".join(rows) + "\n")


# ------------------------------------------------------------------------------------------------------- the formats
class ListFormat:
    """A ranked-list file format: a class registered in LIST_FORMATS under its `name` (a new format is one class,
    in cirlib or a plug-in: `cirlib.registry`). `read` returns what the file says; `write` exports a ranking. The
    built-in formats name their reader and writer functions; a plug-in may override `read` / `write` instead."""

    name: str
    has_scores: bool = False  # the file holds a score per name
    has_subset_file: bool = False  # a second file beside it holds the CIRR subset ranking
    reader: Callable[[Path], RankedLists] | None = None
    writer: Callable[[Path, Sequence[str], _Ranking, str], Path] | None = None

    def read(self, path: Path, subset_file: Path | None) -> RankedLists:
        if self.reader is None:
            raise RankedListError(f"format {self.name!r} has no reader")
        return self.reader(path)

    def write(self, path: Path, ids: Sequence[str], ranking: _Ranking, tag: str) -> Path:
        if self.writer is None:
            raise RankedListError(f"format {self.name!r} has no exporter of ranked lists")
        return self.writer(path, ids, ranking, tag)


@LIST_FORMATS.register
class CirrServerFormat(ListFormat):
    """The CIRR server JSON (recall file; its recall_subset file read beside it)."""

    name, has_subset_file = "cirr", True
    writer = staticmethod(_write_cirr)

    def read(self, path: Path, subset_file: Path | None) -> RankedLists:
        return _with_subset(_read_cirr(path), subset_file)


@LIST_FORMATS.register
class CircoServerFormat(ListFormat):
    """The CIRCO server JSON: COCO image ids per query id."""

    name = "circo"
    reader, writer = staticmethod(_read_circo), staticmethod(_write_circo)


@LIST_FORMATS.register
class TrecRunFormat(ListFormat):
    """A TREC run: `qid Q0 docid rank score tag` a line."""

    name, has_scores = "trec", True
    reader, writer = staticmethod(_read_trec), staticmethod(_write_trec)


@LIST_FORMATS.register
class TopKFormat(ListFormat):
    """Our top-K `.pt` files and the original's (exported whole by `TopK.save`, see `write_ranked_lists`)."""

    name, has_scores = "topk", True
    reader = staticmethod(_read_topk)


@LIST_FORMATS.register
class JsonLinesFormat(ListFormat):
    """One {"query": id, "candidates": [[name, score], ...]} a line."""

    name, has_scores = "jsonl", True
    reader, writer = staticmethod(_read_jsonl), staticmethod(_write_jsonl)


FORMATS = LIST_FORMATS.names()  # the built-in formats, registration order


def _format(name: str, also: str = "") -> ListFormat:
    """The format registered as `name` (a RankedListError naming the known ones otherwise)."""
    try:
        return LIST_FORMATS.get(name)()
    except RegistryError:
        raise RankedListError(f"format {name!r}: expected {also}one of {', '.join(LIST_FORMATS.names())}") from None


def write_ranked_lists(topk: TopK, path: str | os.PathLike, format: str, *, query_ids: Sequence[str],
                       fusion_weight: float = 0.0, tag: str = "cirlib", stage: str = "auto",
                       length: int | None = None) -> Path:
    """Export a top-K (stage I, or re-ranked by stage II) to a ranked-list file, atomically; returns the path.

    The ranking written: stage I's as stored (scores: `topk.scores`), or, for a TopK with stage-II scores,
    `topk.reranked(fusion_weight)` scored by its `final_scores(fusion_weight)`. Formats:
    cirr: the server JSON with all the names each list has (the test server wants exactly 50: length=50, or
    `Dataset.submission_files`), plus, when the TopK has the img_set members, the recall_subset file (3 names)
    at `subset_path(path)`; circo: {"<id>": [COCO ids]} (the server wants exactly 50); trec: `qid Q0 name rank
    score tag` (a TopK without scores gets K - rank + 1 as scores); jsonl: [[name, score], ...] or names only;
    topk: `topk.save(path)`, the whole artifact (stage, fusion_weight and length do not apply). Scores are written
    with `repr`, so they read back exactly.

    Args:
        topk: the artifact.
        path: the file to write (its folder is created).
        format: one of FORMATS.
        query_ids: one per row (`split_query_ids` of the split, or `[query_ids[i] for i in imported.rows]`).
        fusion_weight: w of `TopK.final_scores` for a re-ranked TopK.
        tag: the TREC run tag.
        stage: "auto" (stage II when the TopK has its scores), "stage1" or "stage2".
        length: names per query (the first `length` of the ranking); None = all K.
    """
    path = Path(path)
    ids = [str(q) for q in query_ids]
    if len(ids) != topk.num_queries:
        raise RankedListError(f"{len(ids)} query ids for a top-K of {topk.num_queries} rows")
    fmt = _format(format)
    if isinstance(fmt, TopKFormat):
        return topk.save(path)
    if length is not None and not 1 <= length <= topk.k:
        raise RankedListError(f"length={length}: the top-K holds {topk.k} names per query")
    return fmt.write(path, ids, _ranking(topk, stage, fusion_weight, length), tag)
