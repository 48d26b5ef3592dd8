"""Figure 8's data: how stage II moves each target within the stage-I top-K (pure computation, drawn by
`cirlib.plots.plot_rank_shift`)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cirlib.eval import metrics


@dataclass(frozen=True, eq=False)
class RankShift:
    """How stage II moves targets, per stage-I position (the data behind Figure 8). Ranks are 0-based."""

    counts: np.ndarray  # (K,) int, queries whose target sits at stage-I index i
    avg_delta: np.ndarray  # (K,) float, i - mean(stage-II rank) over those queries; 0 where counts == 0
    rank_stage1: np.ndarray  # (M,) int, stage-I rank of each query with a hit (rows without one are excluded)
    rank_stage2: np.ndarray  # (M,) int, stage-II rank of the same queries
    num_missing: int  # queries whose target is not in the top-K (excluded)

    @property
    def k(self) -> int:
        """Candidates per query."""
        return int(self.counts.shape[0])

    @property
    def mean_rank_stage1(self) -> float:
        """Mean 0-based stage-I rank over queries with a hit."""
        return float(self.rank_stage1.mean()) if self.rank_stage1.size else float("nan")

    @property
    def mean_rank_stage2(self) -> float:
        """Mean 0-based stage-II rank over the same queries."""
        return float(self.rank_stage2.mean()) if self.rank_stage2.size else float("nan")

    @property
    def brought_forward(self) -> float:
        """Mean positions gained: mean_rank_stage1 - mean_rank_stage2."""
        return self.mean_rank_stage1 - self.mean_rank_stage2


def rank_shift(stage1_labels: np.ndarray | torch.Tensor, stage2_labels: np.ndarray | torch.Tensor) -> RankShift:
    """Per stage-I index i: how many targets start there and how far stage II moves them on average.

    Args:
        stage1_labels: (N, K) bool, stage-I ranking of the top-K.
        stage2_labels: (N, K) bool, the stage-II re-ranking of the same top-K (same rows).
    """
    if tuple(stage1_labels.shape) != tuple(stage2_labels.shape):
        raise ValueError(
            f"stage1_labels {tuple(stage1_labels.shape)} and stage2_labels {tuple(stage2_labels.shape)} must have "
            "the same (N, K): stage II re-ranks the stage-I top-K"
        )
    r1 = metrics.ranks_from_labels(stage1_labels)  # (N,) -1 = no hit
    r2 = metrics.ranks_from_labels(stage2_labels)
    return rank_shift_of_ranks(r1, r2, int(stage1_labels.shape[1]))


def rank_shift_of_ranks(rank1: np.ndarray, rank2: np.ndarray, k: int) -> RankShift:
    """`rank_shift` from each query's 0-based target rank before and after (-1: not among the K), e.g. the rank of
    a CIRCO query's best-placed ground truth (`cirlib.eval.gain.first_ranks`).

    Args:
        rank1: (N,) int, the rank in the first ranking of the top-K (stage I, or an imported list).
        rank2: (N,) int, the rank in its re-ranking (same rows).
        k: candidates per query.
    """
    r1, r2 = np.asarray(rank1, dtype=np.int64), np.asarray(rank2, dtype=np.int64)
    if r1.shape != r2.shape or r1.ndim != 1 or (r1 >= k).any() or (r2 >= k).any():
        raise ValueError(f"ranks {r1.shape} and {r2.shape} must be (N,) ranks of the same queries below k={k}")
    differ = np.flatnonzero((r1 >= 0) != (r2 >= 0))
    if differ.size:
        i = int(differ[0])
        raise ValueError(
            f"stage I and stage II disagree on which queries have their target in the top-K: row {i} has a hit in "
            f"stage {'I' if r1[i] >= 0 else 'II'} only ({differ.size} such rows); a re-ranking only permutes the top-K"
        )
    hit = r1 >= 0
    r1, r2 = r1[hit], r2[hit]
    counts = np.bincount(r1, minlength=k)
    rank2_sum = np.bincount(r1, weights=r2.astype(np.float64), minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_rank2 = rank2_sum / counts
    # an index no target starts at has no shift (the original's NaN -> 0)
    avg_delta = np.where(counts > 0, np.arange(k) - mean_rank2, 0.0)
    return RankShift(counts=counts, avg_delta=avg_delta, rank_stage1=r1, rank_stage2=r2, num_missing=int((~hit).sum()))
