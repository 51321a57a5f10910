"""Per-sample scores: KL divergence, MeCa's random patch mask, perturbation (Eq. 3) and KL score; A-ABL's SCE and iFGSM."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from components.scores import (adv_sce, ifgsm, kl_divergence, meca_kl, meca_perturbation, random_patch_mask,
                               symmetric_cross_entropy)

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------- KL


def test_kl_divergence_matches_hand_computation():
    a = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]])
    b = np.array([[0.1, 1.0, 0.3], [1.0, -2.0, 0.5]])

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p, q = softmax(a), softmax(b)
    expected = (p * np.log(p / q)).sum(1)
    got = kl_divergence(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32))
    assert got.shape == (2,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    # KL is not symmetric: the order of the arguments matters
    assert not np.allclose(kl_divergence(torch.tensor(b), torch.tensor(a)).numpy(), expected, rtol=1e-3)


def test_kl_divergence_first_row_by_hand():
    # p = softmax([0, 0, 0]) = 1/3 each, q = softmax([log 1, log 2, log 1]) = (1/4, 1/2, 1/4)
    p = torch.zeros(1, 3)
    q = torch.log(torch.tensor([[1.0, 2.0, 1.0]]))
    expected = (1 / 3) * (np.log((1 / 3) / 0.25) * 2 + np.log((1 / 3) / 0.5))
    assert kl_divergence(p, q).item() == pytest.approx(expected, rel=1e-5)


def test_kl_divergence_zero_for_identical_and_shift_invariant():
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(kl_divergence(z, z).numpy(), 0.0, atol=1e-6)
    np.testing.assert_allclose(kl_divergence(z, z + 7.0).numpy(), 0.0, atol=1e-5)  # softmax ignores a constant


def test_kl_divergence_non_negative_and_positive_when_different():
    g = torch.Generator().manual_seed(1)
    p, q = torch.randn(64, 10, generator=g) * 3, torch.randn(64, 10, generator=g) * 3
    kl = kl_divergence(p, q)
    assert kl.shape == (64,)
    assert (kl >= -1e-6).all()
    assert (kl > 1e-4).all()


# ---------------------------------------------------------------------------------------------- mask


def test_random_patch_mask_has_one_square_per_sample_inside_bounds():
    n, h, w, r = 200, 10, 12, 4
    m = random_patch_mask(n, h, w, r, torch.Generator().manual_seed(0))
    assert m.shape == (n, 1, h, w)
    assert m.dtype == torch.float32
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert (m.flatten(1).sum(1) == r * r).all()  # a square cut by the border would have fewer ones
    for i in range(n):
        rows = torch.nonzero(m[i, 0].any(1)).flatten()
        cols = torch.nonzero(m[i, 0].any(0)).flatten()
        assert len(rows) == r and len(cols) == r  # one contiguous r x r block
        assert rows.max() - rows.min() == r - 1 and cols.max() - cols.min() == r - 1
        assert m[i, 0, rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()


def test_random_patch_mask_positions_vary_and_reach_the_borders():
    n, h, w, r = 400, 8, 8, 3
    m = random_patch_mask(n, h, w, r, torch.Generator().manual_seed(0))[:, 0]
    tops = m.any(2).float().argmax(1)
    lefts = m.any(1).float().argmax(1)
    assert len(set(zip(tops.tolist(), lefts.tolist()))) > 20
    assert tops.min() == 0 and tops.max() == h - r
    assert lefts.min() == 0 and lefts.max() == w - r


def test_random_patch_mask_full_size_patch_covers_everything():
    m = random_patch_mask(3, 5, 5, 5, torch.Generator().manual_seed(0))
    assert (m == 1).all()


def test_random_patch_mask_deterministic_per_seed():
    a = random_patch_mask(50, 16, 16, 4, torch.Generator().manual_seed(7))
    b = random_patch_mask(50, 16, 16, 4, torch.Generator().manual_seed(7))
    c = random_patch_mask(50, 16, 16, 4, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ---------------------------------------------------------------------------------------------- perturbation


class Linear(nn.Module):
    """logits = W flatten(x) + b: the input gradient of cross-entropy is known in closed form."""

    def __init__(self, c, h, w, k, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(k, c * h * w, generator=g))
        self.bias = nn.Parameter(torch.randn(k, generator=g))

    def forward(self, x):
        return x.flatten(1) @ self.weight.T + self.bias


class Constant(nn.Module):
    """Same logits whatever the input (the input stays in the graph, with zero gradient)."""

    def __init__(self, k):
        super().__init__()
        self.bias = nn.Parameter(torch.arange(k, dtype=torch.float32))

    def forward(self, x):
        return x.flatten(1)[:, :1] * 0 + self.bias


class TinyNet(nn.Module):
    def __init__(self, k=4):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, k)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


def _batch(n=6, c=3, h=8, w=8, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g), torch.randint(0, k, (n,), generator=g)


def test_meca_perturbation_keeps_outside_and_replaces_inside():
    x, y = _batch()
    mask = random_patch_mask(len(x), 8, 8, 3, torch.Generator().manual_seed(0))
    eps = 0.05
    x_hat, _ = meca_perturbation(Linear(3, 8, 8, 4), x, y, mask, eps)
    assert x_hat.shape == x.shape
    outside = mask.expand_as(x) == 0
    assert torch.equal(x_hat[outside], x[outside])  # exactly untouched
    inside = x_hat[~outside]
    assert inside.abs().max() <= eps + 1e-7  # replaced by delta: within +-eps whatever x was
    # x is uniform in [0, 1]: an additive perturbation would leave values far above eps
    assert x[~outside].max() > 5 * eps
    assert not x_hat.requires_grad


def test_meca_perturbation_equals_clipped_normalized_gradient_for_linear_model():
    n, c, h, w, k, r = 5, 3, 6, 6, 4, 3
    model = Linear(c, h, w, k)
    x, y = _batch(n, c, h, w, k, seed=3)
    mask = random_patch_mask(n, h, w, r, torch.Generator().manual_seed(2))
    # closed form: d CE / d x = W^T (softmax(W x + b) - onehot(y))
    with torch.no_grad():
        probs = torch.softmax(x.flatten(1) @ model.weight.T + model.bias, 1)
        grad = ((probs - F.one_hot(y, k).float()) @ model.weight).view(n, c, h, w)
    g = grad * mask
    unit = g / g.flatten(1).norm(dim=1)[:, None, None, None]
    # per sample, an eps between the patch's smallest and largest |unit|: some entries clip and some do not
    eps = float(unit[mask.expand_as(unit) == 1].abs().median())
    expected = x * (1 - mask) + mask * unit.clamp(-eps, eps)
    got, logits = meca_perturbation(model, x, y, mask, eps)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, model(x).detach())  # f(x) of the gradient pass, reused for the KL
    inside = mask.expand_as(x) == 1
    assert (got[inside].abs() >= eps - 1e-6).any() and (got[inside].abs() < eps - 1e-4).any()
    # the L2 norm runs over the masked patch only: with a large eps the patch has unit norm
    big, _ = meca_perturbation(model, x, y, mask, 10.0)
    torch.testing.assert_close((big * mask).flatten(1).norm(dim=1), torch.ones(n), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- MeCa KL score


def _uint8(n=10, h=8, w=8, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), generator=g, dtype=torch.uint8), torch.randint(0, k, (n,), generator=g)


def test_meca_kl_one_finite_nonnegative_value_per_sample():
    images, labels = _uint8(10)
    kl = meca_kl(TinyNet(), images, labels, eps=0.1, patch=3, seed=0, batch_size=4, device=CPU)
    assert isinstance(kl, np.ndarray)
    assert kl.shape == (10,)
    assert np.isfinite(kl).all()
    assert (kl >= -1e-7).all()
    assert (kl > 0).any()


def test_meca_kl_same_seed_same_values_other_seed_other_values():
    images, labels = _uint8(12, seed=1)
    a = meca_kl(TinyNet(), images, labels, eps=0.1, patch=3, seed=5, batch_size=5, device=CPU)
    b = meca_kl(TinyNet(), images, labels, eps=0.1, patch=3, seed=5, batch_size=5, device=CPU)
    c = meca_kl(TinyNet(), images, labels, eps=0.1, patch=3, seed=6, batch_size=5, device=CPU)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_meca_kl_patch_larger_than_image_is_clamped():
    images, labels = _uint8(3, h=4, w=4)
    kl = meca_kl(TinyNet(), images, labels, eps=0.1, patch=8, seed=0, device=CPU)
    assert kl.shape == (3,) and np.isfinite(kl).all()


def test_meca_kl_zero_for_model_that_ignores_its_input():
    images, labels = _uint8(6)
    kl = meca_kl(Constant(4), images, labels, eps=0.1, patch=3, seed=0, device=CPU)
    np.testing.assert_allclose(kl, 0.0, atol=1e-7)


# ---------------------------------------------------------------------------------------------- A-ABL: SCE and iFGSM


def test_symmetric_cross_entropy_by_hand():
    # logits (0, ln 3): p = (1/4, 3/4). Label 1: CE = -ln(3/4), RCE = -ln(1e-4) * (1 - 3/4).
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    y = torch.tensor([1, 0])
    got = symmetric_cross_entropy(logits, y, alpha=0.1, beta=1.0)
    a = 0.1 * -math.log(0.75) + 9.2103 * 0.25
    b = 0.1 * -math.log(0.25) + 9.2103 * 0.75
    torch.testing.assert_close(got, torch.tensor([a, b]), rtol=1e-5, atol=1e-6)
    # beta = 0 leaves alpha * CE; a misclassified sample always scores higher than a well classified one
    torch.testing.assert_close(symmetric_cross_entropy(logits, y, alpha=1.0, beta=0.0),
                               F.cross_entropy(logits, y, reduction="none"))


@pytest.mark.parametrize("random_start", [False, True])
def test_ifgsm_stays_in_the_eps_ball_and_the_unit_cube(random_start):
    x, y = _batch(n=16, seed=4)
    x[:4] = 0.0  # pixels at the cube's edges: the clip to [0, 1] must hold them
    x[4:8] = 1.0
    eps = 8 / 255
    adv = ifgsm(TinyNet(), x, y, eps=eps, step=2 / 255, steps=10, random_start=random_start,
                gen=torch.Generator().manual_seed(0))
    assert adv.shape == x.shape and not adv.requires_grad
    assert (adv - x).abs().max() <= eps + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() > eps / 2  # it moved


def test_ifgsm_raises_the_loss_of_a_linear_model():
    model = Linear(3, 8, 8, 4)
    x, y = _batch(n=8, seed=5)
    x = x * 0.5 + 0.25  # away from the cube's edges, so the step is not clipped
    adv = ifgsm(model, x, y, eps=2 / 255, step=2 / 255, steps=1)
    # one step of size eps along sign(grad): exactly x + eps * sign(grad)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    torch.testing.assert_close(adv, x + 2 / 255 * grad.sign())
    with torch.no_grad():
        assert (F.cross_entropy(model(adv), y, reduction="none") > F.cross_entropy(model(x), y, reduction="none")).all()


def test_adv_sce_one_value_per_sample_whatever_the_batch_size():
    images, labels = _uint8(10, seed=2)
    a = adv_sce(TinyNet(), images, labels, eps=2 / 255, step=2 / 255, steps=5, batch_size=3, device=CPU)
    b = adv_sce(TinyNet(), images, labels, eps=2 / 255, step=2 / 255, steps=5, batch_size=10, device=CPU)
    assert a.shape == (10,) and np.isfinite(a).all() and (a > 0).all()
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # a model that ignores its input has no adversarial direction: SCE of the clean prediction
    c = adv_sce(Constant(4), images, labels, eps=2 / 255, step=2 / 255, steps=5, device=CPU)
    expected = symmetric_cross_entropy(Constant(4)(torch.zeros(10, 3, 8, 8)), labels)
    np.testing.assert_allclose(c, expected.detach().numpy(), rtol=1e-5)
