"""Checks of the evaluation protocol on ranked lists, as pure functions (nothing from cirlib).

CIRR removes each query's reference image from its own ranking: a list that still holds it scores R@1 near 0 and
R@5 high (the reference, nearest to its own query, takes the first place), which is a protocol error, not a model.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike


def rows_holding_reference(sorted_index_names: ArrayLike, references: Sequence[str | None]) -> np.ndarray:
    """The indices of the rows i whose ranked names contain references[i] (a None reference holds nothing).

    Args:
        sorted_index_names: (N, K) ranked gallery names, row i for query i.
        references: (N,) each query's reference image name.
    Returns:
        (M,) int64 row indices, ascending.
    Raises:
        ValueError: when the names are not a 2-D array or the lengths differ.
    """
    names = np.asarray(sorted_index_names)
    if names.ndim != 2:
        raise ValueError(f"sorted_index_names must be a 2-D (N, K) array of names, got shape {names.shape}")
    if len(references) != names.shape[0]:
        raise ValueError(f"{len(references)} references for {names.shape[0]} rows of names")
    given = np.array([r is not None for r in references], dtype=bool)
    refs = np.array(["" if r is None else str(r) for r in references], dtype=str).reshape(-1, 1)
    holds = (names.astype(str) == refs).any(axis=1) & given
    return np.flatnonzero(holds).astype(np.int64)
