"""BppAttack (Wang et al., "BppAttack: Stealthy and Efficient Trojan Attacks against Deep Neural Networks via Image
Quantization and Contrastive Adversarial Learning", CVPR 2022).

Dirty label. Trigger: colour-depth squeeze of every channel to `squeeze_num` levels (default 8, BackdoorBench
`config/attack/bpp/default.yaml`), v' = round(v / 255 * (q - 1)) / (q - 1) * 255, with Floyd-Steinberg error
diffusion (`dithering`, default on: the paper's stealthy trigger; BackdoorBench's default.yaml turns it off) in
BackdoorBench's order: pixels in raster order, the quantisation error passed on 7/16 right, 1/16 down-right,
5/16 down, 3/16 down-left, unclipped. Every output value is one of the q levels, with or without dithering.
Not implemented: the paper's contrastive adversarial negative samples (neg_ratio 0.1), which need the victim model
during training (a training-control attack); as a poisoning attack Bpp is the quantised poison alone.
"""

from __future__ import annotations

import torch

from ..errors import UnpoisonError
from .base import Attack


class Bpp(Attack):
    """Colour-depth squeeze to q levels per channel (Floyd-Steinberg dithered by default), relabelled to the target."""

    name = "bpp"
    defaults = {"squeeze_num": 8, "dithering": True}

    def check(self) -> None:
        if not isinstance(self.squeeze_num, int) or isinstance(self.squeeze_num, bool) or not 2 <= self.squeeze_num <= 255:
            raise UnpoisonError(f"bpp squeeze_num {self.squeeze_num!r} is not an integer in [2, 255]; give the colour levels per channel, e.g. 8")
        if not isinstance(self.dithering, bool):
            raise UnpoisonError(f"bpp dithering {self.dithering!r} is not true or false; give true (Floyd-Steinberg) or false (plain squeeze)")

    def squeeze(self, v: torch.Tensor) -> torch.Tensor:
        q = self.squeeze_num - 1
        return torch.round(v / 255 * q) / q * 255  # Wang et al. 2022, Sec. 3.2: quantisation to squeeze_num levels

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        v = x.double() * 255
        if not self.dithering:
            return (self.squeeze(v) / 255).to(x.dtype)
        _, _, h, w = v.shape
        for y in range(h):  # Floyd-Steinberg error diffusion, all images and channels at once
            for i in range(w):
                new = self.squeeze(v[:, :, y, i])
                err = v[:, :, y, i] - new
                v[:, :, y, i] = new
                if i + 1 < w:
                    v[:, :, y, i + 1] += err * (7 / 16)
                if y + 1 < h:
                    if i + 1 < w:
                        v[:, :, y + 1, i + 1] += err * (1 / 16)
                    v[:, :, y + 1, i] += err * (5 / 16)
                    if i >= 1:
                        v[:, :, y + 1, i - 1] += err * (3 / 16)
        return (v / 255).clamp_(0, 1).to(x.dtype)
