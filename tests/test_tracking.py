"""MLflow tracking against a real sqlite store: the deployed model in the mlflow.pytorch flavor, loadable by its
models:/ URI and by runs:/<parent run>/model, and the training data set as a dataset input with its content hash."""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid

import numpy as np
import pytest
import torch

mlflow = pytest.importorskip("mlflow")
import mlflow.pytorch  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from components import artifacts, tracking  # noqa: E402
from components.data import ImageSet, save_npz  # noqa: E402
from components.models import build_model  # noqa: E402

CLASSES = [f"c{i}" for i in range(10)]
HASH = hashlib.sha256(b"a data set").hexdigest()


def _stage(folder, stage, result):
    folder.mkdir(parents=True, exist_ok=True)
    artifacts.write_json({"stage": stage, "result": result, "seconds": 1.0, "execution_id": uuid.uuid4().hex,
                          "finished_at": "2025-01-01T00:00:00+00:00"}, folder / "stage.json")
    return str(folder), str(folder)


@pytest.fixture
def run_dirs(tmp_path, monkeypatch):
    """A two-stage run: final_train with its model in a subfolder, evaluate with metrics; a fresh sqlite store."""
    monkeypatch.chdir(tmp_path)  # the experiment's default artifact root (./mlruns) lands in tmp_path
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    torch.manual_seed(0)
    model = build_model("small_cnn", len(CLASSES))
    for p in model.parameters():  # not an identity-like init: predictions must differ between classes
        p.data.normal_(0, 0.1)
    meta = {"architecture": "small_cnn", "classes": CLASSES, "dataset_hash": HASH, "train_params": {"epochs": 1},
            "epochs": 1}
    artifacts.save_model(model, meta, tmp_path / "run" / "final_train" / "model")
    dirs = {"final_train": _stage(tmp_path / "run" / "final_train", "final_train", {"train_acc": 0.5}),
            "evaluate": _stage(tmp_path / "run" / "evaluate", "evaluate", {"acc": 0.4})}
    return dirs, tmp_path / "run" / "final_train" / "model", f"sqlite:///{tmp_path}/mlflow.db"


def test_logs_loadable_model_and_dataset_input(run_dirs):
    dirs, folder, uri = run_dirs
    dataset = {"name": "cifar10-sample", "source": str(folder.parent), "digest": HASH}
    t0 = time.perf_counter()
    run_id = tracking.record_pipeline_run("r1", "meca", {"attack": {"name": "badnets"}}, dirs, uri=uri,
                                          final_model="final_train/model", dataset=dataset)
    print(f"record_pipeline_run with model: {time.perf_counter() - t0:.1f} s")
    # logged through MLflow's fluent API, whose set_tracking_uri exports the URI: not left for later subprocesses
    assert "MLFLOW_TRACKING_URI" not in os.environ
    run = MlflowClient(uri).get_run(run_id)
    model_uri = run.data.tags["unpoison.model_uri"]
    assert model_uri.startswith("models:/")

    reference = artifacts.load_model(folder)[0].eval()
    x = torch.rand(5, 3, 32, 32)  # a batch size other than the input example's
    with torch.no_grad():
        expected = reference(x)
    for form in (model_uri, f"runs:/{run_id}/model"):
        loaded = mlflow.pytorch.load_model(form)
        assert isinstance(loaded, torch.nn.Module)
        with torch.no_grad():
            got = loaded(x)
        assert got.shape == (5, len(CLASSES))
        assert torch.allclose(got, expected, atol=1e-5), form
        assert torch.equal(got.argmax(1), expected.argmax(1))

    info = mlflow.models.get_model_info(model_uri)
    assert info.signature.inputs.inputs[0].shape == (-1, 3, 32, 32)
    assert info.signature.outputs.inputs[0].shape == (-1, len(CLASSES))
    assert info.metadata["classes"] == CLASSES
    (child,) = MlflowClient(uri).search_runs([run.info.experiment_id], "tags.`unpoison.stage` = 'final_train'")
    logged = {a.path for a in MlflowClient(uri).list_artifacts(child.info.run_id, "final_train/model")}
    assert logged == {"final_train/model/model.safetensors", "final_train/model/model.json"}  # still beside it

    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "cifar10-sample" and HASH.startswith(inp.dataset.digest) and len(inp.dataset.digest) >= 32
    assert inp.dataset.source_type == "local" and json.loads(inp.dataset.source)["uri"] == str(folder.parent)
    tags = {t.key: t.value for t in inp.tags}
    assert tags["mlflow.data.context"] == "training" and tags["unpoison.content_hash"] == HASH


def test_without_model_or_dataset_logs_nothing_extra(run_dirs):
    dirs, _, uri = run_dirs
    run_id = tracking.record_pipeline_run("r2", "meca", {"attack": {"name": "badnets"}}, dirs, uri=uri)
    run = MlflowClient(uri).get_run(run_id)
    assert "unpoison.model_uri" not in run.data.tags
    assert run.inputs.dataset_inputs == []
    assert MlflowClient(uri).search_logged_models([run.info.experiment_id]) == []
    assert "model" not in {a.path for a in MlflowClient(uri).list_artifacts(run_id)}


def test_image_shape_from_a_stage_data_set(tmp_path):
    save_npz(ImageSet(np.zeros((3, 24, 20, 3), np.uint8), np.zeros(3, np.int64), ("a",)), tmp_path / "p" / "dataset.npz")
    assert tracking._image_shape({"poison": (str(tmp_path / "p"), "")}, (3, 32, 32)) == (3, 24, 20)
    assert tracking._image_shape({"train": (str(tmp_path / "t"), "")}, (3, 32, 32)) == (3, 32, 32)


def test_a_model_training_experiment_with_its_artifacts_beside_the_store_and_no_summary_at_step_0(tmp_path, monkeypatch):
    elsewhere = tmp_path / "where-the-user-stands"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "runs"
    store.mkdir()
    uri = tracking.default_uri(store)
    train = tmp_path / "run" / "train"
    dirs = {"train": _stage(train, "train", {"train_acc": 0.9, "samples_per_second": 5.0, "samples": 10})}
    artifacts.write_json([{"epoch": 0, "train_acc": 0.5, "samples_per_second": 4.0},
                          {"epoch": 1, "train_acc": 0.9, "samples_per_second": 6.0}], train / "history.json")
    run_id = tracking.record_pipeline_run("r3", "none", {"attack": {"name": "badnets"}}, dirs, uri=uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the training runs view
    assert experiment.artifact_location == (store / "mlartifacts").resolve().as_uri()
    assert not (elsewhere / "mlruns").exists() and (store / "mlartifacts").is_dir()
    child = client.search_runs([experiment.experiment_id], "tags.`unpoison.stage` = 'train'")[0]
    history = client.get_metric_history(child.info.run_id, "train_acc")
    assert sorted((h.step, h.value) for h in history) == [(0, 0.5), (1, 0.9)]  # the series alone, no summary point
    assert child.data.metrics["stage.train_acc"] == 0.9 and child.data.metrics["stage.samples_per_second"] == 5.0
    assert child.data.metrics["samples"] == 10  # a summary figure without a series keeps its name


def test_the_runs_table_opens_on_the_unpoison_columns(run_dirs):
    dirs, _, uri = run_dirs
    run_id = tracking.record_pipeline_run("r4", "meca", {"attack": {"name": "badnets"}}, dirs, uri=uri)
    experiment = MlflowClient(uri).get_experiment(MlflowClient(uri).get_run(run_id).info.experiment_id)
    view = json.loads(experiment.tags["mlflow.sharedViewState.unpoison"])
    assert {"metrics.`acc`", "metrics.`asr`", "metrics.`der`", "attributes.`Dataset`"} <= set(view["selectedColumns"])
    hint = tracking.ui_hint(uri)
    assert f"mlflow ui --backend-store-uri {uri}" in hint
    assert f"/#/experiments/{experiment.experiment_id}/runs?viewStateShareKey=unpoison" in hint
    assert tracking.ui_link("http://host:5000/", "7") == "http://host:5000/#/experiments/7/runs?viewStateShareKey=unpoison"


def test_commands_starting_at_once_share_a_fresh_sqlite_store(tmp_path):
    # MLflow creates a fresh sqlite store's tables unlocked: without the lock, of two processes opening one at the same
    # moment one failed with "table ... already exists" in 4 of 4 tries (two benchmarks started together lost a cell).
    import subprocess
    import sys

    code = ("import sys; from components import tracking; "
            "print(len(tracking._client(sys.argv[1]).search_experiments()))")
    for attempt in range(2):
        uri = f"sqlite:///{tmp_path / str(attempt) / 'mlflow.db'}"
        procs = [subprocess.Popen([sys.executable, "-c", code, uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, cwd=os.path.dirname(os.path.dirname(__file__))) for _ in range(3)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], [err[-400:] for _, err in outs]
        assert [out.strip() for out, _ in outs] == ["1", "1", "1"]  # each sees the Default experiment
