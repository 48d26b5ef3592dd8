"""CIRCO end to end: the layout reader (on the real annotation files with a generated image folder, and its errors),
the synthetic CIRCO-layout world (several ground truths per query), evaluation of both stages through a gallery
index with the val metrics and the test-server files, and the validator's command line on the official example."""
from __future__ import annotations

import copy
import dataclasses
import io
import itertools
import json
import shutil
import subprocess
import sys

import PIL.Image
import pytest

from cirlib import paths
from cirlib.data import DatasetError, get_dataset, synth
from cirlib.data import circo as layout
from cirlib.data import synth_circo
from cirlib.eval import circo
from cirlib.run import batch
from cirlib.run.rerank import config_from as rerank_config_from
from cirlib.run.rerank import main as rerank_main
from cirlib.run.rerank import parser as rerank_parser
from cirlib.run_folder import sidecar_file
from cirlib.workbook import circo_eval, steps
from cirlib.workbook.rerank_any import rerank_any
from cirlib.workbook.config import CircoConfig, RerankConfig, Stage1Config, Stage2TrainConfig, TopKConfig


def _jpeg() -> bytes:
    buf = io.BytesIO()
    PIL.Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, "JPEG")
    return buf.getvalue()


def _real_root(real, tmp_path, skip: set[int] = frozenset(), extra: int = 0):
    """The real val/test annotations beside a generated image folder holding every image they name (less `skip`)."""
    root = tmp_path / "CIRCO"
    (root / "annotations").mkdir(parents=True)
    ids: set[int] = set()
    for split in ("val", "test"):
        text = (real / "circo" / "annotations" / f"{split}.json").read_text()
        (root / "annotations" / f"{split}.json").write_text(text)
        for r in json.loads(text):
            ids.update([r["reference_img_id"], *r.get("gt_img_ids", [])])
    folder = root / layout.IMAGE_DIR
    folder.mkdir(parents=True)
    data = _jpeg()
    for i in sorted(ids - set(skip)) + list(range(1, extra + 1)):
        (folder / layout.image_name(i)).write_bytes(data)
    (folder / "README.txt").write_text("not an image")
    return root, ids


# ------------------------------------------------------------------------------------------------------ reader


def test_the_reader_parses_the_real_annotations_beside_a_generated_folder(real, tmp_path):
    root, ids = _real_root(real, tmp_path, extra=3)
    val = circo_eval.load_circo(root, "val")
    test = circo_eval.load_circo(root, "test", gallery=val.gallery)
    assert len(val.queries) == 220 and len(test.queries) == 800 and val.dropped is None and test.dropped is None
    assert sum(len(q.gt_img_ids) for q in val.queries) == 916 and all(not q.gt_img_ids for q in test.queries)
    g = val.gallery
    assert not g.from_list and len(g) == len(ids | {1, 2, 3}) and g.ignored == 1  # README.txt is no image
    q = val.queries[0]
    assert g.name(q.reference_img_id) == "000000271520.jpg" and g.id_of("000000271520.jpg") == 271520
    assert g.names[g.name(q.target_img_id)] == root / layout.IMAGE_DIR / f"{q.target_img_id:012d}.jpg"
    # COCO's image list, when present, is the gallery (a listed id without its file: the missing-image policy)
    listed = sorted(ids) + [999_999_999]
    (root / layout.IMAGE_LIST).parent.mkdir(parents=True)
    (root / layout.IMAGE_LIST).write_text(json.dumps(
        {"images": [{"id": i, "file_name": layout.image_name(i)} for i in listed]}))
    with pytest.raises(DatasetError, match=r"(?s)1 image files listed in .*image_info_unlabeled2017.json are "
                                           r"missing.*999999999\.jpg.*missing_images=\"drop\""):
        circo_eval.load_circo(root, "val")
    dropped = circo_eval.load_circo(root, "val", missing_images="drop")
    assert dropped.gallery.from_list and dropped.gallery.missing == (999_999_999,) and len(dropped.queries) == 220
    assert 1 not in dropped.gallery.files  # only listed images are the gallery


def test_reader_errors_name_the_file_and_the_record(real, tmp_path):
    with pytest.raises(DatasetError, match=r"(?s)annotation file not found: .*annotations/val.json.*expected CIRCO"):
        circo_eval.load_circo(tmp_path, "val")
    raw = json.loads((real / "circo" / "annotations" / "val.json").read_text())
    gone = {raw[5]["reference_img_id"], raw[7]["gt_img_ids"][-1]}
    root, _ = _real_root(real, tmp_path, skip=gone)
    with pytest.raises(DatasetError, match=r"(?s)2 image files named by .*val.json are missing.*"
                                           r"query 5 of val.json.*query 7 of val.json") as err:
        circo_eval.load_circo(root, "val")
    list_file = str(err.value).split("The full list is in ")[1].split(".\n")[0]
    assert len(open(list_file).read().splitlines()) == 2
    data = circo_eval.load_circo(root, "val", missing_images="drop")
    assert len(data.queries) == 218 and [d.id for d in data.dropped.queries] == [5, 7]
    assert data.dropped.queries_before == 220
    # an id the COCO image list does not hold: the files do not belong together, whatever the policy
    present = sorted(data.gallery.files)
    (root / layout.IMAGE_LIST).parent.mkdir(parents=True)
    (root / layout.IMAGE_LIST).write_text(json.dumps(
        {"images": [{"id": i, "file_name": layout.image_name(i)} for i in present]}))
    with pytest.raises(DatasetError, match=rf"val.json: 2 image id\(s\) are not in COCO's image list .*query 5 names "
                                           rf"image id {raw[5]['reference_img_id']}"):
        circo_eval.load_circo(root, "val", missing_images="drop")
    with pytest.raises(DatasetError, match="unknown CIRCO split 'train'"):
        layout.annotation_file(root, "train")


# ------------------------------------------------------------------------------------------------------ synthetic


@pytest.fixture(scope="module")
def circo_world(tmp_path_factory):
    cfg = synth_circo.CircoSynthConfig(n_val=12, n_test=8, gallery_size=160, seed=1)
    return synth_circo.generate_circo(cfg, tmp_path_factory.mktemp("circo") / "CIRCO")


def test_the_synthetic_world_is_circo_with_several_ground_truths(circo_world, tmp_path):
    val = circo.read_annotations(circo_world / "annotations" / "val.json")
    test = circo.read_annotations(circo_world / "annotations" / "test.json")
    assert len(val) == 12 and len(test) == 8 and all(q.gt_img_ids == () for q in test)
    assert list(json.loads((circo_world / "annotations" / "val.json").read_text())[0]) == [
        "reference_img_id", "target_img_id", "relative_caption", "shared_concept", "gt_img_ids", "id",
        "semantic_aspects"]  # CIRCO's fields in CIRCO's order
    counts = [len(q.gt_img_ids) for q in val]
    assert max(counts) >= 3 and sum(counts) / len(counts) > 2, counts
    gallery = layout.read_gallery(circo_world)
    assert gallery.from_list and len(gallery) == 160 and not gallery.missing
    assert all(PIL.Image.open(p).format == "JPEG" for p in list(gallery.files.values())[:5])
    scenes = json.loads((circo_world / "synth" / "scenes.json").read_text())
    meta = {m["id"]: m for m in json.loads((circo_world / "synth" / "queries.val.json").read_text())}
    for q in val:
        assert q.target_img_id == q.gt_img_ids[0] and q.reference_img_id not in q.gt_img_ids
        assert set(q.gt_img_ids) <= set(gallery.files) and q.reference_img_id in gallery.files
        assert q.shared_concept.startswith("a ") and q.semantic_aspects
        m = meta[q.id]
        rule = synth_circo.Requirement(synth.scene_from_str(m["present"]), tuple(map(tuple, m["absent"])))
        answers = [int(i) for i, s in scenes.items() if rule.holds(synth.scene_from_str(s))]
        assert sorted(answers) == sorted(q.gt_img_ids)  # every image that answers the query, and no other
        assert not set(m["negative_img_ids"]) & set(q.gt_img_ids)
    # the CIRR world's vocabulary covers every text (zero-shot transfer of a model trained there)
    (tmp_path / "vocab.txt").write_text("\n".join(synth.vocabulary(synth.SynthConfig())) + "\n")
    assert synth_circo.words_outside(circo_world, tmp_path / "vocab.txt") == []
    # deterministic: the same config writes the same files; an existing world of it is kept
    again = synth_circo.generate_circo(synth_circo.CircoSynthConfig(n_val=12, n_test=8, gallery_size=160, seed=1),
                                       tmp_path / "again")
    for rel in ("annotations/val.json", "annotations/test.json", layout.IMAGE_LIST):
        assert (again / rel).read_bytes() == (circo_world / rel).read_bytes()
    first = sorted(gallery.files)[0]
    assert (again / layout.IMAGE_DIR / layout.image_name(first)).read_bytes() == gallery.files[first].read_bytes()
    with pytest.raises(FileExistsError, match="another world"):
        synth_circo.generate_circo(synth_circo.CircoSynthConfig(n_val=3, n_test=3, gallery_size=60), again)


def test_the_command_line_writes_a_world_like_a_cirr_world(tmp_path, capsys):
    cirr = synth.generate(synth.SynthConfig(layout="cirr", n_train=2, n_val=2, n_test=0, seed=5, jitter=0),
                          root=tmp_path / "cirr")
    assert synth_circo.main(["--like", str(cirr), "--out", str(tmp_path / "CIRCO"), "--val", "3", "--test", "2",
                             "--gallery", "60"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["gallery"], printed["val"]["queries"], printed["test"]["queries"]) == (60, 3, 2)
    world = paths.read_json(tmp_path / "CIRCO" / "world.json")
    assert world["config"]["jitter"] == 0 and world["layout"] == "circo"  # the CIRR world's scene grammar
    assert synth_circo.words_outside(tmp_path / "CIRCO", cirr / "vocab.txt") == []


def test_the_ground_truths_score_full_marks(circo_world):
    queries = circo.read_annotations(circo_world / "annotations" / "val.json")
    gts = {x for q in queries for x in q.gt_img_ids}
    others = list(itertools.islice((i for i in itertools.count() if i not in gts), circo.SUBMISSION_LENGTH))
    perfect = {q.id: (list(q.gt_img_ids) + others)[:circo.SUBMISSION_LENGTH] for q in queries}
    m = circo.circo_metrics(perfect, queries)
    assert m["mAP@5"] == m["mAP@50"] == m["Recall@5"] == 100.0
    assert set(m["semantic_mAP@10"]) <= set(circo.ASPECTS) and set(m["semantic_mAP@10"].values()) == {100.0}


# ------------------------------------------------------------------------------------------------------ evaluation


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny stage I (a few steps) and an untrained joint stage II on a tiny synthetic CIRR world."""
    tmp = tmp_path_factory.mktemp("runs")
    world = synth.generate(synth.SynthConfig(layout="cirr", n_train=16, n_val=8, n_test=0, seed=3), root=tmp / "cirr")
    outputs = str(tmp / "outputs")
    steps.train_stage1(Stage1Config(stage1_run="s1", data_root=str(world), preset="tiny", train_image_encoder=True,
                                    epochs=1, max_epoch=1, lr=1e-3, batch_size=8, max_steps_per_epoch=2,
                                    validate_every=0, trackers="none", outputs=outputs))
    steps.extract_topk(TopKConfig(stage1_run="s1", topk_k=20, topk_splits="val", outputs=outputs))
    steps.train_stage2(Stage2TrainConfig(stage2_run="s2", stage1_run="s1", data_root=str(world), preset="tiny",
                                         reranker="joint", joint_difference=True, scoring="pairs", init="scratch",
                                         k=8, epochs=0, validate_every=0, trackers="none", outputs=outputs))
    return outputs


@pytest.mark.slow
def test_both_stages_on_the_synthetic_circo_world(circo_world, runs, capsys):
    cfg = CircoConfig(circo_root=str(circo_world), stage1_run="s1", stage2_run="s2", k=60, outputs=runs)
    circo_eval.check_inputs(cfg)
    result = circo_eval.evaluate_circo(cfg)
    assert result.index.status == "built" and result.index.images == 160
    assert set(result.metrics) == {"stage1", "stage2"} and result.queries == {"val": 12, "test": 8}
    for m in result.metrics.values():
        assert {f"{a}@{k}" for a in ("mAP", "Recall") for k in circo.KS} | {"semantic_mAP@10"} == set(m)
    val = circo.read_annotations(circo_world / "annotations" / "val.json")
    test = circo.read_annotations(circo_world / "annotations" / "test.json")
    for stage in ("stage1", "stage2"):
        preds = circo.read_predictions(result.files[f"val {stage}"])
        assert all(q.reference_img_id not in preds[q.id] for q in val)  # the reference is excluded by default
        # the command line recomputes the recorded metrics from the written file
        assert circo.main(["evaluate", "--annotations", str(circo_world / "annotations" / "val.json"),
                           "--predictions", str(result.files[f"val {stage}"])]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert set(printed) == set(result.metrics[stage])
        for key, value in result.metrics[stage].items():
            assert printed[key] == pytest.approx(value), key
        # the test-server file: every test id, 50 unique gallery ids each
        doc = json.loads(result.files[f"test {stage}"].read_text())
        assert circo.validate_submission(doc, test, circo.read_gallery_ids(circo_world / layout.IMAGE_LIST)) == []
        assert json.loads(sidecar_file(result.files[f"test {stage}"]).read_text())["step"] == "evaluate_circo"
    # stage II re-ranks stage I's candidates: the same 50 ids (k = 60 > 50: stage II chose its 50 among 60)
    s1 = circo.read_predictions(result.files["val stage1"])
    s2 = circo.read_predictions(result.files["val stage2"])
    assert any(s1[q] != s2[q] for q in s1)
    record = json.loads(result.files["metrics"].read_text())
    assert record["settings"]["text"] == "relative_caption" and record["settings"]["reference_excluded"] is True
    assert record["provenance"]["data"]["dataset"] == "circo" and record["queries"] == 12
    assert record["metrics"] == json.loads(json.dumps(result.metrics))
    assert "--predictions" in circo_eval.command(cfg, result)
    # a second run re-embeds nothing; k < 50 keeps stage I's order past k
    again = circo_eval.evaluate_circo(dataclasses.replace(cfg, k=5, splits="val", result_name="k5"))
    assert again.index.status == "unchanged" and again.index.embedded == 0
    s1b = circo.read_predictions(again.files["val stage1"])
    s2b = circo.read_predictions(again.files["val stage2"])
    assert s1b == s1 and all(s2b[q][5:] == s1[q][5:] and sorted(s2b[q][:5]) == sorted(s1[q][:5]) for q in s1)


def test_the_query_text_and_the_settings_checks(circo_world, tmp_path):
    q = circo.read_annotations(circo_world / "annotations" / "val.json")[0]
    assert circo_eval.query_text(q) == q.relative_caption
    assert circo_eval.query_text(q, True) == f"{q.shared_concept}, {q.relative_caption}"
    with pytest.raises(ValueError, match="splits='train'"):
        circo_eval.evaluate_circo(CircoConfig(circo_root=str(circo_world), splits="train"))
    # a test query whose reference is missing: dropped queries would make an incomplete server file, so no file
    root = tmp_path / "CIRCO"
    shutil.copytree(circo_world, root)
    ref = circo.read_annotations(root / "annotations" / "test.json")[2].reference_img_id
    (root / layout.IMAGE_DIR / layout.image_name(ref)).unlink()
    with pytest.raises(DatasetError, match=rf"(?s)1 image files listed in .* are missing.*{ref:012d}.jpg"):
        circo_eval.evaluate_circo(CircoConfig(circo_root=str(root)))
    with pytest.raises(circo.CircoError, match="1 test queries name missing images: the test server needs every"):
        circo_eval.evaluate_circo(CircoConfig(circo_root=str(root), missing_images="drop"))
    dropped = circo_eval.load_circo(root, "test", missing_images="drop")
    assert [d.id for d in dropped.dropped.queries] == [2] and len(dropped.queries) == 7


# ------------------------------------------------------------------------------------------------------ command line


def test_the_validate_command_accepts_the_official_file_and_rejects_broken_copies(real, tmp_path):
    official = real / "circo" / "submission_examples" / "submission_test.json"
    doc = json.loads(official.read_text())
    broken = copy.deepcopy(doc)
    del broken["17"]
    broken["3"] = broken["3"][:49]
    broken["5"][1] = broken["5"][0]
    broken["9"] = [str(x) for x in broken["9"]]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    annotations = real / "circo" / "annotations" / "test.json"
    out = subprocess.run([sys.executable, "-m", "cirlib.circo", "validate", "--annotations", str(annotations),
                          str(official), str(tmp_path / "broken.json")],
                         capture_output=True, text=True, cwd=paths.REPO_ROOT, timeout=120)
    assert out.returncode == 1, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"{official}: valid" and lines[1] == f"{tmp_path / 'broken.json'}: 4 problem(s)"
    for what in ("1 query ids missing (first [17])", "query 3: 49 ids", "query 5: repeated", "query 9: non-integer"):
        assert any(what in line for line in lines), (what, lines)


def test_the_parameter_file_runs_the_cirr_runs_on_circo():
    data, name = batch.load_params(paths.REPO_ROOT / "params" / "circo.yaml")
    cirr, _ = batch.load_params(paths.REPO_ROOT / "params" / "cirr.yaml")
    (plan,) = batch.plan_batch(data, [paths.NOTEBOOKS / "09_circo.ipynb"]).values()
    assert name == "circo" and plan["stage1_run"] == cirr["stage1_run"] and plan["stage2_run"] == cirr["stage2_run"]
    assert plan["k"] == cirr["k"] == 50 and plan["splits"] == "val,test" and plan["use_shared_concept"] is False
    CircoConfig(**plan)  # every key is a field of the notebook's config
    # the file names the one notebook it is for, so a plain `python -m cirlib.batch params/circo.yaml` runs only 09
    assert [p.stem for p in batch._select(batch.notebook_paths(), batch._listed(data["run"]))] == ["09_circo"]
    assert batch._listed(None) is None and batch._listed("01, 02") == ["01", " 02"]
    with pytest.raises(batch.BatchError, match="run: expected a list"):
        batch._listed({"09": True})


# ------------------------------------------------------------------------------------------------------ re-ranking


def test_circo_says_it_has_no_split_data_so_rerank_any_ranks_it_through_an_index(tmp_path):
    ds = get_dataset("circo")
    assert not ds.has_split_data and get_dataset("cirr").has_split_data and get_dataset("fashioniq").has_split_data
    with pytest.raises(DatasetError, match="no SplitData reader"):
        ds.load_split(tmp_path, "val")
    with pytest.raises(SystemExit):  # --dataset is a command-line option
        rerank_main(["--candidates", "x.json", "--stage2", "s2", "--dataset"])
    args = rerank_parser().parse_args(["--candidates", "x.json", "--stage2", "s2", "--dataset", "circo",
                                       "--index", str(tmp_path / "idx")])
    cfg = rerank_config_from(args)
    assert (cfg.dataset, cfg.index) == ("circo", str(tmp_path / "idx"))


@pytest.mark.slow
def test_notebook_09s_stage_i_lists_re_ranked_by_rerank_any_give_its_stage_ii(circo_world, runs, tmp_path, capsys):
    """Notebook 09's stage-I CIRCO files imported into `rerank_any` (CIRCO: no SplitData, so through the gallery
    index): val metrics equal notebook 09's stage-II ones at the same k (same candidates, same scores, same stable
    order), and the test file passes the server's validator."""
    cfg = CircoConfig(circo_root=str(circo_world), stage1_run="s1", stage2_run="s2", k=50, result_name="k50",
                      outputs=runs)
    nb09 = circo_eval.evaluate_circo(cfg)
    common = dict(stage2_run="s2", dataset="circo", data_root=str(circo_world), k=50, scoring="pairs",
                  outputs=runs)
    val = rerank_any(RerankConfig(candidates=str(nb09.files["val stage1"]), split="val",
                                  out=str(tmp_path / "val"), **common))
    assert val.imported == nb09.metrics["stage1"]
    assert val.reranked == nb09.metrics["stage2"] and val.reranked != val.imported
    assert val.record["dataset"] == "circo" and (tmp_path / "val" / "metrics.json").is_file()
    # where the gain comes from, with several ground truths: a query's rank is its best-placed ground truth's
    queries = circo.read_annotations(circo_world / "annotations" / "val.json")
    before = json.loads(nb09.files["val stage1"].read_text())
    after = json.loads(nb09.files["val stage2"].read_text())
    first = {name: {q.id: next((r for r, i in enumerate(lists[str(q.id)]) if i in q.gt_img_ids), -1)
                    for q in queries} for name, lists in (("before", before), ("after", after))}
    analysis = val.record["analysis"]
    assert analysis["ceiling"]["val"] == pytest.approx(100 * sum(r >= 0 for r in first["before"].values()) / 12)
    counts = analysis["outcomes"]["val"]
    assert sum(counts.values()) == 12 and counts["up"] == sum(first["after"][i] >= 0 and (
        first["before"][i] < 0 or first["after"][i] < first["before"][i]) for i in first["before"])
    assert set(analysis["outcomes_per_query"]["val"]) == {str(q.id) for q in queries}
    assert rerank_main(["--candidates", str(nb09.files["val stage1"]), "--stage2", "s2", "--dataset", "circo",
                        "--data-root", str(circo_world), "--scoring", "pairs", "--out", str(tmp_path / "val2"),
                        "--outputs", runs]) == 0
    printed = capsys.readouterr().out
    assert "mAP@10" in printed and "semantic_mAP@10 " in printed  # the table spreads out semantic mAP's aspects
    # the command line: the CIRCO test split's server file, accepted by the validator before it was written
    assert rerank_main(["--candidates", str(nb09.files["test stage1"]), "--stage2", "s2", "--split", "test",
                        "--dataset", "circo", "--data-root", str(circo_world), "--scoring", "pairs",
                        "--out", str(tmp_path / "test"), "--outputs", runs]) == 0
    (server,) = (tmp_path / "test" / "submission").glob("*_circo_test.json")
    doc = json.loads(server.read_text())
    test = circo.read_annotations(circo_world / "annotations" / "test.json")
    assert circo.validate_submission(doc, test, circo.read_gallery_ids(circo_world / layout.IMAGE_LIST)) == []
    assert doc == json.loads(nb09.files["test stage2"].read_text())  # notebook 09's stage-II test file


def _circo_trec(circo_world, path, skip: int = 0, depth: int = 60):
    """A TREC run for CIRCO val with scores: per query a fixed shuffle of the gallery, its ground truths spread
    through the first `depth` names (so re-ranking has something to move); the first `skip` queries left out."""
    import random

    names = list(layout.read_gallery(circo_world).names)
    lines = []
    for q in circo.read_annotations(circo_world / "annotations" / "val.json")[skip:]:
        rng = random.Random(q.id)
        gts = [layout.image_name(i) for i in q.gt_img_ids]
        rest = [n for n in names if n not in gts and n != layout.image_name(q.reference_img_id)]
        rng.shuffle(rest)
        ranked = rest[:depth - len(gts)]
        for g in gts:
            ranked.insert(rng.randrange(len(ranked) + 1), g)
        lines += [f"{q.id} Q0 {n} {r + 1} {1.0 - r / depth:.6f} theirs" for r, n in enumerate(ranked)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_circo_re_ranking_sweeps_fusion_shows_the_rank_shift_reuses_and_drops_on_val(circo_world, runs, tmp_path):
    """CIRCO through `rerank_any` as CIRR: the fusion sweep (best weight by mAP@10; at w the metrics of
    --fusion-weight w, at 1 the imported order's), Figure 8's data from the best-placed ground truth, reuse keyed on
    the candidates' content and the settings, and missing queries dropped on val (recorded) but refused on test."""
    from cirlib.workbook import rerank_any as module

    trec = _circo_trec(circo_world, tmp_path / "theirs.trec")
    common = dict(stage2_run="s2", dataset="circo", data_root=str(circo_world), k=10, scoring="pairs",
                  fusion_sweep="0,0.3,1", outputs=runs)
    assert module.check_inputs(RerankConfig(candidates=str(trec), **common))["exists"].all()  # notebook 10's cells
    fused = rerank_any(RerankConfig(candidates=str(trec), fusion_weight=0.3, out=str(tmp_path / "a"), **common))
    sweep = fused.record["analysis"]["fusion_sweep"]
    at = dict(zip(sweep["weights"], sweep["metrics"]))
    assert sweep["key"] == "mAP@10" and at[0.3] == json.loads(json.dumps(fused.reranked))
    assert at[1.0] == json.loads(json.dumps(fused.imported))  # the imported scores alone: the imported order
    assert sweep["best_weight"] == max(sweep["weights"], key=lambda w: (at[w]["mAP@10"], -w))
    shift = fused.record["analysis"]["rank_shift"]["val"]
    assert shift["k"] == 10 and len(shift["imported"]) == 12
    assert sorted(r >= 0 for r in shift["imported"]) == sorted(r >= 0 for r in shift["reranked"])
    assert len(module.rank_shift_panels(fused)) == 1 and module.plot_fusion_sweep(fused) is not None
    # reuse: the same content elsewhere is the same input; another setting is not
    copy_ = shutil.copy(trec, tmp_path / "copy.trec")
    again = rerank_any(RerankConfig(candidates=str(copy_), fusion_weight=0.3, out=str(tmp_path / "a"), **common))
    assert again.reused and again.reranked == json.loads(json.dumps(fused.reranked))
    assert not rerank_any(RerankConfig(candidates=str(trec), out=str(tmp_path / "a"), **common)).reused
    # queries the file lacks: an error naming them, or on val dropped and recorded
    short = _circo_trec(circo_world, tmp_path / "short.trec", skip=2)
    with pytest.raises(ValueError, match="missing"):
        rerank_any(RerankConfig(candidates=str(short), out=str(tmp_path / "b"), **common))
    dropped = rerank_any(RerankConfig(candidates=str(short), missing_queries="drop", out=str(tmp_path / "b"),
                                      **common))
    counts = dropped.record["query_counts"]["val"]
    assert (counts["in_split"], counts["evaluated"], counts["missing_from_candidates"]) == (12, 10, 2)
    listed = json.loads((tmp_path / "b" / "dropped_queries.json").read_text())["rerank_candidates"]["splits"][0]
    assert listed["query_ids"] == counts["dropped_from_candidates"] and len(listed["query_ids"]) == 2
    assert sum(dropped.record["analysis"]["outcomes"]["val"].values()) == 10
    with pytest.raises(ValueError, match="missing_queries='drop' on the test split: the server scores every query"):
        rerank_any(RerankConfig(candidates=str(short), missing_queries="drop", split="test", **common))
