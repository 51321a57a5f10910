"""The training engine: one short loop that every stage uses.

Tensors in, tensors out. The whole data set is one uint8 tensor (N, H, W, C) on the device; each batch is
gathered by index, converted to float NCHW and augmented as a batch on the device. A stage shapes what is
learned through the per-sample loss function (`loss_fn`) and per-sample weights, e.g. gradient ascent for
unlearning, symmetric cross-entropy, or LfD's signed weights.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from components import checkpoint as checkpoints
from components.params import TrainParams

# (logits, labels, sample indices) -> per-sample loss, shape (B,)
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
EpochCallback = Callable[[int, nn.Module, dict], None]
# (model, float batch, labels) -> the batch to train on, e.g. PGD adversarial examples (A-ABL Eq. 1's inner max).
# One that draws random numbers keeps their torch.Generator as its attribute `generator`, which checkpoints restore.
Perturb = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
# (model, float batch, labels, sample indices) -> (logits, per-sample loss): a loss that needs more than the batch's
# logits, e.g. ABM's Eq. 2, which also reads the penultimate activations of a triggered copy; replaces `loss_fn`.
BatchLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y, reduction="none")


def bounded_ascent(ceiling: float) -> LossFn:
    """Unlearning loss: gradient ascent on cross-entropy, cut off per sample once its loss exceeds `ceiling`.

    The cut-off is the safeguard against divergence (as ABL's loss flooding): a sample already forgotten
    contributes no gradient, so ascent cannot blow the weights up chasing an unbounded loss.
    """

    def loss(logits, y, idx):
        return -F.cross_entropy(logits.float(), y, reduction="none").clamp(max=ceiling)

    return loss


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def machine_threads() -> int:
    """CPU cores this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a container's --cpus or a
    pod's CPU limit), which torch's default (the host's core count) ignores, oversubscribing small containers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def machine() -> str:
    """This machine in words, as the benchmark records it: CPU model, cores, GPU model (or "no GPU")."""
    import platform

    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}"


def use_machine_threads() -> None:
    """Intra-op threads = the cores this process may use (CPU training and scoring are compute-bound)."""
    if torch.get_num_threads() != machine_threads():
        torch.set_num_threads(machine_threads())


def compiled(model: nn.Module, p: TrainParams) -> nn.Module:
    """The model under `torch.compile` when `p.compile`, else the model itself.

    Dynamo traces the forward of the model's class and treats parameters and buffers as graph inputs (inlined
    built-in nn modules, the default since torch 2.5), so every later model of the same architecture, shape and
    dtype reuses the compiled graph: a pipeline compiles once per architecture (and train/eval mode), not once per
    training. Switched off on the CPU protocol, where compilation costs more than a 10-epoch run gains.
    """
    return torch.compile(model) if p.compile else model


def to_float(xb: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W) in [0, 1]."""
    return xb.permute(0, 3, 1, 2).float().div_(255)


def augment(x: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Batch-wise augmentation on the device: random crop (4-pixel zero padding + offset), horizontal flip."""
    n, _, h, w = x.shape
    if mode == "none":
        return x
    if mode == "crop_flip":
        pad = 4
        xp = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
        rows = (torch.arange(h, device=x.device)[None] + dy[:, None])[:, None, :, None]  # (n,1,h,1)
        cols = (torch.arange(w, device=x.device)[None] + dx[:, None])[:, None, None, :]  # (n,1,1,w)
        b = torch.arange(n, device=x.device)[:, None, None, None]
        c = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = xp[b, c, rows, cols]
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def optimizer(model: nn.Module, p: TrainParams) -> torch.optim.Optimizer:
    # fused: one kernel updates every parameter (CPU and CUDA), instead of a few small ops per parameter tensor
    if p.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=p.lr, weight_decay=p.weight_decay, fused=True)
    return torch.optim.SGD(model.parameters(), lr=p.lr, momentum=p.momentum, nesterov=p.nesterov and p.momentum > 0,
                           weight_decay=p.weight_decay, fused=True)


def _schedule(opt: torch.optim.Optimizer, p: TrainParams, steps_per_epoch: int):
    total = max(1, p.epochs * steps_per_epoch)
    if p.schedule == "onecycle" and total >= 4:  # linear warm-up over 25 % of the steps, then linear decay to ~0
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.lr, total_steps=total, pct_start=max(0.25, 2 / total),
                                                   anneal_strategy="linear", cycle_momentum=False)
    if p.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if p.schedule == "step":  # divide by 10 at each milestone epoch
        return torch.optim.lr_scheduler.MultiStepLR(opt, [m * steps_per_epoch for m in p.milestones], gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def autocast(device: torch.device, p: TrainParams):
    # bf16 autocast on CUDA only: CPUs without AMX run bf16 convolutions slower than fp32.
    if device.type == "cuda" and p.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def eval_model(model: nn.Module, device: torch.device) -> nn.Module:
    """The model on `device` in eval mode, for prediction and scoring (with the machine's threads on a CPU)."""
    if device.type == "cpu":
        use_machine_threads()
    return model.to(device).eval()


def prepare(model: nn.Module, p: TrainParams, device: torch.device) -> nn.Module:
    model = model.to(device)
    if p.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _generators(gen: torch.Generator, perturb: Perturb | None) -> dict[str, torch.Generator]:
    extra = getattr(perturb, "generator", None)
    return {"batches": gen, **({"perturb": extra} if isinstance(extra, torch.Generator) else {})}


def _state(model, opt, sched, generators: dict, history: list[dict], epochs: int, key: str) -> dict:
    """A checkpoint (components/checkpoint.py) after len(history) of `epochs` epochs; a finished training's leaves
    out the optimizer and scheduler."""
    done = len(history) == epochs
    return {"format": checkpoints.FORMAT, "key": key, "epoch": len(history), "epochs": epochs, "complete": done,
            "model": model.state_dict(), "optimizer": None if done else opt.state_dict(),
            "scheduler": None if done else sched.state_dict(),
            "generators": {k: g.get_state() for k, g in generators.items()}, "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [], "history": history}


def _restore(state: dict, model, opt, sched, generators: dict) -> None:
    model.load_state_dict(state["model"])
    if not state["complete"]:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    for k, g in generators.items():
        g.set_state(state["generators"][k])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available() and len(state["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, p: TrainParams, *,
          loss_fn: LossFn = cross_entropy, weights: torch.Tensor | None = None, perturb: Perturb | None = None,
          on_epoch: EpochCallback | None = None, desc: str = "train", device: torch.device | None = None,
          frozen_norm: bool = False, checkpoint: Path | None = None, batch_loss: BatchLoss | None = None) -> list[dict]:
    """Train `model` in place on uint8 `images` (N, H, W, C) with int64 `labels`; return one record per epoch.

    The batch loss is the mean over the batch of `weights[idx] * loss_fn(...)` (weights default to 1). With `perturb`,
    each augmented batch is replaced by `perturb(model, batch, labels)` before the step (adversarial training). With
    `batch_loss`, it computes each batch's logits and per-sample loss itself (in place of the forward and `loss_fn`).
    With `frozen_norm`, batch norm stays in eval mode: it normalizes with its running statistics and leaves them as they
    are, so the step acts on the function the model computes at inference (ABL's unlearning on a few samples).

    With `checkpoint` (a file) and `p.checkpoint_every` > 0, the training saves its state there every
    `checkpoint_every` epochs and after the last, and resumes from a checkpoint of this same training found there
    at the start (components/checkpoint.py): a resumed training ends with the weights of an uninterrupted one.
    """
    device = device or default_device()
    if device.type == "cpu":
        use_machine_threads()
    every = p.checkpoint_every if checkpoint is not None else 0
    key = checkpoints.training_key(model, images, labels, weights, p, desc=desc, loss_fn=batch_loss or loss_fn,
                                   perturb=perturb,
                                   frozen_norm=frozen_norm) if every else ""
    model = prepare(model, p, device)
    forward = compiled(model, p)
    x_all, y_all = images.to(device), labels.to(device)
    w_all = weights.to(device, torch.float32) if weights is not None else None
    n = len(y_all)
    steps = math.ceil(n / p.batch_size)
    opt = optimizer(model, p)
    sched = _schedule(opt, p, steps)
    gen = torch.Generator().manual_seed(p.seed)
    generators = _generators(gen, perturb)
    history, start = [], 0
    state = checkpoints.load(checkpoint, key, desc) if every else None
    if state is not None:
        _restore(state, model, opt, sched, generators)
        history, start = state["history"], state["epoch"]
        if state["complete"]:
            return history
    bar = tqdm(range(start, p.epochs), desc=desc, leave=False, disable=None, initial=start, total=p.epochs)
    for epoch in bar:
        model.train()
        if frozen_norm:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        t0, total_loss, correct = time.perf_counter(), torch.zeros((), device=device), torch.zeros((), device=device)
        for idx in torch.randperm(n, generator=gen).to(device).split(p.batch_size):
            xb = augment(to_float(x_all[idx]), p.augment, gen)
            if p.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yb = y_all[idx]
            with autocast(device, p):
                if perturb is not None:
                    xb = perturb(forward, xb, yb)
                if batch_loss is not None:
                    logits, per_sample = batch_loss(forward, xb, yb, idx)
                else:
                    logits = forward(xb)
            if batch_loss is None:
                per_sample = loss_fn(logits, yb, idx)
            loss = (per_sample * w_all[idx]).mean() if w_all is not None else per_sample.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if p.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
            opt.step()
            sched.step()
            total_loss += loss.detach() * len(idx)
            correct += (logits.argmax(1) == yb).sum()
        seconds = time.perf_counter() - t0
        record = {"epoch": epoch, "loss": total_loss.item() / n, "train_acc": correct.item() / n,
                  "seconds": seconds, "samples_per_second": n / seconds, "lr": opt.param_groups[0]["lr"]}
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"{desc}: loss became {record['loss']} in epoch {epoch}; lower the learning rate")
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['train_acc']:.3f}")
        if on_epoch is not None:
            on_epoch(epoch, model, record)
        if every and ((epoch + 1) % every == 0 or epoch + 1 == p.epochs):
            checkpoints.save(_state(model, opt, sched, generators, history, p.epochs, key), checkpoint)
    return history


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, *, batch_size: int = 1024, device: torch.device | None = None,
            bf16: bool = True) -> torch.Tensor:
    """Logits (N, K) in float32 on the CPU for uint8 `images` (N, H, W, C)."""
    device = device or default_device()
    model = eval_model(model, device)
    channels_last = next(model.parameters()).is_contiguous(memory_format=torch.channels_last)
    out = []
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and bf16 else nullcontext()
    for xb in images.split(batch_size):
        xb = to_float(xb.to(device))
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with ctx:
            out.append(model(xb).float().cpu())
    return torch.cat(out) if out else torch.empty(0)
