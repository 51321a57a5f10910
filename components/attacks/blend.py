"""Blend (Chen et al., "Targeted Backdoor Attacks on Deep Learning Systems Using Data Poisoning", 2017).

Dirty label. Trigger: x' = (1 - alpha) * x + alpha * p over the whole image, alpha 0.2. The pattern p is uniform
noise in [0, 1] of shape (C, H, W) drawn from torch.Generator().manual_seed(pattern_seed) (default 0, independent of
the poison-selection seed), or, with `picture`, a bundled picture by name (components/attacks/pictures.py: `present`
stands in for the seeds' Hello Kitty) or an image file by path, resized bilinearly to (H, W). `pattern_path` (an
image file) is the older spelling of `picture=<path>`.
"""

from __future__ import annotations

import torch

from ..errors import UnpoisonError
from .base import StaticTrigger
from .pictures import check_picture, load_picture


class Blend(StaticTrigger):
    """The whole image blended with a fixed pattern (uniform noise, a bundled picture or an image file) at weight alpha."""

    name = "blend"
    defaults = {"alpha": 0.2, "pattern_seed": 0, "picture": None, "pattern_path": None}

    def check(self) -> None:
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not 0 < self.alpha <= 1:
            raise UnpoisonError(f"blend alpha {self.alpha!r} is outside (0, 1]; give the pattern's weight, e.g. 0.2")
        if not isinstance(self.pattern_seed, int) or isinstance(self.pattern_seed, bool):
            raise UnpoisonError(f"blend pattern_seed {self.pattern_seed!r} is not an integer; give an integer seed")
        if self.picture is not None:
            check_picture(self.picture, f"{self.name} picture")
            if self.pattern_path is not None:
                raise UnpoisonError(f"{self.name} has both picture {self.picture!r} and pattern_path {self.pattern_path!r}; "
                                    f"give only picture (a bundled picture's name or an image file's path)")

    def pattern(self, c: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pattern_path is not None:
            p = load_picture(self.pattern_path, c, h, w, f"{self.name} pattern_path")
        elif self.picture is not None:
            p = load_picture(self.picture, c, h, w, f"{self.name} picture")
        else:
            p = torch.rand(c, h, w, generator=torch.Generator().manual_seed(self.pattern_seed))
        return p, torch.full((1, 1, 1), float(self.alpha))
