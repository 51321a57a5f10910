"""Per-sample scores that tell poisoned from clean samples. Each returns one float per sample."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from components.engine import default_device, to_float


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


def meca_perturbation(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    """MeCa Eq. 3 / Algorithm 1, lines 5-6: x_hat = x * (1 - m) + m * delta, delta = clip(g / ||g||_2, -eps, eps).

    g is the gradient of the loss with respect to delta, taken at delta = the original patch (x_hat = x), so
    g = m * dl/dx and its L2 norm runs over the masked patch. The patch is *replaced* by delta, not shifted.
    """
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x).float(), y, reduction="sum"), x)
    g = grad * mask
    delta = (g / g.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]).clamp(-eps, eps)
    return x.detach() * (1 - mask) + mask * delta


def meca_kl(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float, patch: int, seed: int,
            batch_size: int = 512, device: torch.device | None = None) -> np.ndarray:
    """MeCa Eq. 3: L_kl(f(x), f(x_hat)) per sample. Low = robust to the perturbation = poison-like."""
    device = device or default_device()
    model = model.to(device).eval()
    gen = torch.Generator().manual_seed(seed)
    _, h, w, _ = images.shape
    out = []
    for xb, yb in zip(images.split(batch_size), labels.split(batch_size)):
        x, y = to_float(xb.to(device)), yb.to(device)
        mask = random_patch_mask(len(x), h, w, min(patch, h, w), gen).to(device)
        x_hat = meca_perturbation(model, x, y, mask, eps)
        with torch.no_grad():
            out.append(kl_divergence(model(x), model(x_hat)).cpu())
    return torch.cat(out).numpy()
