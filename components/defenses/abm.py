"""ABM, Anti-Backdoor Model (paper 002): a defender's weak backdoor isolates the poison, a student distilled on it
learns the teacher's backdoor, and the deployed classifier subtracts the student from the teacher (Eq. 4).

1. `teacher`: plain training on the whole set (section IV-B: "no different from the standard model training"), the
   no-defense model itself, so a benchmark reuses the no-defense run.
2. `verification`: the defender trigger Delta (a 2x2 white square in the top-left corner, V-A-3 and Fig. 4) is
   stamped on a share S of the set, whose label becomes the new class K; the verification model has K + 1 outputs and
   trains with Eq. 2: CE on the untouched samples; for S, CE(M(x + Delta), K) + alpha * L2(theta, theta_tri), the
   penultimate activations of the clean image and of its triggered copy, which keeps the defender backdoor weak.
   The defender watches its own trigger (V-B-2c): a model that sends less than `min_obeyed` (half) of the stamped
   set to K has not learned Delta ("excessive repression ... can result in the failure of the implanted backdoor"),
   and is trained again at alpha / 10, at most 3 trainings (`choose_alpha`). On the CPU protocol's small CNN the
   paper's alpha 1000 never implants Delta (3.6 % of a Blend set sent to K after 10 epochs; 100: 58 %).
3. `score`: Delta on every training sample (Algorithm 1, D_3); the verification model's prediction (`trigger_pred`)
   and its probability of K (`trigger_prob`).
4. `partition`: the isolated set D_iso is Algorithm 1's D_4, the samples not sent to K (the attacker's trigger beats
   the defender's), least obedient (lowest `trigger_prob`) first, at most 1 % of the set (V-B-2b, V-C): suspect.
5. `student`: a fresh network distilled from the frozen teacher on D_iso only (Eq. 3, labels unused).
6. `composite`: f_t(x) - delta * ReLU(f_s(x) - gamma * A) (Eq. 4; components/models.py, AntiBackdoorModel), one
   artifact that `artifacts.load_model` loads as one module: ACC and ASR are the composite's, beside the teacher's.

Reading of the paper (notes: defenses-wave2.md, section 1.2; NG = not given there):
- Eq. 2 is per sample; the batch loss is the mean over the batch, and L2 is the mean over features of the squared
  difference (NG: alpha = 1000 is sized for a mean, not a sum over 512 dimensions); the gradient flows through both
  branches. Delta is stamped after augmentation, so it stays in the top-left corner.
- Fraction of the set given Delta: NG -> 10 %; Delta's colour: NG -> white. Ranking inside the 1 % cap: NG -> ascending
  p(K | x + Delta).
- Verification training: "10 iterations" read as 10 epochs; lr 0.1, momentum 0.9, weight decay 1e-4, cosine (NG).
  10 epochs on both protocols (cpu.yaml): the ratio-scaled 2 epochs of the CPU protocol never implant Delta, even at
  alpha 0 (2.3 % of a Blend set sent to K; 10 epochs at alpha 0: 90 %).
- Teacher: 50 epochs, SGD lr 0.1, wd 1e-4; "lr / 10 after every two epochs" is unusable as written (lr 1e-26 by the
  end): divided by 10 at epochs 20 and 40 (paper.yaml). The CPU protocol's teacher is its no-defense training.
- A (NG): the mean over the training set of the teacher's top logit, max_k f_t(x)_k, a scalar (`activation:
  per_class` gives A_k = the mean of logit k over the samples the teacher predicts k).
- Student (NG): the teacher's architecture; l of Eq. 3 = MSE between the logits (Eq. 4 thresholds raw student logits
  against the teacher's A, so the student must be on the teacher's logit scale; a KL at a temperature leaves an
  additive offset free); 20 epochs, SGD lr 0.01 (V-A-3), batch 64, momentum 0.9 (NG).
- Epochs keep the paper's ratios (verification 10 : teacher 50 : student 20) unless given.
- No augmentation anywhere in the paper (V-A-2): the verification model and the student follow it on both
  protocols; the CPU protocol's teacher keeps the protocol's flip (it is the no-defense model), paper.yaml's has none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from components import artifacts, checkpoint, engine, stages
from components.artifacts import SCORE_SCHEMA, SPLIT_SCHEMA
from components.defenses.base import DATA, Defense, Evaluation, Stage
from components.errors import UnpoisonError
from components.models import AntiBackdoorModel, anti_backdoor_logits, build_model
from components.params import Strict, TrainParams, check_overrides, final_params

__all__ = ["AbmParams", "DEFENSE", "anti_backdoor_logits", "average_activation", "defender_subset", "distillation",
           "choose_alpha", "inject", "isolate", "nbab_loss", "stamped_predictions"]

# Epochs of the paper's trainings (V-A-3): verification 10, teacher 50, student 20; kept as ratios to the teacher's.
PAPER_EPOCHS = {"verification": 10, "teacher": 50, "student": 20}
# The verification model's training (NG in the paper; notes 1.2): overrides of `train`.
VERIFICATION_TRAIN = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 128, "schedule": "cosine",
                      "augment": "none"}
# The student's training: SGD lr 0.01 (V-A-3); batch 64, momentum 0.9, constant lr, wd 1e-4 as the teacher's (NG).
STUDENT_TRAIN = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "batch_size": 64, "weight_decay": 1e-4,
                 "schedule": "constant", "augment": "none"}


class AbmParams(Strict):
    """ABM (paper 002, CIFAR-10 values of section V-A-3; NG values from the notes, section 1.2)."""

    trigger_size: int = Field(2, ge=1)  # Delta: a 2x2 square on CIFAR-10 (V-A-3, Fig. 4)
    trigger_position: list[int] = [0, 0]  # (row, column) of its top-left pixel: the top-left corner (Fig. 4)
    trigger_value: int = Field(255, ge=0, le=255)  # its colour: NG -> white
    trigger_share: float = Field(0.1, gt=0, lt=1)  # share of the set given Delta and the new class: NG -> 10 %
    alpha: float = Field(1000.0, ge=0)  # weight of Eq. 2's activation term (V-A-3: 1000 on CIFAR-10): the first tried
    # The defender watches its own trigger (V-B-2c, "the defender ... can observe the attack success rate"): when the
    # verification model sends less than min_obeyed of the stamped set to the new class, the trigger failed and the
    # model is trained again at alpha / alpha_backoff, at most alpha_tries trainings (1: the paper's single training).
    min_obeyed: float = Field(0.5, ge=0, le=1)
    alpha_backoff: float = Field(10.0, gt=1)
    alpha_tries: int = Field(3, ge=1)
    isolation_rate: float = Field(0.01, gt=0, le=1)  # the cap on D_iso (V-B-2b, V-C: 1 %)
    delta: float = Field(2.5, ge=0)  # Eq. 4 (V-A-3)
    gamma: float = Field(0.8, ge=0)  # Eq. 4 (V-A-3; 0.6-0.8 recommended, Fig. 7)
    activation: Literal["top_logit", "per_class"] = "top_logit"  # A of Eq. 4 (NG; see the module's reading)
    teacher: dict[str, Any] = {}  # overrides of `train` for the teacher (none: the no-defense training)
    verification: dict[str, Any] = VERIFICATION_TRAIN  # overrides of `train` for the verification model
    student: dict[str, Any] = STUDENT_TRAIN  # overrides of `train` for the student
    verification_epochs: int | None = Field(None, ge=1)  # None: the teacher's epochs * 10 / 50
    student_epochs: int | None = Field(None, ge=1)  # None: the teacher's epochs * 20 / 50
    score_batch: int = Field(512, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if len(self.trigger_position) != 2 or min(self.trigger_position) < 0:
            raise ValueError(f"abm.trigger_position {self.trigger_position} is outside the image; give [row, column] >= 0")
        check_overrides("abm", teacher=self.teacher, verification=self.verification, student=self.student)
        return self


# --- the algorithm -----------------------------------------------------------------------------------------------

def inject(x: torch.Tensor, params: AbmParams) -> torch.Tensor:
    """x + Delta: a copy of the NCHW batch `x` with the defender trigger, a trigger_size square of trigger_value
    (uint8 batches; / 255 in float batches in [0, 1]) whose top-left pixel is at trigger_position."""
    (r, c), s = params.trigger_position, params.trigger_size
    if r + s > x.shape[-2] or c + s > x.shape[-1]:
        raise UnpoisonError(f"the defender trigger ({s}x{s} at {params.trigger_position}) does not fit in "
                            f"{x.shape[-2]}x{x.shape[-1]} images; change abm.trigger_position or abm.trigger_size")
    out = x.clone()
    out[..., r:r + s, c:c + s] = params.trigger_value if x.dtype == torch.uint8 else params.trigger_value / 255
    return out


def defender_subset(n: int, share: float, seed: int) -> np.ndarray:
    """The set S given Delta and relabelled to the new class (Algorithm 1, D_2): round(share * n) samples drawn at
    random (by `seed`), as a boolean mask."""
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).choice(n, size=int(round(share * n)), replace=False)] = True
    return mask


def nbab_loss(params: AbmParams, subset: torch.Tensor) -> engine.BatchLoss:
    """The verification model's per-sample loss (Eq. 2). The labels of the samples in `subset` (a mask over the set)
    are already the new class; their images get Delta here, after augmentation. One forward pass takes the batch and
    the clean copies of its triggered samples; `model` is a Classifier (`features`, `head`)."""
    alpha = params.alpha

    def loss(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor):
        s = subset.to(idx.device)[idx]
        x = torch.where(s[:, None, None, None], inject(xb, params), xb)
        h = model.features(torch.cat([x, xb[s]]))
        theta_tri, theta = h[:len(xb)][s].float(), h[len(xb):].float()
        logits = model.head(h[:len(xb)])
        gap = torch.zeros(len(xb), device=xb.device).index_put((s,), (theta_tri - theta).pow(2).mean(1))
        # Eq. 2 (paper 002): CE(M(x), y) for untouched samples; CE(M(x_tri), y_tri) + alpha * L2(theta, theta_tri) for S
        return logits, F.cross_entropy(logits.float(), yb, reduction="none") + alpha * gap

    return loss


def isolate(pred: np.ndarray, prob: np.ndarray, new_class: int, rate: float) -> np.ndarray:
    """D_iso: Algorithm 1's D_4 (argmax M_v(x + Delta) != y_tri), least obedient (lowest p(y_tri | x + Delta)) first,
    capped at round(rate * N) samples; a boolean mask."""
    candidates = np.flatnonzero(pred != new_class)
    order = candidates[np.argsort(prob[candidates], kind="stable")]
    mask = np.zeros(len(pred), dtype=bool)
    mask[order[:int(round(rate * len(pred)))]] = True
    return mask


def distillation(teacher: nn.Module) -> engine.BatchLoss:
    """The student's per-sample loss (Eq. 3 with l = MSE between the logits): the frozen teacher's logits on the same
    batch are the target; labels are not used."""

    def loss(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor):
        logits = model(xb)
        with torch.no_grad():
            target = teacher(xb).float()
        # Eq. 3 (paper 002): L_s = l(M_t(x), M_s(x)), x in D_iso
        return logits, (logits.float() - target).pow(2).mean(1)

    return loss


def average_activation(logits: torch.Tensor, form: str = "top_logit") -> float | list[float]:
    """A of Eq. 4 from the teacher's logits on the training set (the paper: "the average activation of the output
    neurons"; NG): `top_logit`, the mean of max_k f_t(x)_k; `per_class`, A_k = the mean of logit k over the samples
    predicted k (the top-logit mean where no sample is predicted k)."""
    top, pred = logits.max(1)
    if form == "top_logit":
        return float(top.mean())
    return [float(top[pred == k].mean()) if (pred == k).any() else float(top.mean()) for k in range(logits.shape[1])]


# --- stage functions ---------------------------------------------------------------------------------------------

def stamped_predictions(model: nn.Module, images: torch.Tensor, params: AbmParams,
                        new_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 1's D_3: Delta on every image (uint8 NHWC); the verification model's class of x + Delta and its
    probability of the new class."""
    logits = engine.predict(model, inject(images.permute(0, 3, 1, 2), params).permute(0, 2, 3, 1),
                            batch_size=params.score_batch)
    return logits.argmax(1).numpy(), torch.softmax(logits, 1)[:, new_class].numpy()


def choose_alpha(train: Callable[[float], float], params: AbmParams) -> list[dict]:
    """The tries of Eq. 2's alpha: `train(alpha)` trains a verification model and returns the share of the stamped
    set it sends to the new class; from params.alpha, divided by alpha_backoff after every try below min_obeyed (the
    defender trigger not learned: "excessive repression ... can result in the failure of the implanted backdoor",
    V-B-2c), at most alpha_tries. The last try is the model kept: the first that reached min_obeyed, or else the
    weakest repression tried."""
    tries, alpha = [], params.alpha
    for _ in range(params.alpha_tries):
        tries.append({"alpha": alpha, "obeyed_share": train(alpha)})
        if tries[-1]["obeyed_share"] >= params.min_obeyed:
            break
        alpha /= params.alpha_backoff
    return tries


def verification_train(dataset: Path, out: Path, *, params: TrainParams, model_name: str, abm: AbmParams, seed: int,
                       monitor: stages.Monitor | None = None) -> dict:
    """Step 2: out/model.*, the verification model (K + 1 outputs) trained with Eq. 2 on the set with S relabelled to
    the new class K, at the alpha `choose_alpha` settles on."""
    ds = stages.load_dataset(dataset)
    x, y = stages.tensors(ds)
    k = ds.num_classes
    subset = defender_subset(len(y), abm.trigger_share, seed)
    labels = torch.where(torch.from_numpy(subset), torch.tensor(k), y)
    out = Path(out)
    trained = {}

    def train(alpha: float) -> float:
        torch.manual_seed(params.seed)
        model = build_model(model_name, k + 1)
        tried = abm.model_copy(update={"alpha": alpha})
        history = engine.train(model, x, labels, params, batch_loss=nbab_loss(tried, torch.from_numpy(subset)),
                               on_epoch=monitor, desc=f"verification alpha {alpha:g}",
                               checkpoint=checkpoint.path(out, f"verification-alpha{alpha:g}"))
        trained.update(model=model, history=history)
        return float((stamped_predictions(model, torch.from_numpy(ds.images), abm, k)[0] == k).mean())

    tries = choose_alpha(train, abm)
    model, history = trained["model"], trained["history"]
    artifacts.write_json(history, out / "history.json")
    trigger = {key: getattr(abm, key) for key in ("trigger_size", "trigger_position", "trigger_value")}
    artifacts.save_model(model, stages._model_meta(model_name, ds, params, history, trained_on=len(y),
                                                   classes=[*ds.classes, "defender trigger"], new_class=k,
                                                   defender={**trigger, "samples": int(subset.sum()),
                                                             "alpha": tries[-1]["alpha"], "tries": tries}), out)
    return {"samples": len(y), "triggered": int(subset.sum()), "alpha": tries[-1]["alpha"],
            "obeyed_share": tries[-1]["obeyed_share"], "tries": len(tries),
            **({"train_acc": history[-1]["train_acc"], "train_loss": history[-1]["loss"]} if history else {})}


def score_stage(dataset: Path, model: Path, out: Path, *, params: AbmParams) -> dict:
    """Step 3: out/scores.parquet with `trigger_pred` (the verification model's class of x + Delta) and `trigger_prob`
    (its probability of the new class) for every training sample."""
    ds = stages.load_dataset(dataset)
    net, meta = artifacts.load_model(model)
    pred, prob = stamped_predictions(net, torch.from_numpy(ds.images), params, meta["new_class"])
    stages.write_scores(Path(out) / "scores.parquet", {"trigger_pred": pred.astype(np.float64),
                                                       "trigger_prob": prob.astype(np.float64)}, model, meta)
    obeyed = pred == meta["new_class"]
    return {"samples": len(ds), "obeyed_share": float(obeyed.mean()), "disobeyed": int((~obeyed).sum())}


def partition_stage(score_table: Path, model: Path, out: Path, *, params: AbmParams) -> dict:
    """Step 4: out/split.parquet, D_iso suspect and the rest clean."""
    cols = artifacts.read_table(score_table, {**SCORE_SCHEMA, "trigger_pred": pa.float64(), "trigger_prob": pa.float64()})
    new_class = artifacts.read_json(Path(model) / "model.json")["new_class"]
    isolated = isolate(cols["trigger_pred"].astype(int), cols["trigger_prob"], new_class, params.isolation_rate)
    stages.write_split(~isolated, Path(out) / "split.parquet")
    disobeyed = int((cols["trigger_pred"].astype(int) != new_class).sum())
    result = {"samples": len(isolated), "clean": int((~isolated).sum()), "suspect": int(isolated.sum()),
              "disobeyed": disobeyed}
    obeyed = 1 - disobeyed / len(isolated)
    if obeyed < params.min_obeyed:  # ABM's premise: clean samples follow the defender trigger, poison does not
        result["note"] = (f"the verification model sends only {obeyed:.1%} of the set to the defender's class: it has "
                          f"not learned the defender trigger, so the isolation is close to random; train it longer "
                          f"(abm.verification_epochs) or weaken Eq. 2's activation term (abm.alpha)")
    return result


def student_train(dataset: Path, split: Path, teacher: Path, out: Path, *, params: TrainParams, model_name: str,
                  monitor: stages.Monitor | None = None) -> dict:
    """Step 5: out/model.*, a fresh student distilled from the teacher on the split's suspect pool (D_iso) only."""
    ds = stages.load_dataset(dataset)
    x, y = stages.tensors(ds)
    isolated = torch.from_numpy(artifacts.read_table(split, SPLIT_SCHEMA)["pool"] == "suspect")
    net, _ = artifacts.load_model(teacher)
    net = engine.eval_model(net, engine.default_device())
    torch.manual_seed(params.seed)
    model = build_model(model_name, ds.num_classes)
    history = engine.train(model, x[isolated], y[isolated], params, batch_loss=distillation(net),
                           on_epoch=monitor, desc="student",
                           checkpoint=checkpoint.path(out, "student")) if isolated.any() else []
    out = Path(out)
    artifacts.write_json(history, out / "history.json")
    artifacts.save_model(model, stages._model_meta(model_name, ds, params, history, trained_on=int(isolated.sum()),
                                                   teacher=stages.model_ref(teacher), init=None), out)
    return {"samples": int(isolated.sum()), **({"distill_loss": history[-1]["loss"]} if history else
                                               {"note": "no isolated sample: the student is untrained"})}


def composite_stage(dataset: Path, teacher: Path, student: Path, out: Path, *, params: AbmParams) -> dict:
    """Step 6: out/model.*, the composite of Eq. 4: both networks' weights in model.safetensors, delta, gamma and A
    (from the teacher's logits on the training set) in model.json's `composite`."""
    ds = stages.load_dataset(dataset)
    t_net, t_meta = artifacts.load_model(teacher)
    s_net, s_meta = artifacts.load_model(student)
    a = average_activation(engine.predict(t_net, torch.from_numpy(ds.images), batch_size=params.score_batch),
                           params.activation)
    spec = {"teacher": t_meta["architecture"], "student": s_meta["architecture"], "delta": params.delta,
            "gamma": params.gamma, "activation": a, "activation_form": params.activation}
    model = AntiBackdoorModel(t_net, s_net, params.delta, params.gamma, a)
    artifacts.save_model(model, {"architecture": "abm_composite", "classes": t_meta["classes"],
                                 "normalization": "inside the model", "input": "float NCHW in [0, 1]",
                                 "dataset_hash": ds.content_hash, "train_params": None, "epochs": t_meta["epochs"],
                                 "composite": spec, "teacher": stages.model_ref(teacher),
                                 "student": stages.model_ref(student)}, Path(out))
    return {"activation": a, "threshold": (np.asarray(a) * params.gamma).tolist(), "delta": params.delta}


# --- declaration -------------------------------------------------------------------------------------------------

def teacher_params(c) -> TrainParams:
    """The teacher: `train` with `abm.teacher` (CPU protocol: none, so it is the no-defense training)."""
    return final_params(c.train.model_copy(update={"seed": c.seed}), c.abm.teacher)


def _phase(c, name: str, overrides: dict, epochs: int | None) -> TrainParams:
    teacher = teacher_params(c)
    scaled = max(1, round(teacher.epochs * PAPER_EPOCHS[name] / PAPER_EPOCHS["teacher"]))
    return final_params(teacher, {**overrides, "epochs": epochs or scaled})


def verification_params(c) -> TrainParams:
    return _phase(c, "verification", c.abm.verification, c.abm.verification_epochs)


def student_params(c) -> TrainParams:
    return _phase(c, "student", c.abm.student, c.abm.student_epochs)


DEFENSE = Defense(
    name="abm", section="abm", params=AbmParams,
    description="ABM (paper 002): a weak defender backdoor isolates 1 %, a student distilled on it learns the "
                "teacher's backdoor, the composite subtracts it (Eq. 4).",
    stages=(
        Stage("teacher", stages.train, {"dataset": f"{DATA}/dataset.npz"}, kind="model", monitor=True,
              params=lambda c: {"params": teacher_params(c), "model_name": c.model, "desc": "teacher"},
              reads=("train", "seed", "model", "abm")),
        Stage("verification", verification_train, {"dataset": f"{DATA}/dataset.npz"}, kind="model", monitor=True,
              params=lambda c: {"params": verification_params(c), "model_name": c.model, "abm": c.abm,
                                "seed": c.seed},
              reads=("train", "seed", "model", "abm")),
        Stage("score", score_stage, {"dataset": f"{DATA}/dataset.npz", "model": "verification"},
              params=lambda c: {"params": c.abm}, reads=("abm",)),
        Stage("partition", partition_stage, {"score_table": "score/scores.parquet", "model": "verification"},
              gpu=False, params=lambda c: {"params": c.abm}, reads=("abm",)),
        Stage("student", student_train, {"dataset": f"{DATA}/dataset.npz", "split": "partition/split.parquet",
                                         "teacher": "teacher"}, kind="model", monitor=True,
              params=lambda c: {"params": student_params(c), "model_name": c.model},
              reads=("train", "seed", "model", "abm")),
        Stage("composite", composite_stage, {"dataset": f"{DATA}/dataset.npz", "teacher": "teacher",
                                             "student": "student"}, kind="model",
              params=lambda c: {"params": c.abm}, reads=("abm",)),
    ),
    evaluation=Evaluation(models={"nodef": "teacher", "student": "student", "composite": "composite"},
                          defended="composite", reference="nodef", scores=("score/scores.parquet",),
                          directions={"trigger_prob": -1}, splits={"isolation": "partition/split.parquet"},
                          detection="isolation", suspicion="trigger_prob"),
)
