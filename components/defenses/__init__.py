"""The defenses: one module each (algorithm, parameters, stage functions, declaration), and the registry.

Adding a defense is one module that declares a `Defense` (components/defenses/base.py) and one entry here. A
defense kept outside this package (a user's own, or a test's) joins the registry by name through the environment:
UNPOISON_DEFENSES="my_package.my_defense" imports that module and registers its `DEFENSE` on the first lookup of
a name the registry does not hold, in this process and in every KFP component process it starts.
"""

from __future__ import annotations

import importlib
import os

from components.defenses import aabl, abl, abm, bsd, lfd, meca, none
from components.defenses.base import Defense
from components.errors import UnpoisonError

REGISTRY: dict[str, Defense] = {d.name: d for d in (none.DEFENSE, meca.DEFENSE, aabl.DEFENSE, aabl.ADV_TRAIN, abl.DEFENSE,
                                                 lfd.DEFENSE, abm.DEFENSE, bsd.DEFENSE)}


def get(name: str) -> Defense:
    if name not in REGISTRY:
        for module in filter(None, os.environ.get("UNPOISON_DEFENSES", "").split(",")):
            defense = importlib.import_module(module.strip()).DEFENSE
            REGISTRY.setdefault(defense.name, defense)
    if name not in REGISTRY:
        raise UnpoisonError(f"unknown defense '{name}'; choose one of: {', '.join(REGISTRY)}")
    return REGISTRY[name]
