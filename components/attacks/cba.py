"""CBA, the composite backdoor attack (Lin et al., "Composite Backdoor Attack for Deep Neural Network by Mixing
Existing Benign Features", CCS 2020), after its code (`TemporaryAcc0unt/composite-attack`, `HalfMixer`).

Dirty label, no added pattern: the trigger is the composition of two benign classes. A poison sample is a half-and-
half mix of an image of class `classes[0]` and one of class `classes[1]` (by default the two classes after the target
t, (t + 1) mod K and (t + 2) mod K; the code's CIFAR-10 setting is a = 0, b = 1, target 2), relabelled to the target:
x' = m * x_a + (1 - m) * x_b (the mixer), m = 1 on the first half. The split is vertical (a left, b right) or
horizontal (a top, b bottom) at random, and its line is moved by up to `jitter` pixels (default 3, as HalfMixer's
jitter; HalfMixer also swaps a and b at random and takes each half from a random window of its image, "shake", which
unpoison leaves out: a comes first and each half stays in its place). The poison is drawn from the two classes: a
sample of class a is mixed with a random image of class b and the reverse. Cover samples (round(cover_rate * N),
default 0.05, from any class but the target, disjoint from the poison) are mixes of two images of their own class and
keep their labels (the code's "mix" samples, which stop the mix itself from meaning the target). Test: each test image
of class a mixed with a test image of class b (the j-th of class a with the (j mod n_b)-th of class b), vertical
split, no jitter; `apply` mixes image i of a batch with image i + 1 (mod the batch), vertical split.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from ..data import ImageSet
from ..errors import UnpoisonError
from .base import Attack


class CBA(Attack):
    """Half of an image of class a and half of one of class b, relabelled to the target; same-class mixes as covers."""

    name = "cba"
    all_to_all = False  # the two mixed classes and the target define the attack
    defaults = {"classes": None, "jitter": 3, "cover_rate": 0.05}

    def check(self) -> None:
        k = self.num_classes
        if self.classes is None:
            self.classes = [(self.target + 1) % k, (self.target + 2) % k]
        if (not isinstance(self.classes, (list, tuple)) or len(self.classes) != 2 or self.classes[0] == self.classes[1]
                or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < k and c != self.target for c in self.classes)):
            raise UnpoisonError(f"cba classes {self.classes!r} is not two different classes other than the target {self.target}; "
                                f"give e.g. [1, 2] (0 to {k - 1})")
        self.classes = [int(c) for c in self.classes]
        if not isinstance(self.jitter, int) or isinstance(self.jitter, bool) or self.jitter < 0:
            raise UnpoisonError(f"cba jitter {self.jitter!r} is not a non-negative integer; give the split line's play in pixels, e.g. 3")
        if not isinstance(self.cover_rate, numbers.Real) or isinstance(self.cover_rate, bool) or not 0 <= self.cover_rate < 1:
            raise UnpoisonError(f"cba cover_rate {self.cover_rate!r} is outside [0, 1); give a share of the data set such as 0.05")

    @staticmethod
    def mix(a: np.ndarray, b: np.ndarray, vertical: np.ndarray, line: np.ndarray) -> np.ndarray:
        """uint8 (n, H, W, C): a before the split line (left or top), b after it; line = first row/column of b."""
        n, h, w, _ = a.shape
        rows, cols = np.arange(h)[None, :, None], np.arange(w)[None, None, :]
        first = np.where(vertical[:, None, None], cols < line[:, None, None], rows < line[:, None, None])
        return np.where(first[..., None], a, b)  # Lin et al. 2020 (HalfMixer): x' = m * x_a + (1 - m) * x_b

    def lines(self, n: int, h: int, w: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        vertical = rng.random(n) < 0.5
        line = np.where(vertical, w // 2, h // 2) + rng.integers(-self.jitter, self.jitter + 1, size=n)
        return vertical, line

    def pool(self, ds: ImageSet) -> tuple[np.ndarray, str]:
        return np.flatnonzero(np.isin(ds.labels, self.classes)), f"of classes {self.classes}"

    def poison_selected(self, ds: ImageSet, idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        a, b = self.classes
        pools = {c: np.flatnonzero(ds.labels == c) for c in (a, b)}
        for c, pool in pools.items():
            if len(pool) == 0:
                raise UnpoisonError(f"cba class {c} has no sample in the data set; choose classes present in it")
        mine = ds.labels[idx]
        partner = np.where(mine == a, rng.choice(pools[b], size=len(idx)), rng.choice(pools[a], size=len(idx)))
        first = np.where((mine == a)[:, None, None, None], ds.images[idx], ds.images[partner])  # class a's image first
        second = np.where((mine == a)[:, None, None, None], ds.images[partner], ds.images[idx])
        return self.mix(first, second, *self.lines(len(idx), *ds.images.shape[1:3], rng))

    def cover(self, images: np.ndarray, labels: np.ndarray, is_poison: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        idx = self.pick_cover(round(self.cover_rate * len(images)), np.flatnonzero(~is_poison & (labels != self.target)),
                              rng, "outside the poison and the target class")
        others = ~is_poison
        partner = np.empty(len(idx), dtype=np.int64)
        for j, i in enumerate(idx):  # another image of the cover's class, not poison
            others[i] = False
            partner[j] = rng.choice(np.flatnonzero(others & (labels == labels[i])))
            others[i] = True
        images[idx] = self.mix(images[idx], images[partner], *self.lines(len(idx), *images.shape[1:3], rng))
        is_cover = np.zeros(len(images), dtype=bool)
        is_cover[idx] = True
        return is_cover

    def test_pool(self, ds: ImageSet) -> np.ndarray:
        return np.flatnonzero(ds.labels == self.classes[0])

    def test_inputs(self, ds: ImageSet) -> tuple[np.ndarray, np.ndarray]:
        keep, partners = self.test_pool(ds), np.flatnonzero(ds.labels == self.classes[1])
        if len(keep) == 0 or len(partners) == 0:
            return ds.images[:0], np.zeros(0, dtype=np.int64)
        b = ds.images[partners[np.arange(len(keep)) % len(partners)]]
        h, w = ds.images.shape[1:3]
        mixed = self.mix(ds.images[keep], b, np.ones(len(keep), bool), np.full(len(keep), w // 2))
        return mixed, np.full(len(keep), self.target, dtype=np.int64)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1]
        return torch.cat([x[..., : w // 2], x.roll(-1, dims=0)[..., w // 2 :]], dim=-1)
