"""ABL (the baseline): loss flooding's direction, isolation of the lowest losses, unlearning with frozen batch-norm
statistics, the presets, and an end-to-end run on the shipped sample."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from components import engine
from components.config import load_config
from components.defenses import abl
from components.defenses.abl import AblParams
from components.models import build_model
from components.params import TrainParams
from pipelines import local

CPU = torch.device("cpu")


def _grad(loss_fn, logits, y):
    logits = logits.clone().requires_grad_(True)
    loss_fn(logits, y, torch.arange(len(y))).mean().backward()
    return logits.grad


def test_flooding_ascends_below_the_level_and_descends_above():
    y = torch.tensor([0, 1])
    confident = torch.tensor([[6.0, 0.0], [0.0, 6.0]])  # CE about 0.0025 < 0.5
    unsure = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # CE about 1.31 > 0.5
    for logits in (confident, unsure):
        ce_grad = _grad(lambda lg, yy, idx: F.cross_entropy(lg, yy, reduction="none"), logits, y)
        sign = 1.0 if F.cross_entropy(logits, y) > 0.5 else -1.0
        torch.testing.assert_close(_grad(abl.flooding(0.5), logits, y), sign * ce_grad)
    # the batch mean decides for the whole batch; per sample, each sample's own loss decides
    mixed = torch.tensor([[6.0, 0.0], [1.0, 0.0]])  # one fitted sample, one not: mean CE about 0.66 > 0.5
    ce_grad = _grad(lambda lg, yy, idx: F.cross_entropy(lg, yy, reduction="none"), mixed, y)
    torch.testing.assert_close(_grad(abl.flooding(0.5), mixed, y), ce_grad)
    per_sample = _grad(abl.flooding(0.5, per_sample=True), mixed, y)
    torch.testing.assert_close(per_sample, ce_grad * torch.tensor([[-1.0], [1.0]]))
    # the value is the flooded loss |L - b| + b
    value = abl.flooding(0.5)(confident, y, torch.arange(2)).mean()
    assert value.item() == pytest.approx(abs(F.cross_entropy(confident, y).item() - 0.5) + 0.5)


def test_isolation_takes_the_lowest_losses():
    loss = np.array([2.0, 0.01, 1.5, 0.02, 3.0, 0.5, 2.5, 0.03, 1.0, 4.0])
    isolated = abl.isolate(loss, 0.2)
    assert isolated.tolist() == [False, True, False, True, False, False, False, False, False, False]


def test_unlearning_ascends_the_deployed_function_and_leaves_batch_norm_statistics_unchanged():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 256, (32, 32, 32, 3), dtype=torch.uint8)
    y = torch.randint(0, 10, (32,))
    deployed = F.cross_entropy(engine.predict(model, x, device=CPU), y).item()  # eval mode: running statistics
    p = TrainParams(epochs=3, batch_size=32, lr=0.01, schedule="constant", augment="none", channels_last=False)
    history = abl.unlearn(model, x, y, p, device=CPU)
    after = model.state_dict()
    for key in before:
        if key.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(after[key], before[key], msg=key)
    assert any(not torch.equal(after[k], before[k]) for k in before if k.endswith("weight"))
    # the first step's loss is the deployed model's (eval-mode) CE: normalized by the running statistics, not the batch's
    assert history[0]["loss"] == pytest.approx(-deployed, rel=1e-4)
    assert history[-1]["loss"] < history[0]["loss"] < 0  # -CE falls: the isolated samples' loss rises


def test_presets_scale_with_the_fine_tuning_epochs():
    assert abl.phases(AblParams()) == (20, 60, 20, 1e-4)
    assert abl.phases(AblParams(epochs=10)) == (3, 10, 3, 1e-4)
    assert abl.phases(AblParams(preset="backdoorbox")) == (20, 70, 5, 5e-4)
    assert abl.phases(AblParams(preset="backdoorbox", epochs=10)) == (3, 10, 1, 5e-4)
    assert abl.phases(AblParams(epochs=10, unlearn_epochs=5, unlearn_lr=1e-3)) == (3, 10, 5, 1e-3)
    cpu, paper = load_config("cpu"), load_config("paper")
    assert abl.isolation_params(cpu).epochs == 3 and abl.isolation_params(cpu).augment == "none"
    assert abl.finetune_params(cpu).epochs == 10 and abl.finetune_params(paper).epochs == 60
    assert abl.unlearn_params(paper).lr == 1e-4 and abl.unlearn_params(paper).epochs == 20


# ---------------------------------------------------------------------------------------------- end to end

SMALL = {"train_limit": 1000, "train.epochs": 2, "abl.epochs": 2, "attack.name": "blend"}


@pytest.fixture(scope="module")
def abl_run(tmp_path_factory, mini_sample):
    root = tmp_path_factory.mktemp("runs")
    return local.run("abl", load_config("cpu", {**SMALL, "data": mini_sample}), root, mlflow_uri=None, name="abl-e2e")


def test_abl_run_isolates_one_percent_and_continues_the_same_model(abl_run):
    split = pq.read_table(abl_run / "partition" / "split.parquet").to_pydict()
    loss = np.array(pq.read_table(abl_run / "score" / "scores.parquet").column("isolation_loss"))
    suspect = np.array(split["pool"]) == "suspect"
    assert suspect.sum() == 10 and loss[suspect].max() <= loss[~suspect].min()
    iso = json.loads((abl_run / "warmup" / "model.json").read_text())
    ft = json.loads((abl_run / "final_train" / "model.json").read_text())
    un = json.loads((abl_run / "unlearn" / "model.json").read_text())
    assert iso["flooding"] == 0.5 and iso["train_params"]["augment"] == "none"
    assert ft["init"] == iso["weights_sha256"][:16] and ft["trained_on"] == 990  # fine-tuned, not re-initialized
    assert un["init"] == ft["weights_sha256"][:16] and un["unlearned"]["samples"] == 10


def test_abl_report_and_metrics(abl_run):
    m = json.loads((abl_run / "metrics.json").read_text())
    assert m["defense"] == "abl" and set(m["models"]) == {"isolation", "finetuned", "abl"}
    assert 0 <= m["acc"] <= 1 and 0 <= m["asr"] <= 1 and m["der"] is None  # no no-defense model in the run
    assert m["flagged_share"] == pytest.approx(0.01)
    assert "plots/isolation_loss.png" in (abl_run / "report.md").read_text()


def test_the_curves_continue_one_model_through_isolation_fine_tuning_and_unlearning(abl_run):
    from components.stages import curve_starts

    models = {"isolation": "warmup", "finetuned": "final_train", "abl": "unlearn"}
    # SMALL: 1 isolation epoch, 2 fine-tuning epochs, 1 unlearning epoch, one model throughout
    assert curve_starts(models, lambda ref: abl_run / ref) == {"isolation": 0, "finetuned": 1, "abl": 3}
