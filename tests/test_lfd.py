"""LfD (paper 004): Eq. 4's threshold and Eq. 6's weights on a hand-computed loss vector, the weighted student loss,
the configuration, and an end-to-end run on the shipped sample."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from components.config import load_config
from components.defenses import lfd
from components.defenses.lfd import LfdParams
from components.errors import UnpoisonError
from pipelines import local

# ten teacher losses; sorted: 0.1 0.2 0.3 | 0.5 1.0 1.5 2.0 3.0 4.0 5.0
LOSS = np.array([0.1, 2.0, 0.5, 4.0, 1.0, 3.0, 0.2, 5.0, 0.3, 1.5])


def test_threshold_is_the_loss_at_position_n_alpha_of_the_ascending_sort():
    assert lfd.threshold(LOSS, 0.3) == pytest.approx(0.3)  # index 10 * 0.3 = 3: the third lowest
    assert lfd.threshold(LOSS, 0.15) == pytest.approx(0.2)  # index round(1.5) = 2
    assert lfd.threshold(LOSS, 0.01) == pytest.approx(0.1)  # never below the first position
    assert (LOSS <= lfd.threshold(LOSS, 0.3)).sum() == 3  # exactly n * alpha candidates


def test_weights_follow_eq_6_by_hand():
    w = lfd.weights(LOSS, gamma=0.3, beta=0.01)
    m = 5.0  # the largest loss of the whole set
    expected = np.array([0.01 * (0.1 - 0.3) / (m - 0.3), 2.0 / m, 0.5 / m, 4.0 / m, 1.0 / m, 3.0 / m,
                         0.01 * (0.2 - 0.3) / (m - 0.3), 1.0, 0.0, 1.5 / m])
    np.testing.assert_allclose(w, expected)
    candidates = LOSS <= 0.3
    assert (w[candidates] <= 0).all() and (w[~candidates] > 0).all()
    # |w| of a candidate grows as its loss falls: the lowest loss gets the strongest ascent, at most beta gamma/(M-gamma)
    assert w.argmin() == LOSS.argmin() and -w.min() <= 0.01 * 0.3 / (m - 0.3)
    assert w.max() == 1.0 and w.argmax() == LOSS.argmax()


def test_the_maximum_is_taken_over_the_whole_set():
    outlier = np.append(LOSS, 50.0)
    w = lfd.weights(outlier, gamma=0.3, beta=0.01)
    np.testing.assert_allclose(w[1], 2.0 / 50.0)  # one outlier compresses every positive weight


def test_the_student_loss_is_its_own_cross_entropy_scaled():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0])
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(lfd.weighted_ce(3.0)(logits, y, torch.arange(2)), 3.0 * ce)


def test_configuration_checks_the_teacher_and_the_overrides():
    cfg = load_config("cpu", {"lfd.alpha": 0.2, "lfd.teacher": "resnet_s1"})
    assert cfg.lfd.alpha == 0.2 and lfd.teacher_params(cfg).optimizer == "adam"
    assert lfd.teacher_params(cfg).augment == "none" and lfd.teacher_params(cfg).epochs == 5
    with pytest.raises(UnpoisonError, match="unknown teacher 'resnet_x'"):
        load_config("cpu", {"lfd.teacher": "resnet_x"})
    with pytest.raises(UnpoisonError, match="unknown key 'epoch' in lfd.student"):
        load_config("cpu", {"lfd.student": {"epoch": 3}})
    paper = load_config("paper")  # section 5: Adam lr 1e-3, cosine, 80 epochs, crop + flip
    student = lfd.student_params(paper)
    assert (student.optimizer, student.lr, student.schedule, student.epochs, student.augment) == \
        ("adam", 0.001, "cosine", 80, "crop_flip")


# ---------------------------------------------------------------------------------------------- end to end

SMALL = {"train_limit": 1000, "train.epochs": 2, "lfd.teacher_train.epochs": 2}


@pytest.fixture(scope="module")
def lfd_run(tmp_path_factory, mini_sample):
    root = tmp_path_factory.mktemp("runs")
    return local.run("lfd", load_config("cpu", {**SMALL, "data": mini_sample}), root, mlflow_uri=None, name="lfd-e2e")


def test_lfd_run_weights_every_sample_and_trains_the_student_on_all(lfd_run):
    split = pq.read_table(lfd_run / "partition" / "split.parquet").to_pydict()
    loss = np.array(pq.read_table(lfd_run / "score" / "scores.parquet").column("teacher_loss"))
    w, pool = np.array(split["weight"]), np.array(split["pool"])
    assert len(w) == 1000 and (pool == "suspect").sum() == 150  # alpha 0.15 of 1000
    np.testing.assert_allclose(w, lfd.weights(loss, lfd.threshold(loss, 0.15), 1e-3))
    assert (w[pool == "suspect"] <= 0).all() and (w[pool == "clean"] > 0).all()
    teacher = json.loads((lfd_run / "warmup" / "model.json").read_text())
    student = json.loads((lfd_run / "final_train" / "model.json").read_text())
    assert teacher["architecture"] == "resnet_s" and student["architecture"] == "small_cnn"
    assert student["trained_on"] == 1000  # every sample, the candidates with their negative weights
    assert student["loss_scale"] == pytest.approx(1 / np.abs(w).mean())


def test_lfd_report_shows_the_teacher_loss_and_the_weights(lfd_run):
    m = json.loads((lfd_run / "metrics.json").read_text())
    assert m["defense"] == "lfd" and set(m["models"]) == {"teacher", "student"}
    assert 0 <= m["acc"] <= 1 and 0 <= m["detection_tpr"] <= 1 and "teacher_loss" in m["scores"]
    report = (lfd_run / "report.md").read_text()
    assert "plots/teacher_loss.png" in report and "plots/weight.png" in report
    assert (lfd_run / "evaluate" / "plots" / "weight.png").stat().st_size > 0
    page = (lfd_run / "report.html").read_text()  # standalone: every plot embedded, no link left to a file
    assert page.count("data:image/png;base64,") == report.count("![") and "](plots/" not in page
    assert "<table>" in page and "<td>lfd</td>" in page
