"""The readers on the real CIRR / FashionIQ annotation files (shared/data/real-annotations, no images).

The files are laid out (symlinked) in tmp_path exactly as the real dataset roots; counts are the README's.
Stand-in images are written only where a test opens one.
"""
from __future__ import annotations

import json
from pathlib import Path

import PIL.Image
import pytest
import torch

from cirlib.data import (
    FIQ_SPLITS,
    DatasetError,
    GalleryDataset,
    QueryDataset,
    SplitData,
    TripletDataset,
    load_image,
    load_split,
    query_text,
    targetpad_transform,
)

SIZE = 16
TF = targetpad_transform(1.25, SIZE)

FIQ_COUNTS = {  # category: (queries, gallery) per split, from the annotation README
    "dress": {"train": (5985, 11452), "val": (2017, 3817), "test": (2024, 3818)},
    "shirt": {"train": (5988, 19036), "val": (2038, 6346), "test": (2038, 6346)},
    "toptee": {"train": (6027, 16121), "val": (1961, 5373), "test": (2056, 5374)},
}
FIQ_DISTINCT_CANDIDATES = {"dress": (3874, 1331, 1356), "shirt": (4408, 1541, 1496), "toptee": (4328, 1454, 1509)}


def _assemble(base: Path, real: Path) -> tuple[Path, Path]:
    """Lay the real annotation folders out as a cirr_dataset and a fashionIQ_dataset root (symlinks, no images)."""
    cirr = base / "cirr_dataset"
    (cirr / "cirr").mkdir(parents=True)
    for sub in ("captions", "image_splits"):
        (cirr / "cirr" / sub).symlink_to(real / "cirr" / sub, target_is_directory=True)
    fiq = base / "fashionIQ_dataset"
    fiq.mkdir()
    for sub in ("captions", "image_splits"):
        (fiq / sub).symlink_to(real / "fashioniq" / sub, target_is_directory=True)
    return cirr, fiq


@pytest.fixture(scope="module")
def roots(real: Path, tmp_path_factory) -> tuple[Path, Path]:
    return _assemble(tmp_path_factory.mktemp("real"), real)


@pytest.fixture(scope="module")
def cirr(roots) -> dict[str, SplitData]:
    root = roots[0]
    return {
        "val": load_split("cirr", root, "val"),
        "test1": load_split("cirr", root, "test1"),
        "train": load_split("cirr", root, "train", with_queries=False),
    }


@pytest.fixture(scope="module")
def fiq(roots) -> dict[tuple[str, str], SplitData]:
    return {(cat, split): load_split("fashioniq", roots[1], split, cat) for cat in FIQ_COUNTS for split in FIQ_SPLITS}


def _raw(real: Path, rel: str):
    return json.loads((real / rel).read_text(encoding="utf-8"))


def test_every_file_is_read(real, cirr, fiq):
    # the CIRR and FashionIQ files; CIRCO (circo/, a later addition to the shared folder) has readers of its own
    files = sorted(p.relative_to(real).as_posix() for sub in ("cirr", "fashioniq") for p in (real / sub).rglob("*.json"))
    assert len(files) == 28
    read_by_loader = {f"cirr/captions/cap.rc2.{s}.json" for s in ("val", "test1")}
    read_by_loader |= {f"cirr/image_splits/split.rc2.{s}.json" for s in ("train", "val", "test1")}
    read_by_loader |= {
        f"fashioniq/{kind}/{pre}.{c}.{s}.json"
        for kind, pre in (("captions", "cap"), ("image_splits", "split"))
        for c in FIQ_COUNTS
        for s in FIQ_SPLITS
    }
    cross_checked = {  # read below and compared with what the loader returned
        "cirr/captions_ext/cap.ext.rc2.val.json", "cirr/captions_ext/cap.ext.rc2.test1.json",
        "cirr/demo_files/test1_pred_ranks_recall.json", "cirr/demo_files/test1_pred_ranks_recall_subset.json",
        "cirr/demo_files_deleted_upstream/test.rand.v0.json",
    }
    assert set(files) == read_by_loader | cross_checked


def test_cirr_counts(cirr):
    val, test1, train = cirr["val"], cirr["test1"], cirr["train"]
    assert (len(val.queries), len(val.gallery)) == (4181, 2297)
    assert (len(test1.queries), len(test1.gallery)) == (4148, 2315)
    assert len(train.gallery) == 16939 and train.queries == []
    assert len({q.reference for q in val.queries}) == 2165 and len({q.target for q in val.queries}) == 2206
    assert len({q.reference for q in test1.queries}) == 2178
    assert not (set(val.gallery) & set(test1.gallery)) and not (set(val.gallery) & set(train.gallery))
    val_ids = [q.pair_id for q in val.queries]
    test_ids = [q.pair_id for q in test1.queries]
    assert val_ids == sorted(val_ids) and (val_ids[0], val_ids[-1]) == (12060, 38762)
    assert test_ids == sorted(test_ids) and (test_ids[0], test_ids[-1]) == (12063, 39059)
    assert val.has_targets and not test1.has_targets and all(q.target is None for q in test1.queries)


def test_cirr_members_and_soft_target_anomalies(real, cirr):
    val = cirr["val"]
    for q in val.queries:
        assert len(q.members) == 6 and q.reference in q.members and q.target in q.members
    raw = _raw(real, "cirr/captions/cap.rc2.val.json")
    anomalous = [r["pairid"] for r in raw if r["target_hard"] not in r["target_soft"]]
    assert len(anomalous) == 37 and anomalous[0] == 12130
    by_id = {q.pair_id: q for q in val.queries}
    # target_soft is ignored: the ground truth stays target_hard even where target_soft scores the reference
    for rec in raw:
        if rec["pairid"] in anomalous:
            assert by_id[rec["pairid"]].target == rec["target_hard"]
    # reference_rank is not a position in members (matches the list index in only 696 records), so it is ignored
    assert sum(r["img_set"]["members"].index(r["reference"]) == r["img_set"]["reference_rank"] for r in raw) == 696
    assert [by_id[r["pairid"]].members for r in raw[:5]] == [tuple(r["img_set"]["members"]) for r in raw[:5]]


def test_cirr_test1_quirks(cirr):
    by_id = {q.pair_id: q for q in cirr["test1"].queries}
    assert by_id[27098].captions == (" ",) and query_text(by_id[27098], "cirr", "test1") == " "
    for a, b in [(12178, 12179), (27177, 27178), (27639, 27641), (37914, 37946)]:
        assert (by_id[a].reference, by_id[a].captions) == (by_id[b].reference, by_id[b].captions)
    assert all(len(q.members) == 6 and q.reference in q.members for q in by_id.values())


def test_cirr_image_paths_follow_the_layout(cirr, roots):
    root = roots[0]
    for name in cirr["train"].gallery:
        path = cirr["train"].image_path(name)
        rel = path.relative_to(root)
        assert rel.parts[0] == "train" and 0 <= int(rel.parts[1]) <= 99 and rel.name == f"{name}.png"
    assert cirr["val"].image_path("dev-244-0-img0") == root / "dev" / "dev-244-0-img0.png"
    assert all(cirr["test1"].image_path(n).parent == root / "test1" for n in cirr["test1"].gallery)


def test_cirr_train_captions_are_not_in_the_real_folder(roots):
    with pytest.raises(DatasetError) as e:
        load_split("cirr", roots[0], "train")
    assert "cap.rc2.train.json" in str(e.value) and "`cirr_dataset` branch" in str(e.value)


def test_cirr_extended_captions_align(real, cirr):
    for split in ("val", "test1"):
        ext = _raw(real, f"cirr/captions_ext/cap.ext.rc2.{split}.json")
        queries = cirr[split].queries
        assert [r["pairid"] for r in ext] == [q.pair_id for q in queries]
        assert [r["reference"] for r in ext] == [q.reference for q in queries]
        if split == "val":
            assert [r["target_hard"] for r in ext] == [q.target for q in queries]


@pytest.mark.parametrize(
    ("rel", "length", "subset"),
    [
        ("cirr/demo_files/test1_pred_ranks_recall.json", 50, False),
        ("cirr/demo_files/test1_pred_ranks_recall_subset.json", 3, True),
        ("cirr/demo_files_deleted_upstream/test.rand.v0.json", 50, False),
    ],
)
def test_demo_submissions_cover_the_test1_queries(real, cirr, rel, length, subset):
    demo = _raw(real, rel)
    preds = {k: v for k, v in demo.items() if k not in ("version", "metric")}
    test1 = cirr["test1"]
    assert list(preds) == [str(q.pair_id) for q in test1.queries]  # one key per pairid, file order
    for q in test1.queries:
        names = preds[str(q.pair_id)]
        assert len(names) == length and all(n in test1.gallery_index for n in names)
        if subset:
            assert set(names) <= set(q.members) - {q.reference}


def test_fiq_counts(fiq, roots):
    for cat, splits in FIQ_COUNTS.items():
        for split, (n_queries, n_gallery) in splits.items():
            data = fiq[(cat, split)]
            assert (len(data.queries), len(data.gallery)) == (n_queries, n_gallery), (cat, split)
            assert all(q.category == cat and len(q.captions) == 2 for q in data.queries)
            assert all((q.target is None) == (split == "test") for q in data.queries)
        distinct = tuple(len({q.reference for q in fiq[(cat, s)].queries}) for s in ("train", "val", "test"))
        assert distinct == FIQ_DISTINCT_CANDIDATES[cat]
        # every val record has a different target
        assert len({q.target for q in fiq[(cat, "val")].queries}) == FIQ_COUNTS[cat]["val"][0]
    joint = load_split("fashioniq", roots[1], "train")
    assert len(joint.queries) == 5985 + 6027 + 5988 == 18000
    assert len(joint.gallery) == 11452 + 19036 + 16121 - 1180  # shirt and toptee share 1,180 train names
    # the original's training order: dress, then toptee, then shirt
    assert [joint.queries[i].category for i in (0, 5984, 5985, 12011, 12012, 17999)] == [
        "dress", "dress", "toptee", "toptee", "shirt", "shirt"
    ]


def test_fiq_quirks(fiq):
    shirt_val = fiq[("shirt", "val")].queries[1928]
    assert shirt_val.reference == "B005PQ02G6" and "" in shirt_val.captions
    text = query_text(shirt_val, "fashioniq", "val")
    assert text.startswith(" and ") or text.endswith(" and ")  # the original's join of an empty caption
    empties = [q.index for q in fiq[("toptee", "train")].queries if "" in q.captions]
    assert len(empties) == 12 and {698, 939, 944, 3999} <= set(empties)
    darker = [
        q for q in fiq[("shirt", "test")].queries
        if q.reference == "B00EET4RV6" and q.captions == ("is darker", "is darker")
    ]
    assert len(darker) == 3  # exact duplicate records are kept as separate queries
    assert sum(not n.startswith("B0") for n in fiq[("shirt", "val")].gallery) == 4


def test_real_layout_through_the_datasets(real, tmp_path):
    """Items of the real splits reach tensors once stand-in images exist; an absent image is an error."""
    cirr_root, fiq_root = _assemble(tmp_path, real)
    val = load_split("cirr", cirr_root, "val")
    q = val.queries[0]
    assert (q.pair_id, q.reference, q.target) == (12060, "dev-244-0-img0", "dev-1028-1-img1")
    for k, name in enumerate((q.reference, q.target)):
        path = val.image_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.new("RGB", (30 + 20 * k, 18), (40 * k, 90, 200)).save(path)
    item = TripletDataset(val, TF, seed=0)[0]
    assert item["text"] == "show three bottles of soft drink"
    assert torch.equal(item["target_image"], TF(load_image(cirr_root / "dev" / "dev-1028-1-img1.png")))
    gallery = GalleryDataset(val, TF)
    assert gallery[val.gallery_index[q.reference]]["image"].shape == (3, SIZE, SIZE)
    absent = val.queries[1].reference
    with pytest.raises(DatasetError, match=rf"image file not found: .*{absent}\.png"):
        gallery[val.gallery_index[absent]]

    dress = load_split("fashioniq", fiq_root, "val", "dress")
    fq = dress.queries[0]
    (fiq_root / "images").mkdir()
    for name in (fq.reference, fq.target):
        PIL.Image.new("RGB", (20, 33), (200, 10, 10)).save(fiq_root / "images" / f"{name}.jpg")
    fitem = TripletDataset(dress, TF, seed=0)[0]
    assert fitem["reference_image"].shape == (3, SIZE, SIZE)
    c1, c2 = (c.strip(".?, ") for c in fq.captions)
    assert fitem["text"] == QueryDataset(dress)[0]["text"] == f"{c1.capitalize()} and {c2}"
    with pytest.raises(DatasetError, match=r"image file not found: .*images/.*\.jpg"):
        TripletDataset(dress, TF, seed=0)[1]
