"""Real kfp.local runs of the MeCa pipeline with caching: a first run executes every stage, an identical second
none, a final-training change only what depends on it; MLflow records cached stages with their producer; one-stage
reruns through dsl.importer on the recorded artifacts. (Split from test_kfp.py so that pytest-xdist spreads the
slow kfp.local runs over the workers: `--dist loadfile` keeps a file on one worker.)"""

import json
from pathlib import Path

import pytest

from components.config import load_config
from pipelines import kfp_pipelines as kp
from pipelines.cli import main

MECA_TASKS = {"poison", "warmup", "early", "score", "partition", "enhance", "identify", "first-train", "vouch",
              "final-train", "relabel-finetune", "evaluate"}
TINY = {"train_limit": 600, "train.epochs": 1, "meca.rounds": 2, "meca.finetune_epochs": 1}
BOOKKEEPING = {"track-start", "track", "track-exit"}  # the MLflow tasks: never cached, never retried


def _executed(out: str) -> list[str]:
    """The tasks a kfp-local run printed as executed, without importers and tracking."""
    line = [ln for ln in out.splitlines() if ln.startswith("executed: ")][-1]
    tasks = line.removeprefix("executed: ").split(";")[0].split(", ")
    return sorted(t for t in tasks if not t.startswith("importer") and t not in BOOKKEEPING)


@pytest.fixture(scope="module")
def kfp_runs(tmp_path_factory, mini_sample):
    """Three runs of the MeCa pipeline under kfp.local: first, identical second, and one with a final-training change."""
    root = tmp_path_factory.mktemp("kfp")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load_config("cpu", {**TINY, "data": mini_sample})
    runs = [kp.run_local(kp.build("meca"), kp.arguments(cfg, "meca"), root, mlflow_uri=uri) for _ in range(2)]
    changed = load_config("cpu", {**TINY, "data": mini_sample, "final.lr": 0.05})
    runs.append(kp.run_local(kp.build("meca"), kp.arguments(changed, "meca"), root, mlflow_uri=uri))
    return root, uri, runs


def test_first_run_executes_every_stage(kfp_runs):
    _, _, runs = kfp_runs
    metrics_dir, log = runs[0]
    assert set(log.executed) == MECA_TASKS | BOOKKEEPING and not log.cached
    m = json.loads((metrics_dir / "metrics.json").read_text())
    assert m["defense"] == "meca" and 0 <= m["asr"] <= 1 and 0 <= m["acc"] <= 1 and 0 <= m["der"] <= 1
    assert set(m["models"]) == {"nodef", "enhanced", "first", "clean", "relabelled"}


def test_identical_second_run_executes_no_stage(kfp_runs):
    _, _, runs = kfp_runs
    metrics_dir, log = runs[1]
    assert set(log.executed) == BOOKKEEPING  # bookkeeping only, never cached
    assert set(log.cached) == MECA_TASKS
    assert metrics_dir == runs[0][0]  # the result served from the cache: the first run's evaluation


def test_final_training_change_reruns_only_what_depends_on_it(kfp_runs):
    _, _, runs = kfp_runs
    _, log = runs[2]
    # both clean trainings (`final` sets them), the second pass between them, the fine-tune, evaluation (and
    # tracking); nothing upstream
    rerun = {"first-train", "vouch", "final-train", "relabel-finetune", "evaluate"}
    assert set(log.executed) == rerun | BOOKKEEPING
    assert set(log.cached) == MECA_TASKS - rerun


def test_mlflow_records_cached_stages_with_their_producer(kfp_runs):
    from mlflow.tracking import MlflowClient

    _, uri, _ = kfp_runs
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("unpoison")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 3
    first, second, third = (p.data.tags["unpoison.kfp_run_id"] for p in parents)
    children = {p.data.tags["unpoison.kfp_run_id"]: {r.data.tags["unpoison.stage"]: r for r in runs
                                                     if r.data.tags.get("mlflow.parentRunId") == p.info.run_id}
                for p in parents}
    assert set(children[first]) == {"poison", "warmup", "early", "score", "partition", "enhance", "identify",
                                    "first_train", "vouch", "final_train", "relabel_finetune", "evaluate"}
    assert all("unpoison.cached_from" not in r.data.tags for r in children[first].values())
    assert all(r.data.tags["unpoison.cached_from"] == first for r in children[second].values())
    assert children[third]["warmup"].data.tags["unpoison.cached_from"] == first
    assert "unpoison.cached_from" not in children[third]["final_train"].data.tags
    assert parents[2].data.params["final.lr"] == "0.05"
    assert 0 <= parents[0].data.metrics["asr"] <= 1
    # logged live by the tasks that ran, each parent finished by `track`
    assert all(r.info.status == "FINISHED" for r in runs)
    warmup = children[first]["warmup"]
    assert warmup.data.params["train.epochs"] == "1"  # logged by the task at its start
    assert [h.step for h in client.get_metric_history(warmup.info.run_id, "test_acc")] == [0]
    assert not children[second]["warmup"].data.params  # served from the cache: logged from its folder by `track`


def _first_run_id(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("unpoison")
    first = [r for r in client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
             if "mlflow.parentRunId" not in r.data.tags][0]
    return first.data.tags["unpoison.kfp_run_id"]


def test_rerun_one_stage_on_recorded_artifacts(kfp_runs, tmp_path, capsys):
    _, uri, _ = kfp_runs
    code = main(["rerun", "--run", _first_run_id(uri), "--stage", "final_train", "--mlflow-uri", uri,
                 "--out", str(tmp_path), "--set", "final.lr=0.02", "--no-mlflow"])
    assert code == 0
    out = capsys.readouterr().out
    assert _executed(out) == ["final-train"]  # one stage; every input imported
    model = Path([ln for ln in out.splitlines() if ln.startswith("output: ")][-1].removeprefix("output: "))
    meta = json.loads((model / "model.json").read_text())
    assert meta["train_params"]["lr"] == 0.02 and meta["trained_on"] < 600


def test_rerun_a_partition_alone_and_a_scoring_stage_with_everything_downstream(kfp_runs, tmp_path, capsys):
    _, uri, _ = kfp_runs
    run_id = _first_run_id(uri)
    assert main(["rerun", "--run", run_id, "--stage", "partition", "--mlflow-uri", uri, "--out", str(tmp_path),
                 "--set", "meca.gamma=0.2", "--no-mlflow"]) == 0
    out = capsys.readouterr().out
    assert _executed(out) == ["partition"]
    assert "partition: clean 120  samples 600  suspect 480" in out  # gamma 0.2 of 600 unlearned in round 0
    assert main(["rerun", "--run", run_id, "--stage", "score", "--downstream", "--mlflow-uri", uri,
                 "--out", str(tmp_path), "--set", "meca.eps=0.2", "--no-mlflow"]) == 0
    out = capsys.readouterr().out
    assert _executed(out) == sorted(MECA_TASKS - {"poison", "warmup", "early"})  # nothing upstream of score
    assert "no defense" in out and "meca" in out  # evaluation ran: the summary is printed


def test_rerun_an_unknown_stage_names_the_defenses_stages(kfp_runs, tmp_path, capsys):
    _, uri, _ = kfp_runs
    assert main(["rerun", "--run", _first_run_id(uri), "--stage", "scoring", "--mlflow-uri", uri,
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "defense 'meca' has no stage 'scoring'" in err and "warmup, early, score, partition, enhance" in err
