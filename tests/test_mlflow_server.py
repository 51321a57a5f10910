"""Integration: a real `mlflow server` (sqlite backend, artifacts on the real S3 server of conftest), a local
pipeline run logged to it, and everything read back through MlflowClient."""

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from components.config import load_config
from components.store import Store
from pipelines import local


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(s3_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    Store.from_env().ensure_bucket("mlflow")
    port = _free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", "s3://mlflow/artifacts",
         "--serve-artifacts", "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}"],
        env={**os.environ, **s3_server.env}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
    yield url
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_pipeline_run_logged_to_mlflow_server_with_artifacts_on_s3(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = load_config("cpu", {"train_limit": 500, "train.epochs": 1})
    run_dir = local.run("none", cfg, tmp_path, mlflow_uri=mlflow_server, name="none-on-server")
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("unpoison")
    runs = client.search_runs([exp.experiment_id], "tags.`unpoison.run` = 'none-on-server'")
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.params["attack.name"] == "badnets" and parent.data.params["train.epochs"] == "1"
    assert 0 <= parent.data.metrics["acc"] <= 1 and 0 <= parent.data.metrics["asr"] <= 1
    children = {r.data.tags["unpoison.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"poison", "train", "evaluate"}
    assert children["train"].data.metrics["seconds"] > 0
    assert [h.step for h in client.get_metric_history(children["train"].info.run_id, "test_acc")] == [0]
    listed = {a.path for a in client.list_artifacts(children["train"].info.run_id, "train")}
    assert {"train/model.safetensors", "train/model.json", "train/history.json", "train/stage.json"} <= listed
    # the artifacts went through the server into the S3 bucket
    keys = Store.from_env().list("s3://mlflow/artifacts/")
    assert any(k.endswith("train/model.safetensors") for k in keys)
    assert (run_dir / "metrics.json").exists()
