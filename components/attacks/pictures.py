"""Pictures for picture triggers, taken from files that installed packages ship inside their wheels (nothing is
downloaded at run time), or from an image file the user names.

The seeds' attacks blend or stamp pictures that no package ships; each is replaced by a bundled picture:
- `present` (matplotlib `mpl-data/sample_data/Minduka_Present_Blue_Pack.png`, a blue gift box, clip art on a
  transparent background, composited on white): replaces Hello Kitty (Blend, Adaptive-Blend; seeds 000, 001, 003).
- `logo` (matplotlib `mpl-data/images/matplotlib_large.png`, the round, colourful matplotlib icon, composited on
  white): replaces the Firefox logo (PhysicalBA, seed 000).
- `hopper` (matplotlib `mpl-data/sample_data/grace_hopper.jpg`, a portrait), `china` and `flower` (scikit-learn
  `datasets/images/china.jpg`, `flower.jpg`, a temple and a flower): natural photographs that replace Refool's
  PascalVOC reflection images (seeds 002, 003).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from ..errors import UnpoisonError

PICTURES = {  # name: (package, file inside the package)
    "present": ("matplotlib", "mpl-data/sample_data/Minduka_Present_Blue_Pack.png"),
    "logo": ("matplotlib", "mpl-data/images/matplotlib_large.png"),
    "hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
}


def picture_file(name: str) -> Path:
    """The file of a bundled picture, found without importing its package."""
    package, inside = PICTURES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UnpoisonError(f"picture '{name}' comes with the package {package}, which is not installed; "
                            f"install unpoison's dependencies (pip install -e .)")
    return Path(list(spec.submodule_search_locations)[0]) / inside


def load_picture(source: str, c: int, h: int, w: int, what: str) -> torch.Tensor:
    """A bundled picture (by name) or an image file (by path) as float32 (c, h, w) in [0, 1], resized bilinearly to
    (h, w); a bundled picture with transparency is composited on white first. `what` names the param in errors."""
    from PIL import Image

    bundled = source in PICTURES
    path = picture_file(source) if bundled else source
    try:
        with Image.open(path) as img:
            if bundled and img.mode in ("RGBA", "LA", "P"):
                img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
            img = img.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
    except OSError as e:
        raise UnpoisonError(f"cannot read {what} {source!r} ({e}); give one of the bundled pictures "
                            f"({', '.join(PICTURES)}) or the path of a readable image file") from e
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).reshape(h, w, -1).permute(2, 0, 1).expand(c, h, w)


def check_picture(source, what: str) -> None:
    """`source` is a bundled picture's name or a path string (the file is read, and checked, when the trigger is made)."""
    if not isinstance(source, str) or not source:
        raise UnpoisonError(f"{what} {source!r} is not a picture; give one of the bundled pictures "
                            f"({', '.join(PICTURES)}) or the path of an image file")
