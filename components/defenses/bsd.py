"""BSD, Bi-perspective Splitting Defense (paper 003): an altruistic model that fits the poison and an open-set view of
the target class split the set into a clean (labelled) and a poison (unlabelled) pool; the main model trains with
MixMatch on them, and the pools are chosen anew every epoch from the two models' loss gap.

1. `altruistic`: the altruistic model g (the main model's architecture) trains on the whole set with local gradient
   ascent, loss <- sign(loss - gamma) * loss, gamma = 0.5 (Algorithm 1, lines 5-11): 25 epochs of Adam lr 1e-3.
2. `target`: every sample's CE on g; the target estimate y~_t is the most frequent label among the 1 % lowest
   losses (section 4.1.1, Alg. 1 line 13), the votes added up over the last half of g's warm-up epochs (below).
   D_t = {y = y~_t}, D_nt = the rest.
3. `warmup`: the main model f trains T_1 epochs with MixMatch, D_nt labelled and D_t unlabelled (Alg. 1 lines
   17-19, 39: f never sees a labelled y~_t image during its warm-up); g trains one plain CE epoch on the whole set
   after each (line 41). Both models are outputs (f in the folder, g in altruistic/).
4. `score` (at epoch T_1): `als_sce`, the symmetric cross-entropy of every sample on g (Eq. 7's L), and
   `oss_distance`, the distance of a D_t sample's penultimate features under f to the nearest non-target class
   centre (Eq. 6; NaN outside D_t, where it decides nothing).
5. `partition`: the initial pools (Eq. 3): clean = the share beta with the highest `als_sce` (Eq. 7: g has fitted
   the poison, so poison has a low loss there) intersected with D_nt plus the share beta of D_t farthest from every
   non-target centre (Eqs. 4-5).
6. `final_train`: MixMatch on the clean pool (labelled) and the rest (unlabelled) from epoch T_1 to T_3, the pools
   chosen before every epoch (the partition lives inside this stage; its per-epoch pools are an output):
   - epochs T_1 .. T_1 + 9: the initial pools;
   - epochs T_1 + 10 .. T_2 - 1, class completion (Eq. 8): from I = SCE(g) - SCE(f) (Eq. 9), the share alpha_T
     with the highest I, the class with the fewest samples there topped up; alpha_T grows from beta to alpha on a
     cosine (Eq. 11);
   - epochs T_2 .. T_3 - 1, selective dropping (Eq. 10): alpha_T = alpha, then the samples both models predict as
     y~_t leave the clean pool;
   - g keeps training one CE epoch per epoch while T < T_2, then stays frozen (Alg. 1 lines 40-42).
   Outputs: f (the defended model), g (altruistic/), pools.parquet (every epoch's clean pool), split.parquet (the
   last epoch's pools), scores.parquet (I with the final models).

Reading of the paper (notes: defenses-wave2.md, section 2; NG = not given):
- Eq. 1 writes the unlabelled pool as D_c \\ D_p: it is D_p = D \\ D_c (Alg. 1 line 37). Alg. 1 line 22 unites the
  ALS and OSS clean sets; Eq. 3 and the text intersect them: intersection. Eq. 6's "\\ y~_i" is "\\ y~_t".
- alpha at initialisation (Eq. 7 at T_1): NG -> beta (section 5.1: the clean share "starts at 0.2").
- Eq. 8: n_i is undefined -> N_i = |{y = i}|; i = the class with the fewest samples in the thresholded set, counted
  by given label, N_secondFew the count of the second-fewest there, n'_i = min(alpha_T N_i, N_secondFew): class i
  gets its top n'_i samples by I. One class per epoch; when the two fewest counts tie nothing changes (recorded in
  the epoch's record as `completion_tie`). Classes absent from the set take no part.
- "Percentile(D, 1 - a)" with ">=" keeps the top share a: here the round(a * n) highest values, ties by sample order.
- LGA on the batch-mean CE (as ABL's code; NG, Alg. 1 loops "for each sample": `per_sample` gives that reading).
- SCE (NG): 0.1 CE + 1.0 RCE, log 0 clamped to log 1e-4 (ASD's `split.criterion.sce`; components/scores.py).
- g's updates: plain CE with the warm-up's optimizer (Adam lr 1e-3, batch 128; C.4 for CIFAR-10), one epoch per
  main epoch; its Adam state and f's carry from the warm-up stage into the final training (one training, as in
  Alg. 1, split into two stages).
- MixMatch: components/semisup.py (Adam lr 0.002, batch 64 + 64, 1024 iterations, T 0.5, Beta 0.75, lambda_u 15
  ramped over T_3 epochs), the protocol's augmentation (paper: crop with zero padding + flip; ASD pads by reflection).
- Scoring (the target estimate, ALS, OSS, I, the predictions of Eq. 10): eval mode, no augmentation. OSS centres:
  the mean penultimate feature of each non-target class over the whole set (mu_i of Eq. 6).
- `target` forces y~_t (the paper's Fig. 6 forces it; a defender who knows the label statistics can too).
- Beyond the paper: the lowest-loss 1 % votes after each of the last `target_window` (half) of g's warm-up epochs,
  and the votes add up; the paper reads g's last epoch alone. Under Adam at a constant lr one epoch's vote swings
  (measured on the CPU protocol's shard, an unversioned script: on the Blend set the vote went to the target after
  epochs 1-3 and 7-8, to class 1 or 9 after epochs 4-6 and 9, the poison then out of the lowest 1 %; on BadNets to
  class 1 after epochs 1-3, before g fits the poison, and to class 8 after epoch 9); a sum over epochs reads only
  what the defender sees.
- Beyond the paper, for a short training (`cpu.yaml` sets both; `paper.yaml` keeps the paper's): `bsd.completion:
  every` completes every class at once (`every_class_completion`: each class its top share alpha_T by I, of at most
  a median class's size), where Eq. 8 tops up the one fewest class an epoch to the second-fewest count; with a main
  model that has not learned a class yet (f at 0.35 accuracy after the CPU protocol's warm-up), Eq. 8's first set
  leaves that class out, f learns it less, and it leaves for good (the loss-guided "cyclic positive feedback" the
  paper names, section 4.2). `bsd.semi.schedule: cosine` anneals f's Adam lr over T_3 (`semi_lr`; ASD and the paper
  keep 0.002). Measured on the BadNets set: README, "BSD".
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from components import artifacts, checkpoint, engine, semisup, splits, stages
from components.artifacts import EPOCH_POOLS_SCHEMA, SCORE_SCHEMA, SPLIT_SCHEMA
from components.defenses.base import DATA, Defense, Evaluation, Stage
from components.errors import UnpoisonError
from components.models import build_model
from components.params import Strict, TrainParams, check_overrides, final_params
from components.scores import sample_loss, symmetric_cross_entropy
from components.semisup import MixMatchParams

__all__ = ["BsdParams", "DEFENSE", "alpha_schedule", "class_completion", "estimate_target", "every_class_completion",
           "initial_pools", "local_gradient_ascent", "oss_distance", "selective_dropping", "semi_lr", "top_share"]

# g's training (5.1, C.4): Adam lr 1e-3, CE; batch 128 (NG: ASD's loader), no weight decay, constant lr (NG).
ALTRUISTIC_TRAIN = {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "schedule": "constant", "batch_size": 128}
# f's MixMatch training (C.4, "align with ASD"): Adam lr 0.002, batch 64, no lr schedule, no weight decay.
SEMI_TRAIN = {"optimizer": "adam", "lr": 0.002, "weight_decay": 0.0, "schedule": "constant", "batch_size": 64}


class BsdParams(Strict):
    """BSD (paper 003, CIFAR-10 values of sections 5.1, C.4, C.6; NG values from the notes, section 2.2)."""

    altruistic_epochs: int = Field(25, ge=1)  # g's warm-up with LGA (5.1)
    altruistic: dict[str, Any] = ALTRUISTIC_TRAIN  # overrides of `train` for g (warm-up and later CE epochs)
    gamma: float = Field(0.5, ge=0)  # LGA's gamma (Alg. 1 line 8)
    per_sample: bool = False  # LGA's sign per sample instead of on the batch mean (NG)
    target_share: float = Field(0.01, gt=0, le=1)  # the lowest-loss share that votes for y~_t (4.1.1)
    target_window: float = Field(0.5, gt=0, le=1)  # the last share of g's warm-up epochs whose votes add up (not 4.1.1)
    target: int | None = Field(None, ge=0)  # force y~_t instead of estimating it
    t1: int = Field(20, ge=1)  # T_1: the end of f's warm-up (epochs)
    fixed_epochs: int = Field(10, ge=0)  # epochs on the initial pools after T_1 (C.4: 10)
    t2: int = Field(90, ge=1)  # T_2: the end of class completion; g is frozen from here
    t3: int = Field(120, ge=1)  # T_3: the end of training
    alpha: float = Field(0.6, gt=0, le=1)  # the final clean share (5.1)
    completion: Literal["fewest", "every"] = "fewest"  # Eq. 8 tops up the fewest class; "every": each class (not 4.2)
    beta: float = Field(0.2, gt=0, le=1)  # OSS's share of D_t, and the clean share at T_1 (5.1)
    semi: dict[str, Any] = SEMI_TRAIN  # overrides of `train` for f's MixMatch training
    mixmatch: MixMatchParams = MixMatchParams()  # iterations per epoch, T, Beta's a, lambda_u, ramp-up (None: T_3)
    sce_alpha: float = Field(0.1, ge=0)  # SCE = sce_alpha * CE + sce_beta * RCE (NG: ASD's)
    sce_beta: float = Field(1.0, ge=0)
    score_batch: int = Field(512, ge=1)

    @field_validator("altruistic", "semi")
    @classmethod
    def _onto_defaults(cls, value: dict, info) -> dict:
        """A partial dict (`--set bsd.semi.lr=...`) changes those keys of the defaults, not the whole dict."""
        return {**{"altruistic": ALTRUISTIC_TRAIN, "semi": SEMI_TRAIN}[info.field_name], **value}

    @model_validator(mode="after")
    def _check(self):
        if not self.t1 + self.fixed_epochs <= self.t2 <= self.t3:
            raise ValueError(f"the phases must satisfy t1 + fixed_epochs <= t2 <= t3, got t1 {self.t1}, fixed_epochs "
                             f"{self.fixed_epochs}, t2 {self.t2}, t3 {self.t3}; change bsd.t1, bsd.t2 or bsd.t3")
        if self.beta > self.alpha:
            raise ValueError(f"bsd.beta {self.beta} exceeds bsd.alpha {self.alpha}: the clean share grows from beta "
                             f"to alpha; give beta <= alpha")
        check_overrides("bsd", altruistic=self.altruistic, semi=self.semi)
        if self.semi["schedule"] not in ("constant", "cosine", "onecycle"):
            raise ValueError(f"bsd.semi.schedule {self.semi['schedule']!r}: f's MixMatch training takes 'constant' "
                             f"(the paper's), 'cosine' or 'onecycle'")
        return self


# --- the algorithm -----------------------------------------------------------------------------------------------

def local_gradient_ascent(gamma: float, per_sample: bool = False) -> engine.LossFn:
    """g's warm-up loss: loss <- sign(loss - gamma) * loss on the batch-mean CE (or each sample's): descent above
    gamma, ascent below it, so the clean samples stay near gamma while the poison, learned fast, falls far below."""

    def loss(logits: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), y, reduction="none")
        sign = torch.sign((ce if per_sample else ce.mean()) - gamma).detach()
        return sign * ce  # Alg. 1 line 8 (paper 003): loss <- sign(loss - 0.5) * loss

    return loss


def top_share(values: np.ndarray, share: float) -> np.ndarray:
    """Boolean mask of the round(share * N) highest values, ties by sample order: {v >= Percentile(V, 1 - share)}."""
    return splits.lowest_share(-np.asarray(values, dtype=np.float64), share)


def estimate_target(loss: np.ndarray, labels: np.ndarray, share: float, num_classes: int) -> tuple[int, np.ndarray]:
    """y~_t = argmax_c |{y = c} among the `share` of samples with the lowest loss on g| (section 4.1.1), at least one
    sample voting; ties go to the lowest class. Returns y~_t and the votes per class."""
    return splits.label_vote(loss, labels, share, num_classes)


def oss_distance(features: torch.Tensor, labels: np.ndarray, target: int) -> np.ndarray:
    """S(x) = min over non-target classes i of ||f_e(x) - mu_i||_2, mu_i the mean feature of the samples labelled i
    (Eq. 6), for every row of `features`. Far from every known class = a clean target sample (an "unknown-unknown"
    class); near one = poison, whose content belongs to a non-target class."""
    classes = [c for c in np.unique(labels) if c != target]
    if not classes:
        raise UnpoisonError("every sample carries the target label: open-set splitting needs samples of other "
                            "classes; check the data set or bsd.target")
    feats = features.double()
    centres = torch.stack([feats[torch.from_numpy(labels == c)].mean(0) for c in classes])
    dist = (feats[:, None, :] - centres[None]).pow(2).sum(-1).sqrt()
    return dist.min(1).values.numpy()  # Eq. 6


def initial_pools(als_sce: np.ndarray, distance: np.ndarray, labels: np.ndarray, target: int, alpha: float,
                  beta: float) -> dict[str, np.ndarray]:
    """The initial clean pool (Eq. 3) and its two parts, as boolean masks: `als`, the share alpha with the highest SCE
    on g (Eq. 7); `oss`, D_nt plus the share beta of D_t with the largest distance S (Eqs. 4-5; `distance` is read
    on D_t only); `clean` = als AND oss."""
    als = top_share(als_sce, alpha)  # Eq. 7
    in_t = labels == target
    oss = ~in_t
    oss[in_t] = top_share(distance[in_t], beta)  # Eqs. 4-5
    return {"als": als, "oss": oss, "clean": als & oss}  # Eq. 3


def alpha_schedule(epoch: int, t1: int, t2: int, fixed: int, alpha: float, beta: float) -> float:
    """alpha_T of Eq. 11: beta at T = T_1 + fixed, a cosine rise to alpha at T = T_2, alpha after."""
    if epoch >= t2:
        return alpha
    # Eq. 11: T' = (T - T_1 - 10) / (T_2 - T_1 - 10) * T_2, "10" being `fixed`
    t_prime = max(0.0, (epoch - t1 - fixed) / (t2 - t1 - fixed) * t2)
    return beta + (alpha - beta) * (1 - math.cos(math.pi * t_prime / t2)) / 2  # Eq. 11


def class_completion(indicator: np.ndarray, labels: np.ndarray, share: float,
                     num_classes: int) -> tuple[np.ndarray, dict]:
    """The clean pool of Eq. 8: the share `share` (alpha_T) with the highest I, and the class i with the fewest samples
    there topped up with its n'_i = min(share * N_i, N_secondFew) highest-I samples (N_i: its samples in the set).
    Returns the mask and what the completion did."""
    first = top_share(indicator, share)  # Eq. 8, {I >= Percentile(D^I, 1 - alpha)}
    present = np.bincount(labels, minlength=num_classes) > 0
    counts = np.bincount(labels[first], minlength=num_classes)
    order = [c for c in np.argsort(counts, kind="stable") if present[c]]
    if len(order) < 2:
        return first, {"completed_class": None, "completion_added": 0, "completion_tie": False}
    few, second = order[0], order[1]
    n_few = int((labels == few).sum())
    n_prime = min(share * n_few, counts[second])  # n'_i = min{alpha n_i, N_secondFew}
    in_class = labels == few
    top_up = np.zeros_like(first)
    # Eq. 8, second set: {y = i, I >= Percentile(D_i^I, 1 - n'_i / N_i)}
    top_up[in_class] = top_share(indicator[in_class], n_prime / n_few)
    clean = first | top_up
    return clean, {"completed_class": int(few), "completion_added": int((clean & ~first).sum()),
                   "completion_tie": bool(counts[few] == counts[second])}


def every_class_completion(indicator: np.ndarray, labels: np.ndarray, share: float,
                           num_classes: int) -> tuple[np.ndarray, dict]:
    """Eq. 8 with every class completed at once (beyond the paper): class i's clean pool is its round(share * n_i)
    highest-I samples, n_i = min(N_i, the median of the N_j) (classes present). A class that f has not learned yet keeps
    its share of labelled samples instead of leaving the pool (Eq. 8 tops up one class an epoch, to the second-fewest
    count); the median bounds a class that the poison's relabelling has inflated to a typical class's size. The record's
    `completion_added`: the pool's samples outside Eq. 8's first set (the top share over the whole set)."""
    sizes = np.bincount(labels, minlength=num_classes)
    typical = float(np.median(sizes[sizes > 0]))
    clean = np.zeros(len(labels), dtype=bool)
    for c in np.flatnonzero(sizes):
        in_class = labels == c
        clean[in_class] = top_share(indicator[in_class], share * min(sizes[c], typical) / sizes[c])
    added = int((clean & ~top_share(indicator, share)).sum())
    return clean, {"completed_class": None, "completion_added": added, "completion_tie": False}


def selective_dropping(clean: np.ndarray, pred_f: np.ndarray, pred_g: np.ndarray, target: int) -> np.ndarray:
    """Eq. 10: the clean pool without the samples both models predict as y~_t (they stay, unlabelled)."""
    return clean & ~((pred_f == target) & (pred_g == target))  # Eq. 10


def sce(logits: torch.Tensor, labels: torch.Tensor, params: BsdParams) -> np.ndarray:
    return symmetric_cross_entropy(logits, labels, params.sce_alpha, params.sce_beta).numpy()


@torch.no_grad()
def outputs(model: nn.Module, images: torch.Tensor, *, batch_size: int,
            device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features, logits) in float32 on the CPU, eval mode, no augmentation."""
    device = device or engine.default_device()
    model = engine.eval_model(model, device)
    feats, logits = [], []
    for xb in images.split(batch_size):
        h = model.features(engine.to_float(xb.to(device))).float()
        feats.append(h.cpu())
        logits.append(model.head(h).float().cpu())
    return torch.cat(feats), torch.cat(logits)


# --- the training of f and g together (Alg. 1, lines 16-43) ------------------------------------------------------

def semi_lr(lr: float, schedule: str, t: float, epochs: int) -> float:
    """f's learning rate at t epochs (not the paper's, which keeps Adam's 0.002 constant; `bsd.semi.schedule`), one
    curve across f's warm-up and final training, T_3 = `epochs`: "cosine", lr (1 + cos(pi t / T_3)) / 2; "onecycle",
    the engine's one-cycle (torch's OneCycleLR, linear): lr / 25 rising to lr at 0.25 T_3, then falling to lr / 25e4."""
    t = min(max(t, 0.0), epochs)
    if schedule == "cosine":
        return lr * (1 + math.cos(math.pi * t / epochs)) / 2
    if schedule == "onecycle":
        peak, start, end = 0.25 * epochs, lr / 25, lr / 25e4
        return start + (lr - start) * t / peak if t < peak else lr + (end - lr) * (t - peak) / (epochs - peak)
    return lr


def _ce_epoch(model: nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
              p: TrainParams, gen: torch.Generator, device: torch.device) -> float:
    """One plain CE epoch of g on the whole set (Alg. 1 line 41); the mean loss."""
    model.train()
    total = torch.zeros((), device=device)
    for idx in torch.randperm(len(labels), generator=gen).to(device).split(p.batch_size):
        xb = engine.augment(engine.to_float(images[idx]), p.augment, gen)
        if p.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with engine.autocast(device, p):
            loss = F.cross_entropy(model(xb).float(), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach() * len(idx)
    return total.item() / len(labels)


Pools = Callable[[int, nn.Module, nn.Module], tuple[np.ndarray, dict]]  # (epoch, f, g) -> (clean mask, record)


def co_train(f: nn.Module, g: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: range, pools: Pools, *,
             semi: TrainParams, alt: TrainParams, params: BsdParams, num_classes: int, optimizers: dict | None = None,
             on_epoch=None, checkpoint_file: Path | None = None,
             key: str = "") -> tuple[list[dict], list[np.ndarray], dict]:
    """Epochs `epochs` of Alg. 1's main loop: before each, `pools` chooses the clean pool (lines 17-37); f trains one
    MixMatch epoch on it, labelled, and on the rest, unlabelled (line 39); g one CE epoch while T < T_2 (line 41).
    `optimizers` continues an earlier call's optimizer states. Checkpoints every `semi.checkpoint_every` epochs to
    `checkpoint_file` and resumes from it. Returns the per-epoch records, clean masks and optimizer states."""
    device = engine.default_device()
    if device.type == "cpu":
        engine.use_machine_threads()
    f, g = engine.prepare(f, semi, device), engine.prepare(g, alt, device)
    opt_f, opt_g = engine.optimizer(f, semi), engine.optimizer(g, alt)
    if optimizers:
        opt_f.load_state_dict(optimizers["f"])
        opt_g.load_state_dict(optimizers["g"])
    gen_f, gen_g = torch.Generator().manual_seed(semi.seed + epochs.start), torch.Generator().manual_seed(alt.seed + 1)
    x_all, y_all = images.to(device), labels.to(device)
    rampup = params.mixmatch.rampup or params.t3
    lr = None if semi.schedule == "constant" else (lambda t: semi_lr(semi.lr, semi.schedule, t, params.t3))
    history, masks, start = [], [], epochs.start
    every = semi.checkpoint_every if checkpoint_file is not None else 0
    state = checkpoint.load(checkpoint_file, key, "bsd") if every else None
    if state is not None:
        f.load_state_dict(state["f"])
        g.load_state_dict(state["g"])
        opt_f.load_state_dict(state["opt_f"])
        opt_g.load_state_dict(state["opt_g"])
        gen_f.set_state(state["gen_f"])
        gen_g.set_state(state["gen_g"])
        torch.set_rng_state(state["torch_rng"])
        history, masks = state["history"], [m.numpy() for m in state["masks"]]
        start = epochs.start + len(history)
    for epoch in range(start, epochs.stop):
        clean, info = pools(epoch, f, g)  # Alg. 1 lines 17-37
        lab, unl = (torch.from_numpy(np.flatnonzero(m)) for m in (clean, ~clean))
        record = semisup.epoch(f, opt_f, x_all, y_all, lab, unl, semi, params.mixmatch, epoch=epoch, rampup=rampup,
                               num_classes=num_classes, gen=gen_f, device=device, lr=lr)  # line 39
        if epoch < params.t2:  # lines 40-42: g is frozen from T_2
            record["altruistic_loss"] = _ce_epoch(g, opt_g, x_all, y_all, alt, gen_g, device)
        record = {**record, "epoch": epoch - epochs.start, "T": epoch, **info}
        history.append(record)
        masks.append(clean)
        if on_epoch is not None:
            on_epoch(record["epoch"], f, record)
        if every and (len(history) % every == 0 or epoch + 1 == epochs.stop):
            checkpoint.save({"format": checkpoint.FORMAT, "key": key, "epoch": len(history), "epochs": len(epochs),
                             "complete": len(history) == len(epochs),
                             "f": f.state_dict(), "g": g.state_dict(), "opt_f": opt_f.state_dict(),
                             "opt_g": opt_g.state_dict(), "gen_f": gen_f.get_state(), "gen_g": gen_g.get_state(),
                             "torch_rng": torch.get_rng_state(), "history": history,
                             "masks": [torch.from_numpy(m) for m in masks]}, checkpoint_file)
    return history, masks, {"f": opt_f.state_dict(), "g": opt_g.state_dict()}


def _key(f: nn.Module, g: nn.Module, images: torch.Tensor, labels: torch.Tensor, semi: TrainParams, alt: TrainParams,
         params: BsdParams, desc: str, extra: str = "") -> str:
    """What decides a co-training: both models' initial weights, the data, the parameters (checkpoint.training_key)."""
    parts = [checkpoint.training_key(m, images, labels, None, p, desc=desc, loss_fn=None, perturb=None,
                                     frozen_norm=False) for m, p in ((f, semi), (g, alt))]
    return hashlib.sha256("".join([*parts, json.dumps(params.model_dump(mode="json"), sort_keys=True),
                                   extra]).encode()).hexdigest()


# --- stage functions ---------------------------------------------------------------------------------------------

def altruistic_train(dataset: Path, out: Path, *, params: TrainParams, model_name: str, bsd: BsdParams,
                     monitor: stages.Monitor | None = None) -> dict:
    """Step 1: out/model.*, g after its warm-up with local gradient ascent on the whole set; each of the warm-up's last
    `target_window` share of epochs records in history.json the votes of its lowest-loss share (`target_votes`)."""
    ds = stages.load_dataset(dataset)
    x, y = stages.tensors(ds)
    voting = params.epochs - max(1, math.ceil(bsd.target_window * params.epochs))  # the first epoch that votes

    def on_epoch(epoch: int, model: nn.Module, record: dict) -> None:
        if epoch >= voting:
            loss = sample_loss(model, x, y, batch_size=bsd.score_batch)
            record["target_votes"] = estimate_target(loss, ds.labels, bsd.target_share, ds.num_classes)[1].tolist()
            model.train()
        if monitor is not None:
            monitor(epoch, model, record)

    return stages.train(dataset, out, params=params, model_name=model_name, monitor=on_epoch, desc="altruistic",
                        loss_fn=local_gradient_ascent(bsd.gamma, bsd.per_sample),
                        meta={"lga": {"gamma": bsd.gamma, "per_sample": bsd.per_sample}})


def target_stage(dataset: Path, model: Path, out: Path, *, params: BsdParams) -> dict:
    """Step 2: out/target.json, the target estimate y~_t: the label with the most votes of the lowest-loss share on g,
    added up over the last epochs of g's warm-up (`target_votes` in its history; the paper reads the last alone), and
    the label used (`bsd.target` when forced); out/scores.parquet with `altruistic_ce`, each sample's CE on g."""
    ds = stages.load_dataset(dataset)
    net, meta = artifacts.load_model(model)
    loss = sample_loss(net, *stages.tensors(ds), batch_size=params.score_batch)
    last = estimate_target(loss, ds.labels, params.target_share, ds.num_classes)[1]
    rounds = [np.asarray(h["target_votes"]) for h in artifacts.read_json(Path(model) / "history.json")
              if "target_votes" in h] or [last]
    votes = np.sum(rounds, axis=0)
    estimate = int(votes.argmax())  # ties to the lowest class, as estimate_target
    used = estimate if params.target is None else params.target
    if used >= ds.num_classes:
        raise UnpoisonError(f"bsd.target {used} is not a class of the data set (0-{ds.num_classes - 1}); give one")
    out = Path(out)
    stages.write_scores(out / "scores.parquet", {"altruistic_ce": loss.astype(np.float64)}, model, meta)
    record = {"target": used, "estimate": estimate, "forced": params.target is not None, "votes": votes.tolist(),
              "voters": int(votes.sum()), "voting_epochs": len(rounds), "last_epoch_votes": last.tolist(),
              "target_samples": int((ds.labels == used).sum())}
    artifacts.write_json(record, out / "target.json")
    return record


def _models(folder: Path) -> tuple[nn.Module, nn.Module, dict, dict]:
    f, f_meta = artifacts.load_model(folder)
    g, g_meta = artifacts.load_model(Path(folder) / "altruistic")
    return f, g, f_meta, g_meta


def _save(out: Path, f, g, archs: tuple[str, str], ds, semi: TrainParams, alt: TrainParams, history: list[dict],
          optimizers: dict, inits: tuple[str | None, str], **extra) -> None:
    """f in `out`, g in out/altruistic/ (each with model.json; `inits`: the models they continue), the history, and
    both optimizers' states in out/optimizers.pt (the final training continues them)."""
    out = Path(out)
    artifacts.write_json(history, out / "history.json")
    artifacts.save_model(g, stages._model_meta(archs[1], ds, alt, [h for h in history if "altruistic_loss" in h],
                                               trained_on=len(ds), init=inits[1], role="altruistic model g"),
                         out / "altruistic")
    artifacts.save_model(f, stages._model_meta(archs[0], ds, semi, history, trained_on=len(ds), init=inits[0],
                                               role="main model f", **extra), out)
    with artifacts.atomic_path(out / "optimizers.pt") as tmp:
        torch.save(optimizers, tmp)


def warmup_stage(dataset: Path, target: Path, altruistic: Path, out: Path, *, semi: TrainParams, alt: TrainParams,
                 model_name: str, bsd: BsdParams, monitor: stages.Monitor | None = None) -> dict:
    """Step 3: out/model.*, f after T_1 MixMatch epochs with D_nt labelled and D_t unlabelled; out/altruistic/, g after
    as many more CE epochs; out/optimizers.pt, both optimizers' states."""
    ds = stages.load_dataset(dataset)
    x, y = stages.tensors(ds)
    y_t = artifacts.read_json(target)["target"]
    torch.manual_seed(semi.seed)
    f = build_model(model_name, ds.num_classes)
    g, g_meta = artifacts.load_model(altruistic)
    d_nt = ds.labels != y_t
    if not d_nt.any():
        raise UnpoisonError(f"every sample is labelled {y_t}, the target estimate: the warm-up has no labelled "
                            f"sample; check the data set")

    def pools(epoch, f_, g_):  # Alg. 1 lines 17-19: D_c = D_nt
        return d_nt, {"phase": "warm-up", "alpha_t": None, "clean": int(d_nt.sum()), "suspect": int((~d_nt).sum())}

    key = _key(f, g, x, y, semi, alt, bsd, "bsd-warmup", str(y_t))
    history, _, optimizers = co_train(f, g, x, y, range(0, bsd.t1), pools, semi=semi, alt=alt, params=bsd,
                                      num_classes=ds.num_classes, on_epoch=monitor,
                                      checkpoint_file=checkpoint.path(out, "bsd-warmup"), key=key)
    _save(out, f, g, (model_name, g_meta["architecture"]), ds, semi, alt, history, optimizers,
          (None, stages.model_ref(altruistic)), target=y_t)
    return {"labelled": int(d_nt.sum()), "unlabelled": int((~d_nt).sum()), "target": y_t,
            "train_loss": history[-1]["loss"]}


def score_stage(dataset: Path, target: Path, warmup: Path, out: Path, *, params: BsdParams) -> dict:
    """Step 4: out/scores.parquet with `als_sce`, every sample's SCE on g (Eq. 7), and `oss_distance`, Eq. 6's S on
    f's penultimate features for D_t (NaN elsewhere)."""
    ds = stages.load_dataset(dataset)
    x, y = stages.tensors(ds)
    y_t = artifacts.read_json(target)["target"]
    f, g, f_meta, _ = _models(warmup)
    _, g_logits = outputs(g, x, batch_size=params.score_batch)
    feats, _ = outputs(f, x, batch_size=params.score_batch)
    in_t = ds.labels == y_t
    distance = np.full(len(ds), np.nan)
    distance[in_t] = oss_distance(feats, ds.labels, y_t)[in_t]
    stages.write_scores(Path(out) / "scores.parquet", {"als_sce": sce(g_logits, y, params), "oss_distance": distance},
                        warmup, f_meta)
    return {"samples": len(ds), "target_samples": int(in_t.sum())}


def partition_stage(score_table: Path, dataset: Path, target: Path, out: Path, *, params: BsdParams) -> dict:
    """Step 5: out/split.parquet, the initial pools of Eq. 3 (clean: labelled from T_1; suspect: unlabelled)."""
    cols = artifacts.read_table(score_table, {**SCORE_SCHEMA, "als_sce": pa.float64(), "oss_distance": pa.float64()})
    labels = stages.load_dataset(dataset).labels
    y_t = artifacts.read_json(target)["target"]
    parts = initial_pools(cols["als_sce"], cols["oss_distance"], labels, y_t, params.beta, params.beta)
    stages.write_split(parts["clean"], Path(out) / "split.parquet")
    return {"samples": len(labels), "clean": int(parts["clean"].sum()), "suspect": int((~parts["clean"]).sum()),
            "als_clean": int(parts["als"].sum()), "oss_clean": int(parts["oss"].sum())}


def final_stage(dataset: Path, target: Path, warmup: Path, split: Path, out: Path, *, semi: TrainParams,
                alt: TrainParams, bsd: BsdParams, monitor: stages.Monitor | None = None) -> dict:
    """Step 6: epochs T_1 to T_3 with the pools chosen before each: out/model.* (f, the defended model),
    out/altruistic/ (g), out/pools.parquet (every epoch's clean pool), out/split.parquet (the last epoch's pools),
    out/scores.parquet (`indicator`, Eq. 9's I with the final models), out/history.json (per-epoch records)."""
    ds = stages.load_dataset(dataset)
    x, y = stages.tensors(ds)
    y_t = artifacts.read_json(target)["target"]
    f, g, f_meta, g_meta = _models(warmup)
    table = artifacts.read_table(split, SPLIT_SCHEMA)
    initial = table["pool"] == "clean"
    optimizers = torch.load(Path(warmup) / "optimizers.pt", map_location="cpu", weights_only=True) \
        if (Path(warmup) / "optimizers.pt").exists() else None

    frozen: dict[str, torch.Tensor] = {}  # g's logits once g is frozen (from T_2): one pass instead of one an epoch

    def indicator(f_, g_, g_frozen: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        _, lf = outputs(f_, x, batch_size=bsd.score_batch)
        lg = frozen.get("g") if g_frozen else None
        if lg is None:
            _, lg = outputs(g_, x, batch_size=bsd.score_batch)
            if g_frozen:
                frozen["g"] = lg
        return sce(lg, y, bsd) - sce(lf, y, bsd), lf.argmax(1).numpy(), lg.argmax(1).numpy()  # Eq. 9

    def pools(epoch: int, f_, g_) -> tuple[np.ndarray, dict]:
        if epoch < bsd.t1 + bsd.fixed_epochs:  # Alg. 1 lines 20-22: the initial pools
            clean, info = initial, {"phase": "initial pools", "alpha_t": bsd.beta}
        else:  # lines 23-35
            alpha_t = alpha_schedule(epoch, bsd.t1, bsd.t2, bsd.fixed_epochs, bsd.alpha, bsd.beta)
            score, pred_f, pred_g = indicator(f_, g_, g_frozen=epoch >= bsd.t2)
            complete = class_completion if bsd.completion == "fewest" else every_class_completion
            clean, info = complete(score, ds.labels, alpha_t, ds.num_classes)
            info = {"phase": "class completion", "alpha_t": alpha_t, **info}
            if epoch >= bsd.t2:
                completed = clean
                clean = selective_dropping(clean, pred_f, pred_g, y_t)
                info.update(phase="selective dropping", dropped=int((completed & ~clean).sum()))
        return clean, {**info, "clean": int(clean.sum()), "suspect": int((~clean).sum())}

    key = _key(f, g, x, y, semi, alt, bsd, "bsd-final", f"{y_t}:{hashlib.sha256(initial.tobytes()).hexdigest()}")
    history, masks, optimizers = co_train(f, g, x, y, range(bsd.t1, bsd.t3), pools, semi=semi, alt=alt, params=bsd,
                                          num_classes=ds.num_classes, optimizers=optimizers, on_epoch=monitor,
                                          checkpoint_file=checkpoint.path(out, "bsd-final"), key=key)
    out = Path(out)
    last = masks[-1] if masks else initial
    n = len(ds)
    artifacts.write_table({"epoch": np.repeat([h["T"] for h in history], n).astype(np.int64),
                           "sample_id": np.tile(np.arange(n), len(masks)),
                           "clean": np.concatenate(masks) if masks else np.zeros(0, bool)},
                          out / "pools.parquet", EPOCH_POOLS_SCHEMA)
    stages.write_split(last, out / "split.parquet")
    _save(out, f, g, (f_meta["architecture"], g_meta["architecture"]), ds, semi, alt, history, optimizers,
          (stages.model_ref(warmup), stages.model_ref(Path(warmup) / "altruistic")), target=y_t)
    score, _, _ = indicator(f, g)
    stages.write_scores(out / "scores.parquet", {"indicator": score}, out, artifacts.read_json(out / "model.json"))
    return {"epochs": len(history), "clean": int(last.sum()), "suspect": int((~last).sum()),
            **({"train_loss": history[-1]["loss"]} if history else {})}


# --- declaration -------------------------------------------------------------------------------------------------

def _train(c) -> TrainParams:
    return c.train.model_copy(update={"seed": c.seed})


def altruistic_params(c) -> TrainParams:
    """g: `train` with `bsd.altruistic`, for its warm-up's epochs (and one epoch at a time later)."""
    return final_params(_train(c), {**c.bsd.altruistic, "epochs": c.bsd.altruistic_epochs})


def semi_params(c) -> TrainParams:
    """f's MixMatch training: `train` with `bsd.semi`; epochs = T_3 (the lr constant, or one curve over T_3)."""
    return final_params(_train(c), {**c.bsd.semi, "epochs": c.bsd.t3})


_READS = ("train", "seed", "model", "bsd")

DEFENSE = Defense(
    name="bsd", section="bsd", params=BsdParams,
    description="BSD (paper 003): an altruistic model and open-set splitting pick the initial clean pool; MixMatch "
                "on clean (labelled) and poison (unlabelled) pools re-split every epoch with class completion and "
                "selective dropping.",
    stages=(
        Stage("altruistic", altruistic_train, {"dataset": f"{DATA}/dataset.npz"}, kind="model", monitor=True,
              params=lambda c: {"params": altruistic_params(c), "model_name": c.model, "bsd": c.bsd}, reads=_READS),
        Stage("target", target_stage, {"dataset": f"{DATA}/dataset.npz", "model": "altruistic"},
              params=lambda c: {"params": c.bsd}, reads=("bsd",)),
        Stage("warmup", warmup_stage, {"dataset": f"{DATA}/dataset.npz", "target": "target/target.json",
                                       "altruistic": "altruistic"}, kind="model", monitor=True,
              params=lambda c: {"semi": semi_params(c), "alt": altruistic_params(c), "model_name": c.model,
                                "bsd": c.bsd}, reads=_READS),
        Stage("score", score_stage, {"dataset": f"{DATA}/dataset.npz", "target": "target/target.json",
                                     "warmup": "warmup"},
              params=lambda c: {"params": c.bsd}, reads=("bsd",)),
        Stage("partition", partition_stage, {"score_table": "score/scores.parquet", "dataset": f"{DATA}/dataset.npz",
                                             "target": "target/target.json"}, gpu=False,
              params=lambda c: {"params": c.bsd}, reads=("bsd",)),
        Stage("final_train", final_stage, {"dataset": f"{DATA}/dataset.npz", "target": "target/target.json",
                                           "warmup": "warmup", "split": "partition/split.parquet"},
              kind="model", monitor=True,
              params=lambda c: {"semi": semi_params(c), "alt": altruistic_params(c), "bsd": c.bsd}, reads=_READS),
    ),
    evaluation=Evaluation(models={"altruistic": "final_train/altruistic", "warmup": "warmup", "bsd": "final_train"},
                          defended="bsd", scores=("target/scores.parquet", "score/scores.parquet",
                                                  "final_train/scores.parquet"),
                          directions={"altruistic_ce": -1, "als_sce": -1, "oss_distance": -1, "indicator": -1},
                          splits={"initial": "partition/split.parquet", "final": "final_train/split.parquet"},
                          detection="final", suspicion="indicator", epoch_pools="final_train/pools.parquet",
                          target_estimate="target/target.json"),
)
