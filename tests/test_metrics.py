"""Metrics: hand-computed cases, a seeded comparison with naive loops, and the original's released label tensors."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from cirlib.eval import metrics
from cirlib.paths import shared_dir

SHARED = shared_dir()
ANALYSIS = SHARED / "data" / "original-artifacts" / "analysis_plot"


# ---------------------------------------------------------------------------------------------- hand-computed cases
def test_recall_hand_case_with_a_miss():
    labels = np.array(
        [
            [1, 0, 0, 0, 0],  # rank 0
            [0, 0, 1, 0, 0],  # rank 2
            [0, 0, 0, 0, 0],  # target not in the list: a miss for every k
            [0, 0, 0, 0, 1],  # rank 4
        ],
        dtype=bool,
    )
    assert metrics.recall_at_k(labels, ks=(1, 3, 5)) == {"R@1": 25.0, "R@3": 50.0, "R@5": 75.0}
    # torch in, same floats out
    assert metrics.recall_at_k(torch.from_numpy(labels), ks=(1, 3, 5)) == {"R@1": 25.0, "R@3": 50.0, "R@5": 75.0}
    assert metrics.ranks_from_labels(labels).tolist() == [0, 2, -1, 4]
    assert metrics.recall_from_ranks([0, 2, -1, 4], ks=(1, 3, 5, 100)) == {
        "R@1": 25.0, "R@3": 50.0, "R@5": 75.0, "R@100": 75.0
    }
    assert metrics.candidate_recall_at_k(labels, ks=(3,)) == {"cand@3": 50.0}


def test_ranks_from_a_4x5_score_matrix():
    scores = np.array(
        [
            [0.9, 0.1, 0.5, 0.3, 0.2],  # target 2: only 0.9 is higher -> rank 1
            [0.2, 0.8, 0.4, 0.8, 0.1],  # target 3: tied with column 1, which comes first -> rank 1
            [0.1, 0.2, 0.3, 0.4, 0.5],  # target 0: lowest -> rank 4
            [0.7, 0.6, 0.5, 0.4, 0.3],  # target 0: highest -> rank 0
        ]
    )
    targets = [2, 3, 0, 0]
    ranks = metrics.target_ranks_from_scores(scores, targets)
    assert ranks.tolist() == [1, 1, 4, 0]
    assert metrics.target_ranks_from_scores(torch.tensor(scores), torch.tensor(targets)).tolist() == [1, 1, 4, 0]
    assert metrics.recall_from_ranks(ranks, ks=(1, 2, 5)) == {"R@1": 25.0, "R@2": 75.0, "R@5": 100.0}

    # the same through a ranking of names: the stable descending order and the label matrix
    order = np.argsort(-np.asarray(scores), axis=1, kind="stable")  # descending, ties in column order
    assert order.tolist() == [[0, 2, 3, 4, 1], [1, 3, 2, 0, 4], [4, 3, 2, 1, 0], [0, 1, 2, 3, 4]]
    names = np.array([[f"img{j}" for j in row] for row in order])
    labels = metrics.labels_from_ranking(names, [f"img{t}" for t in targets])
    assert metrics.ranks_from_labels(labels).tolist() == [1, 1, 4, 0]
    assert metrics.target_ranks_from_ranking(names[:, :2], [f"img{t}" for t in targets]).tolist() == [1, 1, -1, 0]


def test_subset_recall_and_summaries_by_hand():
    group = np.array([[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0]], dtype=bool)
    rs = metrics.subset_recall_at_k(group)
    assert rs["Rsubset@1"] == pytest.approx(100 / 3)
    assert rs["Rsubset@2"] == pytest.approx(200 / 3)
    assert rs["Rsubset@3"] == 100.0

    assert metrics.cirr_selection_score({"R@5": 80.0, "Rsubset@1": 70.0}) == 75.0
    summary = metrics.cirr_summary({"R@5": 80.0, "R@1": 20.0}, {"Rsubset@1": 40.0})
    assert summary["avg"] == 60.0
    assert summary["arithmetic_mean"] == pytest.approx(140 / 3)
    assert summary["geometric_mean"] == pytest.approx((80 * 20 * 40) ** (1 / 3))
    assert summary["harmonic_mean"] == pytest.approx(3 / (1 / 80 + 1 / 20 + 1 / 40))

    fiq = metrics.fashioniq_summary(
        {
            "dress": {"R@10": 40.0, "R@50": 60.0},
            "shirt": {"R@10": 50.0, "R@50": 70.0},
            "toptee": {"R@10": 60.0, "R@50": 80.0},
        }
    )
    assert fiq["dress_R@10"] == 40.0 and fiq["toptee_R@50"] == 80.0
    assert fiq["avg_R@10"] == 50.0 and fiq["avg_R@50"] == 70.0
    assert fiq["average_recall"] == 60.0


def test_fuse_scores_by_hand():
    s1, s2 = np.array([[1.0, 0.0]]), np.array([[0.0, 2.0]])
    assert metrics.fuse_scores(s1, s2, 0.25).tolist() == [[0.25, 1.5]]
    assert metrics.fuse_scores(s1, s2, 0.0).tolist() == s2.tolist()  # weight 0: stage II alone
    assert metrics.fuse_scores(torch.tensor(s1), torch.tensor(s2), 1.0).tolist() == s1.tolist()
    # z-scored rows: s1 -> [1, -1], s2 -> [-1, 1]; equal weight cancels out
    assert metrics.fuse_scores(s1, s2, 0.5, normalize=True).tolist() == [[0.0, 0.0]]
    t = metrics.fuse_scores(torch.tensor(s1), torch.tensor(s2), 0.5, normalize=True)
    assert isinstance(t, torch.Tensor) and t.tolist() == [[0.0, 0.0]]
    # torch stage-I scores (TopK.scores) with numpy stage-II scores: computed in numpy
    mixed = metrics.fuse_scores(torch.tensor(s1), s2, 0.25)
    assert isinstance(mixed, np.ndarray) and mixed.tolist() == [[0.25, 1.5]]


# ------------------------------------------------------------------------------------------------------ invariants
def test_invalid_inputs_raise_clear_errors():
    two = np.array([[True, True, False]])
    with pytest.raises(ValueError, match="at most one True per row"):
        metrics.recall_at_k(two, ks=(1,))
    with pytest.raises(ValueError, match="only 3 columns"):
        metrics.recall_at_k(np.zeros((2, 3), dtype=bool), ks=(1, 5))
    with pytest.raises(ValueError, match="dtype bool"):
        metrics.recall_at_k(np.zeros((2, 3), dtype=np.int64), ks=(1,))
    with pytest.raises(ValueError, match="2-D"):
        metrics.recall_at_k(np.zeros(3, dtype=bool), ks=(1,))
    with pytest.raises(ValueError, match="exactly one True"):
        metrics.subset_recall_at_k(np.zeros((2, 5), dtype=bool))
    with pytest.raises(ValueError, match="weight"):
        metrics.fuse_scores(np.zeros((1, 2)), np.zeros((1, 2)), 1.5)
    with pytest.raises(ValueError, match="lacks"):
        metrics.fashioniq_summary({"dress": {"R@10": 1.0}})
    with pytest.raises(ValueError, match="appears twice"):
        metrics.labels_from_ranking([["a", "a"]], ["a"])


# --------------------------------------------------------------------------------------- seeded naive comparison
def _naive_recall(labels: list[list[bool]], k: int) -> float:
    hits = 0
    for row in labels:
        for j in range(k):
            if row[j]:
                hits += 1
                break
    return 100.0 * hits / len(labels)


def test_random_labels_match_a_naive_loop():
    rng = random.Random(1234)
    for _ in range(20):
        n, width = rng.randint(1, 60), rng.randint(1, 40)
        rows = []
        for _ in range(n):
            row = [False] * width
            pos = rng.randint(-1, width - 1)  # -1: target not in the list
            if pos >= 0:
                row[pos] = True
            rows.append(row)
        ks = sorted({rng.randint(1, width) for _ in range(4)})
        fast = metrics.recall_at_k(np.array(rows, dtype=bool), ks)
        assert fast == {f"R@{k}": _naive_recall(rows, k) for k in ks}

        # a random permutation per row (a re-ranking; TopK.reordered is tested in test_topk) keeps recall at width
        order = [rng.sample(range(width), width) for _ in range(n)]
        permuted = [[rows[i][order[i][j]] for j in range(width)] for i in range(n)]
        assert metrics.recall_at_k(np.array(permuted), (width,)) == metrics.recall_at_k(np.array(rows), (width,))

        scores = np.array([[rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(width)] for _ in range(n)])
        targets = [rng.randrange(width) for _ in range(n)]
        naive = []
        for i in range(n):
            order_i = sorted(range(width), key=lambda j: (-scores[i][j], j))
            naive.append(order_i.index(targets[i]))
        assert metrics.target_ranks_from_scores(scores, targets).tolist() == naive


# ---------------------------------------------------------------------------- the original's released label files
def _artifact(name: str) -> torch.Tensor:
    path = ANALYSIS / name
    assert path.is_file(), f"missing shared artifact {path}; the shared/ folder must sit beside the repository"
    return torch.load(path, weights_only=True)


def test_original_stage2_labels_give_the_published_recalls():
    ks = (1, 5, 10, 50, 100, 200)
    cirr = metrics.recall_at_k(_artifact("cirr_stageII_labels_val.pt"), ks)
    assert {k: round(v, 2) for k, v in cirr.items()} == {
        "R@1": 52.91, "R@5": 82.85, "R@10": 90.07, "R@50": 98.01, "R@100": 98.92, "R@200": 99.45
    }
    expected = {
        "dress": {"R@1": 17.06, "R@5": 37.18, "R@10": 47.89, "R@50": 71.44, "R@100": 80.02, "R@200": 84.38},
        "shirt": {"R@1": 20.56, "R@5": 40.78, "R@10": 50.15, "R@50": 71.00, "R@100": 78.21, "R@200": 82.43},
        "toptee": {"R@1": 23.15, "R@5": 44.98, "R@10": 55.38, "R@50": 77.41, "R@100": 84.45, "R@200": 88.32},
    }
    per_cat = {}
    for cat in expected:
        per_cat[cat] = metrics.recall_at_k(_artifact(f"fiq_stageII_labels_val_{cat}.pt"), ks)
        assert {k: round(v, 2) for k, v in per_cat[cat].items()} == expected[cat]
    summary = metrics.fashioniq_summary(per_cat)
    assert round(summary["avg_R@10"], 2) == 51.14
    assert round(summary["avg_R@50"], 2) == 73.28
    assert round(summary["average_recall"], 2) == 62.21


def test_original_stage2_labels_mean_ranks():
    # original-system.md 6.4: rows with a hit and mean 0-based rank of the hits
    table = {
        "cirr_stageII_labels_val.pt": (4158, 4.0943),
        "fiq_stageII_labels_val_dress.pt": (1702, 22.2468),
        "fiq_stageII_labels_val_shirt.pt": (1680, 20.4155),
        "fiq_stageII_labels_val_toptee.pt": (1732, 18.7356),
    }
    for name, (hits, mean_rank) in table.items():
        ranks = metrics.ranks_from_labels(_artifact(name))
        assert int((ranks >= 0).sum()) == hits
        assert round(float(ranks[ranks >= 0].mean()), 4) == mean_rank
