"""Adaptive-Patch (Qi et al., "Revisiting the Assumption of Latent Separability for Backdoor Defenses", ICLR 2023), as
backdoor-toolbox implements it (`poison_tool_box/adaptive_patch.py`, triggers and weights in `config.py`).

Dirty label, with cover samples. Training uses k patches at partial opacity, one per image: the sorted poison samples
are cut into k consecutive equal groups and group j gets patch j, x' = x + a_j * m_j * (p_j - x); the cover samples
(round(cover_rate * N), default 0.01, any class, disjoint from the poison, labels kept) are grouped the same way.
Test images get other patches at full opacity, all at once. backdoor-toolbox's CIFAR-10 triggers are pictures:
training phoenix_corner, firefox_corner, badnet_patch4, trojan_square at alphas 0.5, 0.2, 0.5, 0.3; test
phoenix_corner2 and badnet_patch4 at alpha 1, 1. unpoison generates them instead: patch j is a `size` x `size`
square (default 4) of random colours from `pattern_seed` + j, training patches 0-3 in the top-left, top-right,
bottom-left and bottom-right corners (phoenix_corner, firefox_corner, badnet_patch4, trojan_square); the test
triggers are patch 0 moved to the image centre (phoenix_corner2: a training pattern at a place never seen in
training) and patch 2 in its training place (badnet_patch4), at `test_alphas`. `alphas` (one per training patch,
up to four) and `test_alphas` (two) default to backdoor-toolbox's values.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from ..errors import UnpoisonError
from .base import Attack

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


class AdaptivePatch(Attack):
    """Four patches at partial opacity in training (one per image), two other patch placements at full opacity at test."""

    name = "adaptive_patch"
    defaults = {"alphas": [0.5, 0.2, 0.5, 0.3], "test_alphas": [1.0, 1.0], "cover_rate": 0.01, "size": 4, "pattern_seed": 0}

    def check(self) -> None:
        for key, most in (("alphas", 4), ("test_alphas", 2)):
            value = getattr(self, key)
            if (not isinstance(value, (list, tuple)) or not 1 <= len(value) <= most
                    or not all(isinstance(a, numbers.Real) and not isinstance(a, bool) and 0 < a <= 1 for a in value)):
                raise UnpoisonError(f"adaptive_patch {key} {value!r} is not a list of 1 to {most} weights in (0, 1]; "
                                    f"defaults are alphas [0.5, 0.2, 0.5, 0.3] and test_alphas [1, 1]")
            setattr(self, key, [float(a) for a in value])
        if not isinstance(self.cover_rate, numbers.Real) or isinstance(self.cover_rate, bool) or not 0 <= self.cover_rate < 1:
            raise UnpoisonError(f"adaptive_patch cover_rate {self.cover_rate!r} is outside [0, 1); give a share of the data set such as 0.01")
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise UnpoisonError(f"adaptive_patch size {self.size!r} is not a positive integer; give the patch side in pixels, e.g. 4")
        if not isinstance(self.pattern_seed, int) or isinstance(self.pattern_seed, bool):
            raise UnpoisonError(f"adaptive_patch pattern_seed {self.pattern_seed!r} is not an integer; give an integer seed")

    def patch(self, j: int, c: int, h: int, w: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch j's pixels (c, h, w) and mask (1, h, w) at a corner or the centre."""
        s = self.size
        if 2 * s > min(h, w):
            raise UnpoisonError(f"adaptive_patch size {s} is too large for {h}x{w} images (four corner patches must not overlap); "
                                f"choose a size of at most {min(h, w) // 2}")
        top = {"top": 0, "bottom": h - s, "center": (h - s) // 2}[where.split("-")[0]]
        left = {"left": 0, "right": w - s, "center": (w - s) // 2}[where.split("-")[-1]]
        p, m = torch.zeros(c, h, w), torch.zeros(1, h, w)
        p[:, top : top + s, left : left + s] = torch.rand(c, s, s, generator=torch.Generator().manual_seed(self.pattern_seed + j))
        m[:, top : top + s, left : left + s] = 1
        return p, m

    def test_triggers(self, c: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
        """Stacked (pattern, mask * alpha) of the test patches: patch 0 at the centre, patch 2 in its corner."""
        placed = [self.patch(0, c, h, w, "center"), self.patch(2, c, h, w, CORNERS[2])][: len(self.test_alphas)]
        return (torch.stack([p for p, _ in placed]), torch.stack([m * a for (_, m), a in zip(placed, self.test_alphas)]))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        ps, ws = self.cached(x, lambda: self.test_triggers(*x.shape[1:]))
        for p, w in zip(ps, ws):
            x = x + w * (p - x)
        return x.clamp_(0, 1)

    def poison_images(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n, h, w, c = images.shape
        k = len(self.alphas)
        group = np.minimum(np.arange(n) * k // max(n, 1), k - 1)  # consecutive equal groups, as backdoor-toolbox
        out = images.copy()
        for j in range(k):
            p, m = self.patch(j, c, h, w, CORNERS[j])
            a = self.alphas[j]
            out[group == j] = self.apply_uint8(images[group == j], lambda x: x + a * m * (p - x))  # x' = x + a_j m_j (p_j - x)
        return out

    def cover(self, images: np.ndarray, labels: np.ndarray, is_poison: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.trigger_covers(images, is_poison, rng)
