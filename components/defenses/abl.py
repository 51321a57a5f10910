"""ABL, Anti-Backdoor Learning (Li et al., NeurIPS 2021): the baseline every seed compares against.

Not among the papers; the algorithm is that of the official code (`bboylyg/ABL`), restated in paper 004's Eq. 2
(notes: defenses-wave2.md, section 4):

1. Warm-up (isolation): the model trains from scratch on the whole poisoned set without augmentation, with loss
   flooding at b (ABL's local gradient ascent): L = |L_CE - b| + b. Below b the gradient ascends, so clean samples
   are not fitted below b while the easy poison falls far below it. L_CE is the batch mean (official code); the
   per-sample variant (BackdoorBox) floods each sample's loss.
2. Scoring: every sample's CE under the isolation model, eval mode, no augmentation (`isolation_loss`).
3. Partition: the lowest-loss share p (1 %) is isolated (suspect); the rest is the clean pool. Lowest, not highest:
   the first official commit sorted the wrong way.
4. Final training: the same model continues (no re-initialization) on the clean pool with augmentation.
5. Unlearning: gradient ascent, -CE, on the isolated samples, without augmentation and with batch norm frozen in
   eval mode (backdoor-toolbox freezes the running statistics: 1 % of the set in train mode would shift them; eval
   mode also normalizes with them, so the ascent acts on the deployed function). Its model is the defended model;
   there is no model selection on test ASR.

The fine-tuning uses the protocol's training recipe (the one every defense's final training uses: one-cycle to
lr 0.1 on both protocols) with the preset's epochs, not the official step schedule; the isolation warm-up uses
`train` with `isolation`'s overrides (default: no augmentation, constant lr, as the official code).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from components import artifacts, checkpoint, engine, splits, stages
from components.artifacts import SCORE_SCHEMA, SPLIT_SCHEMA
from components.defenses.base import DATA, Defense, Evaluation, Stage
from components.params import Strict, TrainParams, check_overrides, final_params

# (isolation, fine-tuning, unlearning) epochs and the unlearning lr of the seeds' settings (notes, table 4.2)
PRESETS = {
    "backdoorbench": (20, 60, 20, 1e-4),  # BackdoorBench: the project default
    "backdoorbox": (20, 70, 5, 5e-4),  # BackdoorBox, and BSD's (003, C.4) statement of ABL
}


class AblParams(Strict):
    """ABL. `preset` names the seeds' phase lengths; `epochs` scales all three so that the fine-tuning lasts that many
    epochs (the CPU protocol: 10), keeping the preset's ratios; explicit phase epochs override the preset."""

    preset: Literal["backdoorbench", "backdoorbox"] = "backdoorbench"
    epochs: int | None = Field(None, ge=1)  # fine-tuning epochs; the other phases scale with them. None: the preset's
    isolation_epochs: int | None = Field(None, ge=1)
    unlearn_epochs: int | None = Field(None, ge=1)
    unlearn_lr: float | None = Field(None, gt=0)  # None: the preset's
    flooding: float = Field(0.5, ge=0)  # b (official default, flooding type)
    per_sample: bool = False  # flood each sample's loss (BackdoorBox) instead of the batch mean (official)
    isolation_ratio: float = Field(0.01, gt=0, lt=1)  # p
    isolation: dict[str, Any] = {"augment": "none", "schedule": "constant"}  # overrides of `train` for step 1
    score_batch: int = Field(512, ge=1)

    @model_validator(mode="after")
    def _check(self):
        check_overrides("abl", isolation=self.isolation)
        return self


def phases(params: AblParams) -> tuple[int, int, int, float]:
    """(isolation epochs, fine-tuning epochs, unlearning epochs, unlearning lr) of the preset, scaled to `epochs`."""
    iso, ft, un, lr = PRESETS[params.preset]
    scale = (params.epochs or ft) / ft
    return (params.isolation_epochs or max(1, round(iso * scale)), max(1, round(ft * scale)),
            params.unlearn_epochs or max(1, round(un * scale)), params.unlearn_lr or lr)


def flooding(b: float, per_sample: bool = False) -> engine.LossFn:
    """Step 1: loss flooding, L = |L_CE - b| + b, on the batch mean L_CE (or per sample). As a per-sample loss whose
    batch mean is L: s (CE_i - b) + b with s = sign(L_CE - b), so the step descends above b and ascends below it."""

    def loss(logits: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), y, reduction="none")
        sign = torch.sign((ce if per_sample else ce.mean()) - b).detach()
        return sign * (ce - b) + b

    return loss


def isolate(loss: np.ndarray, ratio: float) -> np.ndarray:
    """Step 3: True for the `ratio` share of samples with the lowest loss (the isolated, suspect samples)."""
    return splits.lowest_share(loss, ratio)


def ascent(logits: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Step 5 (004 Eq. 2's second term): gradient ascent on the isolated samples' CE."""
    return -F.cross_entropy(logits.float(), y, reduction="none")


def unlearn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: TrainParams, **kwargs) -> list[dict]:
    """Step 5: gradient ascent on the isolated samples, batch norm frozen in eval mode (its running statistics are
    used and left unchanged). In train mode a batch of isolated samples would be normalized by its own statistics:
    a batch of blended images is then a different function (measured: CE 4.85 where the deployed model's is near
    0), and the ascent would act on that function, not on the deployed one."""
    return engine.train(model, x, y, p, loss_fn=ascent, desc="unlearn", frozen_norm=True, **kwargs)


# --- stage functions ---------------------------------------------------------------------------------------------

def isolation_train(dataset: Path, out: Path, *, params: TrainParams, model_name: str, abl: AblParams,
                    monitor: stages.Monitor | None = None) -> dict:
    """Step 1: the model from scratch on the whole set with loss flooding."""
    return stages.train(dataset, out, params=params, model_name=model_name, monitor=monitor, desc="isolation",
                        loss_fn=flooding(abl.flooding, abl.per_sample),
                        meta={"flooding": abl.flooding, "per_sample": abl.per_sample})


def score_stage(dataset: Path, model: Path, out: Path, *, params: AblParams) -> dict:
    """Step 2: out/scores.parquet with `isolation_loss`, the isolation model's per-sample CE."""
    return stages.loss_scores(dataset, model, out, column="isolation_loss", batch_size=params.score_batch)


def partition_stage(score_table: Path, out: Path, *, params: AblParams) -> dict:
    """Step 3: out/split.parquet, the lowest-loss share suspect (isolated), the rest clean."""
    loss = artifacts.read_table(score_table, {**SCORE_SCHEMA, "isolation_loss": pa.float64()})["isolation_loss"]
    isolated = isolate(loss, params.isolation_ratio)
    stages.write_split(~isolated, Path(out) / "split.parquet")
    return {"samples": len(loss), "clean": int((~isolated).sum()), "suspect": int(isolated.sum()),
            "threshold": float(loss[isolated].max())}


def unlearn_stage(dataset: Path, split: Path, model: Path, out: Path, *, params: TrainParams,
                  monitor: stages.Monitor | None = None) -> dict:
    """Step 5: out/model, the fine-tuned model after gradient ascent on the split's suspect (isolated) pool."""
    ds = stages.load_dataset(dataset)
    x, y = stages.tensors(ds)
    isolated = torch.from_numpy(artifacts.read_table(split, SPLIT_SCHEMA)["pool"] == "suspect")
    net, meta = artifacts.load_model(model)
    torch.manual_seed(params.seed)
    history = unlearn(net, x[isolated], y[isolated], params, on_epoch=monitor,
                      checkpoint=checkpoint.path(out, "unlearn"))
    out = Path(out)
    artifacts.write_json(history, out / "history.json")
    artifacts.save_model(net, {**meta, "unlearned": {"samples": int(isolated.sum()), **params.model_dump()},
                               "init": stages.model_ref(model), "epochs": meta["epochs"] + len(history)}, out)
    return {"samples": int(isolated.sum()), "train_loss": history[-1]["loss"] if history else None}


# --- declaration -------------------------------------------------------------------------------------------------

def _train(c) -> TrainParams:
    return c.train.model_copy(update={"seed": c.seed})


def isolation_params(c) -> TrainParams:
    return final_params(_train(c), {**c.abl.isolation, "epochs": phases(c.abl)[0]})


def finetune_params(c) -> TrainParams:
    """Step 4: the final training (`train` with `final`) for the preset's fine-tuning epochs."""
    return final_params(_train(c), {**c.final, "epochs": phases(c.abl)[1]})


def unlearn_params(c) -> TrainParams:
    """Step 5: the preset's epochs and lr, constant, without augmentation (official code)."""
    _, _, epochs, lr = phases(c.abl)
    return final_params(_train(c), {"epochs": epochs, "lr": lr, "schedule": "constant", "augment": "none"})


DEFENSE = Defense(
    name="abl", section="abl", params=AblParams,
    description="ABL (baseline): isolation with loss flooding, the lowest-loss 1 % isolated, fine-tuning on the "
                "rest, gradient ascent on the isolated samples.",
    stages=(
        Stage("warmup", isolation_train, {"dataset": f"{DATA}/dataset.npz"}, kind="model", monitor=True,
              params=lambda c: {"params": isolation_params(c), "model_name": c.model, "abl": c.abl},
              reads=("train", "seed", "model", "abl")),
        Stage("score", score_stage, {"dataset": f"{DATA}/dataset.npz", "model": "warmup"},
              params=lambda c: {"params": c.abl}, reads=("abl",)),
        Stage("partition", partition_stage, {"score_table": "score/scores.parquet"}, gpu=False,
              params=lambda c: {"params": c.abl}, reads=("abl",)),
        Stage("final_train", stages.train, {"dataset": f"{DATA}/dataset.npz", "split": "partition/split.parquet",
                                            "init": "warmup"},
              kind="model", monitor=True,
              params=lambda c: {"params": finetune_params(c), "model_name": c.model, "desc": "fine-tune"},
              reads=("train", "final", "seed", "model", "abl")),
        Stage("unlearn", unlearn_stage, {"dataset": f"{DATA}/dataset.npz", "split": "partition/split.parquet",
                                         "model": "final_train"},
              kind="model", monitor=True, params=lambda c: {"params": unlearn_params(c)},
              reads=("train", "seed", "abl")),
    ),
    evaluation=Evaluation(models={"isolation": "warmup", "finetuned": "final_train", "abl": "unlearn"},
                          defended="abl", scores=("score/scores.parquet",), directions={"isolation_loss": -1},
                          splits={"isolation": "partition/split.parquet"}, detection="isolation",
                          suspicion="isolation_loss"),
)
