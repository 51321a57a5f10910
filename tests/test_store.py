"""components.store against a real S3 server (the `s3_server` fixture of conftest.py), plus unit tests."""

from __future__ import annotations

import hashlib
import io
import os
import socket

import numpy as np
import pytest
import urllib3
from minio.error import S3Error, ServerError

from components import store as store_module
from components.artifacts import load_model, save_model
from components.data import CIFAR10_CLASSES, load_images, load_train_test, sample_dir
from components.errors import UnpoisonError
from components.models import build_model
from components.store import MiB, Store, parse_uri
from pipelines.cli import main

SHARD = sample_dir() / "train.parquet"  # a real CIFAR-10 shard, ~11 MB


@pytest.fixture
def store(s3_server) -> Store:
    return Store.from_env()


def raw_keys(s3_server, bucket: str) -> list[str]:
    """Every key in the bucket, temporary ones included (Store.list hides those)."""
    return sorted(o.object_name for o in s3_server.client().list_objects(bucket, recursive=True))


# --------------------------------------------------------------------------------------------------
# unit tests: no server


def test_parse_uri():
    assert parse_uri("s3://my-bucket/a/b.parquet") == ("my-bucket", "a/b.parquet")
    assert parse_uri("s3://my-bucket/prefix/") == ("my-bucket", "prefix/")
    assert parse_uri("s3://my-bucket") == ("my-bucket", "")
    for bad in ("my-bucket/key", "http://host/key", "s3://", "s3:///key", "s3://UPPER/key", "s3://ab/key",
                "/local/path"):
        with pytest.raises(UnpoisonError, match="write it as s3://bucket/key"):
            parse_uri(bad)


def test_from_env_names_what_is_missing(monkeypatch):
    monkeypatch.delenv("S3_ENDPOINT", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    with pytest.raises(UnpoisonError) as e:
        Store.from_env()
    assert str(e.value) == ("S3_ENDPOINT is not set; export S3_ENDPOINT=http://host:port and the "
                            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY of the store")
    monkeypatch.setenv("S3_ENDPOINT", "127.0.0.1:8333")  # no scheme
    with pytest.raises(UnpoisonError, match=r"is not http\(s\)://host:port"):
        Store.from_env()


class FakeClient:
    """Fails fput_object with the given errors in turn, then succeeds; records calls."""

    def __init__(self, *errors):
        self.errors, self.calls = list(errors), []

    def bucket_exists(self, bucket):
        return True

    def fput_object(self, bucket, key, path, **kw):
        self.calls.append(("fput", key, kw["part_size"]))
        if self.errors:
            raise self.errors.pop(0)

    def copy_object(self, bucket, key, source, **kw):
        self.calls.append(("copy", key))

    def remove_object(self, bucket, key):
        self.calls.append(("remove", key))


def s3_error(status: int, code: str) -> S3Error:
    return S3Error(urllib3.HTTPResponse(status=status), code, "message", "/b/k", "req", "host", "bkt", "k")


@pytest.fixture
def sleeps(monkeypatch):
    waits = []
    monkeypatch.setattr(store_module.time, "sleep", waits.append)
    return waits


def test_retries_with_exponential_backoff_on_connection_errors_and_5xx(tmp_path, sleeps):
    f = tmp_path / "f.bin"
    f.write_bytes(b"x")
    fake = FakeClient(urllib3.exceptions.ProtocolError("Connection aborted"), ServerError("boom", 503),
                      s3_error(500, "InternalError"))
    Store("http://127.0.0.1:1", "k", "s", client=fake, attempts=4, backoff_s=0.5).put_file(f, "s3://bkt/f.bin")
    assert [c[0] for c in fake.calls] == ["fput"] * 4 + ["copy", "remove"]
    assert sleeps == [0.5, 1.0, 2.0]
    assert fake.calls[0][1].startswith("f.bin.tmp-") and fake.calls[-1] == ("remove", fake.calls[0][1])


def test_gives_up_after_the_last_attempt(tmp_path, sleeps):
    f = tmp_path / "f.bin"
    f.write_bytes(b"x")
    fake = FakeClient(*[ServerError("unavailable", 503)] * 3)
    with pytest.raises(UnpoisonError, match=r"failed on s3://bkt/f.bin 3 times .*; retry later"):
        Store("http://127.0.0.1:1", "k", "s", client=fake, attempts=3).put_file(f, "s3://bkt/f.bin")
    assert len(sleeps) == 2 and sleeps[1] == 2 * sleeps[0]
    assert fake.calls[-1][0] == "remove"  # the temporary object is cleaned up


def test_no_retry_on_4xx(tmp_path, sleeps):
    f = tmp_path / "f.bin"
    f.write_bytes(b"x")
    fake = FakeClient(s3_error(403, "SignatureDoesNotMatch"))
    expected = (r"S3 rejected the credentials for http://127.0.0.1:1 \(SignatureDoesNotMatch\); "
                "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    with pytest.raises(UnpoisonError, match=expected):
        Store("http://127.0.0.1:1", "k", "s", client=fake).put_file(f, "s3://bkt/f.bin")
    assert [c[0] for c in fake.calls] == ["fput", "remove"] and sleeps == []


def test_unreachable_endpoint_names_it(tmp_path):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    store = Store(endpoint, "k", "s", region="us-east-1", attempts=2, backoff_s=0.01)
    expected = rf"cannot reach the S3 endpoint {endpoint} \(.*refused\); check S3_ENDPOINT"
    with pytest.raises(UnpoisonError, match=expected):
        store.get_file("s3://bkt/x.parquet", tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()


# --------------------------------------------------------------------------------------------------
# integration: a real S3 server


def test_cifar_shard_round_trip(store, s3_server, s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/cifar10/train.parquet"
    assert store.put_file(SHARD, uri) == uri
    back = store.get_file(uri, tmp_path / "back" / "train.parquet")
    assert back.read_bytes() == SHARD.read_bytes()
    digest = hashlib.sha256(SHARD.read_bytes()).hexdigest()
    stat = s3_server.client().stat_object(s3_bucket, "cifar10/train.parquet")
    assert stat.metadata["x-amz-meta-sha256"] == digest and stat.size == SHARD.stat().st_size
    assert store.exists(uri) and store.list(f"s3://{s3_bucket}/cifar10") == [uri]
    assert raw_keys(s3_server, s3_bucket) == ["cifar10/train.parquet"]  # no temporary object left
    assert [p.name for p in (tmp_path / "back").iterdir()] == ["train.parquet"]  # nor a temporary file


def test_load_images_from_s3_matches_local(store, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("UNPOISON_CACHE", str(tmp_path / "cache"))
    store.put_dir(sample_dir(), f"s3://{s3_bucket}/cifar10-sample/")  # train.parquet, test.parquet, README.md
    train, test = load_train_test(f"s3://{s3_bucket}/cifar10-sample/")
    local_train, local_test = load_train_test(sample_dir())
    for got, want in ((train, local_train), (test, local_test)):
        assert np.array_equal(got.images, want.images) and np.array_equal(got.labels, want.labels)
        assert got.classes == want.classes and got.content_hash == want.content_hash
    cached = tmp_path / "cache" / "s3" / s3_bucket / "cifar10-sample" / "test.parquet"
    before = cached.stat().st_mtime_ns
    one_file = load_images(f"s3://{s3_bucket}/cifar10-sample/test.parquet")  # one object; no split of its own
    assert np.array_equal(one_file.images, local_test.images)
    load_images(f"s3://{s3_bucket}/cifar10-sample", "test")
    assert cached.stat().st_mtime_ns == before  # the matching cached copy was reused, not downloaded again


def test_fingerprint_of_an_object_or_prefix_changes_with_its_content(store, s3_bucket, tmp_path):
    from components.data import source_fingerprint

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "train.parquet").write_bytes(b"one")
    (tmp_path / "a" / "test.parquet").write_bytes(b"two")
    prefix = f"s3://{s3_bucket}/set/"
    store.put_dir(tmp_path / "a", prefix)
    first = store.fingerprint(prefix)
    assert store.fingerprint(f"s3://{s3_bucket}/set") == first == source_fingerprint(prefix)  # one listing
    one = store.fingerprint(f"{prefix}train.parquet")
    assert one != first
    store.put_file(tmp_path / "a" / "test.parquet", f"{prefix}train.parquet")  # same key, new content
    assert store.fingerprint(prefix) != first and store.fingerprint(f"{prefix}train.parquet") != one
    with pytest.raises(UnpoisonError, match="no objects under"):
        store.fingerprint(f"s3://{s3_bucket}/nothing/")


def test_model_folder_round_trip(store, s3_bucket, tmp_path):
    model = build_model("small_cnn", 10)
    save_model(model, {"architecture": "small_cnn", "classes": list(CIFAR10_CLASSES)}, tmp_path / "model")
    uris = store.put_dir(tmp_path / "model", f"s3://{s3_bucket}/runs/r1/model")
    # model.json marks a model complete: written last, so published last
    assert uris == [f"s3://{s3_bucket}/runs/r1/model/model.safetensors", f"s3://{s3_bucket}/runs/r1/model/model.json"]
    files = store.get_dir(f"s3://{s3_bucket}/runs/r1/model/", tmp_path / "back")
    assert sorted(p.name for p in files) == ["model.json", "model.safetensors"]
    for name in ("model.json", "model.safetensors"):
        assert (tmp_path / "back" / name).read_bytes() == (tmp_path / "model" / name).read_bytes()
    loaded, meta = load_model(tmp_path / "back")
    assert meta["architecture"] == "small_cnn"
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and bool((v == v2).all())


def test_multipart_upload(s3_server, s3_bucket, tmp_path):
    store = Store.from_env(part_size=5 * MiB)  # S3's smallest part
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * MiB))  # three parts: 5 + 5 + 1 MiB
    uploaded = []
    copy = store.client.copy_object

    def spy(bucket, key, source, **kw):  # look at the temporary object just before it is published
        uploaded.append(store.client.stat_object(bucket, source.object_name).etag)
        return copy(bucket, key, source, **kw)

    store.client.copy_object = spy
    uri = f"s3://{s3_bucket}/big/big.bin"
    store.put_file(big, uri)
    assert uploaded[0].endswith("-3")  # S3 gives a multipart upload the ETag "<md5 of part md5s>-<parts>"
    assert store.get_file(uri, tmp_path / "back.bin").read_bytes() == big.read_bytes()


def test_publish_is_atomic(store, s3_server, s3_bucket, tmp_path):
    f = tmp_path / "shard.parquet"
    f.write_bytes(b"version 1")
    uri = f"s3://{s3_bucket}/data/shard.parquet"
    seen = []
    copy = store.client.copy_object

    def check_then_copy(*args, **kw):  # the upload is complete, but not yet visible at the final key
        seen.append((store.exists(uri), raw_keys(s3_server, s3_bucket)))
        return copy(*args, **kw)

    store.client.copy_object = check_then_copy
    store.put_file(f, uri)
    assert seen[0][0] is False and seen[0][1][0].startswith("data/shard.parquet.tmp-")
    assert raw_keys(s3_server, s3_bucket) == ["data/shard.parquet"]

    # a publish that fails midway leaves the previous version intact and no temporary object behind
    def fail(*args, **kw):
        raise RuntimeError("simulated crash before publishing")

    store.client.copy_object = fail
    f.write_bytes(b"version 2, never published")
    with pytest.raises(RuntimeError, match="simulated"):
        store.put_file(f, uri)
    assert store.get_file(uri, tmp_path / "back").read_bytes() == b"version 1"
    with pytest.raises(RuntimeError):
        store.put_file(f, f"s3://{s3_bucket}/data/new.parquet")
    assert not store.exists(f"s3://{s3_bucket}/data/new.parquet")
    assert raw_keys(s3_server, s3_bucket) == ["data/shard.parquet"]


@pytest.mark.parametrize("key, secret, code", [("unpoison-test", "wrong-secret", "SignatureDoesNotMatch"),
                                               ("no-such-key", "wrong-secret", "InvalidAccessKeyId")])
def test_wrong_credentials(s3_server, s3_bucket, tmp_path, monkeypatch, key, secret, code):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    store = Store.from_env()
    f = tmp_path / "f.bin"
    f.write_bytes(b"x")
    expected = (rf"S3 rejected the credentials for {s3_server.endpoint} \({code}\); "
                "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    for attempt in (lambda: store.put_file(f, f"s3://{s3_bucket}/f.bin"),
                    lambda: store.get_file(f"s3://{s3_bucket}/f.bin", tmp_path / "g.bin"),
                    lambda: store.list(f"s3://{s3_bucket}/")):
        with pytest.raises(UnpoisonError, match=expected):
            attempt()


def test_missing_objects_name_the_uri(store, s3_bucket, tmp_path, monkeypatch):
    missing = f"s3://{s3_bucket}/nothing/here.parquet"
    with pytest.raises(UnpoisonError, match=f"{missing} does not exist at the S3 endpoint"):
        store.get_file(missing, tmp_path / "here.parquet")
    assert not store.exists(missing) and not (tmp_path / "here.parquet").exists()
    with pytest.raises(UnpoisonError, match="s3://no-such-bucket/x.parquet does not exist: .* bucket 'no-such-bucket'"):
        store.get_file("s3://no-such-bucket/x.parquet", tmp_path / "x.parquet")
    with pytest.raises(UnpoisonError, match=f"no objects under s3://{s3_bucket}/nothing/; "):
        store.get_dir(f"s3://{s3_bucket}/nothing/", tmp_path / "d")
    monkeypatch.setenv("UNPOISON_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UnpoisonError, match=f"no objects under s3://{s3_bucket}/nothing"):
        load_images(f"s3://{s3_bucket}/nothing")


def test_damaged_object_is_refused(store, s3_server, s3_bucket, tmp_path):
    s3_server.client().put_object(s3_bucket, "bad.bin", io.BytesIO(b"abc"), 3, metadata={"sha256": "0" * 64})
    with pytest.raises(UnpoisonError, match="does not match the sha256 recorded"):
        store.get_file(f"s3://{s3_bucket}/bad.bin", tmp_path / "bad.bin")
    assert list(tmp_path.iterdir()) == []


def test_cli_data_push(s3_server, s3_bucket, tmp_path, capsys):
    folder = tmp_path / "shards"
    (folder / "test").mkdir(parents=True)
    (folder / "train.parquet").write_bytes(b"train")
    (folder / "test" / "test.parquet").write_bytes(b"test")
    assert main(["data", "push", str(folder), f"s3://{s3_bucket}/sets/cifar"]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == [f"s3://{s3_bucket}/sets/cifar/test/test.parquet",
                               f"s3://{s3_bucket}/sets/cifar/train.parquet"]
    assert Store.from_env().list(f"s3://{s3_bucket}/sets/cifar") == sorted(printed)

    assert main(["data", "push", str(SHARD), "s3://pushed-bucket/one/"]) == 0  # creates the bucket
    assert capsys.readouterr().out.split() == ["s3://pushed-bucket/one/train.parquet"]
    assert main(["data", "push", str(tmp_path / "absent"), f"s3://{s3_bucket}/x"]) == 2
    assert "does not exist; pass a file or a folder" in capsys.readouterr().err
