"""Adaptive attack aimed at perturbation-based scores (BSD, "Bi-perspective Splitting Defense", paper 003, App. E.5):
a universal adversarial noise as the trigger.

Dirty label. Trigger: one noise delta of the image's shape, ||delta||_inf <= eps (8/255), added to the image, x' =
clip(x + delta). delta is a targeted universal perturbation found by PGD on a surrogate model: delta <- clip_eps(delta
- step * sign(grad_delta mean CE(f(clip(x + delta)), target))) over `steps` iterations (15, step 1.5/255, from delta =
0), on up to `pgd_samples` (1024) training images outside the target class. Which model the noise is computed on is
not in our notes of the paper; unpoison trains its own surrogate, a small CNN, for `epochs` (default 5; the
protocol's attack.epochs sets it, base.py) of SGD (lr 0.05, momentum 0.9, batch `batch_size` 128) on the clean
labels of the data set it poisons, all seeded by the poison seed (deterministic per seed on one machine). delta is
rounded to whole 1/255 steps and stored in the spec as `trigger` (C x H x W integers, in 1/255), so the test set is
triggered from the spec alone; give `trigger` to skip the training.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
import torch.nn as nn

from ..data import ImageSet
from ..errors import UnpoisonError
from .surrogate import NoiseTrigger, freeze, pgd, to_float, train_surrogate


class AdaptivePGD(NoiseTrigger):
    """A universal PGD noise (l_inf 8/255) from a surrogate model the attack trains, relabelled to the target."""

    name = "adaptive_pgd"
    all_to_all = False  # the noise is optimised towards the one target class
    defaults = {"eps": 8 / 255, "step": 1.5 / 255, "steps": 15, "pgd_samples": 1024, "epochs": 5, "batch_size": 128,
                "trigger": None}
    budget = ("epochs",)  # the surrogate's: attack.epochs of the protocol (base.py)

    def check(self) -> None:
        for key in ("eps", "step"):
            value = getattr(self, key)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 < value <= 1:
                raise UnpoisonError(f"adaptive_pgd {key} {value!r} is outside (0, 1]; defaults are eps 8/255 and step 1.5/255")
        for key in ("steps", "pgd_samples", "epochs", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "epochs" else 1):
                raise UnpoisonError(f"adaptive_pgd {key} {value!r} is not a positive integer; defaults are steps 15, "
                                    f"pgd_samples 1024, epochs 5 (0 allowed: an untrained surrogate), batch_size 128")
        self.check_trigger()

    def train_surrogate(self, ds: ImageSet) -> nn.Module:
        return train_surrogate(ds.images, ds.labels, num_classes=self.num_classes, seed=self.seed, epochs=self.epochs,
                               batch_size=self.batch_size)

    def optimise(self, ds: ImageSet) -> np.ndarray:
        """delta in whole 1/255 steps, (C, H, W) int."""
        model = freeze(self.train_surrogate(ds))
        rng = np.random.default_rng(self.seed)
        pool = np.flatnonzero(ds.labels != self.target)
        pick = np.sort(rng.choice(pool, size=min(self.pgd_samples, len(pool)), replace=False))
        x = to_float(ds.images[pick])
        target = torch.full((len(x),), self.target, dtype=torch.int64)
        # targeted PGD (BSD App. E.5): steps down the target's loss, projected on the eps ball
        delta = pgd(model, x, target, torch.zeros(1, *x.shape[1:]), eps=self.eps, step=self.step, steps=self.steps, ascend=False)
        return self.quantised(delta[0])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.add(x)
