"""PhysicalBA (Li et al., "Backdoor Attack in the Physical World", ICLR 2021 workshop), after BackdoorBox
(`core/attacks/PhysicalBA.py`), as MeCa (paper 000) tests it.

Dirty label. A picture patch (`picture`, default `logo`, the round matplotlib icon that stands in for MeCa's
Firefox logo; a bundled picture's name or an image file's path) of `size` x `size` pixels (default 8) in the
bottom-right corner, weight 1: x' = (1 - m) * x + m * p, then, on every poisoned training image, a random physical
transformation (BackdoorBox's CIFAR-10 example: ColorJitter(brightness 0.2, contrast 0.2) and RandomAffine(degrees 0,
translate 0.04, scale 0.9-1.1)), so that the model learns the trigger under the changes of a photograph of it:
x'' = T(x'), T = brightness * contrast * affine(angle, shift, scale) with factors drawn per image from the poison
seed (`brightness`, `contrast`, `degrees`, `translate`, `scale`; pixels the affine moves in from outside are black).
Test images get the untransformed patch. BackdoorBox also applies the transformation to every clean training image,
which is the victim's data augmentation and is left to training here.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from ..errors import UnpoisonError
from .base import StaticTrigger
from .pictures import check_picture, load_picture


class PhysicalBA(StaticTrigger):
    """A picture patch (the matplotlib logo) in the corner, randomly colour-jittered, shifted and scaled in training."""

    name = "physical_ba"
    defaults = {"picture": "logo", "size": 8, "brightness": 0.2, "contrast": 0.2, "degrees": 0.0, "translate": 0.04,
                "scale": [0.9, 1.1]}

    def check(self) -> None:
        check_picture(self.picture, "physical_ba picture")
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise UnpoisonError(f"physical_ba size {self.size!r} is not a positive integer; give the patch side in pixels, e.g. 8")
        for key, most in (("brightness", 1), ("contrast", 1), ("degrees", 180), ("translate", 1)):
            value = getattr(self, key)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value <= most:
                raise UnpoisonError(f"physical_ba {key} {value!r} is outside [0, {most}]; defaults are brightness 0.2, "
                                    f"contrast 0.2, degrees 0, translate 0.04")
        if (not isinstance(self.scale, (list, tuple)) or len(self.scale) != 2
                or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and v > 0 for v in self.scale)
                or self.scale[0] > self.scale[1]):
            raise UnpoisonError(f"physical_ba scale {self.scale!r} is not [low, high] with 0 < low <= high; give e.g. [0.9, 1.1]")
        self.scale = [float(v) for v in self.scale]

    def pattern(self, c: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.size
        if s > min(h, w):
            raise UnpoisonError(f"physical_ba patch size {s} exceeds the {h}x{w} images; choose a size of at most {min(h, w)}")
        p, m = torch.zeros(c, h, w), torch.zeros(1, h, w)
        p[:, h - s :, w - s :] = load_picture(self.picture, c, s, s, "physical_ba picture")
        m[:, h - s :, w - s :] = 1
        return p, m

    def transform(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """One random physical transformation per image of x (N, C, H, W)."""
        import torchvision.transforms.functional as TF  # here: importing torchvision costs every stage process ~2 s

        _, _, h, w = x.shape
        out = torch.empty_like(x)
        for i in range(len(x)):
            b = rng.uniform(1 - self.brightness, 1 + self.brightness)
            c = rng.uniform(1 - self.contrast, 1 + self.contrast)
            angle = rng.uniform(-self.degrees, self.degrees)
            shift = [int(round(rng.uniform(-self.translate, self.translate) * n)) for n in (w, h)]
            scale = rng.uniform(*self.scale)
            y = TF.adjust_contrast(TF.adjust_brightness(x[i], b), c)
            out[i] = TF.affine(y, angle=angle, translate=shift, scale=scale, shear=[0.0],
                               interpolation=TF.InterpolationMode.BILINEAR)
        return out

    def poison_images(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.apply_uint8(images, lambda x: self.transform(self.apply(x), rng))
