"""Label-consistent backdoor, LC / CLB / CL (Turner, Tsipras and Madry, "Label-Consistent Backdoor Attacks",
arXiv:1912.02771, 2019).

Clean label: only target-class images are poisoned and they keep their labels. Each poisoned image x first gets an
untargeted PGD perturbation that makes it hard to classify as its own (the target) class, so that a model trained on
it leans on the trigger: delta <- clip_eps(delta + step * sign(grad_delta CE(f(clip(x + delta)), target))), `steps`
(30) iterations of `step` (1.5/255) from delta = 0 within l_inf `eps` (16/255: the seeds' setting, BSD App. C.3 and
our notes; for the other common setting, 8/255, give eps=0.0314), one delta per image; then the patch trigger is stamped
on it. The test trigger is the patch alone. The patch: `size` x `size` (3) in `style` `turner` (default: the
reference code's 3x3 pattern, a checkerboard whose upper inner pixel is black, mirrored left-right in the left
corners; in the bottom-right corner it is ABL's "gridTrigger"), or BadNets' `grid`, `white` or `random` (with
`pattern_seed`), at `position`: `all-corners` (default, the reference's four-corner trigger) or one BadNets position
(a corner name or [x, y]). The seeds' variants: LfD's CL (004) is `position=bottom-right` (the ABL grid trigger);
BSD (003) uses its BadNets trigger, `size=2 style=white position=top-left`.

The surrogate f is the small CNN of adaptive_pgd (components/attacks/surrogate.py), trained by the attack for
`epochs` (5; the protocol's attack.epochs sets it, base.py) of SGD (batch `batch_size` 128) on the clean labels of
the data set it poisons, seeded by the poison seed (deterministic per seed on one machine). Simplifications versus
the reference code (MadryLab `label-consistent-backdoor-code`; BackdoorBox `LabelConsistent.py`): the perturbed
model is this small CNN trained normally, not an adversarially trained ResNet (the seeds: PGD training eps 16/255,
step 2/255, 7 steps); PGD has no random start; the trigger is stamped at full amplitude (the paper's
reduced-amplitude variants are not implemented); no GAN-interpolation variant.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from ..data import ImageSet
from ..errors import UnpoisonError
from .badnets import CORNERS, STYLES as BADNETS_STYLES, BadNets
from .base import Poisoned
from .surrogate import freeze, pgd, train_surrogate

ALL_CORNERS = "all-corners"
STYLES = ("turner", *BADNETS_STYLES)
TURNER = ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 1.0))  # the reference's bottom-right 3x3 pattern, rows top to bottom


class LabelConsistent(BadNets):
    """Clean label: target-class images made hard to learn by PGD (l_inf 16/255) on a surrogate, then a patch in each corner."""

    name = "lc"
    clean_label = True
    all_to_all = False
    defaults = {"eps": 16 / 255, "step": 1.5 / 255, "steps": 30, "epochs": 5, "batch_size": 128, "size": 3,
                "position": ALL_CORNERS, "style": "turner", "pattern_seed": 0}
    budget = ("epochs",)  # the surrogate's: attack.epochs of the protocol (base.py)

    def check(self) -> None:
        for key in ("eps", "step"):
            value = getattr(self, key)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 < value <= 1:
                raise UnpoisonError(f"lc {key} {value!r} is outside (0, 1]; give it on the [0, 1] pixel scale, "
                                    f"defaults are eps 16/255 (0.0627) and step 1.5/255 (0.00588)")
        for key in ("steps", "epochs", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == "batch_size" else 0):
                raise UnpoisonError(f"lc {key} {value!r} is not a non-negative integer; defaults are steps 30, epochs 5 "
                                    f"(0: an untrained surrogate), batch_size 128 (at least 1)")
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise UnpoisonError(f"lc size {self.size!r} is not a positive integer; give the patch side in pixels, e.g. 3")
        if self.style not in STYLES:
            raise UnpoisonError(f"lc style {self.style!r} is unknown; choose one of: {', '.join(STYLES)}")
        if self.style == "turner" and self.size != 3:
            raise UnpoisonError(f"lc style 'turner' is the reference's 3x3 pattern but size is {self.size}; give size 3, "
                                f"or style grid for a checkerboard of any size")
        if not isinstance(self.pattern_seed, int) or isinstance(self.pattern_seed, bool):
            raise UnpoisonError(f"lc pattern_seed {self.pattern_seed!r} is not an integer; give an integer seed")
        if isinstance(self.position, (list, tuple)):
            if len(self.position) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in self.position):
                raise UnpoisonError(f"lc position {self.position!r} is not [x, y] with two non-negative integers; "
                                    f"give e.g. [2, 5] (column, row of the patch's top-left pixel), a corner or {ALL_CORNERS}")
            self.position = [int(v) for v in self.position]
        elif self.position != ALL_CORNERS and self.position not in CORNERS:
            raise UnpoisonError(f"lc position {self.position!r} is unknown; choose one of: {ALL_CORNERS}, "
                                f"{', '.join(CORNERS)}, or [x, y]")

    # --- the patch (the test trigger) ---

    def positions(self) -> list:
        return list(CORNERS) if self.position == ALL_CORNERS else [self.position]

    def pattern(self, c: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.size > min(h, w):
            raise UnpoisonError(f"lc patch size {self.size} exceeds the {h}x{w} images; choose a size of at most {min(h, w)}")
        s = self.size
        p, weight = torch.zeros(c, h, w), torch.zeros(1, h, w)
        for position in self.positions():
            top, left = self.corner(h, w, position)
            if self.style == "turner":  # mirrored left-right in the left corners, as in the reference's all-corners trigger
                patch = torch.tensor(TURNER).flip(-1) if isinstance(position, str) and position.endswith("left") else torch.tensor(TURNER)
                patch = patch.expand(c, s, s)
            else:
                patch = self.pattern_patch(c)
            p[:, top : top + s, left : left + s] = patch
            weight[:, top : top + s, left : left + s] = 1
        return p, weight

    # --- the training trigger: PGD on the surrogate, then the patch ---

    def poison(self, ds: ImageSet) -> Poisoned:
        self._model = freeze(train_surrogate(ds.images, ds.labels, num_classes=self.num_classes, seed=self.seed,
                                             epochs=self.epochs, batch_size=self.batch_size))
        try:
            return super().poison(ds)
        finally:
            del self._model  # only needed while poisoning; not part of the spec

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        """Untargeted PGD away from the (target) label, one delta per image; clip(x + delta). Summed loss: an image's delta
        does not depend on the other images in its batch."""
        model = getattr(self, "_model", None)
        if model is None:
            raise UnpoisonError("lc perturbs its poison on a surrogate trained while it poisons a data set; call poison(ds)")
        labels = torch.full((len(x),), self.target, dtype=torch.int64)
        delta = pgd(model, x, labels, torch.zeros_like(x), eps=self.eps, step=self.step, steps=self.steps, ascend=True,
                    reduction="sum")
        return (x + delta).clamp_(0, 1)

    def poison_images(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.apply_uint8(images, lambda x: self.apply(self.perturb(x)))
