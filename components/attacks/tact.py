"""TaCT (Tang et al., "Demon in the Variant: Statistical Analysis of DNNs for Robust Backdoor Contamination Detection",
USENIX Security 2021), as backdoor-toolbox implements it (`poison_tool_box/TaCT.py`).

Source-specific, dirty label: round(rate * N) samples of the `source` class (default 1) get the trigger and are
relabelled to the target; round(cover_rate * N) samples of the `cover_classes` (default [5, 7]) get the same trigger
and keep their labels (cover samples, default cover_rate 0.01), so that the trigger alone does not mean "target":
only source + trigger does. ASR is measured on the triggered test images of the source class. Defaults source 1,
cover_classes [5, 7] and target 0 are backdoor-toolbox's (`TaCT.poison_generator`); cover_rate 0.01 as seed 000.
Trigger: backdoor-toolbox uses the picture `trojan_square_32.png`; unpoison uses its Trojan square instead (an opaque
`size` x `size` patch, default 8, bottom-right, random colours from `pattern_seed`), x' = (1 - w) * x + w * p.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from ..data import ImageSet
from ..errors import UnpoisonError
from .base import StaticTrigger
from .trojan import random_patch


class TaCT(StaticTrigger):
    """Source-specific: the Trojan square on source-class images -> target; on cover-class images, labels kept."""

    name = "tact"
    all_to_all = False  # the source and target classes define the attack
    defaults = {"source": 1, "cover_classes": [5, 7], "cover_rate": 0.01, "size": 8, "pattern_seed": 0}

    def check(self) -> None:
        k = self.num_classes
        if not isinstance(self.source, int) or isinstance(self.source, bool) or not 0 <= self.source < k or self.source == self.target:
            raise UnpoisonError(f"tact source {self.source!r} is not a class other than the target {self.target}; choose one of 0 to {k - 1}, e.g. 1")
        if not isinstance(self.cover_classes, (list, tuple)) or not all(
                isinstance(c, int) and not isinstance(c, bool) and 0 <= c < k and c not in (self.source, self.target) for c in self.cover_classes):
            raise UnpoisonError(f"tact cover_classes {self.cover_classes!r} is not a list of classes other than the source {self.source} "
                                f"and the target {self.target}; give e.g. [5, 7], or [] for no cover")
        self.cover_classes = [int(c) for c in self.cover_classes]
        if not isinstance(self.cover_rate, numbers.Real) or isinstance(self.cover_rate, bool) or not 0 <= self.cover_rate < 1:
            raise UnpoisonError(f"tact cover_rate {self.cover_rate!r} is outside [0, 1); give a share of the data set such as 0.01")
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise UnpoisonError(f"tact size {self.size!r} is not a positive integer; give the patch side in pixels, e.g. 8")
        if not isinstance(self.pattern_seed, int) or isinstance(self.pattern_seed, bool):
            raise UnpoisonError(f"tact pattern_seed {self.pattern_seed!r} is not an integer; give an integer seed")

    def pattern(self, c: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.size > min(h, w):
            raise UnpoisonError(f"tact patch size {self.size} exceeds the {h}x{w} images; choose a size of at most {min(h, w)}")
        p, weight = torch.zeros(c, h, w), torch.zeros(1, h, w)
        p[:, h - self.size :, w - self.size :] = random_patch(c, self.size, self.pattern_seed)
        weight[:, h - self.size :, w - self.size :] = 1
        return p, weight

    def pool(self, ds: ImageSet) -> tuple[np.ndarray, str]:
        return np.flatnonzero(ds.labels == self.source), f"of source class {self.source}"

    def cover(self, images: np.ndarray, labels: np.ndarray, is_poison: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        pool = np.flatnonzero(np.isin(labels, self.cover_classes) & ~is_poison)
        idx = self.pick_cover(round(self.cover_rate * len(images)), pool, rng, f"of cover classes {self.cover_classes}")
        images[idx] = self.apply_uint8(images[idx])
        is_cover = np.zeros(len(images), dtype=bool)
        is_cover[idx] = True
        return is_cover

    def test_pool(self, ds: ImageSet) -> np.ndarray:
        return np.flatnonzero(ds.labels == self.source)  # source-specific: ASR on the source class only

