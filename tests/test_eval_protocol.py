"""The evaluation protocol on ranked lists: a CIRR top-k file whose rows hold their own reference image is named
(the "R@1 near 0, R@5 high" signature of a protocol error) wherever top-k files are matched to a split's queries."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from cirlib.data import load_split, synth
from cirlib.eval.protocol import rows_holding_reference
from cirlib.retrieval.topk import TopK
from cirlib.workbook.evaluation import match_rows


def test_rows_holding_reference_finds_each_row_that_ranks_its_own_reference():
    names = np.array([["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"], ["j", "k", "l"]])
    assert rows_holding_reference(names, ["c", "x", "g", None]).tolist() == [0, 2]
    assert rows_holding_reference(names, ["x", "y", "z", "w"]).dtype == np.int64
    assert rows_holding_reference(names, ["x", "y", "z", "w"]).tolist() == []
    with pytest.raises(ValueError, match="3 references for 4 rows"):
        rows_holding_reference(names, ["a", "b", "c"])
    with pytest.raises(ValueError, match="2-D"):
        rows_holding_reference(names[0], ["a"])


def _topk(sd, keep_reference: set[int], dataset: str) -> TopK:
    """Three candidates per query: the target, then other images; rows in `keep_reference` rank the reference 2nd."""
    rows = []
    for i, q in enumerate(sd.queries):
        others = [n for n in sd.gallery if n not in (q.target, q.reference)]
        rows.append([q.target, q.reference if i in keep_reference else others[0], others[1]])
    return TopK(dataset=dataset, split="val", category=sd.category, sorted_index_names=np.array(rows),
                index_names=tuple(sd.gallery), target_names=tuple(q.target for q in sd.queries))


@pytest.fixture(scope="module")
def cirr_val(tmp_path_factory):
    root = synth.generate(synth.SynthConfig(layout="cirr", n_train=4, n_val=6, n_test=0, seed=3),
                          root=tmp_path_factory.mktemp("w") / "cirr")
    return load_split("cirr", root, "val")


def test_a_cirr_file_whose_rows_hold_the_reference_is_named(cirr_val, tmp_path):
    sd, path = cirr_val, tmp_path / "topk_val.pt"
    with pytest.warns(UserWarning) as caught:
        match_rows(_topk(sd, {1, 4}, "cirr"), sd, path)
    (message,) = [str(w.message) for w in caught]
    assert message.startswith(f"{path}: 2 of {len(sd.queries)} rows hold their own query's reference image")
    assert f"row 1, pair id {sd.queries[1].pair_id}" in message and "R@1 near 0" in message
    assert "Re-extract the file (notebook 02)" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file without the reference: not a word
        match_rows(_topk(sd, set(), "cirr"), sd, path)


def test_fashioniq_keeps_the_reference_in_its_ranking_without_a_warning(tmp_path):
    root = synth.generate(synth.SynthConfig(layout="fashioniq", n_train=6, n_val=6, n_test=0, seed=3),
                          root=tmp_path / "fiq")
    sd = next(s for s in (load_split("fashioniq", root, "val", c) for c in ("dress", "shirt", "toptee"))
              if len(s.queries) >= 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        match_rows(_topk(sd, {0}, "fashioniq"), sd, tmp_path / "topk.pt")
