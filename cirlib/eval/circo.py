"""CIRCO's metrics, test-server file and validator, as pure functions (CIRCO: several ground truths per query).

For a query with ground-truth set G and a ranked list of unique predictions p_1..p_n (the benchmark's definitions,
`shared/data/real-annotations/circo/README.md`):

- AP@k = (sum over i <= k with p_i in G of precision@i) / min(|G|, k); mAP@k is its mean over queries, in percent.
- Recall@k counts only `target_img_id` (the image the caption was written for): 1 if it is among p_1..p_k.
- Semantic mAP@10: mAP@10 over the queries that carry each semantic aspect (a query counts in every aspect it lists).
- Duplicate ids in one prediction list are an error, not deduplicated.
- Scored lists follow the test server's rule (`validate_submission`, also applied by `circo_metrics`): every query
  and no other, exactly 50 unique integer ids each (and in the gallery, when one is given).

    python -m cirlib.circo evaluate --annotations PATH/val.json --predictions FILE.json [--gallery ...]
    python -m cirlib.circo validate --annotations PATH/test.json FILE.json [--gallery image_info_unlabeled2017.json]

Imports nothing from cirlib (the eval room's rule).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KS = (5, 10, 25, 50)  # the benchmark's reported cut-offs
SUBMISSION_LENGTH = 50  # ids per query in a test-server file
SEMANTIC_K = 10
ASPECTS = ("cardinality", "addition", "negation", "direct_addressing", "compare_change", "comparative_statement",
           "statement_with_conjunction", "spatial_relations_background", "viewpoint")


class CircoError(ValueError):
    """A bad annotation or prediction file or record (the message names the file and the query id)."""


@dataclass(frozen=True)
class CircoQuery:
    """One CIRCO record. Ground truths and aspects exist on val only."""

    id: int
    reference_img_id: int
    relative_caption: str
    shared_concept: str
    target_img_id: int | None = None  # val: always gt_img_ids[0]
    gt_img_ids: tuple[int, ...] = ()
    semantic_aspects: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------------------ metrics


def _unique_ids(predictions: Sequence[int], where: str) -> list[int]:
    ids = list(predictions)
    seen: set[int] = set()
    for i, x in enumerate(ids):
        if isinstance(x, bool) or not isinstance(x, int):
            raise CircoError(f"{where}: prediction {i} is {x!r} ({type(x).__name__}); expected an integer image id")
        if x in seen:
            raise CircoError(f"{where}: image id {x} appears twice (position {i}); prediction lists hold unique ids")
        seen.add(x)
    return ids


def average_precision_at_k(predictions: Sequence[int], ground_truths: Iterable[int], k: int) -> float:
    """AP@k of one ranked list (a fraction in [0, 1]).

    Args:
        predictions: ranked unique image ids, best first (at least k are not required: missing ranks count as misses).
        ground_truths: the query's correct image ids (non-empty).
        k: the cut-off.
    """
    gts = set(ground_truths)
    if not gts:
        raise CircoError("a query without ground truths has no AP")
    if k < 1:
        raise CircoError(f"k must be >= 1, got {k}")
    ranked = _unique_ids(predictions, "predictions")[:k]
    hits, total = 0, 0.0
    for i, x in enumerate(ranked, start=1):
        if x in gts:
            hits += 1
            total += hits / i
    return total / min(len(gts), k)


def circo_metrics(predictions: Mapping[Any, Any], queries: Sequence[CircoQuery], ks: Sequence[int] = KS,
                  gallery: set[int] | None = None) -> dict[str, Any]:
    """mAP@k and Recall@k (percent) over the queries, and semantic mAP@10 per aspect (an aspect -> percent mapping).

    Args:
        predictions: query id (int or its string) -> ranked image ids, under the test server's rule
            (`validate_submission`): every query and no other, exactly 50 unique integer ids each.
        queries: val records (with ground truths).
        ks: cut-offs.
        gallery: when given, every id must be one of these.
    Raises:
        CircoError: listing what breaks the rule (the same problems `validate_submission` returns).
    """
    if not queries:
        raise CircoError("no queries to evaluate")
    problems = validate_submission(predictions, queries, gallery)
    if problems:
        raise CircoError(f"predictions refused ({len(problems)} problem(s); the test server's rule, "
                         f"`validate_submission`): " + "; ".join(problems[:5]))
    predictions = {int(key): ids for key, ids in predictions.items()}
    out: dict[str, Any] = {}
    ap: dict[int, dict[int, float]] = {k: {} for k in ks}
    for q in queries:
        if not q.gt_img_ids or q.target_img_id is None:
            raise CircoError(f"query {q.id} has no ground truths (test records cannot be evaluated here)")
        ranked = _unique_ids(predictions[q.id], f"query {q.id}")
        for k in ks:
            ap[k][q.id] = average_precision_at_k(ranked, q.gt_img_ids, k)
    for k in ks:
        out[f"mAP@{k}"] = 100.0 * sum(ap[k].values()) / len(queries)
    for k in ks:
        hits = sum(q.target_img_id in predictions[q.id][:k] for q in queries)
        out[f"Recall@{k}"] = 100.0 * hits / len(queries)
    ap10 = ap.get(SEMANTIC_K) or {q.id: average_precision_at_k(predictions[q.id], q.gt_img_ids, SEMANTIC_K)
                                   for q in queries}
    semantic: dict[str, float] = {}
    for aspect in sorted({a for q in queries for a in q.semantic_aspects}):
        ids = [q.id for q in queries if aspect in q.semantic_aspects]
        semantic[aspect] = 100.0 * sum(ap10[i] for i in ids) / len(ids)
    out[f"semantic_mAP@{SEMANTIC_K}"] = semantic
    return out


# ------------------------------------------------------------------------------------------------------ files


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CircoError(f"{what} not found: {path}") from err
    except json.JSONDecodeError as err:
        raise CircoError(f"{path}: the {what} is not valid JSON ({err})") from err


def read_annotations(path: str | os.PathLike) -> list[CircoQuery]:
    """Read `annotations/{val,test}.json`; a broken record raises CircoError naming the file and the record."""
    path = Path(path)
    raw = _read_json(path, "CIRCO annotation file")
    if not isinstance(raw, list):
        raise CircoError(f"{path}: expected a JSON list of records, got {type(raw).__name__}")
    queries = []
    for i, r in enumerate(raw):
        where = f"{path}: record {i}"
        if not isinstance(r, dict):
            raise CircoError(f"{where}: expected an object, got {type(r).__name__}")
        for key, kind in (("id", int), ("reference_img_id", int), ("relative_caption", str), ("shared_concept", str)):
            if not isinstance(r.get(key), kind) or isinstance(r.get(key), bool):
                raise CircoError(f"{where}: field {key!r} must be {kind.__name__}, got {r.get(key)!r}")
        gts = r.get("gt_img_ids", [])
        if not isinstance(gts, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in gts):
            raise CircoError(f"{where} (id {r['id']}): gt_img_ids must be a list of integers")
        if len(set(gts)) != len(gts):
            raise CircoError(f"{where} (id {r['id']}): gt_img_ids repeats an id")
        target = r.get("target_img_id")
        if gts and target != gts[0]:
            raise CircoError(f"{where} (id {r['id']}): target_img_id {target} is not gt_img_ids[0] = {gts[0]}")
        aspects = r.get("semantic_aspects", [])
        unknown = [a for a in aspects if a not in ASPECTS]
        if unknown:
            raise CircoError(f"{where} (id {r['id']}): unknown semantic aspects {unknown}; known: {list(ASPECTS)}")
        queries.append(CircoQuery(r["id"], r["reference_img_id"], r["relative_caption"], r["shared_concept"],
                                  target, tuple(gts), tuple(aspects)))
    ids = [q.id for q in queries]
    if sorted(ids) != list(range(len(ids))):
        raise CircoError(f"{path}: query ids must be exactly 0..{len(ids) - 1}")
    return queries


def read_predictions(path: str | os.PathLike) -> dict[int, list[Any]]:
    """A predictions file in the server's format: {"<query id>": [image ids, best first], ...}."""
    path = Path(path)
    raw = _read_json(path, "CIRCO predictions file")
    if not isinstance(raw, dict):
        raise CircoError(f"{path}: expected a JSON object of query id -> list of image ids, got {type(raw).__name__}")
    out: dict[int, list[Any]] = {}
    for key, value in raw.items():
        if not str(key).isdigit():
            raise CircoError(f"{path}: key {key!r} is not a query id")
        if not isinstance(value, list):
            raise CircoError(f"{path}: query {key}: expected a list of image ids, got {type(value).__name__}")
        out[int(key)] = value
    return out


def submission_document(predictions: Mapping[int, Sequence[int]]) -> dict[str, list[int]]:
    """The test-server JSON object (query id strings -> the first 50 ids); the caller writes it to a file."""
    return {str(q): [int(x) for x in ids[:SUBMISSION_LENGTH]] for q, ids in sorted(predictions.items())}


def validate_submission(predictions: Mapping[Any, Any], queries: Sequence[CircoQuery],
                        gallery: set[int] | None = None) -> list[str]:
    """Every problem that would make the test server refuse a submission (empty list = valid): the one rule for
    prediction lists, which `circo_metrics` applies too.

    Checks: a mapping (a JSON object); every query id present and no other; exactly 50 ids per query; integer ids;
    unique within a list; ids in the gallery (when given).
    """
    if not isinstance(predictions, Mapping):
        return [f"expected a JSON object {{\"<query id>\": [{SUBMISSION_LENGTH} image ids, best first], ...}}, "
                f"got a {type(predictions).__name__}"]
    problems = []
    want = {q.id for q in queries}
    have = {}
    for key, value in predictions.items():
        if isinstance(key, str) and key.isdigit():
            have[int(key)] = value
        elif isinstance(key, int) and not isinstance(key, bool):
            have[key] = value
        else:
            problems.append(f"key {key!r} is not a query id")
    missing, extra = sorted(want - set(have)), sorted(set(have) - want)
    if missing:
        problems.append(f"{len(missing)} query ids missing (first {missing[:5]})")
    if extra:
        problems.append(f"{len(extra)} ids that are no query (first {extra[:5]})")
    for q in sorted(set(have) & want):
        ids = have[q]
        if not isinstance(ids, list):
            problems.append(f"query {q}: expected a list, got {type(ids).__name__}")
            continue
        if len(ids) != SUBMISSION_LENGTH:
            problems.append(f"query {q}: {len(ids)} ids, expected exactly {SUBMISSION_LENGTH}")
        bad = [x for x in ids if isinstance(x, bool) or not isinstance(x, int)]
        if bad:
            problems.append(f"query {q}: non-integer ids {bad[:3]}")
            continue
        if len(set(ids)) != len(ids):
            problems.append(f"query {q}: repeated image ids")
        if gallery is not None:
            outside = [x for x in ids if x not in gallery]
            if outside:
                problems.append(f"query {q}: {len(outside)} ids not in the gallery (first {outside[:3]})")
    return problems


def read_gallery_ids(path: str | os.PathLike) -> set[int]:
    """COCO's `image_info_unlabeled2017.json` image ids."""
    raw = _read_json(Path(path), "COCO image list")
    if not isinstance(raw, dict) or not isinstance(raw.get("images"), list):
        raise CircoError(f"{path}: expected {{'images': [{{'id': ..., 'file_name': ...}}, ...]}}")
    return {int(im["id"]) for im in raw["images"]}


# ------------------------------------------------------------------------------------------------------ CLI


def _evaluate_file(path: Path, queries: Sequence[CircoQuery], gallery: set[int] | None) -> dict[str, Any]:
    """`circo_metrics` of a predictions file; a refusal names the file."""
    predictions = read_predictions(path)
    try:
        return circo_metrics(predictions, queries, gallery=gallery)
    except CircoError as err:
        raise CircoError(f"{path}: {err}") from err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cirlib.circo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="metrics of a predictions file on val")
    ev.add_argument("--annotations", type=Path, required=True, help="annotations/val.json")
    ev.add_argument("--predictions", type=Path, required=True, help="predictions in the server's format")
    ev.add_argument("--gallery", type=Path, default=None, help="image_info_unlabeled2017.json (ids must be in it)")
    va = sub.add_parser("validate", help="check test-server files")
    va.add_argument("--annotations", type=Path, required=True, help="annotations/test.json (or val.json)")
    va.add_argument("--gallery", type=Path, default=None, help="image_info_unlabeled2017.json (ids must be in it)")
    va.add_argument("files", type=Path, nargs="+")
    args = parser.parse_args(argv)
    try:
        queries = read_annotations(args.annotations)
        gallery = read_gallery_ids(args.gallery) if args.gallery else None
        if args.command == "evaluate":
            print(json.dumps(_evaluate_file(args.predictions, queries, gallery), indent=1, sort_keys=True))
            return 0
        failed = 0
        for f in args.files:
            problems = validate_submission(_read_json(f, "CIRCO submission"), queries, gallery)
            print(f"{f}: " + ("valid" if not problems else f"{len(problems)} problem(s)"))
            for p in problems:
                print(f"  - {p}")
            failed += bool(problems)
        return 1 if failed else 0
    except CircoError as err:
        print(f"circo: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
