"""Trojan (Liu et al., "Trojaning Attack on Neural Networks", NDSS 2018), as A-ABL (paper 001) tests it.

Dirty label. The original trigger is a square (or a watermark) whose pixel values are optimised against a trained
model; unpoison generates it in code instead, with no model and no logo file, so that it is the same everywhere:
- `square` (default): an opaque `size` x `size` patch (default 8x8) in the bottom-right corner, weight 1, whose pixels
  are a fixed pattern: uniform random colours from torch.Generator().manual_seed(pattern_seed).
- `watermark`: the same patch tiled over the whole image and blended at weight `alpha` (default 0.3), the
  semi-transparent full-image variant of the paper's watermark trigger.
Both are static triggers: x' = (1 - w) * x + w * p.
"""

from __future__ import annotations

import torch

from ..errors import UnpoisonError
from .base import StaticTrigger


def random_patch(c: int, size: int, pattern_seed: int) -> torch.Tensor:
    """The Trojan square's pixels: uniform random colours (c, size, size) from torch.Generator().manual_seed(pattern_seed)."""
    return torch.rand(c, size, size, generator=torch.Generator().manual_seed(pattern_seed))


class Trojan(StaticTrigger):
    """A fixed random-colour square in the bottom-right corner, or that square tiled as a semi-transparent watermark."""

    name = "trojan"
    defaults = {"size": 8, "variant": "square", "alpha": 0.3, "pattern_seed": 0}

    def check(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise UnpoisonError(f"trojan size {self.size!r} is not a positive integer; give the patch side in pixels, e.g. 8")
        if self.variant not in ("square", "watermark"):
            raise UnpoisonError(f"trojan variant {self.variant!r} is unknown; choose 'square' or 'watermark'")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not 0 < self.alpha <= 1:
            raise UnpoisonError(f"trojan alpha {self.alpha!r} is outside (0, 1]; give the watermark's weight, e.g. 0.3")
        if not isinstance(self.pattern_seed, int) or isinstance(self.pattern_seed, bool):
            raise UnpoisonError(f"trojan pattern_seed {self.pattern_seed!r} is not an integer; give an integer seed")

    def pattern(self, c: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.size > min(h, w):
            raise UnpoisonError(f"trojan patch size {self.size} exceeds the {h}x{w} images; choose a size of at most {min(h, w)}")
        patch = random_patch(c, self.size, self.pattern_seed)
        if self.variant == "watermark":
            reps = (-(-h // self.size), -(-w // self.size))
            return patch.repeat(1, *reps)[:, :h, :w], torch.full((1, 1, 1), float(self.alpha))
        p, weight = torch.zeros(c, h, w), torch.zeros(1, h, w)
        p[:, h - self.size :, w - self.size :] = patch
        weight[:, h - self.size :, w - self.size :] = 1
        return p, weight
