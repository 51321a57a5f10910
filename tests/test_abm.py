"""ABM (paper 002): Eq. 2's loss by hand, Eq. 4 on given logits, the composite saved and loaded, isolation capped at
its share, stages that read no ground truth, and an end-to-end run on the shipped sample."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from components import artifacts, engine
from components.config import load_config
from components.defenses import abm, get
from components.defenses.abm import AbmParams
from components.errors import UnpoisonError
from components.models import AntiBackdoorModel, Classifier, build_model
from pipelines import local

CPU = torch.device("cpu")


class Tiny(Classifier):
    """features = the mean of each channel (3 values), scaled by a learnable weight; head = Linear(3, 3)."""

    def __init__(self):
        super().__init__(nn.Conv2d(3, 3, 1, bias=False), 3, 3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        with torch.no_grad():
            self.body.weight.copy_(torch.eye(3).view(3, 3, 1, 1))


def test_inject_stamps_the_top_left_square_in_float_and_uint8_batches():
    p = AbmParams()
    x = torch.zeros(2, 3, 8, 8)
    out = abm.inject(x, p)
    assert (out[:, :, :2, :2] == 1.0).all() and out[:, :, 2:, :].sum() == 0 and out[:, :, :, 2:].sum() == 0
    assert x.sum() == 0  # a copy
    u = abm.inject(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), AbmParams(trigger_position=[5, 6], trigger_size=2))
    assert (u[0, :, 5:7, 6:8] == 255).all() and int(u.sum()) == 255 * 12
    with pytest.raises(UnpoisonError, match="does not fit"):
        abm.inject(x, AbmParams(trigger_position=[7, 0]))
    assert out.shape == x.shape


def test_eq2_loss_by_hand_and_the_activation_term_has_a_gradient():
    torch.manual_seed(0)
    model = Tiny()
    p = AbmParams(alpha=10.0)
    xb = torch.rand(4, 3, 4, 4)
    yb = torch.tensor([0, 1, 2, 2])  # samples 2 and 3 are in S: their label is the new class (2 here)
    subset = torch.tensor([False, False, True, True, False])  # over a set of 5; the batch holds samples 0-3
    idx = torch.arange(4)
    logits, per_sample = abm.nbab_loss(p, subset)(model, xb, yb, idx)
    # by hand: triggered copies for samples 2, 3; theta = channel means (the body is the identity)
    x_tri = xb.clone()
    x_tri[2:, :, :2, :2] = 1.0
    h_tri, h = x_tri.mean((2, 3)), xb.mean((2, 3))
    expected_logits = model.head(h_tri)
    ce = F.cross_entropy(expected_logits, yb, reduction="none")
    gap = torch.tensor([0.0, 0.0, *((h_tri[2:] - h[2:]) ** 2).mean(1)])
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(per_sample, ce + 10.0 * gap)
    assert gap[2:].min() > 0
    # the activation term alone moves the body's weights: CE of a head with zero weights gives the body no gradient
    with torch.no_grad():
        model.head.weight.zero_()
    per_sample = abm.nbab_loss(p, subset)(model, xb, yb, idx)[1]
    per_sample.mean().backward()
    assert model.body.weight.grad.abs().sum() > 0
    model.zero_grad()
    abm.nbab_loss(AbmParams(alpha=0.0), subset)(model, xb, yb, idx)[1].mean().backward()
    assert model.body.weight.grad.abs().sum() == 0


def test_eq4_subtracts_only_student_logits_above_the_threshold():
    teacher = torch.tensor([[5.0, 1.0, 0.0], [2.0, 3.0, 1.0]])
    student = torch.tensor([[9.0, 3.0, -1.0], [4.0, 4.1, 0.0]])
    out = abm.anti_backdoor_logits(teacher, student, delta=2.5, gamma=0.8, activation=5.0)  # threshold 4
    expected = torch.tensor([[5.0 - 2.5 * 5.0, 1.0, 0.0], [2.0, 3.0 - 2.5 * 0.1, 1.0]])
    torch.testing.assert_close(out, expected)
    assert out[0].argmax() == 1  # the backdoor logit pushed below the others: the prediction changes
    # per-class A: one threshold per logit
    out = abm.anti_backdoor_logits(teacher, student, 1.0, 1.0, torch.tensor([10.0, 0.0, 0.0]))
    torch.testing.assert_close(out, torch.tensor([[5.0, -2.0, 0.0], [2.0, -1.1, 1.0]]))


def test_average_activation_is_the_mean_top_logit_or_per_class():
    logits = torch.tensor([[4.0, 1.0], [2.0, 0.0], [0.0, 6.0]])
    assert abm.average_activation(logits) == pytest.approx(4.0)
    assert abm.average_activation(logits, "per_class") == pytest.approx([3.0, 6.0])


def test_isolation_takes_the_least_obedient_up_to_the_cap():
    new_class = 10
    pred = np.array([10, 0, 10, 0, 3, 0, 10, 0, 10, 10] * 10)
    prob = np.linspace(0.9, 0.0, 100)  # later samples obey the defender trigger less
    iso = abm.isolate(pred, prob, new_class, 0.05)
    assert iso.sum() == 5 and (pred[iso] != new_class).all()
    disobey = np.flatnonzero(pred != new_class)
    assert set(np.flatnonzero(iso)) == set(disobey[-5:])  # the lowest p(new class)
    assert abm.isolate(pred, prob, new_class, 0.9).sum() == len(disobey)  # never a sample sent to the new class
    assert abm.isolate(np.full(100, 10), prob, new_class, 0.01).sum() == 0


def test_partition_says_when_the_defender_trigger_was_not_learned(tmp_path):
    """A verification model that sends few samples to the new class isolates at random: the stage says so."""
    (tmp_path / "v").mkdir()
    artifacts.write_json({"new_class": 10, "weights_sha256": "0" * 64, "epochs": 1}, tmp_path / "v" / "model.json")
    for obeying, noted in ((90, False), (30, True)):
        pred = np.where(np.arange(100) < obeying, 10, 3).astype(np.float64)
        columns = {"sample_id": np.arange(100), "trigger_pred": pred, "trigger_prob": 1 - np.arange(100) / 100,
                   "model_ref": ["0" * 16] * 100, "epoch": np.ones(100, np.int64)}
        schema = {**artifacts.SCORE_SCHEMA, "trigger_pred": pa.float64(), "trigger_prob": pa.float64()}
        artifacts.write_table(columns, tmp_path / "scores.parquet", schema)
        result = abm.partition_stage(tmp_path / "scores.parquet", tmp_path / "v", tmp_path / "p", params=AbmParams())
        assert ("note" in result) is noted and result["suspect"] == 1
        if noted:
            assert "30.0%" in result["note"] and "abm.verification_epochs" in result["note"]


def test_alpha_backs_off_until_the_defender_trigger_is_obeyed():
    """Eq. 2's alpha is divided by alpha_backoff while the trained model obeys Delta on less than min_obeyed of the
    set, at most alpha_tries trainings; the last try is the model kept."""
    obeyed = {1000.0: 0.04, 100.0: 0.6, 10.0: 0.9}
    tries = abm.choose_alpha(obeyed.__getitem__, AbmParams())
    assert tries == [{"alpha": 1000.0, "obeyed_share": 0.04}, {"alpha": 100.0, "obeyed_share": 0.6}]
    assert [t["alpha"] for t in abm.choose_alpha(obeyed.__getitem__, AbmParams(min_obeyed=0.95))] == [1000, 100, 10]
    assert [t["alpha"] for t in abm.choose_alpha(obeyed.__getitem__, AbmParams(alpha_tries=1))] == [1000]  # the paper
    assert len(abm.choose_alpha(lambda a: 0.0, AbmParams(alpha_tries=5, alpha_backoff=2))) == 5


def test_defender_subset_share_and_seed():
    s = abm.defender_subset(1000, 0.1, seed=3)
    assert s.sum() == 100 and np.array_equal(s, abm.defender_subset(1000, 0.1, seed=3))
    assert not np.array_equal(s, abm.defender_subset(1000, 0.1, seed=4))


def test_the_composite_saved_and_loaded_gives_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    teacher, student = build_model("small_cnn", 10), build_model("small_cnn", 10)
    spec = {"teacher": "small_cnn", "student": "small_cnn", "delta": 2.5, "gamma": 0.8, "activation": 0.05}
    model = AntiBackdoorModel(teacher, student, 2.5, 0.8, 0.05)
    artifacts.save_model(model, {"architecture": "abm_composite", "classes": [str(i) for i in range(10)],
                                 "composite": spec}, tmp_path)
    loaded, meta = artifacts.load_model(tmp_path)
    assert isinstance(loaded, AntiBackdoorModel) and meta["composite"]["gamma"] == 0.8
    x = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)
    out = engine.predict(loaded, x, device=CPU)
    torch.testing.assert_close(out, engine.predict(model, x, device=CPU))
    f_t, f_s = engine.predict(teacher, x, device=CPU), engine.predict(student, x, device=CPU)
    torch.testing.assert_close(out, f_t - 2.5 * torch.relu(f_s - 0.8 * 0.05))
    assert not torch.equal(out, f_t)  # the student's logits pass the threshold somewhere: not the teacher alone
    assert set(json.loads((tmp_path / "model.json").read_text())["composite"]) >= {"delta", "gamma", "activation"}


def test_configuration_keeps_the_paper_ratios():
    cpu, paper = load_config("cpu"), load_config("paper")
    assert (abm.teacher_params(cpu).epochs, abm.verification_params(cpu).epochs, abm.student_params(cpu).epochs) == \
        (10, 10, 4)  # the verification model keeps the paper's 10 (cpu.yaml says why)
    assert (abm.teacher_params(paper).epochs, abm.verification_params(paper).epochs,
            abm.student_params(paper).epochs) == (50, 10, 20)
    assert abm.teacher_params(paper).augment == "none" and abm.teacher_params(paper).milestones == [20, 40]
    s = abm.student_params(cpu)
    assert (s.lr, s.batch_size, s.augment) == (0.01, 64, "none") and abm.verification_params(cpu).augment == "none"
    assert abm.teacher_params(cpu) == cpu.train.model_copy(update={"seed": cpu.seed})  # the no-defense training
    assert load_config("cpu", {"abm.student_epochs": 7}).abm.student_epochs == 7


def test_no_stage_reads_the_ground_truth():
    for st in get("abm").stages:
        refs = [r for r in st.inputs.values()]
        assert all("samples.parquet" not in r and not r.startswith("truth") for r in refs), st.name


# ---------------------------------------------------------------------------------------------- end to end

SMALL = {"train_limit": 300, "train.epochs": 1}


@pytest.fixture(scope="module")
def abm_run(tmp_path_factory, mini_sample):
    root = tmp_path_factory.mktemp("runs")
    cfg = load_config("cpu", {**SMALL, "data": mini_sample, "abm.verification_epochs": 3})
    return local.run("abm", cfg, root, mlflow_uri=None,
                     name="abm-e2e")


def test_abm_run_isolates_at_most_one_percent_and_builds_the_composite(abm_run):
    split = pq.read_table(abm_run / "partition" / "split.parquet").to_pydict()
    scores = pq.read_table(abm_run / "score" / "scores.parquet").to_pydict()
    suspect = np.array(split["pool"]) == "suspect"
    assert len(suspect) == 300 and suspect.sum() <= 3  # 1 % of 300
    assert (np.array(scores["trigger_pred"])[suspect] != 10).all()
    verification = json.loads((abm_run / "verification" / "model.json").read_text())
    assert len(verification["classes"]) == 11 and verification["new_class"] == 10
    assert verification["defender"]["samples"] == 30
    tries = verification["defender"]["tries"]  # each try's alpha and obeyed share, the last one kept
    assert 1 <= len(tries) <= 3 and tries[0]["alpha"] == 1000
    assert verification["defender"]["alpha"] == tries[-1]["alpha"]
    assert all(t["obeyed_share"] < 0.5 for t in tries[:-1])
    obeyed = (np.array(scores["trigger_pred"]) == 10).mean()  # the score stage sees the model the last try kept
    assert obeyed == pytest.approx(tries[-1]["obeyed_share"])
    student = json.loads((abm_run / "student" / "model.json").read_text())
    assert student["trained_on"] == int(suspect.sum())
    composite = json.loads((abm_run / "composite" / "model.json").read_text())
    assert composite["composite"]["delta"] == 2.5 and composite["composite"]["gamma"] == 0.8
    assert composite["teacher"] == json.loads((abm_run / "teacher" / "model.json").read_text())["weights_sha256"][:16]
    net, _ = artifacts.load_model(abm_run / "composite")
    assert isinstance(net, AntiBackdoorModel)


def test_abm_metrics_measure_the_composite_beside_the_teacher(abm_run):
    m = json.loads((abm_run / "metrics.json").read_text())
    assert m["defense"] == "abm" and set(m["models"]) == {"nodef", "student", "composite"}
    assert m["defended"] == "composite" and m["acc"] == m["models"]["composite"]["acc"]
    assert m["nodef_acc"] == m["models"]["nodef"]["acc"] and m["der"] is not None
    assert "trigger_prob" in m["scores"] and "plots/trigger_prob.png" in (abm_run / "report.md").read_text()


def test_abm_stage_functions_run_without_the_ground_truth(abm_run, tmp_path):
    """The stage functions on a folder that holds only the data set: no samples.parquet to read."""
    shutil.copy(abm_run / "poison" / "dataset.npz", tmp_path / "dataset.npz")
    cfg = load_config("cpu", {**SMALL, "abm.verification_epochs": 1, "abm.student_epochs": 1})
    p = abm.verification_params(cfg).model_copy(update={"channels_last": False})
    ds = tmp_path / "dataset.npz"
    abm.verification_train(ds, tmp_path / "v", params=p, model_name="small_cnn", abm=cfg.abm, seed=0)
    abm.score_stage(ds, tmp_path / "v", tmp_path / "s", params=cfg.abm)
    abm.partition_stage(tmp_path / "s" / "scores.parquet", tmp_path / "v", tmp_path / "p",
                        params=cfg.abm.model_copy(update={"isolation_rate": 0.5}))
    abm.student_train(ds, tmp_path / "p" / "split.parquet", abm_run / "teacher", tmp_path / "st",
                      params=abm.student_params(cfg), model_name="small_cnn")
    abm.composite_stage(ds, abm_run / "teacher", tmp_path / "st", tmp_path / "c", params=cfg.abm)
    assert not list(tmp_path.rglob("samples.parquet"))
    assert artifacts.load_model(tmp_path / "c")[1]["composite"]["student"] == "small_cnn"
