"""MeCa's enhancement rounds: what a defender observes per round, and the ground-truth view the report adds."""

from __future__ import annotations

import numpy as np
import pytest

from components import artifacts
from components.artifacts import ROUNDS_SCHEMA
from components.defenses import meca
from components.evaluation import round_metrics


def test_observe_gives_fit_shares_of_the_whole_kept_and_unlearned_parts_and_per_label():
    fit = np.array([1, 1, 0, 0, 1, 0, 1, 1], bool)
    kept = np.array([1, 1, 1, 0, 0, 0, 1, 1], bool)
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 0])
    kl = np.arange(8, dtype=float)
    o = meca.observe(fit, kept, kl, labels)
    assert o["fit_share"] == 5 / 8
    assert o["fit_kept"] == 4 / 5 and o["fit_unlearned"] == 1 / 3
    assert o["fit_by_label"] == [1.0, 0.0, 2 / 3]
    assert (o["kl_q10"], o["kl_q50"], o["kl_q90"]) == pytest.approx((0.7, 3.5, 6.3))
    assert "kl_q50" not in meca.observe(fit, kept, None, labels)  # round 0 has no KL of its own


def test_round_metrics_add_the_ground_truth_view(tmp_path):
    # two rounds over 6 samples: 0-1 poison (delivered label 0 = target), 2-3 clean of the target class, 4-5 others
    n = 6
    kept = [np.array([1, 1, 1, 1, 0, 0], bool), np.array([1, 0, 1, 0, 0, 0], bool)]
    fitted = [np.array([1, 1, 1, 0, 1, 0], bool), np.array([1, 0, 1, 1, 0, 0], bool)]
    artifacts.write_table({"sample_id": np.tile(np.arange(n), 2), "round": np.repeat([0, 1], n),
                           "kl": np.concatenate([np.full(n, np.nan), [0.0, 3, 1, 2, 4, 5]]),
                           "kept": np.concatenate(kept), "fitted": np.concatenate(fitted)},
                          tmp_path / "rounds.parquet", ROUNDS_SCHEMA)
    samples = {"is_poison": np.array([1, 1, 0, 0, 0, 0], bool), "true_label": np.array([3, 4, 0, 0, 1, 2])}
    r0, r1 = round_metrics(tmp_path / "rounds.parquet", samples, target=0)
    assert r0 == {"round": 0, "fit_share": 4 / 6, "fit_kept": 3 / 4, "fit_unlearned": 1 / 2, "poison_fitted": 1.0,
                  "clean_fitted": 2 / 4, "unlearned": 2, "poison_unlearned": 0, "poison_kept": 2,
                  "clean_target_fitted": 1 / 2}  # no KL in round 0: no AUROC
    assert r1["poison_kept"] == 1 and r1["poison_unlearned"] == 1 and r1["clean_target_fitted"] == 1.0
    assert r1["poison_fitted"] == 0.5 and r1["fit_unlearned"] == 1 / 4
    assert r1["kl_auroc"] == pytest.approx(0.75)  # low KL = poison-like: poison KL 0, 3 vs clean 1, 2, 4, 5: 6 of 8 pairs
    assert "clean_target_fitted" not in round_metrics(tmp_path / "rounds.parquet", samples)[0]
