"""TopK: the original's file layout in both directions, our round trip, and every validation error."""
from __future__ import annotations

import dataclasses
import io
import zipfile

import numpy as np
import pytest
import torch

from cirlib.retrieval.topk import TopK, TopKError, read_topk_dict

ORIGINAL_FIQ_KEYS = {"sorted_index_names", "target_names", "index_names", "labels", "split", "dress_types"}
ORIGINAL_CIRR_KEYS = {"sorted_index_names", "target_names", "index_names", "labels", "group_labels", "split"}

# a 12-image FashionIQ-style gallery (10-character ASIN-like names, as the real `<U10` arrays)
GALLERY = [f"B00000{i:04d}" for i in range(12)]


def _original_fiq_dict(k: int = 5) -> dict:
    """A top-K dict built exactly the way the original's validate.py saved it (section 4.2)."""
    rng = np.random.default_rng(0)
    n, g = 4, len(GALLERY)
    scores = rng.standard_normal((n, g))
    order = np.argsort(-scores, axis=1)
    sorted_full = np.array(GALLERY)[order]  # (N, G) numpy <U10, the reference is NOT removed for FashionIQ
    assert sorted_full.dtype == np.dtype("<U10")
    # targets: at ranks 0, 3, 7 (outside the top-5) and 1
    # python str, as the original collected them from the caption JSON
    target_names = [str(sorted_full[0, 0]), str(sorted_full[1, 3]), str(sorted_full[2, 7]), str(sorted_full[3, 1])]
    labels_full = torch.tensor(sorted_full == np.array(target_names)[:, None])  # (N, G)
    return {
        "sorted_index_names": sorted_full[:, :k],
        "target_names": target_names,
        "index_names": list(GALLERY),
        "labels": labels_full[:, :k],  # a VIEW: the whole N x G storage goes into the file, as in the original
        "split": "val",
        "dress_types": "dress",
    }


def _original_cirr_dict() -> dict:
    gallery = [f"dev-{i}-0-img0" for i in range(10)]
    sorted_names = np.array(
        [
            ["dev-1-0-img0", "dev-2-0-img0", "dev-3-0-img0", "dev-4-0-img0"],  # reference dev-0 removed
            ["dev-5-0-img0", "dev-0-0-img0", "dev-9-0-img0", "dev-8-0-img0"],  # target outside the top-4
        ]
    )
    assert sorted_names.dtype == np.dtype("<U12")
    targets = ["dev-3-0-img0", "dev-7-0-img0"]
    labels_full = torch.zeros(2, 9, dtype=torch.bool)  # (N, G - 1): the reference is removed
    labels_full[0, 2] = True
    labels_full[1, 6] = True
    return {
        "sorted_index_names": sorted_names,
        "target_names": targets,
        "index_names": gallery,
        "labels": labels_full[:, :4],
        "group_labels": torch.tensor([[False, False, True, False, False], [True, False, False, False, False]]),
        "split": "val",
    }


def test_reads_a_hand_written_original_fiq_file(tmp_path):
    path = tmp_path / "fiq_top_5_val_dress.pt"
    torch.save(_original_fiq_dict(), path)
    raw = read_topk_dict(path)
    assert raw["labels"].untyped_storage().nbytes() == 4 * 12  # the original's bloated view storage

    topk = TopK.load(path, dataset="fashioniq", split="val", category="dress", index_names=GALLERY)
    assert (topk.dataset, topk.split, topk.category, topk.k, topk.num_queries) == ("fashioniq", "val", "dress", 5, 4)
    assert topk.reference_removed is False and topk.scores is None and topk.stage1_run is None
    assert topk.labels.tolist() == raw["labels"].tolist()
    assert topk.labels.sum(axis=1).tolist() == [1, 1, 0, 1]
    assert topk.labels[1, 3] and topk.labels[3, 1]
    assert [GALLERY[i] for i in topk.candidate_index[0]] == list(raw["sorted_index_names"][0])

    three = TopK.load(path, k=3)
    assert three.k == 3 and three.labels.sum(axis=1).tolist() == [1, 0, 0, 1]


def test_reads_a_hand_written_original_cirr_file(tmp_path):
    path = tmp_path / "cirr_top_4_val.pt"
    torch.save(_original_cirr_dict(), path)
    topk = TopK.load(path, dataset="cirr", split="val")
    assert topk.category is None and topk.reference_removed is True
    assert topk.group_labels.tolist()[1] == [True, False, False, False, False]
    assert topk.labels.sum(axis=1).tolist() == [1, 0]


def test_reads_a_file_pickled_under_numpy_1(tmp_path):
    # the original's files were written with numpy 1.x, whose pickles name numpy.core.multiarray._reconstruct
    path = tmp_path / "new.pt"
    torch.save(_original_fiq_dict(), path)
    old = tmp_path / "old.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(old, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            dst.writestr(info, data)
    topk = TopK.load(old, category="dress")
    assert topk.sorted_index_names.tolist() == _original_fiq_dict()["sorted_index_names"].tolist()


def _ours(**overrides) -> TopK:
    raw = _original_fiq_dict()
    kwargs = dict(
        dataset="fashioniq",
        split="val",
        category="dress",
        sorted_index_names=raw["sorted_index_names"],
        index_names=GALLERY,
        target_names=raw["target_names"],
        scores=np.linspace(1.0, 0.0, 20, dtype=np.float32).reshape(4, 5),
        stage1_run="stage1-demo",
    )
    kwargs.update(overrides)
    return TopK(**kwargs)


def test_round_trip_and_exact_original_layout(tmp_path):
    topk = _ours()
    assert topk.labels.tolist() == _original_fiq_dict()["labels"].tolist()  # derived from target_names
    path = topk.save(tmp_path / "sub" / "fiq_top_5_val_dress.pt")
    assert sorted(p.name for p in path.parent.iterdir()) == ["fiq_top_5_val_dress.pt"]  # no temporary left behind

    back = TopK.load(path)
    for field in dataclasses.fields(TopK):
        a, b = getattr(topk, field.name), getattr(back, field.name)
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and np.array_equal(a, b), field.name
        elif isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), field.name
        else:
            assert a == b, field.name

    raw = read_topk_dict(path)
    assert set(raw) == ORIGINAL_FIQ_KEYS | {"cirlib"}
    assert isinstance(raw["sorted_index_names"], np.ndarray) and raw["sorted_index_names"].dtype == np.dtype("<U10")
    assert isinstance(raw["target_names"], list) and isinstance(raw["index_names"], list)
    assert raw["labels"].dtype == torch.bool and raw["labels"].is_contiguous()
    assert raw["labels"].untyped_storage().nbytes() == 4 * 5  # (N, K) only, not the N x G storage
    meta = raw["cirlib"]
    assert meta["format_version"] == 1 and meta["dataset"] == "fashioniq" and meta["k"] == 5
    assert meta["stage1_run"] == "stage1-demo" and meta["reference_removed"] is False
    assert torch.equal(meta["scores"], topk.scores)
    assert isinstance(meta["cirlib_version"], str)

    # the original reading code (FashionIQDataset / CIRRDataset with load_topk, section 2.4) on our file
    K, split, dress_type = 3, "val", "dress"
    assert K <= raw["sorted_index_names"].shape[1]
    assert raw["split"] == split
    assert raw["dress_types"] == dress_type
    assert raw["index_names"] == GALLERY  # the split file's order
    assert raw["target_names"] == _original_fiq_dict()["target_names"]  # the caption file's targets
    k_sorted, k_labels = raw["sorted_index_names"][:, :K], raw["labels"][:, :K].numpy()
    assert k_sorted.shape == (4, 3) and k_labels.dtype == np.bool_


def test_cirr_round_trip_with_subset_and_test_split(tmp_path):
    raw = _original_cirr_dict()
    group_names = np.array(
        [[f"dev-{i}-0-img0" for i in (1, 2, 3, 4, 5)], [f"dev-{i}-0-img0" for i in (7, 1, 2, 3, 4)]]
    )
    val = TopK(
        "cirr", "val", None, raw["sorted_index_names"], raw["index_names"], target_names=raw["target_names"],
        group_names=group_names,
    )
    assert val.group_labels.tolist() == raw["group_labels"].tolist()
    path = val.save(tmp_path / "cirr_top_4_val.pt")
    stored = read_topk_dict(path)
    assert set(stored) == ORIGINAL_CIRR_KEYS | {"cirlib"}
    assert stored["group_labels"].tolist() == raw["group_labels"].tolist()
    back = TopK.load(path, dataset="cirr", split="val", index_names=raw["index_names"])
    assert np.array_equal(back.group_names, group_names) and back.reference_removed

    test = TopK("cirr", "test1", None, raw["sorted_index_names"], raw["index_names"], group_names=group_names)
    stored = read_topk_dict(test.save(tmp_path / "cirr_top_4_test1.pt"))
    assert set(stored) == {"sorted_index_names", "index_names", "split", "cirlib"}  # the original's test layout
    back = TopK.load(tmp_path / "cirr_top_4_test1.pt", split="test1")
    assert back.labels is None and back.target_names is None and back.group_labels is None


def test_head_sliced_and_reordered():
    topk = _ours()
    first = topk.head(2)
    assert first.num_queries == 2 and first.k == 5
    assert first.target_names == topk.target_names[:2]
    assert torch.equal(first.labels, topk.labels[:2]) and torch.equal(first.scores, topk.scores[:2])
    with pytest.raises(TopKError, match="first 5 of 4 queries"):
        topk.head(5)
    order = np.tile(np.arange(5)[::-1], (4, 1))
    rev = topk.reordered(order)
    assert rev.sorted_index_names[0, 0] == topk.sorted_index_names[0, 4]
    assert rev.labels[0].tolist() == topk.labels[0].tolist()[::-1]
    assert rev.scores[0].tolist() == topk.scores[0].tolist()[::-1]
    assert topk.sliced(2).labels.shape == (4, 2)
    with pytest.raises(TopKError, match="permute"):
        topk.reordered(np.zeros((4, 5), dtype=np.int64))
    with pytest.raises(TopKError, match="top 6 of a top-5"):
        topk.sliced(6)
    with pytest.raises(ValueError):
        topk.sorted_index_names[0, 0] = "B000000000"  # read-only: a validated artifact is not mutated in place


def test_fields_are_private_copies_of_numpy_or_torch_inputs():
    raw = _original_fiq_dict()
    labels = raw["labels"].clone()  # torch in
    scores = np.zeros((4, 5), dtype=np.float64)  # numpy in
    topk = _ours(labels=labels, scores=scores)
    assert isinstance(topk.labels, torch.Tensor) and topk.labels.dtype == torch.bool
    assert isinstance(topk.scores, torch.Tensor) and topk.scores.dtype == torch.float32
    labels[0, 0] = not bool(labels[0, 0])
    scores[0, 0] = 7.0
    assert topk.labels[0].tolist() == raw["labels"][0].tolist() and float(topk.scores[0, 0]) == 0.0


# --------------------------------------------------------------------------------------------- validation errors
@pytest.fixture()
def fiq_file(tmp_path):
    return _ours().save(tmp_path / "fiq_top_5_val_dress.pt")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "test"}, r"split is 'val', expected 'test'"),
        ({"dataset": "cirr"}, r"dataset is 'fashioniq', expected 'cirr'"),
        ({"category": "shirt"}, r"category is 'dress', expected 'shirt'"),
        ({"k": 6}, r"holds the top 5 per query, but K = 6 was requested"),
        ({"index_names": GALLERY[:3] + [GALLERY[4], GALLERY[3]] + GALLERY[5:]}, r"first at position 3"),
        ({"index_names": GALLERY + ["B000009999"]}, r"gallery has 12 names, expected 13"),
    ],
)
def test_load_rejects_what_the_caller_did_not_expect(fiq_file, kwargs, message):
    with pytest.raises(TopKError, match=message) as info:
        TopK.load(fiq_file, **kwargs)
    assert str(fiq_file) in str(info.value)


def test_load_rejects_bad_files(tmp_path):
    with pytest.raises(TopKError, match="not found"):
        TopK.load(tmp_path / "missing.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(TopKError, match="expected a dict"):
        TopK.load(tmp_path / "tensor.pt")
    torch.save({"split": "val"}, tmp_path / "partial.pt")
    with pytest.raises(TopKError, match=r"partial.pt: missing keys \['sorted_index_names', 'index_names'\]"):
        TopK.load(tmp_path / "partial.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(TopKError, match="garbage.pt: cannot be read"):
        TopK.load(tmp_path / "garbage.pt")

    # a pickle that needs a global outside the numpy string-array allow-list is refused, never executed
    buf = io.BytesIO()
    torch.save({"sorted_index_names": np.zeros((1, 1)), "split": "val", "index_names": ["a"]}, buf)
    (tmp_path / "floats.pt").write_bytes(buf.getvalue())
    with pytest.raises(TopKError, match="floats.pt: cannot be read"):
        TopK.load(tmp_path / "floats.pt")

    raw = _original_fiq_dict()
    raw["labels"] = raw["labels"].clone()
    raw["labels"][2, 0] = True  # does not mark the target
    torch.save(raw, tmp_path / "wrong_labels.pt")
    with pytest.raises(TopKError, match=r"wrong_labels.pt: labels row 2 does not mark"):
        TopK.load(tmp_path / "wrong_labels.pt")

    raw = _original_fiq_dict()
    raw["labels"] = raw["labels"][:, :4]
    torch.save(raw, tmp_path / "short_labels.pt")
    with pytest.raises(TopKError, match=r"labels has shape \(4, 4\), expected \(N, K\) = \(4, 5\)"):
        TopK.load(tmp_path / "short_labels.pt")

    raw = _original_fiq_dict()
    raw["dress_types"] = "dress,shirt"
    torch.save(raw, tmp_path / "joined.pt")
    with pytest.raises(TopKError, match="joins several categories"):
        TopK.load(tmp_path / "joined.pt")


def test_constructor_rejects_inconsistent_contents():
    raw = _original_fiq_dict()
    names = raw["sorted_index_names"]
    with pytest.raises(TopKError, match="dataset must be one of"):
        _ours(dataset="FIQ")
    with pytest.raises(TopKError, match="needs its category"):
        _ours(category=None)
    with pytest.raises(TopKError, match=r"sorted_index_names\[1, 2\] = 'nope' is not in index_names"):
        bad = names.astype("<U10").copy()
        bad[1, 2] = "nope"
        _ours(sorted_index_names=bad)
    with pytest.raises(TopKError, match="row 0 of sorted_index_names repeats a name"):
        bad = names.copy()
        bad[0, 1] = bad[0, 0]
        _ours(sorted_index_names=bad, target_names=None)
    with pytest.raises(TopKError, match="target_names has 3 entries, expected N = 4"):
        _ours(target_names=raw["target_names"][:3])
    with pytest.raises(TopKError, match="more than one True"):
        two = np.zeros((4, 5), dtype=bool)
        two[0, :2] = True
        _ours(target_names=None, labels=two)
    with pytest.raises(TopKError, match=r"scores must be float"):
        _ours(scores=np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(TopKError, match="FashionIQ has none"):
        _ours(group_names=names)
    with pytest.raises(TopKError, match="exactly one True"):
        TopK("cirr", "val", None, names, GALLERY, group_labels=np.zeros((4, 5), dtype=bool))


# ------------------------------------------------------------------------------------------------ stage-II scores
def _scored_cirr() -> TopK:
    """A CIRR top-3 of two queries in stage-I order with hand-picked stage-I and stage-II scores."""
    gallery = [f"dev-{i}-img0" for i in range(8)]
    return TopK(
        "cirr", "val", None,
        sorted_index_names=[["dev-1-img0", "dev-2-img0", "dev-3-img0"], ["dev-4-img0", "dev-5-img0", "dev-6-img0"]],
        index_names=gallery,
        target_names=("dev-3-img0", "dev-4-img0"),
        scores=torch.tensor([[0.9, 0.8, 0.1], [0.7, 0.6, 0.5]]),
        stage2_scores=torch.tensor([[1.0, 2.0, 3.0], [0.0, 5.0, 5.0]]),  # row 1: a tie keeps stage-I order
        group_names=[["dev-1-img0", "dev-3-img0"], ["dev-4-img0", "dev-7-img0"]],
        group_stage2_scores=torch.tensor([[0.0, 1.0], [2.0, 1.0]]),
        provenance={"stage2": {"k": 3, "fusion_weight": 0.0}},
    )


def test_reranked_orders_by_stage2_scores_and_moves_every_field_with_its_candidate(tmp_path):
    scored = _scored_cirr()
    re = scored.reranked()
    assert re.sorted_index_names.tolist() == [["dev-3-img0", "dev-2-img0", "dev-1-img0"],
                                              ["dev-5-img0", "dev-6-img0", "dev-4-img0"]]
    assert re.labels.tolist() == [[True, False, False], [False, False, True]]
    assert re.scores.numpy() == pytest.approx(np.array([[0.1, 0.8, 0.9], [0.6, 0.5, 0.7]]))
    assert re.stage2_scores.tolist() == [[3.0, 2.0, 1.0], [5.0, 5.0, 0.0]]
    # the CIRR subset is ordered by its own stage-II scores; its labels follow
    assert re.group_names.tolist() == [["dev-3-img0", "dev-1-img0"], ["dev-4-img0", "dev-7-img0"]]
    assert re.group_labels.tolist() == [[True, False], [True, False]]
    # k' < K re-ranks the first k' stage-I candidates only
    assert scored.reranked(k=2).sorted_index_names.tolist() == [["dev-2-img0", "dev-1-img0"],
                                                                ["dev-5-img0", "dev-4-img0"]]
    # fusion weight 1: stage I alone, the file's order back; 0.5: z-scored rows blended (as metrics.fuse_scores)
    assert np.array_equal(scored.reranked(1.0).sorted_index_names, scored.sorted_index_names)
    fused = scored.final_scores(0.5)
    z = lambda x: (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)  # noqa: E731
    expected = 0.5 * z(scored.scores.double().numpy()) + 0.5 * z(scored.stage2_scores.double().numpy())
    assert fused.dtype == torch.float32 and fused.numpy() == pytest.approx(expected.astype(np.float32))
    # a re-ranked list keeps each candidate's final score (z-scores do not depend on the column order)
    assert sorted(scored.reranked(0.5).final_scores(0.5)[0].tolist()) == pytest.approx(sorted(fused[0].tolist()))

    back = TopK.load(scored.save(tmp_path / "reranked_val.pt"))
    assert torch.equal(back.stage2_scores, scored.stage2_scores)
    assert torch.equal(back.group_stage2_scores, scored.group_stage2_scores)
    assert back.provenance == scored.provenance
    assert np.array_equal(back.reranked(0.3).sorted_index_names, scored.reranked(0.3).sorted_index_names)
    assert [p.name for p in tmp_path.iterdir()] == ["reranked_val.pt"]  # written atomically, no temporaries left


def test_rows_picks_queries_and_stage2_errors_name_the_problem():
    scored = _scored_cirr()
    one = scored.rows([1])
    assert one.num_queries == 1 and one.target_names == ("dev-4-img0",)
    assert one.stage2_scores.tolist() == [[0.0, 5.0, 5.0]]
    assert one.group_names.tolist() == [["dev-4-img0", "dev-7-img0"]]
    with pytest.raises(TopKError, match=r"query rows \[2\] outside 0..1"):
        scored.rows([2])
    with pytest.raises(TopKError, match="no stage-II scores"):
        dataclasses.replace(scored, stage2_scores=None, group_stage2_scores=None).reranked()
    with pytest.raises(TopKError, match="fusion needs stage-I scores"):
        dataclasses.replace(scored, scores=None).reranked(0.5)
    with pytest.raises(TopKError, match=r"stage2_scores must be float \(N, K\) = \(2, 3\)"):
        dataclasses.replace(scored, stage2_scores=torch.zeros(2, 4))
    with pytest.raises(TopKError, match="group_order must permute"):
        scored.reordered(np.tile(np.arange(3), (2, 1)), np.zeros((2, 2), dtype=np.int64))


def test_reranked_then_rest_is_the_re_ranked_head_then_the_list_it_came_from():
    """A server's whole list: stage II's order of the first k, then the candidate list's own order."""
    scored = _scored_cirr()
    full = TopK("cirr", "val", None, index_names=scored.index_names,
                sorted_index_names=[["dev-1-img0", "dev-2-img0", "dev-3-img0", "dev-0-img0", "dev-7-img0"],
                                    ["dev-4-img0", "dev-5-img0", "dev-6-img0", "dev-7-img0", "dev-0-img0"]])
    assert scored.reranked_then_rest(full, 0.0, 4).tolist() == [
        ["dev-3-img0", "dev-2-img0", "dev-1-img0", "dev-0-img0"], ["dev-5-img0", "dev-6-img0", "dev-4-img0",
                                                                   "dev-7-img0"]]
    assert np.array_equal(scored.reranked_then_rest(full, 1.0, 5), full.sorted_index_names)  # stage I alone
    assert np.array_equal(scored.reranked_then_rest(scored, 0.5, 3), scored.reranked(0.5).sorted_index_names)
    with pytest.raises(TopKError, match="not the list they were taken from"):
        scored.reranked_then_rest(full.rows([1, 0]), 0.0, 4)
    with pytest.raises(TopKError, match="length=6: the lists hold 5 names"):
        scored.reranked_then_rest(full, 0.0, 6)
