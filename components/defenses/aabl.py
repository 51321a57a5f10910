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

import numpy as np
import torch
from torch import nn

from components import engine, scores, splits
from components.config import AablParams
from components.engine import Perturb


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
    """Stage 3's inner maximization (Eq. 1): PGD with a random start inside the eps ball."""
    gen = torch.Generator().manual_seed(seed)

    def perturb(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return scores.ifgsm(model, x, y, eps=params.adv_eps, step=params.adv_step, steps=params.adv_steps,
                            random_start=True, gen=gen)

    return perturb
