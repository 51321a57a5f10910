"""Helpers of the attacks that optimise on a model of their own (adaptive_pgd, lc, narcissus): a small surrogate CNN
trained on the clean labels of the data set being poisoned, deterministic per seed (on one machine, on the CPU),
sign-gradient PGD on the l_inf ball around images, and `NoiseTrigger`, the attack whose trigger is one optimised
noise stored in its spec."""

from __future__ import annotations

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


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)


def train_surrogate(images: np.ndarray, labels: np.ndarray, *, num_classes: int, seed: int, epochs: int,
                    batch_size: int) -> nn.Module:
    """`surrogate` trained with SGD (lr 0.05, momentum 0.9, cross-entropy, no augmentation) for `epochs` on uint8 images
    (N, H, W, C) and their labels, initialised and shuffled from `seed`; returned in eval mode."""
    g = torch.Generator().manual_seed(seed)
    x = to_float(images)
    y = torch.from_numpy(labels.astype(np.int64))
    with torch.random.fork_rng(devices=[]):  # the global RNG only for the layers' initialisation
        torch.manual_seed(seed)
        model = surrogate(x.shape[1], num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=g).split(batch_size):
            opt.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
    return model.eval()


def freeze(model: nn.Module) -> nn.Module:
    """The model in eval mode with no parameter gradients (only the input's are wanted)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def pgd(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, delta: torch.Tensor, *, eps: float, step: float,
        steps: int, ascend: bool, reduction: str = "mean") -> torch.Tensor:
    """Sign-gradient PGD from `delta` (broadcast over x: (1, C, H, W) for one universal noise, x's shape for one per
    image): `steps` times delta <- clip_eps(delta -+ step * sign(grad_delta CE(model(clip(x + delta)), labels))),
    down the loss (towards `labels`, targeted) or up it (`ascend`, away from them, untargeted). With
    reduction "sum" a per-image noise does not depend on which other images share its batch. Returns delta, detached."""
    delta = delta.clone().requires_grad_(True)
    for _ in range(steps):
        loss = F.cross_entropy(model((x + delta).clamp(0, 1)), labels, reduction=reduction)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            if ascend:
                delta += step * grad.sign()
            else:
                delta -= step * grad.sign()
            delta.clamp_(-eps, eps)
    return delta.detach()


class NoiseTrigger(Attack):
    """An attack whose trigger is one additive noise delta, ||delta||_inf <= eps, optimised (`optimise`) when the attack
    first poisons a training set and kept in the spec as `trigger` (C x H x W integers, in 1/255), so the test set is
    triggered from the spec alone; a given `trigger` skips the optimisation."""

    def check_trigger(self) -> None:
        if self.trigger is not None:
            t = np.asarray(self.trigger)
            if t.ndim != 3 or not np.issubdtype(t.dtype, np.integer) or np.abs(t).max() > round(self.eps * 255):
                raise UnpoisonError(f"{self.name} trigger is not a C x H x W array of integers within "
                                    f"+-{round(self.eps * 255)} (the noise in 1/255); leave it out to optimise one")
            self.trigger = t.astype(int).tolist()

    def optimise(self, ds: ImageSet) -> np.ndarray:
        raise NotImplementedError

    def quantised(self, delta: torch.Tensor) -> np.ndarray:
        """A (C, H, W) noise in [0, 1] units as whole 1/255 steps within eps: the stored trigger."""
        limit = round(self.eps * 255)
        return (delta * 255).round().clamp(-limit, limit).to(torch.int64).numpy()

    def poison(self, ds: ImageSet) -> Poisoned:
        if self.trigger is None:
            self.trigger = self.optimise(ds).tolist()
            self._cache.clear()
        return super().poison(ds)

    def noise(self, c: int, h: int, w: int) -> tuple[torch.Tensor]:
        t = torch.tensor(self.trigger, dtype=torch.float32) / 255
        if tuple(t.shape) != (c, h, w):
            raise UnpoisonError(f"{self.name} trigger has shape {tuple(t.shape)} but the images are {c} x {h} x {w}; "
                                f"poison a data set of these images to optimise one")
        return (t,)

    def add(self, x: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
        """clip(x + multiplier * delta)."""
        if self.trigger is None:
            raise UnpoisonError(f"{self.name} has no trigger yet: it is optimised when the attack poisons a training "
                                f"set; poison one first, or give params.trigger")
        (delta,) = self.cached(x, lambda: self.noise(*x.shape[1:]))
        return (x + multiplier * delta).clamp_(0, 1)
