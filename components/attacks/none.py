"""No attack: the data set as delivered, nothing injected (`--attack none`).

Used in two ways: to defend a data set that arrived as it is (it may already be poisoned; no ground truth unless the
source carries it), and to measure what a defense costs when nothing is poisoned (the "no attack" row of the
seeds' tables). `poison` returns the data set unchanged; there is no trigger, so ASR is not defined (`test_inputs`
is empty). The target class stays in the spec: target-class accuracy is still reported for it.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data import ImageSet
from .base import Attack, Poisoned


class NoAttack(Attack):
    """No trigger: the data set as delivered, nothing injected."""

    name = "none"
    all_to_all = False

    def __init__(self, *, target: int = 0, rate: float = 0.05, seed: int = 0, num_classes: int, **params):
        # the rate is meaningless here: validate the rest with a placeholder that always passes
        super().__init__(target=target, rate=0.5, seed=seed, num_classes=num_classes, **params)
        self.rate = float(rate)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def poison(self, ds: ImageSet) -> Poisoned:
        n = len(ds)
        return Poisoned(ds, ds.labels.astype(np.int64), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool))

    def test_inputs(self, ds: ImageSet) -> tuple[np.ndarray, np.ndarray]:
        return ds.images[:0], np.zeros(0, dtype=np.int64)
