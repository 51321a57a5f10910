"""Hybrid attack: two attacks' poison in one training set, as ABM (paper 002, Table V) tests BadNets together with
Blend, CBA, SIG or Refool ("10 % each").

The poison rate is the hybrid's total: of k = round(rate * N) poison samples, round(share * k) (share 0.5) come from
the `first` attack (default badnets) and the rest from the `second` (default blend), disjoint: the second attack
draws its poison (and its cover samples, if it has any) only from the samples the first left untouched. ABM's
"10 % each" is rate 0.2, share 0.5. Each attack takes its own params (`first_params`, `second_params`, e.g.
`--set attack.params.second_params.alpha=0.1`), the hybrid's target, and the seed `seed` (first) or `seed + 1`
(second). ASR is measured with the trigger named by `asr_on`: `first` (default), `second`, or `both` (every test
image of each attack's test pool once with each trigger, so ASR is the mean of the two when the pools are equal);
`apply` is the trigger of `asr_on` (the first's for `both`).
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from ..data import ImageSet
from ..errors import UnpoisonError
from .base import Attack, Poisoned

ASR_ON = ("first", "second", "both")


class Hybrid(Attack):
    """Two attacks' poison sets in one data set (share of the poison from the first, the rest from the second)."""

    name = "hybrid"
    all_to_all = False  # each attack carries its own mapping in its params
    defaults = {"first": "badnets", "first_params": {}, "second": "blend", "second_params": {}, "share": 0.5,
                "asr_on": "first"}

    def check(self) -> None:
        from . import ATTACKS

        for key in ("first", "second"):
            name, params = getattr(self, key), getattr(self, f"{key}_params")
            if name not in ATTACKS or name in ("none", "hybrid"):
                choices = ", ".join(n for n in ATTACKS if n not in ("none", "hybrid"))
                raise UnpoisonError(f"hybrid {key} {name!r} is not an attack to combine; choose one of: {choices}")
            if params is None:
                params = {}
            if not isinstance(params, dict):
                raise UnpoisonError(f"hybrid {key}_params {params!r} is not a mapping of params; give e.g. "
                                    f"--set attack.params.{key}_params.alpha=0.1")
            if "trigger" in ATTACKS[name].defaults and params.get("trigger") is None:
                raise UnpoisonError(f"hybrid {key} {name!r} optimises its trigger while it poisons, and the hybrid's spec "
                                    f"would not keep it; give its trigger in {key}_params, or run {name} alone")
            setattr(self, f"{key}_params", dict(params))
        if not isinstance(self.share, numbers.Real) or isinstance(self.share, bool) or not 0 < self.share < 1:
            raise UnpoisonError(f"hybrid share {self.share!r} is outside (0, 1); give the first attack's share of the poison, e.g. 0.5")
        if self.asr_on not in ASR_ON:
            raise UnpoisonError(f"hybrid asr_on {self.asr_on!r} is unknown; choose one of: {', '.join(ASR_ON)}")
        self.parts = (self.part(0, self.rate), self.part(1, self.rate))  # validates both attacks' params now

    def part(self, i: int, rate: float) -> Attack:
        """The first (i = 0) or second (i = 1) attack at poison rate `rate`, seeded seed + i."""
        from . import build_attack

        key = ("first", "second")[i]
        return build_attack(getattr(self, key), target=self.target, rate=rate, seed=self.seed + i,
                            num_classes=self.num_classes, **getattr(self, f"{key}_params"))

    def poison_parts(self, ds: ImageSet) -> tuple[Poisoned, Poisoned, np.ndarray]:
        """The first attack's Poisoned on the whole set, the second's on the samples the first left untouched, and
        those samples' indices."""
        n, k = len(ds), round(self.rate * len(ds))
        k1 = round(self.share * k)
        if k1 == 0 or k1 == k:
            raise UnpoisonError(f"hybrid poison rate {self.rate} with share {self.share} gives {k1} and {k - k1} of {n} "
                                f"samples to the two attacks; raise the rate or bring the share nearer 0.5")
        first = self.part(0, k1 / n).poison(ds)
        rest = np.flatnonzero(~(first.is_poison | first.is_cover))
        if k - k1 >= len(rest):
            raise UnpoisonError(f"hybrid's second attack needs {k - k1} samples but the first leaves {len(rest)}; lower the rate")
        second = self.part(1, (k - k1) / len(rest)).poison(first.dataset.subset(rest))
        return first, second, rest

    def poison(self, ds: ImageSet) -> Poisoned:
        first, second, rest = self.poison_parts(ds)
        images, labels = first.dataset.images.copy(), first.dataset.labels.copy()
        images[rest], labels[rest] = second.dataset.images, second.dataset.labels
        is_poison, is_cover = first.is_poison.copy(), first.is_cover.copy()
        is_poison[rest] |= second.is_poison
        is_cover[rest] |= second.is_cover
        return Poisoned(ImageSet(images, labels, ds.classes), ds.labels.astype(np.int64), is_poison, is_cover)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.parts[self.asr_on == "second"].apply(x)

    def test_inputs(self, ds: ImageSet) -> tuple[np.ndarray, np.ndarray]:
        if self.asr_on != "both":
            return self.parts[self.asr_on == "second"].test_inputs(ds)
        (xa, ya), (xb, yb) = (p.test_inputs(ds) for p in self.parts)
        return np.concatenate([xa, xb]), np.concatenate([ya, yb])
