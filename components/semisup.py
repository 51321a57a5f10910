"""MixMatch (Berthelot et al. 2019, "MixMatch: A Holistic Approach to Semi-Supervised Learning"): the semi-supervised
training that BSD, ASD and DBD share, written once.

Those defenses train their final model on a labelled pool (the samples they trust, with their labels) and an
unlabelled pool (the rest, labels dropped), and BSD and ASD choose the pools anew every epoch. So the unit here is
one epoch (`epoch`): a fixed number of iterations on the pools the caller gives, as two index tensors. The caller
owns the epochs and whatever happens between them (re-partitioning, a second model, checkpoints); nothing here knows
how the pools were chosen. ASD's loop (`KuofengGao/ASD: utils/trainer/semi.py`) and DBD's semi-supervised stage run
the same epoch with their own pools.

Each iteration (BSD paper 003, App. C.6, Eqs. 13-15; ASD's code and settings):
1. a labelled batch x with one-hot labels q, and an unlabelled batch u under two random augmentations u1, u2;
2. the label guess p = (softmax f(u1) + softmax f(u2)) / 2, sharpened: q~ = p^(1/T) / sum_k p_k^(1/T) (`sharpen`);
3. mixup of the concatenation W = [x, u1, u2] (targets [q, q~, q~]) with a random permutation of itself:
   lambda ~ Beta(a, a), lambda' = max(lambda, 1 - lambda) (`mix_coefficient`), so each mixed sample stays closer to
   its own input and the first B mixed samples remain "labelled";
4. L = L_x + lambda_u(t) L_u (Eq. 15): L_x = the cross-entropy of the mixed labelled part against its soft targets
   (Eq. 13), L_u = the squared error between the softmax of the mixed unlabelled part and its targets, a mean over
   samples and classes (Eq. 14; ASD's code averages, the paper writes a sum); lambda_u(t) = lambda_u * clip(t /
   rampup, 0, 1) with t = epoch + iteration / iterations (`rampup_weight`).

Choices where the sources leave room:
- One forward pass over the whole mixed batch (3B samples). The reference implementations run three sub-batches and
  "interleave" them so that every sub-batch's batch-norm statistics mix labelled and unlabelled samples
  (`YU1ut/MixMatch-pytorch: train.py`); a single pass gives every sample the statistics of the whole mixed batch,
  which is what interleaving approximates, in one pass instead of three.
- The guess runs in train mode without gradients on u1 and u2 together (the references: train mode, two passes).
- Batches are drawn by cycling random permutations of each pool (a data loader that restarts when exhausted), anew
  each epoch, so an epoch depends only on the pools and the generator: a resumed training repeats it exactly. A pool
  smaller than the batch is repeated within the batch. An empty unlabelled pool leaves L = L_x.
- The learning rate is constant (ASD: Adam 0.002, no schedule) unless the caller passes `lr`, the learning rate as a
  function of t (epochs, fractional), set before every iteration: a function of t alone, so a resumed training
  repeats it without a scheduler state. The optimizer is the caller's.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from components import engine
from components.errors import UnpoisonError
from components.params import Strict, TrainParams


class MixMatchParams(Strict):
    """MixMatch's own settings (ASD's, which BSD adopts: App. C.4, C.6); the batch size, optimizer, learning rate and
    augmentation are those of the `TrainParams` the epoch runs with."""

    iterations: int = Field(1024, ge=1)  # iterations per epoch
    temperature: float = Field(0.5, gt=0)  # T of the sharpening
    mix_alpha: float = Field(0.75, gt=0)  # a of Beta(a, a)
    lambda_u: float = Field(15.0, ge=0)  # weight of L_u after the ramp-up (ASD and BSD: 15, not MixMatch's 75)
    rampup: int | None = Field(None, ge=1)  # ramp-up length in epochs; None: the caller's total epochs (ASD: 120)


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """q~ = p^(1/T) / sum_k p_k^(1/T), row by row: T < 1 lowers the entropy of the guessed label distribution."""
    pt = p.pow(1.0 / temperature)
    return pt / pt.sum(1, keepdim=True)


def mix_coefficient(lam: float) -> float:
    """lambda' = max(lambda, 1 - lambda): the mixed sample keeps more of its own input than of its partner's."""
    return max(lam, 1.0 - lam)


def rampup_weight(lambda_u: float, t: float, rampup: float) -> float:
    """lambda_u(t) = lambda_u * clip(t / rampup, 0, 1), t in epochs (fractional within an epoch)."""
    return lambda_u * float(np.clip(t / rampup, 0.0, 1.0))


def mixmatch_loss(logits: torch.Tensor, targets: torch.Tensor, n_labelled: int, weight: float):
    """(L, L_x, L_u) of Eq. 15 for the logits of the mixed batch whose first `n_labelled` rows are the labelled part."""
    logits = logits.float()
    loss_x = -(targets[:n_labelled] * F.log_softmax(logits[:n_labelled], 1)).sum(1).mean()  # Eq. 13
    if len(logits) == n_labelled:
        return loss_x, loss_x, torch.zeros((), device=logits.device)
    loss_u = (F.softmax(logits[n_labelled:], 1) - targets[n_labelled:]).pow(2).mean()  # Eq. 14 (mean, as ASD)
    return loss_x + weight * loss_u, loss_x, loss_u  # Eq. 15


class _Cycle:
    """Batches of a pool's sample indices: random permutations of the pool, one after another."""

    def __init__(self, pool: torch.Tensor, gen: torch.Generator):
        self.pool, self.gen, self.queue = pool, gen, pool[:0]

    def take(self, n: int) -> torch.Tensor:
        while len(self.queue) < n:
            self.queue = torch.cat([self.queue, self.pool[torch.randperm(len(self.pool), generator=self.gen)]])
        batch, self.queue = self.queue[:n], self.queue[n:]
        return batch


def epoch(model: nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
          labelled: torch.Tensor, unlabelled: torch.Tensor, p: TrainParams, mm: MixMatchParams, *, epoch: int,
          rampup: int, num_classes: int, gen: torch.Generator, device: torch.device,
          lr: Callable[[float], float] | None = None) -> dict:
    """One MixMatch epoch of `mm.iterations` iterations: `model` (already on `device`, in place) learns from the
    samples `labelled` (indices into `images`, with `labels`) and `unlabelled` (indices, labels unused), batch
    `p.batch_size` each. `images` (N, H, W, C) uint8 and `labels` are on `device`. Returns the epoch's record."""
    if len(labelled) == 0:
        raise UnpoisonError("the labelled pool of the semi-supervised training is empty; check the defense's split "
                            "(a larger clean share) or the data set")
    b = p.batch_size
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))  # lambda ~ Beta(a, a)
    lab, unl = _Cycle(labelled.cpu(), gen), (_Cycle(unlabelled.cpu(), gen) if len(unlabelled) else None)
    eye = torch.eye(num_classes, device=device)
    model.train()
    t0, sums = time.perf_counter(), torch.zeros(3, device=device)
    weight = 0.0
    for it in range(mm.iterations):
        idx = lab.take(b).to(device)
        x, q = engine.augment(engine.to_float(images[idx]), p.augment, gen), eye[labels[idx]]
        if unl is not None:
            u = engine.to_float(images[unl.take(b).to(device)])
            u = torch.cat([engine.augment(u, p.augment, gen), engine.augment(u, p.augment, gen)])  # u1, u2
            with torch.no_grad(), engine.autocast(device, p):
                guess = F.softmax(model(_layout(u, p)).float(), 1)
                q_u = sharpen((guess[:b] + guess[b:]) / 2, mm.temperature)  # the guess, sharpened
            w_in, w_target = torch.cat([x, u]), torch.cat([q, q_u, q_u])
        else:
            w_in, w_target = x, q
        lam = mix_coefficient(float(rng.beta(mm.mix_alpha, mm.mix_alpha)))
        perm = torch.randperm(len(w_in), generator=gen).to(device)
        mixed = lam * w_in + (1 - lam) * w_in[perm]
        mixed_target = lam * w_target + (1 - lam) * w_target[perm]
        t = epoch + it / mm.iterations
        if lr is not None:
            for group in opt.param_groups:
                group["lr"] = lr(t)
        weight = rampup_weight(mm.lambda_u, t, rampup)
        with engine.autocast(device, p):
            logits = model(_layout(mixed, p))
        loss, loss_x, loss_u = mixmatch_loss(logits, mixed_target, b, weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if p.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
        opt.step()
        sums += torch.stack([loss.detach(), loss_x.detach(), loss_u.detach()])
    seconds = time.perf_counter() - t0
    loss, loss_x, loss_u = (sums / mm.iterations).tolist()
    if not np.isfinite(loss):
        raise FloatingPointError(f"MixMatch: loss became {loss} in epoch {epoch}; lower the learning rate")
    trained = mm.iterations * b * (3 if unl is not None else 1)
    return {"epoch": epoch, "loss": loss, "loss_x": loss_x, "loss_u": loss_u, "lambda_u": weight, "seconds": seconds,
            "samples_per_second": trained / seconds, "lr": opt.param_groups[0]["lr"], "labelled": len(labelled),
            "unlabelled": len(unlabelled)}


def _layout(x: torch.Tensor, p: TrainParams) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if p.channels_last else x
