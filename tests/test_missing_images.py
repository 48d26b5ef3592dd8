"""missing_images: "error" (default) lists every missing image in one error before anything is trained; "drop" leaves
out the queries whose images are missing and the missing gallery images, and says so with exact counts (printed,
dropped_queries.json, every metrics.json, notebook 04's line); a CIRR test submission with dropped queries is refused.

Synthetic CIRR- and FashionIQ-layout worlds with about 10% of the image files deleted; the expected counts are
computed here from the annotation files and the deleted names, independently of the readers."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from cirlib import data as cdata
from cirlib.data import synth
from cirlib.run_folder import RunFolder
from cirlib.workbook import figures, preview, steps
from cirlib.workbook.config import (AnalysisConfig, DataConfig, EvaluateConfig, Stage1Config, Stage2TrainConfig,
                                    SubmissionConfig, TopKConfig)

FRACTION = 0.10  # of all image files, deleted
FIQ_CATEGORIES = ("dress", "shirt", "toptee")


# ------------------------------------------------------------------------------------------------ worlds


def _splits(layout: str) -> list[tuple[str, str | None]]:
    if layout == "cirr":
        return [(s, None) for s in ("train", "val", "test1")]
    return [(s, c) for s in ("train", "val", "test") for c in FIQ_CATEGORIES]


def _annotations(root: Path, layout: str, split: str, category: str | None) -> tuple[dict[str, Path], list[dict]]:
    """(gallery name -> image file, caption records) read straight from the JSON files."""
    if layout == "cirr":
        rel = json.loads((root / "cirr" / "image_splits" / f"split.rc2.{split}.json").read_text())
        captions = json.loads((root / "cirr" / "captions" / f"cap.rc2.{split}.json").read_text())
        return {n: root / p for n, p in rel.items()}, captions
    names = json.loads((root / "image_splits" / f"split.{category}.{split}.json").read_text())
    captions = json.loads((root / "captions" / f"cap.{category}.{split}.json").read_text())
    return {n: root / "images" / f"{n}.png" for n in names}, captions


def _record_images(layout: str, rec: dict, gallery: dict[str, Path]) -> list[str]:
    if layout == "cirr":
        names = [rec["reference"], rec.get("target_hard"), *rec["img_set"]["members"]]
    else:
        names = [rec["candidate"], rec.get("target")]
    return [n for n in dict.fromkeys(names) if n is not None and n in gallery]


class World:
    """A world with ~10% of its image files deleted, and what each split should drop."""

    def __init__(self, root: Path, layout: str):
        self.root, self.layout = root, layout
        files: dict[Path, None] = {}
        for split, cat in _splits(layout):
            files.update(dict.fromkeys(_annotations(root, layout, split, cat)[0].values()))
        everything = sorted(files)
        self.deleted = set(random.Random(0).sample(everything, round(FRACTION * len(everything))))
        for path in self.deleted:
            path.unlink()
        self.expected = {}
        for split, cat in _splits(layout):
            gallery, records = _annotations(root, layout, split, cat)
            gone = {n for n, p in gallery.items() if p in self.deleted}
            dropped = [i for i, rec in enumerate(records) if gone & set(_record_images(layout, rec, gallery))]
            self.expected[split, cat] = {"missing": gone, "dropped_rows": dropped, "queries": len(records),
                                         "gallery": len(gallery)}

    def deleted_paths(self, splits: tuple[str, ...]) -> set[Path]:
        return {p for s, c in _splits(self.layout) if s in splits
                for p in _annotations(self.root, self.layout, s, c)[0].values() if p in self.deleted}


@pytest.fixture(scope="module")
def cirr_world(tmp_path_factory) -> World:
    root = synth.generate(synth.SynthConfig(layout="cirr", n_train=40, n_val=24, n_test=12, seed=3),
                          root=tmp_path_factory.mktemp("missing") / "cirr")
    return World(root, "cirr")


@pytest.fixture(scope="module")
def fiq_world(tmp_path_factory) -> World:
    root = synth.generate(synth.SynthConfig(layout="fashioniq", n_train=36, n_val=45, n_test=9, seed=3),
                          root=tmp_path_factory.mktemp("missing") / "fiq")
    return World(root, "fashioniq")


@pytest.fixture(params=["cirr", "fashioniq"])
def world(request) -> World:
    return request.getfixturevalue("cirr_world" if request.param == "cirr" else "fiq_world")


def _listed(list_file: Path) -> set[Path]:
    """The files a missing-images list names (suffix removed: FashionIQ names .jpg, the synthetic world has .png)."""
    return {Path(line.split("\t")[1]).with_suffix("") for line in list_file.read_text().splitlines()}


# ------------------------------------------------------------------------------------------------ the readers


def test_drop_missing_counts_are_exact(world):
    assert any(e["dropped_rows"] for e in world.expected.values())
    for (split, cat), want in world.expected.items():
        sd = cdata.load_split(world.layout, world.root, split, cat)
        kept = cdata.drop_missing(sd)
        d = kept.dropped
        if not want["missing"]:
            assert d is None and kept is sd
            continue
        assert set(d.missing) == want["missing"] and set(d.gallery) == want["missing"]
        assert [q.index for q in d.queries] == want["dropped_rows"]
        assert d.queries_before == want["queries"] and d.gallery_before == want["gallery"]
        assert len(kept.queries) == want["queries"] - len(want["dropped_rows"])
        assert len(kept.gallery) == want["gallery"] - len(want["missing"])
        assert not set(kept.gallery) & want["missing"]
        # every dropped query names at least one missing image of its own; every kept one none
        assert all(d.missing_of(q) for q in d.queries)
        assert all(not set(cdata.query_images(q)) & want["missing"] for q in kept.queries)
        # order is kept: the kept queries are the caption file's rows without the dropped ones
        assert [q.index for q in kept.queries] == [i for i in range(want["queries"]) if i not in want["dropped_rows"]]


def test_nothing_missing_drops_nothing(tmp_path):
    root = synth.generate(synth.SynthConfig(layout="cirr", n_train=4, n_val=4, n_test=4, seed=1), root=tmp_path / "w")
    sd = cdata.load_split("cirr", root, "val")
    assert cdata.drop_missing(sd) is sd and sd.dropped is None
    assert cdata.missing_images_error([sd]) is None


def test_one_error_lists_every_missing_file(world, tmp_path):
    sets = [cdata.load_split(world.layout, world.root, s, c) for s, c in _splits(world.layout) if s != "test1"
            and s != "test"]
    want = world.deleted_paths(("train", "val"))
    list_file = tmp_path / "missing.tsv"
    err = cdata.missing_images_error(sets, list_file)
    assert isinstance(err, cdata.DatasetError)
    message = str(err)
    assert f"{len(want):,} image files" in message and str(list_file) in message
    assert "python -m cirlib.data check" in message and 'missing_images="drop"' in message
    # FashionIQ's missing files are named as the real data has them (images/<name>.jpg); the synthetic world's are .png
    shown = [p for p in want if str(p.with_suffix("")) + "." in message]
    assert len(shown) == min(len(want), cdata.readers.MISSING_SHOWN)
    if len(want) > cdata.readers.MISSING_SHOWN:
        assert f"and {len(want) - cdata.readers.MISSING_SHOWN:,} more" in message
    assert _listed(list_file) == {p.with_suffix("") for p in want}


def test_the_policy_value_is_checked(cirr_world, tmp_path):
    with pytest.raises(ValueError, match="missing_images='skip'.*error.*drop"):
        steps.train_stage1(Stage1Config(stage1_run="bad", data_root=str(cirr_world.root), preset="tiny",
                                        missing_images="skip", outputs=str(tmp_path)))


def test_preview_applies_the_policy(cirr_world):
    cfg = DataConfig(dataset="cirr", data_root=str(cirr_world.root), split="val", missing_images="drop", smoke=True,
                     image_size=32)
    want = cirr_world.expected["val", None]
    summary = preview.split_summary(cfg)["value"]
    assert summary['queries dropped (missing_images="drop")'] == len(want["dropped_rows"])
    assert preview.show_triplets(cfg) is not None  # draws kept queries only: every image opens
    with pytest.raises(cdata.DatasetError, match=f"{len(want['missing'])} image files"):
        preview.show_triplets(DataConfig(dataset="cirr", data_root=str(cirr_world.root), split="val", smoke=True))


# ------------------------------------------------------------------------------------------------ the steps


def _common(world: World, outputs: str, **kw) -> dict:
    # validate_every=0: no validation inside training (the final evaluation still runs), to keep the test fast
    return dict(dataset=world.layout, data_root=str(world.root), preset="tiny", epochs=1, max_epoch=1, lr=1e-3,
                max_steps_per_epoch=2, validate_every=0, outputs=outputs, **kw)


def test_error_stops_before_training_listing_every_missing_file(world, tmp_path):
    outputs = str(tmp_path / "outputs")
    with pytest.raises(cdata.DatasetError) as err:
        steps.train_stage1(Stage1Config(stage1_run="s1", train_image_encoder=True, batch_size=8,
                                        **_common(world, outputs)))
    run = RunFolder.of("stage1", "s1", outputs)
    want = world.deleted_paths(("train", "val"))
    assert f"{len(want):,} image files" in str(err.value) and str(run.missing_images_file) in str(err.value)
    assert _listed(run.missing_images_file) == {p.with_suffix("") for p in want}
    # nothing was started: no config, no checkpoints, no model
    assert not run.config_file.exists() and not run.checkpoints_dir.exists() and not run.model_dir.exists()


def _check_counts(world: World, run: RunFolder, step: str, splits: tuple[str, ...], limit: int = 0) -> None:
    """dropped_queries.json's record of `step` holds exactly the expected queries and counts."""
    record = json.loads(run.dropped_queries_file.read_text())[step]
    cats = [None] if world.layout == "cirr" else list(FIQ_CATEGORIES)
    by_split = {(r["split"], r["category"]): r for r in record["splits"]}
    assert set(by_split) == {(s, c) for s in splits for c in cats}
    for split in splits:
        for cat in cats:
            want = world.expected[split, cat]
            n = want["queries"] if not limit or split != "val" else min(limit, want["queries"])
            rows = [i for i in want["dropped_rows"] if i < n]
            r = by_split[split, cat]
            assert (r["queries_in_split"], r["queries_dropped"], r["queries_kept"]) == (n, len(rows), n - len(rows))
            assert (r["gallery_in_split"], r["gallery_removed"]) == (want["gallery"], len(want["missing"]))
            assert set(r["missing_images"]) == want["missing"]
            listed = [q for q in record["queries"] if (q["split"], q["category"]) == (split, cat)]
            assert [q["row"] for q in listed] == rows and all(q["missing"] for q in listed)
            assert all(set(q["missing"]) <= want["missing"] for q in listed)


def _val_totals(world: World, limit: int = 0) -> tuple[int, int]:
    """(queries in the val split(s) after the limit, of them dropped)."""
    cats = [None] if world.layout == "cirr" else list(FIQ_CATEGORIES)
    total = dropped = 0
    for cat in cats:
        want = world.expected["val", cat]
        n = min(limit, want["queries"]) if limit else want["queries"]
        total += n
        dropped += sum(1 for i in want["dropped_rows"] if i < n)
    return total, dropped


@pytest.mark.e2e
def test_drop_runs_end_to_end_with_exact_counts(world, tmp_path, capsys):
    outputs = str(tmp_path / "outputs")
    cirr = world.layout == "cirr"
    k = 12 if cirr else 50
    common = _common(world, outputs, missing_images="drop")
    s1 = steps.train_stage1(Stage1Config(stage1_run="s1", train_image_encoder=True, batch_size=8, **common))
    run1 = RunFolder.of("stage1", "s1", outputs)
    total, dropped = _val_totals(world)
    assert dropped > 0
    printed = capsys.readouterr().out
    assert "train_stage1: val" in printed and "dropped (missing images)" in printed
    if cirr:
        assert f"evaluated on {total - dropped} of {total} queries; {dropped} dropped" in printed
    _check_counts(world, run1, "train_stage1", ("val", "train"))
    counts = json.loads(run1.evaluation_file.read_text())["query_counts"]["val"]
    assert (counts["evaluated"], counts["in_split"], counts["dropped"]) == (total - dropped, total, dropped)
    assert counts["dropped_file"] == "dropped_queries.json"
    if not cirr:
        for cat in FIQ_CATEGORIES:
            want = world.expected["val", cat]
            assert counts["by_category"][cat]["dropped"] == len(want["dropped_rows"])
    assert 0.0 <= s1.metrics["selection"] <= 100.0

    topk_splits = "val,test1" if cirr else "val"
    steps.extract_topk(TopKConfig(stage1_run="s1", topk_k=60, topk_splits=topk_splits, outputs=outputs))
    _check_counts(world, run1, "extract_topk", tuple(topk_splits.split(",")))
    _check_counts(world, run1, "train_stage1", ("val", "train"))  # the other step's record is kept

    steps.train_stage2(Stage2TrainConfig(stage2_run="s2", stage1_run="s1", reranker="joint", init="scratch", k=k,
                                         batch_size=4, scoring="pairs", **common))
    run2 = RunFolder.of("stage2", "s2", outputs)
    _check_counts(world, run2, "train_stage2", ("val", "train"))
    comparison = steps.evaluate(EvaluateConfig(stage2_run="s2", k=k, scoring="pairs", outputs=outputs))
    _check_counts(world, run2, "evaluate", ("val",))
    metrics = json.loads(run2.evaluation_file.read_text())
    assert metrics["queries"] == total - dropped
    counts = metrics["query_counts"]["val"]
    assert (counts["evaluated"], counts["in_split"], counts["dropped"]) == (total - dropped, total, dropped)
    assert comparison.dropped_line().startswith(
        f"evaluated on {total - dropped} of {total} validation queries; {dropped} dropped (missing images), listed "
        f"in {run2.dropped_queries_file}")
    comparison.print_dropped()
    assert "validation queries" in capsys.readouterr().out
    reused = steps.evaluate(EvaluateConfig(stage2_run="s2", k=k, scoring="pairs", outputs=outputs))
    assert reused.reused and reused.dropped_line() == comparison.dropped_line()

    # the figures (and their qualitative grid, which reads the split) follow the evaluated rows
    files = figures.make_figures(AnalysisConfig(stage1_run="s1", stage2_run="s2", dataset=world.layout,
                                                data_root=str(world.root), figures_dir=str(tmp_path / "fig"),
                                                n_qualitative=2, smoke=True, outputs=outputs))
    assert files and all(p.stat().st_size > 0 for p in files)

    if cirr:
        # fewer queries than the top-k file holds: the kept ones among the first 10 rows are a prefix of its rows
        few = steps.evaluate(EvaluateConfig(stage2_run="s2", k=k, scoring="pairs", max_val_queries=10,
                                            outputs=outputs))
        total10, dropped10 = _val_totals(world, 10)
        assert few.query_counts["val"]["evaluated"] == total10 - dropped10
        assert few.query_counts["val"]["in_split"] == total10 == 10
        _check_counts(world, run2, "evaluate", ("val",), limit=10)

        # the test server needs every pair id: refused, naming the count and the file; nothing written
        test1 = world.expected["test1", None]
        with pytest.raises(cdata.DatasetError, match=f"{len(test1['dropped_rows'])} of {test1['queries']} test1 "
                                                     "queries were dropped") as err:
            steps.submit_cirr(SubmissionConfig(stage2_run="s2", k=k, outputs=outputs))
        assert str(run2.dropped_queries_file) in str(err.value)
        assert not run2.submission_dir.exists()
        _check_counts(world, run2, "submit_cirr", ("test1",))
