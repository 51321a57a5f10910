"""Partitioning: `splits.lowest_share` and MeCa's keep share and partition (Algorithm 1 line 11, Algorithm 2 line 6)."""

from __future__ import annotations

import numpy as np
import pytest

from components.defenses import meca
from components.splits import lowest_share


# ---------------------------------------------------------------------------------------------- lowest_share


def test_lowest_share_picks_the_lowest_scores():
    scores = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.0])
    mask = lowest_share(scores, 0.3)
    assert mask.dtype == bool and mask.shape == (10,)
    np.testing.assert_array_equal(np.flatnonzero(mask), [1, 5, 9])  # scores 0.1, 0.2, 0.0


@pytest.mark.parametrize("n,share", [(10, 0.25), (7, 0.4), (100, 0.33), (13, 0.9), (3, 0.1)])
def test_lowest_share_size_is_rounded_share_of_n(n, share):
    scores = np.random.default_rng(n).random(n)
    mask = lowest_share(scores, share)
    k = int(round(share * n))
    assert mask.sum() == k
    if 0 < k < n:  # every picked score is at most every unpicked score
        assert scores[mask].max() <= scores[~mask].min()


def test_lowest_share_ties_broken_by_sample_order():
    scores = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    # two zeros, then the first tied ones in sample order
    np.testing.assert_array_equal(np.flatnonzero(lowest_share(scores, 4 / 6)), [0, 1, 2, 4])
    np.testing.assert_array_equal(np.flatnonzero(lowest_share(np.full(5, 2.0), 0.4)), [0, 1])


def test_lowest_share_ties_broken_by_sample_order_on_a_large_set():
    # many ties over a set large enough that an unstable sort would reorder them
    scores = np.random.default_rng(0).integers(0, 3, 200).astype(float)
    k = round(0.25 * 200)
    expected = sorted(range(200), key=lambda i: (scores[i], i))[:k]
    np.testing.assert_array_equal(np.flatnonzero(lowest_share(scores, 0.25)), sorted(expected))


def test_lowest_share_edges():
    scores = np.array([3.0, 1.0, 2.0])
    assert not lowest_share(scores, 0.0).any()
    assert lowest_share(scores, 1.0).all()
    # out-of-range shares are clamped into [0, 1]
    assert not lowest_share(scores, -0.5).any()
    assert lowest_share(scores, 1.5).all()
    assert lowest_share(np.array([]), 0.5).shape == (0,)


def test_lowest_share_does_not_modify_its_input():
    scores = np.array([0.3, 0.1, 0.2])
    lowest_share(scores, 0.5)
    np.testing.assert_array_equal(scores, [0.3, 0.1, 0.2])


# ---------------------------------------------------------------------------------------------- MeCa


@pytest.mark.parametrize("e,gamma,expected", [(0, 0.1, 0.9), (1, 0.1, 0.8), (2, 0.1, 0.7), (3, 0.05, 0.8),
                                              (0, 0.25, 0.75)])
def test_keep_share_is_one_minus_e_plus_one_gamma(e, gamma, expected):
    assert meca.keep_share(e, gamma) == pytest.approx(expected)


def test_partition_keeps_the_low_kl_part():
    # ten samples, the first three poison-like (low KL: robust to the perturbation)
    kl = np.array([0.01, 0.02, 0.03, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    kept = meca.partition(kl, 0, 0.2)  # keep 1 - 0.2 = 80 %
    assert kept.sum() == 8
    assert kept[:3].all()  # the low-KL samples are learned (kept in D_u_hat)
    np.testing.assert_array_equal(np.flatnonzero(~kept), [3, 4])  # the two highest KL are unlearned


def test_partition_unlearned_part_grows_each_round():
    kl = np.random.default_rng(0).random(200)
    gamma = 0.1
    previous = None
    for e in range(5):
        kept = meca.partition(kl, e, gamma)
        assert (~kept).sum() == round((e + 1) * gamma * 200)
        assert kl[kept].max() <= kl[~kept].min()
        if previous is not None:
            assert (~kept).sum() > (~previous).sum()
            assert not (kept & ~previous).any()  # with the same scores, what was unlearned stays unlearned
        previous = kept
