"""A-ABL (paper 001): Otsu's threshold, the split, PGD adversarial training through the engine, robust accuracy, the
configuration, an end-to-end run on the shipped sample and the compiled pipeline."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from components import artifacts, engine, evaluation
from components.config import TrainParams, load_config
from components.defenses.aabl import AablParams, final_train_params, warmup_params
from components.defenses import aabl
from components.errors import UnpoisonError
from components.splits import otsu_threshold
from pipelines import local

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------- Otsu


def test_otsu_separates_a_known_bimodal_sample():
    rng = np.random.default_rng(0)
    low, high = rng.normal(1.0, 0.3, 700), rng.normal(8.0, 0.5, 300)
    t = otsu_threshold(np.concatenate([low, high]))
    assert low.max() < t < high.min()
    # unequal clusters: Otsu's cut is not the midpoint of the range, yet it still separates them
    assert ((np.concatenate([low, high]) > t).sum()) == 300


def test_otsu_matches_a_brute_force_between_class_variance():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.exponential(1.0, 400), rng.normal(6, 1, 200)])
    t = otsu_threshold(values, bins=64)
    counts, edges = np.histogram(values, bins=64)
    centers = (edges[:-1] + edges[1:]) / 2

    def between(k):  # classes: bins [0, k) and [k, 64)
        w0, w1 = counts[:k].sum(), counts[k:].sum()
        m0, m1 = (counts[:k] * centers[:k]).sum() / w0, (counts[k:] * centers[k:]).sum() / w1
        return w0 * w1 * (m0 - m1) ** 2

    best = max(range(1, 64), key=between)
    assert t == pytest.approx(edges[best])


def test_otsu_on_constant_scores_keeps_everything_in_one_class():
    t = otsu_threshold(np.full(10, 3.0))
    assert (np.full(10, 3.0) <= t).all()
    with pytest.raises(ValueError, match="finite"):
        otsu_threshold(np.array([1.0, np.nan]))


def test_partition_keeps_the_vulnerable_high_sce_part():
    adv = np.array([0.1, 0.2, 0.15, 9.0, 8.5, 9.5, 8.8])
    vulnerable, t = aabl.partition(adv, AablParams())
    assert vulnerable.tolist() == [False, False, False, True, True, True, True]
    assert 0.2 < t < 8.5


def test_score_eps_follows_the_image_size():
    assert aabl.score_eps(AablParams(), 32) == pytest.approx(2 / 255)
    assert aabl.score_eps(AablParams(), 64) == pytest.approx(1 / 255)  # Tiny-ImageNet (section 6)
    assert aabl.score_eps(AablParams(score_eps=4 / 255), 64) == pytest.approx(4 / 255)


# ---------------------------------------------------------------------------------------------- adversarial training


class TinyNet(nn.Module):
    def __init__(self, k=2):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, k)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


def test_engine_trains_on_the_perturbed_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (32, 8, 8, 3), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 2, (32,), generator=g)
    calls = []

    def black(model, xb, yb):  # every training input becomes black
        calls.append(len(xb))
        return torch.zeros_like(xb)

    p = TrainParams(epochs=1, batch_size=8, lr=0.05, schedule="constant", augment="none", weight_decay=0.0)
    torch.manual_seed(0)
    perturbed, reference = TinyNet(), TinyNet()
    reference.load_state_dict(perturbed.state_dict())
    h1 = engine.train(perturbed, x, y, p, perturb=black, device=CPU)
    h2 = engine.train(reference, torch.zeros_like(x), y, p, device=CPU)  # trained on black images outright
    assert calls == [8, 8, 8, 8]
    assert h1[0]["loss"] == pytest.approx(h2[0]["loss"])
    for a, b in zip(perturbed.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)


def test_pgd_perturbation_stays_in_the_ball_and_differs_per_call():
    perturb = aabl.pgd(AablParams(adv_steps=3), seed=0)
    x = torch.rand(6, 3, 8, 8)
    y = torch.randint(0, 2, (6,))
    a, b = perturb(TinyNet(), x, y), perturb(TinyNet(), x, y)
    assert (a - x).abs().max() <= 8 / 255 + 1e-6 and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, b)  # a fresh random start each batch


def test_robust_accuracy_on_a_tiny_model(monkeypatch):
    # a linear model, right on every test image by construction; PGD can flip its decisions
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 4, 4, 3), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        y = linear(engine.to_float(x)).argmax(1).numpy()
    monkeypatch.setattr(artifacts, "load_model", lambda path: (linear, {}))

    def ra(eps):
        return evaluation.robust_accuracy("unused", x, y, eps=eps, step=eps / 4, steps=10, batch_size=16)

    assert ra(1e-7) == 1.0  # no budget: RA is the accuracy
    assert ra(0.5) < 0.5  # half the pixel range flips most decisions of a linear model
    assert ra(0.02) >= ra(0.5)


# ---------------------------------------------------------------------------------------------- configuration


def test_config_rejects_unknown_keys_in_the_stage_overrides():
    with pytest.raises(UnpoisonError, match="unknown key 'epoch' in aabl.final"):
        load_config("cpu", {"aabl.final": {"epoch": 3}})
    cfg = load_config("cpu", {"aabl.final.epochs": 3, "aabl.warmup.optimizer": "adam", "aabl.warmup.lr": 0.001})
    assert final_train_params(cfg).epochs == 3 and warmup_params(cfg).optimizer == "adam"
    paper = load_config("paper")
    assert warmup_params(paper).optimizer == "adam" and warmup_params(paper).epochs == 20
    assert final_train_params(paper).epochs == 100 and final_train_params(paper).milestones == [50, 75, 90]


# ---------------------------------------------------------------------------------------------- end to end

SMALL = {"train_limit": 1000, "train.epochs": 2, "aabl.final.epochs": 1, "aabl.adv_steps": 2, "aabl.ra_steps": 2}


@pytest.fixture(scope="module")
def aabl_run(tmp_path_factory, mini_sample):
    root = tmp_path_factory.mktemp("runs")
    cfg = load_config("cpu", {**SMALL, "data": mini_sample, "attack.name": "trojan"})
    return local.run("a-abl", cfg, root, mlflow_uri=None,
                     name="aabl-e2e")


def test_aabl_run_writes_every_artifact(aabl_run):
    for stage in ("poison", "warmup", "score", "partition", "final_train", "evaluate"):
        assert (aabl_run / stage / "stage.json").is_file(), stage
    schema = {f.name: str(f.type) for f in pq.read_schema(aabl_run / "score" / "scores.parquet")}
    assert schema == {"sample_id": "int64", "adv_sce": "double", "sce": "double", "model_ref": "string",
                      "epoch": "int64"}
    split = pq.read_table(aabl_run / "partition" / "split.parquet").to_pydict()
    assert len(split["sample_id"]) == 1000 and set(split["pool"]) <= {"clean", "suspect"}
    scores = pq.read_table(aabl_run / "score" / "scores.parquet").to_pydict()
    threshold = json.loads((aabl_run / "partition" / "stage.json").read_text())["result"]["threshold"]
    clean = np.array(split["pool"]) == "clean"
    assert (np.array(scores["adv_sce"])[clean] > threshold).all()  # the vulnerable part is kept
    meta = json.loads((aabl_run / "final_train" / "model.json").read_text())
    assert meta["trained_on"] == clean.sum()
    assert meta["adversarial"] == {"eps": pytest.approx(8 / 255), "step": pytest.approx(2 / 255), "steps": 2}


def test_aabl_metrics_in_range(aabl_run):
    m = json.loads((aabl_run / "metrics.json").read_text())
    assert m["defense"] == "a-abl" and m["attack"]["name"] == "trojan"
    for key in ("acc", "asr", "der", "ra", "nodef_acc", "nodef_asr", "detection_tpr", "detection_fpr"):
        assert 0.0 <= m[key] <= 1.0, key
    assert set(m["models"]) == {"nodef", "clean"} and 0 <= m["models"]["nodef"]["ra"] <= 1
    assert {"adv_sce", "sce"} <= set(m["scores"])
    gamma = m["splits"]["otsu"]["clean"]["share"]
    assert 0 < gamma <= 1
    report = (aabl_run / "report.md").read_text()
    assert "| RA |" in report and "plots/adv_sce.png" in report and "plots/sce.png" in report


def test_compiled_aabl_pipeline_asks_for_a_gpu_on_every_training_and_scoring_task():
    import yaml

    from pipelines import kfp_pipelines as kp

    pipeline, platform = yaml.safe_load_all((kp.COMPILED / "a-abl.yaml").read_text())
    tasks = kp.compiled_tasks(pipeline)
    assert {"warmup", "final-train", "score", "partition", "evaluate"} <= set(tasks)
    executors = pipeline["deploymentSpec"]["executors"]
    for name in ("warmup", "final-train", "score", "evaluate"):
        executor = pipeline["components"][tasks[name]["componentRef"]["name"]]["executorLabel"]
        assert executors[executor]["container"]["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
        tolerations = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][executor]["tolerations"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
        assert tasks[name]["cachingOptions"]["enableCache"] is True


def test_benchmark_records_carry_ra_gamma_and_the_warmup_as_no_defense(aabl_run):
    from pipelines import benchmark

    m = json.loads((aabl_run / "metrics.json").read_text())
    none, defended = benchmark.records_from_run(m, aabl_run.name, include_none=True)
    assert none["defense"] == "none" and none["source"] == "warm-up stage of the a-abl run"
    assert none["acc"] == m["nodef_acc"] and none["ra"] == m["models"]["nodef"]["ra"]
    assert defended["defense"] == "a-abl" and defended["ra"] == m["ra"]
    assert defended["gamma"] == m["splits"]["otsu"]["clean"]["share"]
    assert defended["rho_vul"] == m["splits"]["otsu"]["clean"]["poison_rate"]
    assert "| trojan | a-abl |" in benchmark.table([none, defended])
    # the CPU protocol's A-ABL warm-up is the no-defense training; the paper protocol's (Adam, 20 epochs) is not
    assert benchmark.warmup_is_nodef("a-abl", load_config("cpu")) and benchmark.warmup_is_nodef("meca", load_config("cpu"))
    assert not benchmark.warmup_is_nodef("a-abl", load_config("paper"))
