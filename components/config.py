"""Typed run configuration: protocol YAML files, per-method defaults from the papers, `--set key=value` overrides.

Every model forbids unknown keys, so a typo is an error instead of a silently ignored setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from components.errors import UnpoisonError


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


class AttackParams(Strict):
    name: str = "badnets"
    target: int = Field(0, ge=0)
    rate: float = 0.05
    seed: int = 0
    params: dict[str, Any] = {}  # attack-specific, e.g. {"alpha": 0.2} for blend

    @field_validator("rate")
    @classmethod
    def _rate(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError(f"poison rate {v} is outside (0, 1); set attack.rate to a share such as 0.05")
        return v


class MecaParams(Strict):
    """MeCa (paper 000). The paper gives no values for eps, r, gamma or E_b: these are chosen once (DESIGN.md's
    laptop-scale measurements) and never tuned per attack."""

    eps: float = Field(0.1, gt=0)  # perturbation radius of delta (Eq. 3)
    patch: int = Field(8, ge=1)  # side r of the random square mask m
    gamma: float = Field(0.1, gt=0, lt=1)  # round e keeps p = 1 - (e+1) gamma of D_u for learning (Algorithm 2)
    rounds: int = Field(3, ge=1)  # E_b: 3, not 5: at 5 rounds Blend's backdoor collapses (DESIGN.md)
    learn_epochs: int = Field(1, ge=1)  # learning epochs per round on the kept part (after round 0)
    unlearn_epochs: int = Field(1, ge=1)
    unlearn_lr: float = Field(0.01, gt=0)
    unlearn_ceiling: float = Field(5.0, gt=0)  # per-sample CE above which ascent stops (safeguard)
    learn_lr: float = Field(0.01, gt=0)
    score_batch: int = Field(512, ge=1)
    finetune_epochs: int = Field(3, ge=0)  # section 4.2.4: relabel and fine-tune on the whole relabelled set
    finetune_lr: float = Field(0.01, gt=0)


class AablParams(Strict):
    """A-ABL (paper 001, section 6's settings). Stage 1 is the warm-up (the protocol's training with the `warmup`
    overrides), stage 2 scores every sample with the SCE of its iFGSM adversarial example and splits at Otsu's
    threshold, stage 3 is PGD adversarial training from scratch on the vulnerable part (the final training with the
    `final` overrides)."""

    warmup: dict[str, Any] = {}  # overrides of `train` for stage 1 (paper protocol: Adam, lr 1e-3, 20 epochs)
    score_eps: float | None = Field(None, gt=0)  # iFGSM budget; None: 2/255 for images up to 32 px, 1/255 above
    score_step: float = Field(2 / 255, gt=0)
    score_steps: int = Field(5, ge=1)
    sce_alpha: float = Field(0.1, ge=0)  # SCE = alpha CE + beta RCE (Wang et al. 2019's CIFAR-10 values)
    sce_beta: float = Field(1.0, ge=0)
    otsu_bins: int = Field(256, ge=2)
    adv_eps: float = Field(8 / 255, gt=0)  # stage 3, Eq. 1's inner max: PGD, eps 8/255, step 2/255, 10 steps
    adv_step: float = Field(2 / 255, gt=0)
    adv_steps: int = Field(10, ge=1)
    final: dict[str, Any] = {}  # overrides of the final training (paper protocol: 100 epochs, lr 0.1, /10 at 50/75/90)
    ra_eps: float = Field(8 / 255, gt=0)  # robust accuracy: PGD-10, eps 8/255, step 2/255 (section 6)
    ra_step: float = Field(2 / 255, gt=0)
    ra_steps: int = Field(10, ge=1)
    score_batch: int = Field(512, ge=1)

    @model_validator(mode="after")
    def _overrides(self):
        for key in ("warmup", "final"):
            unknown = sorted(set(getattr(self, key)) - set(TrainParams.model_fields))
            if unknown:
                raise ValueError(f"unknown key '{unknown[0]}' in aabl.{key}; it takes the keys of train")
        return self


class RunConfig(Strict):
    protocol: Literal["cpu", "paper", "custom"] = "cpu"
    data: str = "sample"
    train_limit: int | None = Field(None, ge=1)  # use only the first N training images (CPU protocol: 10,000)
    model: str = "small_cnn"
    seed: int = 0  # model initialisation and every random choice of the defense
    device: Literal["auto", "cpu", "cuda"] = "auto"
    attack: AttackParams = AttackParams()
    train: TrainParams = TrainParams()  # warm-up / no-defense training, and the base of the final training
    final: dict[str, Any] = {}  # overrides of `train` for a defense's final training only, e.g. {"lr": 0.05}
    meca: MecaParams = MecaParams()
    aabl: AablParams = AablParams()

    @model_validator(mode="after")
    def _final(self):
        self.final_params()  # an unknown or bad key fails here, naming it
        self.aabl_warmup_params(), self.aabl_final_params()
        return self

    def aabl_warmup_params(self) -> TrainParams:
        return aabl_params(self.train.model_copy(update={"seed": self.seed}), self.final, self.aabl, "warmup")

    def aabl_final_params(self) -> TrainParams:
        return aabl_params(self.train.model_copy(update={"seed": self.seed}), self.final, self.aabl, "final_train")

    def final_params(self) -> TrainParams:
        return final_params(self.train, self.final)


def final_params(train: TrainParams, overrides: dict[str, Any]) -> TrainParams:
    """The final training's parameters: `train` with the `final` overrides (validated like `train`)."""
    return TrainParams.model_validate({**train.model_dump(), **overrides})


def aabl_params(train: TrainParams, final: dict[str, Any], aabl: AablParams, stage: str) -> TrainParams:
    """A-ABL's training parameters: stage 1 (`warmup`) is `train` with `aabl.warmup`; stage 3 and Adv. Train
    (`final_train`) are the final training (`train` with `final`) with `aabl.final`."""
    if stage == "warmup":
        return final_params(train, aabl.warmup)
    return final_params(final_params(train, final), aabl.final)


PROTOCOL_DIR = Path(__file__).resolve().parent.parent / "pipelines" / "configs"


def parse_value(text: str) -> Any:
    """`--set` values are YAML scalars or lists: 0.1, true, [50, 75], blend."""
    return yaml.safe_load(text)


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
