"""Backdoor attacks: one module per attack over the interface in base.py, built by name or from a spec."""

from __future__ import annotations

from ..errors import UnpoisonError
from .badnets import BadNets
from .base import Attack, Poisoned, StaticTrigger
from .blend import Blend
from .none import NoAttack
from .sig import SIG
from .trojan import Trojan
from .wanet import WaNet

ATTACKS: dict[str, type[Attack]] = {"none": NoAttack, "badnets": BadNets, "blend": Blend, "sig": SIG, "trojan": Trojan, "wanet": WaNet}

__all__ = ["ATTACKS", "Attack", "BadNets", "Blend", "NoAttack", "Poisoned", "SIG", "StaticTrigger", "Trojan", "WaNet", "attack_from_spec", "build_attack"]


def build_attack(name: str, *, target: int, rate: float, seed: int, num_classes: int, **params) -> Attack:
    if name not in ATTACKS:
        raise UnpoisonError(f"unknown attack {name!r}; choose one of: {', '.join(ATTACKS)}")
    return ATTACKS[name](target=target, rate=rate, seed=seed, num_classes=num_classes, **params)


def attack_from_spec(spec: dict) -> Attack:
    """Inverse of Attack.spec(): attack_from_spec(a.spec()) triggers images exactly as a does."""
    keys = ("name", "target", "rate", "seed", "num_classes")
    missing = [k for k in keys if k not in spec]
    if missing:
        raise UnpoisonError(f"attack spec lacks {', '.join(missing)}; give a dict as written by Attack.spec(): {', '.join(keys)}, params")
    extra = sorted(set(spec) - {*keys, "params"})
    if extra:
        raise UnpoisonError(f"attack spec has unknown key(s) {', '.join(extra)}; valid keys: {', '.join(keys)}, params")
    return build_attack(spec["name"], **{k: spec[k] for k in keys[1:]}, **(spec.get("params") or {}))
