"""Data loaders: the shipped sample, every source format, round trips, errors and atomic writes."""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components import data
from components.data import (
    CIFAR10_CLASSES,
    ImageSet,
    has_test_split,
    load_ground_truth,
    load_images,
    load_train_test,
    save_npz,
    save_parquet,
)
from components.errors import UnpoisonError

REPO = Path(__file__).resolve().parent.parent
SHARED_CIFAR10 = REPO.parent / "shared" / "datasets" / "cifar10"  # ../shared/datasets/cifar10 from the repo root


def random_set(n=12, h=8, w=8, k=3, seed=0, classes=None) -> ImageSet:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    labels = (np.arange(n) % k).astype(np.int64)
    return ImageSet(images, labels, tuple(classes or (f"class_{i}" for i in range(k))))


def assert_same(a: ImageSet, b: ImageSet) -> None:
    assert a.images.dtype == b.images.dtype == np.uint8
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.labels.dtype == b.labels.dtype == np.int64
    assert a.classes == b.classes
    assert a.content_hash == b.content_hash


# ---------------------------------------------------------------------------------------------- sample


@pytest.fixture(scope="module")
def sample():
    return load_train_test("sample")


def test_sample_loads(sample):
    train, test = sample
    for ds, n, per_class in ((train, 5000, 500), (test, 1000, 100)):
        assert len(ds) == n
        assert ds.images.shape == (n, 32, 32, 3) and ds.images.dtype == np.uint8
        assert ds.images.flags.c_contiguous
        assert ds.labels.dtype == np.int64
        assert ds.classes == CIFAR10_CLASSES and ds.num_classes == 10
        assert np.bincount(ds.labels, minlength=10).tolist() == [per_class] * 10
    assert load_images("sample", "test").content_hash == test.content_hash


def test_sample_is_small():
    total = sum(f.stat().st_size for f in data.sample_dir().iterdir())
    assert total <= 15e6


@pytest.mark.skipif(not SHARED_CIFAR10.is_dir(), reason="no shared CIFAR-10 copy at ../shared/datasets/cifar10")
def test_sample_bit_identical_to_shared_copy(sample):
    for ds, split in zip(sample, ("train", "test")):
        source_index = pq.read_table(data.sample_dir() / f"{split}.parquet", columns=["source_index"])
        source_index = source_index.column(0).to_numpy()
        assert np.all(np.diff(source_index) > 0)  # original order, no repeats
        for row in (0, 1, len(ds) // 2, len(ds) - 1):
            i = int(source_index[row])
            shard, offset = (f"train-{i // 10000:05d}-of-00005.parquet", i % 10000) if split == "train" else (
                "test-00000-of-00001.parquet",
                i,
            )
            original = pq.read_table(SHARED_CIFAR10 / shard).slice(offset, 1).to_pylist()[0]
            pixels = np.asarray(Image.open(io.BytesIO(original["img"]["bytes"])).convert("RGB"))
            np.testing.assert_array_equal(ds.images[row], pixels)
            assert ds.labels[row] == original["label"]
        # the first 500 (100) of each class: no earlier image of that class was skipped
        labels = pq.read_table(sorted(SHARED_CIFAR10.glob(f"{split}-*.parquet"))[0], columns=["label"])
        labels = labels.column(0).to_numpy()
        first_class0 = np.flatnonzero(labels == 0)[: 5 if split == "train" else 3]
        np.testing.assert_array_equal(source_index[ds.labels == 0][: len(first_class0)], first_class0)


# ---------------------------------------------------------------------------------------------- formats


def write_fake_release(root: Path, per_batch=3, seed=0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A tiny cifar-10-batches-py folder, pickled as the official release is (dicts with bytes keys)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}, f, protocol=2)
    out = {}
    for split, files in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        imgs, labs = [], []
        for name in files:
            x = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
            y = rng.integers(0, 10, per_batch).tolist()
            rows = x.transpose(0, 3, 1, 2).reshape(per_batch, 3072)  # 1024 R, 1024 G, 1024 B per row
            with open(root / name, "wb") as f:
                pickle.dump({b"batch_label": name.encode(), b"data": rows, b"labels": y, b"filenames": []}, f, protocol=2)
            imgs.append(x)
            labs += y
        out[split] = (np.concatenate(imgs), np.asarray(labs, dtype=np.int64))
    return (*out["train"], *out["test"])


def test_cifar_release_round_trip(tmp_path):
    x_train, y_train, x_test, y_test = write_fake_release(tmp_path / "cifar-10-batches-py")
    for source in (tmp_path / "cifar-10-batches-py", tmp_path):  # the folder itself or the folder holding it
        train, test = load_train_test(source)
        np.testing.assert_array_equal(train.images, x_train)
        np.testing.assert_array_equal(train.labels, y_train)
        np.testing.assert_array_equal(test.images, x_test)
        np.testing.assert_array_equal(test.labels, y_test)
        assert train.classes == CIFAR10_CLASSES and len(train) == 15 and len(test) == 3


def test_cifar_release_refuses_foreign_pickles(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    write_fake_release(root)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(UnpoisonError, match="cannot read CIFAR-10 batch file"):
        load_images(root, "test")


def write_png(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def test_image_folder_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    expected = {}
    for split, n in (("train", 3), ("test", 2)):
        imgs, labs = [], []
        for k, cls in enumerate(["cat", "dog", "zebra"]):  # sorted by folder name
            for j in range(n):
                img = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
                write_png(tmp_path / split / cls / f"{j:03d}.png", img)
                imgs.append(img)
                labs.append(k)
        expected[split] = (np.stack(imgs), np.asarray(labs))
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    train, test = load_train_test(tmp_path)
    for ds, split in ((train, "train"), (test, "test")):
        assert ds.classes == ("cat", "dog", "zebra")
        assert ds.images.shape == (len(expected[split][1]), 10, 12, 3)
        np.testing.assert_array_equal(ds.images, expected[split][0])
        np.testing.assert_array_equal(ds.labels, expected[split][1])

    flat = load_images(tmp_path / "train")  # <root>/<class>/* with no split subfolder
    assert_same(flat, train)
    with pytest.raises(UnpoisonError, match="one split only"):
        load_train_test(tmp_path / "train")


def test_image_folder_sizes(tmp_path):
    write_png(tmp_path / "a" / "0.png", np.zeros((8, 8, 3), np.uint8))
    write_png(tmp_path / "b" / "0.png", np.full((16, 12, 3), 200, np.uint8))
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(tmp_path / "b" / "1.jpg")  # grayscale JPEG -> RGB
    with pytest.raises(UnpoisonError, match=r"different sizes.*size=N"):
        load_images(tmp_path)
    ds = load_images(tmp_path, size=8)
    assert ds.images.shape == (3, 8, 8, 3) and ds.labels.tolist() == [0, 1, 1]
    assert ds.images[1].min() == ds.images[1].max() == 200  # a flat image stays flat when resized
    assert ds.images[2].min() == ds.images[2].max() == 7


def test_npz_round_trip(tmp_path):
    ds = random_set()
    path = save_npz(ds, tmp_path / "set.npz")
    assert_same(load_images(path), ds)
    assert_same(load_images(str(path), "test"), ds)  # one file holds one split, whatever split asks for


def test_parquet_round_trip(tmp_path):
    ds = random_set(classes=("alpha", "beta", "gamma"))
    path = save_parquet(ds, tmp_path / "set.parquet")
    assert_same(load_images(path), ds)
    schema = pq.read_schema(path)
    assert schema.field("img").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert schema.field("label").type == pa.int64()
    assert json.loads(schema.metadata[b"classes"]) == ["alpha", "beta", "gamma"]
    assert schema.metadata[b"content_hash"].decode() == ds.content_hash


def test_parquet_shard_folder(tmp_path):
    """Shards of a split load in name order; class names default to CIFAR-10's when there are 10 labels."""
    ds = random_set(n=30, k=10)
    parts = [ds.subset(slice(0, 10)), ds.subset(slice(10, 20)), ds.subset(slice(20, 30))]
    for i, part in enumerate(parts):
        tbl = pq.read_table(save_parquet(part, tmp_path / "tmp.parquet")).replace_schema_metadata(None)
        pq.write_table(tbl, tmp_path / f"train-{i:05d}-of-00003.parquet")  # no metadata, like the shared copy
    os.unlink(tmp_path / "tmp.parquet")
    pq.write_table(
        pq.read_table(save_parquet(ds.subset(slice(0, 4)), tmp_path / "x.parquet")).replace_schema_metadata(None),
        tmp_path / "test-00000-of-00001.parquet",
    )
    os.unlink(tmp_path / "x.parquet")
    train, test = load_train_test(tmp_path)
    np.testing.assert_array_equal(train.images, ds.images)
    np.testing.assert_array_equal(train.labels, ds.labels)
    assert train.classes == CIFAR10_CLASSES and len(test) == 4

    os.unlink(tmp_path / "train-00001-of-00003.parquet")
    with pytest.raises(UnpoisonError, match="found 2 of 3 'train' shards"):
        load_images(tmp_path)


def test_content_hash_changes_with_one_pixel():
    ds = random_set()
    images = ds.images.copy()
    images[3, 2, 1, 0] ^= 1
    changed = ImageSet(images, ds.labels.copy(), ds.classes)
    assert changed.content_hash != ds.content_hash
    relabeled = ImageSet(ds.images.copy(), np.roll(ds.labels, 1), ds.classes)
    assert relabeled.content_hash != ds.content_hash
    assert ImageSet(ds.images.copy(), ds.labels.copy(), ds.classes).content_hash == ds.content_hash


# ---------------------------------------------------------------------------------------------- errors


def test_missing_path():
    with pytest.raises(UnpoisonError) as e:
        load_images("no/such/dir")
    assert str(e.value).startswith("data path 'no/such/dir' does not exist; pass --data sample")
    assert "\n" not in str(e.value)


def test_parquet_wrong_columns(tmp_path):
    pq.write_table(pa.table({"pixels": [b"x"], "target": [1]}), tmp_path / "bad.parquet")
    with pytest.raises(UnpoisonError, match=r"has columns \['pixels', 'target'\].*img: struct<bytes: binary"):
        load_images(tmp_path / "bad.parquet")


def test_empty_folder(tmp_path):
    with pytest.raises(UnpoisonError, match="no class subfolders"):
        load_images(tmp_path)
    (tmp_path / "cat").mkdir()
    with pytest.raises(UnpoisonError, match="holds no images"):
        load_images(tmp_path)


def test_no_test_split(tmp_path):
    shards = tmp_path / "shards"
    save_parquet(random_set(), shards / "train-00000-of-00001.parquet")
    assert len(load_images(shards)) == 12
    with pytest.raises(UnpoisonError, match="no 'test' split"):
        load_images(shards, "test")
    with pytest.raises(UnpoisonError, match="no 'test' split"):
        load_train_test(shards)

    folder = tmp_path / "folder"
    write_png(folder / "train" / "cat" / "0.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(UnpoisonError, match="no 'test' split"):
        load_images(folder, "test")

    release = tmp_path / "release" / "cifar-10-batches-py"
    write_fake_release(release)
    os.unlink(release / "test_batch")
    with pytest.raises(UnpoisonError, match="no 'test' split.*test_batch"):
        load_images(release, "test")


def test_labels_out_of_range(tmp_path):
    ds = random_set(k=3)
    path = save_parquet(ds, tmp_path / "set.parquet")
    table = pq.read_table(path)
    bad = table.set_column(1, "label", pa.array(np.full(len(ds), 5, np.int64)))
    pq.write_table(bad.replace_schema_metadata({b"classes": json.dumps(list(ds.classes)).encode()}), path)
    with pytest.raises(UnpoisonError, match="range over 5..5 but there are 3 classes"):
        load_images(path)


def test_unreadable_image(tmp_path):
    write_png(tmp_path / "cat" / "0.png", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "cat" / "1.png").write_bytes(b"not a png")
    with pytest.raises(UnpoisonError, match=r"cannot decode image .*1\.png"):
        load_images(tmp_path)


def test_changed_file_is_reported(tmp_path):
    ds = random_set()
    path = save_npz(ds, tmp_path / "set.npz")
    with np.load(path) as z:
        arrays = dict(z)
    arrays["labels"] = np.roll(arrays["labels"], 1)
    np.savez(path, **arrays)
    with pytest.raises(UnpoisonError, match="does not match the hash"):
        load_images(path)


# ---------------------------------------------------------------------------------------------- atomic writes


def test_atomic_writes_leave_no_temp_files(tmp_path, monkeypatch):
    ds = random_set()
    save_npz(ds, tmp_path / "a.npz")
    save_parquet(ds, tmp_path / "a.parquet")
    save_parquet(ds.subset(slice(0, 3)), tmp_path / "a.parquet")  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "a.parquet"]
    assert len(load_images(tmp_path / "a.parquet")) == 3

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", fail)
    with pytest.raises(OSError, match="disk full"):
        save_parquet(ds, tmp_path / "b.parquet")
    with pytest.raises(OSError, match="disk full"):
        save_parquet(ds, tmp_path / "a.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "a.parquet"]  # nothing half-written
    assert len(load_images(tmp_path / "a.parquet")) == 3  # the old file is intact


# ---------------------------------------------------------------------------------------------- sources, ground truth


def test_sources_image_folder(tmp_path):
    for split in ("train", "test"):
        for cls in ("airplane", "bird"):
            for j in range(2):
                write_png(tmp_path / split / cls / f"{j:04d}.png", np.full((4, 4, 3), j, np.uint8))
    train, test = load_train_test(tmp_path)
    assert train.sources == ("train/airplane/0000.png", "train/airplane/0001.png", "train/bird/0000.png",
                             "train/bird/0001.png")
    assert test.sources[0] == "test/airplane/0000.png"
    flat = load_images(tmp_path / "train")  # no split subfolders: relative to the folder passed
    assert flat.sources[-1] == "bird/0001.png"
    assert load_images(tmp_path / "train", size=8).sources == flat.sources  # resizing keeps them
    assert has_test_split(tmp_path) and not has_test_split(tmp_path / "train")


def test_sources_parquet_shards(tmp_path):
    ds = random_set(n=10)
    save_parquet(ds.subset(slice(0, 6)), tmp_path / "train-00000-of-00002.parquet")
    save_parquet(ds.subset(slice(6, 10)), tmp_path / "train-00001-of-00002.parquet")
    train = load_images(tmp_path)
    # the row index restarts in each file
    assert train.sources[5:7] == ("train-00000-of-00002.parquet:5", "train-00001-of-00002.parquet:0")
    assert len(train.sources) == 10 and train.sources[-1] == "train-00001-of-00002.parquet:3"
    assert train.content_hash == ds.content_hash  # sources are not part of the hash
    assert not has_test_split(tmp_path)
    save_parquet(ds.subset(slice(0, 2)), tmp_path / "test-00000-of-00001.parquet")
    assert has_test_split(tmp_path)
    assert load_images(tmp_path / "test-00000-of-00001.parquet").sources == (
        "test-00000-of-00001.parquet:0", "test-00000-of-00001.parquet:1")
    assert not has_test_split(tmp_path / "test-00000-of-00001.parquet")


def test_sources_sample(sample):
    train, test = sample
    assert train.sources[17] == "sample/train.parquet:17" and len(train.sources) == len(train)
    assert test.sources[-1] == f"sample/test.parquet:{len(test) - 1}"
    assert has_test_split("sample")


def test_sources_npz_release_and_subset(tmp_path):
    path = save_npz(random_set(), tmp_path / "dataset.npz")
    ds = load_images(path)
    assert ds.sources[3] == "dataset.npz:3" and not has_test_split(path)
    part = ds.subset(np.array([5, 1]))
    assert part.sources == ("dataset.npz:5", "dataset.npz:1")
    assert ds.subset(ds.labels == 0).sources == ("dataset.npz:0", "dataset.npz:3", "dataset.npz:6", "dataset.npz:9")
    assert ds.subset(slice(10, None)).sources == ("dataset.npz:10", "dataset.npz:11")
    assert ImageSet(ds.images, ds.labels, ds.classes).content_hash == ds.content_hash  # sources are not hashed

    write_fake_release(tmp_path / "release" / "cifar-10-batches-py")  # 3 images per batch file
    train = load_images(tmp_path / "release")
    assert train.sources[:4] == ("data_batch_1:0", "data_batch_1:1", "data_batch_1:2", "data_batch_2:0")
    assert load_images(tmp_path / "release", "test").sources[-1] == "test_batch:2"
    assert has_test_split(tmp_path / "release")
    os.unlink(tmp_path / "release" / "cifar-10-batches-py" / "test_batch")
    assert not has_test_split(tmp_path / "release")


def test_ground_truth_from_parquet_columns(tmp_path):
    ds = random_set(n=8)
    is_poison = np.arange(8) % 4 == 0
    true_label = np.where(is_poison, 2, ds.labels)
    save_parquet(ds.subset(slice(0, 5)), tmp_path / "train-00000-of-00002.parquet",
                 extra_columns={"is_poison": is_poison[:5], "true_label": true_label[:5]})
    save_parquet(ds.subset(slice(5, 8)), tmp_path / "train-00001-of-00002.parquet",
                 extra_columns={"is_poison": is_poison[5:], "true_label": true_label[5:]})
    truth = load_ground_truth(tmp_path)
    np.testing.assert_array_equal(truth["is_poison"], is_poison)
    np.testing.assert_array_equal(truth["true_label"], true_label)
    assert truth["is_poison"].dtype == bool and truth["true_label"].dtype == np.int64
    assert len(load_images(tmp_path)) == 8  # the extra columns do not disturb loading

    one = save_parquet(ds, tmp_path / "one" / "set.parquet", extra_columns={"is_poison": is_poison})
    truth = load_ground_truth(one)
    np.testing.assert_array_equal(truth["true_label"], ds.labels)  # no true_label column: as delivered
    os.unlink(tmp_path / "train-00001-of-00002.parquet")
    save_parquet(ds.subset(slice(5, 8)), tmp_path / "train-00001-of-00002.parquet")
    with pytest.raises(UnpoisonError, match="only 1 of 2 Parquet files"):
        load_ground_truth(tmp_path)


def test_ground_truth_from_npz_sample_table(tmp_path):
    ds = random_set(n=6)
    path = save_npz(ds, tmp_path / "dataset.npz")
    assert load_ground_truth(path) is None  # no sample table beside it
    is_poison = np.array([0, 1, 0, 0, 1, 0], bool)
    table = {"sample_id": np.arange(6)[::-1], "label": ds.labels[::-1], "true_label": (ds.labels + 1)[::-1] % 3,
             "is_poison": is_poison[::-1], "is_cover": np.zeros(6, bool)}  # rows in any order: matched by sample_id
    pq.write_table(pa.table(table), tmp_path / "samples.parquet")
    truth = load_ground_truth(path)
    np.testing.assert_array_equal(truth["is_poison"], is_poison)
    np.testing.assert_array_equal(truth["true_label"], (ds.labels + 1) % 3)

    pq.write_table(pa.table({k: v[:4] for k, v in table.items()}), tmp_path / "samples.parquet")
    with pytest.raises(UnpoisonError, match="has 4 rows but 'dataset.npz' holds 6 samples"):
        load_ground_truth(path)


def test_ground_truth_of_s3_npz_fetches_the_sample_table_beside_it(tmp_path, monkeypatch):
    from components import store

    ds = random_set(n=4)
    cache = tmp_path / "cache" / "bucket" / "run"
    save_npz(ds, cache / "dataset.npz")
    table = {"sample_id": np.arange(4), "is_poison": np.array([1, 0, 0, 1], bool)}
    fetched = []

    def fake_fetch(uri, store=None):  # the store holds dataset.npz and samples.parquet under s3://bucket/run/
        fetched.append(uri)
        if uri.endswith("samples.parquet"):
            pq.write_table(pa.table(table), cache / "samples.parquet")
        return cache / uri.rsplit("/", 1)[1]

    class FakeStore:
        def exists(self, uri):
            return uri == "s3://bucket/run/samples.parquet"

    monkeypatch.setattr(store, "fetch", fake_fetch)
    monkeypatch.setattr(store.Store, "from_env", classmethod(lambda cls: FakeStore()))
    truth = load_ground_truth("s3://bucket/run/dataset.npz")
    assert fetched == ["s3://bucket/run/dataset.npz", "s3://bucket/run/samples.parquet"]
    np.testing.assert_array_equal(truth["is_poison"], table["is_poison"])
    np.testing.assert_array_equal(truth["true_label"], ds.labels)


def test_ground_truth_none_for_plain_sources(tmp_path, sample):
    assert load_ground_truth("sample") is None
    save_parquet(random_set(), tmp_path / "shards" / "train-00000-of-00001.parquet")
    assert load_ground_truth(tmp_path / "shards") is None
    write_png(tmp_path / "folder" / "cat" / "0.png", np.zeros((4, 4, 3), np.uint8))
    assert load_ground_truth(tmp_path / "folder") is None
    write_fake_release(tmp_path / "release" / "cifar-10-batches-py")
    assert load_ground_truth(tmp_path / "release") is None
    with pytest.raises(UnpoisonError, match="does not exist"):
        load_ground_truth(tmp_path / "missing")
