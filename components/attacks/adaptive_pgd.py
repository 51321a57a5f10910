"""Adaptive attack aimed at perturbation-based scores (BSD, "Bi-perspective Splitting Defense", paper 003, App. E.5):
a universal adversarial noise as the trigger.

Dirty label. Trigger: one noise delta of the image's shape, ||delta||_inf <= eps (8/255), added to the image, x' =
clip(x + delta). delta is a targeted universal perturbation found by PGD on a surrogate model: delta <- clip_eps(delta
- step * sign(grad_delta mean CE(f(clip(x + delta)), target))) over `steps` iterations (15, step 1.5/255, from delta =
0), on up to `pgd_samples` (1024) training images outside the target class. Which model the noise is computed on is
not in our notes of the paper; unpoison trains its own surrogate, a small CNN, for `epochs` (default 5) of SGD (lr
0.05, momentum 0.9, batch `batch_size` 128) on the clean labels of the data set it poisons, all seeded by the poison
seed (deterministic per seed on one machine). delta is rounded to whole 1/255 steps and stored in the spec as
`trigger` (C x H x W integers, in 1/255), so the test set is triggered from the spec alone; give `trigger` to skip the
training.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import ImageSet
from ..errors import UnpoisonError
from .base import Attack, Poisoned


def surrogate(c: int, num_classes: int) -> nn.Module:
    """A small CNN: two 3x3 conv + ReLU + max-pool blocks (16 and 32 channels), global average pool, linear."""
    return nn.Sequential(nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))


class AdaptivePGD(Attack):
    """A universal PGD noise (l_inf 8/255) from a surrogate model the attack trains, relabelled to the target."""

    name = "adaptive_pgd"
    all_to_all = False  # the noise is optimised towards the one target class
    defaults = {"eps": 8 / 255, "step": 1.5 / 255, "steps": 15, "pgd_samples": 1024, "epochs": 5, "batch_size": 128,
                "trigger": None}

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
        if self.trigger is not None:
            t = np.asarray(self.trigger)
            if t.ndim != 3 or not np.issubdtype(t.dtype, np.integer) or np.abs(t).max() > round(self.eps * 255):
                raise UnpoisonError(f"adaptive_pgd trigger is not a C x H x W array of integers within +-{round(self.eps * 255)} "
                                    f"(the noise in 1/255); leave it out to optimise one")
            self.trigger = t.astype(int).tolist()

    def train_surrogate(self, ds: ImageSet) -> nn.Module:
        g = torch.Generator().manual_seed(self.seed)
        x = torch.from_numpy(ds.images).permute(0, 3, 1, 2).float().div_(255)
        y = torch.from_numpy(ds.labels.astype(np.int64))
        with torch.random.fork_rng(devices=[]):  # the global RNG only for the layers' initialisation
            torch.manual_seed(self.seed)
            model = surrogate(x.shape[1], self.num_classes)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model.train()
        for _ in range(self.epochs):
            for batch in torch.randperm(len(x), generator=g).split(self.batch_size):
                opt.zero_grad()
                F.cross_entropy(model(x[batch]), y[batch]).backward()
                opt.step()
        return model.eval()

    def optimise(self, ds: ImageSet) -> np.ndarray:
        """delta in whole 1/255 steps, (C, H, W) int."""
        model = self.train_surrogate(ds)
        for p in model.parameters():
            p.requires_grad_(False)
        rng = np.random.default_rng(self.seed)
        pool = np.flatnonzero(ds.labels != self.target)
        pick = np.sort(rng.choice(pool, size=min(self.pgd_samples, len(pool)), replace=False))
        x = torch.from_numpy(ds.images[pick]).permute(0, 3, 1, 2).float().div_(255)
        target = torch.full((len(x),), self.target, dtype=torch.int64)
        delta = torch.zeros(1, *x.shape[1:], requires_grad=True)
        for _ in range(self.steps):
            loss = F.cross_entropy(model((x + delta).clamp(0, 1)), target)
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():  # targeted PGD (BSD App. E.5): a step down the target's loss, projected on the eps ball
                delta -= self.step * grad.sign()
                delta.clamp_(-self.eps, self.eps)
        limit = round(self.eps * 255)
        return (delta.detach()[0] * 255).round().clamp(-limit, limit).to(torch.int64).numpy()

    def poison(self, ds: ImageSet) -> Poisoned:
        if self.trigger is None:
            self.trigger = self.optimise(ds).tolist()
            self._cache.clear()
        return super().poison(ds)

    def noise(self, c: int, h: int, w: int) -> tuple[torch.Tensor]:
        t = torch.tensor(self.trigger, dtype=torch.float32) / 255
        if tuple(t.shape) != (c, h, w):
            raise UnpoisonError(f"adaptive_pgd trigger has shape {tuple(t.shape)} but the images are {c} x {h} x {w}; "
                                f"poison a data set of these images to optimise one")
        return (t,)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.trigger is None:
            raise UnpoisonError("adaptive_pgd has no trigger yet: it is optimised when the attack poisons a training set; "
                                "poison one first, or give params.trigger")
        (delta,) = self.cached(x, lambda: self.noise(*x.shape[1:]))
        return (x + delta).clamp_(0, 1)
