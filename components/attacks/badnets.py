"""BadNets (Gu et al., "BadNets: Identifying Vulnerabilities in the Machine Learning Model Supply Chain", 2017).

Dirty label. Trigger: a `size` x `size` patch, weight 1 inside and 0 elsewhere, in one of three `style`s:
- `white` (default): value 1.0 on every channel (the seeds' 3x3 white square, 000; 2x2 in 003 with size 2);
- `grid`: a black-and-white checkerboard whose bottom-right pixel is white (ABL's 3x3 "gridTrigger", 004; ABL's
  own 3x3 differs in one pixel: its top-left pixel is black, a checkerboard's is white);
- `random`: uniform random colours from torch.Generator().manual_seed(pattern_seed), the same on every image.
`position`: a corner (`bottom-right`, default; `bottom-left`, `top-right`, `top-left`) or [x, y], the column and row
of the patch's top-left pixel. Default size 3 (the 3x3 CIFAR-10 setting). `mapping=all2all`: see base.py.
"""

from __future__ import annotations

import torch

from ..errors import UnpoisonError
from .base import StaticTrigger

CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")
STYLES = ("white", "grid", "random")


class BadNets(StaticTrigger):
    """A square patch (white, checkerboard or random colours) in a corner or at (x, y), relabelled to the target."""

    name = "badnets"
    defaults = {"size": 3, "position": "bottom-right", "style": "white", "pattern_seed": 0}

    def check(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise UnpoisonError(f"badnets size {self.size!r} is not a positive integer; give the patch side in pixels, e.g. 3")
        if self.style not in STYLES:
            raise UnpoisonError(f"badnets style {self.style!r} is unknown; choose one of: {', '.join(STYLES)}")
        if not isinstance(self.pattern_seed, int) or isinstance(self.pattern_seed, bool):
            raise UnpoisonError(f"badnets pattern_seed {self.pattern_seed!r} is not an integer; give an integer seed")
        if isinstance(self.position, (list, tuple)):
            if len(self.position) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in self.position):
                raise UnpoisonError(f"badnets position {self.position!r} is not [x, y] with two non-negative integers; "
                                    f"give e.g. [2, 5] (column, row of the patch's top-left pixel) or a corner")
            self.position = [int(v) for v in self.position]  # a tuple and a list give the same spec
        elif self.position not in CORNERS:
            raise UnpoisonError(f"badnets position {self.position!r} is unknown; choose one of: {', '.join(CORNERS)}, or [x, y]")

    def corner(self, h: int, w: int, position: str | list | None = None) -> tuple[int, int]:
        """Row and column of the patch's top-left pixel at `position` (default: the attack's)."""
        position = self.position if position is None else position
        if isinstance(position, list):
            x, y = position
            if x + self.size > w or y + self.size > h:
                raise UnpoisonError(f"{self.name} patch of size {self.size} at [x, y] = {position} leaves the {h}x{w} images; "
                                    f"choose x <= {w - self.size} and y <= {h - self.size}")
            return y, x
        top = 0 if position.startswith("top") else h - self.size
        left = 0 if position.endswith("left") else w - self.size
        return top, left

    def pattern_patch(self, c: int) -> torch.Tensor:
        s = self.size
        if self.style == "white":
            return torch.ones(c, s, s)
        if self.style == "grid":
            i, j = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
            return ((s - 1 - i + s - 1 - j) % 2 == 0).float().expand(c, s, s)  # white at the bottom-right pixel
        return torch.rand(c, s, s, generator=torch.Generator().manual_seed(self.pattern_seed))

    def pattern(self, c: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.size > min(h, w):
            raise UnpoisonError(f"badnets patch size {self.size} exceeds the {h}x{w} images; choose a size of at most {min(h, w)}")
        top, left = self.corner(h, w)
        p, weight = torch.zeros(c, h, w), torch.zeros(1, h, w)
        p[:, top : top + self.size, left : left + self.size] = self.pattern_patch(c)
        weight[:, top : top + self.size, left : left + self.size] = 1
        return p, weight
