"""Model registry: CIFAR-style classifiers that take float32 NCHW images in [0, 1].

Every model normalizes internally (its first module), so triggers, attacks and adversarial
perturbations all live in [0, 1] pixel space, and the normalization travels with the weights
(the mean and std are buffers, so they are in the state dict). Every model is a `Classifier`:
`features(x)` gives the penultimate activations (globally average-pooled, flattened) that ABM and
BSD read, `head` is the final Linear, and `model(x) == model.head(model.features(x))`.
Global average pooling is adaptive, so the models accept sizes other than 32x32.

`AntiBackdoorModel` is ABM's deployed classifier (paper 002, Eq. 4): two of these networks, a teacher and a student,
composed into one module; `build_composite` rebuilds it from the description a model.json keeps.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from components.errors import UnpoisonError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class Normalize(nn.Module):
    """(x - mean) / std per channel; mean and std are buffers, so they move and save with the model."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """normalize -> body (a feature map) -> global average pool -> head (Linear)."""

    def __init__(self, body: nn.Module, width: int, num_classes: int, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)  # first module: inputs are [0, 1] pixels
        self.body = body
        self.head = nn.Linear(width, num_classes)

    def features(self, x):
        """Penultimate activations, (N, width): what the head sees."""
        return torch.flatten(F.adaptive_avg_pool2d(self.body(self.normalize(x)), 1), 1)

    def forward(self, x):
        return self.head(self.features(x))


def conv_bn(c_in, c_out, kernel=3, stride=1, groups=1):
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    )


def conv_bn_relu(c_in, c_out, kernel=3, stride=1, groups=1):
    return nn.Sequential(*conv_bn(c_in, c_out, kernel, stride, groups), nn.ReLU(inplace=True))


class SmallCNN(Classifier):
    """The CPU reference protocol net (DESIGN.md): three blocks of two 3x3 conv-BN-ReLU, widths
    32/64/128, a 2x2 max-pool after each block, global average pool, Linear. 0.29 M parameters."""

    def __init__(self, num_classes, mean=CIFAR10_MEAN, std=CIFAR10_STD, widths=(32, 64, 128)):
        blocks, c_in = [], 3
        for w in widths:
            blocks += [conv_bn_relu(c_in, w), conv_bn_relu(w, w), nn.MaxPool2d(2)]
            c_in = w
        super().__init__(nn.Sequential(*blocks), widths[-1], num_classes, mean, std)


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016, "Deep Residual Learning"): two 3x3 conv-BN, identity
    shortcut, or 1x1 conv-BN where stride or width changes (option B), ReLU after the sum."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1, self.conv2 = conv_bn(c_in, c_out, stride=stride), conv_bn(c_out, c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else conv_bn(c_in, c_out, 1, stride)

    def forward(self, x):
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016, "Identity Mappings in Deep Residual Networks"):
    BN-ReLU-conv twice; a projection shortcut (1x1 conv, no BN) takes the pre-activated input."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None if stride == 1 and c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + shortcut


def resnet_stages(block, c_in, widths, depths):
    """Stage i holds depths[i] blocks of width widths[i]; every stage after the first halves the map."""
    layers = []
    for i, (w, n) in enumerate(zip(widths, depths)):
        for j in range(n):
            layers.append(block(c_in, w, stride=2 if i > 0 and j == 0 else 1))
            c_in = w
    return layers


class ResNet(Classifier):
    """CIFAR ResNet as in kuangliu/pytorch-cifar (models/resnet.py): 3x3 stride-1 stem conv-BN-ReLU,
    no max-pool, four stages of BasicBlocks (strides 1, 2, 2, 2), global average pool, Linear.
    ResNet-18: depths (2, 2, 2, 2), 11.17 M parameters on 10 classes; ResNet-34: (3, 4, 6, 3).
    `stem` is the stem conv's width (default: the first stage's width)."""

    def __init__(self, num_classes, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                 depths=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem=None):
        stem = stem or widths[0]
        body = nn.Sequential(conv_bn_relu(3, stem), *resnet_stages(BasicBlock, stem, widths, depths))
        super().__init__(body, widths[-1], num_classes, mean, std)


class PreActResNet(Classifier):
    """PreAct-ResNet (He et al. 2016, "Identity Mappings"), CIFAR variant: 3x3 stride-1 stem conv,
    four stages of PreActBlocks as in kuangliu/pytorch-cifar (models/preact_resnet.py), then the
    extra BN-ReLU after the last unit that the paper adds (section 4.1; kuangliu omits it).
    PreAct-ResNet-18: depths (2, 2, 2, 2), 11.17 M parameters on 10 classes."""

    def __init__(self, num_classes, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                 depths=(2, 2, 2, 2), widths=(64, 128, 256, 512)):
        body = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
            *resnet_stages(PreActBlock, widths[0], widths, depths),
            nn.BatchNorm2d(widths[-1]), nn.ReLU(inplace=True),
        )
        super().__init__(body, widths[-1], num_classes, mean, std)


class InvertedResidual(nn.Module):
    """MobileNetV2 block (Sandler et al. 2018): 1x1 expand-ReLU, 3x3 depthwise-ReLU, 1x1 linear
    projection. As in kuangliu/pytorch-cifar, every stride-1 block has a shortcut (1x1 conv-BN
    where the width changes); stride-2 blocks have none."""

    def __init__(self, c_in, c_out, expansion, stride):
        super().__init__()
        hidden = expansion * c_in
        self.conv = nn.Sequential(
            conv_bn_relu(c_in, hidden, 1), conv_bn_relu(hidden, hidden, 3, stride, groups=hidden), *conv_bn(hidden, c_out, 1)
        )
        self.shortcut = None if stride != 1 else nn.Identity() if c_in == c_out else conv_bn(c_in, c_out, 1)

    def forward(self, x):
        out = self.conv(x)
        return out if self.shortcut is None else out + self.shortcut(x)


class MobileNetV2(Classifier):
    """MobileNetV2 (Sandler et al. 2018), CIFAR variant of kuangliu/pytorch-cifar (models/mobilenetv2.py):
    stem conv stride 1 (not 2) and the second stage (width 24) stride 1 (not 2), so a 32x32 input
    ends at 4x4; 1x1 conv to 1280, global average pool, Linear. 2.30 M parameters on 10 classes."""

    # (expansion, width, blocks, stride of the first block)
    CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        layers, c_in = [conv_bn_relu(3, 32)], 32
        for expansion, w, n, stride in self.CFG:
            for j in range(n):
                layers.append(InvertedResidual(c_in, w, expansion, stride if j == 0 else 1))
                c_in = w
        layers.append(conv_bn_relu(c_in, 1280, 1))
        super().__init__(nn.Sequential(*layers), 1280, num_classes, mean, std)


# LfD's low-capacity teachers (Learning from Distinction, section 5.3): "For ResNet-S, ResNet-S1, and
# ResNet-S2, the first four layers consist of only one block each. In ResNet-S, these blocks contain
# 2, 2, 2, and 4 neurons respectively. For ResNet-S1, each block in the first four layers contains
# 1 neuron. In the case of ResNet-S2, the number of neurons in the blocks of the first four layers are
# 64, 128, 256, and 512 respectively." Capacity: ResNet-S1 < ResNet-S < ResNet-S2 < ResNet-18; the
# paper's teacher is ResNet-S. Read here as the CIFAR ResNet above with one BasicBlock per stage and
# those stage widths ("neurons" = channels). The paper does not give the stem's width: we shrink it
# with the rest, to the first stage's width (2, 1, 64); pass `stem=64` to ResNet to keep ResNet-18's.
MODELS = {
    "small_cnn": SmallCNN,
    "resnet18": partial(ResNet, depths=(2, 2, 2, 2)),
    "resnet34": partial(ResNet, depths=(3, 4, 6, 3)),
    "preact_resnet18": partial(PreActResNet, depths=(2, 2, 2, 2)),
    "mobilenetv2": MobileNetV2,
    "resnet_s": partial(ResNet, depths=(1, 1, 1, 1), widths=(2, 2, 2, 4)),
    "resnet_s1": partial(ResNet, depths=(1, 1, 1, 1), widths=(1, 1, 1, 1)),
    "resnet_s2": partial(ResNet, depths=(1, 1, 1, 1), widths=(64, 128, 256, 512)),
}


def anti_backdoor_logits(teacher: torch.Tensor, student: torch.Tensor, delta: float, gamma: float,
                         activation: torch.Tensor | float) -> torch.Tensor:
    """ABM Eq. 4 (paper 002): Output = f_t - delta * ReLU(f_s - gamma * A), on the teacher's and the student's logits;
    only the student logits above the threshold gamma * A are subtracted (A: scalar, or one value per class)."""
    return teacher - delta * F.relu(student - gamma * activation)


class AntiBackdoorModel(nn.Module):
    """ABM's composite classifier: a teacher (plain training on the whole set) and a student (distilled on the isolated
    samples) whose logits combine by Eq. 4 (`anti_backdoor_logits`). The two networks' weights are its state dict
    (`teacher.*`, `student.*`); delta, gamma and A are settings, kept in model.json, not weights (A is a
    non-persistent buffer, so it moves with the module and a torch.export trace keeps it)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, delta: float, gamma: float, activation):
        super().__init__()
        self.teacher, self.student = teacher, student
        self.delta, self.gamma = float(delta), float(gamma)
        self.register_buffer("activation", torch.as_tensor(activation, dtype=torch.float32), persistent=False)

    def forward(self, x):
        return anti_backdoor_logits(self.teacher(x), self.student(x), self.delta, self.gamma, self.activation)


def build_composite(spec: dict, num_classes: int) -> AntiBackdoorModel:
    """A fresh composite from model.json's `composite` entry: {"teacher", "student" (architectures), "delta", "gamma",
    "activation" (A: a number or one per class)}."""
    return AntiBackdoorModel(build_model(spec["teacher"], num_classes), build_model(spec["student"], num_classes),
                             spec["delta"], spec["gamma"], spec["activation"])


def list_models() -> list[str]:
    return list(MODELS)


def build_model(name: str, num_classes: int, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> Classifier:
    """A fresh model `name` for `num_classes` classes that takes [0, 1] images and normalizes them by mean/std."""
    if name not in MODELS:
        raise UnpoisonError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    if int(num_classes) < 2:
        raise UnpoisonError(f"num_classes is {num_classes}; a classifier needs at least 2 classes")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise UnpoisonError(f"bad normalization mean={tuple(mean)} std={tuple(std)}; give 3 means and 3 positive stds (RGB)")
    return MODELS[name](int(num_classes), tuple(mean), tuple(std))
