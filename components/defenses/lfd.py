"""LfD, Learning from Distinction (paper 004): a low-capacity teacher's losses weight every sample of the student.

1. Warm-up: the teacher ResNet-S (one BasicBlock per stage, widths 2/2/2/4; components/models.py) trains a few
   epochs on the poisoned set without augmentation (section 5). A model this small fits the trigger, which is easy,
   long before the clean images: poison has the lowest teacher losses.
2. Scoring: the teacher's per-sample cross-entropy, in eval mode, without augmentation (`teacher_loss`).
3. Partition and weighting: the threshold is the loss at position n * alpha of the sorted losses (Eq. 4); every
   sample gets a weight (Eq. 6): l / M above the threshold, a small negative beta (l - threshold) / (M - threshold)
   at or below it, with M the largest loss of the whole training set. The samples at or below the threshold are
   the candidates (the suspect pool); the weights are the split table's `weight` column, computed once.
4. Final training: the student trains from scratch on every sample with the per-sample loss w * CE, its own CE:
   Eqs. 5 and 6 print the teacher's loss there by mistake; Algorithm 1, line 6 has the student's.

Reading of the paper (DESIGN.md): the batch loss is the batch mean of w * CE, as Eq. 6's expectation. The paper
trains the student with Adam, which ignores a constant factor on the loss; with SGD (the CPU protocol) that factor
is a learning-rate factor, so the student's loss is divided by the mean |w| over the set (`normalize`), which keeps
every ratio between weights and leaves Adam's training unchanged. The paper names no teacher epochs ("a few"):
5, as Fig. 2 compares losses at the fifth epoch, on both protocols.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from components import artifacts, stages
from components.artifacts import SCORE_SCHEMA, SPLIT_SCHEMA
from components.defenses.base import DATA, Defense, Evaluation, Stage
from components.models import MODELS
from components.params import Strict, TrainParams, check_overrides, final_params

# Section 5 gives the student's setup (Adam lr 1e-3, no weight decay); the teacher's is not given: the same optimizer,
# constant lr, batch 128, no augmentation (section 5), 5 epochs.
TEACHER_TRAIN = {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "schedule": "constant", "augment": "none",
                 "epochs": 5, "batch_size": 128}


class LfdParams(Strict):
    """LfD (paper 004, section 5's CIFAR-10 values)."""

    alpha: float = Field(0.15, gt=0, lt=1)  # share of the set at or below the threshold (Eq. 4)
    beta: float = Field(1e-3, ge=0)  # strength of the negative weights (Eq. 6)
    teacher: str = "resnet_s"  # the low-capacity teacher (section 5.3; resnet_s1 and resnet_s2 are its ablations)
    teacher_train: dict[str, Any] = TEACHER_TRAIN  # the teacher's training: overrides of `train`
    student: dict[str, Any] = {}  # overrides of the final training (paper protocol: Adam lr 1e-3, cosine, 80 epochs)
    normalize: bool = True  # divide the student's loss by the mean |w| (a constant; see the module's reading)
    score_batch: int = Field(512, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.teacher not in MODELS:
            raise ValueError(f"unknown teacher '{self.teacher}' in lfd.teacher; choose one of: {', '.join(MODELS)}")
        check_overrides("lfd", teacher_train=self.teacher_train, student=self.student)
        return self


def threshold(loss: np.ndarray, alpha: float) -> float:
    """Eq. 4: gamma = the teacher loss at position index = n * alpha of the ascending sort (1-based, so that the
    n * alpha lowest losses are the candidates)."""
    index = max(1, int(round(len(loss) * alpha)))
    return float(np.sort(loss)[index - 1])


def weights(loss: np.ndarray, gamma: float, beta: float) -> np.ndarray:
    """Eq. 6: w = l / M above gamma; w = beta (l - gamma) / (M - gamma) at or below it (in [-beta gamma / (M - gamma),
    0]); M = the largest loss over the whole training set."""
    m = float(loss.max())
    below = loss <= gamma
    span = m - gamma
    negative = beta * (loss - gamma) / span if span > 0 else np.zeros_like(loss)
    return np.where(below, negative, loss / m if m > 0 else 1.0)


def weighted_ce(scale: float):
    """The student's per-sample loss (Algorithm 1, line 6): its own CE, times `scale`; the engine multiplies it by
    each sample's weight and averages over the batch."""

    def loss(logits: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return scale * F.cross_entropy(logits.float(), y, reduction="none")

    return loss


# --- stage functions ---------------------------------------------------------------------------------------------

def score_stage(dataset: Path, model: Path, out: Path, *, params: LfdParams) -> dict:
    """Step 2: out/scores.parquet with `teacher_loss`, the teacher's per-sample CE."""
    return stages.loss_scores(dataset, model, out, column="teacher_loss", batch_size=params.score_batch)


def partition_stage(score_table: Path, out: Path, *, params: LfdParams) -> dict:
    """Step 3: out/split.parquet, the candidates (loss <= gamma, Eq. 4) suspect and the rest clean, with Eq. 6's
    `weight` of every sample."""
    loss = artifacts.read_table(score_table, {**SCORE_SCHEMA, "teacher_loss": pa.float64()})["teacher_loss"]
    gamma = threshold(loss, params.alpha)
    w = weights(loss, gamma, params.beta)
    candidate = loss <= gamma
    artifacts.write_table({"sample_id": np.arange(len(loss)), "pool": np.where(candidate, "suspect", "clean").tolist(),
                           "relabel": np.full(len(loss), -1), "weight": w}, Path(out) / "split.parquet",
                          {**SPLIT_SCHEMA, "weight": pa.float64()})
    return {"samples": len(loss), "clean": int((~candidate).sum()), "suspect": int(candidate.sum()),
            "threshold": gamma, "max_loss": float(loss.max()), "min_weight": float(w.min()),
            "mean_abs_weight": float(np.abs(w).mean())}


def student_train(dataset: Path, split: Path, out: Path, *, params: TrainParams, model_name: str, lfd: LfdParams,
                  monitor: stages.Monitor | None = None) -> dict:
    """Step 4: the student from scratch on every sample, its per-sample CE weighted by the split's `weight`."""
    w = artifacts.read_table(split, {**SPLIT_SCHEMA, "weight": pa.float64()})["weight"]
    scale = 1 / float(np.abs(w).mean()) if lfd.normalize and np.abs(w).mean() > 0 else 1.0
    result = stages.train(dataset, out, params=params, model_name=model_name, split=split, weighted=True,
                          loss_fn=weighted_ce(scale), monitor=monitor, desc="student", meta={"loss_scale": scale})
    return {**result, "loss_scale": scale}


# --- declaration -------------------------------------------------------------------------------------------------

def teacher_params(c) -> TrainParams:
    return final_params(c.train.model_copy(update={"seed": c.seed}), c.lfd.teacher_train)


def student_params(c) -> TrainParams:
    """The final training (`train` with `final`) with `lfd.student`."""
    return final_params(final_params(c.train.model_copy(update={"seed": c.seed}), c.final), c.lfd.student)


DEFENSE = Defense(
    name="lfd", section="lfd", params=LfdParams,
    description="LfD (paper 004): a low-capacity teacher's losses give every sample a weight, negative for the "
                "lowest; the student trains on the weighted set.",
    stages=(
        Stage("warmup", stages.train, {"dataset": f"{DATA}/dataset.npz"}, kind="model", monitor=True,
              params=lambda c: {"params": teacher_params(c), "model_name": c.lfd.teacher, "desc": "teacher"},
              reads=("train", "seed", "lfd")),
        Stage("score", score_stage, {"dataset": f"{DATA}/dataset.npz", "model": "warmup"},
              params=lambda c: {"params": c.lfd}, reads=("lfd",)),
        Stage("partition", partition_stage, {"score_table": "score/scores.parquet"}, gpu=False,
              params=lambda c: {"params": c.lfd}, reads=("lfd",)),
        Stage("final_train", student_train, {"dataset": f"{DATA}/dataset.npz", "split": "partition/split.parquet"},
              kind="model", monitor=True,
              params=lambda c: {"params": student_params(c), "model_name": c.model, "lfd": c.lfd},
              reads=("train", "final", "seed", "model", "lfd")),
    ),
    evaluation=Evaluation(models={"teacher": "warmup", "student": "final_train"}, defended="student",
                          scores=("score/scores.parquet",), directions={"teacher_loss": -1},
                          splits={"candidates": "partition/split.parquet"}, detection="candidates",
                          suspicion="teacher_loss"),
)
