"""The attack interface: a trigger as a batched tensor function, and poisoning of an ImageSet with it.

An attack is fixed by its spec (name, target, rate, seed, num_classes, params). `apply` adds the (test-time) trigger
to a float batch (N, C, H, W) in [0, 1]; `poison` picks round(rate * N) samples of `pool` with numpy's
default_rng(seed), triggers them with `poison_images` (the test trigger unless an attack trains on another one) and,
for dirty-label attacks, relabels them; `cover` then modifies cover samples that keep their labels.

Every dirty-label attack (unless it fixes its own source and target, as TaCT does) takes the param `mapping`:
`all2one` (default) relabels every poison sample to the target; `all2all` relabels a sample of class y to
(y + 1) mod K, draws the poison from every class, and measures ASR on every test image against its mapped label
(BadNets' all-to-all setting, Gu et al. 2017; backdoor-toolbox `badnet_all_to_all.py`).

Training budget: an attack that trains a model while it poisons (a surrogate, generators) names the params that
count its epochs in `budget`, their defaults set for `BUDGET` epochs (the CPU protocol's). The protocol's
`attack.epochs` (components/params.py, AttackParams) scales each of them by epochs / BUDGET (`budget_params`), so
one number sets every such attack's training length; a param given in `attack.params` wins. Such an attack's poison
stage asks for a GPU node in the pipelines (pipelines/kfp_pipelines.py, POISON_GPUS).

A static trigger (BadNets, Blend, Trojan) is a pattern and a weight, x' = (1 - w) * x + w * p, written once in
`StaticTrigger`.
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
    is_cover: np.ndarray  # bool: modified but label kept (WaNet's noise samples, TaCT's and the adaptive attacks' covers)


MAPPINGS = ("all2one", "all2all")
BUDGET = 5  # the training budget (epochs) the `budget` params' defaults are set for: the CPU protocol's attack.epochs


class Attack:
    name: ClassVar[str]
    clean_label: ClassVar[bool] = False
    all_to_all: ClassVar[bool] = True  # a dirty-label attack accepts mapping=all2all; False where the attack fixes the labels
    defaults: ClassVar[dict] = {}  # every param of the attack's own, with its default
    budget: ClassVar[tuple[str, ...]] = ()  # the params counting epochs of a model the attack trains; () if none

    @classmethod
    def budget_params(cls, epochs: int | None) -> dict:
        """The `budget` params for a training budget of `epochs` (AttackParams.epochs): each default scaled by
        epochs / BUDGET, rounded, at least 1; {} without a budget or for an attack that trains no model."""
        if epochs is None:
            return {}
        return {key: max(1, round(cls.defaults[key] * epochs / BUDGET)) for key in cls.budget}

    @classmethod
    def declared(cls) -> dict:
        """Every param the attack accepts, with its default: its own and, for a dirty-label attack, `mapping`."""
        return {**cls.defaults, **({"mapping": "all2one"} if cls.all_to_all and not cls.clean_label else {})}

    def __init__(self, *, target: int, rate: float, seed: int, num_classes: int, **params):
        declared = self.declared()
        unknown = sorted(set(params) - set(declared))
        if unknown:
            valid = ", ".join(declared) or "none"
            raise UnpoisonError(f"unknown parameter(s) {', '.join(unknown)} for attack '{self.name}'; valid parameters: {valid}")
        if not isinstance(rate, numbers.Real) or isinstance(rate, bool) or not 0 < rate < 1:
            raise UnpoisonError(f"poison rate {rate!r} is outside (0, 1); give a fraction such as 0.05")
        if not isinstance(target, (int, np.integer)) or isinstance(target, bool) or not 0 <= target < num_classes:
            raise UnpoisonError(f"target class {target!r} does not exist among {num_classes} classes; choose 0 to {num_classes - 1}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise UnpoisonError(f"seed {seed!r} is not an integer; give an integer seed")
        self.target, self.rate, self.seed, self.num_classes = int(target), float(rate), int(seed), int(num_classes)
        for key, default in declared.items():
            setattr(self, key, params.get(key, default))
        if "mapping" in declared and self.mapping not in MAPPINGS:
            raise UnpoisonError(f"attack '{self.name}' mapping {self.mapping!r} is unknown; choose all2one (every poison sample "
                                f"relabelled to the target) or all2all (class y relabelled to (y + 1) mod {self.num_classes})")
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

    @property
    def all2all(self) -> bool:
        return getattr(self, "mapping", "all2one") == "all2all"

    def pool(self, ds: ImageSet) -> tuple[np.ndarray, str]:
        """The samples the poison is drawn from, and how to name them in an error."""
        if self.clean_label:  # poison only target-class samples and keep their labels
            return np.flatnonzero(ds.labels == self.target), f"of target class {self.target}"
        if self.all2all:  # every class has a mapped label
            return np.arange(len(ds)), "in the data set"
        return np.flatnonzero(ds.labels != self.target), f"outside target class {self.target}"

    def poison_labels(self, labels: np.ndarray, num_classes: int) -> np.ndarray:
        """The labels the attacker gives triggered samples of true class `labels` (dirty label)."""
        if self.all2all:
            return (labels.astype(np.int64) + 1) % num_classes  # all-to-all: y -> (y + 1) mod K (Gu et al. 2017)
        return np.full(len(labels), self.target, dtype=np.int64)

    def poison_images(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The training trigger on uint8 images (N, H, W, C); the test trigger `apply` unless the attack trains on another."""
        return self.apply_uint8(images)

    def poison_selected(self, ds: ImageSet, idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The poisoned images of the selected samples ds[idx]: `poison_images` on them, unless the attack needs more
        of the data set than their images (CBA mixes them with images of another class)."""
        return self.poison_images(ds.images[idx], rng)

    def poison(self, ds: ImageSet) -> Poisoned:
        if self.target >= ds.num_classes:
            raise UnpoisonError(f"target class {self.target} does not exist in a data set of {ds.num_classes} classes; choose 0 to {ds.num_classes - 1}")
        n, k = len(ds), round(self.rate * len(ds))
        if k == 0:
            raise UnpoisonError(f"poison rate {self.rate} selects 0 of {n} samples; raise the rate to at least {1 / n:.2g}")
        pool, where = self.pool(ds)
        if k > len(pool):
            kind = "clean-label attack" if self.clean_label else "attack"
            raise UnpoisonError(f"{kind} '{self.name}' needs {k} samples {where} but the data set has {len(pool)}; "
                                f"lower the rate to at most {len(pool) / n:.4g}")
        rng = np.random.default_rng(self.seed)
        idx = np.sort(rng.choice(pool, size=k, replace=False))
        images, labels = ds.images.copy(), ds.labels.copy()
        images[idx] = self.poison_selected(ds, idx, rng)
        if not self.clean_label:
            labels[idx] = self.poison_labels(ds.labels[idx], ds.num_classes)
        is_poison = np.zeros(n, dtype=bool)
        is_poison[idx] = True
        is_cover = self.cover(images, ds.labels, is_poison, rng)
        return Poisoned(ImageSet(images, labels, ds.classes), ds.labels.astype(np.int64), is_poison, is_cover)

    def cover(self, images: np.ndarray, labels: np.ndarray, is_poison: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Modify cover samples of `images` in place (labels kept; `labels` are the clean ones) and return their mask;
        none by default."""
        return np.zeros(len(images), dtype=bool)

    def pick_cover(self, n_cover: int, pool: np.ndarray, rng: np.random.Generator, where: str) -> np.ndarray:
        """n_cover sorted indices drawn from `pool` (samples that are not poison), or a clear error."""
        if n_cover > len(pool):
            raise UnpoisonError(f"attack '{self.name}' needs {n_cover} cover samples {where} but only {len(pool)} remain; "
                                f"lower the rate or the cover rate")
        return np.sort(rng.choice(pool, size=n_cover, replace=False))

    def trigger_covers(self, images: np.ndarray, is_poison: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Cover samples (the adaptive attacks'): `cover_rate` of the set, not poison, get the training trigger in place
        and keep their labels; returns their mask."""
        idx = self.pick_cover(round(self.cover_rate * len(images)), np.flatnonzero(~is_poison), rng, "besides the poison")
        images[idx] = self.poison_images(images[idx], rng)
        is_cover = np.zeros(len(images), dtype=bool)
        is_cover[idx] = True
        return is_cover

    def spec(self) -> dict:
        params = {key: getattr(self, key) for key in self.declared()}
        return {"name": self.name, "target": self.target, "rate": self.rate, "seed": self.seed, "num_classes": self.num_classes, "params": params}

    def test_pool(self, ds: ImageSet) -> np.ndarray:
        """The test images ASR is measured on: those whose true label is not the target (all of them for all2all)."""
        return np.arange(len(ds)) if self.all2all else np.flatnonzero(ds.labels != self.target)

    def test_inputs(self, ds: ImageSet) -> tuple[np.ndarray, np.ndarray]:
        """For ASR: the triggered test images of `test_pool`, and the label the attacker wants for each."""
        keep = self.test_pool(ds)
        return self.apply_uint8(ds.images[keep]), self.poison_labels(ds.labels[keep], ds.num_classes)

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
