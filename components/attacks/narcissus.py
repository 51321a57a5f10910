"""Narcissus (Zeng, Pan, Just, Lyu, Qiu and Jia, "Narcissus: A Practical Clean-Label Backdoor Attack with Limited
Information", ACM CCS 2023; reference code `reds-lab/Narcissus: narcissus_function.py`).

Clean label: only target-class images are poisoned and they keep their labels. Trigger: one additive noise delta of
the image's shape, ||delta||_inf <= eps (16/255), optimised to be the most target-class-like perturbation: on a
surrogate model, minimise mean CE(f(clip(x + clip_eps(delta))), target) over target-class training images. Training
poison: x' = clip(x + delta); test trigger: x' = clip(x + test_multiplier * delta), `test_multiplier` 3 as in the
reference's evaluation (1 for the plain trigger).

The three stages of the reference, on the CPU and seeded by the poison seed (deterministic per seed on one machine):
1. surrogate: the small CNN of adaptive_pgd (components/attacks/surrogate.py), `epochs` (5, the reference's
   `surrogate_epochs` 200; the protocol's attack.epochs sets it, base.py) of SGD (lr 0.05, momentum 0.9, batch
   `batch_size`) on the clean labels of the data set being poisoned;
2. poison warm-up: that model fine-tuned for `warmup_epochs` (5) with RAdam (lr 0.1, as the reference) on the
   target-class images the trigger is optimised on, labelled the target;
3. trigger: delta from 0, RAdam (lr `trigger_lr`, 0.005 on the [0, 1] scale: the reference's 0.01 on its [-1, 1]
   scale) for `rounds` (1000) passes over up to `trigger_samples` (350, one reference batch) target-class images drawn
   with the seed, in batches of `batch_size` (350); delta is then clipped to eps.
delta is rounded to whole 1/255 steps and stored in the spec as `trigger` (C x H x W integers, in 1/255), so the test
set is triggered from the spec alone; give `trigger` to skip the optimisation.

Simplifications versus the reference: the surrogate is trained on the data set being poisoned (all classes) rather
than on a public out-of-distribution set (Tiny-ImageNet) plus the target-class images; it is the small CNN, not a
ResNet-18 trained 200 epochs (lr 0.1, cosine, augmentation); no augmentation or input normalisation anywhere; the
warm-up and the trigger use at most `trigger_samples` target-class images instead of all of them; no early stop on
a zero gradient.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
import torch.nn.functional as F

from ..data import ImageSet
from ..errors import UnpoisonError
from .surrogate import NoiseTrigger, freeze, to_float, train_surrogate

WARMUP_LR = 0.1  # the reference's generating_lr_warmup (RAdam)


class Narcissus(NoiseTrigger):
    """Clean label: one l_inf 16/255 noise optimised on a surrogate to look most like the target class, x3 at test."""

    name = "narcissus"
    clean_label = True
    all_to_all = False
    defaults = {"eps": 16 / 255, "test_multiplier": 3.0, "epochs": 5, "warmup_epochs": 5, "rounds": 1000,
                "trigger_lr": 0.005, "trigger_samples": 350, "batch_size": 350, "trigger": None}
    # the surrogate's epochs follow the protocol's attack.epochs (base.py); the warm-up keeps the reference's 5
    # rounds (`warmup_round`), a fine-tuning on the target class whatever the surrogate's training
    budget = ("epochs",)

    def check(self) -> None:
        for key in ("eps", "trigger_lr"):
            value = getattr(self, key)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 < value <= 1:
                raise UnpoisonError(f"narcissus {key} {value!r} is outside (0, 1]; give it on the [0, 1] pixel scale, "
                                    f"defaults are eps 16/255 (0.0627) and trigger_lr 0.005")
        m = self.test_multiplier
        if not isinstance(m, numbers.Real) or isinstance(m, bool) or not 0 < m <= 255:
            raise UnpoisonError(f"narcissus test_multiplier {m!r} is not a positive number; the test trigger is "
                                f"test_multiplier x the noise, 3 in the reference (1: the training trigger)")
        for key in ("epochs", "warmup_epochs", "rounds", "trigger_samples", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key in ("epochs", "warmup_epochs") else 1):
                raise UnpoisonError(f"narcissus {key} {value!r} is not a valid count; defaults are epochs 5, warmup_epochs 5 "
                                    f"(both may be 0), rounds 1000, trigger_samples 350, batch_size 350 (at least 1)")
        self.check_trigger()

    def optimise(self, ds: ImageSet) -> np.ndarray:
        """delta in whole 1/255 steps, (C, H, W) int."""
        model = train_surrogate(ds.images, ds.labels, num_classes=self.num_classes, seed=self.seed, epochs=self.epochs,
                                batch_size=self.batch_size)
        pool = np.flatnonzero(ds.labels == self.target)
        if len(pool) == 0:
            raise UnpoisonError(f"narcissus optimises its trigger on target-class images but class {self.target} has none "
                                f"in the data set; choose another target")
        rng = np.random.default_rng(self.seed)
        pick = np.sort(rng.choice(pool, size=min(self.trigger_samples, len(pool)), replace=False))
        x = to_float(ds.images[pick])
        target = torch.full((len(x),), self.target, dtype=torch.int64)
        g = torch.Generator().manual_seed(self.seed + 1)
        # 2. poison warm-up: fine-tune on the target-class images (reference: RAdam, lr 0.1)
        model.train()
        opt = torch.optim.RAdam(model.parameters(), lr=WARMUP_LR)
        for _ in range(self.warmup_epochs):
            for batch in torch.randperm(len(x), generator=g).split(self.batch_size):
                opt.zero_grad()
                F.cross_entropy(model(x[batch]), target[batch]).backward()
                opt.step()
        model = freeze(model)
        # 3. the trigger: minimise the target's CE of the clipped noise over the target-class images
        delta = torch.zeros(1, *x.shape[1:], requires_grad=True)
        opt = torch.optim.RAdam([delta], lr=self.trigger_lr)
        for _ in range(self.rounds):
            for batch in torch.randperm(len(x), generator=g).split(self.batch_size):
                noise = delta.clamp(-self.eps, self.eps)
                loss = F.cross_entropy(model((x[batch] + noise).clamp(0, 1)), target[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
        return self.quantised(delta.detach()[0])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The test trigger: clip(x + test_multiplier * delta)."""
        return self.add(x, self.test_multiplier)

    def poison_images(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The training trigger: clip(x + delta)."""
        return self.apply_uint8(images, lambda x: self.add(x, 1))
