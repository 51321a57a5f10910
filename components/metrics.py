"""Defense metrics: ACC, ASR, DER, detection quality (TPR, FPR, precision, AUROC)."""

from __future__ import annotations

import numpy as np


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(pred) == np.asarray(labels)).mean()) if len(labels) else float("nan")


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float]:
    """Clean accuracy on each class's own test images (NaN for a class with no test image)."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    return [accuracy(pred[labels == k], labels[labels == k]) for k in range(num_classes)]


def target_figures(pred: np.ndarray, labels: np.ndarray, target: int, num_classes: int) -> dict:
    """What a low ASR can hide (DESIGN.md, Metrics): per-class ACC, the target class's own clean ACC, and the share
    of all clean test images predicted as the target (0.1 for a balanced 10-class model; near 0 when the model
    has given the target class up, high when it is biased toward it)."""
    per_class = per_class_accuracy(pred, labels, num_classes)
    return {"per_class_acc": per_class, "target_acc": per_class[target],
            "pred_target_share": float((np.asarray(pred) == target).mean()) if len(pred) else float("nan")}


def attack_success_rate(pred_triggered: np.ndarray, attacker_labels: np.ndarray) -> float:
    """Share of triggered test images (true label != target) classified as the attacker's label; None when there is
    no trigger (no attack)."""
    return accuracy(pred_triggered, attacker_labels) if len(attacker_labels) else None


def der(acc_nodef: float, asr_nodef: float | None, acc_def: float, asr_def: float | None) -> float | None:
    """Defense effectiveness rating (BackdoorBench; BSD appendix C.5): in [0, 1], 0.5 = no change. None without an
    attack (no ASR): what a defense costs on clean data is its ACC drop, reported as it is."""
    if asr_nodef is None or asr_def is None:
        return None
    return (max(0.0, asr_nodef - asr_def) - max(0.0, acc_nodef - acc_def) + 1) / 2


def detection(flagged: np.ndarray, is_poison: np.ndarray) -> dict[str, float]:
    """Detection quality of a boolean `flagged` (called poison) against ground truth.

    tpr: share of poison flagged; fpr: share of clean samples flagged (lost to training); precision: share of
    flagged samples that are poison.
    """
    flagged, is_poison = np.asarray(flagged, bool), np.asarray(is_poison, bool)
    tp = int((flagged & is_poison).sum())
    fp = int((flagged & ~is_poison).sum())
    n_pos, n_neg = int(is_poison.sum()), int((~is_poison).sum())
    return {"tpr": tp / n_pos if n_pos else float("nan"), "fpr": fp / n_neg if n_neg else float("nan"),
            "precision": tp / (tp + fp) if tp + fp else float("nan"), "flagged": int(flagged.sum())}


def auroc(scores: np.ndarray, is_poison: np.ndarray) -> float:
    """Area under the ROC curve of `scores` (higher = more poison-like) against `is_poison`.

    Mann-Whitney U with average ranks for ties: the probability that a random poison sample scores higher
    than a random clean one (ties count one half).
    """
    scores, is_poison = np.asarray(scores, float), np.asarray(is_poison, bool)
    n_pos, n_neg = int(is_poison.sum()), int((~is_poison).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores))
    # average rank (1-based) over each run of tied scores
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[is_poison].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pool_stats(in_pool: np.ndarray, is_poison: np.ndarray) -> dict[str, float]:
    """Size share of a pool in the training set and its poison rate (A-ABL's gamma and rho)."""
    in_pool, is_poison = np.asarray(in_pool, bool), np.asarray(is_poison, bool)
    size = int(in_pool.sum())
    return {"share": size / len(in_pool) if len(in_pool) else float("nan"), "size": size,
            "poison": int((in_pool & is_poison).sum()),
            "poison_rate": float(is_poison[in_pool].mean()) if size else float("nan")}
