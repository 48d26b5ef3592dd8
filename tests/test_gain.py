"""Where the gain comes from (`cirlib.eval.gain`): hand-computed small cases, and fusion equal to `TopK.reranked`."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cirlib.eval import gain
from cirlib.retrieval.topk import TopK


def test_first_ranks_take_the_first_true_of_each_row():
    labels = np.array([[0, 1, 0], [0, 0, 0], [1, 0, 1], [0, 0, 1]], dtype=bool)  # row 2: two ground truths (CIRCO)
    assert gain.first_ranks(labels).tolist() == [1, -1, 0, 2]
    with pytest.raises(ValueError, match="bool"):
        gain.first_ranks(np.zeros((2, 3), dtype=int))


def test_ceiling_is_the_share_of_targets_within_k():
    ranks = np.array([0, 4, -1, 9, 2])
    assert gain.ceiling(ranks, 10) == 80.0  # 4 of 5 ranked
    assert gain.ceiling(ranks, 5) == 60.0  # 0, 4, 2
    assert gain.ceiling(ranks, 1) == 20.0
    with pytest.raises(ValueError, match="k must be"):
        gain.ceiling(ranks, 0)


def test_outcomes_per_query_and_their_counts():
    before = np.array([3, 0, 2, -1, 5, -1, 1])
    after = np.array([0, 1, 2, -1, -1, 4, 1])
    labels = gain.outcomes(before, after)
    assert labels.tolist() == ["up", "down", "unchanged", "missing", "down", "up", "unchanged"]
    assert gain.outcome_counts(labels) == {"missing": 1, "up": 2, "down": 2, "unchanged": 2}
    with pytest.raises(ValueError, match="same queries"):
        gain.outcomes(before, after[:3])


def test_fused_order_by_hand():
    first = np.array([[3.0, 2.0, 1.0]])  # z: [1.2247, 0, -1.2247]
    second = np.array([[0.0, 0.0, 9.0]])  # z: [-0.7071, -0.7071, 1.4142]
    assert gain.fused_order(first, second, 0.0).tolist() == [[2, 0, 1]]  # ties keep the incoming order
    assert gain.fused_order(first, second, 1.0).tolist() == [[0, 1, 2]]
    # w = 0.5: [0.2588, -0.3536, 0.0947]
    assert gain.fused_order(first, second, 0.5).tolist() == [[0, 2, 1]]


def _topk(n: int = 6, k: int = 8, seed: int = 0) -> TopK:
    rng = np.random.default_rng(seed)
    gallery = [f"img{i}" for i in range(20)]
    names = np.stack([rng.permutation(gallery)[:k] for _ in range(n)])
    targets = [str(names[i, rng.integers(k)]) if i % 3 else "img19x" for i in range(n)]
    gallery.append("img19x")
    return TopK(dataset="fashioniq", split="val", category="dress", sorted_index_names=names, index_names=gallery,
                target_names=targets, scores=torch.from_numpy(rng.normal(size=(n, k)).astype(np.float32)),
                stage2_scores=torch.from_numpy(rng.normal(size=(n, k)).astype(np.float32)))


@pytest.mark.parametrize("weight", [0.0, 0.3, 0.5, 1.0])
def test_fusion_here_is_native_fusion(weight):
    tk = _topk()
    order = gain.fused_order(tk.scores.numpy(), tk.stage2_scores.numpy(), weight)
    native = tk.reranked(weight)
    assert np.array_equal(np.take_along_axis(tk.sorted_index_names, order, axis=1), native.sorted_index_names)
    assert np.allclose(gain.fused_scores(tk.scores.numpy(), tk.stage2_scores.numpy(), weight),
                       tk.final_scores(weight).numpy(), atol=0)


def test_sweep_picks_the_best_weight_smallest_on_ties():
    table = {0.0: {"R@1": 10.0}, 0.5: {"R@1": 30.0}, 0.7: {"R@1": 30.0}, 1.0: {"R@1": 5.0}}
    sweep = gain.fusion_sweep(list(table), lambda w: table[w], "R@1")
    assert sweep.best_weight == 0.5 and [m["R@1"] for m in sweep.metrics] == [10.0, 30.0, 30.0, 5.0]
    assert sweep.to_dict()["weights"] == [0.0, 0.5, 0.7, 1.0]
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        gain.fusion_sweep([1.5], lambda w: {"R@1": 0.0}, "R@1")
    with pytest.raises(ValueError, match="missing at weights"):
        gain.best_weight([0.0], [{"R@5": 1.0}], "R@1")
