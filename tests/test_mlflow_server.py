"""Integration: a real `mlflow server` (sqlite backend, artifacts on the real S3 server of conftest), a local
pipeline run logged to it, and everything read back through MlflowClient; and a real `mlflow server --app-name
basic-auth` with the image's auth settings, which refuses requests without credentials and records unpoison's
tracking with them."""

import base64
import configparser
import json
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from components.config import load_config
from components.store import Store
from conftest import free_port, mlflow_serving
from pipelines import local


def test_pipeline_run_logged_to_mlflow_server_with_artifacts_on_s3(mlflow_server, tmp_path, mini_sample):
    from mlflow.tracking import MlflowClient

    cfg = load_config("cpu", {"data": mini_sample, "train_limit": 500, "train.epochs": 1})
    run_dir = local.run("none", cfg, tmp_path, mlflow_uri=mlflow_server, name="none-on-server")
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("unpoison")
    runs = client.search_runs([exp.experiment_id], "tags.`unpoison.run` = 'none-on-server'")
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.params["attack.name"] == "badnets" and parent.data.params["train.epochs"] == "1"
    assert 0 <= parent.data.metrics["acc"] <= 1 and 0 <= parent.data.metrics["asr"] <= 1
    children = {r.data.tags["unpoison.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"poison", "train", "evaluate"}
    assert parent.info.status == "FINISHED" and all(r.info.status == "FINISHED" for r in children.values())
    assert children["train"].data.metrics["seconds"] > 0
    assert [h.step for h in client.get_metric_history(children["train"].info.run_id, "test_acc")] == [0]
    listed = {a.path for a in client.list_artifacts(children["train"].info.run_id, "train")}
    assert {"train/model.safetensors", "train/model.json", "train/history.json", "train/stage.json"} <= listed
    # the artifacts went through the server into the S3 bucket
    keys = Store.from_env().list("s3://mlflow/artifacts/")
    assert any(k.endswith("train/model.safetensors") for k in keys)
    assert (run_dir / "metrics.json").exists()


def test_a_failing_stage_shows_on_the_server_as_failed_runs_with_its_epochs_so_far(mlflow_server, tmp_path,
                                                                                 monkeypatch):
    from mlflow.tracking import MlflowClient

    from components import stages

    real = stages.Monitor.__call__

    def monitor(self, epoch, model, record):  # the training raises in its third epoch
        if epoch == 2:
            raise RuntimeError("injected: the node went away")
        real(self, epoch, model, record)

    monkeypatch.setattr(stages.Monitor, "__call__", monitor)
    cfg = load_config("cpu", {"train_limit": 300, "train.epochs": 3})
    with pytest.raises(RuntimeError, match="injected"):
        local.run("none", cfg, tmp_path, mlflow_uri=mlflow_server, name="fails-on-server")
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("unpoison")
    runs = client.search_runs([exp.experiment_id], "tags.`unpoison.run` = 'fails-on-server'")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    (train,) = [r for r in runs if r.data.tags.get("unpoison.stage") == "train"]
    assert parent.info.status == train.info.status == "FAILED"
    assert parent.data.tags["unpoison.error"] == "stage train: RuntimeError: injected: the node went away"
    assert [h.step for h in client.get_metric_history(train.info.run_id, "test_acc")] == [0, 1]


# ---------------------------------------------------------------- basic authentication (issue 17 item 5)

AUTH_INI = Path(__file__).resolve().parents[1] / "images" / "mlflow-basic-auth.ini"
ADMIN_PASSWORD = "admin-" + secrets.token_hex(8)  # from MLFLOW_AUTH_ADMIN_PASSWORD, as the Deployment sets it
PIPELINE_USER, PIPELINE_PASSWORD = "unpoison-pipeline", "pipe-" + secrets.token_hex(8)


def _auth_config(root: Path) -> Path:
    """The image's basic-auth settings as shipped, with the user database moved from the image's volume to `root`."""
    config = configparser.ConfigParser()
    config.read(AUTH_INI)
    assert "admin_password" not in config["mlflow"], "no credential in the image"
    config["mlflow"]["database_uri"] = f"sqlite:///{root / 'basic_auth.db'}"
    path = root / "basic_auth.ini"
    with open(path, "w") as f:
        config.write(f)
    return path


def _basic_auth_env(root: Path, admin_password: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "MLFLOW_AUTH_"))}
    return {**env, "MLFLOW_AUTH_CONFIG_PATH": str(_auth_config(root)), "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}


def _call(url: str, path: str, auth: tuple[str, str] | None = None, body: dict | None = None) -> tuple[int, str]:
    """(status, body) of a request, with HTTP basic credentials when `auth` is given."""
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """`mlflow server --app-name basic-auth` as the Deployment runs it (the image's auth settings, the admin password
    and the CSRF key from env), on a sqlite store with artifacts served from a local folder."""
    root = tmp_path_factory.mktemp("mlflow-auth-server")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--serve-artifacts", "--artifacts-destination", str(root / "artifacts"),
         "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}"],
        env=_basic_auth_env(root, ADMIN_PASSWORD), stdout=log, stderr=subprocess.STDOUT)
    yield from mlflow_serving(proc, port, root, log)


def test_basic_auth_refuses_requests_without_valid_credentials(auth_server):
    search = "/api/2.0/mlflow/experiments/search?max_results=1"
    status, _ = _call(auth_server, search)
    assert status == 401
    assert _call(auth_server, search, auth=("admin", "not-the-password"))[0] == 401
    assert _call(auth_server, search, auth=(PIPELINE_USER, PIPELINE_PASSWORD))[0] == 401  # not created yet
    assert _call(auth_server, "/")[0] == 401  # the UI too: the browser asks for a user name and password
    assert _call(auth_server, search, auth=("admin", ADMIN_PASSWORD))[0] == 200
    assert _call(auth_server, "/health")[0] == 200  # probes need no credentials


def test_pipeline_user_records_a_run_with_credentials_from_env(auth_server, tmp_path, monkeypatch):
    """README's steps: the admin creates the pipelines' user, whose name and password reach a pipeline pod as
    MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (Secret unpoison-mlflow); unpoison's tracking then logs
    to the experiment `unpoison`, here one the admin created (default_permission EDIT of the image's settings)."""
    from mlflow.tracking import MlflowClient

    from components import tracking

    admin = ("admin", ADMIN_PASSWORD)
    status, body = _call(auth_server, "/api/2.0/mlflow/users/create", admin,
                         {"username": PIPELINE_USER, "password": PIPELINE_PASSWORD})
    assert status == 200, body
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    MlflowClient(auth_server).create_experiment(tracking.EXPERIMENT)

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", PIPELINE_USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PIPELINE_PASSWORD)
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / "stage.json").write_text(json.dumps({"stage": "train", "result": {"train_acc": 0.5}, "seconds": 1.5,
                                                   "execution_id": "e1"}))
    (folder / "history.json").write_text(json.dumps([{"epoch": 0, "test_acc": 0.4}]))
    run_id = tracking.record_pipeline_run("auth-run", "none", {"attack": {"name": "badnets"}},
                                          {"train": (str(folder), "s3://bucket/train")}, uri=auth_server)
    client = MlflowClient(auth_server)
    run = client.get_run(run_id)
    assert run.data.params["defense"] == "none" and run.data.tags["unpoison.run"] == "auth-run"
    (child,) = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'")
    assert child.data.metrics["train_acc"] == 0.5
    assert {a.path for a in client.list_artifacts(child.info.run_id, "train")} >= {"train/stage.json",
                                                                                   "train/history.json"}

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password")
    with pytest.raises(Exception, match="401|not authenticated|Unauthorized"):
        client.get_run(run_id)


def test_basic_auth_server_refuses_to_start_with_the_template_password(tmp_path):
    """The Secret mlflow-auth ships REPLACE_ME: too short for an admin password, so an unfilled Secret stops the
    server rather than creating an admin whose password is in the repository."""
    res = subprocess.run(
        [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
         "--port", str(free_port()), "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
        env=_basic_auth_env(tmp_path, "REPLACE_ME"), capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "at least 12 characters" in res.stdout + res.stderr, (res.stdout + res.stderr)[-2000:]
