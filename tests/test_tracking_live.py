"""Live MLflow tracking against a real sqlite store: a local run opens its parent run before the first stage, each
stage logs its child run while it runs (each epoch as it ends), a failing stage leaves FAILED runs with the epochs
logged before the failure, and the exit handler's logic fails a KFP run's parent run and closes what killed pods left
open. (The same against a real `mlflow server`: tests/test_mlflow_server.py; under kfp.local: tests/test_kfp.py.)"""

from __future__ import annotations

import pytest

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from components import stages, tracking  # noqa: E402
from components.config import load_config  # noqa: E402
from pipelines import local  # noqa: E402

TINY = {"train_limit": 300, "train.epochs": 4}
ERROR = "RuntimeError: injected: the node went away"


def _runs(client: MlflowClient, name: str):
    """The parent run of the pipeline run `name` and its child runs by stage."""
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], f"tags.`unpoison.run` = '{name}'")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags["unpoison.stage"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    return parent, children


def fail_in_third_epoch(monkeypatch) -> None:
    """Make every training raise in its third epoch (epoch 2), after epochs 0 and 1 have ended."""
    real = stages.Monitor.__call__

    def monitor(self, epoch, model, record):
        if epoch == 2:
            raise RuntimeError("injected: the node went away")
        real(self, epoch, model, record)

    monkeypatch.setattr(stages.Monitor, "__call__", monitor)


@pytest.mark.slow  # runs a pipeline
def test_a_failing_stage_leaves_failed_runs_with_the_epochs_before_the_failure(tmp_path, monkeypatch):
    uri = tracking.default_uri(tmp_path)
    fail_in_third_epoch(monkeypatch)
    with pytest.raises(RuntimeError, match="injected"):  # the runner re-raises the stage's error
        local.run("none", load_config("cpu", TINY), tmp_path, mlflow_uri=uri, name="fails")
    client = MlflowClient(uri)
    parent, children = _runs(client, "fails")
    assert parent.info.status == "FAILED"
    assert parent.data.tags["unpoison.error"] == f"stage train: {ERROR}"
    assert parent.data.params["train.epochs"] == "4"  # opened with its parameters before the first stage
    assert {s: r.info.status for s, r in children.items()} == {"poison": "FINISHED", "train": "FAILED"}
    train = children["train"]
    assert train.data.tags["unpoison.error"] == ERROR
    assert train.data.params["train.epochs"] == "4" and train.data.params["model"] == "small_cnn"
    for key in ("loss", "train_acc", "test_acc", "test_asr", "seconds"):  # epochs 1 and 2 (steps 0, 1), not 3
        assert [m.step for m in client.get_metric_history(train.info.run_id, key)] == [0, 1], key
    assert "unpoison.execution_id" not in train.data.tags  # the stage never finished
    assert (tmp_path / "fails.partial").is_dir() and not (tmp_path / "fails").exists()


@pytest.mark.slow  # runs a pipeline
def test_a_run_is_logged_while_it_runs_and_finished_at_the_end(tmp_path, mini_sample):
    uri = tracking.default_uri(tmp_path)
    run_dir = local.run("none", load_config("cpu", {**TINY, "data": mini_sample, "train.epochs": 2}), tmp_path,
                        mlflow_uri=uri, name="ok")
    client = MlflowClient(uri)
    parent, children = _runs(client, "ok")
    assert parent.info.status == "FINISHED" and "unpoison.error" not in parent.data.tags
    assert set(children) == {"poison", "train", "evaluate"}
    assert all(r.info.status == "FINISHED" for r in children.values())
    poison, train, evaluate = children["poison"], children["train"], children["evaluate"]
    # each child run lived while its stage ran: one after the other, inside the parent run
    assert parent.info.start_time <= poison.info.start_time <= poison.info.end_time <= train.info.start_time
    assert train.info.end_time <= evaluate.info.start_time <= evaluate.info.end_time <= parent.info.end_time
    history = client.get_metric_history(train.info.run_id, "train_acc")
    assert [h.step for h in history] == [0, 1]
    assert all(train.info.start_time <= h.timestamp <= train.info.end_time for h in history)
    # the stage's summary, its parameters and its files, as before
    assert train.data.metrics["stage.train_acc"] == history[-1].value and train.data.metrics["samples"] == 300
    assert train.data.params["train.epochs"] == "2" and evaluate.data.params["protocol"] == "cpu"
    assert "data" in poison.data.params and "attack.name" in poison.data.params
    assert {"train/model.safetensors", "train/history.json", "train/stage.json"} <= {
        a.path for a in client.list_artifacts(train.info.run_id, "train")}
    assert 0 <= evaluate.data.metrics["acc"] <= 1
    # the run's summary on the parent, the outputs where the finished run folder holds them
    assert 0 <= parent.data.metrics["acc"] <= 1 and 0 <= parent.data.metrics["asr"] <= 1
    assert parent.data.metrics["wall_seconds"] > 0 and parent.data.tags["unpoison.model_uri"].startswith("models:/")
    assert parent.data.tags["unpoison.artifact.train"] == train.data.tags["unpoison.artifact_uri"] == str(
        run_dir / "train")

    # a rerun of one stage: that stage live, the stages it read from the earlier run tagged with their producer
    again = local.rerun("none", load_config("cpu", {**TINY, "data": mini_sample, "train.epochs": 1}),
                        {p.name: p for p in run_dir.iterdir() if (p / "stage.json").is_file()}, "train", tmp_path,
                        downstream=False, mlflow_uri=uri, name="ok-rerun")
    parent, children = _runs(client, "ok-rerun")
    assert parent.info.status == "FINISHED" and all(r.info.status == "FINISHED" for r in children.values())
    assert "unpoison.cached_from" not in children["train"].data.tags
    assert children["poison"].data.tags["unpoison.cached_from"] == "ok"
    assert children["train"].data.tags["unpoison.artifact_uri"] == str(again / "train")


def test_live_logging_is_best_effort(tmp_path, capsys):
    """An MLflow that fails while a stage runs costs the stage's live record, never the stage."""
    uri = tracking.default_uri(tmp_path)
    gone = tracking.Run(uri, "0123456789abcdef0123456789abcdef", "gone")  # a parent run the store does not hold
    with tracking.stage_run(gone, "train", params={"seed": 0}) as log_epoch:
        log_epoch({"epoch": 0, "loss": 1.0})
    assert "unpoison: mlflow: stage train: cannot open its run" in capsys.readouterr().err
    with tracking.stage_run(None, "train") as log_epoch:  # no tracking URI: no run, no callback
        assert log_epoch is None


def test_the_exit_handler_fails_the_run_and_closes_what_killed_pods_left_open(tmp_path):
    uri = tracking.default_uri(tmp_path)
    client = MlflowClient(uri)
    parent = tracking.open_run("kfp-1", "none", {"attack": {"name": "badnets"}}, uri=uri,
                               tags={"unpoison.kfp_run_id": "kfp-1"})
    assert tracking.kfp_run("kfp-1", uri=uri) == parent and tracking.kfp_run("kfp-2", uri=uri) is None
    with tracking.stage_run(parent, "poison", params={}):
        pass
    with pytest.raises(FloatingPointError), tracking.stage_run(parent, "train", params={}) as log_epoch:
        log_epoch({"epoch": 0, "loss": 2.3})
        raise FloatingPointError("train: loss became nan in epoch 1; lower the learning rate")
    evicted = client.create_run(client.get_run(parent.run_id).info.experiment_id, run_name="train",
                                tags={"mlflow.parentRunId": parent.run_id, "unpoison.stage": "train"})  # never closed
    tracking.close_kfp_run("kfp-1", "FAILED", "Task exit-handler-1 failed.", uri=uri)
    run = client.get_run(parent.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["unpoison.error"] == ("stage train: FloatingPointError: train: loss became nan in epoch 1; "
                                               "lower the learning rate")
    assert client.get_run(evicted.info.run_id).info.status == "KILLED"
    _, children = _runs(client, "kfp-1")
    assert children["poison"].info.status == "FINISHED"

    # a run that `track` finished keeps its status; a cancelled one ends KILLED
    done = tracking.open_run("kfp-3", "none", {}, uri=uri, tags={"unpoison.kfp_run_id": "kfp-3"})
    tracking.finish_run(done, {})
    tracking.close_kfp_run("kfp-3", "SUCCEEDED", None, uri=uri)
    assert client.get_run(done.run_id).info.status == "FINISHED"
    cancelled = tracking.open_run("kfp-4", "none", {}, uri=uri, tags={"unpoison.kfp_run_id": "kfp-4"})
    tracking.close_kfp_run("kfp-4", "CANCELLED", None, uri=uri)
    run = client.get_run(cancelled.run_id)
    assert run.info.status == "KILLED" and run.data.tags["unpoison.error"] == "the pipeline run ended CANCELLED"
