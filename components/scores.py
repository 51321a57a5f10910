"""Per-sample scores that tell poisoned from clean samples. Each returns one float per sample."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from components.engine import default_device, eval_model, predict, to_float


def random_patch_mask(n: int, h: int, w: int, r: int, gen: torch.Generator) -> torch.Tensor:
    """MeCa's RandomPatchMask(r): one r x r square of ones per sample at a uniformly random position, (n, 1, h, w)."""
    top = torch.randint(0, h - r + 1, (n,), generator=gen)
    left = torch.randint(0, w - r + 1, (n,), generator=gen)
    rows = torch.arange(h)[None, :, None]
    cols = torch.arange(w)[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < (top + r)[:, None, None])
              & (cols >= left[:, None, None]) & (cols < (left + r)[:, None, None]))
    return inside[:, None].float()


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(softmax(p) || softmax(q))."""
    log_p, log_q = F.log_softmax(logits_p.float(), 1), F.log_softmax(logits_q.float(), 1)
    return (log_p.exp() * (log_p - log_q)).sum(1)


def meca_perturbation(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MeCa Eq. 3 / Algorithm 1, lines 5-6: x_hat = x * (1 - m) + m * delta, delta = clip(g / ||g||_2, -eps, eps).

    g is the gradient of the loss with respect to delta, taken at delta = the original patch (x_hat = x), so
    g = m * dl/dx and its L2 norm runs over the masked patch. The patch is *replaced* by delta, not shifted.
    Returns x_hat and f(x) (the logits of the gradient pass, detached), so that the caller needs no second pass on x.
    """
    x = x.detach().requires_grad_(True)
    logits = model(x)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits.float(), y, reduction="sum"), x)
    g = grad * mask
    delta = (g / g.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]).clamp(-eps, eps)
    return x.detach() * (1 - mask) + mask * delta, logits.detach()


def meca_kl(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float, patch: int, seed: int,
            batch_size: int = 512, device: torch.device | None = None) -> np.ndarray:
    """MeCa Eq. 3: L_kl(f(x), f(x_hat)) per sample. Low = robust to the perturbation = poison-like."""
    device = device or default_device()
    model = eval_model(model, device)
    gen = torch.Generator().manual_seed(seed)
    _, h, w, _ = images.shape
    out = []
    for xb, yb in zip(images.split(batch_size), labels.split(batch_size)):
        x, y = to_float(xb.to(device)), yb.to(device)
        mask = random_patch_mask(len(x), h, w, min(patch, h, w), gen).to(device)
        x_hat, logits = meca_perturbation(model, x, y, mask, eps)
        with torch.no_grad():
            out.append(kl_divergence(logits, model(x_hat)).cpu())
    return torch.cat(out).numpy()


def symmetric_cross_entropy(logits: torch.Tensor, y: torch.Tensor, alpha: float = 0.1, beta: float = 1.0,
                            log_zero: float = -9.2103) -> torch.Tensor:
    """Per-sample SCE = alpha * CE + beta * RCE (Wang et al. 2019, "Symmetric Cross Entropy for
    Robust Learning with Noisy Labels"; A-ABL section 5.2).

    RCE = -sum_k p_k log q_k with q the one-hot label, log 0 taken as `log_zero` (= log 1e-4, the reference code's
    clamp): RCE = -log_zero * (1 - p_y). It raises the loss of misclassified samples, so that adversarially
    vulnerable samples stand apart from robust ones.
    """
    ce = F.cross_entropy(logits.float(), y, reduction="none")
    p_y = F.softmax(logits.float(), 1).gather(1, y[:, None]).squeeze(1)
    return alpha * ce + beta * (-log_zero) * (1 - p_y)


def ifgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step: float, steps: int,
          random_start: bool = False, gen: torch.Generator | None = None) -> torch.Tensor:
    """Iterative FGSM (Kurakin et al. 2017) and, with `random_start`, PGD (Madry et al. 2018, A-ABL Eq. 1's inner max):
    x_{t+1} = clip_{[0,1]}(clip_{x, eps}(x_t + step * sign(grad_x CE(f(x_t), y)))). Float NCHW in [0, 1] in and out."""
    x = x.detach()
    x_adv = x
    if random_start:
        noise = torch.rand(x.shape, generator=gen).to(x.device) * 2 - 1
        x_adv = (x + eps * noise).clamp(0, 1)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv).float(), y, reduction="sum"), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + step * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def adv_sce(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float, step: float, steps: int,
            alpha: float = 0.1, beta: float = 1.0, batch_size: int = 512,
            device: torch.device | None = None) -> np.ndarray:
    """A-ABL stage 2 (section 5.2): SCE of the iFGSM adversarial example against the sample's own label.
    Low = robust to the perturbation = Category A poison-like."""
    device = device or default_device()
    model = eval_model(model, device)
    out = []
    for xb, yb in zip(images.split(batch_size), labels.split(batch_size)):
        x, y = to_float(xb.to(device)), yb.to(device)
        x_adv = ifgsm(model, x, y, eps=eps, step=step, steps=steps)
        with torch.no_grad():
            out.append(symmetric_cross_entropy(model(x_adv), y, alpha, beta).cpu())
    return torch.cat(out).numpy()


def sample_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 512,
                device: torch.device | None = None) -> np.ndarray:
    """Per-sample cross-entropy of the model in eval mode, without augmentation, in float32 (ABL's isolation score,
    LfD's teacher loss). Low = fitted early = poison-like."""
    logits = predict(model, images, batch_size=batch_size, device=device, bf16=False)
    return F.cross_entropy(logits, labels, reduction="none").numpy()
