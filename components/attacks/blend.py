"""Blend (Chen et al., "Targeted Backdoor Attacks on Deep Learning Systems Using Data Poisoning", 2017).

Dirty label. Trigger: x' = (1 - alpha) * x + alpha * p over the whole image, alpha 0.2. The pattern p is
uniform noise in [0, 1] of shape (C, H, W) drawn from torch.Generator().manual_seed(pattern_seed) (default 0,
independent of the poison-selection seed), or, with `pattern_path`, an image file resized to (H, W).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UnpoisonError
from .base import StaticTrigger


class Blend(StaticTrigger):
    """The whole image blended with a fixed pattern (uniform noise or an image file) at weight alpha."""

    name = "blend"
    defaults = {"alpha": 0.2, "pattern_seed": 0, "pattern_path": None}

    def check(self) -> None:
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not 0 < self.alpha <= 1:
            raise UnpoisonError(f"blend alpha {self.alpha!r} is outside (0, 1]; give the pattern's weight, e.g. 0.2")
        if not isinstance(self.pattern_seed, int) or isinstance(self.pattern_seed, bool):
            raise UnpoisonError(f"blend pattern_seed {self.pattern_seed!r} is not an integer; give an integer seed")

    def pattern(self, c: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pattern_path is None:
            p = torch.rand(c, h, w, generator=torch.Generator().manual_seed(self.pattern_seed))
        else:
            from PIL import Image

            try:
                with Image.open(self.pattern_path) as img:
                    img = img.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
            except OSError as e:
                raise UnpoisonError(f"cannot read blend pattern_path {self.pattern_path!r} ({e}); give the path of a readable image file") from e
            p = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).reshape(h, w, -1).permute(2, 0, 1).expand(c, h, w)
        return p, torch.full((1, 1, 1), float(self.alpha))
