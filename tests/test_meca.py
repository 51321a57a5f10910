"""MeCa's enhancement rounds: what a defender observes per round, the ground-truth view the report adds, and the
stopping rule that reads only the former."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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


# ---------------------------------------------------------------------------------------------- stopping rule


@pytest.mark.parametrize("fits,expected", [
    ([0.999, 0.005, 0.0, 0.01, 0.0, 0.0, 0.0, 0.0, 0.0, 0.02], True),  # one label fitted, the others not
    ([0.93, 0.05, 0.1, 0.05, 0.04, 0.06, 0.05, 0.02, 0.04, 0.05], True),
    ([0.86, 0.12, 0.1, 0.15, 0.1, 0.12, 0.1, 0.14, 0.12, 0.11], False),  # the top label below 0.9
    ([0.99, 0.55, 0.5, 0.6, 0.5, 0.55, 0.5, 0.6, 0.55, 0.5], False),  # the others still fitted: round 0's state
    ([0.95, float("nan"), 0.0, 0.05], True),  # a label without samples is left out
    ([1.0], False),
])
def test_concentrated_reads_one_label_fitted_and_the_others_not(fits, expected):
    assert meca.concentrated(fits, 0.9, 0.1) is expected


def test_enhance_stops_after_the_first_concentrated_round(monkeypatch):
    # 4 labels, 100 samples each; the model's fit per round is scripted: round 2 is the first concentrated one
    y = torch.arange(4).repeat_interleave(100)
    x = torch.zeros((400, 4, 4, 3), dtype=torch.uint8)
    by_label = [[1.0, 0.6, 0.6, 0.6], [0.95, 0.2, 0.2, 0.2], [0.95, 0.05, 0.0, 0.05], [1.0, 0.0, 0.0, 0.0],
                [1.0, 0.0, 0.0, 0.0]]
    script = iter([np.concatenate([np.arange(100) < 100 * s for s in shares]) for shares in by_label])
    monkeypatch.setattr(meca, "learn", lambda *a, **k: None)
    monkeypatch.setattr(meca, "unlearn", lambda *a, **k: None)
    monkeypatch.setattr(meca, "fitted", lambda model, x, y: next(script))
    monkeypatch.setattr(meca.scores, "meca_kl", lambda model, x, y, **k: np.linspace(0, 1, len(y)))
    kept0 = np.ones(400, bool)
    kept0[:40] = False
    base = meca.TrainParams()
    stopped = meca.enhance(None, x, y, kept0, meca.MecaParams(rounds=5, stop="one_label"), base, seed=0)
    assert [r["round"] for r in stopped] == [0, 1, 2]
    assert stopped[-1]["fit_by_label"] == [0.95, 0.05, 0.0, 0.05]
    script = iter([np.concatenate([np.arange(100) < 100 * s for s in shares]) for shares in by_label])
    rounds = meca.MecaParams(rounds=5, stop="rounds")
    assert len(meca.enhance(None, x, y, kept0, rounds, base, seed=0)) == 5


def test_no_stage_before_evaluation_reads_ground_truth():
    # the stopping rule runs in the enhance stage: it, and every stage but evaluate, get no ground-truth input
    for stage in meca.DEFENSE.stages:
        assert "truth" not in stage.upstream, stage.name
    enhance = next(s for s in meca.DEFENSE.stages if s.name == "enhance")
    assert set(enhance.upstream) == {"data", "warmup", "partition"}


# ---------------------------------------------------------------------------------------------- identification


def _fitted_target(n_other: int = 30):
    """Label 0: 10 poison (ids 0-9, low KL and losses) and 10 clean (ids 10-19), all fitted but id 19; labels 1 and
    2: n_other samples each, one of them fitted, the others predicted as label 0 (the sink the enhancement sends other
    classes to). Returns the enhanced model's predictions, labels, warm-up KL, warm-up loss, early loss (the same as
    the warm-up's), enhanced loss."""
    labels = np.concatenate([np.zeros(20, int), np.ones(n_other, int), np.full(n_other, 2)])
    predicted = np.zeros_like(labels)
    predicted[19] = 1
    predicted[20], predicted[20 + n_other] = 1, 2
    kl = np.concatenate([np.linspace(0.0, 0.1, 10), np.linspace(1.0, 2.0, 10), np.ones(2 * n_other)])
    loss = np.concatenate([np.linspace(0.0, 0.1, 10), np.linspace(0.5, 1.5, 10), np.ones(2 * n_other)])
    enhanced = np.concatenate([np.linspace(0.0, 0.1, 10), np.linspace(0.2, 0.4, 10), np.ones(2 * n_other)])
    return predicted, labels, kl, loss, loss.copy(), enhanced


def test_paper_identification_is_line_12():
    predicted, labels, *views = _fitted_target()
    fit = predicted == labels
    clean, weight, label = meca.identify(predicted, labels, *views, meca.MecaParams(identify="paper"))
    assert np.array_equal(clean, ~fit) and np.array_equal(weight, (~fit).astype(float)) and label is None


def test_per_label_identification_returns_the_least_poison_like_share_of_the_over_fitted_label():
    predicted, labels, *scores = _fitted_target()
    params = meca.MecaParams(label_keep=0.25, balance=False, guard=0)
    clean, weight, label = meca.identify(predicted, labels, *scores, params)
    assert label == 0
    # label 0's unfitted sample (line 12) and the fitted quarter with the highest mean rank of the three views (of
    # 19: 5 samples)
    assert np.flatnonzero(clean[:20]).tolist() == [14, 15, 16, 17, 18, 19]
    assert clean[20:].all()  # the other labels stay clean, fitted or not
    assert np.array_equal(weight, clean.astype(float))


def test_the_enhanced_models_confidence_is_one_of_the_three_views():
    predicted, labels, kl, loss, early, enhanced = _fitted_target()
    loss[:19] = loss[:19][::-1]  # the warm-up's two views now cancel out over label 0's fitted samples (ids 0-18)
    enhanced[:19] = np.linspace(1.0, 0.0, 19)  # and the enhanced model fits ids 0-4 the least surely
    clean, _, _ = meca.identify(predicted, labels, kl, loss, early, enhanced,
                                 meca.MecaParams(label_keep=0.25, balance=False, guard=0))
    assert np.flatnonzero(clean[:20]).tolist() == [0, 1, 2, 3, 4, 19]


def test_balance_weighs_the_returned_share_as_the_median_other_label():
    predicted, labels, *scores = _fitted_target()
    clean, weight, _ = meca.identify(predicted, labels, *scores, meca.MecaParams(label_keep=0.25, guard=0))
    # labels 1 and 2 keep their 30 samples each in the clean pool, label 0 one by line 12: 29 weight for the 5
    assert weight[14:19].tolist() == [29 / 5] * 5 and weight[19] == 1.0
    assert weight[clean & (labels > 0)].tolist() == [1.0] * 60 and not weight[~clean].any()


def test_the_suspect_label_is_the_most_predicted_one_or_with_fitted_the_most_fitted_one():
    predicted, labels, *scores = _fitted_target()
    predicted[21:50] = 1  # label 1 all fitted (1.0, label 0: 0.95), the rest of label 2 still sent to label 0
    assert meca.suspect_label(predicted, labels) == 0 and meca.suspect_label(predicted, labels, "fitted") == 1
    clean, _, label = meca.identify(predicted, labels, *scores, meca.MecaParams(suspect_label="predicted"))
    assert label == 0 and clean[20:].all() and not clean[:10].any()
    clean, _, label = meca.identify(predicted, labels, *scores, meca.MecaParams(suspect_label="fitted", guard=0))
    assert label == 1 and clean[:20].all() and not clean[21:50].all()


def test_identify_stage_reads_no_ground_truth():
    identify = next(s for s in meca.DEFENSE.stages if s.name == "identify")
    assert set(identify.upstream) == {"data", "enhance", "warmup", "early", "score"}


def test_relabel_all_is_eq_12_and_agree_keeps_only_suspects_predicted_as_their_label():
    suspect = np.array([False, True, True, True])
    predicted = np.array([3, 0, 2, 1])
    labels = np.array([3, 0, 0, 1])
    assert meca.relabels(suspect, predicted, labels, "all").tolist() == [-1, 0, 2, 1]
    # the suspect predicted as another class is left out, not given that class
    assert meca.relabels(suspect, predicted, labels, "agree").tolist() == [-1, 0, -1, 1]


def test_the_second_pass_returns_the_suspect_labels_samples_the_clean_model_vouches_for():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    first = np.array([False, False, True, False, True, True, True, False])  # sample 7: another label's suspect
    clean_predicted = np.array([0, 1, 2, 0, 1, 0, 2, 2])
    clean = meca.vouched(first, labels, 0, clean_predicted)
    # label 0: sample 0 and 3 predicted 0 return, sample 1 (a dirty-label poison predicted as its own class 1) stays
    # out, sample 2 was clean already; sample 7 is not of the suspect label and stays out though predicted as its own
    assert clean.tolist() == [True, False, True, True, True, True, True, False]
    weight = meca.balance_weights(clean, labels, 0, np.array([0, 3]))
    # label 0 holds 3 clean samples, 2 of them returned; the median other label holds 1.5 (labels 1 and 2: 2 and 1)
    assert weight.tolist() == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    # label 1 keeps only sample 7, returned: it weighs as the 4 samples of label 0
    pool = np.array([True, True, True, True, False, False, False, True])
    assert meca.balance_weights(pool, np.array([0, 0, 0, 0, 1, 1, 1, 1]), 1, np.array([7]))[7] == 4.0


def test_loss_vote_names_the_label_the_warm_up_fits_first_wherever_the_enhancement_went():
    predicted, labels, kl, loss, _, enhanced = _fitted_target()
    predicted[:] = 2  # the enhancement collapsed onto label 2
    assert meca.suspect_label(predicted, labels) == 2
    # the 4 lowest warm-up losses of 80 (5 %) are label 0's ids 0-3
    assert meca.suspect_label(predicted, labels, "loss_vote", loss, 0.05) == 0
    loss[20:24] = -1.0  # now label 1's ids 20-23 are the lowest
    assert meca.suspect_label(predicted, labels, "loss_vote", loss, 0.05) == 1
    with pytest.raises(ValueError, match="warm-up loss"):
        meca.suspect_label(predicted, labels, "loss_vote")


def test_the_guard_holds_the_labels_samples_below_the_other_labels_loss_quantile():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2])
    loss = np.array([0.01, 0.2, 0.5, 2.0, 0.1, 0.3, 0.6, 0.9, 1.2, 0.2, 0.4, 0.7, 1.0, 1.5])
    # the other labels' losses: 0.1 0.2 0.3 0.4 0.6 0.7 0.9 1.0 1.2 1.5; their 0.2-quantile is 0.28
    assert meca.low_loss(loss, labels, 0, 0.2).tolist() == [True, True] + [False] * 12
    assert not meca.low_loss(loss, labels, 0, 0.0).any()
    assert meca.low_loss(loss, labels, 1, 0.5).tolist() == [False] * 4 + [True, True, False, False, False] + [False] * 5


def test_identification_keeps_a_guarded_sample_suspect_though_the_enhanced_model_misses_it():
    predicted, labels, kl, loss, early, enhanced = _fitted_target()
    predicted[:10] = 1  # the enhanced model misses the ten poison (line 12 alone would call them clean)
    params = meca.MecaParams(label_keep=0.25, balance=False, guard=0.2)  # others' losses all 1: ids 0-14 are below
    clean, _, label = meca.identify(predicted, labels, kl, loss, early, enhanced, params)
    assert label == 0 and not clean[:15].any()
    assert clean[15:20].all()  # above the guard: the unfitted id 19 and the least poison-like fitted ones return
    clean, _, _ = meca.identify(predicted, labels, kl, loss, early, enhanced, params.model_copy(update={"guard": 0.0}))
    assert clean[:10].all()  # without the guard line 12 lets the missed poison through


def test_line_12_inside_the_label_is_trusted_only_when_the_enhancement_concentrated_on_it():
    predicted, labels, kl, loss, early, enhanced = _fitted_target()
    predicted[:10] = 1  # the enhanced model misses the ten poison
    params = meca.MecaParams(label_keep=0.25, balance=False, guard=0.0, trust_fit="concentrated")
    on_label = [{"fit_by_label": [0.95, 0.03, 0.03]}]
    elsewhere = [{"fit_by_label": [0.95, 0.0, 0.0]}, {"fit_by_label": [0.10, 0.0, 0.97]}]  # the last round counts
    assert meca.focused(on_label, 0, params) and not meca.focused(elsewhere, 0, params)
    assert not meca.focused([{"fit_by_label": [0.85, 0.03, 0.03]}], 0, params)  # below stop_high: not concentrated
    clean, _, label = meca.identify(predicted, labels, kl, loss, early, enhanced, params, on_label)
    assert label == 0 and clean[:10].all()  # concentrated on the label: its misses are clean (line 12)
    clean, _, _ = meca.identify(predicted, labels, kl, loss, early, enhanced, params, elsewhere)
    # elsewhere: the whole label is suspect, and of its 20 samples the 5 least poison-like (ids 15-19) return
    assert np.flatnonzero(clean[:20]).tolist() == [15, 16, 17, 18, 19] and clean[20:].all()
    always = params.model_copy(update={"trust_fit": "always"})
    assert meca.identify(predicted, labels, kl, loss, early, enhanced, always, elsewhere)[0][:10].all()


def test_the_guard_holds_what_either_the_warm_up_or_the_early_model_fits_below_the_other_labels():
    predicted, labels, kl, loss, early, enhanced = _fitted_target()
    predicted[:10] = 1  # the enhanced model misses the ten poison
    loss[:5] = 1.5  # the warm-up does not fit ids 0-4 (above the other labels' losses, all 1) ...
    early[5:10] = 1.5  # ... nor does the early model fit ids 5-9
    params = meca.MecaParams(label_keep=0.25, balance=False, guard=0.2)
    label, low = meca.suspect_and_guard(predicted, labels, loss, early, params)
    assert label == 0 and low[:10].all()  # each poison is below on one of the two losses
    clean, _, _ = meca.identify(predicted, labels, kl, loss, early, enhanced, params)
    assert not clean[:10].any()
    # the warm-up's loss alone (the early model's the same) lets ids 0-4 through line 12
    clean, _, _ = meca.identify(predicted, labels, kl, loss, loss, enhanced, params)
    assert clean[:5].all() and not clean[5:10].any()


def test_label_rank_is_the_delivered_labels_place_among_the_models_classes():
    logits = np.array([[3.0, 2.0, 1.0], [0.1, 0.5, 0.2], [1.0, 0.0, 2.0]])
    assert meca.label_rank(logits, np.array([0, 0, 0])).tolist() == [0, 2, 1]
    assert meca.label_rank(logits, np.array([1, 1, 2])).tolist() == [1, 0, 0]


def test_the_second_pass_never_vouches_for_a_guarded_sample():
    labels = np.array([0, 0, 0, 1, 1])
    first = np.array([False, False, False, True, True])
    clean_predicted = np.array([0, 0, 1, 1, 1])  # a clean-label poison (id 0) is predicted as its label too
    guarded = np.array([True, False, False, False, False])
    assert meca.vouched(first, labels, 0, clean_predicted, guarded).tolist() == [False, True, False, True, True]
    assert meca.vouched(first, labels, 0, clean_predicted).tolist() == [True, True, False, True, True]


def test_vouch_stage_reads_no_ground_truth_and_final_training_trains_on_its_pool():
    stages_ = {s.name: s for s in meca.DEFENSE.stages}
    # identification's decision comes as its guard table: the enhanced, warm-up and early models are not read again
    assert set(stages_["vouch"].upstream) == {"data", "identify", "first_train"}
    assert stages_["vouch"].inputs["guard"] == "identify/guard.parquet"
    assert stages_["final_train"].inputs["split"] == "vouch/split.parquet"
    assert stages_["relabel_finetune"].inputs["split"] == "vouch/split.parquet"


def test_the_early_model_is_the_protocols_training_cut_to_its_early_share():
    from components.config import load_config

    cfg = load_config("cpu", {"meca.early_share": 0.3})
    early = next(s for s in meca.DEFENSE.stages if s.name == "early")
    given = early.params(cfg)["params"]
    assert cfg.train.epochs == 10 and given.epochs == 3 and given.model_dump(exclude={"epochs"}) == \
        cfg.train.model_copy(update={"seed": cfg.seed}).model_dump(exclude={"epochs"})
    assert early.upstream == ("data",)  # the delivered data only: no ground truth, no other model
    assert meca.early_epochs(cfg.train, meca.MecaParams()) == 2  # the CPU protocol's: 2 of 10
    assert meca.early_epochs(cfg.train.model_copy(update={"epochs": 20}), meca.MecaParams()) == 4  # the demo's
    assert meca.early_epochs(cfg.train.model_copy(update={"epochs": 1}), meca.MecaParams()) == 1  # never none
