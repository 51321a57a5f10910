"""Adaptive-Blend (Qi et al., "Revisiting the Assumption of Latent Separability for Backdoor Defenses", ICLR 2023), as
backdoor-toolbox implements it (`poison_tool_box/adaptive_blend.py`).

Dirty label, with cover samples. The blend pattern p (as Blend: uniform noise from `pattern_seed`, or `picture`, a
bundled picture such as `present`, which stands in for the paper's Hello Kitty, or an image file) is cut into `pieces`
(default 16, a 4 x 4 grid) equal squares; every training image, poison or cover, gets its own random choice of
round(mask_rate * pieces) pieces (mask_rate 0.5) masked out and the rest blended at `alpha` (0.2): x' = x + alpha * m
* (p - x). Poison samples are relabelled to the target; round(cover_rate * N) further samples (cover_rate 0.01, any
class, disjoint from the poison) keep their labels. At test time the whole pattern is blended at `test_alpha` (0.2).
Defaults are backdoor-toolbox's (`poison_generator` and `poison_transform` signatures); the paper's CIFAR-10 runs use
poison and cover rates of 0.003. The masks follow the poison seed; the pattern does not.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from ..errors import UnpoisonError
from .blend import Blend


class AdaptiveBlend(Blend):
    """Blend pattern in pieces, half of them masked per training image; cover samples keep their labels; full at test."""

    name = "adaptive_blend"
    defaults = {"alpha": 0.2, "test_alpha": 0.2, "pieces": 16, "mask_rate": 0.5, "cover_rate": 0.01,
                "pattern_seed": 0, "picture": None, "pattern_path": None}

    def check(self) -> None:
        super().check()
        if not isinstance(self.test_alpha, numbers.Real) or isinstance(self.test_alpha, bool) or not 0 < self.test_alpha <= 1:
            raise UnpoisonError(f"adaptive_blend test_alpha {self.test_alpha!r} is outside (0, 1]; give the test trigger's weight, e.g. 0.2")
        if not isinstance(self.pieces, int) or isinstance(self.pieces, bool) or self.pieces < 1 or math.isqrt(self.pieces) ** 2 != self.pieces:
            raise UnpoisonError(f"adaptive_blend pieces {self.pieces!r} is not a square number; give e.g. 16 (a 4 x 4 grid)")
        if not isinstance(self.mask_rate, numbers.Real) or isinstance(self.mask_rate, bool) or not 0 <= self.mask_rate < 1:
            raise UnpoisonError(f"adaptive_blend mask_rate {self.mask_rate!r} is outside [0, 1); give the share of pieces masked, e.g. 0.5")
        if not isinstance(self.cover_rate, numbers.Real) or isinstance(self.cover_rate, bool) or not 0 <= self.cover_rate < 1:
            raise UnpoisonError(f"adaptive_blend cover_rate {self.cover_rate!r} is outside [0, 1); give a share of the data set such as 0.01")

    def pattern(self, c: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        p, _ = super().pattern(c, h, w)
        return p, torch.full((1, 1, 1), float(self.test_alpha))  # the test trigger: the whole pattern

    def masks(self, n: int, h: int, w: int, rng: np.random.Generator) -> torch.Tensor:
        """(n, 1, h, w): per image, round(mask_rate * pieces) random pieces of the sqrt(pieces)^2 grid set to 0."""
        g = math.isqrt(self.pieces)
        if h % g or w % g:
            raise UnpoisonError(f"adaptive_blend cannot cut {h}x{w} images into {self.pieces} equal pieces; choose pieces whose root divides {h} and {w}")
        k = round(self.mask_rate * self.pieces)
        keep = np.ones((n, self.pieces), dtype=np.float32)
        for row in keep:
            row[rng.choice(self.pieces, size=k, replace=False)] = 0
        grid = torch.from_numpy(keep).view(n, 1, g, g)
        return grid.repeat_interleave(h // g, dim=2).repeat_interleave(w // g, dim=3)

    def poison_images(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n, h, w, c = images.shape
        m = self.masks(n, h, w, rng)
        p, _ = super().pattern(c, h, w)
        masks = m  # consumed chunk by chunk, in the order apply_uint8 hands the images over

        def masked(x: torch.Tensor) -> torch.Tensor:
            nonlocal masks
            mb, masks = masks[: len(x)], masks[len(x) :]
            return x + self.alpha * mb * (p - x)  # Qi et al. 2023 (backdoor-toolbox): x' = x + alpha * m * (p - x)

        return self.apply_uint8(images, masked)

    def cover(self, images: np.ndarray, labels: np.ndarray, is_poison: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.trigger_covers(images, is_poison, rng)
