"""The attack interface: a trigger as a batched tensor function, and poisoning of an ImageSet with it.

An attack is fixed by its spec (name, target, rate, seed, num_classes, params). `apply` adds the trigger to a float batch
(N, C, H, W) in [0, 1]; `poison` picks round(rate * N) samples with numpy's default_rng(seed), triggers them
and, for dirty-label attacks, relabels them to the target. A static trigger (BadNets, Blend, Trojan) is a
pattern and a weight, x' = (1 - w) * x + w * p, written once in `StaticTrigger`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import torch

from ..data import ImageSet
from ..errors import UnpoisonError

CHUNK = 4096  # images per batch in apply_uint8: bounds the float copy to 4096 * C*H*W * 4 bytes


@dataclass
class Poisoned:
    dataset: ImageSet  # poisoned images (uint8) and labels as delivered (flipped to the target for dirty-label poison)
    true_label: np.ndarray  # int64, the labels before poisoning
    is_poison: np.ndarray  # bool
    is_cover: np.ndarray  # bool: modified but label kept (WaNet's noise samples); False for every other attack


class Attack:
    name: ClassVar[str]
    clean_label: ClassVar[bool] = False
    defaults: ClassVar[dict] = {}  # every param the attack accepts, with its default

    def __init__(self, *, target: int, rate: float, seed: int, num_classes: int, **params):
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            valid = ", ".join(self.defaults) or "none"
            raise UnpoisonError(f"unknown parameter(s) {', '.join(unknown)} for attack '{self.name}'; valid parameters: {valid}")
        if not isinstance(rate, numbers.Real) or isinstance(rate, bool) or not 0 < rate < 1:
            raise UnpoisonError(f"poison rate {rate!r} is outside (0, 1); give a fraction such as 0.05")
        if not isinstance(target, (int, np.integer)) or isinstance(target, bool) or not 0 <= target < num_classes:
            raise UnpoisonError(f"target class {target!r} does not exist among {num_classes} classes; choose 0 to {num_classes - 1}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise UnpoisonError(f"seed {seed!r} is not an integer; give an integer seed")
        self.target, self.rate, self.seed, self.num_classes = int(target), float(rate), int(seed), int(num_classes)
        for key, default in self.defaults.items():
            setattr(self, key, params.get(key, default))
        self.check()
        self._cache: dict = {}  # tensors derived from the image shape, per (shape, device, dtype)

    def check(self) -> None:
        """Validate the attack's own params (raise UnpoisonError)."""

    def cached(self, x: torch.Tensor, make: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        """The tensors `make()` builds for x's image shape (on the CPU in float32, so they do not depend on the device),
        moved to x's device and dtype; built once per shape, device and dtype."""
        key = (tuple(x.shape[1:]), x.device, x.dtype)
        if key not in self._cache:
            self._cache[key] = tuple(t.to(device=x.device, dtype=x.dtype) for t in make())
        return self._cache[key]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Trigger a float batch (N, C, H, W) in [0, 1]; same shape, clamped to [0, 1]."""
        raise NotImplementedError

    def apply_uint8(self, images: np.ndarray, fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> np.ndarray:
        """uint8 (N, H, W, C) -> uint8 (N, H, W, C) through `fn` (default: apply), in chunks, rounding to the nearest level."""
        fn = fn or self.apply
        out = np.empty_like(images)
        for i in range(0, len(images), CHUNK):
            x = torch.from_numpy(images[i : i + CHUNK]).permute(0, 3, 1, 2).float().div_(255)
            y = fn(x).clamp_(0, 1).mul_(255).round_().to(torch.uint8)
            out[i : i + CHUNK] = y.permute(0, 2, 3, 1).numpy()
        return out

    def poison(self, ds: ImageSet) -> Poisoned:
        if self.target >= ds.num_classes:
            raise UnpoisonError(f"target class {self.target} does not exist in a data set of {ds.num_classes} classes; choose 0 to {ds.num_classes - 1}")
        n, k = len(ds), round(self.rate * len(ds))
        if k == 0:
            raise UnpoisonError(f"poison rate {self.rate} selects 0 of {n} samples; raise the rate to at least {1 / n:.2g}")
        if self.clean_label:  # poison only target-class samples and keep their labels
            pool = np.flatnonzero(ds.labels == self.target)
            if k > len(pool):
                raise UnpoisonError(
                    f"clean-label attack '{self.name}' needs {k} samples of target class {self.target} but the data set has {len(pool)}; "
                    f"lower the rate to at most {len(pool) / n:.4g}"
                )
        else:  # poison samples of other classes and relabel them to the target
            pool = np.flatnonzero(ds.labels != self.target)
            if k > len(pool):
                raise UnpoisonError(f"attack '{self.name}' needs {k} samples outside target class {self.target} but the data set has {len(pool)}; lower the rate")
        rng = np.random.default_rng(self.seed)
        idx = np.sort(rng.choice(pool, size=k, replace=False))
        images, labels = ds.images.copy(), ds.labels.copy()
        images[idx] = self.apply_uint8(ds.images[idx])
        if not self.clean_label:
            labels[idx] = self.target
        is_poison = np.zeros(n, dtype=bool)
        is_poison[idx] = True
        is_cover = self.cover(images, is_poison, rng)
        return Poisoned(ImageSet(images, labels, ds.classes), ds.labels.astype(np.int64), is_poison, is_cover)

    def cover(self, images: np.ndarray, is_poison: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Modify cover samples of `images` in place (labels kept) and return their mask; none by default."""
        return np.zeros(len(images), dtype=bool)

    def spec(self) -> dict:
        params = {key: getattr(self, key) for key in self.defaults}
        return {"name": self.name, "target": self.target, "rate": self.rate, "seed": self.seed, "num_classes": self.num_classes, "params": params}

    def test_inputs(self, ds: ImageSet) -> tuple[np.ndarray, np.ndarray]:
        """For ASR: the triggered test images whose true label is not the target, and the label the attacker wants for each."""
        keep = np.flatnonzero(ds.labels != self.target)
        return self.apply_uint8(ds.images[keep]), np.full(len(keep), self.target, dtype=np.int64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()})"


class StaticTrigger(Attack):
    """An attack whose trigger is a fixed pattern p and weight w of shape (C, H, W) or broadcastable to it."""

    def pattern(self, c: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(pattern, weight) for images of shape (c, h, w), float32 on the CPU, deterministic from the params."""
        raise NotImplementedError

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        p, w = self.cached(x, lambda: self.pattern(*x.shape[1:]))
        return ((1 - w) * x + w * p).clamp_(0, 1)  # x' = (1 - w) * x + w * p
