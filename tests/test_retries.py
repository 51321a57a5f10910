"""Retries that fit: on a cluster KFP retries a failed task (an evicted pod, a preempted node, a timeout), so a user
error must not fail its task. KFP 2.17's retry policy has no exit-code filter, so a stage that raises an
UnpoisonError ends its task with exit code 0 and the error in its outputs, the tasks after it pass the error on, and
`track` (not retried) fails the run with exit code 3 (components/runner.py, `guarded`). Every other failure fails
its task, so KFP retries it.

Each test runs a task's component as its pod does: the program compiled into the checked-in spec, under KFP's
executor (`kfp.dsl.executor_main`) in a fresh process, and reads the exit code and the output folders. The compiled
retry policy, timeout and limits are checked in tests/test_kfp.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.config import load_config
from components.errors import USER_ERROR_EXIT, USER_ERROR_FILE
from pipelines import kfp_pipelines as kp

REPO = Path(__file__).resolve().parent.parent
KINDS = {"dataset": "system.Dataset", "truth": "system.Dataset", "out": "system.Model", "metrics": "system.Metrics",
         "report": "system.Markdown"}


def _artifacts(folders: dict, kind=lambda name: "system.Artifact") -> dict:
    return {name: {"artifacts": [{"name": name, "type": {"schemaTitle": kind(name)}, "uri": str(path), "metadata": {}}]}
            for name, path in folders.items()}


def run_entry(tmp_path: Path, task: str, params: dict, inputs: dict | None = None, outputs=("out",),
              stage_raises: str = "", pipeline: str = "none") -> subprocess.CompletedProcess:
    """Run task `task` of the compiled pipeline `pipeline` on parameters `params` and input folders `inputs`
    (slot -> folder); its outputs go to tmp_path/<name>. `stage_raises`: an expression whose value the declared
    stage raises instead of running (the stage functions are tested elsewhere)."""
    spec, _ = yaml.safe_load_all((kp.COMPILED / f"{pipeline}.yaml").read_text())
    component = spec["components"][kp.compiled_tasks(spec)[task]["componentRef"]["name"]]
    container = spec["deploymentSpec"]["executors"][component["executorLabel"]]["container"]
    program = tmp_path / "ephemeral_component.py"
    program.write_text(container["command"][-1])  # the compiled command writes its last item to this file and runs it
    executor_input = {
        "inputs": {"parameterValues": params, "artifacts": _artifacts(inputs or {})},
        "outputs": {"artifacts": _artifacts({o: tmp_path / o for o in outputs}, KINDS.get),
                    "parameters": {"Output": {"outputFile": str(tmp_path / "Output")}},
                    "outputFile": str(tmp_path / "executor_output.json")}}
    patch = ("import components.runner\n"
             "from components.errors import UnpoisonError\n"
             f"def run_stage(*args, **kwargs): raise {stage_raises}\n"
             "components.runner.run_stage = run_stage\n") if stage_raises else ""
    code = patch + "from kfp.dsl.executor_main import executor_main\nexecutor_main()\n"
    args = container["args"][:]
    args[args.index("{{$}}")] = json.dumps(executor_input)
    env = {**os.environ, "_KFP_RUNTIME": "true"}
    return subprocess.run([sys.executable, "-c", code, "--component_module_path", str(program), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def _marker(folder: Path) -> dict:
    return json.loads((folder / USER_ERROR_FILE).read_text())


def _stage(**params):
    return {"defense": "none", "stage": "train", "delivered": False, "upstream": [], **params}


def test_a_user_error_in_a_stage_ends_its_task_without_failing_it(tmp_path):
    # exit code 0: KFP does not retry the task; the error waits in its output for `track`
    proc = run_entry(tmp_path, "train", _stage(),
                     stage_raises="UnpoisonError(\"bad value for 'train.lr'; fix it in the YAML file\")")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _marker(tmp_path / "out") == {"stage": "train", "error": "bad value for 'train.lr'; fix it in the YAML file"}
    assert "unpoison: error: bad value for 'train.lr'" in proc.stderr


def test_any_other_failure_fails_the_task_so_kfp_retries_it(tmp_path):
    proc = run_entry(tmp_path, "train", _stage(), stage_raises="RuntimeError('CUDA error: an illegal memory access')")
    assert proc.returncode == 1 and "RuntimeError: CUDA error" in proc.stderr
    assert not (tmp_path / "out" / USER_ERROR_FILE).exists()


def test_a_bad_configuration_reaching_a_task_is_a_user_error(tmp_path):
    # no stand-in: the task's own configuration check raises the UnpoisonError
    proc = run_entry(tmp_path, "train", _stage(train={"lrr": 0.1}))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "unknown config key 'train.lrr'" in _marker(tmp_path / "out")["error"]


def test_a_missing_data_set_stops_the_data_stage_on_both_outputs(tmp_path):
    missing = tmp_path / "no-such-data"
    proc = run_entry(tmp_path, "poison", {"data": str(missing), "attack": {}, "train_limit": 0},
                     outputs=("dataset", "truth"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for out in ("dataset", "truth"):
        marker = _marker(tmp_path / out)
        assert marker["stage"] == "poison" and marker["error"].startswith(f"data path '{missing}' does not exist; ")


def test_an_unreachable_object_store_fails_the_task_so_kfp_retries_it(tmp_path, monkeypatch):
    # the store gives up after its own retries with an UnpoisonError (the CLI prints it as one line); caused by a
    # connection error, it is no user error: the task fails and KFP tries again later
    monkeypatch.setenv("S3_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("UNPOISON_CACHE", str(tmp_path / "cache"))
    proc = run_entry(tmp_path, "poison", {"data": "s3://datasets/cifar10/", "attack": {}, "train_limit": 0},
                     outputs=("dataset", "truth"))
    assert proc.returncode == 1 and "UnpoisonError: cannot reach" in proc.stderr and "127.0.0.1:9" in proc.stderr
    assert not (tmp_path / "dataset" / USER_ERROR_FILE).exists()


def _stopped(tmp_path, stage="poison") -> Path:
    folder = tmp_path / f"{stage}-output"
    folder.mkdir()
    (folder / USER_ERROR_FILE).write_text(json.dumps({"stage": stage, "error": "bad data; fix it"}))
    return folder


def test_a_task_after_a_stopped_stage_passes_the_error_on_without_running(tmp_path):
    # the stand-in stage would fail the task (exit 1): it does not run
    proc = run_entry(tmp_path, "train", _stage(upstream=["poison"]), inputs={"in0": _stopped(tmp_path)},
                     stage_raises="RuntimeError('the stage ran')")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _marker(tmp_path / "out") == {"stage": "poison", "error": "bad data; fix it"}


def test_evaluation_after_a_stopped_stage_writes_every_output(tmp_path):
    # the launcher uploads every output after the task: a missing one would fail the task, and KFP would retry it
    proc = run_entry(tmp_path, "evaluate", {"defense": "none", "delivered": False, "upstream": ["poison"]},
                     inputs={"in0": _stopped(tmp_path)}, outputs=("metrics", "report"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _marker(tmp_path / "metrics")["stage"] == "poison" and "user error" in (tmp_path / "report").read_text()


def test_track_fails_the_run_with_the_user_error_and_exit_code_3(tmp_path):
    proc = run_entry(tmp_path, "track", {"run_id": "run-1", "defense": "none", "delivered": False,
                                         "upstream": ["poison", "train"]},
                     inputs={"in0": _stopped(tmp_path), "in1": _stopped(tmp_path, "train")}, outputs=())
    assert proc.returncode == USER_ERROR_EXIT == 3
    assert "unpoison: error: stage poison stopped: bad data; fix it" in proc.stderr


@pytest.mark.slow
def test_under_kfp_local_a_user_error_fails_the_run_in_track_and_nothing_after_it_runs(tmp_path, capfd):
    # the whole way through a real orchestrator: the data stage stops, training and evaluation pass the error on,
    # track fails (the CLI checks the data path first, so the pipeline is called directly here)
    missing = tmp_path / "no-such-data"
    arguments = {**kp.arguments(load_config("cpu", {"train.epochs": 1}), "none"), "data": str(missing)}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(RuntimeError, match="Inner task failed: .*track"):
        kp.run_local(kp.build("none"), arguments, tmp_path / "kfp", mlflow_uri=uri)
    log = "".join(capfd.readouterr())  # kfp.local prints a task's stderr to stdout
    assert f"unpoison: error: stage poison stopped: data path '{missing}' does not exist" in log
    markers = {p.relative_to(tmp_path / "kfp").parts[1:-1] for p in (tmp_path / "kfp").glob(f"*/**/{USER_ERROR_FILE}")}
    assert markers == {("poison", "dataset"), ("poison", "truth"), ("train", "out"), ("evaluate", "metrics")}
    assert not list((tmp_path / "kfp").glob("*/train/out/model.json")), "training ran"
    # in MLflow: the data stage's child run FAILED with the error, and its parent run failed by `track`
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("unpoison").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    (poison,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]  # no stage after it ran
    assert parent.info.status == poison.info.status == "FAILED"
    assert poison.data.tags["unpoison.error"].startswith(f"UnpoisonError: data path '{missing}' does not exist")
    assert parent.data.tags["unpoison.error"] == f"stage poison: {poison.data.tags['unpoison.error']}"
