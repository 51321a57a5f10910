"""Typed run configuration: protocol YAML files, the shared sections, each defense's own section, `--set key=value`
overrides.

The shared sections (`data`, `model`, `seed`, `attack`, `train`, `final`, ...) are `SharedConfig`; every registered
defense adds its parameter section (MeCa's `meca`, A-ABL's `aabl`) from its own module, so adding a defense edits
nothing here. Every model forbids unknown keys, so a typo is an error instead of a silently ignored setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, create_model, model_validator

from components.defenses import REGISTRY
from components.errors import UnpoisonError
from components.params import AttackParams, Strict, TrainParams, final_params

__all__ = ["AttackParams", "RunConfig", "SharedConfig", "TrainParams", "final_params", "load_config", "parse_overrides",
           "parse_value", "set_path"]


class SharedConfig(Strict):
    protocol: Literal["cpu", "paper", "custom"] = "cpu"
    data: str = "sample"
    train_limit: int | None = Field(None, ge=1)  # use only the first N training images (CPU protocol: 10,000)
    model: str = "small_cnn"
    seed: int = 0  # model initialisation and every random choice of the defense
    device: Literal["auto", "cpu", "cuda"] = "auto"
    attack: AttackParams = AttackParams()  # name "none": the data set as delivered, nothing injected
    train: TrainParams = TrainParams()  # warm-up / no-defense training, and the base of the final training
    final: dict[str, Any] = {}  # overrides of `train` for a defense's final training only, e.g. {"lr": 0.05}

    @model_validator(mode="after")
    def _final(self):
        self.final_params()  # an unknown or bad key of `final` fails here, naming it
        return self

    def final_params(self) -> TrainParams:
        return final_params(self.train, self.final)


# The shared sections plus one section per registered defense that has parameters (a defense declares its section).
RunConfig = create_model("RunConfig", __base__=SharedConfig,
                         **{d.section: (d.params, d.params()) for d in REGISTRY.values()
                            if d.section and d.params is not None})
SHARED_KEYS = tuple(SharedConfig.model_fields)


PROTOCOL_DIR = Path(__file__).resolve().parent.parent / "pipelines" / "configs"


def parse_value(text: str) -> Any:
    """`--set` values are YAML scalars or lists: 0.1, true, [50, 75], blend."""
    return yaml.safe_load(text)


def parse_overrides(pairs: list[str], **shortcuts) -> dict:
    """`--set key=value` pairs as {dotted key: parsed value}; `shortcuts` (e.g. {"attack.name": ...}) win when given."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UnpoisonError(f"--set '{pair}' is not key=value; write it as e.g. --set train.lr=0.05")
        out[key.strip()] = parse_value(value)
    out.update({k: v for k, v in shortcuts.items() if v is not None})
    return out


def set_path(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise UnpoisonError(f"cannot set '{dotted}': '{key}' is a value, not a section; "
                                f"use a key such as 'train.lr' or 'meca.gamma'")
    node[leaf] = value


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "params" else v
    return out


def load_config(protocol: str = "cpu", overrides: dict[str, Any] | None = None, files: list[Path] = ()) -> RunConfig:
    """Protocol YAML, then extra YAML files, then dotted `key=value` overrides; validated once at the end."""
    path = PROTOCOL_DIR / f"{protocol}.yaml"
    if not path.exists():
        choices = ", ".join(sorted(p.stem for p in PROTOCOL_DIR.glob("*.yaml")))
        raise UnpoisonError(f"unknown protocol '{protocol}'; choose one of: {choices}")
    tree = yaml.safe_load(path.read_text()) or {}
    for f in files:
        if not Path(f).exists():
            raise UnpoisonError(f"config file '{f}' does not exist; pass an existing YAML file to --config")
        tree = _merge(tree, yaml.safe_load(Path(f).read_text()) or {})
    for dotted, value in (overrides or {}).items():
        set_path(tree, dotted, value)
    if isinstance(tree.get("final"), dict) and "final" in tree:
        unknown = sorted(set(tree["final"]) - set(TrainParams.model_fields))
        if unknown:
            raise UnpoisonError(f"unknown config key 'final.{unknown[0]}'; final takes the keys of train "
                                f"({', '.join(TrainParams.model_fields)})")
    return validate(tree, protocol)


def validate(tree: dict, protocol: str = "cpu") -> RunConfig:
    """A RunConfig from a plain tree, a bad key or value reported in one line naming it and the fix."""
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "config"
        if err["type"] == "extra_forbidden":
            raise UnpoisonError(f"unknown config key '{where}'; check the spelling against "
                                f"`unpoison config --protocol {protocol}`") from None
        msg = err["msg"].removeprefix("Value error, ")
        raise UnpoisonError(f"bad value for '{where}': {msg}; fix it in the YAML file or the --set option") from None
