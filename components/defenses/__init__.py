"""The defenses: one module each (algorithm, parameters, stage functions, declaration), and the registry.

Adding a defense is one module that declares a `Defense` (components/defenses/base.py) and one entry here.
"""

from __future__ import annotations

from components.defenses import aabl, meca, none
from components.defenses.base import Defense
from components.errors import UnpoisonError

REGISTRY: dict[str, Defense] = {d.name: d for d in (none.DEFENSE, meca.DEFENSE, aabl.DEFENSE, aabl.ADV_TRAIN)}


def get(name: str) -> Defense:
    if name not in REGISTRY:
        raise UnpoisonError(f"unknown defense '{name}'; choose one of: {', '.join(REGISTRY)}")
    return REGISTRY[name]
