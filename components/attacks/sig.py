"""SIG (Barni et al., "A New Backdoor Attack in CNNs by Training Set Corruption Without Label Poisoning", ICIP 2019).

Clean label: only target-class samples are poisoned and their labels are kept. Trigger: a horizontal sinusoid
added to the image, x' = clip(x + v), v(i, j) = delta * sin(2 pi j f / W), the same for every row and channel.
Defaults delta 20/255, f 6 (the paper's CIFAR-10 setting on a 0-255 scale).
"""

from __future__ import annotations

import math

import torch

from ..errors import UnpoisonError
from .base import Attack


class SIG(Attack):
    """Clean label: a horizontal sinusoid added to target-class images, labels kept."""

    name = "sig"
    clean_label = True
    defaults = {"delta": 20 / 255, "f": 6}

    def check(self) -> None:
        for key in ("delta", "f"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise UnpoisonError(f"sig {key} {value!r} is not a positive number; defaults are delta 20/255 and f 6")

    def signal(self, c: int, h: int, w: int) -> tuple[torch.Tensor]:
        j = torch.arange(w, dtype=torch.float64)
        v = self.delta * torch.sin(2 * math.pi * j * self.f / w)  # Barni et al. 2019, sinusoidal signal
        return (v.float().expand(1, h, w),)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        (v,) = self.cached(x, lambda: self.signal(*x.shape[1:]))
        return (x + v).clamp_(0, 1)
