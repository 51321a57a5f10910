"""WaNet (Nguyen & Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021).

Dirty label. Trigger: a fixed smooth warping field. From torch.Generator().manual_seed(seed): ins = rand(1, 2, k, k)
* 2 - 1, normalized by its mean absolute value, upsampled bicubic to (H, W); the sampling grid is
(identity + s * ins / size) * grid_rescale, clamped to [-1, 1], applied with grid_sample(align_corners=True).
Noise mode: round(cross_ratio * rate * N) further samples (disjoint from the poison) get the warp plus a
random grid perturbation (rand * 2 - 1) / size, labels kept; these are the cover samples (is_cover).
Defaults k 4, s 0.5, cross_ratio 2, grid_rescale 1 (the paper's CIFAR-10 setting).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UnpoisonError
from .base import Attack


class WaNet(Attack):
    """A fixed smooth warping field; cover samples get the warp plus random noise and keep their labels."""

    name = "wanet"
    defaults = {"k": 4, "s": 0.5, "cross_ratio": 2.0, "grid_rescale": 1.0}

    def check(self) -> None:
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 2:
            raise UnpoisonError(f"wanet k {self.k!r} is not an integer >= 2; give the control grid size, e.g. 4")
        for key in ("s", "cross_ratio", "grid_rescale"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise UnpoisonError(f"wanet {key} {value!r} is not a non-negative number; defaults are s 0.5, cross_ratio 2, grid_rescale 1")

    def grid(self, c: int, h: int, w: int) -> tuple[torch.Tensor]:
        """The warping grid (1, H, W, 2) in grid_sample's (x, y) order."""
        ins = torch.rand(1, 2, self.k, self.k, generator=torch.Generator().manual_seed(self.seed)) * 2 - 1
        ins = ins / ins.abs().mean()
        noise = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        y, x = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        identity = torch.stack((x, y), dim=-1)[None]
        # Nguyen & Tran 2021: warping field = identity + s * upsampled noise; offsets / W for x, / H for y (the paper's images are square)
        return (((identity + self.s * noise / self.scale(h, w)) * self.grid_rescale).clamp(-1, 1),)

    @staticmethod
    def scale(h: int, w: int) -> torch.Tensor:
        return torch.tensor([w, h], dtype=torch.float32)

    def warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return F.grid_sample(x, grid.expand(len(x), -1, -1, -1), align_corners=True).clamp_(0, 1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        (grid,) = self.cached(x, lambda: self.grid(*x.shape[1:]))
        return self.warp(x, grid)

    def cover(self, images: np.ndarray, labels: np.ndarray, is_poison: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n_cover = round(self.cross_ratio * self.rate * len(images))
        pool = np.flatnonzero(~is_poison)
        if n_cover > len(pool):
            raise UnpoisonError(
                f"wanet needs {n_cover} cover samples besides {is_poison.sum()} poison but only {len(pool)} samples remain; lower rate or cross_ratio"
            )
        idx = np.sort(rng.choice(pool, size=n_cover, replace=False))
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))  # the noise grids, deterministic per seed

        def noisy_warp(x: torch.Tensor) -> torch.Tensor:
            (grid,) = self.cached(x, lambda: self.grid(*x.shape[1:]))
            n, _, h, w = x.shape
            jitter = (torch.rand(n, h, w, 2, generator=gen) * 2 - 1) / self.scale(h, w)
            jitter = jitter.to(grid)
            return self.warp(x, (grid + jitter).clamp(-1, 1))

        images[idx] = self.apply_uint8(images[idx], noisy_warp)
        is_cover = np.zeros(len(images), dtype=bool)
        is_cover[idx] = True
        return is_cover
