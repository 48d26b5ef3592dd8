"""Dataset readers on the hand-written mini roots (tests/fixtures/{cirr_mini,fiq_mini}): parsing, caption rules,
torch datasets and every bad-input error."""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from cirlib.data import (
    DatasetError,
    GalleryDataset,
    QueryDataset,
    TripletDataset,
    collate,
    fiq_caption_join,
    load_image,
    load_split,
    query_text,
    targetpad_transform,
)
from cirlib.paths import REPO_ROOT

FIXTURES = REPO_ROOT / "tests" / "fixtures"
CIRR = FIXTURES / "cirr_mini"
FIQ = FIXTURES / "fiq_mini"
SIZE = 16
TF = targetpad_transform(1.25, SIZE)


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


def _edit_json(path: Path, fn: Callable[[Any], Any]) -> None:
    """Rewrite a JSON file after `fn` edits its parsed content in place."""
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


class FixedRng:
    """Stands in for random.Random: returns the given draws in order."""

    def __init__(self, *draws: float):
        self.draws = list(draws)

    def random(self) -> float:
        return self.draws.pop(0)


# ---------------------------------------------------------------------------------------------------------- parsing


def test_cirr_val_records_and_quirks():
    data = load_split("CIRR", CIRR, "val")
    split_keys = list(json.loads((CIRR / "cirr/image_splits/split.rc2.val.json").read_text()))
    assert data.dataset == "cirr" and data.split == "val" and data.category is None and data.has_targets
    assert data.gallery == split_keys  # split-file order is the gallery ("index_names") order
    assert [q.pair_id for q in data.queries] == [100, 101, 105]
    assert [q.index for q in data.queries] == [0, 1, 2]
    q0, q1, q2 = data.queries
    # members in file order; reference_rank (4) is not the reference's position (2) and is ignored.
    assert q0.members == (
        "dev-3-1-img0", "dev-2-0-img1", "dev-1-0-img0", "dev-4-0-img0", "dev-2-0-img0", "dev-1-0-img1"
    )
    assert q0.reference == "dev-1-0-img0" and q0.target == "dev-2-0-img1"
    # target_soft scores the reference, not target_hard: target_hard is still the ground truth.
    assert q1.target == "dev-1-0-img1"
    assert q1.captions == ("Make it  night time",)  # raw, double space kept
    assert q2.captions == ("Ingl\u00eas  Copiar a larger number of animals",)
    assert query_text(q1, "cirr", "val") == "Make it  night time"
    assert data.image_path("dev-4-0-img1") == CIRR / "dev" / "dev-4-0-img1.png"
    assert data.gallery_index["dev-2-0-img0"] == 2


def test_cirr_test1_has_no_targets_and_keeps_duplicates_and_blank_caption():
    data = load_split("cirr", CIRR, "test1")
    assert not data.has_targets
    assert [q.pair_id for q in data.queries] == [200, 201, 204]
    assert all(q.target is None for q in data.queries)
    # 200 and 201 are the same (reference, caption): both stay, a submission must answer each pairid.
    first, second = data.queries[0], data.queries[1]
    assert (first.reference, first.captions) == (second.reference, second.captions)
    blank = data.queries[2]
    assert blank.captions == (" ",) and query_text(blank, "cirr", "test1") == " "
    assert len(blank.members) == 6 and blank.reference in blank.members


def test_cirr_train_paths_in_numbered_subfolders():
    data = load_split("cirr", CIRR, "train")
    assert data.image_path("train-11-3-img0") == CIRR / "train" / "3" / "train-11-3-img0.png"
    ds = TripletDataset(data, TF, seed=0)
    item = ds[0]
    assert item["reference"] == "train-10-0-img0" and item["target"] == "train-11-3-img1"
    assert item["text"] == "Replace the cat with two puppies"
    assert item["reference_image"].shape == (3, SIZE, SIZE) and item["target_image"].dtype == torch.float32
    expected = TF(load_image(CIRR / "train" / "12" / "train-10-0-img0.png"))
    assert torch.equal(item["reference_image"], expected)


def test_fiq_val_per_category():
    counts = {}
    for cat in ("dress", "shirt", "toptee"):
        data = load_split("fashionIQ", FIQ, "val", cat)
        assert data.category == cat and data.dataset == "fashioniq"
        assert data.gallery == json.loads((FIQ / f"image_splits/split.{cat}.val.json").read_text())
        for q in data.queries:
            assert q.pair_id is None and q.members is None and q.category == cat and len(q.captions) == 2
            assert q.target in data.gallery_index and q.reference in data.gallery_index
        counts[cat] = (len(data.queries), len(data.gallery))
    assert counts == {"dress": (2, 4), "shirt": (2, 4), "toptee": (1, 3)}
    shirt = load_split("fashioniq", FIQ, "val", "shirt")
    assert shirt.queries[0].captions == ("", "is grey with long sleeves")  # empty caption kept as written
    assert shirt.image_path("978981366X") == FIQ / "images" / "978981366X.jpg"


def test_fiq_joint_train_order_and_shared_gallery_names():
    data = load_split("fashioniq", FIQ, "train", None)
    assert data.category is None
    # original training order dress, toptee, shirt; index is the row within each category's caption file
    assert [(q.category, q.index) for q in data.queries] == [
        ("dress", 0), ("dress", 1), ("toptee", 0), ("toptee", 1), ("shirt", 0), ("shirt", 1)
    ]
    # B000SHARE1 is in both the toptee and shirt train galleries; the joint gallery lists it once.
    assert data.gallery.count("B000SHARE1") == 1 and len(data.gallery) == 5 + 4 + 4 - 1
    assert len(set(data.gallery)) == len(data.gallery)


def test_fiq_test_no_targets_duplicates_kept():
    data = load_split("fashioniq", FIQ, "test", "shirt")
    assert len(data.queries) == 3 and all(q.target is None for q in data.queries)
    assert {q.captions for q in data.queries} == {("is darker", "is darker")}
    with pytest.raises(DatasetError, match="no targets"):
        TripletDataset(data, TF, seed=0)


def test_gallery_only_mode_needs_no_caption_file(tmp_path):
    root = _copy(CIRR, tmp_path)
    (root / "cirr/captions/cap.rc2.train.json").unlink()
    data = load_split("cirr", root, "train", with_queries=False)
    assert data.queries == [] and len(data.gallery) == 6
    with pytest.raises(DatasetError, match="cap.rc2.train.json"):
        load_split("cirr", root, "train")


def test_root_from_environment(monkeypatch):
    monkeypatch.setenv("CIR_DATA", str(FIQ))
    data = load_split("fashioniq", None, "val", "dress")
    assert data.root == FIQ and len(data.queries) == 2


# ------------------------------------------------------------------------------------------------------------ text


def test_fiq_validation_join():
    dress = load_split("fashioniq", FIQ, "val", "dress")
    assert query_text(dress.queries[0], "fashioniq", "val") == "Is shorter and blue and has a floral print"
    assert query_text(dress.queries[1], "fashioniq", "val") == "Is darker and is darker"
    shirt = load_split("fashioniq", FIQ, "val", "shirt")
    # empty first caption: the original rule gives a leading " and ...", kept so val queries match the original
    assert query_text(shirt.queries[0], "fashioniq", "val") == " and is grey with long sleeves"
    test = load_split("fashioniq", FIQ, "test", "dress")
    assert query_text(test.queries[2], "fashioniq", "test") == "Is  longer and more casual"


@pytest.mark.parametrize(
    ("u", "expected"),
    [
        (0.0, "Is longer and red and flowy"),
        (0.1, "Is longer and red and flowy"),
        (0.3, "Red and flowy and Is longer"),
        (0.6, "Is longer"),
        (0.9, "Red and flowy"),
        (0.25, "Red and flowy"),  # exact boundaries fall through to the last case, as in the original
        (0.5, "Red and flowy"),
        (0.75, "Red and flowy"),
    ],
)
def test_fiq_training_join_rules(u, expected):
    q = load_split("fashioniq", FIQ, "train", "dress").queries[1]  # captions "Is longer." and " red and flowy "
    assert query_text(q, "fashioniq", "train", FixedRng(u)) == expected


def test_fiq_training_text_needs_rng():
    q = load_split("fashioniq", FIQ, "train", "dress").queries[0]
    with pytest.raises(ValueError, match="random.Random"):
        query_text(q, "fashioniq", "train", None)
    with pytest.raises(ValueError, match="2 captions"):
        fiq_caption_join(["only one"])


def test_triplet_text_is_seeded_order_free_and_varies_by_epoch():
    data = load_split("fashioniq", FIQ, "train", None)
    a, b = TripletDataset(data, TF, seed=3), TripletDataset(data, TF, seed=3)
    forward = [a.text(i) for i in range(len(a))]
    backward = [b.text(i) for i in reversed(range(len(b)))][::-1]
    assert forward == backward  # independent of visiting order (and so of worker count)
    seen = set()
    for epoch in range(40):
        a.set_epoch(epoch)
        seen.add(a.text(0))
    # all four joins of dress train record 0 appear across epochs
    assert seen == {
        "Is solid black with no sleeves and is black with straps",
        "Is black with straps and is solid black with no sleeves",
        "Is solid black with no sleeves",
        "Is black with straps",
    }
    per_seed = {tuple(TripletDataset(data, TF, seed=s).text(i) for i in range(len(a))) for s in range(5)}
    assert len(per_seed) > 1  # the seed matters


# --------------------------------------------------------------------------------------------------------- datasets


def test_gallery_dataset_items_and_loader():
    data = load_split("fashioniq", FIQ, "val", "toptee")
    ds = GalleryDataset(data, TF)
    assert len(ds) == 3
    batch = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate)))
    assert batch["name"] == data.gallery and batch["image"].shape == (3, 3, SIZE, SIZE)
    assert torch.equal(batch["image"][1], TF(load_image(FIQ / "images" / "B000TOPTV2.jpg")))


def test_query_dataset_and_collate():
    cirr = load_split("cirr", CIRR, "val")
    batch = next(iter(DataLoader(QueryDataset(cirr), batch_size=3, collate_fn=collate)))
    assert batch["pair_id"] == [100, 101, 105] and batch["index"] == [0, 1, 2]
    assert batch["members"][0] == list(cirr.queries[0].members)  # one list of 6 names per query, not transposed
    assert batch["text"][1] == "Make it  night time"
    fiq = load_split("fashioniq", FIQ, "train", "toptee")
    items = [QueryDataset(fiq)[i] for i in range(2)]
    # QueryDataset always uses the fixed join, also on train; empty second caption -> "Is green and "
    assert [it["text"] for it in items] == ["Is ombr\u00e9 blue with a flare bottom and is sleeveless", "Is green and "]
    out = collate(items)
    assert out["pair_id"] == [None, None] and out["members"] == [None, None] and out["target"][1] == "B000TOPTE3"
    test = collate([QueryDataset(load_split("cirr", CIRR, "test1"))[0]])
    assert test["target"] == [None] and test["pair_id"] == [200]


def test_fiq_png_images_accepted(tmp_path):
    root = _copy(FIQ, tmp_path)
    jpg = root / "images" / "B000DRESV1.jpg"
    load_image(jpg).save(jpg.with_suffix(".png"))
    jpg.unlink()
    data = load_split("fashioniq", root, "val", "dress")
    assert data.image_path("B000DRESV1") == root / "images" / "B000DRESV1.png"
    assert TripletDataset(data, TF, seed=0)[0]["reference_image"].shape == (3, SIZE, SIZE)


def test_split_reads_without_images_and_absent_image_is_an_error(tmp_path):
    root = tmp_path / "cirr_dataset"
    shutil.copytree(CIRR / "cirr", root / "cirr")  # annotations only, no image folders
    data = load_split("cirr", root, "val")
    assert len(data.queries) == 3
    assert data.missing_images() == data.gallery
    with pytest.raises(DatasetError, match=r"image file not found: .*dev-1-0-img0\.png.*reference of query 0"):
        TripletDataset(data, TF, seed=0)[0]
    with pytest.raises(DatasetError, match="not in the cirr val gallery"):
        data.image_path("test1-1-0-img0")


def test_corrupt_image_names_the_file(tmp_path):
    root = _copy(FIQ, tmp_path)
    bad = root / "images" / "B000TOPTV2.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    ds = GalleryDataset(load_split("fashioniq", root, "val", "toptee"), TF)
    assert ds[0]["image"].shape == (3, SIZE, SIZE)
    with pytest.raises(DatasetError, match=r"cannot read image .*B000TOPTV2\.jpg"):
        ds[1]


# ----------------------------------------------------------------------------------------------------------- errors


def test_missing_root_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match=r"(?s)does not exist.*expected CIRR layout.*cirr/captions"):
        load_split("cirr", tmp_path / "nowhere", "val")


def test_no_root_and_no_environment(monkeypatch):
    monkeypatch.delenv("CIR_DATA", raising=False)
    with pytest.raises(DatasetError, match="CIR_DATA"):
        load_split("fashioniq", None, "val", "dress")


def test_parent_folder_given_as_root(tmp_path):
    shutil.copytree(CIRR / "cirr", tmp_path / "cirr_dataset" / "cirr")
    with pytest.raises(DatasetError, match=r"pass root=.*cirr_dataset"):
        load_split("cirr", tmp_path, "val")


def test_missing_cirr_caption_file_explains_layout(tmp_path):
    root = _copy(CIRR, tmp_path)
    (root / "cirr/captions/cap.rc2.val.json").unlink()
    with pytest.raises(DatasetError) as e:
        load_split("cirr", root, "val")
    msg = str(e.value)
    assert str(root / "cirr/captions/cap.rc2.val.json") in msg
    assert "img_raw" in msg and "train/<n>/" in msg and "`cirr_dataset` branch" in msg


def test_missing_fiq_split_file(tmp_path):
    root = _copy(FIQ, tmp_path)
    (root / "image_splits/split.shirt.val.json").unlink()
    with pytest.raises(DatasetError, match=r"missing FashionIQ image-split file .*split\.shirt\.val\.json"):
        load_split("fashioniq", root, "val", "shirt")


@pytest.mark.parametrize(
    ("dataset", "split", "category", "pattern"),
    [
        ("cirr", "test", None, "unknown CIRR split 'test'"),
        ("fashioniq", "test1", "dress", "unknown FashionIQ split 'test1'"),
        ("fashioniq", "val", "shoes", "unknown FashionIQ category 'shoes'"),
        ("cirr", "val", "dress", "CIRR has no categories"),
        ("coco", "val", None, "unknown dataset 'coco'"),
    ],
)
def test_unknown_names(dataset, split, category, pattern):
    root = CIRR if dataset == "cirr" else FIQ
    with pytest.raises(DatasetError, match=pattern):
        load_split(dataset, root, split, category)


def test_invalid_json(tmp_path):
    root = _copy(FIQ, tmp_path)
    path = root / "captions/cap.dress.val.json"
    path.write_text(path.read_text()[:-5])
    with pytest.raises(DatasetError, match=r"cap\.dress\.val\.json: not valid JSON .*line"):
        load_split("fashioniq", root, "val", "dress")


@pytest.mark.parametrize(
    ("rel", "new", "pattern"),
    [
        ("cirr/captions/cap.rc2.val.json", {"0": 1}, r"cap\.rc2\.val\.json: top-level JSON is a dict, expected a list"),
        ("cirr/image_splits/split.rc2.val.json", ["dev-1-0-img0"], r"top-level JSON is a list, expected a dict"),
    ],
)
def test_wrong_json_type(tmp_path, rel, new, pattern):
    root = _copy(CIRR, tmp_path)
    (root / rel).write_text(json.dumps(new))
    with pytest.raises(DatasetError, match=pattern):
        load_split("cirr", root, "val")


def _drop(records, i, key):
    del records[i][key]


CIRR_RECORD_CASES = [
    # (split, edit of the caption records, expected message pieces)
    ("val", lambda r: _drop(r, 1, "caption"), ["record 1 (pairid 101)", "missing field 'caption'"]),
    ("val", lambda r: _drop(r, 2, "target_hard"), ["record 2 (pairid 105)", "missing field 'target_hard'"]),
    ("val", lambda r: r[0]["img_set"]["members"].pop(), ["record 0 (pairid 100)", "img_set.members", "list of 6"]),
    ("test1", lambda r: r[1]["img_set"].pop("members"), ["record 1 (pairid 201)", "no field 'members'"]),
    ("val", lambda r: r[0].update(reference="dev-99-0-img0"),
     ["pairid 100", "reference 'dev-99-0-img0' is not in the gallery", "split.rc2.val.json"]),
    ("val", lambda r: r[1].update(target_hard="train-10-0-img0"),
     ["pairid 101", "target_hard 'train-10-0-img0' is not in the gallery"]),
    ("val", lambda r: r[2].update(pairid=101), ["record 2", "pairid 101 already used by record 1"]),
    ("val", lambda r: r[0].update(pairid="100"), ["record 0", "field 'pairid' is str", "expected int"]),
    ("val", lambda r: r[0].update(target_hard="dev-4-0-img1"), ["pairid 100", "not among img_set.members"]),
    ("test1", lambda r: r.append(["not", "a", "record"]), ["record 3: is a list, expected an object"]),
]


@pytest.mark.parametrize(("split", "edit", "pieces"), CIRR_RECORD_CASES)
def test_bad_cirr_records(tmp_path, split, edit, pieces):
    root = _copy(CIRR, tmp_path)
    cap = root / f"cirr/captions/cap.rc2.{split}.json"
    _edit_json(cap, edit)
    with pytest.raises(DatasetError) as e:
        load_split("cirr", root, split)
    msg = str(e.value)
    assert str(cap) in msg
    for piece in pieces:
        assert piece in msg, msg


FIQ_RECORD_CASES = [
    ("val", lambda r: _drop(r, 0, "target"), ["record 0 (candidate 'B000DRESV1')", "missing field 'target'"]),
    ("val", lambda r: r[1].update(captions=["is darker"]), ["record 1", "expected a list of 2 strings"]),
    ("val", lambda r: r[1].update(captions=["is darker", None]), ["record 1", "expected a list of 2 strings"]),
    ("train", lambda r: r[0].update(target="B000DRESV2"),
     ["record 0", "target 'B000DRESV2' is not in the gallery", "split.dress.train.json"]),
    ("test", lambda r: _drop(r, 2, "candidate"), ["record 2", "missing field 'candidate'"]),
]


@pytest.mark.parametrize(("split", "edit", "pieces"), FIQ_RECORD_CASES)
def test_bad_fiq_records(tmp_path, split, edit, pieces):
    root = _copy(FIQ, tmp_path)
    cap = root / f"captions/cap.dress.{split}.json"
    _edit_json(cap, edit)
    with pytest.raises(DatasetError) as e:
        load_split("fashioniq", root, split, "dress")
    msg = str(e.value)
    assert str(cap) in msg
    for piece in pieces:
        assert piece in msg, msg


def test_duplicate_fiq_gallery_name(tmp_path):
    root = _copy(FIQ, tmp_path)
    _edit_json(root / "image_splits/split.toptee.val.json", lambda names: names.append("B000TOPTV1"))
    with pytest.raises(DatasetError, match=r"split\.toptee\.val\.json: image 'B000TOPTV1' \(entry 3\) is listed twice"):
        load_split("fashioniq", root, "val", "toptee")


@pytest.mark.parametrize("bad", ["../x", "a/B000TOPTV9", "", 5])
def test_bad_fiq_gallery_names(tmp_path, bad):
    root = _copy(FIQ, tmp_path)
    _edit_json(root / "image_splits/split.toptee.val.json", lambda names: names.append(bad))
    with pytest.raises(DatasetError, match=r"split\.toptee\.val\.json: entry 3 .*expected an image name \(no path\)"):
        load_split("fashioniq", root, "val", "toptee")


def test_gallery_only_split_has_no_triplets():
    data = load_split("cirr", CIRR, "val", with_queries=False)
    with pytest.raises(DatasetError, match="has no queries"):
        TripletDataset(data, TF, seed=0)


@pytest.mark.parametrize("bad", ["../outside/dev-1-0-img0.png", "/abs/dev-1-0-img0.png", 7])
def test_bad_cirr_split_paths(tmp_path, bad):
    root = _copy(CIRR, tmp_path)
    _edit_json(root / "cirr/image_splits/split.rc2.val.json", lambda d: d.update({"dev-1-0-img0": bad}))
    with pytest.raises(DatasetError, match=r"split\.rc2\.val\.json: entry 'dev-1-0-img0'"):
        load_split("cirr", root, "val")


def test_duplicate_name_in_a_cirr_split_file_is_refused(tmp_path):
    """Reuse case: a JSON object naming an image twice used to be read with the last path winning."""
    root = _copy(CIRR, tmp_path)
    split = root / "cirr" / "image_splits" / "split.rc2.val.json"
    names = json.loads(split.read_text())
    first = next(iter(names))
    # hand-written: the first image named a second time, with another path
    text = split.read_text().rstrip()
    assert text.endswith("}")
    split.write_text(text[:-1] + f', "{first}": "./dev/elsewhere.png"}}')
    with pytest.raises(DatasetError, match=rf"split\.rc2\.val\.json: the key '{first}' appears twice"):
        load_split("cirr", root, "val")


def test_duplicate_key_in_a_caption_record_is_refused(tmp_path):
    root = _copy(CIRR, tmp_path)
    cap = root / "cirr" / "captions" / "cap.rc2.val.json"
    text = cap.read_text()
    assert text.count('"caption":') >= 1
    cap.write_text(text.replace('"caption":', '"caption": "first", "caption":', 1))
    with pytest.raises(DatasetError, match=r"cap\.rc2\.val\.json: the key 'caption' appears twice"):
        load_split("cirr", root, "val")


def test_cirr_images_in_the_official_img_raw_layout_are_found(tmp_path, capfd):
    from cirlib.data import synth

    root = synth.generate(synth.SynthConfig(layout="cirr", n_train=6, n_val=3, n_test=3, seed=2), root=tmp_path / "c")
    moved = load_split("cirr", root, "val")
    expect = {n: moved.image_path(n).read_bytes() for n in moved.gallery[:3]}
    (root / "img_raw").mkdir()
    for folder in ("train", "dev", "test1"):
        (root / folder).rename(root / "img_raw" / folder)
    capfd.readouterr()
    for split in ("val", "test1", "train"):
        sd = load_split("cirr", root, split)
        assert sd.image_path(sd.gallery[0]).is_file()
        assert "img_raw" in sd.image_path(sd.gallery[0]).parts
    said = capfd.readouterr().err
    assert said.count("official download's layout") == 1  # said once, not per split or image
    val = load_split("cirr", root, "val")
    assert {n: val.image_path(n).read_bytes() for n in expect} == expect
    # the moved layout keeps working: the root's own folder wins when it exists
    (root / "img_raw" / "dev").rename(root / "dev")
    assert "img_raw" not in load_split("cirr", root, "val").image_path(val.gallery[0]).parts
