"""Input-aware dynamic backdoor, IAB / IAD (Nguyen and Tran, "Input-Aware Dynamic Backdoor Attack", NeurIPS 2020;
reference code `VinAIResearch/input-aware-backdoor-attack-release`, as in `SCLBD/BackdoorBench: attack/inputaware.py`
with `config/attack/inputaware/default.yaml`, and `THUYimingLi/BackdoorBox: core/attacks/IAD.py`).

Dirty label. Trigger: one pattern and one mask per image, both made by generators from the image itself, x' = x +
m(x) * (G(x) - x), where G(x) in [0, 1] (tanh(.) / 2 + 0.5, as the reference) is the pattern and m(x) = tanh(20 M(x)
- 10) / 2 + 0.5 (the reference's threshold) a nearly binary, sparse mask. The reference trains G jointly with the
victim classifier (a training-control attack); this is its poisoning-set version (our notes, defenses-wave2 section
5): the attack trains G, M and a classifier of its own while it poisons, then delivers round(rate * N) images outside
the target class (every class with mapping all2all) as x' with the target label (y + 1 mod K for all2all).

Training, on the CPU and seeded by the poison seed (deterministic per seed on one machine), in batches of
`batch_size` (128, as the reference) of all the images being poisoned:
1. mask: M alone for `mask_epochs` (1; the reference: 25) with Adam (lr 0.01, betas (0.5, 0.9)) on lambda_norm *
   mean(relu(m(x1) - mask_density)) + lambda_div^2 * mean(d(x1, x2) / (d(m(x1), m(x2)) + 1e-7)) (lambda_div twice, as
   the reference), d the root mean square difference per image; `lambda_norm` 100, `mask_density` 0.032, `lambda_div`
   1 (the reference's). The partner x2 of each image is the next image of its batch (the reference draws it from a
   second shuffled loader, at twice the cost). M is then frozen: the mask is trained, once, before G.
2. joint: G and the classifier for `epochs` (2), each epoch over two independent shuffles x1 and x2 (the reference's
   two loaders); in each batch the first int(train_ratio * batch) images (`train_ratio` 0.1, the reference's pratio)
   get their own trigger and the mapped label (the backdoor loss), the next as many get the pattern and mask of their
   partner x2 and keep their label (the cross loss; as many cross as backdoor images, as BackdoorBench), the rest stay
   clean; loss CE(C(batch), labels) + lambda_div * mean(d(x1, x2) / (d(G(x1), G(x2)) + 1e-7)) over the backdoor images
   and their partners (the diversity loss). G: Adam (lr 0.01, betas (0.5, 0.9)), as the reference; the classifier:
   SGD (momentum 0.9, weight decay 5e-4, as the reference) at lr 0.05, the surrogate's (the reference's 0.01 is for a
   ResNet with batch norm, and leaves the small CNN at chance in two epochs).
3. batch norm: the generators' running statistics are re-estimated after training, as plain averages over up to
   2,048 images drawn with the seed (the reference keeps its momentum-0.05 running averages, which a short training
   leaves stale: the eval-mode patterns then hardly depend on the image).
The trained G and M (parameters and batch-norm statistics, G then M, 22,436 floats) are stored in the spec as
`trigger`, base64 of float32 little-endian (120 kB of text), so the test set is triggered from the spec alone and
the poison is made with exactly those weights; give `trigger` to skip the training. The training trigger and the test
trigger are the same function, computed in eval mode (an image's trigger does not depend on the other images of its
batch).

Optional cross samples in the delivered set: round(cross_ratio * rate * N) further images (disjoint from the poison)
get the pattern and mask generated for another, randomly drawn, unpoisoned image and keep their labels (the cover
samples, is_cover). `cross_ratio` is 0 by default: the cross loss already shapes G in the attack's own training;
give cross_ratio=1 for BackdoorBench's delivered set (as many cross as backdoor samples).

The generators are much smaller than the reference's: G and M are the reference's MNIST layout (two down and two up
steps of its Conv2dBlock: 3x3 convolution, batch norm (momentum 0.05), ReLU; 2x2 max-pooling, bilinear 2x upsampling)
at half its width, 8 and 16 channels (the reference's CIFAR-10 generators have three steps of 32, 64 and 128):
11,097 parameters for G, 10,947 for M (one output channel). The classifier is the small CNN of
components/attacks/surrogate.py (the reference: PreActResNet-18). Image sides must be multiples of 4.

Cost with the defaults (1 mask and 2 joint epochs, one thread): 21.8 s of CPU for 10,000 32x32 images (measured on
a 2-core x86 machine busy with other jobs, nice 19; 18.5 s in another run), about 2 s per 1,000 images, so about
100 to 110 s for 50,000 CIFAR-10 images. One mask epoch is about 80 steps on 10,000 images and 390 on 50,000; the
mask approaches mask_density in about 100 to 150 steps, so on small sets it stays denser (on the shipped
5,000-image sample, 40 steps: a mean mask of 0.08, 6 % of the pixels above 0.5; 10,000 random images: 0.05 and 3 %):
give mask_epochs=3 or more below 20,000 images for the reference's sparse masks.

Simplifications versus the reference: the small generators and classifier above; 1 mask and 2 joint epochs instead
of 25 and 1000 (the reference's learning-rate milestones are never reached, so no schedules); the mask's partner
images taken within the batch; no input normalisation (patterns are made and blended in [0, 1] pixels); no training
augmentation (the reference's random crop 5 and rotation 10); the victim is trained later on the delivered set, not
jointly with G; batch-norm statistics re-estimated after training (3. above); the delivered poison has no cross samples unless cross_ratio is given; the diversity loss's
distances are floored at 1e-6 (identical outputs would otherwise give NaN gradients).
"""

from __future__ import annotations

import base64
import binascii
import numbers

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import ImageSet
from ..errors import UnpoisonError
from .base import Attack, Poisoned
from .surrogate import freeze, surrogate, to_float

WIDTH = 8  # channels of the generators' first step (the second has 2 * WIDTH)
EPSILON = 1e-7  # the reference's EPSILON (diversity loss, tanh scaling)
LR_G = LR_M = 0.01  # the reference's lr_G and lr_M
LR_C = 0.05  # the surrogate's (surrogate.py); the reference's lr_C 0.01 is for a ResNet with batch norm
BETAS = (0.5, 0.9)  # Adam betas of G and M (the reference's)
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4  # the classifier's SGD (the reference's)
BN_MOMENTUM = 0.05  # the reference's Conv2dBlock
STATS_SAMPLES = 2048  # images the generators' batch-norm statistics are re-estimated on after training


def generator(c: int, out: int) -> nn.Sequential:
    """The encoder-decoder CNN of G (out = c) and M (out = 1), before the final tanh / 2 + 0.5."""

    def conv(i: int, o: int, relu: bool = True) -> list[nn.Module]:  # the reference's Conv2dBlock
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o, momentum=BN_MOMENTUM), *([nn.ReLU()] if relu else [])]

    w, w2 = WIDTH, 2 * WIDTH
    return nn.Sequential(*conv(c, w), *conv(w, w), nn.MaxPool2d(2),
                         *conv(w, w2), *conv(w2, w2), nn.MaxPool2d(2),
                         *conv(w2, w2),
                         nn.Upsample(scale_factor=2, mode="bilinear"), *conv(w2, w2), *conv(w2, w),
                         nn.Upsample(scale_factor=2, mode="bilinear"), *conv(w, w), *conv(w, out, relu=False))


def squash(raw: torch.Tensor) -> torch.Tensor:
    """The generators' output in [0, 1]: tanh(raw) / (2 + eps) + 0.5."""
    return torch.tanh(raw) / (2 + EPSILON) + 0.5


def threshold(m: torch.Tensor) -> torch.Tensor:
    """The reference's mask threshold: tanh(20 m - 10) / (2 + eps) + 0.5, nearly 0 or 1."""
    return torch.tanh(m * 20 - 10) / (2 + EPSILON) + 0.5


def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image, the root mean square difference (the reference's sqrt(mean(MSE))); the mean square is floored at
    1e-12 so that identical outputs give no infinite gradient (NaN)."""
    return (a - b).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-12).sqrt()


def diversity(x1: torch.Tensor, x2: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """mean(d(x1, x2) / (d(p1, p2) + eps)): small when different images get different patterns."""
    return (distance(x1, x2) / (distance(p1, p2) + EPSILON)).mean()


def weights(*modules: nn.Module) -> list[torch.Tensor]:
    """The modules' float tensors in state_dict order (parameters and batch-norm running statistics)."""
    return [t for m in modules for key, t in m.state_dict(keep_vars=True).items() if not key.endswith("num_batches_tracked")]


def pack(*modules: nn.Module) -> str:
    """base64 of `weights` as float32 little-endian."""
    flat = torch.cat([t.detach().reshape(-1) for t in weights(*modules)])
    return base64.b64encode(flat.numpy().astype("<f4").tobytes()).decode("ascii")


def unpack(blob: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(blob.encode("ascii"), validate=True), dtype="<f4")


class InputAware(Attack):
    """Dirty label: a per-image pattern and mask from generators trained with backdoor, cross and diversity losses."""

    name = "input_aware"
    defaults = {"epochs": 2, "mask_epochs": 1, "batch_size": 128, "train_ratio": 0.1, "lambda_div": 1.0,
                "lambda_norm": 100.0, "mask_density": 0.032, "cross_ratio": 0.0, "trigger": None}
    # the joint epochs scale with the protocol's attack.epochs (base.py: 2 at the CPU protocol's 5); the mask keeps
    # its 1 epoch, which reaches mask_density on a full data set (390 steps on 50,000 images; it needs 100 to 150)
    budget = ("epochs",)

    def check(self) -> None:
        for key in ("epochs", "mask_epochs", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < (2 if key == "batch_size" else 0):
                raise UnpoisonError(f"input_aware {key} {value!r} is not a valid count; defaults are epochs 2, mask_epochs 1 "
                                    f"(both may be 0: untrained), batch_size 128 (at least 2)")
            setattr(self, key, int(value))
        r = self.train_ratio
        if not isinstance(r, numbers.Real) or isinstance(r, bool) or not 0 < r <= 0.5:
            raise UnpoisonError(f"input_aware train_ratio {r!r} is outside (0, 0.5]; give the share of each training batch "
                                f"that gets the trigger (as many more get cross patterns), 0.1 as the reference")
        if int(r * self.batch_size) < 1:
            raise UnpoisonError(f"input_aware train_ratio {r} of batch_size {self.batch_size} gives no backdoor image per "
                                f"training batch; raise train_ratio or batch_size so that train_ratio x batch_size >= 1")
        for key in ("lambda_div", "lambda_norm", "cross_ratio"):
            value = getattr(self, key)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value < float("inf"):
                raise UnpoisonError(f"input_aware {key} {value!r} is not a non-negative number; defaults are lambda_div 1, "
                                    f"lambda_norm 100, cross_ratio 0")
        d = self.mask_density
        if not isinstance(d, numbers.Real) or isinstance(d, bool) or not 0 < d < 1:
            raise UnpoisonError(f"input_aware mask_density {d!r} is outside (0, 1); give the mask's target share of the "
                                f"image, 0.032 as the reference")
        if self.trigger is not None:
            try:
                flat = unpack(self.trigger) if isinstance(self.trigger, str) else None
            except (binascii.Error, ValueError, UnicodeEncodeError):
                flat = None
            if flat is None or len(flat) == 0 or not np.all(np.isfinite(flat)):
                raise UnpoisonError("input_aware trigger is not the base64 text of the generators' float32 weights (as "
                                    "written to the spec when the attack poisons); leave it out to train them")
        self._nets: dict = {}

    # --- the trigger: G and M from the spec ---

    def networks(self, c: int, h: int, w: int) -> tuple[nn.Module, nn.Module]:
        """G and M for c-channel images, loaded from `trigger`, in eval mode (CPU, float32), built once per c."""
        if self.trigger is None:
            raise UnpoisonError("input_aware has no trigger yet: its generators are trained when the attack poisons a "
                                "training set; poison one first, or give params.trigger")
        if h % 4 or w % 4:
            raise UnpoisonError(f"input_aware generators need image sides that are multiples of 4 but the images are "
                                f"{h}x{w}; resize them (e.g. data size 32)")
        if c not in self._nets:
            g, m = generator(c, c), generator(c, 1)
            flat = unpack(self.trigger)
            tensors = weights(g, m)
            sizes = [t.numel() for t in tensors]
            if len(flat) != sum(sizes):
                raise UnpoisonError(f"input_aware trigger holds {len(flat)} weights but the generators of {c}-channel images "
                                    f"have {sum(sizes)}; poison a data set of these images to train them")
            with torch.no_grad():
                for t, v in zip(tensors, torch.from_numpy(flat.copy()).split(sizes)):
                    t.copy_(v.view_as(t))
            self._nets[c] = (freeze(g), freeze(m))
        return self._nets[c]

    def pattern_mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """G(x) (N, C, H, W) and m(x) (N, 1, H, W), both in [0, 1], on x's device and dtype."""
        g, m = self.networks(*x.shape[1:])
        with torch.no_grad():
            xf = x.detach().to("cpu", torch.float32)
            return squash(g(xf)).to(x), threshold(squash(m(xf))).to(x)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x + m(x) * (G(x) - x): the training and the test trigger."""
        pattern, mask = self.pattern_mask(x)
        return (x + mask * (pattern - x)).clamp_(0, 1)

    def cross(self, x: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
        """x + m(x2) * (G(x2) - x): x with the pattern and mask of its partner image x2 (a cross sample)."""
        pattern, mask = self.pattern_mask(partner)
        return (x + mask * (pattern - x)).clamp_(0, 1)

    # --- poisoning ---

    def poison(self, ds: ImageSet) -> Poisoned:
        if self.trigger is None:
            if self.target >= ds.num_classes:  # before the training (Attack.poison checks it again)
                raise UnpoisonError(f"target class {self.target} does not exist in a data set of {ds.num_classes} classes; "
                                    f"choose 0 to {ds.num_classes - 1}")
            self.trigger = self.train(ds)
            self._nets.clear()
        return super().poison(ds)

    def cover(self, images: np.ndarray, labels: np.ndarray, is_poison: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Cross samples: round(cross_ratio * rate * N) unpoisoned images with another unpoisoned image's pattern and mask."""
        is_cover = np.zeros(len(images), dtype=bool)
        n_cover = round(self.cross_ratio * self.rate * len(images))
        if n_cover == 0:
            return is_cover
        pool = np.flatnonzero(~is_poison)
        idx = self.pick_cover(n_cover, pool, rng, f"besides {int(is_poison.sum())} poison")
        if len(pool) < 2:
            raise UnpoisonError("input_aware cross samples need a partner image besides themselves; lower the rate or cross_ratio")
        r = rng.integers(0, len(pool) - 1, size=n_cover)  # a partner other than the image itself
        partners = pool[r + (r >= np.searchsorted(pool, idx))]
        clean = images[partners].copy()  # partners are unpoisoned: read them before any cover is written
        out = np.empty_like(images[idx])
        for i in range(0, n_cover, 4096):
            x, p = to_float(images[idx[i : i + 4096]]), to_float(clean[i : i + 4096])
            out[i : i + 4096] = self.cross(x, p).mul_(255).round_().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        images[idx] = out
        is_cover[idx] = True
        return is_cover

    def train_labels(self, y: torch.Tensor, num_classes: int) -> torch.Tensor:
        """The mapped labels of backdoor images in training: `poison_labels` on a tensor."""
        return torch.from_numpy(self.poison_labels(y.cpu().numpy(), num_classes)).to(y.device)

    def train(self, ds: ImageSet) -> str:
        """Train M, then G with a classifier, on the CPU from the seed; the packed weights of G and M."""
        c, h, w = ds.images.shape[3], ds.images.shape[1], ds.images.shape[2]
        if h % 4 or w % 4:
            raise UnpoisonError(f"input_aware generators need image sides that are multiples of 4 but the images are "
                                f"{h}x{w}; resize them (e.g. data size 32)")
        x = to_float(ds.images)
        y = torch.from_numpy(ds.labels.astype(np.int64))
        with torch.random.fork_rng(devices=[]):  # the global RNG only for the layers' initialisation
            torch.manual_seed(self.seed)
            g, m, classifier = generator(c, c), generator(c, 1), surrogate(c, ds.num_classes)
        rand = torch.Generator().manual_seed(self.seed)
        bs = self.batch_size

        def batches():
            return zip(torch.randperm(len(x), generator=rand).split(bs), torch.randperm(len(x), generator=rand).split(bs))

        # 1. the mask generator alone: sparse masks (norm) that differ between images (diversity)
        opt_m = torch.optim.Adam(m.parameters(), lr=LR_M, betas=BETAS)
        m.train()
        for _ in range(self.mask_epochs):
            for i1 in torch.randperm(len(x), generator=rand).split(bs):
                if len(i1) < 2:  # no partner image (and no batch statistics)
                    continue
                x1 = x[i1]
                m1 = threshold(squash(m(x1)))
                x2, m2 = x1.roll(1, 0), m1.roll(1, 0)  # partners: the batch shifted by one
                loss = (self.lambda_norm * F.relu(m1 - self.mask_density).mean()
                        + self.lambda_div * self.lambda_div * diversity(x1, x2, m1, m2))  # the reference's lambda_div twice
                opt_m.zero_grad()
                loss.backward()
                opt_m.step()
        m = freeze(m)
        # 2. G and the classifier: backdoor, cross and diversity losses
        opt_c = torch.optim.SGD(classifier.parameters(), lr=LR_C, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        opt_g = torch.optim.Adam(g.parameters(), lr=LR_G, betas=BETAS)
        classifier.train()
        g.train()
        for _ in range(self.epochs):
            for i1, i2 in batches():
                nb = min(int(self.train_ratio * len(i1)), len(i2) // 2)
                x1, y1, x2 = x[i1], y[i1], x[i2]
                inputs, loss_div = x1, torch.zeros(())
                if nb > 0:
                    p1, p2 = squash(g(x1[:nb])), squash(g(x2[nb : 2 * nb]))
                    with torch.no_grad():
                        m1, m2 = threshold(squash(m(x1[:nb]))), threshold(squash(m(x2[nb : 2 * nb])))
                    bd = x1[:nb] + m1 * (p1 - x1[:nb])
                    cross = x1[nb : 2 * nb] + m2 * (p2 - x1[nb : 2 * nb])
                    inputs = torch.cat((bd, cross, x1[2 * nb :]))
                    y1 = torch.cat((self.train_labels(y1[:nb], ds.num_classes), y1[nb:]))
                    loss_div = self.lambda_div * diversity(x1[:nb], x2[nb : 2 * nb], p1, p2)
                loss = F.cross_entropy(classifier(inputs), y1) + loss_div
                opt_c.zero_grad()
                opt_g.zero_grad()
                loss.backward()
                opt_c.step()
                opt_g.step()
        self._classifier = classifier.eval()  # kept for inspection (tests); not part of the spec
        # 3. the generators' batch-norm statistics, re-estimated (plain averages over batches) on up to STATS_SAMPLES
        # images drawn with the seed: the eval-mode trigger then matches the training one however short the training
        pick = torch.randperm(len(x), generator=rand)[:STATS_SAMPLES]
        for net in (g, m):
            for layer in net.modules():
                if isinstance(layer, nn.BatchNorm2d):
                    layer.reset_running_stats()
                    layer.momentum = None  # cumulative average
            net.train()
            with torch.no_grad():
                for batch in pick.split(bs):
                    net(x[batch])
            for layer in net.modules():
                if isinstance(layer, nn.BatchNorm2d):
                    layer.momentum = BN_MOMENTUM
        return pack(g, m)
