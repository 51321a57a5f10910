"""Image data sets: decode once into one uint8 array (N, H, W, C) with labels, class names and a content hash.

`load_images(source, split)` reads any of these, decided by what `source` is:

- ``"sample"``: the small CIFAR-10 sample shipped in ``components/assets/cifar10-sample``
  (5,000 train and 1,000 test images, class-balanced, original PNG bytes);
- a folder of Parquet shards in the Hugging Face layout (``train-00000-of-00005.parquet``, ...,
  ``test-00000-of-00001.parquet``, or ``train.parquet``; also under ``data/`` or ``<split>/``), or one
  ``.parquet`` file; schema ``img: struct<bytes: binary, path: string>`` (PNG/JPEG per row) + ``label: int64``;
- the official CIFAR-10 python release folder ``cifar-10-batches-py`` (or a folder that contains it);
- an image folder ``<root>/<split>/<class>/*.png`` or, with no split subfolders, ``<root>/<class>/*.png``;
- an ``.npz`` file written by `save_npz`;
- ``s3://bucket/key-or-prefix``: any of the above in an S3 store, copied first into a local cache folder
  by `components.store.fetch` (reads ``S3_ENDPOINT`` and the ``AWS_*`` credentials; files whose sha256
  matches are not downloaded again).

Sources with no notion of a split (one ``.parquet`` or ``.npz`` file, an image folder without split
subfolders) return all their images whatever `split` asks for; `load_train_test` refuses them, and
`has_test_split` tells which kind a source is without decoding any image.
Images are always decoded to RGB (C = 3). Class names come, in this order, from the file's metadata
(``classes``, as `save_parquet` and `save_npz` write them, or a Hugging Face ``ClassLabel``), from the
CIFAR-10 names when there are 10 classes, or are ``"0" .. "K-1"``.

Every loaded sample keeps where it came from in `ImageSet.sources`, so that a suspect can be found by name:
an image folder gives the file path relative to the folder passed (``train/airplane/0001.png``), Parquet
``<file name>:<row in that file>`` (``train-00000-of-00005.parquet:17``; the shipped sample
``sample/train.parquet:17``), an .npz ``<file name>:<row>``, the CIFAR-10 release ``<batch file>:<row in it>``.

`load_ground_truth` reads the ground truth a delivered data set may carry (``is_poison``, ``true_label``):
optional Parquet columns, or the ``samples.parquet`` that unpoison's poison stage writes beside its .npz.

`save_parquet` and `save_npz` write atomically (temporary file in the same folder, then `os.replace`)
and record the content hash; loading checks it, so a file changed after it was written is reported.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from components.errors import UnpoisonError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SAMPLE = "sample"  # the keyword that names the shipped sample
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".ppm", ".bmp")
SPLIT_NAMES = ("train", "test", "val", "valid", "validation")

_MISSING_FIX = (
    "pass --data sample or a folder of Parquet shards, a cifar-10-batches-py folder, an image folder or an .npz file"
)
_PARQUET_SCHEMA = "img: struct<bytes: binary, path: string> (PNG bytes per row) and label: int64"


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # uint8, (N, H, W, C), C-contiguous
    labels: np.ndarray  # int64, (N,)
    classes: tuple[str, ...]
    _hash: list = field(default_factory=list, repr=False, compare=False)
    sources: tuple[str, ...] | None = field(default=None, repr=False, compare=False)  # where each sample came from

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, H, W, C), got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must have shape ({len(self.images)},), got {self.labels.shape}")
        if self.sources is not None:
            object.__setattr__(self, "sources", tuple(self.sources))  # frozen: a list passed in becomes a tuple
            if len(self.sources) != len(self.images):
                raise ValueError(f"sources must name {len(self.images)} samples, got {len(self.sources)}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def content_hash(self) -> str:
        """sha256 over shape, pixels and labels: two sets with the same hash hold the same samples in the same order."""
        if not self._hash:
            h = hashlib.sha256(repr(self.images.shape).encode())
            h.update(np.ascontiguousarray(self.images).data)
            h.update(self.labels.astype(np.int64).data)
            self._hash.append(h.hexdigest())
        return self._hash[0]

    def subset(self, index) -> "ImageSet":
        """The samples at `index` (slice, integer array or boolean mask), with their sources."""
        sources = None
        if self.sources is not None:
            sources = tuple(self.sources[i] for i in np.arange(len(self))[index].tolist())
        return ImageSet(np.ascontiguousarray(self.images[index]), self.labels[index].astype(np.int64), self.classes,
                        sources=sources)


# --------------------------------------------------------------------------------------------------
# public API


def sample_dir() -> Path:
    """Folder of the shipped CIFAR-10 sample (train.parquet, test.parquet)."""
    return Path(__file__).resolve().parent / "assets" / "cifar10-sample"


def source_fingerprint(source: str | os.PathLike) -> str:
    """A hash of what `source` holds, computed without decoding an image, for the KFP cache key of the stage that
    reads it: two sources with the same fingerprint hold the same bytes under the same names.

    A local file: the sha256 of its bytes; a local folder (or the shipped sample): sha256 over the relative path and
    sha256 of every file under it (hidden names skipped); ``s3://``: one listing of the objects' keys, ETags and
    sizes (`Store.fingerprint`, reads ``S3_ENDPOINT`` and the ``AWS_*`` credentials). Not the decoded `content_hash`:
    a re-encoded file with the same pixels gets a new fingerprint (a needless cache miss, never a stale hit).
    """
    from components.store import sha256_file

    if str(source).startswith("s3://"):
        from components.store import Store

        return Store.from_env().fingerprint(str(source))
    path = sample_dir() if str(source) == SAMPLE else Path(source).expanduser()
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise UnpoisonError(f"data path '{source}' does not exist; {_MISSING_FIX}")
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if not any(part.startswith(".") for part in rel.split("/")):
            h.update(f"{rel}\t{sha256_file(f)}\n".encode())
    return h.hexdigest()


def load_images(source: str | os.PathLike, split: str = "train", size: int | None = None) -> ImageSet:
    """Load one split of a data set; see the module docstring for the sources understood.

    `size` resizes every image to size x size (PIL, bilinear); needed for image folders whose images
    differ in size.
    """
    return _load(source, split, size)[0]


def load_train_test(source: str | os.PathLike, size: int | None = None) -> tuple[ImageSet, ImageSet]:
    """(train, test) from one source that holds both splits, with the same class names."""
    train, has_splits = _load(source, "train", size)
    if not has_splits:
        raise UnpoisonError(
            f"data source '{source}' holds one split only, not separate train and test sets; "
            "pass a folder with train and test splits (Parquet shards, cifar-10-batches-py, "
            "or an image folder with train/ and test/), or load the test set from its own source"
        )
    test, _ = _load(source, "test", size)
    if test.classes != train.classes:
        # a split without class names gets names from its own labels ("0".."K-1"); align it with the other
        train_named, test_named = (ds.classes != _default_classes(ds.labels) for ds in (train, test))
        if not (train_named and test_named):
            if train_named or test_named:
                classes = train.classes if train_named else test.classes
            else:
                classes = _default_classes(np.concatenate([train.labels, test.labels]))
            where = f"'{source}'"
            train, test = (
                ImageSet(ds.images, ds.labels, _check_labels(ds.labels, classes, where), sources=ds.sources)
                for ds in (train, test)
            )
    if test.classes != train.classes:
        raise UnpoisonError(
            f"train and test splits of '{source}' name different classes ({list(train.classes)} vs "
            f"{list(test.classes)}); give both splits the same classes"
        )
    if test.images.shape[1:] != train.images.shape[1:]:
        raise UnpoisonError(
            f"train images are {_shape_str(train.images.shape[1:])} but test images are "
            f"{_shape_str(test.images.shape[1:])} in '{source}'; pass size=N to resize both to N x N"
        )
    return train, test


def has_test_split(source: str | os.PathLike) -> bool:
    """Whether `source` holds a test split beside its training split; looks at file names only, decodes nothing."""
    path = _local(source)
    if path == SAMPLE:
        return (sample_dir() / "test.parquet").is_file()
    if path.is_file():  # one .parquet or .npz file: one split
        return False
    release = _cifar_release_dir(path)
    if release is not None:
        return (release / "test_batch").is_file()
    if _has_parquet(path):
        return bool(_parquet_candidates(path, "test"))
    return (path / "test").is_dir()  # an image folder with split subfolders


def load_ground_truth(source: str | os.PathLike, split: str = "train") -> dict[str, np.ndarray] | None:
    """Ground truth a delivered data set carries: {"is_poison": bool (N,), "true_label": int64 (N,)}, or None.

    Read from optional ``is_poison`` (and ``true_label``) columns of the split's Parquet files, without decoding
    images, or from the ``samples.parquet`` that unpoison's poison stage writes beside its .npz. Rows follow the
    order of `load_images(source, split)`; ``true_label`` defaults to the delivered labels.
    """
    uri = str(source)
    path = _local(source)
    if path == SAMPLE:
        return _parquet_truth([_sample_file(split)])
    if path.is_file():
        if path.suffix.lower() == ".parquet":
            return _parquet_truth([path])
        if path.suffix.lower() == ".npz":
            if uri.startswith("s3://"):  # the sample table is a separate object beside the .npz
                from components.store import Store, fetch

                store, beside = Store.from_env(), uri.rsplit("/", 1)[0] + "/samples.parquet"
                if store.exists(beside):
                    fetch(beside, store=store)
            return _npz_truth(path)
        return None
    if _cifar_release_dir(path) is None and _has_parquet(path):
        return _parquet_truth(_parquet_shards(path, split))
    return None  # the CIFAR-10 release and image folders carry no ground truth


def save_npz(ds: ImageSet, path: str | os.PathLike) -> Path:
    """Write `ds` as a compressed .npz (images, labels, classes, content_hash), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f,
                images=np.ascontiguousarray(ds.images),
                labels=ds.labels.astype(np.int64),
                classes=np.array(ds.classes, dtype=np.str_),
                content_hash=np.array(ds.content_hash),
            )
    return path


def save_parquet(ds: ImageSet, path: str | os.PathLike, extra_columns: dict | None = None) -> Path:
    """Write `ds` as Parquet in the shared CIFAR-10 schema (PNG bytes per row), atomically.

    Class names and the content hash go to the schema metadata (keys ``classes``, ``content_hash``).
    `extra_columns` maps a column name to N values (for example ``source_index``).
    """
    from PIL import Image

    pngs = []
    for img in ds.images:
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    write_png_parquet(path, pngs, ds.labels, ds.classes, ds.content_hash, extra_columns)
    return Path(path)


def write_png_parquet(
    path: str | os.PathLike,
    image_bytes: Sequence[bytes],
    labels: np.ndarray,
    classes: Sequence[str],
    content_hash: str | None = None,
    extra_columns: dict | None = None,
) -> None:
    """Write already-encoded image bytes as Parquet (``img`` struct, ``label``, extras), atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(image_bytes)
    img = pa.StructArray.from_arrays(
        [pa.array(image_bytes, type=pa.binary()), pa.nulls(n, type=pa.string())], names=["bytes", "path"]
    )
    columns = {"img": img, "label": pa.array(np.asarray(labels, dtype=np.int64))}
    for name, values in (extra_columns or {}).items():
        if len(values) != n:
            raise ValueError(f"extra column {name!r} has {len(values)} values for {n} rows")
        columns[name] = pa.array(np.asarray(values))
    meta = {b"classes": json.dumps(list(classes)).encode()}
    if content_hash:
        meta[b"content_hash"] = content_hash.encode()
    table = pa.table(columns).replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        # PNG bytes are compressed already; zstd still shrinks the integer columns
        pq.write_table(table, tmp, compression="zstd", row_group_size=1000)


# --------------------------------------------------------------------------------------------------
# dispatch


def _local(source: str | os.PathLike) -> str | Path:
    """SAMPLE, or the existing local path of `source` (an s3:// source is fetched into the cache first)."""
    if str(source).startswith("s3://"):
        from components.store import fetch  # imported here: only S3 sources need the store

        source = fetch(str(source))
    if isinstance(source, str) and source == SAMPLE:
        return SAMPLE
    path = Path(source).expanduser()
    if not path.exists():
        raise UnpoisonError(f"data path '{source}' does not exist; {_MISSING_FIX}")
    return path


def _sample_file(split: str) -> Path:
    f = sample_dir() / f"{split}.parquet"
    if not f.is_file():
        if split not in ("train", "test"):
            raise UnpoisonError(f"the shipped sample has no '{split}' split; use split 'train' or 'test'")
        raise UnpoisonError(
            f"the shipped sample file {split}.parquet is missing from the installed package; "
            "reinstall unpoison with its package data, or pass --data a folder of CIFAR-10 Parquet shards"
        )
    return f


def _load(source: str | os.PathLike, split: str, size: int | None) -> tuple[ImageSet, bool]:
    """(data set, whether the source has separate splits)."""
    if size is not None and (not isinstance(size, int) or size < 1):
        raise UnpoisonError(f"image size {size!r} is not a positive integer; pass size=N with N >= 1, e.g. 32")
    path = _local(source)
    if path == SAMPLE:
        return _load_parquet_files([_sample_file(split)], size, where="the shipped sample", prefix="sample/"), True
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            return _load_parquet_files([path], size, where=f"'{path}'"), False
        if suffix == ".npz":
            return _resize_array_set(_load_npz(path), size), False
        raise UnpoisonError(f"data file '{path}' is neither .parquet nor .npz; {_MISSING_FIX}")

    release = _cifar_release_dir(path)
    if release is not None:
        return _resize_array_set(_load_cifar_release(release, split), size), True
    shards = _parquet_shards(path, split)
    if shards is not None:
        return _load_parquet_files(shards, size, where=f"'{path}'"), True
    return _load_image_folder(path, split, size)


# --------------------------------------------------------------------------------------------------
# Parquet


def _has_parquet(root: Path) -> bool:
    """Whether `root` is a Parquet folder: .parquet files in it, in data/ or in a split subfolder."""
    places = [root, root / "data", *(root / s for s in SPLIT_NAMES)]
    return any(p.is_dir() and any(p.glob("*.parquet")) for p in places)


def _parquet_candidates(root: Path, split: str) -> list[Path]:
    """Parquet files of `split` under `root` in name order (empty if none), as `_parquet_shards` finds them."""
    for place in (root, root / "data"):
        if place.is_dir():
            found = sorted(
                p for p in place.glob("*.parquet") if p.name == f"{split}.parquet" or p.name.startswith(f"{split}-")
            )
            if found:
                return found
    return sorted((root / split).glob("*.parquet")) if (root / split).is_dir() else []


def _parquet_shards(root: Path, split: str) -> list[Path] | None:
    """Shards of `split` under `root` in name order; None if `root` holds no Parquet at all."""
    if not _has_parquet(root):
        return None
    candidates = _parquet_candidates(root, split)
    if not candidates:
        found = sorted(p.name for place in (root, root / "data") if place.is_dir() for p in place.glob("*.parquet"))
        found += sorted(f"{s}/" for s in SPLIT_NAMES if (root / s).is_dir())
        raise UnpoisonError(
            f"no '{split}' split in Parquet folder '{root}' (found {', '.join(found[:6])}"
            f"{', ...' if len(found) > 6 else ''}); add {split}-00000-of-00001.parquet or pick another split"
        )
    # Hugging Face shard names carry their count: report a missing shard instead of loading part of a split
    totals = {m.group(1) for p in candidates if (m := re.search(r"-of-(\d+)\.parquet$", p.name))}
    if len(totals) == 1:
        total = int(totals.pop())
        if len(candidates) != total:
            raise UnpoisonError(
                f"found {len(candidates)} of {total} '{split}' shards in '{candidates[0].parent}'; "
                "copy the missing shards or pass a complete folder"
            )
    return candidates


def _parquet_classes(metadata: dict | None) -> tuple[str, ...] | None:
    if not metadata:
        return None
    if b"classes" in metadata:
        try:
            names = json.loads(metadata[b"classes"])
        except ValueError:
            names = None
        if isinstance(names, list) and all(isinstance(c, str) for c in names):
            return tuple(names)
    if b"huggingface" in metadata:  # Hugging Face datasets write ClassLabel names here
        try:
            label = json.loads(metadata[b"huggingface"])["info"]["features"]["label"]
            if label.get("_type") == "ClassLabel" and label.get("names"):
                return tuple(str(c) for c in label["names"])
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
    return None


def _load_parquet_files(files: Sequence[Path], size: int | None, where: str, prefix: str = "") -> ImageSet:
    """Decode the images of `files` in order; each sample's source is ``<prefix><file name>:<row in that file>``."""
    import pyarrow.parquet as pq

    tables, classes = [], None
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise UnpoisonError(f"cannot read Parquet file '{f}' ({_one_line(e)}); replace it with an intact copy")
        schema = pf.schema_arrow
        img_col = next((c for c in ("img", "image") if c in schema.names), None)
        if img_col is None or "label" not in schema.names:
            raise UnpoisonError(
                f"Parquet file '{f}' has columns {schema.names}, not the expected schema; "
                f"write it with columns {_PARQUET_SCHEMA}"
            )
        table = pf.read(columns=[img_col, "label"])
        file_classes = _parquet_classes(schema.metadata)
        if file_classes is not None:
            if classes is not None and file_classes != classes:
                raise UnpoisonError(
                    f"shards of {where} name different classes ({list(classes)} vs {list(file_classes)}); "
                    "give every shard the same class list"
                )
            classes = file_classes
        recorded = (schema.metadata or {}).get(b"content_hash")
        tables.append((f, table, img_col, recorded.decode() if recorded else None))

    n = sum(t.num_rows for _, t, _, _ in tables)
    if n == 0:
        raise UnpoisonError(f"{where} holds no images; pass a data set with at least one image")

    def blobs() -> Iterator[tuple[object, str]]:
        for f, table, img_col, _ in tables:
            i = 0
            for chunk in table.column(img_col).chunks:
                values = chunk.field("bytes") if hasattr(chunk, "field") else chunk
                for b in values.to_pylist():
                    yield (io.BytesIO(b) if b is not None else None), f"row {i} of '{f}'"
                    i += 1

    images = _decode_all(blobs(), n, size, where)
    labels_list = []
    for f, table, _, _ in tables:
        col = table.column("label")
        if col.null_count:
            raise UnpoisonError(f"Parquet file '{f}' has rows with no label; give every row an integer label")
        labels_list.append(col.to_numpy().astype(np.int64))
    labels = np.concatenate(labels_list)
    classes = _check_labels(labels, classes, where)
    sources = tuple(f"{prefix}{f.name}:{i}" for f, table, _, _ in tables for i in range(table.num_rows))
    ds = ImageSet(images, labels, classes, sources=sources)

    if size is None:  # check recorded hashes (resizing changes the pixels, so skip them then)
        start = 0
        for f, table, _, recorded in tables:
            stop = start + table.num_rows
            if recorded:
                part = ds if len(tables) == 1 else ImageSet(images[start:stop], labels[start:stop], classes)
                _check_hash(part, recorded, f)
            start = stop
    return ds


def _parquet_truth(files: Sequence[Path]) -> dict[str, np.ndarray] | None:
    """Optional ``is_poison`` / ``true_label`` columns of `files`, read without the images; None if absent."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    names = [set(pq.read_schema(f).names) for f in files]
    with_truth = [f.name for f, cols in zip(files, names) if "is_poison" in cols]
    if not with_truth:
        return None
    if len(with_truth) != len(files):
        raise UnpoisonError(
            f"only {len(with_truth)} of {len(files)} Parquet files ({', '.join(with_truth[:3])}) have an is_poison "
            "column; give every file of the split an is_poison column, or drop it from all of them"
        )
    is_poison, true_label = [], []
    for f, cols in zip(files, names):
        table = pq.read_table(f, columns=[c for c in ("label", "is_poison", "true_label") if c in cols])
        if table.column("is_poison").null_count:
            raise UnpoisonError(f"Parquet file '{f}' has rows with no is_poison value; give every row true or false")
        label = table.column("label").cast("int64")
        truth = pc.fill_null(table.column("true_label").cast("int64"), label) if "true_label" in cols else label
        is_poison.append(table.column("is_poison").to_numpy().astype(bool))
        true_label.append(truth.to_numpy())  # a missing true label counts as the delivered one
    return {"is_poison": np.concatenate(is_poison), "true_label": np.concatenate(true_label)}


# --------------------------------------------------------------------------------------------------
# CIFAR-10 python release (cifar-10-batches-py)

# The release pickles dicts of numpy arrays, lists and bytes; nothing else may be built while loading.
_PICKLE_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how protocol 2 writes bytes from Python 3
}


class _ReleaseUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core."):  # numpy 2 moved numpy.core to numpy._core
            module = "numpy._core." + module[len("numpy.core.") :]
        return super().find_class(module, name)


def _unpickle_release_file(path: Path) -> dict:
    """pickle.load(f, encoding="bytes") as the official format asks, limited to numpy arrays and plain data."""
    try:
        with open(path, "rb") as f:
            obj = _ReleaseUnpickler(f, encoding="bytes").load()
    except Exception as e:
        raise UnpoisonError(
            f"cannot read CIFAR-10 batch file '{path}' ({_one_line(e)}); "
            "replace the folder with a fresh copy of the official cifar-10-batches-py release"
        )
    if not isinstance(obj, dict):
        raise UnpoisonError(f"CIFAR-10 batch file '{path}' does not hold a dict; use the official release files")
    return obj


def _cifar_release_dir(root: Path) -> Path | None:
    for d in (root, root / "cifar-10-batches-py"):
        if (d / "batches.meta").is_file():
            return d
    return None


def _load_cifar_release(root: Path, split: str) -> ImageSet:
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}.get(split)
    if names is None:
        raise UnpoisonError(f"the CIFAR-10 release in '{root}' has no '{split}' split; use split 'train' or 'test'")
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise UnpoisonError(
            f"no '{split}' split in CIFAR-10 release folder '{root}' (missing {', '.join(missing)}); "
            "copy the complete cifar-10-batches-py folder"
        )
    meta = _unpickle_release_file(root / "batches.meta")
    classes = tuple(c.decode() if isinstance(c, bytes) else str(c) for c in meta.get(b"label_names", []))
    parts = []
    for name in names:
        batch = _unpickle_release_file(root / name)
        data, lab = batch.get(b"data"), batch.get(b"labels")
        if not isinstance(data, np.ndarray) or lab is None or data.ndim != 2 or len(lab) != len(data):
            raise UnpoisonError(
                f"CIFAR-10 batch file '{root / name}' lacks b'data' (N, 3072) and b'labels' (N); "
                "use the official release files"
            )
        side = int(round((data.shape[1] // 3) ** 0.5))
        if side * side * 3 != data.shape[1] or (parts and parts[0][0].shape[1] != data.shape[1]):
            raise UnpoisonError(
                f"CIFAR-10 batch file '{root / name}' has rows of {data.shape[1]} values; "
                "expected 3 x H x W values per row, the same in every batch"
            )
        parts.append((data, np.asarray(lab, dtype=np.int64)))
    n = sum(len(d) for d, _ in parts)
    if n == 0:
        raise UnpoisonError(f"CIFAR-10 release folder '{root}' holds no '{split}' images; copy the complete release")
    images = np.empty((n, side, side, 3), np.uint8)  # one array for the whole split
    start = 0
    for data, _ in parts:
        # the release stores each row as 1024 red, 1024 green, 1024 blue values: (N, 3, H, W) -> (N, H, W, 3)
        images[start : start + len(data)] = data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1)
        start += len(data)
    labels = np.concatenate([lab for _, lab in parts])
    classes = _check_labels(labels, classes or None, f"'{root}'")
    sources = tuple(f"{name}:{i}" for name, (data, _) in zip(names, parts) for i in range(len(data)))
    return ImageSet(images, labels, classes, sources=sources)


# --------------------------------------------------------------------------------------------------
# image folder


def _image_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _class_dirs(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def _load_image_folder(root: Path, split: str, size: int | None) -> tuple[ImageSet, bool]:
    split_dirs = [s for s in SPLIT_NAMES if (root / s).is_dir()]
    if split_dirs:
        if split not in split_dirs:
            raise UnpoisonError(
                f"no '{split}' split in image folder '{root}' (found {', '.join(s + '/' for s in split_dirs)}); "
                f"add {root.name}/{split}/<class>/ folders or pick another split"
            )
        base, has_splits = root / split, True
        # classes from every split, so that a class missing from one split keeps its index
        classes = sorted({c for s in split_dirs for c in _class_dirs(root / s)})
    else:
        base, has_splits = root, False
        classes = _class_dirs(root)
    if not classes:
        loose = _image_files(base)
        fix = (
            f"put the images in one subfolder per class ({base.name}/<class>/*.png)"
            if loose
            else "pass a folder with images in <split>/<class>/ or <class>/ subfolders (.png, .jpg, .jpeg, .ppm, .bmp)"
        )
        raise UnpoisonError(f"image folder '{base}' has no class subfolders; {fix}")
    files, labels = [], []
    for k, c in enumerate(classes):
        if (base / c).is_dir():
            found = _image_files(base / c)
            files += found
            labels += [k] * len(found)
    if not files:
        raise UnpoisonError(
            f"image folder '{base}' holds no images; add .png, .jpg, .jpeg, .ppm or .bmp files under {base.name}/<class>/"
        )
    images = _decode_all(((f, f"'{f}'") for f in files), len(files), size, f"image folder '{base}'", folder=True)
    sources = tuple(f.relative_to(root).as_posix() for f in files)  # e.g. train/airplane/0001.png
    return ImageSet(images, np.asarray(labels, dtype=np.int64), tuple(classes), sources=sources), has_splits


# --------------------------------------------------------------------------------------------------
# npz


def _load_npz(path: Path) -> ImageSet:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if not {"images", "labels"} <= keys:
                raise UnpoisonError(
                    f".npz file '{path}' has arrays {sorted(keys)}; write it with save_npz (images, labels, classes)"
                )
            images, labels = z["images"], z["labels"]
            classes = tuple(str(c) for c in z["classes"]) if "classes" in keys else None
            recorded = str(z["content_hash"]) if "content_hash" in keys else None
    except UnpoisonError:
        raise
    except Exception as e:
        raise UnpoisonError(f"cannot read .npz file '{path}' ({_one_line(e)}); write it again with save_npz")
    if images.dtype != np.uint8 or images.ndim != 4 or labels.ndim != 1 or len(labels) != len(images):
        raise UnpoisonError(
            f".npz file '{path}' holds images {images.dtype} {images.shape} and labels {labels.shape}; "
            "expected uint8 (N, H, W, C) images and N integer labels, as save_npz writes"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise UnpoisonError(f".npz file '{path}' has {labels.dtype} labels; store integer class indices")
    if len(labels) == 0:
        raise UnpoisonError(f".npz file '{path}' holds no images; pass a data set with at least one image")
    labels = labels.astype(np.int64)
    sources = tuple(f"{path.name}:{i}" for i in range(len(labels)))
    ds = ImageSet(np.ascontiguousarray(images), labels, _check_labels(labels, classes, f"'{path}'"), sources=sources)
    if recorded:
        _check_hash(ds, recorded, path)
    return ds


def _npz_truth(path: Path) -> dict[str, np.ndarray] | None:
    """Ground truth from the ``samples.parquet`` beside an .npz (as the poison stage writes it); None if absent."""
    import pyarrow.parquet as pq

    table_path = path.parent / "samples.parquet"
    if not table_path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            labels = z["labels"].astype(np.int64)  # only the labels are read, not the images
    except Exception as e:
        raise UnpoisonError(
            f"cannot read the labels of .npz file '{path}' ({_one_line(e)}); write it again with save_npz"
        )
    table = pq.read_table(table_path)
    if "is_poison" not in table.column_names:
        raise UnpoisonError(
            f"sample table '{table_path}' has columns {table.column_names} but no is_poison; write it with the "
            "poison stage (sample_id, label, true_label, is_poison, is_cover) or move it away from the .npz"
        )
    if table.num_rows != len(labels):
        raise UnpoisonError(
            f"sample table '{table_path}' has {table.num_rows} rows but '{path.name}' holds {len(labels)} samples; "
            "put the sample table written with this .npz beside it, or remove the stale one"
        )
    cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    order = np.argsort(cols["sample_id"], kind="stable") if "sample_id" in cols else np.arange(len(labels))
    if "sample_id" in cols and not np.array_equal(cols["sample_id"][order], np.arange(len(labels))):
        raise UnpoisonError(
            f"sample table '{table_path}' has sample ids other than 0..{len(labels) - 1}; "
            "put the sample table written with this .npz beside it"
        )
    true_label = cols["true_label"][order].astype(np.int64) if "true_label" in cols else labels
    return {"is_poison": cols["is_poison"][order].astype(bool), "true_label": true_label}


# --------------------------------------------------------------------------------------------------
# helpers


def _decode_all(
    items: Iterable[tuple[object, str]], n: int, size: int | None, where: str, folder: bool = False
) -> np.ndarray:
    """Decode `n` images (file objects or paths) as RGB into one preallocated uint8 array (n, H, W, 3)."""
    from PIL import Image, UnidentifiedImageError

    out, i = None, -1
    for i, (src, name) in enumerate(items):
        try:
            if src is None:
                raise ValueError("no image bytes")
            with Image.open(src) as im:
                if size is not None and im.size != (size, size):
                    im = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
                elif im.mode != "RGB":
                    im = im.convert("RGB")
                arr = np.asarray(im)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise UnpoisonError(f"cannot decode image {name} ({_one_line(e)}); replace or remove that image")
        if out is None:
            out = np.empty((n, *arr.shape), np.uint8)
        elif arr.shape != out.shape[1:]:
            hint = "pass size=N to resize every image to N x N" + (" (e.g. size=32)" if folder else "")
            raise UnpoisonError(
                f"images in {where} have different sizes ({_shape_str(out.shape[1:])} first, "
                f"{_shape_str(arr.shape)} at {name}); {hint}"
            )
        out[i] = arr
    if out is None or i != n - 1:
        raise UnpoisonError(f"{where} holds {i + 1} images where {n} were listed; check that it is not being changed")
    return out


def _resize_array_set(ds: ImageSet, size: int | None) -> ImageSet:
    if size is None or ds.images.shape[1:3] == (size, size):
        return ds
    from PIL import Image

    out = np.empty((len(ds), size, size, ds.images.shape[3]), np.uint8)
    for i, img in enumerate(ds.images):
        im = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        out[i] = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR)).reshape(size, size, -1)
    return ImageSet(out, ds.labels, ds.classes, sources=ds.sources)


def _check_labels(labels: np.ndarray, classes: tuple[str, ...] | None, where: str) -> tuple[str, ...]:
    lo, hi = (int(labels.min()), int(labels.max())) if len(labels) else (0, -1)
    if classes is None:
        classes = _default_classes(labels)
    if lo < 0 or hi >= len(classes):
        raise UnpoisonError(
            f"labels in {where} range over {lo}..{hi} but there are {len(classes)} classes; "
            f"use labels 0..{len(classes) - 1} or list every class in the metadata"
        )
    return tuple(classes)


def _default_classes(labels: np.ndarray) -> tuple[str, ...]:
    """Names for labels that come without any: CIFAR-10's for 10 classes, else "0" .. "K-1"."""
    k = int(labels.max()) + 1 if len(labels) else 1
    return CIFAR10_CLASSES if k == 10 else tuple(str(i) for i in range(max(k, 1)))


def _check_hash(ds: ImageSet, recorded: str, path: Path) -> None:
    if ds.content_hash != recorded:
        raise UnpoisonError(
            f"content of '{path}' does not match the hash recorded when it was written; "
            "the file was changed or damaged since: write it again, or drop its content_hash entry"
        )


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; if the block succeeds, move it onto `path`, else remove it.

    The project's one atomic-write helper (`components.artifacts` re-exports it; it lives here so that this
    module stays free of torch). A reader sees the old file or the complete new one, never part of one, and no
    temporary file stays behind on any exception, KeyboardInterrupt included. The file's data is fsynced before
    the rename and its folder after it: without both, a power cut can leave an empty or missing file under the
    final name although the write had returned.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    # os.open with mode 0o666 lets the umask decide the final permissions, as a plain open() would
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # a folder cannot be opened for fsync on some systems (Windows)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _shape_str(shape: Sequence[int]) -> str:
    return f"{shape[1]}x{shape[0]}"  # width x height, as image tools print it


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."
