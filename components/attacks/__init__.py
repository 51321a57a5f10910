"""Backdoor attacks: one module per attack over the interface in base.py, built by name or from a spec."""

from __future__ import annotations

from ..errors import UnpoisonError
from .adaptive_blend import AdaptiveBlend
from .adaptive_patch import AdaptivePatch
from .adaptive_pgd import AdaptivePGD
from .badnets import BadNets
from .base import BUDGET, Attack, Poisoned, StaticTrigger
from .blend import Blend
from .bpp import Bpp
from .cba import CBA
from .hybrid import Hybrid
from .input_aware import InputAware
from .lc import LabelConsistent
from .narcissus import Narcissus
from .none import NoAttack
from .physical_ba import PhysicalBA
from .refool import Refool
from .sig import SIG
from .tact import TaCT
from .trojan import Trojan
from .wanet import WaNet

ATTACKS: dict[str, type[Attack]] = {a.name: a for a in (NoAttack, BadNets, Blend, SIG, Trojan, WaNet, Bpp, TaCT, AdaptiveBlend, AdaptivePatch,
                                                        Refool, PhysicalBA, CBA, AdaptivePGD, Hybrid, LabelConsistent, Narcissus,
                                                        InputAware)}

__all__ = ["ATTACKS", "AdaptiveBlend", "AdaptivePGD", "AdaptivePatch", "Attack", "BadNets", "Blend", "Bpp", "CBA", "Hybrid", "InputAware", "LabelConsistent",
           "Narcissus", "NoAttack", "PhysicalBA", "Poisoned", "Refool", "SIG", "StaticTrigger", "TaCT", "Trojan", "WaNet", "attack_from_spec", "build_attack",
           "describe", "from_params", "trains_model"]


def build_attack(name: str, *, target: int, rate: float, seed: int, num_classes: int, **params) -> Attack:
    if name not in ATTACKS:
        raise UnpoisonError(f"unknown attack {name!r}; choose one of: {', '.join(ATTACKS)}")
    return ATTACKS[name](target=target, rate=rate, seed=seed, num_classes=num_classes, **params)


def from_params(attack, num_classes: int) -> Attack:
    """The attack an AttackParams (components/params.py) configures: the params its training budget `attack.epochs`
    sets (Attack.budget_params), then `attack.params`, so that a param given by name wins over the budget."""
    budget = ATTACKS[attack.name].budget_params(attack.epochs) if attack.name in ATTACKS else {}
    return build_attack(attack.name, target=attack.target, rate=attack.rate, seed=attack.seed, num_classes=num_classes,
                        **{**budget, **attack.params})


def trains_model(name: str) -> bool:
    """Whether attack `name` trains a model while it poisons (it has `budget` params): its poison stage wants a GPU."""
    return name in ATTACKS and bool(ATTACKS[name].budget)


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


def describe(name: str) -> str:
    """A few lines on one attack for `unpoison attacks`: its one-line spec, its paper, its label kind and its params with
    their defaults, all read from the attack's class and module docstrings and its declared params."""
    import inspect
    import sys

    cls = ATTACKS[name]
    spec = (inspect.getdoc(cls) or "").splitlines()[0] if cls.__doc__ else ""
    paper = " ".join((sys.modules[cls.__module__].__doc__ or "").strip().split("\n\n")[0].split())  # first paragraph
    kind = "no attack" if name == "none" else "clean label" if cls.clean_label else "dirty label"
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v!r}" for k, v in cls.declared().items()) or "none"
    scaled = ", ".join(f"{k} = {cls.defaults[k]} x attack.epochs / {BUDGET}" for k in cls.budget)
    budget = (f"\n    trains a model while it poisons (a GPU node in the pipelines): {scaled} (attack.epochs: the "
              f"protocol's training budget), unless given in params") if cls.budget else ""
    return f"{name}  ({kind})  {spec}\n    {paper}\n    params: {params}{budget}"
