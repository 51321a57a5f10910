"""Real kfp.local runs of whole pipelines beside the cached MeCa runs (test_kfp_cache.py): the CLI's kfp-local engine
with and without the cache, a failing stage failing the MLflow run through the exit handler, the A-ABL pipeline.
(Split from test_kfp.py so that pytest-xdist spreads the slow kfp.local runs over the workers.)"""

import json

import pytest

from components.config import load_config
from pipelines import kfp_pipelines as kp
from pipelines.cli import main

BOOKKEEPING = {"track-start", "track", "track-exit"}  # the MLflow tasks: never cached, never retried


def test_cli_runs_the_pipeline_under_kfp_local_and_no_cache_executes_every_task(tmp_path, capsys, mini_sample):
    argv = ["run", "none", "--engine", "kfp-local", "--data", mini_sample, "--no-mlflow", "--out", str(tmp_path),
            "--set", "train_limit=300", "train.epochs=1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "executed: evaluate, poison, track, track-exit, track-start, train;" in out and "no defense" in out
    assert (tmp_path / "kfp-local" / ".kfp_cache").is_dir()
    assert main([*argv, "--no-cache"]) == 0  # the same run again: without --no-cache every stage would be cached
    assert "executed: evaluate, poison, track, track-exit, track-start, train; from cache: nothing" in \
        capsys.readouterr().out


def test_a_failing_stage_under_kfp_local_fails_the_mlflow_run_through_the_exit_handler(tmp_path, monkeypatch,
                                                                                          mini_sample):
    from mlflow.tracking import MlflowClient

    monkeypatch.setattr(kp, "RETRIES", 0)  # kfp.local honours the retry policy and its backoff: fail at once
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # a learning rate that makes the loss diverge: the training raises FloatingPointError, which fails its task
    cfg = load_config("cpu", {"data": mini_sample, "train_limit": 300, "train.epochs": 2, "train.lr": 1e6})
    with pytest.raises(RuntimeError, match="failed"):
        kp.run_local(kp.build("none"), kp.arguments(cfg, "none"), tmp_path / "kfp", mlflow_uri=uri, cache=False)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("unpoison").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags["unpoison.stage"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert parent.info.status == "FAILED"  # by the exit task: evaluate and track never ran
    assert parent.data.tags["unpoison.error"].startswith("stage train: FloatingPointError: no defense: loss became")
    assert {s: r.info.status for s, r in children.items()} == {"poison": "FINISHED", "train": "FAILED"}
    assert children["train"].data.tags["unpoison.error"].startswith("FloatingPointError: ")
    assert children["train"].data.params["train.lr"] == "1000000.0"


def test_aabl_pipeline_runs_under_kfp_local(tmp_path, mini_sample):
    cfg = load_config("cpu", {"data": mini_sample, "train_limit": 400, "train.epochs": 1, "aabl.final.epochs": 1, "aabl.adv_steps": 1,
                              "aabl.ra_steps": 1, "attack.name": "trojan"})
    metrics_dir, log = kp.run_local(kp.build("a-abl"), kp.arguments(cfg, "a-abl"), tmp_path)
    assert set(log.executed) == {"poison", "warmup", "score", "partition", "final-train", "evaluate"} | BOOKKEEPING
    m = json.loads((metrics_dir / "metrics.json").read_text())
    assert m["defense"] == "a-abl" and 0 <= m["ra"] <= 1 and "otsu" in m["splits"]
