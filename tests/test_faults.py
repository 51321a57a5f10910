"""Small faults (issue 17, item 6), one test each: a damaged model or table, the atomic-write helper, a run
reference that MLflow's filter syntax cannot hold, an interrupted download, an unfinished multipart upload."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest
import urllib3

from components import artifacts, data
from components.artifacts import SPLIT_SCHEMA, atomic_path, load_model, read_table, save_model, write_table
from components.errors import UnpoisonError
from components.models import build_model
from components.store import MiB, Store, fetch
from pipelines.cli import main


# ---------------------------------------------------------------------------------------------- artifacts


def test_model_with_damaged_weights_is_refused(tmp_path):
    folder = tmp_path / "final_train"
    save_model(build_model("small_cnn", 10), {"architecture": "small_cnn", "classes": list("abcdefghij")}, folder)
    expected = artifacts.read_json(folder / "model.json")["weights_sha256"]
    load_model(folder)  # intact: loads
    weights = folder / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF  # a byte of the last tensor's data: safetensors alone would load it without a word
    weights.write_bytes(bytes(raw))
    with pytest.raises(UnpoisonError) as e:
        load_model(folder)
    message = str(e.value)
    assert str(folder) in message and expected in message
    assert hashlib.sha256(bytes(raw)).hexdigest() in message  # the digest found
    assert "run the stage that wrote this model again" in message


@pytest.mark.parametrize("content", [b"not a parquet file", b"", "truncated"])
def test_damaged_table_is_a_clear_error(tmp_path, content):
    path = tmp_path / "split.parquet"
    write_table({"sample_id": [0, 1], "pool": ["clean", "suspect"], "relabel": [-1, -1]}, path, SPLIT_SCHEMA)
    assert list(read_table(path, SPLIT_SCHEMA)["pool"]) == ["clean", "suspect"]
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if content == "truncated" else content)
    with pytest.raises(UnpoisonError) as e:  # not pyarrow's ArrowInvalid
        read_table(path, SPLIT_SCHEMA)
    message = str(e.value)
    assert f"'{path}' is not a readable Parquet file" in message and "run the stage that wrote it again" in message


def test_one_atomic_write_helper():
    assert artifacts.atomic_path is data.atomic_path  # components.data's writes and the artifacts' are the same


def test_atomic_path_leaves_nothing_when_the_body_fails(tmp_path):
    target = tmp_path / "sub" / "table.parquet"
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half of it")
            raise RuntimeError("disk full")
    assert list((tmp_path / "sub").iterdir()) == []  # neither the temporary file nor a target
    with pytest.raises(KeyboardInterrupt):  # an interrupt too
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half of it")
            raise KeyboardInterrupt
    assert list((tmp_path / "sub").iterdir()) == []

    target.write_bytes(b"version 1")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"version 2, half")
            raise RuntimeError("crash")
    assert list((tmp_path / "sub").iterdir()) == [target] and target.read_bytes() == b"version 1"  # old one intact


def test_atomic_path_publishes_a_complete_synced_file(tmp_path, monkeypatch):
    synced = []  # (is a folder, size) of each fsync'ed descriptor
    real_fsync = os.fsync

    def spy(fd):
        st = os.fstat(fd)
        synced.append((stat.S_ISDIR(st.st_mode), st.st_size))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    target = tmp_path / "doc.json"
    old_umask = os.umask(0o022)
    try:
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp != target and not target.exists()  # beside it, not yet visible
            tmp.write_bytes(b"x" * 1000)
    finally:
        os.umask(old_umask)
    assert list(tmp_path.iterdir()) == [target] and target.read_bytes() == b"x" * 1000
    # the file's data reaches the disk before the rename, and the folder's entry after it
    assert synced[0] == (False, 1000) and synced[-1][0] is True
    # the umask decides the permissions, as with open(): others may read a run's artifacts (not 0600)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


# ---------------------------------------------------------------------------------------------- rerun


def test_two_runs_of_one_name_never_share_a_folder(tmp_path):
    # two reruns started in the same second once got the same time-stamped name: the second emptied the first's
    # .partial folder and both wrote into it
    from pipelines.local import _new_run_dir

    first = _new_run_dir(tmp_path, "meca-sig-20261208-010846", numbered=True)
    (first / "stage.json").write_text("{}")
    second = _new_run_dir(tmp_path, "meca-sig-20261208-010846", numbered=True)
    assert first.name == "meca-sig-20261208-010846.partial" and second.name == "meca-sig-20261208-010846-2.partial"
    assert (first / "stage.json").is_file()  # the first run's outputs are untouched
    with pytest.raises(UnpoisonError, match="already exists.*another --name"):
        _new_run_dir(tmp_path, "meca-sig-20261208-010846")  # a name the user gave is never renumbered
    assert (first / "stage.json").is_file()
    (tmp_path / "done").mkdir()
    with pytest.raises(UnpoisonError, match="'.*done' or 'done.partial'"):
        _new_run_dir(tmp_path, "done")


def test_rerun_reference_with_quotes(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from components import tracking
    from pipelines.rerun import find_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment(tracking.EXPERIMENT)  # with the experiment there, the run is searched for
    run = client.create_run(experiment, tags={"unpoison.run": "bob's run", "unpoison.defense": "meca"})
    assert find_run(client, tracking.EXPERIMENT, "bob's run").info.run_id == run.info.run_id  # a quote is no bar
    capsys.readouterr()  # MLflow's log of creating the database

    def rerun(ref: str) -> str:  # must exit 2 with one line, not MLflow's traceback from its filter parser
        code = main(["rerun", "--run", ref, "--stage", "final_train", "--mlflow-uri", uri, "--out", str(tmp_path)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("unpoison: error: "), lines
        return lines[0]

    assert "no recorded run 'x''" in rerun("x'")
    for ref in ("x'\"", "x\\"):  # no MLflow string literal can hold these
        line = rerun(ref)
        assert repr(ref) in line and "holds both kinds of quote or a backslash" in line and "MLflow run id" in line


# ---------------------------------------------------------------------------------------------- store


class Interrupted:
    """A GET response that yields one chunk, then raises `error` (Ctrl-C, a full disk)."""

    headers = {"x-amz-meta-sha256": "0" * 64}

    def __init__(self, error: BaseException):
        self.error = error

    def stream(self, amt, decode_content=False):
        yield b"a" * amt
        raise self.error

    def close(self):
        pass

    def release_conn(self):
        pass


class DownloadClient:
    def __init__(self, error: BaseException):
        self.error = error

    def stat_object(self, bucket, key):  # a changed object: the cached copy does not match it
        return type("Stat", (), {"metadata": {"x-amz-meta-sha256": "0" * 64}, "size": 3})()

    def get_object(self, bucket, key):
        return Interrupted(self.error)


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError("No space left on device")])
def test_interrupted_download_leaves_no_temporary_file(tmp_path, error):
    store = Store("http://127.0.0.1:1", "k", "s", client=DownloadClient(error), attempts=1)
    cache = tmp_path / "cache"
    with pytest.raises(type(error)):
        fetch("s3://bkt/data/new.parquet", cache=cache, store=store)
    assert [p for p in cache.rglob("*") if p.is_file()] == []  # no temporary file, no partial target
    cached = cache / "s3" / "bkt" / "data" / "old.parquet"
    cached.write_bytes(b"old")  # an earlier copy of an object that has changed since
    with pytest.raises(type(error)):
        fetch("s3://bkt/data/old.parquet", cache=cache, store=store)
    assert [p for p in cache.rglob("*") if p.is_file()] == [cached] and cached.read_bytes() == b"old"


def unfinished_uploads(s3_server, bucket: str) -> list[str]:
    return [u.object_name for u in s3_server.client()._list_multipart_uploads(bucket).uploads]


@pytest.mark.parametrize("attempts", [1, 2])
def test_crashed_multipart_upload_is_aborted(s3_server, s3_bucket, tmp_path, attempts):
    # the server lists unfinished uploads: an empty listing below means aborted, not unsupported
    probe = s3_server.client()
    upload_id = probe._create_multipart_upload(s3_bucket, "probe.bin", {})
    assert unfinished_uploads(s3_server, s3_bucket) == ["probe.bin"]
    probe._abort_multipart_upload(s3_bucket, "probe.bin", upload_id)
    assert unfinished_uploads(s3_server, s3_bucket) == []

    store = Store.from_env(part_size=5 * MiB, attempts=attempts, backoff_s=0.01)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * MiB))  # three parts
    upload_part, abort = store.client._upload_part, store.client._abort_multipart_upload
    calls = {"part 2": 0, "abort": 0}

    def crash_on_part_2(bucket, key, data, headers, upload_id, part_number):
        if part_number == 2 and calls["part 2"] == 0:  # the store crashes while part 2 goes up...
            calls["part 2"] += 1
            raise urllib3.exceptions.ProtocolError("Connection aborted: the store crashed")
        return upload_part(bucket, key, data, headers, upload_id, part_number)

    def abort_once_refused(bucket, key, upload_id):
        calls["abort"] += 1
        if calls["abort"] == 1:  # ... so minio's own abort of the upload does not get through either
            raise urllib3.exceptions.ProtocolError("Connection refused: the store is down")
        return abort(bucket, key, upload_id)

    store.client._upload_part = crash_on_part_2
    store.client._abort_multipart_upload = abort_once_refused
    uri = f"s3://{s3_bucket}/big/big.bin"
    if attempts == 1:  # fails for good
        with pytest.raises(UnpoisonError, match="cannot reach the S3 endpoint"):
            store.put_file(big, uri)
        assert not store.exists(uri)
    else:  # the store is back for the retry, which succeeds
        store.put_file(big, uri)
        assert store.get_file(uri, tmp_path / "back.bin").read_bytes() == big.read_bytes()
    assert calls["part 2"] == 1 and calls["abort"] >= 2  # the upload of the first attempt was aborted after all
    assert unfinished_uploads(s3_server, s3_bucket) == []
