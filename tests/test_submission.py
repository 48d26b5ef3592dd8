"""CIRR submissions: the real demo/original files, byte-exact writing, and every kind of broken file."""
from __future__ import annotations

import json

import pytest

from cirlib.paths import atomic_write_text, shared_dir
from cirlib.eval.submission import (
    SubmissionError,
    SubmissionQuery,
    check_cirr_submission,
    cirr_submission_files,
    main,
    read_test_queries,
    validate_cirr_submission,
)

SHARED = shared_dir()


def write_cirr_submission(pair_ids, recall_lists, subset_lists, out_dir, name, **kw):
    """Write both files the way the workbook does (cirlib.eval builds them, cirlib.paths writes them)."""
    files = cirr_submission_files(pair_ids, recall_lists, subset_lists, name, **kw)
    return tuple(atomic_write_text(out_dir / f.file_name, f.text()) for f in files)
CIRR = SHARED / "data" / "real-annotations" / "cirr"
CAPTIONS = CIRR / "captions" / "cap.rc2.test1.json"
SPLIT = CIRR / "image_splits" / "split.rc2.test1.json"
ORIGINAL = SHARED / "data" / "original-artifacts" / "submission" / "CIRR"


@pytest.fixture(scope="module")
def real_annotations():
    for path in (CAPTIONS, SPLIT, ORIGINAL):
        assert path.exists(), f"missing shared data {path}; the shared/ folder must sit beside the repository"
    return read_test_queries(CAPTIONS), set(json.loads(SPLIT.read_text()))


def _tags(problems: list[str]) -> set[str]:
    return {p.split("]")[0].lstrip("[") for p in problems}


# ------------------------------------------------------------------------------------------------ the real files
@pytest.mark.parametrize(
    "path",
    [
        CIRR / "demo_files" / "test1_pred_ranks_recall.json",
        CIRR / "demo_files" / "test1_pred_ranks_recall_subset.json",
        ORIGINAL / "recall_submission_stage1_0.json",
        ORIGINAL / "recall_subset_submission_stage1_0.json",
        ORIGINAL / "recall_submission_stage2_0.json",
        ORIGINAL / "recall_subset_submission_stage2_0.json",
    ],
    ids=lambda p: p.name,
)
def test_official_and_original_submissions_are_accepted(real_annotations, path):
    queries, gallery = real_annotations
    assert len(queries) == 4148 and len(gallery) == 2315
    assert validate_cirr_submission(path, CAPTIONS, SPLIT) == []
    check_cirr_submission(path, queries, gallery)  # the raising variant, with already-loaded annotations


def test_the_deleted_v0_demo_is_rejected_for_each_of_its_faults(real_annotations):
    path = CIRR / "demo_files_deleted_upstream" / "test.rand.v0.json"
    problems = validate_cirr_submission(path, CAPTIONS, SPLIT)
    assert _tags(problems) == {"version", "metric", "duplicates", "reference"}
    text = "\n".join(problems)
    assert "'version' is 'v0'" in text
    assert "no 'metric' field" in text
    assert "[duplicates] 1418 lists" in text  # counts from the annotation README
    assert "[reference] 93 lists" in text
    with pytest.raises(SubmissionError, match="test.rand.v0.json: 4 problem"):
        check_cirr_submission(path, CAPTIONS, SPLIT)


def test_writer_reproduces_the_original_files_byte_for_byte(tmp_path, real_annotations):
    recall = json.loads((ORIGINAL / "recall_submission_stage2_0.json").read_text())
    subset = json.loads((ORIGINAL / "recall_subset_submission_stage2_0.json").read_text())
    pair_ids = [int(k) for k in recall if k not in ("version", "metric")]
    path_r, path_s = write_cirr_submission(
        pair_ids, [recall[str(p)] for p in pair_ids], [subset[str(p)] for p in pair_ids], tmp_path, "stage2_0"
    )
    assert path_r.name == "recall_submission_stage2_0.json"
    assert path_s.name == "recall_subset_submission_stage2_0.json"
    assert path_r.read_bytes() == (ORIGINAL / "recall_submission_stage2_0.json").read_bytes()
    assert path_s.read_bytes() == (ORIGINAL / "recall_subset_submission_stage2_0.json").read_bytes()


# ----------------------------------------------------------------------------------------- a tiny test split
_SET0 = ["t-0", "t-1", "t-2", "t-3", "t-4", "t-5"]
_SET1 = ["t-6", "t-7", "t-8", "t-9", "t-10", "t-11"]
TINY_CAPTIONS = [
    {"pairid": 7, "reference": "t-0", "caption": "a", "img_set": {"id": 0, "members": _SET0}},
    {"pairid": 9, "reference": "t-3", "caption": "b", "img_set": {"id": 0, "members": _SET0}},
    {"pairid": 12, "reference": "t-6", "caption": "c", "img_set": {"id": 1, "members": _SET1}},
]
TINY_GALLERY = [f"t-{i}" for i in range(12)]
GOOD_RECALL = {
    "7": ["t-1", "t-2", "t-9", "t-4"], "9": ["t-0", "t-11", "t-1", "t-2"], "12": ["t-7", "t-0", "t-1", "t-3"]
}
GOOD_SUBSET = {"7": ["t-1", "t-2", "t-3"], "9": ["t-0", "t-1", "t-5"], "12": ["t-7", "t-8", "t-11"]}


@pytest.fixture()
def tiny(tmp_path):
    captions = tmp_path / "cap.rc2.test1.json"
    captions.write_text(json.dumps(TINY_CAPTIONS))
    split = tmp_path / "split.rc2.test1.json"
    split.write_text(json.dumps({n: f"./test1/{n}.png" for n in TINY_GALLERY}))
    return captions, split


def _write(tmp_path, obj, name="sub.json"):
    path = tmp_path / name
    path.write_text(json.dumps(obj, sort_keys=True))
    return path


def _validate(tmp_path, tiny, obj, **kw):
    return validate_cirr_submission(_write(tmp_path, obj), tiny[0], tiny[1], recall_length=4, **kw)


def test_writer_output_is_valid_and_in_server_format(tmp_path, tiny):
    pids = [7, 9, 12]
    path_r, path_s = write_cirr_submission(
        pids, [GOOD_RECALL[str(p)] for p in pids], [GOOD_SUBSET[str(p)] for p in pids], tmp_path / "out", "demo",
        recall_length=4,
    )
    text = path_r.read_text()
    assert text == json.dumps({"version": "rc2", "metric": "recall", **GOOD_RECALL}, sort_keys=True)
    assert "\n" not in text and text.startswith('{"12": [')  # sorted string keys, no indent
    assert json.loads(path_s.read_text())["metric"] == "recall_subset"
    assert validate_cirr_submission(path_r, tiny[0], tiny[1], recall_length=4) == []
    assert validate_cirr_submission(path_s, tiny[0], tiny[1], metric="recall_subset") == []
    # queries given as objects (e.g. cirlib.data.Query) work as well as the caption file
    objs = [SubmissionQuery(r["pairid"], r["reference"], tuple(r["img_set"]["members"])) for r in TINY_CAPTIONS]
    assert validate_cirr_submission(path_s, objs, TINY_GALLERY) == []


def test_writer_refuses_malformed_predictions(tmp_path):
    with pytest.raises(SubmissionError, match="pair id 7 .row 0. has 3 names, expected 50"):
        write_cirr_submission([7], [["a", "b", "c"]], [["a", "b", "c"]], tmp_path, "x")
    with pytest.raises(SubmissionError, match="pair id 7 appears twice"):
        write_cirr_submission([7, 7], [["a"], ["b"]], [["a", "b", "c"]] * 2, tmp_path, "x", recall_length=1)
    with pytest.raises(SubmissionError, match="lists a name twice"):
        write_cirr_submission([7], [["a", "a"]], [["a", "b", "c"]], tmp_path, "x", recall_length=2)
    with pytest.raises(SubmissionError, match="2 prediction lists for 1 pair ids"):
        write_cirr_submission([7], [["a"], ["b"]], [["a", "b", "c"]], tmp_path, "x", recall_length=1)
    with pytest.raises(SubmissionError, match="submission name"):
        write_cirr_submission([7], [["a"]], [["a", "b", "c"]], tmp_path, "../escape", recall_length=1)
    assert list(tmp_path.iterdir()) == []  # nothing written on failure


@pytest.mark.parametrize(
    ("mutate", "tag", "fragment"),
    [
        (lambda s: s.pop("9"), "missing-pairids", "1 of 3 test pair ids have no prediction (e.g. 9)"),
        (lambda s: s.update({"13": ["t-1", "t-2", "t-4", "t-5"]}), "extra-pairids", "e.g. 13"),
        (lambda s: s.update({"x7": list(s["7"])}), "bad-key", "'x7'"),
        (lambda s: s.__setitem__("7", ["t-1", "t-2", "t-9", "t-99"]), "unknown-names", "pairid 7: 't-99'"),
        (lambda s: s.__setitem__("7", ["t-1", "t-2", "t-1", "t-4"]), "duplicates", "pairid 7: 't-1'"),
        (lambda s: s.__setitem__("9", ["t-0", "t-3", "t-1", "t-2"]), "reference", "pairid 9: 't-3' at position 1"),
        (lambda s: s.__setitem__("12", ["t-7", "t-0", "t-1"]), "length", "pairid 12: 3"),
        (lambda s: s.__setitem__("12", "t-7 t-0 t-1 t-3"), "not-a-list", "pairid 12"),
        (lambda s: s.__setitem__("version", "v0"), "version", "'version' is 'v0'"),
        (lambda s: s.pop("version"), "version", "no 'version' field"),
        (lambda s: s.__setitem__("metric", "recall@50"), "metric", "'metric' is 'recall@50'"),
        (lambda s: s.pop("metric"), "metric", "no 'metric' field"),
    ],
    ids=lambda x: x if isinstance(x, str) and " " not in x and "'" not in x else None,
)
def test_each_broken_recall_file_is_rejected(tmp_path, tiny, mutate, tag, fragment):
    sub = {"version": "rc2", "metric": "recall", **{k: list(v) for k, v in GOOD_RECALL.items()}}
    assert _validate(tmp_path, tiny, sub) == []
    mutate(sub)
    problems = _validate(tmp_path, tiny, sub)
    assert _tags(problems) == {tag}, problems
    assert fragment in problems[0]
    with pytest.raises(SubmissionError, match=r"sub.json: 1 problem"):
        check_cirr_submission(tmp_path / "sub.json", tiny[0], tiny[1], recall_length=4)


def test_broken_subset_files_are_rejected(tmp_path, tiny):
    sub = {"version": "rc2", "metric": "recall_subset", **{k: list(v) for k, v in GOOD_SUBSET.items()}}
    assert _validate(tmp_path, tiny, sub) == []
    outside = dict(sub, **{"7": ["t-1", "t-2", "t-9"]})  # t-9 is in the gallery but not in query 7's img_set
    problems = _validate(tmp_path, tiny, outside)
    assert _tags(problems) == {"not-in-subset"} and "pairid 7: 't-9'" in problems[0]
    with_ref = dict(sub, **{"12": ["t-6", "t-7", "t-8"]})  # the reference is a member, but never a valid answer
    assert _tags(_validate(tmp_path, tiny, with_ref)) == {"reference", "not-in-subset"}
    too_long = dict(sub, **{"9": ["t-0", "t-1", "t-5", "t-2"]})
    assert _tags(_validate(tmp_path, tiny, too_long)) == {"length"}
    # a subset file handed in where a recall file is expected
    assert _tags(_validate(tmp_path, tiny, sub, metric="recall")) == {"metric", "length"}
    # no metric field: the 3-name lists identify a subset file, whose checks then apply
    no_metric = {k: v for k, v in outside.items() if k != "metric"}
    assert _tags(_validate(tmp_path, tiny, no_metric)) == {"metric", "not-in-subset"}


def test_unreadable_and_oversized_files(tmp_path, tiny):
    assert _tags(validate_cirr_submission(tmp_path / "none.json", *tiny)) == {"missing-file"}
    (tmp_path / "bad.json").write_text('{"version": "rc2",')
    assert _tags(validate_cirr_submission(tmp_path / "bad.json", *tiny)) == {"not-json"}
    (tmp_path / "list.json").write_text("[]")
    assert _tags(validate_cirr_submission(tmp_path / "list.json", *tiny)) == {"not-object"}
    big = json.dumps({"version": "rc2", "metric": "recall", **GOOD_RECALL}, sort_keys=True) + " " * 5_000_000
    (tmp_path / "big.json").write_text(big)
    problems = validate_cirr_submission(tmp_path / "big.json", *tiny, recall_length=4)
    assert _tags(problems) == {"too-large"} and "5,000,000" in problems[0]


def test_bad_annotations_raise_naming_the_file_and_record(tmp_path):
    broken = tmp_path / "cap.json"
    broken.write_text(json.dumps([TINY_CAPTIONS[0], {"pairid": 5, "caption": "no reference"}]))
    with pytest.raises(SubmissionError, match=r"cap.json: record 1 lacks 'reference'"):
        read_test_queries(broken)
    broken.write_text(json.dumps([dict(TINY_CAPTIONS[0], reference="t-77")]))
    with pytest.raises(SubmissionError, match=r"cap.json: record 0 \(pairid 7\) needs img_set members"):
        read_test_queries(broken)
    with pytest.raises(SubmissionError, match="CIRR caption file not found"):
        read_test_queries(tmp_path / "nope.json")


# --------------------------------------------------------------------------------------------------- command line
def test_command_line_reports_each_file_and_fails_on_a_broken_one(tmp_path, tiny, capsys):
    """Reuse case: `python -m cirlib.submission FILE...` used to do nothing."""
    good = _write(tmp_path, {"version": "rc2", "metric": "recall", **GOOD_RECALL}, "good.json")
    broken = {"version": "rc2", "metric": "recall", **GOOD_RECALL}
    broken["7"] = ["t-0", "t-2", "t-9", "t-4"]  # lists its own reference
    bad = _write(tmp_path, broken, "bad.json")
    args = ["--captions", str(tiny[0]), "--split", str(tiny[1]), "--recall-length", "4"]
    assert main([str(good), *args]) == 0
    assert f"{good}: ok" in capsys.readouterr().out
    assert main([str(good), str(bad), *args]) == 1
    out = capsys.readouterr().out
    assert f"{good}: ok" in out and f"{bad}: 1 problem(s)" in out and "[reference] 1 lists" in out
    assert "1 of 2 file(s)" in out


def test_command_line_finds_annotations_under_a_data_root(tmp_path, tiny, capsys):
    root = tmp_path / "cirr_dataset"
    (root / "cirr" / "captions").mkdir(parents=True)
    (root / "cirr" / "image_splits").mkdir(parents=True)
    tiny[0].rename(root / "cirr" / "captions" / "cap.rc2.test1.json")
    tiny[1].rename(root / "cirr" / "image_splits" / "split.rc2.test1.json")
    good = _write(tmp_path, {"version": "rc2", "metric": "recall_subset", **GOOD_SUBSET}, "subset.json")
    assert main([str(good), "--data-root", str(root)]) == 0
    assert main([str(good), "--data-root", str(tmp_path / "nowhere")]) == 2
    assert "CIRR caption file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # neither annotations nor a root: a usage error
        main([str(good)])
    assert info.value.code == 2


def test_command_line_module_runs(tmp_path, tiny):
    import subprocess
    import sys

    from cirlib.paths import REPO_ROOT

    good = _write(tmp_path, {"version": "rc2", "metric": "recall", **GOOD_RECALL}, "good.json")
    missing = tmp_path / "missing.json"
    done = subprocess.run([sys.executable, "-m", "cirlib.submission", str(good), str(missing), "--captions",
                           str(tiny[0]), "--split", str(tiny[1]), "--recall-length", "4"],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 1, done.stderr
    assert f"{good}: ok" in done.stdout and "[missing-file]" in done.stdout
