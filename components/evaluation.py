"""Evaluation: the only place that reads ground truth. Models against the clean and the triggered test set,
scores and splits against the sample table's `is_poison`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from components import artifacts, engine, metrics, scores
from components.artifacts import (EPOCH_POOLS_SCHEMA, ROUNDS_SCHEMA, SAMPLE_SCHEMA, SCORE_SCHEMA,
                                  SPLIT_SCHEMA)

def model_metrics(model_dir: Path, test_x: torch.Tensor, test_y: np.ndarray, trig_x: torch.Tensor,
                  trig_target: np.ndarray, target: int) -> dict:
    """ACC, ASR (None without a trigger), and per-class, target-class ACC and the share predicted as the target."""
    net, meta = artifacts.load_model(model_dir)
    pred = engine.predict(net, test_x).argmax(1).numpy()
    asr = metrics.attack_success_rate(engine.predict(net, trig_x).argmax(1).numpy(), trig_target) if len(trig_x) else None
    return {"acc": metrics.accuracy(pred, test_y), "asr": asr,
            **metrics.target_figures(pred, test_y, target, len(meta["classes"]))}


def robust_accuracy(model_dir: Path, test_x: torch.Tensor, test_y: np.ndarray, *, eps: float, step: float, steps: int,
                    batch_size: int = 512, seed: int = 0) -> float:
    """RA (A-ABL section 6): accuracy on the clean test set under PGD (random start, `steps` steps of `step` inside
    the L-inf ball of radius `eps`; the paper's PGD-10 at 8/255, 2/255)."""
    net, _ = artifacts.load_model(model_dir)
    device = engine.default_device()
    net = engine.eval_model(net, device)
    gen = torch.Generator().manual_seed(seed)
    correct = 0
    for xb, yb in zip(test_x.split(batch_size), torch.from_numpy(test_y).split(batch_size)):
        x, y = engine.to_float(xb.to(device)), yb.to(device)
        adv = scores.ifgsm(net, x, y, eps=eps, step=step, steps=steps, random_start=True, gen=gen)
        with torch.no_grad():
            correct += int((net(adv).argmax(1) == y).sum())
    return correct / len(test_y)


def score_metrics(score_table: Path, is_poison: np.ndarray, directions: dict[str, int]) -> dict:
    """AUROC of every score against ground truth, on its poison-like side (`directions`: -1 = a low score means
    poison-like, as the defense declares it; +1 otherwise). A score that leaves some samples NaN (BSD's OSS distance
    scores the target-label samples only) is measured on the samples it scores."""
    table = artifacts.read_table(score_table, SCORE_SCHEMA)
    out = {}
    for col in table:
        if col in SCORE_SCHEMA:
            continue
        direction = directions.get(col, 1)
        values = table[col].astype(float)
        scored = ~np.isnan(values)
        poison = is_poison[table["sample_id"]]
        values, poison = values[scored], poison[scored]
        out[col] = {"auroc": metrics.auroc(direction * values, poison),
                    "clean_mean": float(values[~poison].mean()) if (~poison).any() else float("nan"),
                    "poison_mean": float(values[poison].mean()) if poison.any() else float("nan"),
                    **({"scored": int(scored.sum())} if not scored.all() else {})}
    return out


def split_metrics(split: Path, samples: dict, target: int | None = None) -> dict:
    """Pool sizes and poison rates, detection quality, relabel accuracy; with `target`, how many clean samples of the
    target class (true label = target, not poison) each pool holds: a pool that drops them drops the class."""
    table = artifacts.read_table(split, SPLIT_SCHEMA)
    is_poison = samples["is_poison"][table["sample_id"]]
    out = {pool: metrics.pool_stats(table["pool"] == pool, is_poison) for pool in np.unique(table["pool"])}
    if target is not None:
        clean_target = (samples["true_label"][table["sample_id"]] == target) & ~is_poison
        for pool in np.unique(table["pool"]):
            out[pool]["clean_target"] = int((clean_target & (table["pool"] == pool)).sum())
    out["detection"] = metrics.detection(table["pool"] != "clean", is_poison)
    relabelled = table["relabel"] >= 0
    if relabelled.any():  # relabel accuracy against the true label, on poison and on clean samples
        truth = samples["true_label"][table["sample_id"]]
        out["relabel_poison_to_true"] = metrics.accuracy(table["relabel"][relabelled & is_poison],
                                                         truth[relabelled & is_poison])
        out["relabel_clean_kept"] = metrics.accuracy(table["relabel"][relabelled & ~is_poison],
                                                     truth[relabelled & ~is_poison])
    return out


def round_metrics(rounds: Path, samples: dict, target: int | None = None) -> list[dict]:
    """MeCa's enhancement per round: what the defender saw (fit shares), and what ground truth says about it (poison
    and clean samples fitted and kept; with a target class, its clean samples fitted: the enhanced model's bias
    toward the target label makes it fit them, and identification then calls them poison)."""
    table = artifacts.read_table(rounds, ROUNDS_SCHEMA)
    out = []
    for r in np.unique(table["round"]):
        sel = table["round"] == r
        ids = table["sample_id"][sel]
        poison = samples["is_poison"][ids]
        kept, fitted, kl = table["kept"][sel], table["fitted"][sel], table["kl"][sel]
        rec = {"round": int(r), "fit_share": float(fitted.mean()), "fit_kept": float(fitted[kept].mean()),
               "fit_unlearned": float(fitted[~kept].mean()) if (~kept).any() else float("nan"),
               "poison_fitted": float(fitted[poison].mean()), "clean_fitted": float(fitted[~poison].mean()),
               "unlearned": int((~kept).sum()), "poison_unlearned": int((~kept & poison).sum()),
               "poison_kept": int((kept & poison).sum())}
        if target is not None:
            clean_target = ~poison & (samples["true_label"][ids] == target)
            rec["clean_target_fitted"] = float(fitted[clean_target].mean()) if clean_target.any() else float("nan")
        if not np.isnan(kl).all():
            rec["kl_auroc"] = metrics.auroc(-kl, poison)
        out.append(rec)
    return out


def epoch_pool_metrics(pools: Path, samples: dict | None, target: int | None = None) -> list[dict]:
    """A training's pools epoch by epoch (BSD's final training): the clean (labelled) pool's size and, with ground
    truth, its poison count and rate, the poison share of the other pool, the share of all poison it holds (recall),
    and the clean samples of the target class in the clean pool."""
    table = artifacts.read_table(pools, EPOCH_POOLS_SCHEMA)
    out = []
    for epoch in np.unique(table["epoch"]):
        sel = table["epoch"] == epoch
        clean = table["clean"][sel]
        rec = {"epoch": int(epoch), "clean": int(clean.sum()), "suspect": int((~clean).sum())}
        if samples is not None:
            ids = table["sample_id"][sel]
            poison = samples["is_poison"][ids]
            rec.update(clean_poison=int((clean & poison).sum()),
                       clean_poison_rate=float(poison[clean].mean()) if clean.any() else float("nan"),
                       suspect_poison_rate=float(poison[~clean].mean()) if (~clean).any() else float("nan"),
                       poison_recall=float((~clean & poison).sum() / poison.sum()) if poison.any() else float("nan"))
            if target is not None:
                rec["clean_target"] = int((clean & ~poison & (samples["true_label"][ids] == target)).sum())
        out.append(rec)
    return out
