"""A-ABL, adversarially robust anti-backdoor learning (paper 001): three stages.

1. Naive training on the whole poisoned set (the warm-up stage; section 6: Adam, lr 1e-3, 20 epochs).
2. Splitting by adversarial robustness (section 5.2): every sample's iFGSM adversarial example (eps 2/255, step
   2/255, 5 steps; eps 1/255 for images larger than 32 px) is scored with the symmetric cross-entropy against the
   sample's own label, and the SCE distribution is cut at Otsu's threshold. Low SCE = robust = Category A poison
   (a patch trigger that no small perturbation overrides): isolated. High SCE = adversarially vulnerable: kept, as
   D_vul. Table 1 reports gamma = |D_vul| / |D| and the poison rate rho_vul inside D_vul.
3. PGD adversarial training from scratch on D_vul (Eq. 1; eps 8/255, step 2/255, 10 steps, random start), which
   suppresses the Category B backdoors (Blend, WaNet) that splitting leaves in D_vul. "Adv. Train", the paper's
   baseline, is the same training on the whole poisoned set.

Reading of the paper: the adversarial examples of stage 3 are made with the model in training mode (batch norm on
batch statistics, as in Madry et al.'s PGD-AT); CE is the inner loss (Eq. 1's L); the warm-up model is also the
no-defense reference for DER when the protocol gives stage 1 no overrides.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field, model_validator
from torch import nn

from components import artifacts, engine, scores, splits, stages
from components.artifacts import SCORE_SCHEMA
from components.defenses.base import DATA, Defense, Evaluation, Stage
from components.engine import Perturb
from components.params import Strict, TrainParams, check_overrides, final_params


class AablParams(Strict):
    """A-ABL (paper 001, section 6's settings). Stage 1 is the warm-up (the protocol's training with the `warmup`
    overrides), stage 2 scores every sample with the SCE of its iFGSM adversarial example and splits at Otsu's
    threshold, stage 3 is PGD adversarial training from scratch on the vulnerable part (the final training with the
    `final` overrides). Adv. Train, the paper's baseline, shares this section."""

    warmup: dict[str, Any] = {}  # overrides of `train` for stage 1 (paper protocol: Adam, lr 1e-3, 20 epochs)
    score_eps: float | None = Field(None, gt=0)  # iFGSM budget; None: 2/255 for images up to 32 px, 1/255 above
    score_step: float = Field(2 / 255, gt=0)
    score_steps: int = Field(5, ge=1)
    sce_alpha: float = Field(0.1, ge=0)  # SCE = alpha CE + beta RCE (Wang et al. 2019's CIFAR-10 values)
    sce_beta: float = Field(1.0, ge=0)
    otsu_bins: int = Field(256, ge=2)
    adv_eps: float = Field(8 / 255, gt=0)  # stage 3, Eq. 1's inner max: PGD, eps 8/255, step 2/255, 10 steps
    adv_step: float = Field(2 / 255, gt=0)
    adv_steps: int = Field(10, ge=1)
    final: dict[str, Any] = {}  # overrides of the final training (paper protocol: 100 epochs, lr 0.1, /10 at 50/75/90)
    ra_eps: float = Field(8 / 255, gt=0)  # robust accuracy: PGD-10, eps 8/255, step 2/255 (section 6)
    ra_step: float = Field(2 / 255, gt=0)
    ra_steps: int = Field(10, ge=1)
    score_batch: int = Field(512, ge=1)

    @model_validator(mode="after")
    def _overrides(self):
        check_overrides("aabl", warmup=self.warmup, final=self.final)
        return self


def score_eps(params: AablParams, image_size: int) -> float:
    """Stage 2's iFGSM budget: as configured, else 2/255 up to 32-pixel images and 1/255 above (section 6)."""
    if params.score_eps is not None:
        return params.score_eps
    return 2 / 255 if image_size <= 32 else 1 / 255


def score(model: nn.Module, x: torch.Tensor, y: torch.Tensor, params: AablParams) -> tuple[np.ndarray, np.ndarray]:
    """Stage 2's score of every sample: (natural SCE, SCE of its iFGSM adversarial example)."""
    eps = score_eps(params, max(x.shape[1], x.shape[2]))
    device = engine.default_device()
    logits = engine.predict(model, x, batch_size=params.score_batch, device=device)
    natural = scores.symmetric_cross_entropy(logits, y, params.sce_alpha, params.sce_beta).numpy()
    adversarial = scores.adv_sce(model, x, y, eps=eps, step=min(params.score_step, eps), steps=params.score_steps,
                                 alpha=params.sce_alpha, beta=params.sce_beta, batch_size=params.score_batch,
                                 device=device)
    return natural, adversarial


def partition(adv_sce: np.ndarray, params: AablParams) -> tuple[np.ndarray, float]:
    """Section 5.2: (vulnerable mask = D_vul, kept for training; Otsu's threshold). SCE <= threshold is isolated."""
    threshold = splits.otsu_threshold(adv_sce, params.otsu_bins)
    return adv_sce > threshold, threshold


def pgd(params: AablParams, seed: int) -> Perturb:
    """Stage 3's inner maximization (Eq. 1): PGD with a random start inside the eps ball. Its random starts come from
    its `generator`, which the engine's checkpoints save and restore."""
    gen = torch.Generator().manual_seed(seed)

    def perturb(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return scores.ifgsm(model, x, y, eps=params.adv_eps, step=params.adv_step, steps=params.adv_steps,
                            random_start=True, gen=gen)

    perturb.generator = gen
    return perturb


# --- stage functions ---------------------------------------------------------------------------------------------

def score_stage(dataset: Path, model: Path, out: Path, *, params: AablParams) -> dict:
    """Stage 2 (section 5.2): out/scores.parquet with `adv_sce` (SCE of the iFGSM adversarial example) and `sce`
    (the natural SCE, for the report's natural vs adversarial histograms, Figs. 4 and 9)."""
    ds = stages.load_dataset(dataset)
    net, meta = artifacts.load_model(model)
    t0 = time.perf_counter()
    natural, adversarial = score(net, *stages.tensors(ds), params)
    seconds = time.perf_counter() - t0
    stages.write_scores(Path(out) / "scores.parquet", {"adv_sce": adversarial, "sce": natural}, model, meta)
    return {"samples": len(ds), "samples_per_second": len(ds) / seconds}


def partition_stage(score_table: Path, out: Path, *, params: AablParams) -> dict:
    """Section 5.2: Otsu's threshold on `adv_sce`; the vulnerable part above it is the clean pool (D_vul), the
    robust part is suspect (isolated). Returns the threshold and gamma = |D_vul| / |D| (Table 1)."""
    adv = artifacts.read_table(score_table, {**SCORE_SCHEMA, "adv_sce": pa.float64()})["adv_sce"]
    vulnerable, threshold = partition(adv, params)
    stages.write_split(vulnerable, Path(out) / "split.parquet")
    return {"samples": len(adv), "clean": int(vulnerable.sum()), "suspect": int((~vulnerable).sum()),
            "threshold": threshold, "gamma": float(vulnerable.mean())}


def adversarial_train(dataset: Path, out: Path, *, params: TrainParams, model_name: str, aabl: AablParams,
                      split: Path | None = None, monitor: stages.Monitor | None = None) -> dict:
    """Stage 3 (Eq. 1): PGD adversarial training from scratch, on the split's clean pool when a split is given."""
    return stages.train(dataset, out, params=params, model_name=model_name, split=split, monitor=monitor,
                        desc="adversarial training", perturb=pgd(aabl, params.seed),
                        meta={"adversarial": {"eps": aabl.adv_eps, "step": aabl.adv_step, "steps": aabl.adv_steps}})


# --- declarations: A-ABL and its Adv. Train baseline (one parameter section, `aabl`) --------------------------------

def warmup_params(c) -> TrainParams:
    """Stage 1: `train` with `aabl.warmup`."""
    return final_params(c.train.model_copy(update={"seed": c.seed}), c.aabl.warmup)


def final_train_params(c) -> TrainParams:
    """Stage 3 and Adv. Train: the final training (`train` with `final`) with `aabl.final`."""
    return final_params(final_params(c.train.model_copy(update={"seed": c.seed}), c.final), c.aabl.final)


def _ra(c) -> dict:
    return {"eps": c.aabl.ra_eps, "step": c.aabl.ra_step, "steps": c.aabl.ra_steps}


_WARMUP = Stage("warmup", stages.train, {"dataset": f"{DATA}/dataset.npz"}, kind="model", monitor=True,
                params=lambda c: {"params": warmup_params(c), "model_name": c.model, "desc": "warm-up"},
                reads=("train", "seed", "model", "aabl"))


def _adversarial(split: dict) -> Stage:
    return Stage("final_train", adversarial_train, {"dataset": f"{DATA}/dataset.npz", **split}, kind="model",
                 monitor=True, params=lambda c: {"params": final_train_params(c), "model_name": c.model, "aabl": c.aabl},
                 reads=("train", "final", "seed", "model", "aabl"))


DEFENSE = Defense(
    name="a-abl", section="aabl", params=AablParams,
    description="A-ABL (paper 001): naive training, iFGSM + SCE scoring, Otsu split, PGD adversarial training on the "
                "vulnerable part.",
    stages=(
        _WARMUP,
        Stage("score", score_stage, {"dataset": f"{DATA}/dataset.npz", "model": "warmup"},
              params=lambda c: {"params": c.aabl}, reads=("aabl",)),
        Stage("partition", partition_stage, {"score_table": "score/scores.parquet"}, gpu=False,
              params=lambda c: {"params": c.aabl}, reads=("aabl",)),
        _adversarial({"split": "partition/split.parquet"}),
    ),
    evaluation=Evaluation(models={"nodef": "warmup", "clean": "final_train"}, defended="clean", reference="nodef",
                          scores=("score/scores.parquet",), directions={"adv_sce": -1, "sce": -1},
                          splits={"otsu": "partition/split.parquet"}, detection="otsu", suspicion="adv_sce",
                          robust=("nodef", "clean"), ra=_ra, reads=("aabl",)),
)

ADV_TRAIN = Defense(
    name="adv-train", section="aabl", params=AablParams,
    description="A-ABL's Adv. Train baseline: PGD adversarial training on the whole poisoned set, beside naive "
                "training.",
    stages=(_WARMUP, _adversarial({})),
    evaluation=Evaluation(models={"nodef": "warmup", "adv_train": "final_train"}, defended="adv_train",
                          reference="nodef", robust=("nodef", "adv_train"), ra=_ra, reads=("aabl",)),
)
