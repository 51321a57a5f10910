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


def label_vote(scores: np.ndarray, labels: np.ndarray, share: float, num_classes: int) -> tuple[int, np.ndarray]:
    """The label most common among the `share` of samples with the lowest scores (at least one votes; ties go to the
    lowest label), and the votes per label. BSD's target estimate (section 4.1.1) on g's loss; MeCa's suspect label
    (`meca.suspect_label=loss_vote`) on the warm-up model's."""
    k = max(1, int(round(share * len(scores))))
    lowest = np.argsort(scores, kind="stable")[:k]
    votes = np.bincount(labels[lowest], minlength=num_classes)
    return int(votes.argmax()), votes


def otsu_threshold(scores: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (Otsu 1979): over a histogram of `bins` equal bins, the cut that maximizes the between-class
    variance w0 w1 (mu0 - mu1)^2. Returns the upper edge of the last bin of the lower class, so that
    `scores <= threshold` is the lower class. A-ABL section 5.2 splits the SCE distribution with it."""
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError("Otsu's threshold needs a non-empty array of finite scores")
    counts, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(counts)[:-1]  # samples at or below each candidate cut (after bin i)
    w1 = values.size - w0
    s0 = np.cumsum(counts * centers)[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (s0 / w0 - ((counts * centers).sum() - s0) / w1) ** 2
    if not np.isfinite(between).any():  # every score in one bin: nothing to split
        return float(edges[-1])
    return float(edges[1 + int(np.nanargmax(between))])
