"""Defense metrics: ACC, ASR, DER, detection quality, AUROC and pool statistics (DESIGN.md, "Metrics")."""

from __future__ import annotations

import math

import numpy as np
import pytest

from components.metrics import accuracy, attack_success_rate, auroc, der, detection, pool_stats


# ---------------------------------------------------------------------------------------------- ACC, ASR


def test_accuracy_counts_matches():
    assert accuracy(np.array([0, 1, 2, 3]), np.array([0, 1, 0, 0])) == pytest.approx(0.5)
    assert accuracy(np.array([1, 1, 1]), np.array([1, 1, 1])) == 1.0
    assert accuracy(np.array([0, 0]), np.array([1, 1])) == 0.0


def test_accuracy_accepts_lists_and_is_nan_when_empty():
    assert accuracy([2, 2, 1], [2, 0, 1]) == pytest.approx(2 / 3)
    assert math.isnan(accuracy(np.array([], int), np.array([], int)))


def test_attack_success_rate_is_share_classified_as_attacker_label():
    # all-to-one: attacker label is the target for every triggered image
    pred = np.array([0, 0, 0, 3, 0])
    assert attack_success_rate(pred, np.zeros(5, int)) == pytest.approx(0.8)
    # all-to-all: each image has its own mapped label
    pred = np.array([1, 2, 3, 0])
    mapped = np.array([1, 2, 0, 0])
    assert attack_success_rate(pred, mapped) == pytest.approx(0.75)


# ---------------------------------------------------------------------------------------------- DER


def test_der_hand_computed():
    # (max(0, 1.0 - 0.02) - max(0, 0.9 - 0.85) + 1) / 2 = (0.98 - 0.05 + 1) / 2
    assert der(0.9, 1.0, 0.85, 0.02) == pytest.approx(0.965)


def test_der_no_change_is_one_half_and_perfect_defense_is_one():
    assert der(0.9, 0.95, 0.9, 0.95) == pytest.approx(0.5)
    assert der(0.9, 1.0, 0.9, 0.0) == pytest.approx(1.0)


def test_der_gives_no_bonus_for_higher_accuracy_or_higher_asr():
    # the defense raises ACC: the ACC term is clipped at 0, not added
    assert der(0.80, 0.9, 0.85, 0.1) == pytest.approx((0.8 + 1) / 2)
    # the defense raises ASR: the ASR term is clipped at 0, not subtracted
    assert der(0.9, 0.3, 0.8, 0.5) == pytest.approx((0 - 0.1 + 1) / 2)
    # worst case: ASR up, ACC to zero
    assert der(1.0, 0.0, 0.0, 1.0) == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------- detection


def test_detection_hand_made_case():
    #               poison poison poison clean clean clean clean clean
    is_poison = np.array([1, 1, 1, 0, 0, 0, 0, 0], bool)
    flagged = np.array([1, 1, 0, 1, 0, 0, 0, 0], bool)
    d = detection(flagged, is_poison)
    assert d["tpr"] == pytest.approx(2 / 3)
    assert d["fpr"] == pytest.approx(1 / 5)
    assert d["precision"] == pytest.approx(2 / 3)
    assert d["flagged"] == 3


def test_detection_accepts_int_arrays():
    d = detection([0, 1, 1, 0], [0, 1, 0, 0])
    assert (d["tpr"], d["fpr"], d["precision"], d["flagged"]) == (1.0, pytest.approx(1 / 3), 0.5, 2)


def test_detection_nothing_flagged_has_nan_precision():
    d = detection(np.zeros(4, bool), np.array([1, 0, 0, 0], bool))
    assert d["tpr"] == 0.0 and d["fpr"] == 0.0 and d["flagged"] == 0
    assert math.isnan(d["precision"])


def test_detection_no_poison_has_nan_tpr():
    d = detection(np.array([1, 0, 0], bool), np.zeros(3, bool))
    assert math.isnan(d["tpr"])
    assert d["fpr"] == pytest.approx(1 / 3)
    assert d["precision"] == 0.0


def test_detection_all_poison_has_nan_fpr():
    d = detection(np.array([1, 0], bool), np.ones(2, bool))
    assert math.isnan(d["fpr"])
    assert d["tpr"] == 0.5 and d["precision"] == 1.0


# ---------------------------------------------------------------------------------------------- AUROC


def auroc_pairwise(scores, is_poison) -> float:
    """O(n^2) reference: P(poison score > clean score) + 0.5 P(equal)."""
    pos = [s for s, p in zip(scores, is_poison) if p]
    neg = [s for s, p in zip(scores, is_poison) if not p]
    total = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return total / (len(pos) * len(neg))


def test_auroc_perfectly_separated_is_one():
    assert auroc(np.array([0.1, 0.2, 0.3, 0.8, 0.9]), np.array([0, 0, 0, 1, 1], bool)) == pytest.approx(1.0)


def test_auroc_reversed_is_zero():
    assert auroc(np.array([0.8, 0.9, 0.1, 0.2, 0.3]), np.array([0, 0, 1, 1, 1], bool)) == pytest.approx(0.0)


def test_auroc_identical_scores_is_one_half():
    assert auroc(np.full(7, 3.0), np.array([1, 0, 0, 1, 0, 0, 0], bool)) == pytest.approx(0.5)


def test_auroc_does_not_depend_on_sample_order():
    scores = np.array([0.3, 0.1, 0.9, 0.3, 0.5, 0.2])
    labels = np.array([1, 0, 1, 0, 0, 1], bool)
    perm = np.array([5, 2, 0, 4, 1, 3])
    assert auroc(scores, labels) == pytest.approx(auroc(scores[perm], labels[perm]))
    assert auroc(scores, labels) == pytest.approx(auroc_pairwise(scores, labels))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 60
    scores = rng.integers(0, 6, n).astype(float)  # few distinct values: many ties
    is_poison = rng.random(n) < 0.3
    is_poison[:2] = [True, False]  # both classes present
    scores[is_poison] += rng.integers(0, 2, is_poison.sum())  # poison slightly higher on average
    assert auroc(scores, is_poison) == pytest.approx(auroc_pairwise(scores, is_poison), abs=1e-12)


def test_auroc_is_nan_with_one_class_only():
    assert math.isnan(auroc(np.array([0.1, 0.2]), np.zeros(2, bool)))
    assert math.isnan(auroc(np.array([0.1, 0.2]), np.ones(2, bool)))


# ---------------------------------------------------------------------------------------------- pools


def test_pool_stats_hand_made_case():
    in_pool = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], bool)
    is_poison = np.array([1, 0, 0, 0, 1, 1, 0, 0, 0, 0], bool)
    s = pool_stats(in_pool, is_poison)
    assert s["share"] == pytest.approx(0.4)
    assert s["size"] == 4
    assert s["poison"] == 1
    assert s["poison_rate"] == pytest.approx(0.25)


def test_pool_stats_empty_pool_has_nan_rate():
    s = pool_stats(np.zeros(3, bool), np.array([1, 0, 0], bool))
    assert s["share"] == 0.0 and s["size"] == 0 and s["poison"] == 0
    assert math.isnan(s["poison_rate"])


def test_pool_stats_empty_set_has_nan_share():
    s = pool_stats(np.array([], bool), np.array([], bool))
    assert math.isnan(s["share"]) and s["size"] == 0


def test_per_class_and_target_class_accuracy_on_a_hand_made_prediction_table():
    from components.metrics import per_class_accuracy, target_figures

    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = np.array([0, 1, 1, 1, 1, 1, 0, 2, 2, 0])  # class 0: 1 of 4; class 1: 2 of 2; class 2: 2 of 4
    assert per_class_accuracy(pred, labels, 4)[:3] == [0.25, 1.0, 0.5]
    assert np.isnan(per_class_accuracy(pred, labels, 4)[3])  # a class with no test image
    fig = target_figures(pred, labels, target=0, num_classes=3)
    assert fig["target_acc"] == 0.25 and fig["pred_target_share"] == pytest.approx(0.3)  # 3 of 10 predicted as 0
    # a model that never predicts the target: ASR 0 would hide it, target_acc does not
    never = target_figures(np.ones(10, int), labels, target=0, num_classes=3)
    assert never["target_acc"] == 0.0 and never["pred_target_share"] == 0.0
    assert attack_success_rate(np.zeros(0), np.zeros(0)) is None  # no attack: no ASR
    assert der(0.8, None, 0.7, None) is None
