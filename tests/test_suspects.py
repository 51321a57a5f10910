"""Suspects of a delivered data set: ranking, the suspect table, per-class shares and the image grid."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components import suspects
from components.errors import UnpoisonError
from components.suspects import class_shares, suspect_grid, suspicion_order, write_suspects


def test_order_low_is_poison_like_ties_by_index_nan_last():
    scores = np.array([0.5, np.nan, 0.1, 0.5, -1.0, np.nan, 0.1])
    assert suspicion_order(scores, -1).tolist() == [4, 2, 6, 0, 3, 1, 5]
    assert suspicion_order(scores, +1).tolist() == [0, 3, 2, 6, 4, 1, 5]
    assert suspicion_order(np.array([np.inf, -np.inf, 0.0]), -1).tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="direction must be -1"):
        suspicion_order(scores, 0)


def test_suspect_table_schema_order_and_rank(tmp_path):
    kl = np.array([0.9, 0.1, 0.5, 0.3])
    loss = np.array([1.0, 2.0, 3.0, 4.0])
    path = tmp_path / "suspects.parquet"
    write_suspects(path, sample_id=np.array([10, 11, 12, 13]), source=["a.png", "b.png", "c.png", "d.png"],
                   label=np.array([0, 1, 1, 2]), pool=["clean", "suspect", "clean", "dropped"],
                   scores={"kl": kl, "loss": loss}, rank_by="kl", direction=-1, classes=("cat", "dog", "emu"))
    table = pq.read_table(path)
    assert table.schema.names == ["sample_id", "source", "label", "class_name", "kl", "loss", "pool", "rank"]
    assert [f.type for f in table.schema] == [pa.int64(), pa.string(), pa.int64(), pa.string(), pa.float64(),
                                              pa.float64(), pa.string(), pa.int64()]
    rows = table.to_pydict()
    assert rows["sample_id"] == [11, 13, 12, 10]  # lowest KL first
    assert rows["source"] == ["b.png", "d.png", "c.png", "a.png"]
    assert rows["class_name"] == ["dog", "emu", "dog", "cat"]
    assert rows["loss"] == [2.0, 4.0, 3.0, 1.0] and rows["pool"] == ["suspect", "dropped", "clean", "clean"]
    assert rows["rank"] == [0, 1, 2, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["suspects.parquet"]  # no temporary file left

    write_suspects(path, sample_id=np.arange(2), source=None, label=np.array([0, 1]), pool=["clean", "clean"],
                   scores={"kl": np.array([1.0, 2.0])}, rank_by="kl", direction=+1, classes=("cat", "dog"))
    rows = pq.read_table(path).to_pydict()
    assert rows["sample_id"] == [1, 0] and rows["source"] == [None, None]
    with pytest.raises(UnpoisonError, match="cannot rank suspects by 'sce'.*choose one of: kl"):
        write_suspects(path, sample_id=np.arange(2), source=None, label=np.array([0, 1]), pool=["clean", "clean"],
                       scores={"kl": np.array([1.0, 2.0])}, rank_by="sce", direction=-1, classes=("cat", "dog"))


def test_class_shares_finds_the_over_represented_class():
    labels = np.repeat([0, 1, 2], 10)  # 10 samples per class
    flagged = np.zeros(30, bool)
    flagged[[0, 10, 11, 12, 13, 14, 15, 20]] = True  # class 1 has 6 of the 8 flagged samples
    shares = class_shares(labels, flagged, ("cat", "dog", "emu"))
    assert shares["overall_share"] == pytest.approx(8 / 30)
    assert [c["flagged"] for c in shares["per_class"]] == [1, 6, 1]
    assert [c["samples"] for c in shares["per_class"]] == [10, 10, 10]
    assert shares["per_class"][1]["share"] == pytest.approx(0.6)
    most = shares["most_over_represented"]
    assert most["class"] == 1 and most["name"] == "dog"
    assert most["ratio"] == pytest.approx(0.6 / (8 / 30))  # 2.25


def test_class_shares_without_flagged_samples():
    shares = class_shares(np.array([0, 0, 1]), np.zeros(3, bool), ("cat", "dog", "emu"))  # emu has no sample
    assert shares["overall_share"] == 0.0
    assert shares["most_over_represented"]["class"] is None and shares["most_over_represented"]["name"] is None
    assert math.isnan(shares["most_over_represented"]["ratio"])
    assert shares["per_class"][0]["share"] == 0.0 and math.isnan(shares["per_class"][2]["share"])


def random_images(n, side=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def test_grid_size_and_top_left_tile(tmp_path):
    images = random_images(20)  # 16 px -> 64 px tiles (scale 4)
    order = np.random.default_rng(1).permutation(20)
    path = tmp_path / "grid.png"
    suspect_grid(images, order, path, n=9)
    grid = np.asarray(Image.open(path).convert("RGB"))
    tile, cols = 64, 3  # 9 tiles: 3 x 3 per panel
    panel = cols * tile + (cols - 1) * suspects.GAP
    assert grid.shape == (panel + suspects.TITLE + 2 * suspects.MARGIN, 2 * panel + 4 * suspects.MARGIN, 3)
    y, x = suspects.MARGIN + suspects.TITLE, suspects.MARGIN
    expected = images[order[0]].repeat(4, axis=0).repeat(4, axis=1)
    np.testing.assert_array_equal(grid[y:y + tile, x:x + tile], expected)  # the most suspicious image, upscaled
    right = grid.shape[1] // 2 + suspects.MARGIN
    np.testing.assert_array_equal(grid[y:y + tile, right:right + tile],  # the least suspicious image
                                  images[order[-1]].repeat(4, axis=0).repeat(4, axis=1))
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


def test_grid_with_few_samples_labels_and_title(tmp_path):
    images = random_images(5, side=32)  # 32 px -> 64 px
    for n_images in (1, 5):
        path = tmp_path / f"grid{n_images}.png"
        suspect_grid(images[:n_images], np.arange(n_images), path, n=64, labels=np.arange(n_images) % 2,
                     classes=("cat", "dog"), title="test run")
        grid = np.asarray(Image.open(path).convert("RGB"))
        y = suspects.MARGIN + 2 * suspects.TITLE  # below the figure title and the panel title
        tile = images[0].repeat(2, axis=0).repeat(2, axis=1)
        # a narrow grid is centred under its panel's title: look for the tile along the row
        assert any(np.array_equal(grid[y:y + 64, x:x + 64], tile) for x in range(grid.shape[1] // 2 - 64))
    assert grid.shape[0] == 2 * suspects.TITLE + 2 * suspects.MARGIN + 2 * (64 + suspects.CAPTION) + suspects.GAP
