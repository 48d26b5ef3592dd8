"""CIRCO metrics (hand-computed cases and the official example's published score), reader, validator, command line."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from cirlib import paths
from cirlib.eval import circo


def _q(i, gts, aspects=("addition",)):
    return circo.CircoQuery(i, 1000 + i, "text", "concept", gts[0], tuple(gts), tuple(aspects))


def test_ap_with_several_ground_truths():
    # hits at ranks 1 and 3 of G = {1, 2, 3}: (1/1 + 2/3) / min(3, 5)
    assert circo.average_precision_at_k([1, 9, 2, 8, 7], [1, 2, 3], 5) == pytest.approx((1 + 2 / 3) / 3)


def test_ap_with_ground_truths_beyond_k():
    # 14 ground truths, k = 5: the denominator is min(|G|, k) = 5; two hits at ranks 2 and 5
    gts = list(range(100, 114))
    assert circo.average_precision_at_k([1, 100, 2, 3, 101], gts, 5) == pytest.approx((1 / 2 + 2 / 5) / 5)
    # a ground truth ranked past k does not count
    assert circo.average_precision_at_k([1, 2, 3, 4, 5, 100], gts, 5) == 0.0


def test_duplicates_are_refused_not_deduplicated():
    with pytest.raises(circo.CircoError, match="appears twice"):
        circo.average_precision_at_k([1, 2, 1], [1], 5)


def _fifty(head):
    """`head` followed by ids no query of these tests has as ground truth, 50 ids in all (the server's length)."""
    return list(head) + [x for x in range(1000, 1100) if x not in head][:circo.SUBMISSION_LENGTH - len(head)]


def test_metrics_recall_counts_only_the_target_and_semantic_map_groups_by_aspect():
    queries = [_q(0, [5, 6], ("addition",)), _q(1, [7, 8], ("negation", "addition"))]
    preds = {0: _fifty([6, 5, 1]), 1: _fifty([1, 2, 3, 4, 5, 6, 7])}
    m = circo.circo_metrics(preds, queries)
    # query 0: target 5 at rank 2; AP@5 = (1/1 + 2/2) / 2 = 1; query 1: target 7 at rank 7, AP@5 = 0
    assert m["mAP@5"] == pytest.approx(50.0)
    assert m["Recall@5"] == pytest.approx(50.0) and m["Recall@10"] == pytest.approx(100.0)
    ap10_q1 = (1 / 7) / 2
    assert m["mAP@10"] == pytest.approx(100 * (1 + ap10_q1) / 2)
    assert m["semantic_mAP@10"] == {"addition": pytest.approx(100 * (1 + ap10_q1) / 2),
                                    "negation": pytest.approx(100 * ap10_q1)}


def test_scoring_and_validation_apply_one_rule():
    queries = [_q(0, [5, 6]), _q(1, [7, 8])]
    good = {0: _fifty([5, 6]), 1: _fifty([7])}
    assert circo.validate_submission(good, queries) == [] and circo.circo_metrics(good, queries)["Recall@5"] == 100.0
    broken = {"49 ids": {**good, 0: good[0][:49]}, "51 ids": {**good, 1: good[1] + [2000]},
              "unknown query": {**good, 7: good[0]}, "missing query": {0: good[0]},
              "repeated": {**good, 1: [7] + good[1][:49]}, "not integers": {**good, 0: [str(x) for x in good[0]]}}
    for what, doc in broken.items():
        problems = circo.validate_submission(doc, queries)
        assert problems, what
        with pytest.raises(circo.CircoError, match="predictions refused") as caught:
            circo.circo_metrics(doc, queries)
        assert problems[0] in str(caught.value), what
    with pytest.raises(circo.CircoError, match="not in the gallery"):
        circo.circo_metrics(good, queries, gallery=set(good[0]))


def test_the_command_line_names_a_file_that_breaks_the_rule(tmp_path, capsys):
    (tmp_path / "val.json").write_text(json.dumps([
        {"id": 0, "reference_img_id": 1, "relative_caption": "t", "shared_concept": "c", "target_img_id": 5,
         "gt_img_ids": [5], "semantic_aspects": []}]))
    annotations = ["--annotations", str(tmp_path / "val.json")]
    (tmp_path / "a_list.json").write_text(json.dumps([[5, 6]]))
    assert circo.main(["validate", *annotations, str(tmp_path / "a_list.json")]) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path / 'a_list.json'}: 1 problem(s)" in out and "expected a JSON object" in out and "got a list" in out
    (tmp_path / "short.json").write_text(json.dumps({"0": _fifty([5])[:49]}))
    assert circo.main(["evaluate", *annotations, "--predictions", str(tmp_path / "short.json")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'short.json'}: predictions refused" in err and "49 ids, expected exactly 50" in err
    (tmp_path / "good.json").write_text(json.dumps({"0": _fifty([5])}))
    assert circo.main(["evaluate", *annotations, "--predictions", str(tmp_path / "good.json")]) == 0
    assert json.loads(capsys.readouterr().out)["Recall@5"] == 100.0


def test_the_official_val_example_scores_as_published(real):
    queries = circo.read_annotations(real / "circo/annotations/val.json")
    assert len(queries) == 220 and sum(len(q.gt_img_ids) for q in queries) / 220 == pytest.approx(4.16, abs=0.01)
    preds = circo.read_predictions(real / "circo/submission_examples/submission_val.json")
    assert round(circo.circo_metrics(preds, queries)["mAP@10"], 2) == 0.52  # the README's published figure


def test_the_reader_parses_the_real_test_file(real):
    queries = circo.read_annotations(real / "circo/annotations/test.json")
    assert [q.id for q in queries] == list(range(800)) and all(not q.gt_img_ids for q in queries)


def test_a_broken_record_names_the_file_and_record(tmp_path, real):
    raw = json.loads((real / "circo/annotations/val.json").read_text())
    raw[3]["target_img_id"] = raw[3]["gt_img_ids"][-1] + 1
    bad = tmp_path / "val.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(circo.CircoError, match=r"val.json: record 3 .*target_img_id"):
        circo.read_annotations(bad)


def test_the_validator_accepts_the_official_file_and_rejects_broken_copies(real):
    queries = circo.read_annotations(real / "circo/annotations/test.json")
    official = json.loads((real / "circo/submission_examples/submission_test.json").read_text())
    assert circo.validate_submission(official, queries) == []
    broken = {}
    broken["missing id"] = {k: v for k, v in official.items() if k != "17"}
    broken["49 ids"] = copy.deepcopy(official)
    broken["49 ids"]["3"] = broken["49 ids"]["3"][:49]
    broken["duplicate"] = copy.deepcopy(official)
    broken["duplicate"]["5"][1] = broken["duplicate"]["5"][0]
    broken["string ids"] = copy.deepcopy(official)
    broken["string ids"]["9"] = [str(x) for x in broken["string ids"]["9"]]
    expected = {"missing id": "missing", "49 ids": "49 ids", "duplicate": "repeated", "string ids": "non-integer"}
    for what, doc in broken.items():
        problems = circo.validate_submission(doc, queries)
        assert any(expected[what] in p for p in problems), (what, problems)
    gallery = {x for ids in official.values() for x in ids} - {official["0"][0]}
    assert any("not in the gallery" in p for p in circo.validate_submission(official, queries, gallery))


def test_the_submission_document_is_what_the_validator_accepts():
    queries = [_q(0, [1]), _q(1, [2])]
    doc = circo.submission_document({0: list(range(60)), 1: list(range(100, 150))})
    assert circo.validate_submission(json.loads(json.dumps(doc)), queries) == []


def test_the_command_line_prints_the_metrics(real):
    out = subprocess.run([sys.executable, "-m", "cirlib.circo", "evaluate",
                          "--annotations", str(real / "circo/annotations/val.json"),
                          "--predictions", str(real / "circo/submission_examples/submission_val.json")],
                         capture_output=True, text=True, cwd=paths.REPO_ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)
    assert set(m) == {"mAP@5", "mAP@10", "mAP@25", "mAP@50", "Recall@5", "Recall@10", "Recall@25", "Recall@50",
                      "semantic_mAP@10"}
    assert set(m["semantic_mAP@10"]) == set(circo.ASPECTS)
