"""MeCa, Mellivora Capensis (paper 000): perturbation-robustness partition, backdoor enhancement, clean training.

Reading of the paper (DESIGN.md, "Reading the papers"):
- Algorithm 2, line 6, p = 1 - (e+1) * gamma is the share of D_u *kept for learning*: the lowest-KL, most robust,
  poison-like part. The (e+1) * gamma share with the highest KL is unlearned (Eq. 11). Only this reading gives
  "a dataset with an increasing poison ratio" and a model whose ACC falls while its ASR rises (Fig. 6).
- Partition always runs over the whole D_u (line 7), with the model of the current round.
- Unlearning (Eq. 11, arg max of the loss) is gradient ascent on cross-entropy; the paper names no safeguard, so
  each sample stops contributing once its loss passes `unlearn_ceiling` (loss flooding, as ABL's), and the
  learning rate is small and constant.
- Round 0's learning step (line 3 on the full D_u) is the warm-up training stage; each later round learns on the
  part kept by the previous round.
- Clean samples are those the enhanced model misclassifies (line 12); the final model trains from scratch on
  them (lines 13-15). Section 4.2.4 then relabels the rest with the clean model (Eq. 12) and fine-tunes on all.
- Beyond the paper (the defaults; README, "MeCa: how the paper is read"): identification per label (`identify`),
  the suspect label by the warm-up's lowest-loss vote, a guard inside it on that loss and on an early model's
  (`early_share` of the training on the whole set: a backdoor is learned before the clean task), and a second pass
  (`vouch`) in which a first clean model vouches for the suspect label's samples before the final model trains.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field
from torch import nn

from components import artifacts, checkpoint, engine, scores, splits, stages
from components.artifacts import GUARD_SCHEMA, ROUNDS_SCHEMA, SCORE_SCHEMA, SPLIT_SCHEMA
from components.defenses.base import DATA, Defense, Evaluation, Stage
from components.errors import UnpoisonError
from components.params import Strict, TrainParams, final_params


class MecaParams(Strict):
    """MeCa (paper 000). The paper gives no values for eps, r, gamma or E_b: these are chosen once (DESIGN.md's
    laptop-scale measurements) and never tuned per attack."""

    eps: float = Field(0.1, gt=0)  # perturbation radius of delta (Eq. 3)
    patch: int = Field(8, ge=1)  # side r of the random square mask m
    gamma: float = Field(0.1, gt=0, lt=1)  # round e keeps p = 1 - (e+1) gamma of D_u for learning (Algorithm 2)
    rounds: int = Field(5, ge=1)  # E_b, the most: the stopping rule (`stop`) ends the rounds earlier
    learn_epochs: int = Field(1, ge=1)  # learning epochs per round on the kept part
    unlearn_epochs: int = Field(1, ge=1)
    unlearn_lr: float = Field(0.005, gt=0)  # DESIGN.md's reference reading: 0.005 with momentum 0.9
    unlearn_ceiling: float = Field(5.0, gt=0)  # per-sample CE above which ascent stops (safeguard)
    learn_lr: float = Field(0.01, gt=0)
    round0_learn: bool = True  # a learning epoch on round 0's kept part too, after the warm-up (DESIGN.md's reference)
    # Stopping rule: `one_label` stops after the first round in which the enhanced model fits one label's samples
    # (share >= stop_high) and hardly any other's (mean share of the other labels <= stop_low), the state the
    # enhancement aims at; `rounds` runs all of them. Reads only what a defender observes (`observe`).
    stop: Literal["rounds", "one_label"] = "one_label"
    stop_high: float = Field(0.9, gt=0, le=1)
    stop_low: float = Field(0.15, ge=0, lt=1)
    # Identification (`identify`): `paper` is Algorithm 2, line 12; `per_label` (beyond the paper, for a single-target
    # attack) suspects only the over-fitted label and returns to the clean pool the `label_keep` share of its fitted
    # samples that the warm-up and enhanced models find least poison-like, weighted
    # (`balance`) so that the label weighs in the pool as much as the median other label.
    identify: Literal["paper", "per_label"] = "per_label"
    # The early model whose per-sample loss per_label identification's guard reads beside the warm-up's:
    # the protocol's training cut to the `early_share` of its epochs (`early_epochs`; 2 of the CPU protocol's 10, 4 of
    # the demo's 20, the same SGD steps), on the whole set. A trigger learned early is fitted before the clean task; a
    # model trained to the end fits the clean samples too (CPU protocol, Trojan target 3: the guard below holds 492 of
    # the 500 poison and 1 clean cat on the loss after 2 epochs, 439 and 10 after the warm-up's 10). BadNets' patch is
    # not learned after 2 epochs: the warm-up's loss holds that poison.
    early_share: float = Field(0.2, gt=0, le=1)
    # per_label's suspect label (`suspect_label`): `loss_vote`, the label most common among the `vote_share` of the
    # samples with the lowest warm-up loss (poison is fitted first); `predicted`, the label the enhanced model predicts
    # for the most samples (the sink the enhancement sends other classes' images to); `fitted`, the label whose own
    # samples it fits the largest share of
    suspect_label: Literal["loss_vote", "predicted", "fitted"] = "loss_vote"
    vote_share: float = Field(0.05, gt=0, le=1)
    # per_label: a sample of the suspect label whose warm-up or early loss is below the `guard` quantile of the other
    # labels' is suspect whatever the enhanced model does, never returned and never vouched for (`low_loss`);
    # 0 turns the guard off
    guard: float = Field(0.2, ge=0, lt=1)
    label_keep: float = Field(0.2, ge=0, le=1)
    # per_label, inside the suspect label: `always` trusts line 12 (a sample the enhanced model does not fit is clean,
    # unless guarded); `concentrated` trusts it only when the enhancement's last round concentrated on that label
    # (`focused`, the stopping rule's own test) and otherwise suspects the whole label, so that the second pass decides
    # (an enhancement that went to another label says little about which of this label's samples it misses; Blend at
    # 2 %, CPU protocol: the enhancement concentrated on horse, the vote named airplane, and line 12 inside airplane
    # left 16 of the 200 poison in the pool, ASR 0.052; 3 with `concentrated` and `vouch_rank` 2). Not the default:
    # on SIG the whole label suspected leaves the first pool few of its clean samples, the returned ones weigh up to
    # 5.4 each, and the few poison among them with them (AMD EPYC: ASR 0.131, with `always` 0.052; README)
    trust_fit: Literal["always", "concentrated"] = "always"
    balance: bool = True
    # A second pass (`vouch`, beyond the paper): the suspects of the suspect label that the first clean model predicts
    # as that label, the guard's excepted, return to the pool, and the final model trains again on it
    vouch: bool = True
    # the second pass vouches for a suspect when its label is among the first clean model's `vouch_rank` most likely
    # classes (1: its prediction). That model trained on few of the label's samples and under-predicts the label (CPU
    # protocol, Trojan target 3: it vouches for 540 of the clean cats at 2 and 274 at 1, and for none of the poison;
    # BadNets: 24 poison at 2, README). 2 has not run the whole matrix alone, so 1 stays the default
    vouch_rank: int = Field(1, ge=1)
    score_batch: int = Field(512, ge=1)
    finetune_epochs: int = Field(3, ge=0)  # section 4.2.4: relabel and fine-tune on the whole relabelled set
    # Section 4.2.4's relabelling (`relabel_finetune`): `all` is Eq. 12, every suspect takes the clean model's
    # prediction; `agree` (beyond the paper) keeps only the suspects whose prediction is their delivered label and
    # leaves the others out of the fine-tuning, where Eq. 12 gives a clean sample the clean model misclassifies a
    # wrong label (the target class's clean samples, most of which identification suspects).
    relabel: Literal["all", "agree"] = "all"
    finetune_lr: float = Field(0.01, gt=0)


def keep_share(round_index: int, gamma: float) -> float:
    """MeCa Algorithm 2, line 6: p = 1 - (e+1) * gamma."""
    return 1 - (round_index + 1) * gamma


def partition(kl: np.ndarray, round_index: int, gamma: float) -> np.ndarray:
    """Algorithm 1, line 11 with Algorithm 2's p: True = kept in D_u_hat (learned), False = D_c (unlearned)."""
    return splits.lowest_share(kl, keep_share(round_index, gamma))


def _phase(params: MecaParams, base: TrainParams, *, epochs: int, lr: float) -> TrainParams:
    # Enhancement steps are short fine-tuning phases: constant small lr, no weight decay, the protocol's augmentation.
    return base.model_copy(update={"epochs": epochs, "lr": lr, "schedule": "constant", "weight_decay": 0.0})


def unlearn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, params: MecaParams, base: TrainParams, desc="unlearn",
            checkpoints: Path | None = None):
    """Eq. 11: theta = arg max sum_{D_c} l(f(x), y), bounded per sample by the ceiling. With `checkpoints` (the
    stage's output folder), checkpointed to its checkpoints/<desc>.pt."""
    p = _phase(params, base, epochs=params.unlearn_epochs, lr=params.unlearn_lr)
    return engine.train(model, x, y, p, loss_fn=engine.bounded_ascent(params.unlearn_ceiling), desc=desc,
                        checkpoint=checkpoint.path(checkpoints, desc) if checkpoints is not None else None)


def learn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, params: MecaParams, base: TrainParams, desc="learn",
          checkpoints: Path | None = None):
    """Algorithm 2, line 3: theta = arg min sum_{D_u_hat} l(f(x), y). `checkpoints` as for `unlearn`."""
    p = _phase(params, base, epochs=params.learn_epochs, lr=params.learn_lr)
    return engine.train(model, x, y, p, desc=desc,
                        checkpoint=checkpoint.path(checkpoints, desc) if checkpoints is not None else None)


def fitted(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Whether the model classifies each sample as its (delivered) label."""
    return (engine.predict(model, x).argmax(1) == y).numpy()


def observe(fit: np.ndarray, kept: np.ndarray, kl: np.ndarray | None, labels: np.ndarray) -> dict:
    """What a defender sees after an enhancement round, without ground truth: the share of samples the model fits
    (classifies as their delivered label) in the whole set, in the part kept for learning and in the unlearned
    part, per delivered label, and the quantiles of the round's KL scores (none in round 0, whose partition comes
    from the warm-up model's scores)."""
    share = lambda m: float(fit[m].mean()) if m.any() else float("nan")  # noqa: E731
    out = {"fit_share": float(fit.mean()), "fit_kept": share(kept), "fit_unlearned": share(~kept),
           "fit_by_label": [share(labels == k) for k in range(int(labels.max()) + 1)]}
    if kl is not None:
        out.update({f"kl_q{q}": float(v) for q, v in zip((10, 50, 90), np.quantile(kl, [0.1, 0.5, 0.9]))})
    return out


def concentrated(fit_by_label: list[float], high: float, low: float) -> bool:
    """Whether the enhanced model fits one label's samples (share >= `high`) and hardly any other label's (their mean
    share <= `low`): the state the enhancement aims at, a model that fits the one label all poison carries and
    nothing else. Labels without samples (NaN) are left out."""
    f = np.asarray(fit_by_label, dtype=float)
    f = f[~np.isnan(f)]
    if len(f) < 2:
        return False
    top = int(np.argmax(f))
    return bool(f[top] >= high and np.delete(f, top).mean() <= low)


def enhance(model: nn.Module, x: torch.Tensor, y: torch.Tensor, kept0: np.ndarray, params: MecaParams,
            base: TrainParams, seed: int, on_round: Callable[[dict], None] | None = None,
            checkpoints: Path | None = None) -> list[dict]:
    """Algorithm 2, lines 2-10, starting after round 0's partition (`kept0`, from the warm-up model's KL).

    Returns one record per round with what a defender can observe (no ground truth): the round's kept mask, KL
    scores, which samples the model fits after the round and the shares of `observe`. With `checkpoints` (the
    stage's output folder), every learning and unlearning step checkpoints to a file of its own there: rerun after
    an interruption, the steps that finished return their recorded weights at once, the scores between them are
    computed again (seeded: the same), and the interrupted step resumes at its last checkpoint.
    """
    rounds = []
    kept, kl = kept0, None
    for e in range(params.rounds):
        if e > 0 or params.round0_learn:
            learn(model, x[torch.from_numpy(kept)], y[torch.from_numpy(kept)], params, base, desc=f"learn r{e}",
                  checkpoints=checkpoints)
        if e > 0:
            kl = scores.meca_kl(model, x, y, eps=params.eps, patch=params.patch, seed=seed + e,
                                batch_size=params.score_batch)
            kept = partition(kl, e, params.gamma)
        forget = torch.from_numpy(~kept)
        unlearn(model, x[forget], y[forget], params, base, desc=f"unlearn r{e}", checkpoints=checkpoints)
        fit = fitted(model, x, y)
        record = {"round": e, "keep_share": keep_share(e, params.gamma), "kept": kept.copy(), "kl": kl,
                  "fitted": fit, **observe(fit, kept, kl, y.numpy())}
        rounds.append(record)
        if on_round is not None:
            on_round(record)
        if params.stop == "one_label" and concentrated(record["fit_by_label"], params.stop_high, params.stop_low):
            break
    return rounds


def identify_clean(enhanced: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Algorithm 2, line 12: D_c = {(x, y) in D_u : f_theta(x) != y}. True = clean."""
    return ~fitted(enhanced, x, y)


def suspect_label(predicted: np.ndarray, labels: np.ndarray, rule: str = "predicted",
                  warm_loss: np.ndarray | None = None, vote_share: float = 0.05) -> int:
    """The label per_label identification suspects. `loss_vote`: the label most common among the `vote_share` of the
    samples with the lowest warm-up loss (`warm_loss`): a backdoor is learned before the clean task, so the warm-up
    fits the poison, which all carry the target label, first; it does not depend on where the enhancement goes.
    (Not the early model's loss: after its 2 epochs BadNets' patch is not learned yet, and its vote names another
    label.)
    From the enhanced model's predictions: `predicted`: the label it predicts for the most samples. The enhancement
    learns the poison and unlearns the clean samples, so it sends the other classes' images to the label all the
    poison carries (the paper's Fig. 6: ACC falls, ASR rises); an easy clean class it may still fit is fitted on its
    own samples only. `fitted`: the label whose own samples it fits the
    largest share of (the stopping rule's test, `concentrated`, asks that it be the only one)."""
    k = int(max(labels.max(), predicted.max())) + 1
    if rule == "loss_vote":
        if warm_loss is None:
            raise ValueError("suspect_label 'loss_vote' needs the warm-up loss")
        return splits.label_vote(warm_loss, labels, vote_share, k)[0]
    if rule == "predicted":
        return int(np.argmax(np.bincount(predicted, minlength=k)))
    fit = predicted == labels
    by_label = [float(fit[labels == c].mean()) if (labels == c).any() else float("nan") for c in range(k)]
    return int(np.nanargmax(by_label))


def within_label_rank(values: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1] (0 = the lowest)."""
    return np.argsort(np.argsort(values, kind="stable"), kind="stable") / max(1, len(values) - 1)


def low_loss(loss: np.ndarray, labels: np.ndarray, label: int, quantile: float) -> np.ndarray:
    """The guard on one model's loss: the samples of `label` whose loss is below the `quantile` of the other labels'.
    The other labels carry no poison under a single-target attack, so their losses show how low a clean sample's
    goes; the poison, fitted through its trigger, sits below (CPU protocol, the early model at 2 epochs, quantile 0.2:
    492 of 500 Trojan poison and 1 of 1,016 clean cats below on target 3, 474 of 500 SIG poison and 20 of 505 clean
    airplanes below). An easy clean class pays: its easiest samples fall below too. 0 = none."""
    if quantile <= 0:
        return np.zeros(len(labels), dtype=bool)
    return (labels == label) & (loss < np.quantile(loss[labels != label], quantile))


def suspect_and_guard(predicted: np.ndarray, labels: np.ndarray, warm_loss: np.ndarray, early_loss: np.ndarray,
                      params: MecaParams) -> tuple[int, np.ndarray]:
    """per_label's suspect label (`suspect_label`, on the warm-up's loss) and the guard's mask inside it (`low_loss`
    on the warm-up's loss or on the early model's: a trigger learned early, Trojan's or SIG's, shows in the early
    loss; a small patch, BadNets', is not yet learned after the early model's epochs and shows in the warm-up's
    only): one decision, read by identification and by the second pass alike."""
    label = suspect_label(predicted, labels, params.suspect_label, warm_loss, params.vote_share)
    return label, (low_loss(warm_loss, labels, label, params.guard)
                   | low_loss(early_loss, labels, label, params.guard))


def focused(rounds: list[dict], label: int, params: MecaParams) -> bool:
    """Whether the enhancement's last round, the enhanced model, concentrated on `label` (`concentrated`, the stopping
    rule's test, with the fit shares per label that `observe` recorded)."""
    fit = rounds[-1]["fit_by_label"]
    return concentrated(fit, params.stop_high, params.stop_low) and int(np.nanargmax(fit)) == label


def line12_fit(predicted: np.ndarray, labels: np.ndarray, label: int, on_label: bool,
               params: MecaParams) -> np.ndarray:
    """What per_label identification counts as fitted by the enhanced model: predicted as the delivered label; with
    `trust_fit: concentrated` and an enhancement that did not concentrate on the suspect label (`on_label` False,
    `focused`), every sample of that label."""
    fit = predicted == labels
    return fit | (labels == label) if params.trust_fit == "concentrated" and not on_label else fit


class Decision(NamedTuple):
    """Identification's outcome: the pool and weights (`identify`), and what the second pass reads of it."""
    clean: np.ndarray  # True = clean pool
    weight: np.ndarray  # each sample's weight in the final training
    label: int | None  # the suspect label (None under `identify: paper`)
    suspected: np.ndarray  # of the label and fitted (`line12_fit`) or guarded, before the `label_keep` share returned
    guarded: np.ndarray  # what the guard holds (`suspect_and_guard`)
    focused: bool  # whether the enhancement's last round concentrated on the label (`focused`)


def identify(predicted: np.ndarray, labels: np.ndarray, kl: np.ndarray, warm_loss: np.ndarray, early_loss: np.ndarray,
             enhanced_loss: np.ndarray, params: MecaParams,
             rounds: list[dict] | None = None) -> tuple[np.ndarray, np.ndarray, int | None]:
    """The clean pool, the weights and the suspect label of `decide`."""
    return decide(predicted, labels, kl, warm_loss, early_loss, enhanced_loss, params, rounds)[:3]


def decide(predicted: np.ndarray, labels: np.ndarray, kl: np.ndarray, warm_loss: np.ndarray, early_loss: np.ndarray,
           enhanced_loss: np.ndarray, params: MecaParams, rounds: list[dict] | None = None) -> Decision:
    """The clean pool (True = clean), each sample's weight in the final training and the suspect label, from the
    enhanced model's predictions (fitted = predicted as the delivered label).

    `paper`: Algorithm 2, line 12, clean = what the enhanced model does not fit, weight 1. `per_label` (beyond the
    paper) reads the enhanced model per delivered label, for a single-target attack (all poison carries one label):
    line 12 on the label the enhancement concentrated on (`suspect_label`) throws that whole label
    away, its clean samples with the poison, and the final model loses the class; line 12 on the other labels throws
    away clean samples the enhanced model happened to leave fitted. So the other labels stay clean, and in the
    suspect label the samples the enhanced model does not fit stay clean (line 12) unless the guard (`low_loss`)
    holds them, and of those it fits, the `label_keep` share least poison-like by three models' views return to the
    clean pool, the guard's excepted: the highest mean rank,
    among them, of the warm-up KL (Eq. 3: poison is robust, low KL), the warm-up loss (poison is fitted first, low
    loss) and the enhanced model's loss (it fits poison the most confidently). With `balance` the returned samples
    weigh so that the label's weight in the pool equals the median other label's clean count (never less than 1
    each). `rounds` (the enhancement's records, `observe`) is what `trust_fit: concentrated` reads (`line12_fit`)."""
    if params.identify == "paper":
        fit = predicted == labels
        none = np.zeros(len(labels), bool)
        return Decision(~fit, (~fit).astype(np.float64), None, none, none, False)
    label, low = suspect_and_guard(predicted, labels, warm_loss, early_loss, params)
    on_label = rounds is None or focused(rounds, label, params)
    fit = line12_fit(predicted, labels, label, on_label, params)
    clean = (labels != label) | (~fit & ~low)
    suspected = ~clean
    members = np.flatnonzero(~clean)
    back = members[:0]
    if params.label_keep > 0 and len(members):
        poison_unlike = (within_label_rank(kl[members]) + within_label_rank(warm_loss[members])
                         + within_label_rank(enhanced_loss[members])) / 3
        back = members[(poison_unlike >= np.quantile(poison_unlike, 1 - params.label_keep)) & ~low[members]]
        clean[back] = True
    weight = balance_weights(clean, labels, label, back) if params.balance else clean.astype(np.float64)
    return Decision(clean, weight, label, suspected, low, on_label)


def balance_weights(clean: np.ndarray, labels: np.ndarray, label: int, back: np.ndarray) -> np.ndarray:
    """Each sample's weight in the final training: 1 in the clean pool, 0 outside it, and the suspect label's samples
    returned to the pool (`back`, indices) weighted so that the label weighs as much as the median other label's
    clean count (never less than 1 each)."""
    weight = clean.astype(np.float64)
    if len(back):
        counts = np.bincount(labels[clean], minlength=int(labels.max()) + 1)
        missing = float(np.median(np.delete(counts, label))) - (counts[label] - len(back))
        weight[back] = max(1.0, missing / len(back))
    return weight


def label_rank(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each sample's delivered label's rank among a model's classes (0 = predicted, 1 = second most likely, ...)."""
    return (logits > logits[np.arange(len(labels)), labels][:, None]).sum(1)


def vouched(clean: np.ndarray, labels: np.ndarray, label: int, clean_predicted: np.ndarray,
            guarded: np.ndarray | None = None) -> np.ndarray:
    """The second identification pass (beyond the paper; the `vouch` stage): the suspects of the suspect label that
    the clean model, trained on the first pass's pool, predicts as that label return to the pool, except those the
    guard holds (`guarded`, `low_loss`). A dirty-label poison is another class's image, which the clean model, having
    seen little or none of the poison, assigns to its own class; a clean sample of the label it assigns to the label.
    A clean-label poison (SIG) is an image of the label, which it vouches for too: the guard is what holds those.
    True = clean."""
    back = (labels == label) & (clean_predicted == label)
    return clean | (back if guarded is None else back & ~guarded)


def finetune_params(train: TrainParams, params: MecaParams) -> TrainParams:
    """Section 4.2.4's fine-tuning: the protocol's training with MeCa's fine-tune epochs and a cosine-decayed lr."""
    return train.model_copy(update={"epochs": params.finetune_epochs, "lr": params.finetune_lr, "schedule": "cosine"})


def relabel(clean_model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Eq. 12: y_hat = f(x) for the samples judged poisoned, with the clean model."""
    return engine.predict(clean_model, x).argmax(1).numpy()


def relabels(suspect: np.ndarray, predicted: np.ndarray, labels: np.ndarray, mode: str) -> np.ndarray:
    """The split's `relabel` column for the fine-tuning: -1 = not relabelled (a clean-pool sample keeps its label, a
    suspect is left out). `all`: every suspect takes its prediction (Eq. 12); `agree`: only a suspect predicted as its
    delivered label returns, with that label."""
    take = suspect if mode == "all" else suspect & (predicted == labels)
    return np.where(take, predicted, -1)


# --- stage functions ---------------------------------------------------------------------------------------------

def score_kl(dataset: Path, model: Path, out: Path, *, params: MecaParams, seed: int) -> dict:
    """MeCa Eq. 3 per sample with the given model: out/scores.parquet (column `kl`)."""
    ds = stages.load_dataset(dataset)
    net, meta = artifacts.load_model(model)
    t0 = time.perf_counter()
    kl = scores.meca_kl(net, *stages.tensors(ds), eps=params.eps, patch=params.patch, seed=seed,
                        batch_size=params.score_batch)
    seconds = time.perf_counter() - t0
    stages.write_scores(Path(out) / "scores.parquet", {"kl": kl}, model, meta)
    return {"samples": len(ds), "samples_per_second": len(ds) / seconds}


def partition_stage(score_table: Path, out: Path, *, params: MecaParams) -> dict:
    """MeCa round 0: the (1 - p) share with the highest KL is D_c, the clean pool to unlearn; the rest is suspect."""
    kl = artifacts.read_table(score_table, {**SCORE_SCHEMA, "kl": pa.float64()})["kl"]
    kept = partition(kl, 0, params.gamma)
    stages.write_split(~kept, Path(out) / "split.parquet")
    return {"samples": len(kl), "clean": int((~kept).sum()), "suspect": int(kept.sum())}


def enhance_stage(dataset: Path, model: Path, split: Path, out: Path, *, params: MecaParams, base: TrainParams,
                  seed: int) -> dict:
    """MeCa Algorithm 2, lines 2-10: out/model (the enhanced model), out/rounds.parquet (per round and sample: KL,
    kept, fitted), out/rounds.json (what the defender observes per round, `observe`)."""
    ds = stages.load_dataset(dataset)
    x, y = stages.tensors(ds)
    net, meta = artifacts.load_model(model)
    kept0 = artifacts.read_table(split, SPLIT_SCHEMA)["pool"] == "suspect"
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    rounds = enhance(net, x, y, kept0, params, base, seed=seed, checkpoints=Path(out))
    seconds = time.perf_counter() - t0
    n = len(ds)
    cols = {"sample_id": np.tile(np.arange(n), len(rounds)),
            "round": np.repeat([r["round"] for r in rounds], n),
            "kl": np.concatenate([r["kl"] if r["kl"] is not None else np.full(n, np.nan) for r in rounds]),
            "kept": np.concatenate([r["kept"] for r in rounds]),
            "fitted": np.concatenate([r["fitted"] for r in rounds])}
    out = Path(out)
    artifacts.write_table(cols, out / "rounds.parquet", ROUNDS_SCHEMA)
    observed = [{k: v for k, v in r.items() if k not in ("kept", "kl", "fitted")} for r in rounds]
    artifacts.write_json(observed, out / "rounds.json")
    artifacts.save_model(net, {**meta, "enhanced": params.model_dump(), "epochs": meta["epochs"] + len(rounds)},
                         out / "model")
    return {"samples": n, "samples_per_second": n * len(rounds) / seconds, "rounds_run": len(rounds),
            **{f"{k}_r{r['round']}": r[k] for r in observed for k in ("fit_share", "fit_kept", "fit_unlearned")}}


def views(x: torch.Tensor, y: torch.Tensor, enhanced: nn.Module, warmup: nn.Module,
          early: nn.Module) -> tuple[np.ndarray, ...]:
    """Per sample: the enhanced model's prediction and cross-entropy, the warm-up's and the early model's
    cross-entropy."""
    logits = engine.predict(enhanced, x)
    ce = lambda z: torch.nn.functional.cross_entropy(z, y, reduction="none").numpy()  # noqa: E731
    return logits.argmax(1).numpy(), ce(logits), ce(engine.predict(warmup, x)), ce(engine.predict(early, x))


def identify_stage(dataset: Path, model: Path, warmup: Path, early: Path, score_table: Path, rounds: Path, out: Path, *,
                   params: MecaParams) -> dict:
    """MeCa identification (`identify`) with the enhanced model, the warm-up and early models and the KL scores:
    out/split.parquet (with each sample's `weight` in the final training), out/scores.parquet (`enhanced_loss`: the
    enhanced model's cross-entropy; low = fitted = poison-like) and out/guard.parquet, the decision the second pass
    reads (`suspect_label`, -1 under `identify: paper`; `suspected`: of that label and fitted or guarded, before the
    `label_keep` share returned; `guarded`: what the guard holds, `suspect_and_guard`)."""
    ds = stages.load_dataset(dataset)
    x, y = stages.tensors(ds)
    labels = y.numpy()
    net, meta = artifacts.load_model(model)
    predicted, loss, warm_loss, early_loss = views(x, y, net, artifacts.load_model(warmup)[0],
                                                   artifacts.load_model(early)[0])
    kl = artifacts.read_table(score_table, {**SCORE_SCHEMA, "kl": pa.float64()})["kl"]
    if len(kl) != len(y):
        raise UnpoisonError(f"score table '{score_table}' scores {len(kl)} samples, the data set has {len(y)}; "
                            f"rerun the score stage on this data set")
    d = decide(predicted, labels, kl, warm_loss, early_loss, loss, params, artifacts.read_json(rounds))
    label = -1 if d.label is None else d.label
    out = Path(out)
    stages.write_scores(out / "scores.parquet", {"enhanced_loss": loss}, model, meta)
    stages.write_split(d.clean, out / "split.parquet", weight=d.weight)
    artifacts.write_table({"sample_id": np.arange(len(labels)), "suspect_label": np.full(len(labels), label),
                           "suspected": d.suspected, "guarded": d.guarded}, out / "guard.parquet", GUARD_SCHEMA)
    back = d.clean & d.suspected  # the suspect label's suspects returned to the clean pool
    return {"samples": len(ds), "clean": int(d.clean.sum()), "suspect": int((~d.clean).sum()),
            "suspect_label": label, "focused": d.focused, "returned": int(back.sum()),
            "returned_weight": float(d.weight[back].max()) if back.any() else 0.0}


def vouch_stage(dataset: Path, split: Path, model: Path, guard: Path, out: Path, *, params: MecaParams) -> dict:
    """MeCa's second identification pass (`vouched`, beyond the paper) with the first clean model (`model`):
    out/split.parquet, the pool the final model trains on. The suspect label, what it suspected and the guard are
    identification's (`guard`: its guard.parquet); the label's returned samples weigh again so that it weighs as much
    as the median other label (`balance_weights`). With `vouch` off or `identify: paper` the first pass's split passes
    unchanged."""
    ds = stages.load_dataset(dataset)
    labels = ds.labels
    table = artifacts.read_table(split, {**SPLIT_SCHEMA, "weight": pa.float64()})
    decision = artifacts.read_table(guard, GUARD_SCHEMA)
    first = table["pool"] == "clean"
    for path, n in ((split, len(first)), (guard, len(decision["sample_id"]))):
        if n != len(labels):
            raise UnpoisonError(f"'{path}' has {n} samples, the data set {len(labels)}; rerun identification on this "
                                f"data set")
    label = int(decision["suspect_label"][0]) if len(labels) else -1
    if params.identify == "paper" or not params.vouch or label < 0:
        stages.write_split(first, Path(out) / "split.parquet", weight=table["weight"])
        return {"samples": len(labels), "clean": int(first.sum()), "suspect": int((~first).sum()), "vouched": 0}
    logits = engine.predict(artifacts.load_model(model)[0], torch.from_numpy(ds.images)).float().numpy()
    # a sample whose label is within the clean model's `vouch_rank` counts as predicted as its label
    clean_predicted = np.where(label_rank(logits, labels) < params.vouch_rank, labels, logits.argmax(1))
    clean = vouched(first, labels, label, clean_predicted, decision["guarded"])
    back = np.flatnonzero(clean & decision["suspected"])
    weight = balance_weights(clean, labels, label, back) if params.balance else clean.astype(np.float64)
    stages.write_split(clean, Path(out) / "split.parquet", weight=weight)
    return {"samples": len(labels), "clean": int(clean.sum()), "suspect": int((~clean).sum()), "suspect_label": label,
            "vouched": int((clean & ~first).sum()), "returned": len(back),
            "returned_weight": float(weight[back].max()) if len(back) else 0.0}


def relabel_finetune(dataset: Path, split: Path, model: Path, out: Path, *, params: TrainParams,
                     mode: str = "all", monitor: stages.Monitor | None = None) -> dict:
    """MeCa section 4.2.4, Eq. 12: relabel the suspect pool with the clean model (`relabels`, `mode` = MecaParams'
    `relabel`), then fine-tune the clean model on the clean pool plus the relabelled samples. out/split.parquet (with
    `relabel`) and out/model."""
    ds = stages.load_dataset(dataset)
    net, _ = artifacts.load_model(model)
    table = artifacts.read_table(split, SPLIT_SCHEMA)
    suspect = table["pool"] == "suspect"
    predicted = relabel(net, torch.from_numpy(ds.images))
    column = relabels(suspect, predicted, ds.labels, mode)
    out = Path(out)
    stages.write_split(~suspect, out / "split.parquet", column)
    result = stages.train(dataset, out / "model", params=params, model_name="from init", split=out / "split.parquet",
                          init=model, relabel=True, monitor=monitor, desc="fine-tune", checkpoints=out)
    return {**result, "relabelled": int((column >= 0).sum()),
            "relabel_changed": int(((column >= 0) & (predicted != ds.labels)).sum())}


# --- declaration -------------------------------------------------------------------------------------------------

def _train(c) -> TrainParams:
    return c.train.model_copy(update={"seed": c.seed})


def early_epochs(train: TrainParams, params: MecaParams) -> int:
    """The early model's epochs: the `early_share` of the protocol's, at least one."""
    return max(1, round(params.early_share * train.epochs))


DEFENSE = Defense(
    name="meca", section="meca", params=MecaParams,
    description="MeCa (paper 000): perturbation scoring, partition, backdoor enhancement, clean training, relabel "
                "and fine-tune.",
    stages=(
        # round 0's learning step (Algorithm 2, line 3 on the whole D_u) is the no-defense training itself
        Stage("warmup", stages.train, {"dataset": f"{DATA}/dataset.npz"}, kind="model", monitor=True,
              params=lambda c: {"params": _train(c), "model_name": c.model, "desc": "warm-up"},
              reads=("train", "seed", "model")),
        # the early model (`early_share` of the training) whose loss per_label identification reads
        Stage("early", stages.train, {"dataset": f"{DATA}/dataset.npz"}, kind="model",
              params=lambda c: {"params": _train(c).model_copy(update={"epochs": early_epochs(c.train, c.meca)}),
                                "model_name": c.model, "desc": "early model"},
              reads=("train", "seed", "model", "meca")),
        Stage("score", score_kl, {"dataset": f"{DATA}/dataset.npz", "model": "warmup"},
              params=lambda c: {"params": c.meca, "seed": c.seed}, reads=("meca", "seed")),
        Stage("partition", partition_stage, {"score_table": "score/scores.parquet"}, gpu=False,
              params=lambda c: {"params": c.meca}, reads=("meca",)),
        Stage("enhance", enhance_stage, {"dataset": f"{DATA}/dataset.npz", "model": "warmup",
                                         "split": "partition/split.parquet"}, kind="model",
              params=lambda c: {"params": c.meca, "base": _train(c), "seed": c.seed},
              reads=("meca", "train", "seed")),
        Stage("identify", identify_stage, {"dataset": f"{DATA}/dataset.npz", "model": "enhance/model",
                                           "warmup": "warmup", "early": "early",
                                           "score_table": "score/scores.parquet", "rounds": "enhance/rounds.json"},
              params=lambda c: {"params": c.meca}, reads=("meca",)),
        Stage("first_train", stages.train, {"dataset": f"{DATA}/dataset.npz", "split": "identify/split.parquet"},
              kind="model", monitor=True,
              params=lambda c: {"params": final_params(_train(c), c.final), "model_name": c.model,
                                "desc": "first clean model"},
              reads=("train", "final", "seed", "model")),
        Stage("vouch", vouch_stage, {"dataset": f"{DATA}/dataset.npz", "split": "identify/split.parquet",
                                     "model": "first_train", "guard": "identify/guard.parquet"},
              params=lambda c: {"params": c.meca}, reads=("meca",)),
        Stage("final_train", stages.train, {"dataset": f"{DATA}/dataset.npz", "split": "vouch/split.parquet"},
              kind="model", monitor=True,
              params=lambda c: {"params": final_params(_train(c), c.final), "model_name": c.model,
                                "desc": "clean model"},
              reads=("train", "final", "seed", "model")),
        Stage("relabel_finetune", relabel_finetune, {"dataset": f"{DATA}/dataset.npz",
                                                     "split": "vouch/split.parquet", "model": "final_train"},
              kind="model", monitor=True,
              params=lambda c: {"params": finetune_params(_train(c), c.meca), "mode": c.meca.relabel},
              reads=("train", "seed", "meca")),
    ),
    evaluation=Evaluation(
        models={"nodef": "warmup", "enhanced": "enhance/model", "first": "first_train", "clean": "final_train",
                "relabelled": "relabel_finetune/model"},
        defended="clean", reference="nodef",  # the paper's main tables report the clean model, before relabelling
        scores=("score/scores.parquet", "identify/scores.parquet"), directions={"kl": -1, "enhanced_loss": -1},
        splits={"round0": "partition/split.parquet", "identify": "identify/split.parquet",
                "vouch": "vouch/split.parquet", "relabel": "relabel_finetune/split.parquet"},
        detection="vouch", rounds="enhance/rounds.parquet",
        suspicion="kl"),  # the ranking: the warm-up model's robustness (Eq. 3); the enhanced model's loss also ranks low
        # every clean sample of a class it is biased toward (measured: 46 of the 64 lowest on an 800-image folder)
)
