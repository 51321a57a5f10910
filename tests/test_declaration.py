"""A defense is declared once: a toy defense of two stages, declared in this file alone, runs under the local runner
and kfp.local and compiles with a GPU request on its training stage, with no other file edited. KFP's component
processes find it through UNPOISON_DEFENSES, which names this module."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from components import artifacts, engine, stages
from components.defenses import REGISTRY
from components.defenses.base import DATA, ConfigView, Defense, Evaluation, Stage

SMALL = {"train_limit": 300, "train.epochs": 1}


def flag(dataset: Path, model: Path, out: Path, *, share: float) -> dict:
    """Toy scoring and split: the `share` of samples the model fits best (lowest loss) is suspect."""
    ds = stages.load_dataset(dataset)
    net, meta = artifacts.load_model(model)
    x, y = stages.tensors(ds)
    loss = torch.nn.functional.cross_entropy(engine.predict(net, x), y, reduction="none").numpy()
    suspect = np.argsort(loss, kind="stable")[: int(share * len(ds))]
    clean = np.ones(len(ds), bool)
    clean[suspect] = False
    stages.write_scores(Path(out) / "scores.parquet", {"toy_loss": loss}, model, meta)
    stages.write_split(clean, Path(out) / "split.parquet")
    return {"samples": len(ds), "suspect": int((~clean).sum())}


DEFENSE = Defense(
    name="toy", description="Two-stage toy defense: train, then flag the best-fitted samples.",
    stages=(Stage("fit", stages.train, {"dataset": f"{DATA}/dataset.npz"}, kind="model", monitor=True,
                  params=lambda c: {"params": c.train.model_copy(update={"seed": c.seed}), "model_name": c.model},
                  reads=("train", "seed", "model")),
            Stage("flag", flag, {"dataset": f"{DATA}/dataset.npz", "model": "fit"}, gpu=False,
                  params=lambda c: {"share": 0.1})),
    evaluation=Evaluation(models={"plain": "fit"}, defended="plain", scores=("flag/scores.parquet",),
                          directions={"toy_loss": -1}, splits={"toy": "flag/split.parquet"}, detection="toy",
                          suspicion="toy_loss"),
)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(REGISTRY, "toy", DEFENSE)
    monkeypatch.setenv("UNPOISON_DEFENSES", __name__)  # for the component processes of kfp.local
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent))  # where this module imports from
    return DEFENSE


def test_toy_defense_runs_with_the_local_runner(toy, tmp_path, mini_sample):
    from components.config import load_config
    from pipelines import local

    run_dir = local.run("toy", load_config("cpu", {**SMALL, "data": mini_sample}), tmp_path, mlflow_uri=None, name="toy")
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == ["evaluate", "fit", "flag", "poison"]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["defense"] == "toy" and set(m["models"]) == {"plain"} and 0 <= m["acc"] <= 1
    assert m["splits"]["toy"]["detection"]["flagged"] == 30 and "toy_loss" in m["scores"]
    assert (run_dir / "suspects.parquet").is_file() and (run_dir / "suspects.png").is_file()


def test_toy_defense_runs_under_kfp_local_and_compiles_with_a_gpu_on_its_training_stage(toy, tmp_path, mini_sample):
    from kfp import compiler

    from components.config import load_config
    from pipelines import kfp_pipelines as kp

    metrics_dir, log = kp.run_local(kp.build("toy"), kp.arguments(load_config("cpu", {**SMALL, "data": mini_sample}), "toy"),
                                    tmp_path)
    assert set(log.executed) == {"poison", "fit", "flag", "evaluate", "track-start", "track", "track-exit"}
    assert json.loads((metrics_dir / "metrics.json").read_text())["defense"] == "toy"
    compiler.Compiler().compile(kp.build("toy"), str(tmp_path / "toy.yaml"))
    pipeline, _ = yaml.safe_load_all((tmp_path / "toy.yaml").read_text())
    tasks, executors = kp.compiled_tasks(pipeline), pipeline["deploymentSpec"]["executors"]

    def resources(task):
        return executors[pipeline["components"][tasks[task]["componentRef"]["name"]]["executorLabel"]]["container"][
            "resources"]

    assert resources("fit")["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert "accelerator" not in resources("flag")  # declared gpu=False
    # no section of its own; the data's fingerprint, for the cache key of the data-reading task; the poison task's GPU
    assert set(pipeline["root"]["inputDefinitions"]["parameters"]) == {*kp.CONFIG_KEYS, kp.DATA_HASH, kp.POISON_GPUS}


def test_a_stage_reading_an_undeclared_key_is_an_error():
    from components.config import load_config

    view = ConfigView(load_config("cpu"), ("train",), "flag")
    assert view.train.epochs == 10
    with pytest.raises(RuntimeError, match="stage 'flag' reads configuration key 'seed' but declares only"):
        view.seed


def test_a_declaration_that_reads_a_later_stage_is_refused():
    with pytest.raises(ValueError, match="stage 'early' reads"):
        Defense(name="bad", description="", stages=(Stage("early", flag, {"model": "late"}),
                                                    Stage("late", stages.train, {"dataset": f"{DATA}/dataset.npz"})),
                evaluation=Evaluation(models={"m": "late"}, defended="m"))
