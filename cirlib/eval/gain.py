"""Where a re-ranking's gain comes from, for two rankings of the same queries over the same candidates (pure numpy).

- `ceiling`: recall of the candidate list at K, the share of queries whose target is among the K candidates; a
  re-ranker only permutes them, so no re-ranked R@j (j <= K) can exceed it.
- `outcomes` / `outcome_counts`: per query, whether the target is missing from the candidates, moved up, moved
  down or stayed where it was.
- `fused_order` / `fusion_sweep` / `best_weight`: the ranking by w * z(first) + (1 - w) * z(second), computed as
  `TopK.final_scores` and `TopK.reranked` do (`metrics.fuse_scores` with row z-scores in float64, then float32, a
  stable descending sort; w = 0 ranks by the second scores themselves), so a sweep's weight equals native fusion.

A query's rank is the 0-based position of the FIRST True of its label row (-1: none). With one target per query
(CIRR, FashionIQ) that is the target's rank; with several ground truths (CIRCO) it is the rank of the best-placed
ground truth, the one recall counts, so a query "moves up" when its first ground truth comes earlier.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from cirlib.eval.metrics import fuse_scores

OUTCOMES = ("missing", "up", "down", "unchanged")  # per-query outcome labels, in the order counts are reported


def first_ranks(labels: np.ndarray) -> np.ndarray:
    """(N,) int64 0-based position of the first True of each row of an (N, K) bool label matrix; -1 for none."""
    arr = np.asarray(labels)
    if arr.ndim != 2 or arr.dtype != np.bool_:
        raise ValueError(f"labels must be a 2-D bool (N, K) matrix, got {arr.dtype} {arr.shape}")
    return np.where(arr.any(axis=1), arr.argmax(axis=1), -1).astype(np.int64)


def ceiling(ranks: np.ndarray, k: int) -> float:
    """Percentage of queries whose target is among the first k candidates (0-based ranks, -1 = not ranked).

    Args:
        ranks: (N,) int, a query's target rank in the candidate list (`first_ranks`).
        k: the re-ranking depth, >= 1.
    """
    r = np.asarray(ranks)
    if r.ndim != 1 or r.size == 0:
        raise ValueError(f"ranks must be a non-empty (N,) vector, got shape {r.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return 100.0 * float(((r >= 0) & (r < k)).sum()) / r.size


def outcomes(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """(N,) str outcome of each query, from its target rank before and after (0-based, -1 = not among the
    candidates): "missing" (not among the candidates after, nor before), "up" (earlier after, or brought into the
    list), "down" (later after, or dropped from the list), "unchanged".
    """
    b, a = np.asarray(before), np.asarray(after)
    if b.shape != a.shape or b.ndim != 1:
        raise ValueError(f"before {b.shape} and after {a.shape} must be (N,) ranks of the same queries")
    big = np.iinfo(np.int64).max  # "not ranked" sorts after every rank
    b2, a2 = np.where(b < 0, big, b), np.where(a < 0, big, a)
    out = np.full(b.shape, "unchanged", dtype=object)
    out[a2 < b2] = "up"
    out[a2 > b2] = "down"
    out[(b < 0) & (a < 0)] = "missing"
    return out.astype(str)


def outcome_counts(labels: np.ndarray) -> dict[str, int]:
    """{outcome: number of queries} over `OUTCOMES` (every key present) from `outcomes`' labels."""
    arr = np.asarray(labels)
    unknown = sorted(set(arr.tolist()) - set(OUTCOMES))
    if unknown:
        raise ValueError(f"unknown outcome labels {unknown}; expected some of {OUTCOMES}")
    return {name: int((arr == name).sum()) for name in OUTCOMES}


def fused_scores(first: np.ndarray, second: np.ndarray, weight: float) -> np.ndarray:
    """(N, K) float32 ranking scores w * z(first) + (1 - w) * z(second) (rows z-scored); `second` itself at w = 0."""
    if weight == 0:
        return np.asarray(second, dtype=np.float32)
    return np.asarray(fuse_scores(np.asarray(first), np.asarray(second), weight, normalize=True), dtype=np.float32)


def fused_order(first: np.ndarray, second: np.ndarray, weight: float) -> np.ndarray:
    """(N, K) int64 column order by `fused_scores`, best first; ties keep the incoming order (a stable sort)."""
    return np.argsort(-fused_scores(first, second, weight), axis=1, kind="stable").astype(np.int64)


@dataclass(frozen=True)
class FusionSweep:
    """Metrics of the fused ranking at each weight, and the weight with the best `key` metric."""

    weights: tuple[float, ...]
    metrics: tuple[dict[str, float], ...]  # one per weight
    key: str  # the metric the best weight maximises
    best_weight: float

    def to_dict(self) -> dict[str, object]:
        return {"weights": list(self.weights), "metrics": [dict(m) for m in self.metrics], "key": self.key,
                "best_weight": self.best_weight}


def best_weight(weights: Sequence[float], metrics: Sequence[Mapping[str, float]], key: str) -> float:
    """The weight whose `key` metric is highest (the smallest such weight on a tie)."""
    if not weights or len(weights) != len(metrics):
        raise ValueError(f"need one metrics dict per weight, got {len(weights)} weights and {len(metrics)} dicts")
    missing = [w for w, m in zip(weights, metrics) if key not in m]
    if missing:
        raise ValueError(f"metric {key!r} missing at weights {missing}")
    best = max(m[key] for m in metrics)
    return min(float(w) for w, m in zip(weights, metrics) if m[key] == best)


def fusion_sweep(weights: Sequence[float], score: Callable[[float], Mapping[str, float]], key: str) -> FusionSweep:
    """`score(w)` (the metrics of the ranking fused at w, e.g. from `fused_order`) at each weight, and the best.

    Args:
        weights: each in [0, 1]; 0 = the second ranking alone, 1 = the first alone.
        score: weight -> metrics.
        key: the metric the best weight maximises.
    """
    ws = tuple(float(w) for w in weights)
    bad = [w for w in ws if not 0.0 <= w <= 1.0]
    if not ws or bad:
        raise ValueError(f"fusion weights must be a non-empty list in [0, 1], got {list(weights)}")
    metrics = tuple(dict(score(w)) for w in ws)
    return FusionSweep(ws, metrics, key, best_weight(ws, metrics, key))
