"""Partitioning: from a score table to pools (clean, suspect, dropped)."""

from __future__ import annotations

import numpy as np


def lowest_share(scores: np.ndarray, share: float) -> np.ndarray:
    """Boolean mask of the round(share * N) samples with the lowest scores (ties broken by sample order).

    MeCa Algorithm 1, line 11: sort(D_u, Q, p).
    """
    n = len(scores)
    k = int(round(min(max(share, 0.0), 1.0) * n))
    mask = np.zeros(n, dtype=bool)
    mask[np.argsort(scores, kind="stable")[:k]] = True
    return mask
