"""End to end: the MeCa and no-defense pipelines on (part of) the shipped CIFAR-10 sample, few epochs, real MLflow
(local sqlite store). Checks every artifact's schema, that metrics are in range, and the MLflow record."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from components import artifacts
from components.config import load_config
from pipelines import local
from pipelines.cli import main

SMALL = {"train_limit": 1500, "train.epochs": 2, "meca.rounds": 2, "meca.finetune_epochs": 1}
STAGES = ["poison", "warmup", "score", "partition", "enhance", "identify", "final_train", "relabel_finetune",
          "evaluate"]


@pytest.fixture(scope="module")
def meca_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    run_dir = local.run("meca", load_config("cpu", SMALL), root, mlflow_uri=uri, name="meca-e2e")
    return run_dir, uri


def _schema(path):
    return {f.name: str(f.type) for f in pq.read_schema(path)}


def test_run_folder_is_complete(meca_run):
    run_dir, _ = meca_run
    assert not run_dir.with_name(run_dir.name + ".partial").exists()
    for stage in STAGES:
        assert (run_dir / stage).is_dir(), stage
    for f in ["metrics.json", "report.md", "config.json"]:
        assert (run_dir / f).is_file()
    assert not list(run_dir.rglob("*.tmp")), "a temporary file was left behind"


def test_sample_table(meca_run):
    run_dir, _ = meca_run
    path = run_dir / "poison" / "samples.parquet"
    assert _schema(path) == {"sample_id": "int64", "label": "int64", "true_label": "int64", "is_poison": "bool",
                             "is_cover": "bool"}
    t = pq.read_table(path).to_pydict()
    assert len(t["sample_id"]) == 1500 and t["sample_id"] == list(range(1500))
    poison = np.array(t["is_poison"])
    assert poison.sum() == 75  # 5 % of 1500
    assert (np.array(t["label"])[poison] == 0).all() and (np.array(t["true_label"])[poison] != 0).all()


def test_score_split_and_round_tables(meca_run):
    run_dir, _ = meca_run
    assert _schema(run_dir / "score" / "scores.parquet") == {"sample_id": "int64", "kl": "double",
                                                             "model_ref": "string", "epoch": "int64"}
    kl = pq.read_table(run_dir / "score" / "scores.parquet").column("kl").to_numpy()
    assert np.isfinite(kl).all() and (kl >= 0).all()
    for split in ["partition", "identify", "relabel_finetune"]:
        path = run_dir / split / "split.parquet"
        assert _schema(path) == {"sample_id": "int64", "pool": "string", "relabel": "int64"}
        assert set(pq.read_table(path).column("pool").to_pylist()) <= set(artifacts.POOLS)
    # round 0 unlearns the highest-KL gamma share: 10 % of 1500
    pools = np.array(pq.read_table(run_dir / "partition" / "split.parquet").column("pool").to_pylist())
    assert (pools == "clean").sum() == 150
    assert kl[pools == "clean"].min() >= kl[pools == "suspect"].max()
    relabel = pq.read_table(run_dir / "relabel_finetune" / "split.parquet").to_pydict()
    suspect = np.array(relabel["pool"]) == "suspect"
    assert (np.array(relabel["relabel"])[suspect] >= 0).all() and (np.array(relabel["relabel"])[~suspect] == -1).all()
    rounds = pq.read_table(run_dir / "enhance" / "rounds.parquet").to_pydict()
    assert sorted(set(rounds["round"])) == [0, 1]
    assert json.loads((run_dir / "enhance" / "rounds.json").read_text())[1]["keep_share"] == pytest.approx(0.8)


def test_models_are_safetensors_with_metadata(meca_run):
    run_dir, _ = meca_run
    for folder in ["warmup", "enhance/model", "final_train", "relabel_finetune/model"]:
        meta = json.loads((run_dir / folder / "model.json").read_text())
        assert meta["architecture"] == "small_cnn" and len(meta["classes"]) == 10
        assert len(meta["dataset_hash"]) == 64 and len(meta["weights_sha256"]) == 64
        weights = load_file(str(run_dir / folder / "model.safetensors"))  # plain tensors, no pickle
        assert any(k.endswith("weight") for k in weights)
    clean = json.loads((run_dir / "final_train" / "model.json").read_text())
    assert clean["trained_on"] < 1500  # trained on the clean pool only


def test_metrics_in_range(meca_run):
    run_dir, _ = meca_run
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["defense"] == "meca" and m["attack"]["name"] == "badnets"
    for key in ["acc", "asr", "der", "nodef_acc", "nodef_asr", "detection_tpr", "detection_fpr"]:
        assert 0.0 <= m[key] <= 1.0, key
    assert m["acc"] > 0.15  # better than chance (0.1) even after two epochs
    assert set(m["models"]) == {"nodef", "enhanced", "clean", "relabelled"}
    assert 0.0 <= m["scores"]["kl"]["auroc"] <= 1.0
    assert [r["round"] for r in m["rounds"]] == [0, 1]
    assert set(m["stages"]) == set(STAGES) and all(s["seconds"] > 0 for s in m["stages"].values())
    report = (run_dir / "report.md").read_text()
    assert "| clean |" in report and "plots/kl.png" in report
    assert (run_dir / "evaluate" / "plots" / "kl.png").stat().st_size > 1000


def test_mlflow_parent_and_child_runs(meca_run):
    from mlflow.tracking import MlflowClient

    run_dir, uri = meca_run
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("unpoison")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["unpoison.defense"] == "meca"
    assert parent.data.params["attack.name"] == "badnets" and parent.data.params["meca.gamma"] == "0.1"
    assert 0 <= parent.data.metrics["asr"] <= 1 and "detection_tpr" in parent.data.metrics
    children = {r.data.tags["unpoison.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == set(STAGES)
    history = client.get_metric_history(children["warmup"].info.run_id, "test_acc")
    assert [h.step for h in history] == [0, 1]  # per-epoch metrics with step = epoch
    listed = [a.path for a in client.list_artifacts(children["score"].info.run_id, "score")]
    assert "score/scores.parquet" in listed


def test_none_pipeline_equals_meca_warmup(meca_run, tmp_path):
    """The benchmark reads the no-defense record from MeCa's warm-up: both must be the same training."""
    run_dir, _ = meca_run
    none_dir = local.run("none", load_config("cpu", SMALL), tmp_path, mlflow_uri=None, name="none-e2e")
    warm = json.loads((run_dir / "warmup" / "model.json").read_text())
    plain = json.loads((none_dir / "train" / "model.json").read_text())
    assert plain["weights_sha256"] == warm["weights_sha256"]
    m = json.loads((none_dir / "metrics.json").read_text())
    assert m["models"]["nodef"] == json.loads((run_dir / "metrics.json").read_text())["models"]["nodef"]


def test_cli_prints_summary(tmp_path, capsys):
    code = main(["run", "none", "--attack", "blend", "--no-mlflow", "--out", str(tmp_path), "--name", "cli",
                 "--set", "train_limit=600", "train.epochs=1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "no defense" in out and "ACC" in out and str(tmp_path / "cli") in out
