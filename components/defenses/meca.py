"""MeCa, Mellivora Capensis (paper 000): perturbation-robustness partition, backdoor enhancement, clean training.

Reading of the paper (DESIGN.md, "Reading the papers"):
- Algorithm 2, line 6, p = 1 - (e+1) * gamma is the share of D_u *kept for learning*: the lowest-KL, most robust,
  poison-like part. The (e+1) * gamma share with the highest KL is unlearned (Eq. 11). Only this reading gives
  "a dataset with an increasing poison ratio" and a model whose ACC falls while its ASR rises (Fig. 6).
- Partition always runs over the whole D_u (line 7), with the model of the current round.
- Unlearning (Eq. 11, arg max of the loss) is gradient ascent on cross-entropy; the paper names no safeguard, so
  each sample stops contributing once its loss passes `unlearn_ceiling` (loss flooding, as ABL's), and the
  learning rate is small and constant.
- Round 0's learning step (line 3 on the full D_u) is the warm-up training stage; each later round learns on the
  part kept by the previous round.
- Clean samples are those the enhanced model misclassifies (line 12); the final model trains from scratch on
  them (lines 13-15). Section 4.2.4 then relabels the rest with the clean model (Eq. 12) and fine-tunes on all.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from components import engine, scores, splits
from components.config import MecaParams, TrainParams


def keep_share(round_index: int, gamma: float) -> float:
    """MeCa Algorithm 2, line 6: p = 1 - (e+1) * gamma."""
    return 1 - (round_index + 1) * gamma


def partition(kl: np.ndarray, round_index: int, gamma: float) -> np.ndarray:
    """Algorithm 1, line 11 with Algorithm 2's p: True = kept in D_u_hat (learned), False = D_c (unlearned)."""
    return splits.lowest_share(kl, keep_share(round_index, gamma))


def _phase(params: MecaParams, base: TrainParams, *, epochs: int, lr: float) -> TrainParams:
    # Enhancement steps are short fine-tuning phases: constant small lr, no weight decay, the protocol's augmentation.
    return base.model_copy(update={"epochs": epochs, "lr": lr, "schedule": "constant", "weight_decay": 0.0})


def unlearn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, params: MecaParams, base: TrainParams, desc="unlearn"):
    """Eq. 11: theta = arg max sum_{D_c} l(f(x), y), bounded per sample by the ceiling."""
    p = _phase(params, base, epochs=params.unlearn_epochs, lr=params.unlearn_lr)
    return engine.train(model, x, y, p, loss_fn=engine.bounded_ascent(params.unlearn_ceiling), desc=desc)


def learn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, params: MecaParams, base: TrainParams, desc="learn"):
    """Algorithm 2, line 3: theta = arg min sum_{D_u_hat} l(f(x), y)."""
    p = _phase(params, base, epochs=params.learn_epochs, lr=params.learn_lr)
    return engine.train(model, x, y, p, desc=desc)


def fitted(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Whether the model classifies each sample as its (delivered) label."""
    return (engine.predict(model, x).argmax(1) == y).numpy()


def enhance(model: nn.Module, x: torch.Tensor, y: torch.Tensor, kept0: np.ndarray, params: MecaParams,
            base: TrainParams, seed: int, on_round: Callable[[dict], None] | None = None) -> list[dict]:
    """Algorithm 2, lines 2-10, starting after round 0's partition (`kept0`, from the warm-up model's KL).

    Returns one record per round with what a defender can observe (no ground truth): the round's kept mask, KL
    scores and the share of D_u the model fits after the round.
    """
    rounds = []
    kept, kl = kept0, None
    for e in range(params.rounds):
        if e > 0:
            learn(model, x[torch.from_numpy(kept)], y[torch.from_numpy(kept)], params, base, desc=f"learn r{e}")
            kl = scores.meca_kl(model, x, y, eps=params.eps, patch=params.patch, seed=seed + e,
                                batch_size=params.score_batch)
            kept = partition(kl, e, params.gamma)
        forget = torch.from_numpy(~kept)
        unlearn(model, x[forget], y[forget], params, base, desc=f"unlearn r{e}")
        fit = fitted(model, x, y)
        record = {"round": e, "keep_share": keep_share(e, params.gamma), "kept": kept.copy(), "kl": kl,
                  "fitted": fit, "fit_share": float(fit.mean())}
        rounds.append(record)
        if on_round is not None:
            on_round(record)
    return rounds


def identify_clean(enhanced: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Algorithm 2, line 12: D_c = {(x, y) in D_u : f_theta(x) != y}. True = clean."""
    return ~fitted(enhanced, x, y)


def finetune_params(train: TrainParams, params: MecaParams) -> TrainParams:
    """Section 4.2.4's fine-tuning: the protocol's training with MeCa's fine-tune epochs and a cosine-decayed lr."""
    return train.model_copy(update={"epochs": params.finetune_epochs, "lr": params.finetune_lr, "schedule": "cosine"})


def relabel(clean_model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Eq. 12: y_hat = f(x) for the samples judged poisoned, with the clean model."""
    return engine.predict(clean_model, x).argmax(1).numpy()
