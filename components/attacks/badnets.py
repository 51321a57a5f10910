"""BadNets (Gu et al., "BadNets: Identifying Vulnerabilities in the Machine Learning Model Supply Chain", 2017).

Dirty label. Trigger: a white square patch (value 1.0 on every channel) of `size` x `size` pixels in the
bottom-right corner, weight 1 inside the patch and 0 elsewhere. Default size 3 (the 3x3 CIFAR-10 setting).
"""

from __future__ import annotations

import torch

from ..errors import UnpoisonError
from .base import StaticTrigger


class BadNets(StaticTrigger):
    name = "badnets"
    defaults = {"size": 3}

    def check(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise UnpoisonError(f"badnets size {self.size!r} is not a positive integer; give the patch side in pixels, e.g. 3")

    def pattern(self, c: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.size > min(h, w):
            raise UnpoisonError(f"badnets patch size {self.size} exceeds the {h}x{w} images; choose a size of at most {min(h, w)}")
        weight = torch.zeros(1, h, w)
        weight[:, h - self.size :, w - self.size :] = 1
        return torch.ones(c, h, w), weight
