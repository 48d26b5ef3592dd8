"""Retrieval metrics as pure functions, generic over K.

Every function accepts numpy arrays or torch tensors and returns plain Python floats (percentages, as papers report
them) or arrays of the input's kind. Conventions, shared with the original system (original-system.md section 6):

- A *label matrix* is (N, K) bool: row i is query i, column j is position j of its ranked candidate list (best
  first), True where the ground-truth target sits. At most one True per row; an all-False row means the target is
  not in the list and counts as a miss for every R@k (the denominator is always N, all queries).
- A *rank* is the 0-based position of the target in a ranking; -1 means "not in the list".
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor
A = TypeVar("A", np.ndarray, torch.Tensor)

# The one list of K values each dataset's evaluation reports (R@k of stage I and stage II; values above the re-ranked
# depth are left out), and the depths of the candidate-recall table of a stage-I top-K file (values above its K too).
CANDIDATE_RECALL_KS = (1, 5, 10, 20, 32, 50, 100, 200)
DEFAULT_KS = (1, 5, 10, 50)  # the metric functions' default: CIRR's reported R@k (each dataset class has its own)
SUBSET_KS = (1, 2, 3)  # CIRR Recall_subset@k


def _to_numpy(x: ArrayLike | Sequence, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _bool_matrix(labels: ArrayLike, name: str) -> np.ndarray:
    arr = _to_numpy(labels, name)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, K) boolean matrix, got shape {tuple(arr.shape)}")
    if arr.dtype != np.bool_:
        raise ValueError(f"{name} must have dtype bool, got {arr.dtype}")
    return arr


def _check_at_most_one(labels: np.ndarray, name: str) -> None:
    per_row = labels.sum(axis=1)
    bad = np.flatnonzero(per_row > 1)
    if bad.size:
        raise ValueError(
            f"{name}: expected at most one True per row (one target per query), but row {int(bad[0])} has "
            f"{int(per_row[bad[0]])} ({bad.size} such rows)"
        )


def _check_ks(ks: Iterable[int], width: int, name: str) -> list[int]:
    ks = [int(k) for k in ks]
    if not ks:
        raise ValueError(f"{name}: no k values given")
    for k in ks:
        if k < 1:
            raise ValueError(f"{name}: k must be >= 1, got {k}")
        if k > width:
            raise ValueError(
                f"{name}: R@{k} asked for, but the label matrix has only {width} columns; a recall beyond the "
                "ranked list's length cannot be computed from it"
            )
    return ks


def recall_at_k(labels: ArrayLike, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """Percentage of queries whose target is among the first k columns, keyed "R@k".

    Args:
        labels: (N, K) bool, at most one True per row; all-False rows are misses.
        ks: cut-offs, each 1 <= k <= K.
    """
    arr = _bool_matrix(labels, "labels")
    _check_at_most_one(arr, "labels")
    n = arr.shape[0]
    if n == 0:
        raise ValueError("labels: no queries (N = 0); recall is undefined")
    ks = _check_ks(ks, arr.shape[1], "recall_at_k")
    return {f"R@{k}": 100.0 * float(arr[:, :k].any(axis=1).sum()) / n for k in ks}


def subset_recall_at_k(group_labels: ArrayLike, ks: Iterable[int] = SUBSET_KS) -> dict[str, float]:
    """CIRR Recall_subset@k over the ranked 5 non-reference img_set members, keyed "Rsubset@k".

    Args:
        group_labels: (N, 5) bool (any width accepted), exactly one True per row: the target is always a member.
        ks: cut-offs, each 1 <= k <= width.
    """
    arr = _bool_matrix(group_labels, "group_labels")
    per_row = arr.sum(axis=1)
    bad = np.flatnonzero(per_row != 1)
    if bad.size:
        raise ValueError(
            f"group_labels: expected exactly one True per row (the target is always in the query's img_set), "
            f"but row {int(bad[0])} has {int(per_row[bad[0]])} ({bad.size} such rows)"
        )
    if arr.shape[0] == 0:
        raise ValueError("group_labels: no queries (N = 0); recall is undefined")
    ks = _check_ks(ks, arr.shape[1], "subset_recall_at_k")
    n = arr.shape[0]
    return {f"Rsubset@{k}": 100.0 * float(arr[:, :k].any(axis=1).sum()) / n for k in ks}


def candidate_recall_at_k(stage1_labels: ArrayLike, ks: Iterable[int]) -> dict[str, float]:
    """The ceiling stage II can reach when it re-ranks the stage-I top-k: stage-I recall at each k, keyed "cand@k".

    Re-ranking only permutes the top-k, so every stage-II R@j (j <= k) is at most this value.

    Args:
        stage1_labels: (N, K) bool stage-I label matrix.
        ks: re-ranking depths, each <= K.
    """
    return {key.replace("R@", "cand@"): value for key, value in recall_at_k(stage1_labels, ks).items()}


def ranks_from_labels(labels: ArrayLike) -> np.ndarray:
    """0-based position of the True in each row, -1 for rows without one.

    Args:
        labels: (N, K) bool, at most one True per row. Returns (N,) int64.
    """
    arr = _bool_matrix(labels, "labels")
    _check_at_most_one(arr, "labels")
    has = arr.any(axis=1)
    return np.where(has, arr.argmax(axis=1), -1).astype(np.int64)


def recall_from_ranks(ranks: ArrayLike, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """R@k from 0-based target ranks (-1 = target not ranked), keyed "R@k".

    Args:
        ranks: (N,) int, -1 for a miss. Any k is allowed (a rank-list is not bounded by a width).
    """
    arr = _to_numpy(ranks, "ranks").astype(np.int64, copy=False)
    if arr.ndim != 1:
        raise ValueError(f"ranks must be 1-D (N,), got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError("ranks: no queries (N = 0); recall is undefined")
    if (arr < -1).any():
        raise ValueError(f"ranks must be >= 0 or -1 (miss), got minimum {int(arr.min())}")
    out = {}
    for k in ks:
        if int(k) < 1:
            raise ValueError(f"recall_from_ranks: k must be >= 1, got {k}")
        out[f"R@{int(k)}"] = 100.0 * float(((arr >= 0) & (arr < int(k))).sum()) / arr.size
    return out


def target_ranks_from_scores(scores: ArrayLike, target_index: ArrayLike) -> np.ndarray:
    """0-based rank of each query's target in its descending score row.

    Ties are broken by gallery index (lower index first), i.e. the position a stable descending sort would give.

    Args:
        scores: (N, G) float, higher = better.
        target_index: (N,) int, column of the target in each row.
    Returns (N,) int64.
    """
    s = _to_numpy(scores, "scores")
    t = _to_numpy(target_index, "target_index").astype(np.int64, copy=False)
    if s.ndim != 2 or t.ndim != 1 or t.shape[0] != s.shape[0]:
        raise ValueError(f"expected scores (N, G) and target_index (N,), got {tuple(s.shape)} and {tuple(t.shape)}")
    if t.size and (t.min() < 0 or t.max() >= s.shape[1]):
        raise ValueError(f"target_index must lie in [0, {s.shape[1]}), got range [{t.min()}, {t.max()}]")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; ranks would be meaningless")
    rows = np.arange(s.shape[0])
    target_score = s[rows, t][:, None]  # (N, 1)
    better = (s > target_score).sum(axis=1)
    cols = np.arange(s.shape[1])[None, :]
    tied_before = ((s == target_score) & (cols < t[:, None])).sum(axis=1)
    return (better + tied_before).astype(np.int64)


def target_ranks_from_ranking(sorted_names: ArrayLike | Sequence, targets: Sequence[str]) -> np.ndarray:
    """0-based position of each target in its ranked name list, -1 where absent.

    Args:
        sorted_names: (N, K) names, best first.
        targets: (N,) target names.
    Returns (N,) int64.
    """
    return ranks_from_labels(labels_from_ranking(sorted_names, targets))


def labels_from_ranking(sorted_names: ArrayLike | Sequence, targets: Sequence[str]) -> np.ndarray:
    """Label matrix of a ranking: True where the ranked name equals the query's target.

    Args:
        sorted_names: (N, K) names, best first.
        targets: (N,) target names.
    Returns (N, K) bool; raises if a target occurs twice in its row.
    """
    names = np.asarray(sorted_names, dtype=str)
    tgt = np.asarray(list(targets), dtype=str)
    if names.ndim != 2 or tgt.ndim != 1 or names.shape[0] != tgt.shape[0]:
        raise ValueError(
            f"expected sorted_names (N, K) and targets (N,), got {tuple(names.shape)} and {tuple(tgt.shape)}"
        )
    labels = names == tgt[:, None]  # (N, K)
    _check_at_most_one(labels, "labels_from_ranking (a target appears twice in a ranked row)")
    return labels


def fuse_scores(stage1: A, stage2: A, weight: float, *, normalize: bool = False) -> A:
    """Blend stage-I and stage-II scores of the same candidates: weight * s1 + (1 - weight) * s2.

    weight = 0 gives stage II alone (the original system), weight = 1 stage I alone. The two scores live on
    different scales (cosine vs. logit), so `normalize=True` first z-scores each row of each matrix (the weight then
    trades off ranks rather than raw magnitudes).

    Args:
        stage1: (N, K) float, stage-I scores of the top-K (same column order as stage2).
        stage2: (N, K) float, stage-II scores.
        weight: in [0, 1].
    Returns (N, K) float: a torch tensor if both inputs are tensors, else a numpy array.
    """
    if not 0.0 <= float(weight) <= 1.0:
        raise ValueError(f"weight must lie in [0, 1], got {weight}")
    if tuple(stage1.shape) != tuple(stage2.shape) or len(stage1.shape) != 2:
        raise ValueError(f"stage1 and stage2 must both be (N, K), got {tuple(stage1.shape)} and {tuple(stage2.shape)}")
    if isinstance(stage1, torch.Tensor) != isinstance(stage2, torch.Tensor):
        # e.g. TopK.scores (torch) with stage-II scores held as numpy: compute in numpy
        stage1, stage2 = _to_numpy(stage1, "stage1"), _to_numpy(stage2, "stage2")
    if not isinstance(stage1, torch.Tensor):
        stage1, stage2 = np.asarray(stage1, dtype=np.float64), np.asarray(stage2, dtype=np.float64)

    def _z(x):
        mean = x.mean(axis=1, keepdims=True) if isinstance(x, np.ndarray) else x.mean(dim=1, keepdim=True)
        std = x.std(axis=1, keepdims=True) if isinstance(x, np.ndarray) else x.std(dim=1, keepdim=True, correction=0)
        # a constant row has no ordering information; dividing by 1 keeps it at 0 instead of NaN
        std = np.where(std > 0, std, 1.0) if isinstance(x, np.ndarray) else torch.where(std > 0, std, 1.0)
        return (x - mean) / std

    if normalize:
        stage1, stage2 = _z(stage1), _z(stage2)
    return weight * stage1 + (1.0 - weight) * stage2


def fashioniq_summary(per_category: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """FashionIQ report: per-category R@k as "<cat>_R@k", their means "avg_R@k", and `average_recall`.

    `average_recall` = (avg_R@10 + avg_R@50) / 2, the original's model-selection score. Means are over the categories
    given (normally dress, shirt, toptee).

    Args:
        per_category: {category: {"R@10": ..., "R@50": ..., ...}}, as returned by `recall_at_k`.
    """
    if not per_category:
        raise ValueError("fashioniq_summary: no categories given")
    for cat, rec in per_category.items():
        missing = [k for k in ("R@10", "R@50") if k not in rec]
        if missing:
            raise ValueError(f"fashioniq_summary: category {cat!r} lacks {missing}; got keys {sorted(rec)}")
    out: dict[str, float] = {}
    for cat, rec in per_category.items():
        for key, value in rec.items():
            out[f"{cat}_{key}"] = float(value)
    common = set.intersection(*(set(rec) for rec in per_category.values()))
    for key in sorted(common, key=_k_of):
        out[f"avg_{key}"] = float(np.mean([per_category[c][key] for c in per_category]))
    out["average_recall"] = (out["avg_R@10"] + out["avg_R@50"]) / 2.0
    return out


def _k_of(key: str) -> tuple[str, int]:
    prefix, _, k = key.partition("@")
    return (prefix, int(k)) if k.isdigit() else (key, 0)


def cirr_selection_score(metrics: Mapping[str, float]) -> float:
    """The original's CIRR model-selection score (R@5 + Rsubset@1) / 2 (the papers' "Avg").

    Args:
        metrics: holds "R@5" and "Rsubset@1".
    """
    missing = [k for k in ("R@5", "Rsubset@1") if k not in metrics]
    if missing:
        raise ValueError(f"cirr_selection_score: metrics lack {missing}; got keys {sorted(metrics)}")
    return (float(metrics["R@5"]) + float(metrics["Rsubset@1"])) / 2.0


def cirr_summary(recalls: Mapping[str, float], subset_recalls: Mapping[str, float]) -> dict[str, float]:
    """CIRR report: R@k and Rsubset@k merged, plus "avg" = (R@5 + Rsubset@1)/2 and the CLIP4Cir-style means.

    "arithmetic_mean", "geometric_mean" and "harmonic_mean" are taken over all given recall values (the CLIP4Cir
    family prints them over R@1, 5, 10, 50 and Rsubset@1, 2, 3).

    Args:
        recalls: from `recall_at_k`; subset_recalls: from `subset_recall_at_k`.
    """
    out = {**{k: float(v) for k, v in recalls.items()}, **{k: float(v) for k, v in subset_recalls.items()}}
    values = list(out.values())
    out["avg"] = cirr_selection_score(out)
    out["arithmetic_mean"] = float(np.mean(values))
    # a zero recall makes both the geometric and the harmonic mean 0 by definition
    out["geometric_mean"] = 0.0 if min(values) <= 0 else float(math.exp(np.mean(np.log(values))))
    out["harmonic_mean"] = 0.0 if min(values) <= 0 else float(len(values) / np.sum(1.0 / np.asarray(values)))
    return out
