"""The typed parameters every defense shares: one training run of the engine and the attack to inject.

Every model forbids unknown keys, so a typo is an error instead of a silently ignored setting. A defense's own
parameters live in its module (components/defenses/<name>.py) and join the run configuration through the registry.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TrainParams(Strict):
    """One training run of the engine. Defaults are the CPU reference protocol of DESIGN.md."""

    epochs: int = Field(10, ge=0)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["onecycle", "cosine", "step", "constant"] = "onecycle"
    milestones: list[int] = []  # epochs at which the step schedule divides lr by 10
    augment: Literal["none", "flip", "crop_flip"] = "flip"
    grad_clip: float | None = None
    bf16: bool = True  # CUDA only
    channels_last: bool = True
    compile: bool = False  # torch.compile the model, once per architecture (engine.compiled); for GPU runs
    seed: int = 0
    checkpoint_every: int = Field(1, ge=0)  # epochs between a stage's checkpoints (components/checkpoint.py); 0: none


class AttackParams(Strict):
    name: str = "badnets"
    target: int = Field(0, ge=0)
    rate: float = 0.05
    seed: int = 0
    params: dict[str, Any] = {}  # attack-specific, e.g. {"alpha": 0.2} for blend
    # the training budget of an attack that trains a model while it poisons: epochs of its surrogate or generator
    # (components/attacks/base.py, Attack.budget_params); a protocol sets it, `params` overrides it param by param;
    # None: the attack's own defaults. An attack that trains no model ignores it.
    epochs: int | None = Field(None, ge=1)

    @field_validator("rate")
    @classmethod
    def _rate(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError(f"poison rate {v} is outside (0, 1); set attack.rate to a share such as 0.05")
        return v


def final_params(train: TrainParams, overrides: dict[str, Any]) -> TrainParams:
    """The final training's parameters: `train` with the `final` overrides (validated like `train`)."""
    return TrainParams.model_validate({**train.model_dump(), **overrides})


def check_overrides(section: str, **overrides: dict[str, Any]) -> None:
    """A defense's overrides of `train` (e.g. `aabl.warmup`) take the keys of `train` with valid values; the error names
    the key and the section."""
    for key, value in overrides.items():
        unknown = sorted(set(value) - set(TrainParams.model_fields))
        if unknown:
            raise ValueError(f"unknown key '{unknown[0]}' in {section}.{key}; it takes the keys of train")
        final_params(TrainParams(), value)  # a bad value fails here, naming it
