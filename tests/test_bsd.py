"""BSD (paper 003) and the MixMatch loop it shares with ASD and DBD: sharpening, the mixup coefficient and the lambda_u
ramp by hand, Eq. 11's schedule at its anchors, Eq. 8's class completion and Eq. 10's dropping on toy tables, Eq. 6's
distance on hand-made features, the target estimate on a toy loss vector, and an end-to-end run on the shipped
sample."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from components import engine, semisup
from components.config import load_config
from components.defenses import bsd, get
from components.errors import UnpoisonError
from components.models import build_model
from components.params import TrainParams
from pipelines import local

CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------------------- MixMatch

def test_sharpening_by_hand():
    p = torch.tensor([[0.6, 0.4], [0.5, 0.5]])
    # T = 0.5: p^2 normalized: 0.36 / 0.52, 0.16 / 0.52
    torch.testing.assert_close(semisup.sharpen(p, 0.5), torch.tensor([[0.36 / 0.52, 0.16 / 0.52], [0.5, 0.5]]))
    torch.testing.assert_close(semisup.sharpen(p, 1.0), p)  # T = 1 leaves it as it is


def test_mix_coefficient_keeps_the_larger_share():
    assert semisup.mix_coefficient(0.3) == pytest.approx(0.7)
    assert semisup.mix_coefficient(0.8) == pytest.approx(0.8)
    assert semisup.mix_coefficient(0.5) == pytest.approx(0.5)


def test_lambda_u_ramps_linearly_then_stays():
    assert semisup.rampup_weight(15, 0, 120) == 0
    assert semisup.rampup_weight(15, 30, 120) == pytest.approx(3.75)
    assert semisup.rampup_weight(15, 60 + 512 / 1024, 120) == pytest.approx(15 * 60.5 / 120)  # t = epoch + it / its
    assert semisup.rampup_weight(15, 120, 120) == 15 and semisup.rampup_weight(15, 500, 120) == 15


def test_mixmatch_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, -1.0]])
    targets = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    loss, lx, lu = semisup.mixmatch_loss(logits, targets, n_labelled=1, weight=2.0)
    assert lx.item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 1)))  # Eq. 13
    p = torch.softmax(logits[1:], 1)
    assert lu.item() == pytest.approx(((p - targets[1:]) ** 2).mean().item())  # Eq. 14, mean over samples and classes
    assert loss.item() == pytest.approx(lx.item() + 2.0 * lu.item())  # Eq. 15


def test_mixmatch_epoch_trains_and_repeats_with_the_same_generator():
    x = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8)
    y = torch.arange(40) % 10
    p = TrainParams(optimizer="adam", lr=0.002, weight_decay=0.0, batch_size=8, channels_last=False)
    mm = semisup.MixMatchParams(iterations=2)
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model("small_cnn", 10)
        opt = engine.optimizer(model, p)
        rec = semisup.epoch(model, opt, x, y, torch.arange(5), torch.arange(5, 40), p, mm, epoch=3, rampup=10,
                            num_classes=10, gen=torch.Generator().manual_seed(1), device=CPU)
        outs.append(torch.cat([t.flatten() for t in model.state_dict().values() if t.is_floating_point()]))
    assert torch.equal(outs[0], outs[1])  # a pool smaller than the batch is cycled; the epoch is reproducible
    assert rec["lambda_u"] == pytest.approx(15 * (3 + 1 / 2) / 10) and rec["labelled"] == 5 and rec["unlabelled"] == 35
    with pytest.raises(UnpoisonError, match="labelled pool"):
        semisup.epoch(model, opt, x, y, torch.arange(0), torch.arange(40), p, mm, epoch=0, rampup=10, num_classes=10,
                      gen=torch.Generator(), device=CPU)
    seen = []  # `lr`, a function of t, sets the rate before every iteration
    semisup.epoch(model, opt, x, y, torch.arange(5), torch.arange(5, 40), p, mm, epoch=3, rampup=10, num_classes=10,
                  gen=torch.Generator(), device=CPU, lr=lambda t: seen.append(t) or t / 100)
    assert seen == [3.0, 3.5] and opt.param_groups[0]["lr"] == pytest.approx(0.035)


# --------------------------------------------------------------------------------------------------- BSD

def test_alpha_schedule_at_its_anchor_epochs():
    def a(t):
        return bsd.alpha_schedule(t, t1=20, t2=90, fixed=10, alpha=0.6, beta=0.2)

    assert a(30) == pytest.approx(0.2)  # T = T_1 + 10: beta
    assert a(60) == pytest.approx(0.4)  # halfway: (alpha + beta) / 2
    assert a(90) == pytest.approx(0.6) and a(119) == pytest.approx(0.6)  # T_2 and after: alpha
    assert a(45) == pytest.approx(0.2 + 0.4 * (1 - math.cos(math.pi * 0.25)) / 2)


def test_class_completion_tops_up_the_fewest_class():
    # 12 samples, classes 0 / 1 / 2 with 4 each; share 0.5 takes the 6 highest I
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    score = np.array([9, 8, 7, 1, 6, 5, 0.5, 0.4, 4, 0.3, 0.2, 0.1])
    first = bsd.top_share(score, 0.5)
    assert first.tolist() == [True, True, True, False, True, True, False, False, True, False, False, False]
    clean, info = bsd.class_completion(score, labels, 0.5, 3)
    # class 2 has the fewest (1); n'_2 = min(0.5 * 4, N_secondFew = 2) = 2: its 2 highest I (samples 8, 9)
    assert info == {"completed_class": 2, "completion_added": 1, "completion_tie": False}
    assert clean.tolist() == (first | (np.arange(12) == 9)).tolist()
    # n'_i capped by the second-fewest count: the share's half of class 2 is 4, the second-fewest (class 1) holds 2
    labels8 = np.array([0] * 4 + [1] * 4 + [2] * 8)
    score8 = np.array([9, 8, 7, 6, 5, 4, 0, 0, 3.5, 3, 2, 1, 0.5, 0.4, 0.3, 0.2])
    clean, info = bsd.class_completion(score8, labels8, 0.5, 3)  # top 8: class 0 x4, class 1 x2, class 2 x2
    assert info["completed_class"] == 1 and info["completion_added"] == 0  # min(0.5 * 4, 2) = 2: nothing to add
    # a tie of the two fewest changes nothing, and says so
    clean, info = bsd.class_completion(np.arange(6.0), np.array([0, 0, 1, 1, 2, 2]), 0.34, 3)
    assert info["completion_tie"] and info["completion_added"] == 0


def test_every_class_completion_gives_each_class_its_share_of_a_typical_class():
    # classes 0 / 1 / 2 with 4 / 4 / 8 samples (class 2 inflated, as relabelled poison inflates the target): median 4
    labels = np.array([0] * 4 + [1] * 4 + [2] * 8)
    score = np.array([9, 8, 7, 6, 0.1, 0.4, 0.3, 0.2, 5, 4, 3, 2, 1, 0.9, 0.8, 0.7])
    assert not bsd.top_share(score, 0.5)[4:8].any()  # the global top half holds no sample of class 1
    clean, info = bsd.every_class_completion(score, labels, 0.5, 3)
    # class 0: its top 2; class 1: its top 2 (0.4, 0.3); class 2: 0.5 * min(8, 4) = 2 of 8, its top 2 (5, 4)
    assert np.flatnonzero(clean).tolist() == [0, 1, 5, 6, 8, 9]
    assert info["completed_class"] is None and info["completion_added"] == 2  # 5 and 6; the global top 8 has the rest
    # balanced classes: every class its own top share; an absent class takes no part
    labels = np.array([0, 0, 2, 2])
    clean, _ = bsd.every_class_completion(np.array([1.0, 2.0, 4.0, 3.0]), labels, 0.5, 3)
    assert clean.tolist() == [False, True, True, False]


def test_selective_dropping_removes_what_both_models_call_the_target():
    clean = np.array([True, True, True, True, False])
    pred_f = np.array([3, 3, 1, 3, 3])
    pred_g = np.array([3, 1, 3, 3, 3])
    assert bsd.selective_dropping(clean, pred_f, pred_g, 3).tolist() == [False, True, True, False, False]


def test_oss_distance_on_hand_made_features():
    feats = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 0.0], [10.0, 2.0], [1.0, 0.0], [3.0, 4.0]])
    labels = np.array([0, 0, 1, 1, 2, 2])  # centres: class 0 (1, 0), class 1 (10, 1); class 2 is the target
    d = bsd.oss_distance(feats, labels, target=2)
    assert d[4] == pytest.approx(0.0)  # (1, 0) sits on class 0's centre
    assert d[5] == pytest.approx(math.sqrt(4 + 16))  # (3, 4): nearest centre (1, 0)
    assert d[2] == pytest.approx(1.0)
    with pytest.raises(UnpoisonError, match="other classes"):
        bsd.oss_distance(feats, np.full(6, 2), target=2)


def test_initial_pools_intersect_als_and_oss():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])  # target 1: D_t = samples 4-9
    als = np.array([9, 8, 7, 6, 5, 4, 3, 2, 1, 0.0])  # the top half: samples 0-4
    dist = np.array([np.nan] * 4 + [0.1, 5.0, 4.0, 0.2, 0.3, 0.4])
    parts = bsd.initial_pools(als, dist, labels, 1, alpha=0.5, beta=0.34)  # OSS: the 2 farthest of D_t (5, 6)
    assert parts["als"].tolist() == [True] * 5 + [False] * 5
    assert parts["oss"].tolist() == [True] * 4 + [False, True, True, False, False, False]
    assert parts["clean"].tolist() == [True] * 4 + [False] * 6  # Eq. 3: intersection


def test_target_estimate_on_a_toy_loss_vector():
    loss = np.array([0.9, 0.01, 0.8, 0.02, 0.7, 0.03, 0.6, 0.5, 0.4, 0.3] * 10)
    labels = np.array([0, 5, 1, 5, 2, 7, 3, 4, 6, 8] * 10)
    target, votes = bsd.estimate_target(loss, labels, 0.01, 10)  # the lowest 1 of 100: loss 0.01, label 5
    assert target == 5 and votes.sum() == 1
    target, votes = bsd.estimate_target(loss, labels, 0.3, 10)  # the lowest 30: 0.01 x10, 0.02 x10 (5), 0.03 x10 (7)
    assert target == 5 and votes[5] == 20 and votes[7] == 10


def test_local_gradient_ascent_flips_the_sign_below_gamma():
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0]], requires_grad=True)
    y = torch.tensor([0, 0])
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    out = bsd.local_gradient_ascent(0.5)(logits, y, torch.arange(2))  # batch mean 2.5 > 0.5: descent
    torch.testing.assert_close(out, ce)
    out = bsd.local_gradient_ascent(10.0)(logits, y, torch.arange(2))  # below gamma: ascent
    torch.testing.assert_close(out, -ce)
    out = bsd.local_gradient_ascent(0.5, per_sample=True)(logits, y, torch.arange(2))
    torch.testing.assert_close(out, torch.stack([-ce[0], ce[1]]))


def test_co_training_resumes_from_its_checkpoint_to_the_same_weights(tmp_path):
    x = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8)
    y = torch.arange(40) % 10
    params = bsd.BsdParams(t1=1, fixed_epochs=0, t2=1, t3=2, mixmatch={"iterations": 1})  # g trains in epoch 0
    semi = TrainParams(optimizer="adam", lr=0.002, weight_decay=0.0, batch_size=8, channels_last=False)
    alt = semi.model_copy(update={"lr": 1e-3, "batch_size": 16})
    clean = np.arange(40) < 20

    def pools(epoch, f, g):
        return clean, {"phase": "toy"}

    def run(stop, folder):
        torch.manual_seed(0)
        f, g = build_model("small_cnn", 10), build_model("small_cnn", 10)
        history, masks, _ = bsd.co_train(f, g, x, y, range(0, stop), pools, semi=semi, alt=alt, params=params,
                                         num_classes=10, checkpoint_file=folder / "c.pt", key="k")
        return f, history

    f_once, h_once = run(2, tmp_path / "once")
    run(1, tmp_path / "twice")  # interrupted after one epoch
    f_resumed, h_resumed = run(2, tmp_path / "twice")
    assert [h["loss"] for h in h_resumed] == [h["loss"] for h in h_once]
    for a, b in zip(f_once.state_dict().values(), f_resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_configuration_keeps_the_paper_proportions_and_rejects_bad_phases():
    cpu, paper = load_config("cpu").bsd, load_config("paper").bsd
    assert (paper.altruistic_epochs, paper.t1, paper.fixed_epochs, paper.t2, paper.t3, paper.mixmatch.iterations) == \
        (25, 20, 10, 90, 120, 1024)
    assert (cpu.t1, cpu.fixed_epochs, cpu.t2, cpu.t3) == (2, 1, 9, 12)  # the paper's phases / 10
    assert bsd.semi_params(load_config("cpu")).lr == 0.002 and bsd.semi_params(load_config("cpu")).batch_size == 64
    with pytest.raises(UnpoisonError, match="t1 \\+ fixed_epochs <= t2 <= t3"):
        load_config("cpu", {"bsd.t2": 20})
    with pytest.raises(UnpoisonError, match="beta"):
        load_config("cpu", {"bsd.beta": 0.9})
    # a partial override changes those keys of f's and g's settings, not the whole dict
    c = load_config("cpu", {"bsd.semi.schedule": "cosine", "bsd.altruistic.lr": 0.01})
    assert (bsd.semi_params(c).optimizer, bsd.semi_params(c).lr, bsd.semi_params(c).schedule) == ("adam", 0.002, "cosine")
    assert (bsd.altruistic_params(c).optimizer, bsd.altruistic_params(c).lr) == ("adam", 0.01)
    with pytest.raises(UnpoisonError, match="'constant' \\(the paper's\\), 'cosine' or 'onecycle'"):
        load_config("cpu", {"bsd.semi.schedule": "step"})


def test_semi_lr_at_its_anchors():
    assert bsd.semi_lr(0.002, "cosine", 0, 12) == 0.002
    assert bsd.semi_lr(0.002, "cosine", 6, 12) == pytest.approx(0.001)
    assert bsd.semi_lr(0.002, "cosine", 12, 12) == 0 and bsd.semi_lr(0.002, "cosine", 13, 12) == 0
    assert bsd.semi_lr(0.1, "onecycle", 0, 12) == pytest.approx(0.004)  # lr / 25
    assert bsd.semi_lr(0.1, "onecycle", 3, 12) == pytest.approx(0.1)  # the peak at a quarter
    assert bsd.semi_lr(0.1, "onecycle", 12, 12) == pytest.approx(0.1 / 25e4)
    assert bsd.semi_lr(0.002, "constant", 7, 12) == 0.002


def test_no_stage_reads_the_ground_truth():
    for st in get("bsd").stages:
        assert all("samples.parquet" not in r and not r.startswith("truth") for r in st.inputs.values()), st.name


# ---------------------------------------------------------------------------------------------- end to end

# g's warm-up 2 epochs, both voting; one epoch per phase: warm-up (0), initial pools (1), class completion (2), selective dropping (3); 3 iterations each
SMALL = {"train_limit": 300, "bsd.altruistic_epochs": 2, "bsd.target_window": 1.0, "bsd.t1": 1, "bsd.fixed_epochs": 1, "bsd.t2": 3,
         "bsd.t3": 4, "bsd.mixmatch.iterations": 3}


@pytest.fixture(scope="module")
def bsd_run(tmp_path_factory, mini_sample):
    root = tmp_path_factory.mktemp("runs")
    return local.run("bsd", load_config("cpu", {**SMALL, "data": mini_sample}), root, mlflow_uri=None, name="bsd-e2e")


def test_bsd_run_repartitions_every_epoch_and_reports_the_pools(bsd_run):
    history = json.loads((bsd_run / "final_train" / "history.json").read_text())
    assert [h["phase"] for h in history] == ["initial pools", "class completion", "selective dropping"]
    assert [h["T"] for h in history] == [1, 2, 3] and history[-1]["alpha_t"] == 0.6
    assert "altruistic_loss" in history[1] and "altruistic_loss" not in history[2]  # g frozen from T_2
    pools = pq.read_table(bsd_run / "final_train" / "pools.parquet").to_pydict()
    assert sorted(set(pools["epoch"])) == [1, 2, 3] and len(pools["clean"]) == 3 * 300
    initial = np.array(pq.read_table(bsd_run / "partition" / "split.parquet").to_pydict()["pool"]) == "clean"
    assert initial.sum() <= 60 and np.array_equal(np.array(pools["clean"][:300]), initial)  # beta = 20 %
    # cpu.yaml completes every class: at T 2 (alpha_T = beta) each class keeps 20 % of at most a median class's size
    labels = np.load(bsd_run / "poison" / "dataset.npz")["labels"]
    sizes = np.bincount(labels)
    kept = np.bincount(labels[np.array(pools["clean"][300:600])], minlength=len(sizes))
    assert kept.tolist() == [round(0.2 * min(n, np.median(sizes[sizes > 0]))) for n in sizes]
    assert history[0]["lr"] < 0.002 and history[-1]["lr"] < history[0]["lr"]  # f's Adam lr on a cosine over T_3
    scores = pq.read_table(bsd_run / "score" / "scores.parquet").to_pydict()
    target = json.loads((bsd_run / "target" / "target.json").read_text())
    assert np.isnan(np.array(scores["oss_distance"])[labels != target["target"]]).all()
    # 1 % of 300 votes after each of g's 2 warm-up epochs, added up; the estimate is the sum's argmax
    g_votes = [h["target_votes"] for h in json.loads((bsd_run / "altruistic" / "history.json").read_text())]
    assert len(g_votes) == 2 and all(sum(v) == 3 for v in g_votes) and target["voting_epochs"] == 2
    assert target["votes"] == np.sum(g_votes, axis=0).tolist() and target["voters"] == 6
    assert target["estimate"] == int(np.argmax(target["votes"])) and target["last_epoch_votes"] == g_votes[-1]
    m = json.loads((bsd_run / "metrics.json").read_text())
    assert m["defended"] == "bsd" and set(m["models"]) == {"altruistic", "warmup", "bsd"}
    assert [r["epoch"] for r in m["epoch_pools"]] == [1, 2, 3] and "clean_poison_rate" in m["epoch_pools"][0]
    assert m["target_estimate"]["real"] == 0 and m["target_estimate"]["estimate"] == target["estimate"]
    assert {"als_sce", "oss_distance", "indicator"} <= set(m["scores"])
    report = (bsd_run / "report.md").read_text()
    assert "## Pools per epoch" in report and "## Target estimate" in report
