"""Ranked lists of other systems: every format read and written (lossless round trips), the real server files, and
every check of an import (each naming the file and the query or line)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cirlib.data import load_split, synth, synth_circo
from cirlib.eval import circo as eval_circo
from cirlib.eval.submission import validate_cirr_submission
from cirlib.retrieval.ranked_lists import (FORMATS, RankedListError, RankedLists, SplitQueries, detect_format,
                                           import_candidates, read_ranked_lists, split_query_ids, subset_path,
                                           write_ranked_lists)
from cirlib.retrieval.topk import TopK

K = 10
SUFFIX = {"cirr": ".json", "circo": ".json", "trec": ".trec", "topk": ".pt", "jsonl": ".jsonl"}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> dict[str, SplitQueries]:
    """The splits of tiny CIRR, FashionIQ and CIRCO worlds in their real layouts."""
    tmp = tmp_path_factory.mktemp("worlds")
    cirr = synth.generate(synth.SynthConfig(layout="cirr", n_train=0, n_val=6, n_test=4, seed=5), root=tmp / "cirr")
    fiq = synth.generate(synth.SynthConfig(layout="fashioniq", n_train=0, n_val=9, n_test=3, seed=5),
                         root=tmp / "fiq")
    circo = synth_circo.generate_circo(synth_circo.CircoSynthConfig(n_val=5, n_test=4, gallery_size=60),
                                       tmp / "CIRCO")
    gallery = sorted(p.name for p in (circo / "COCO2017_unlabeled" / "unlabeled2017").glob("*.jpg"))
    out = {"cirr": SplitQueries.from_split(load_split("cirr", cirr, "val")),
           "cirr-test": SplitQueries.from_split(load_split("cirr", cirr, "test1")),
           "fiq": SplitQueries.from_split(load_split("fashioniq", fiq, "val", "dress"))}
    for split in ("val", "test"):
        records = eval_circo.read_annotations(circo / "annotations" / f"{split}.json")
        out[f"circo-{split}"] = SplitQueries.from_circo(records, gallery, split)
    out["circo-records"] = eval_circo.read_annotations(circo / "annotations" / "test.json")
    return out


def ranking(q: SplitQueries, k: int = K, seed: int = 0, stage2: bool = False) -> TopK:
    """A stage-I-like top-K of a split without a model: random lists (reference left out), decreasing scores."""
    rng = np.random.default_rng(seed)
    rows = [rng.permutation([g for g in q.gallery if g != ref])[:k] for ref in q.references]
    scores = -np.sort(-rng.standard_normal((len(rows), k)), axis=1)
    return TopK(dataset=q.dataset, split=q.split, category=q.category, sorted_index_names=np.asarray(rows),
                index_names=q.gallery, target_names=q.targets, scores=scores,
                group_names=None if q.group_names is None else np.asarray(q.group_names),
                stage2_scores=rng.standard_normal((len(rows), k)) if stage2 else None,
                group_stage2_scores=rng.standard_normal((len(rows), 5)) if stage2 and q.group_names else None)


def round_trip(tmp_path: Path, topk: TopK, q: SplitQueries, fmt: str, **kw) -> tuple[Path, TopK]:
    path = write_ranked_lists(topk, tmp_path / f"lists{SUFFIX[fmt]}", fmt, query_ids=q.query_ids, **kw)
    assert detect_format(path) == fmt
    return path, import_candidates(read_ranked_lists(path), q, k=topk.k).topk


CASES = [("cirr", f) for f in ("cirr", "trec", "topk", "jsonl")] + [("fiq", f) for f in ("trec", "topk", "jsonl")] \
    + [("circo-val", f) for f in ("circo", "trec", "topk", "jsonl")]


# ------------------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("world,fmt", CASES, ids=lambda x: x)
def test_export_then_import_is_lossless(worlds, tmp_path, world, fmt):
    q = worlds[world]
    topk = ranking(q)
    path, back = round_trip(tmp_path, topk, q, fmt)
    np.testing.assert_array_equal(back.sorted_index_names, topk.sorted_index_names)
    assert back.dataset == q.dataset and back.split == q.split and back.category == q.category
    assert back.index_names == q.gallery and back.reference_removed
    if fmt in ("trec", "jsonl", "topk"):  # the formats that hold scores: bit for bit
        assert torch.equal(back.scores, topk.scores)
    else:
        assert back.scores is None
    if q.targets is not None:
        assert torch.equal(back.labels, topk.labels)
    if fmt == "cirr":  # the recall_subset file beside it: the first 3 img_set members in the exported order
        assert subset_path(path).is_file()
        np.testing.assert_array_equal(back.group_names[:, :3], topk.group_names[:, :3])
        assert back.provenance["imported"]["subset_source"] == str(subset_path(path))
    assert back.provenance["imported"]["format"] == fmt and len(back.provenance["imported"]["sha256"]) == 64


@pytest.mark.parametrize("fmt", ["trec", "jsonl"])
def test_a_reranked_file_exports_its_fused_ranking_exactly(worlds, tmp_path, fmt):
    q = worlds["cirr"]
    topk = ranking(q, stage2=True)
    for w in (0.0, 0.3):
        _, back = round_trip(tmp_path, topk, q, fmt, fusion_weight=w)
        want = topk.reranked(w)
        np.testing.assert_array_equal(back.sorted_index_names, want.sorted_index_names)
        assert torch.equal(back.scores, want.final_scores(w))
    _, first = round_trip(tmp_path, topk, q, fmt, stage="stage1")  # stage I's ranking of the same file
    np.testing.assert_array_equal(first.sorted_index_names, topk.sorted_index_names)


def test_files_are_what_other_tools_expect(worlds, tmp_path):
    q = worlds["fiq"]
    topk = ranking(q, k=3)
    trec = write_ranked_lists(topk, tmp_path / "run.txt", "trec", query_ids=q.query_ids, tag="mine")
    first = trec.read_text().splitlines()[0].split()
    assert first[:2] == ["dress:0", "Q0"] and first[3] == "1" and first[5] == "mine"
    assert float(first[4]) == float(topk.scores[0, 0])
    jsonl = write_ranked_lists(topk, tmp_path / "x.jsonl", "jsonl", query_ids=q.query_ids, length=2)
    rec = json.loads(jsonl.read_text().splitlines()[1])
    assert rec["query"] == "dress:1" and [c[0] for c in rec["candidates"]] == list(topk.sorted_index_names[1, :2])
    names_only = write_ranked_lists(dataclasses.replace(topk, scores=None), tmp_path / "n.jsonl", "jsonl",
                                    query_ids=q.query_ids)
    assert read_ranked_lists(names_only).scores is None


def test_query_ids_follow_the_documented_scheme(worlds):
    assert worlds["fiq"].query_ids == ("dress:0", "dress:1", "dress:2")
    assert all(i.isdigit() and int(i) >= 1_000_000 for i in worlds["cirr"].query_ids)  # synthetic val pair ids
    assert worlds["circo-val"].query_ids == tuple(str(i) for i in range(5))
    assert split_query_ids(worlds["circo-records"]) == [str(i) for i in range(4)]


# ------------------------------------------------------------------------------------------------------ test splits
def test_a_circo_test_import_gives_a_server_file_our_validator_accepts(worlds, tmp_path):
    q = worlds["circo-test"]
    lists = tmp_path / "theirs.jsonl"
    top = ranking(q, k=50, seed=3)
    lists.write_text("".join(json.dumps({"query": int(i), "candidates": list(map(str, row))}) + "\n"
                             for i, row in zip(q.query_ids, top.sorted_index_names)))
    imported = import_candidates(read_ranked_lists(lists), q, k=50)
    assert imported.topk.dataset == "circo" and imported.topk.target_names is None and imported.warnings == ()
    out = write_ranked_lists(imported.topk, tmp_path / "submission.json", "circo", query_ids=q.query_ids)
    gallery_ids = {int(n[:-4]) for n in q.gallery}
    assert eval_circo.validate_submission(json.loads(out.read_text()), worlds["circo-records"], gallery_ids) == []


def test_a_cirr_test_export_passes_the_submission_validator(worlds, tmp_path):
    q = worlds["cirr-test"]
    sd_queries = [type("Q", (), {"pair_id": int(i), "reference": r, "members": (r, *g)})
                  for i, r, g in zip(q.query_ids, q.references, q.group_names)]
    topk = ranking(q, stage2=True)
    path = write_ranked_lists(topk, tmp_path / "recall_submission_x.json", "cirr", query_ids=q.query_ids)
    assert subset_path(path).name == "recall_subset_submission_x.json"
    assert validate_cirr_submission(path, sd_queries, q.gallery, recall_length=K) == []
    assert validate_cirr_submission(subset_path(path), sd_queries, q.gallery) == []
    back = read_ranked_lists(path)
    assert back.meta["version"] == "rc2" and back.meta["metric"] == "recall" and len(back.subset) == 4


def test_the_real_cirr_submissions_import_into_the_real_test_split(shared_dir, real):
    root = real
    q = SplitQueries.from_split(load_split("cirr", root, "test1"))
    path = shared_dir / "data" / "original-artifacts" / "submission" / "CIRR" / "recall_submission_stage2_0.json"
    lists = read_ranked_lists(path)
    assert lists.format == "cirr" and lists.meta["metric"] == "recall" and len(lists.subset) == 4148
    imported = import_candidates(lists, q, k=50)
    assert imported.topk.num_queries == 4148 and imported.warnings == () and imported.topk.reference_removed
    # the subset file's ranking comes first in group_names
    first = q.query_ids[0]
    assert tuple(imported.topk.group_names[0, :3]) == lists.subset[first]
    demo = read_ranked_lists(root / "cirr" / "demo_files" / "test1_pred_ranks_recall.json")
    assert import_candidates(demo, q, k=50).topk.k == 50
    circo = real / "circo" / "submission_examples" / "submission_test.json"
    assert detect_format(circo) == "circo" and read_ranked_lists(circo).names[0][0].endswith(".jpg")


# ------------------------------------------------------------------------------------------------------ import checks
def _jsonl(path: Path, rows: list[tuple[str, list[str]]]) -> Path:
    path.write_text("".join(json.dumps({"query": i, "candidates": names}) + "\n" for i, names in rows))
    return path


def test_every_problem_of_an_import_is_listed_at_once(worlds, tmp_path):
    q = worlds["cirr"]
    rows = [(i, list(map(str, r))) for i, r in zip(q.query_ids, ranking(q).sorted_index_names)]
    rows[1][1][4] = "no-such-image"
    rows[2][1][5] = rows[2][1][0]
    rows[3] = (rows[3][0], rows[3][1][:6])
    rows[4] = ("424242", rows[4][1])
    del rows[5]
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(RankedListError) as err:
        import_candidates(read_ranked_lists(path), q, k=K)
    msg = str(err.value)
    assert msg.startswith(str(path)) and "6 problem(s)" in msg and "[missing-queries] 2" in msg
    for kind, where in [("unknown-names", f"query {q.query_ids[1]}: 'no-such-image' at position 4"),
                        ("duplicates", f"query {q.query_ids[2]}: {rows[2][1][0]!r} at positions 0 and 5"),
                        ("short-lists", f"query {q.query_ids[3]}: 6 names, K = {K}"),
                        ("unknown-queries", "query 424242"), ("missing-queries", f"query {q.query_ids[4]}")]:
        assert f"[{kind}]" in msg and where in msg, (kind, msg)
    assert f"query {q.query_ids[5]}" in msg  # missing as well


def test_missing_queries_can_be_dropped_and_are_recorded(worlds, tmp_path):
    q = worlds["fiq"]
    rows = [(i, list(map(str, r))) for i, r in zip(q.query_ids, ranking(q).sorted_index_names)]
    path = _jsonl(tmp_path / "part.jsonl", [rows[0], rows[2]])
    with pytest.raises(RankedListError, match=r"\[missing-queries\] 1 .*query dress:1"):
        import_candidates(read_ranked_lists(path), q, k=K)
    imported = import_candidates(read_ranked_lists(path), q, k=4, missing_queries="drop")
    assert imported.rows == (0, 2) and imported.dropped_queries == ("dress:1",)
    assert imported.topk.num_queries == 2 and imported.topk.k == 4
    assert imported.topk.target_names == (q.targets[0], q.targets[2])
    assert imported.topk.provenance["imported"]["dropped_queries"] == 1
    with pytest.raises(RankedListError, match="missing_queries='skip'"):
        import_candidates(read_ranked_lists(path), q, k=4, missing_queries="skip")


def test_references_left_in_the_lists_are_a_warning_with_the_count(worlds, tmp_path):
    q = worlds["cirr"]
    rows = [(i, list(map(str, r))) for i, r in zip(q.query_ids, ranking(q).sorted_index_names)]
    for i in (0, 3):
        rows[i][1].insert(1, q.references[i])
    imported = import_candidates(read_ranked_lists(_jsonl(tmp_path / "refs.jsonl", rows)), q, k=K)
    assert len(imported.warnings) == 1 and imported.warnings[0].startswith("2 of 6 lists hold the query's own "
                                                                           "reference image")
    assert f"query {q.query_ids[0]}: {q.references[0]!r} at position 1" in imported.warnings[0]
    assert not imported.topk.reference_removed
    fiq = worlds["fiq"]  # FashionIQ keeps the reference in the ranking: nothing to warn about
    rows = [(i, [ref] + list(map(str, r))) for i, ref, r in zip(fiq.query_ids, fiq.references,
                                                               ranking(fiq).sorted_index_names)]
    assert import_candidates(read_ranked_lists(_jsonl(tmp_path / "fiq.jsonl", rows)), fiq, k=K).warnings == ()


def test_a_topk_file_must_be_of_the_split_row_for_row(worlds, tmp_path):
    q = worlds["cirr"]
    path = ranking(q).save(tmp_path / "val.pt")
    with pytest.raises(RankedListError) as err:
        import_candidates(read_ranked_lists(path), worlds["cirr-test"], k=K)
    assert "[other-split]" in str(err.value) and "'val'" in str(err.value) and "[row-count]" in str(err.value)
    shuffled = dataclasses.replace(q, targets=q.targets[1:] + q.targets[:1])
    with pytest.raises(RankedListError, match=r"\[row-targets\] 6 .*row 0"):
        import_candidates(read_ranked_lists(path), shuffled, k=K)


def test_a_cirr_subset_file_must_hold_the_querys_img_set(worlds, tmp_path):
    q = worlds["cirr"]
    path = write_ranked_lists(ranking(q), tmp_path / "recall_submission_x.json", "cirr", query_ids=q.query_ids)
    doc = json.loads(subset_path(path).read_text())
    doc[q.query_ids[2]] = [q.references[2]] + doc[q.query_ids[2]][:2]
    del doc[q.query_ids[4]]
    subset_path(path).write_text(json.dumps(doc))
    with pytest.raises(RankedListError) as err:
        import_candidates(read_ranked_lists(path), q, k=K)
    assert f"[subset-names] 1" in str(err.value) and f"query {q.query_ids[2]}" in str(err.value)
    assert f"[subset-missing] 1" in str(err.value) and f"query {q.query_ids[4]}" in str(err.value)
    with pytest.raises(RankedListError, match="a recall_subset file"):
        read_ranked_lists(subset_path(path))


# ------------------------------------------------------------------------------------------------------ file errors
def test_trec_errors_name_every_line(tmp_path):
    path = tmp_path / "run.trec"
    path.write_text("1 Q0 a 1 0.9 t\n1 Q0 b two 0.8 t\n\n1 Q0 c 1 0.7 t\n2 Q0 a 1 high t\n2 Q0 b 2\n")
    with pytest.raises(RankedListError) as err:
        read_ranked_lists(path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and "4 problem(s)" in msg
    for where in ("line 2: rank 'two'", "line 4: query 1 has rank 1 again (first on line 1)", "line 5: score 'high'",
                  "line 6: 4 fields"):
        assert where in msg, msg


def test_trec_ranks_order_the_lists_and_disagreeing_scores_warn(tmp_path):
    path = tmp_path / "run.trec"
    path.write_text("q1 Q0 b 2 0.5 x\nq1 Q0 a 1 0.9 x\nq2 Q0 c 0 0.1 x\nq2 Q0 d 1 0.2 x\n")
    lists = read_ranked_lists(path, "trec")
    assert lists.queries == ("q1", "q2") and lists.names == (("a", "b"), ("c", "d"))
    assert lists.scores == ((0.9, 0.5), (0.1, 0.2)) and lists.meta["tag"] == "x"
    assert len(lists.warnings) == 1 and "in 1 queries the ranks disagree" in lists.warnings[0]


def test_jsonl_errors_name_every_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"query": 1, "candidates": [["a", 1.0]]}\n{"query": 1, "candidates": [["b", 1.0]]}\n'
                    '{"query": 2, "candidates": [["a", "high"]]}\nnot json\n{"candidates": []}\n'
                    '{"query": 3, "candidates": ["a"]}\n')
    with pytest.raises(RankedListError) as err:
        read_ranked_lists(path)
    msg = str(err.value)
    for where in ("line 2: query 1 again (first on line 1)", "line 3 (query 2)", "line 4:", "line 5:",
                  "[mixed-scores]", "line 6"):
        assert where in msg, msg


def test_server_json_errors(tmp_path):
    cirr = tmp_path / "c.json"
    cirr.write_text('{"version": "rc2", "metric": "recall", "7": ["a"], "7": ["b"], "x1": ["a"], "8": "a"}')
    with pytest.raises(RankedListError) as err:
        read_ranked_lists(cirr)
    assert all(s in str(err.value) for s in ("[keys-twice] 1", "'7'", "[bad-keys] 1", "'x1'", "query 8"))
    circo = tmp_path / "o.json"
    circo.write_text('{"0": [1, 2], "1": [3, "4"]}')
    with pytest.raises(RankedListError, match="neither a CIRR server file"):
        detect_format(circo)  # a list of ids and names is neither format
    with pytest.raises(RankedListError, match=r"query 1: expected a list of integer image ids"):
        read_ranked_lists(circo, "circo")
    with pytest.raises(RankedListError, match="cannot tell the format"):
        (tmp_path / "what.txt").write_text("hello\n")
        detect_format(tmp_path / "what.txt")
    with pytest.raises(RankedListError, match="not found"):
        read_ranked_lists(tmp_path / "absent.json")


def test_in_memory_lists_and_the_formats_constant(worlds):
    assert set(FORMATS) == {"cirr", "circo", "trec", "topk", "jsonl"}
    q = worlds["fiq"]
    lists = RankedLists("jsonl", None, ("dress:0", "dress:0"), (("a",), ("b",)))
    twice = r"(?s)<ranked lists>: .*\[queries-twice\] 1 .*query dress:0 \(lists 0 and 1\)"
    with pytest.raises(RankedListError, match=twice):
        import_candidates(lists, q, k=1)


def test_exports_refuse_what_the_format_cannot_hold(worlds, tmp_path):
    q = worlds["fiq"]
    topk = ranking(q, k=3)
    with pytest.raises(RankedListError, match=r"CIRR lists are keyed by integer query ids; got \['dress:0'"):
        write_ranked_lists(topk, tmp_path / "c.json", "cirr", query_ids=q.query_ids)
    with pytest.raises(RankedListError, match="not a CIRCO gallery name"):
        write_ranked_lists(topk, tmp_path / "o.json", "circo", query_ids=["0", "1", "2"])
    with pytest.raises(RankedListError, match=r"tag \['my run'\]"):
        write_ranked_lists(topk, tmp_path / "r.trec", "trec", query_ids=q.query_ids, tag="my run")
    with pytest.raises(RankedListError, match="2 query ids for a top-K of 3 rows"):
        write_ranked_lists(topk, tmp_path / "r.trec", "trec", query_ids=q.query_ids[:2])
    with pytest.raises(RankedListError, match="length=4"):
        write_ranked_lists(topk, tmp_path / "r.trec", "trec", query_ids=q.query_ids, length=4)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_a_new_format_is_one_registered_class(worlds, tmp_path):
    """A format of one's own (here: one query a line, '<qid> TAB name name ...') is a ListFormat class in LIST_FORMATS;
    reading and importing it needs nothing else."""
    from cirlib.retrieval.ranked_lists import LIST_FORMATS, ListFormat

    class ColonFormat(ListFormat):
        name = "colon-lines"

        def read(self, path, subset_file):
            rows = [line.split("\t", 1) for line in path.read_text().splitlines()]
            return RankedLists(self.name, path, tuple(q for q, _ in rows), tuple(tuple(n.split()) for _, n in rows))

    q = worlds["fiq"]
    path = tmp_path / "run.txt"
    path.write_text("".join(f"{qid}\t{' '.join(q.gallery[:3])}\n" for qid in q.query_ids))
    with pytest.raises(RankedListError, match="format 'colon-lines': expected 'auto' or one of"):
        read_ranked_lists(path, "colon-lines")
    LIST_FORMATS.register(ColonFormat)
    try:
        imported = import_candidates(read_ranked_lists(path, "colon-lines"), q, k=3)
    finally:
        LIST_FORMATS.unregister("colon-lines")
    assert imported.topk.sorted_index_names.tolist() == [list(q.gallery[:3])] * len(q.query_ids)
