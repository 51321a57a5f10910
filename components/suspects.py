"""Suspects in a data set as delivered: which samples a defense finds most poison-like, where they came from,
which class they crowd into, and a picture of them.

With no ground truth, this is what a user looks at: `suspects.parquet` (one row per sample, most suspicious
first, with the file or shard row it came from), `class_shares` (a backdoor's target class is usually the one
most over-represented among the suspects) and `suspect_grid` (the most and the least suspicious images side by
side, large enough to show a 3x3-pixel trigger).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from components.artifacts import atomic_path, write_table
from components.errors import UnpoisonError

SUSPECTS_SCHEMA = {"sample_id": pa.int64(), "source": pa.string(), "label": pa.int64(), "class_name": pa.string(),
                   "pool": pa.string(), "rank": pa.int64()}  # plus one float64 column per score

TILE = 64  # images are upscaled (nearest) to at least this many pixels a side: 32 px -> 64 px
GAP = 2  # pixels between tiles
MARGIN = 8  # pixels around each panel
TITLE = 20  # height of a panel's title line (and of the figure's title, if any)
CAPTION = 13  # height of the class name under each tile, when labels are given
BACKGROUND = (255, 255, 255)


def suspicion_order(scores: np.ndarray, direction: int) -> np.ndarray:
    """Sample indices from most to least suspicious; direction -1: a low score is poison-like, +1: a high one.

    Ties keep sample order; NaN scores come last.
    """
    if direction not in (-1, 1):
        raise ValueError(f"direction must be -1 (low score is poison-like) or +1 (high score is), got {direction!r}")
    scores = np.asarray(scores, dtype=np.float64)
    nan = np.isnan(scores)
    key = np.where(nan, 0.0, -direction * scores)  # ascending key = most suspicious first
    return np.lexsort((key, nan))  # last key sorts first: finite before NaN; lexsort is stable, so ties by index


def write_suspects(path: str | Path, *, sample_id: np.ndarray, source: Sequence[str] | None, label: np.ndarray,
                   pool: Sequence[str], scores: dict[str, np.ndarray], rank_by: str, direction: int,
                   classes: Sequence[str]) -> None:
    """Write suspects.parquet: one row per sample, most suspicious by `rank_by` first (rank 0), atomically.

    Columns: sample_id, source (None where the data set does not know), label, class_name, one float64 column per
    score, pool, rank.
    """
    if rank_by not in scores:
        raise UnpoisonError(f"cannot rank suspects by '{rank_by}': no such score; choose one of: {', '.join(scores)}")
    clash = sorted(set(scores) & set(SUSPECTS_SCHEMA))
    if clash:
        raise UnpoisonError(f"score names {clash} collide with suspect table columns; rename those scores")
    n = len(sample_id)
    source = [None] * n if source is None else list(source)
    columns = {"sample_id": sample_id, "source": source, "label": label, "pool": pool, **scores}
    wrong = {name: len(v) for name, v in columns.items() if len(v) != n}
    if wrong:
        raise ValueError(f"suspect table columns must have {n} values, got {wrong}")

    order = suspicion_order(scores[rank_by], direction)
    label = np.asarray(label, dtype=np.int64)[order]
    table = {"sample_id": np.asarray(sample_id, dtype=np.int64)[order],
             "source": [source[i] for i in order],
             "label": label,
             "class_name": [classes[k] for k in label],
             **{name: np.asarray(v, dtype=np.float64)[order] for name, v in scores.items()},
             "pool": np.asarray(pool, dtype=object)[order],
             "rank": np.arange(n, dtype=np.int64)}
    write_table(table, Path(path), SUSPECTS_SCHEMA)


def class_shares(labels: np.ndarray, flagged: np.ndarray, classes: Sequence[str]) -> dict:
    """Per class: samples, flagged, share flagged, and its ratio to the overall share; and the class most
    over-represented among the flagged samples (the likely target of a backdoor)."""
    labels, flagged = np.asarray(labels, dtype=np.int64), np.asarray(flagged, dtype=bool)
    k = len(classes)
    samples = np.bincount(labels, minlength=k)
    hits = np.bincount(labels[flagged], minlength=k)
    overall = hits.sum() / len(labels) if len(labels) else math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(samples > 0, hits / np.maximum(samples, 1), np.nan)
        ratio = share / overall if hits.sum() else np.full(k, np.nan)  # no flagged sample: no ratio
    per_class = [{"class": c, "name": classes[c], "samples": int(samples[c]), "flagged": int(hits[c]),
                  "share": float(share[c]), "ratio": float(ratio[c])} for c in range(k)]
    top = int(np.nanargmax(ratio)) if np.isfinite(ratio).any() else None  # first of equal ratios
    most = {"class": top, "name": classes[top] if top is not None else None,
            "ratio": float(ratio[top]) if top is not None else math.nan}
    return {"per_class": per_class, "overall_share": float(overall), "most_over_represented": most}


def suspect_grid(images: np.ndarray, order: np.ndarray, path: str | Path, *, n: int = 64,
                 labels: np.ndarray | None = None, classes: Sequence[str] | None = None,
                 title: str | None = None) -> None:
    """One PNG: the n most suspicious images (first of `order`) on the left, the n least suspicious (last of
    `order`) on the right, each panel starting top-left at its extreme, upscaled (nearest) so a 3x3 trigger shows.

    With fewer than 2n images the panels split them (the single image of a one-image set appears in both). With
    `labels`, each tile is captioned with its class name (from `classes` if given).
    """
    from PIL import Image, ImageDraw, ImageFont

    images, order = np.asarray(images), np.asarray(order)
    if images.dtype != np.uint8 or images.ndim != 4 or len(order) == 0 or n < 1:
        raise ValueError(f"need uint8 images (N, H, W, C), a non-empty order and n >= 1, got {images.dtype} "
                         f"{images.shape}, {len(order)} indices, n={n}")
    half = min(n, math.ceil(len(order) / 2))  # each panel gets at most n, and both get something
    panels = [("most suspicious", order[:half]), ("least suspicious", order[max(len(order) - n, half):][::-1])]
    if len(panels[1][1]) == 0:  # a one-image set: show it on both sides
        panels[1] = ("least suspicious", order[-1:])

    h, w = images.shape[1:3]
    scale = max(1, math.ceil(TILE / max(h, w)))
    th, tw = h * scale, w * scale
    cap = CAPTION if labels is not None else 0
    cols = math.ceil(math.sqrt(max(len(p) for _, p in panels)))
    rows = math.ceil(max(len(p) for _, p in panels) / cols)
    font, small = ImageFont.load_default(size=12), ImageFont.load_default(size=10)
    grid_w, panel_h = cols * tw + (cols - 1) * GAP, rows * (th + cap) + (rows - 1) * GAP
    panel_w = max(grid_w, math.ceil(font.getlength(f"least suspicious ({n})")))  # room for the panel's title
    top = TITLE if title else 0
    width = max(2 * panel_w + 4 * MARGIN, math.ceil(font.getlength(title or "")) + 2 * MARGIN)
    canvas = Image.new("RGB", (width, top + TITLE + panel_h + 2 * MARGIN), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((canvas.width // 2, MARGIN + TITLE // 2), title, fill=(0, 0, 0), font=font, anchor="mm")
    draw.line([(canvas.width // 2, MARGIN + top), (canvas.width // 2, canvas.height - MARGIN)], fill=(170, 170, 170))

    for p, (name, idx) in enumerate(panels):
        x0, y0 = (width // 2) * p + MARGIN, MARGIN + top + TITLE  # each panel in its half, 2 * MARGIN apart
        draw.text((x0 + panel_w // 2, y0 - TITLE // 2), f"{name} ({len(idx)})", fill=(0, 0, 0), font=font,
                  anchor="mm")
        for j, i in enumerate(idx):
            x = x0 + (panel_w - grid_w) // 2 + (j % cols) * (tw + GAP)  # the grid centred under its title
            y = y0 + (j // cols) * (th + cap + GAP)
            img = images[i][..., 0] if images.shape[3] == 1 else images[i]
            canvas.paste(Image.fromarray(img).convert("RGB").resize((tw, th), Image.Resampling.NEAREST), (x, y))
            if cap:
                k = int(labels[i])
                text = classes[k] if classes is not None else str(k)
                draw.text((x + tw // 2, y + th + cap // 2), text[: max(1, tw // 6)], fill=(60, 60, 60), font=small,
                          anchor="mm")
    with atomic_path(Path(path)) as tmp:
        canvas.save(tmp, format="PNG")
