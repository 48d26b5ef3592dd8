"""Search any folder with both stages (issue 14, parts 1-3): the gallery index (built, incremental, resumable,
unreadable files reported, another stage I refused or rebuilt), its queries equal to the pipeline's ranking for the
same queries (stage I: `rank_gallery`; stage II: `rerank`), the reference excluded by default, and the command line.
Models are untrained tiny ones (epochs=0): the comparisons need the same function on both paths, not a good one."""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from cirlib import data as cdata
from cirlib.data import synth
from cirlib.retrieval import feature_store as fs
from cirlib.retrieval import gallery_index as gi
from cirlib.retrieval.rerank import rerank
from cirlib.retrieval.search import (encode_gallery, encode_queries, rank_gallery, stage1_encoder, stage2_encoder,
                                     topk_from_ranking)
from cirlib.run import search as cli
from cirlib.workbook import search as S
from cirlib.workbook import steps
from cirlib.workbook.config import Stage1Config, Stage2TrainConfig, TopKConfig

K = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny CIRR world, an untrained tiny stage I and two untrained stage-II runs (joint with difference tokens,
    scored per pair as the demo's; the original's dual stream, which takes z_t from stage I)."""
    tmp = tmp_path_factory.mktemp("search")
    root = tmp / "cirr"
    synth.generate(synth.SynthConfig(layout="cirr", n_train=8, n_val=6, n_test=4, seed=5), root=root)
    out = tmp / "outputs"
    common = dict(data_root=str(root), preset="tiny", epochs=0, precision="fp32", trackers="none", outputs=str(out))
    steps.train_stage1(Stage1Config(stage1_run="s1", validate_every=0, **common))
    steps.extract_topk(TopKConfig(stage1_run="s1", topk_k=20, outputs=str(out)))
    for name, kw in (("joint", dict(reranker="joint", joint_difference=True, scoring="pairs")),
                     ("dual", dict(reranker="dual", scoring="shared"))):
        steps.train_stage2(Stage2TrainConfig(stage2_run=name, stage1_run="s1", init="scratch", k=K, validate_every=0,
                                             **kw, **common))
    return {"root": root, "out": out, "s1": str(out / "stage1" / "s1"), "joint": str(out / "stage2" / "joint"),
            "dual": str(out / "stage2" / "dual"), "tmp": tmp}


@pytest.fixture()
def gallery(world, tmp_path):
    """A copy of the world's dev folder (val images) that a test may change."""
    folder = tmp_path / "gallery"
    shutil.copytree(world["root"] / "dev", folder)
    return folder


def _index(world, folder, out, **kw):
    return S.index_folder(str(folder), world["s1"], str(out), batch_size=4, **kw)


def _write_image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    PIL.Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(path)


def test_index_is_built_and_a_second_run_embeds_nothing(world, gallery, tmp_path, vit_calls):
    n = len(list(gallery.glob("*.png")))
    report = _index(world, gallery, tmp_path / "ix")
    assert (report.status, report.images, len(report.added), report.embedded) == ("built", n, n, n)
    assert sum(vit_calls) == n
    idx = gi.GalleryIndex.open(tmp_path / "ix")
    assert idx.names == sorted(p.name for p in gallery.glob("*.png")) and idx.embeddings.shape[0] == n
    assert torch.allclose(idx.embeddings.norm(dim=1), torch.ones(n), atol=1e-5)
    assert idx.path(idx.names[0]) == (gallery / idx.names[0]).resolve()
    data = json.loads((tmp_path / "ix" / gi.INDEX_FILE).read_text())
    assert data["stage1"] == {"run": world["s1"]} and data["provenance"]["step"] == "search_index"
    assert {e["name"] for e in data["entries"]} == set(idx.names) and all(e["size"] > 0 for e in data["entries"])
    vit_calls.clear()
    again = _index(world, gallery, tmp_path / "ix")
    assert vit_calls == [], "nothing changed: no image is encoded"
    assert (again.status, again.embedded, again.unchanged, again.added) == ("unchanged", 0, n, [])


def test_added_deleted_and_changed_files_update_exactly_those(world, gallery, tmp_path, vit_calls):
    _index(world, gallery, tmp_path / "ix")
    before = gi.GalleryIndex.open(tmp_path / "ix")
    names = before.names
    (gallery / "sub").mkdir()
    _write_image(gallery / "sub" / "new.jpg", 1)
    (gallery / names[0]).unlink()
    _write_image(gallery / names[1], 2)  # new content, size and mtime
    st = (gallery / names[1]).stat()
    os.utime(gallery / names[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    vit_calls.clear()
    report = _index(world, gallery, tmp_path / "ix")
    assert (report.added, report.removed, report.changed) == (["sub/new.jpg"], [names[0]], [names[1]])
    assert report.embedded == 2 and sum(vit_calls) == 2 and report.unchanged == len(names) - 2
    after = gi.GalleryIndex.open(tmp_path / "ix")
    assert "sub/new.jpg" in after and names[0] not in after and len(after) == len(names)
    s1 = S.load_stage1(world["s1"])
    pixels = fs.transform_of(s1.preprocess)(cdata.load_image(gallery / names[1]))[None]
    fresh = s1.model.eval().encode_image(pixels).embeds[0].detach()
    assert torch.allclose(after.embeddings[after.positions[names[1]]], fresh, atol=1e-5)
    # unchanged files keep their rows
    same = names[2]
    assert torch.equal(after.embeddings[after.positions[same]], before.embeddings[before.positions[same]])


def test_an_unreadable_file_is_reported_not_fatal_and_not_retried(world, gallery, tmp_path, vit_calls):
    (gallery / "broken.jpg").write_bytes(b"not an image at all")
    n = len(list(gallery.glob("*.png")))
    report = _index(world, gallery, tmp_path / "ix")
    assert list(report.unreadable) == ["broken.jpg"] and "cannot read image" in report.unreadable["broken.jpg"]
    assert report.images == n and "broken.jpg" not in gi.GalleryIndex.open(tmp_path / "ix")
    assert "unreadable: broken.jpg" in report.summary()
    saved = json.loads((tmp_path / "ix" / gi.REPORT_FILE).read_text())
    assert list(saved["unreadable"]) == ["broken.jpg"] and saved["counts"]["unreadable"] == 1
    vit_calls.clear()
    again = _index(world, gallery, tmp_path / "ix")
    assert vit_calls == [] and list(again.unreadable) == ["broken.jpg"] and again.status == "unchanged"


def test_an_interrupted_build_resumes_from_its_whole_shards(world, gallery, tmp_path, monkeypatch):
    files = gi.list_images(gallery)
    s1 = S.load_stage1(world["s1"])
    original = VisionTransformer.forward_features
    seen: list[int] = []

    def dies_after_two_batches(self, x):
        if len(seen) == 2:
            raise RuntimeError("power cut")
        seen.append(x.shape[0])
        return original(self, x)

    monkeypatch.setattr(VisionTransformer, "forward_features", dies_after_two_batches)
    with pytest.raises(RuntimeError, match="power cut"):
        gi.build_index(files, s1.model, preprocess=s1.preprocess, out_dir=tmp_path / "ix", batch_size=4,
                       shard_size=4)
    assert not (tmp_path / "ix" / gi.INDEX_FILE).exists(), "no index until the build completes"
    monkeypatch.setattr(VisionTransformer, "forward_features", original)
    report = gi.build_index(files, s1.model, preprocess=s1.preprocess, out_dir=tmp_path / "ix", batch_size=4,
                            shard_size=4)
    assert report.embedded == len(files) - 8 and report.images == len(files)
    whole = gi.build_index(files, s1.model, preprocess=s1.preprocess, out_dir=tmp_path / "fresh", batch_size=4,
                           shard_size=4)
    assert whole.embedded == len(files)
    assert torch.allclose(gi.GalleryIndex.open(tmp_path / "ix").embeddings,
                          gi.GalleryIndex.open(tmp_path / "fresh").embeddings, atol=1e-6)


def test_another_stage1_is_refused_or_rebuilds_with_the_reason(world, gallery, tmp_path):
    _index(world, gallery, tmp_path / "ix")
    s1 = S.load_stage1(world["s1"])
    other = copy.deepcopy(s1.model)
    with torch.no_grad():
        other.vision_proj.weight.add_(0.01)
    files = gi.list_images(gallery)
    with pytest.raises(gi.IndexMismatchError, match="weights_sha256"):
        gi.build_index(files, other, preprocess=s1.preprocess, out_dir=tmp_path / "ix", replace=False)
    idx = gi.GalleryIndex.open(tmp_path / "ix")
    with pytest.raises(gi.IndexMismatchError, match="was built with stage I"):
        S.check_stage1(idx, S.Stage1Source(other, s1.tokenizer, s1.preprocess, {"run": "other"}, s1.weights_file))
    report = gi.build_index(files, other, preprocess=s1.preprocess, out_dir=tmp_path / "ix", batch_size=4)
    assert report.status == "rebuilt" and "weights_sha256" in report.reason and report.embedded == len(files)
    assert len(list((tmp_path / "ix" / "features").glob("stage1-*"))) == 1, "the old store is deleted"
    with pytest.raises(gi.IndexMismatchError, match="was built with stage I"):
        S.rank(str(tmp_path / "ix"), [idx.names[0]], ["x"], stage1=world["s1"])


def test_a_damaged_index_shard_is_named_and_the_index_command_repairs_it(world, gallery, tmp_path, vit_calls):
    n = len(list(gallery.glob("*.png")))
    _index(world, gallery, tmp_path / "ix")  # one shard of every image (256 per shard)
    want = gi.GalleryIndex.open(tmp_path / "ix").embeddings.clone()
    shard = next((tmp_path / "ix").rglob("embeds-00000.npy"))
    arr = np.load(shard, mmap_mode="r+")
    arr[1:3] = 1.12  # overwritten in place, same size: cosines above 1 if it were used
    arr.flush()
    del arr
    with pytest.raises(gi.GalleryIndexError, match=r"embeds-00000\.npy changed since it was written.*index "
                                                   r"command again to repair"):
        gi.GalleryIndex.open(tmp_path / "ix")
    vit_calls.clear()
    report = _index(world, gallery, tmp_path / "ix")
    assert report.embedded == n and sum(vit_calls) == n and report.images == n  # the shard's images, encoded again
    torch.testing.assert_close(gi.GalleryIndex.open(tmp_path / "ix").embeddings, want, rtol=0, atol=0)
    shard.write_bytes(shard.read_bytes()[:-64])  # truncated
    with pytest.raises(gi.GalleryIndexError, match=r"embeds-00000\.npy.*truncated"):
        gi.GalleryIndex.open(tmp_path / "ix")
    assert _index(world, gallery, tmp_path / "ix").embedded == n


def test_a_second_build_of_one_index_is_refused_while_the_first_runs(world, gallery, tmp_path):
    from cirlib.run_folder import LockedError, folder_lock

    (tmp_path / "ix").mkdir()
    with folder_lock(tmp_path / "ix" / gi.LOCK_FILE, "the first build"):  # another build holds the index
        with pytest.raises(LockedError, match=rf"gallery index {tmp_path / 'ix'} is in use by another process "
                                              rf"\(pid {os.getpid()}\)"):
            _index(world, gallery, tmp_path / "ix")
    assert not (tmp_path / "ix" / gi.INDEX_FILE).exists()
    assert _index(world, gallery, tmp_path / "ix").status == "built"  # once it is free


def _assert_same_ranking(names, scores, want_names, want_scores, tol):
    """The same scores position by position, and the same names, up to the order within a group of tied scores
    (the synthetic world holds pixel-identical images; faiss may order ties differently)."""
    assert scores == pytest.approx(want_scores, abs=tol)
    groups = np.cumsum([0] + [abs(a - b) > 1e-6 for a, b in zip(want_scores, want_scores[1:])])
    for g in set(groups):
        assert sorted(n for n, x in zip(names, groups) if x == g) == sorted(
            str(n) for n, x in zip(want_names, groups) if x == g)
    assert sum(a == b for a, b in zip(names, want_names)) >= len(names) - sum(
        np.bincount(groups)[np.bincount(groups) > 1]), "only tied names may swap"


@pytest.mark.parametrize("reranker, search", [("joint", "exact"), ("dual", "faiss")])
def test_search_results_equal_the_pipeline_ranking(world, tmp_path, reranker, search):
    """Same stage I and gallery: the index's stage-I top K (order and scores) is rank_gallery's; stage II's order
    and scores are rerank's (the demo's joint re-ranker per pair; the dual one with z_t from stage I)."""
    report = _index(world, world["root"] / "dev", tmp_path / "ix")
    sd = cdata.load_split("cirr", world["root"], "val")
    assert report.images == len(sd.gallery)
    s1 = S.load_stage1(world["s1"])
    model, tok = s1.model.eval(), s1.tokenizer
    transform = cdata.targetpad_transform(s1.preprocess["target_ratio"], s1.preprocess["image_size"])
    with torch.inference_mode():
        gallery = encode_gallery(stage1_encoder(model), sd, transform)
        q = encode_queries(model, tok, sd, gallery)
    ranking = rank_gallery(sd, sd.queries, gallery, q, K)
    pipeline_names = np.asarray(gallery.names)[ranking.index.numpy()]
    results = S.rank(str(tmp_path / "ix"), [f"{x.reference}.png" for x in sd.queries],
                     [cdata.query_text(x, "cirr", "val") for x in sd.queries], stage2=world[reranker], k=K, top=K,
                     search=search, batch_size=3)
    for i, r in enumerate(results):
        assert r.reference_in_index == f"{sd.queries[i].reference}.png" and r.reference_excluded
        _assert_same_ranking([Path(h.name).stem for h in r.stage1], [h.stage1_score for h in r.stage1],
                             list(pipeline_names[i]), ranking.scores[i].tolist(), 1e-5)
    # stage II: the pipeline's re-ranking of the same top-K file
    s2 = S.load_stage2(world[reranker])
    topk = topk_from_ranking(sd, sd.queries, gallery, ranking)
    t2 = cdata.targetpad_transform(s2.preprocess["target_ratio"], s2.preprocess["image_size"])
    with torch.inference_mode():
        g2 = encode_gallery(stage2_encoder(s2.model), sd, t2)
    scored = rerank(s2.stage1, s2.model, s2.tokenizer, sd, topk, g2, k=K, scoring=s2.scoring)
    final = scored.reranked(0.0)
    for i, r in enumerate(results):
        _assert_same_ranking([Path(h.name).stem for h in r.stage2], [h.stage2_score for h in r.stage2],
                             list(final.sorted_index_names[i]), final.stage2_scores[i].tolist(), 1e-4)


def test_the_reference_is_excluded_by_default_and_kept_on_request(world, tmp_path):
    _index(world, world["root"] / "dev", tmp_path / "ix")
    idx = gi.GalleryIndex.open(tmp_path / "ix")
    name = idx.names[3]
    n = len(idx)
    by_name, by_path, kept, outside = S.rank(
        idx, [name, str(idx.path(name))], ["make it red"] * 2, k=n, top=n) + S.rank(
        idx, [name], ["make it red"], k=n, top=n, exclude_reference=False) + S.rank(
        idx, [cdata.load_image(idx.path(name))], ["make it red"], k=n, top=n)
    for r in (by_name, by_path):
        assert r.reference_in_index == name and r.reference_excluded
        assert name not in [h.name for h in r.candidates] and r.k == n - 1
    assert not kept.reference_excluded and name in [h.name for h in kept.candidates] and kept.k == n
    assert outside.reference_in_index is None and outside.k == n and outside.stage2 is None
    with pytest.raises(FileNotFoundError, match="neither a name in the index"):
        S.rank(idx, ["no-such-image.png"], ["x"])


def test_stage2_tokens_from_a_store_give_the_same_scores(world, tmp_path, vit_calls):
    _index(world, world["root"] / "dev", tmp_path / "ix")
    idx = gi.GalleryIndex.open(tmp_path / "ix")
    refs, texts = idx.names[:2], ["add a red circle", "remove the square"]
    a = S.rank(idx, refs, texts, stage2=world["joint"], k=K)
    b = S.rank(idx, refs, texts, stage2=world["joint"], k=K, stage2_tokens="store")
    assert list((tmp_path / "ix" / "features").glob("vit-*")), "the tokens store lives in the index folder"
    for x, y in zip(a, b):
        assert [h.name for h in x.stage2] == [h.name for h in y.stage2]
        assert [h.stage2_score for h in x.stage2] == pytest.approx([h.stage2_score for h in y.stage2], abs=1e-5)
    vit_calls.clear()
    S.rank(idx, refs, texts, stage2=world["joint"], k=K, stage2_tokens="store")
    # only the references are encoded (stage I's ViT, stage II's ViT): the candidates come from the store
    assert sum(vit_calls) == 2 * len(refs)


def test_the_command_line_indexes_and_prints_json(world, gallery, tmp_path, capsys):
    out = tmp_path / "ix"
    assert cli.main(["index", str(gallery), "--stage1", world["s1"], "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"]["added"] == report["counts"]["images"] > 0
    assert cli.main(["index", str(gallery), "--stage1", world["s1"], "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "unchanged" in printed and "0 added, 0 removed, 0 changed" in printed
    name = sorted(p.name for p in gallery.glob("*.png"))[0]
    assert cli.main(["query", str(out), "--image", name, "--text", "make it red", "--stage2", world["joint"],
                     "--k", str(K), "--top", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["reference_in_index"] == name and result["reference_excluded"] is True
    assert len(result["stage1"]) == len(result["stage2"]) == 3 and result["k"] == K
    assert {"name", "path", "stage1_score", "stage2_score"} <= set(result["stage2"][0])
    assert name not in [h["name"] for h in result["candidates"]]
    assert cli.main(["query", str(out), "--image", str(gallery / name), "--text", "x", "--keep-reference"]) == 0
    assert "kept in the results" in capsys.readouterr().out
    assert cli.main(["query", str(tmp_path / "nothing"), "--image", name, "--text", "x"]) == 2
    assert "no gallery index" in capsys.readouterr().err


def test_the_command_line_refuses_what_it_cannot_do_in_one_line(world, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["index", str(empty), "--stage1", world["s1"], "--out", str(tmp_path / "ix")]) == 2
    assert "no images to index under" in capsys.readouterr().err
    assert not (tmp_path / "ix" / gi.INDEX_FILE).exists()
    for bad, said in ((["--k", "0"], "--k: 0: expected an integer >= 1"),
                      (["--top", "-3"], "--top: -3: expected an integer >= 1"),
                      (["--device", "cuda"] if not torch.cuda.is_available() else ["--k", "-1"],
                       "no CUDA device" if not torch.cuda.is_available() else "expected an integer")):
        with pytest.raises(SystemExit) as stop:
            cli.main(["query", str(tmp_path / "ix"), "--image", "a.png", "--text", "x", *bad])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and said in err and "Traceback" not in err, err


def test_a_stage1_run_given_as_stage2_is_named_as_such(world, gallery, tmp_path, capsys):
    _index(world, gallery, tmp_path / "ix")
    name = sorted(p.name for p in gallery.glob("*.png"))[0]
    assert cli.main(["query", str(tmp_path / "ix"), "--image", name, "--text", "x", "--stage2", world["s1"]]) == 2
    err = capsys.readouterr().err
    assert "is a stage-I run" in err and "older cirlib" not in err, err
