"""Refool (Liu et al., "Reflection Backdoor: A Natural Backdoor Attack on Deep Neural Networks", ECCV 2020), after
BackdoorBox (`core/attacks/Refool.py`, `blend_images`).

Clean label: only target-class samples are poisoned and they keep their labels. The trigger is a reflection: a
photograph r, resized to the image, seen through a kernel k and added to the image, x_adv = x + x_R (x) k (Eq. 1 of
the paper), computed as BackdoorBox does in linear light (gamma 2.2) with transmission weight 1 - alpha:
x' = ((1 - alpha) x^2.2 + alpha (r (x) k)^2.2)^(1/2.2). `mode` picks k: `ghost` (default; a two-pulse kernel:
r (x) k = ghost_alpha * r + (1 - ghost_alpha) * r shifted by `offset` [dy, dx] pixels, both windows cut from the
photograph resized to (H + dy, W + dx)) or `blur` (out of focus: a Gaussian blur of std `sigma`). Defaults alpha 0.3
(BackdoorBox draws 1 - alpha_t from U(0.05, 0.45)), offset [3, 3] and ghost_alpha 0.3 (BackdoorBox draws U(3, 8)
and 0.15-0.5 per image), sigma 1.5 (U(1, 5)). Unpoison keeps these fixed and leaves out BackdoorBox's overflow
correction and vignette mask of the blur mode.
Pictures: the paper and BSD (003) take reflections from PascalVOC images; unpoison uses the photographs its
dependencies ship (`reflections`, default [hopper, china, flower]: components/attacks/pictures.py) or image files.
Every poisoned training image gets one of them at random (poison seed); test image i of a batch gets reflection
i mod len(reflections).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from ..errors import UnpoisonError
from .base import Attack
from .pictures import check_picture, load_picture

MODES = ("ghost", "blur")
GAMMA = 2.2


class Refool(Attack):
    """Clean label: a reflection photograph (ghosted or blurred) blended into target-class images, labels kept."""

    name = "refool"
    clean_label = True
    defaults = {"reflections": ["hopper", "china", "flower"], "mode": "ghost", "alpha": 0.3, "offset": [3, 3],
                "ghost_alpha": 0.3, "sigma": 1.5}

    def check(self) -> None:
        if not isinstance(self.reflections, (list, tuple)) or not self.reflections:
            raise UnpoisonError(f"refool reflections {self.reflections!r} is not a list of pictures; give e.g. [hopper, china]")
        for r in self.reflections:
            check_picture(r, "refool reflection")
        self.reflections = list(self.reflections)
        if self.mode not in MODES:
            raise UnpoisonError(f"refool mode {self.mode!r} is unknown; choose one of: {', '.join(MODES)}")
        for key in ("alpha", "ghost_alpha"):
            value = getattr(self, key)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 < value <= 1:
                raise UnpoisonError(f"refool {key} {value!r} is outside (0, 1]; defaults are alpha 0.3 and ghost_alpha 0.3")
        if (not isinstance(self.offset, (list, tuple)) or len(self.offset) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in self.offset)):
            raise UnpoisonError(f"refool offset {self.offset!r} is not [dy, dx] with two non-negative integers; give e.g. [3, 3]")
        self.offset = [int(v) for v in self.offset]
        if not isinstance(self.sigma, numbers.Real) or isinstance(self.sigma, bool) or self.sigma <= 0:
            raise UnpoisonError(f"refool sigma {self.sigma!r} is not a positive number; give the blur's std in pixels, e.g. 1.5")

    def reflection(self, source: str, c: int, h: int, w: int) -> torch.Tensor:
        """r (x) k for one photograph: (c, h, w) in [0, 1]."""
        if self.mode == "ghost":
            dy, dx = self.offset
            r = load_picture(source, c, h + dy, w + dx, "refool reflection")
            return self.ghost_alpha * r[:, :h, :w] + (1 - self.ghost_alpha) * r[:, dy:, dx:]
        r = load_picture(source, c, h, w, "refool reflection")
        import torchvision.transforms.functional as TF  # here: importing torchvision costs every stage process ~2 s

        size = int(2 * math.ceil(2 * self.sigma) + 1)  # BackdoorBox's kernel size
        return TF.gaussian_blur(r[None], [size, size], [float(self.sigma)] * 2)[0]

    def layers(self, c: int, h: int, w: int) -> tuple[torch.Tensor]:
        """(R, c, h, w): every reflection layer, in linear light and weighted by alpha."""
        return (torch.stack([self.reflection(s, c, h, w) for s in self.reflections]).clamp(0, 1) ** GAMMA * self.alpha,)

    def blend(self, x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        (layers,) = self.cached(x, lambda: self.layers(*x.shape[1:]))
        # Liu et al. 2020, Eq. 1: x_adv = x + x_R (x) k, in linear light with transmission weight 1 - alpha
        return ((1 - self.alpha) * x ** GAMMA + layers[which]) ** (1 / GAMMA)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.blend(x, torch.arange(len(x)) % len(self.reflections)).clamp_(0, 1)

    def poison_images(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        which = torch.from_numpy(rng.integers(len(self.reflections), size=len(images)))

        def random_reflection(x: torch.Tensor) -> torch.Tensor:
            nonlocal which
            mine, which = which[: len(x)], which[len(x) :]  # consumed chunk by chunk, in apply_uint8's order
            return self.blend(x, mine)

        return self.apply_uint8(images, random_reflection)
