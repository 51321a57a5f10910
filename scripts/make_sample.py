"""Make the small CIFAR-10 sample shipped in components/assets/cifar10-sample.

Takes the first `--train-per-class` images of each class from the training shards and the first
`--test-per-class` from the test shard, in CIFAR-10's original order, and copies their PNG bytes
unchanged (bit-identical pixels). Writes train.parquet and test.parquet in the shared copy's schema
(img: struct<bytes, path>, label: int64) plus `source_index` (the row's index in the original split),
with the class names and the content hash in the schema metadata.

    python scripts/make_sample.py --src ../shared/datasets/cifar10 --out components/assets/cifar10-sample
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from components.data import (  # noqa: E402
    CIFAR10_CLASSES,
    ImageSet,
    _decode_all,
    _parquet_shards,
    load_images,
    write_png_parquet,
)
from components.errors import UnpoisonError  # noqa: E402


def take_split(src: Path, split: str, per_class: int, out: Path) -> tuple[int, str]:
    shards = _parquet_shards(src, split)
    if shards is None:
        raise UnpoisonError(f"no Parquet shards in '{src}'; pass --src the CIFAR-10 Parquet folder")
    table = pa.concat_tables(pq.read_table(f, columns=["img", "label"]) for f in shards)
    labels = table.column("label").to_numpy().astype(np.int64)
    index = []
    for k in range(len(CIFAR10_CLASSES)):
        rows = np.flatnonzero(labels == k)[:per_class]
        if len(rows) < per_class:
            raise UnpoisonError(f"class {k} has {len(rows)} '{split}' images, fewer than {per_class}; lower the count")
        index.append(rows)
    index = np.sort(np.concatenate(index))  # keep the original order
    picked = table.take(pa.array(index))
    blobs = picked.column("img").combine_chunks().field("bytes").to_pylist()  # original PNG bytes, unchanged
    images = _decode_all(((io.BytesIO(b), f"row {i}") for i, b in zip(index, blobs)), len(blobs), None, split)
    ds = ImageSet(images, labels[index], CIFAR10_CLASSES)
    path = out / f"{split}.parquet"
    write_png_parquet(path, blobs, ds.labels, ds.classes, ds.content_hash, {"source_index": index.astype(np.int64)})
    return len(index), ds.content_hash


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True, type=Path, help="folder of CIFAR-10 Parquet shards (Hugging Face layout)")
    ap.add_argument("--out", required=True, type=Path, help="output folder, e.g. components/assets/cifar10-sample")
    ap.add_argument("--train-per-class", type=int, default=500)
    ap.add_argument("--test-per-class", type=int, default=100)
    args = ap.parse_args(argv)
    try:
        if not args.src.is_dir():
            raise UnpoisonError(f"--src '{args.src}' is not a folder; pass the CIFAR-10 Parquet folder")
        args.out.mkdir(parents=True, exist_ok=True)
        for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
            n, h = take_split(args.src, split, per_class, args.out)
            ds = load_images(args.out / f"{split}.parquet")  # read back: schema, counts and hash check
            assert len(ds) == n and np.all(np.bincount(ds.labels) == per_class) and ds.content_hash == h
            size = (args.out / f"{split}.parquet").stat().st_size
            print(f"{split}: {n} images, {size / 1e6:.2f} MB, content_hash {h}")
    except UnpoisonError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
