"""The training engine: batch augmentation, the training loop, loss functions, schedules and prediction."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from components import engine
from components.config import TrainParams
from components.engine import augment, bounded_ascent, predict, to_float, train
from components.models import build_model

CPU = torch.device("cpu")


def distinct_batch(n=16, c=3, h=8, w=8, seed=0) -> torch.Tensor:
    """Float NCHW images, every one different and none equal to its own mirror."""
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def params(**kw) -> TrainParams:
    base = dict(epochs=1, batch_size=16, lr=0.05, schedule="constant", augment="none", weight_decay=0.0)
    return TrainParams(**{**base, **kw})


class TinyCNN(nn.Module):
    def __init__(self, k=2):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, k)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


class Bias(nn.Module):
    """logits = b, whatever the input (kept in the graph with zero gradient)."""

    def __init__(self, k=2):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(k))

    def forward(self, x):
        return x.flatten(1)[:, :1] * 0 + self.b


# ---------------------------------------------------------------------------------------------- to_float


def test_to_float_converts_uint8_nhwc_to_unit_nchw():
    x = torch.tensor([[[[0, 255, 51]]]], dtype=torch.uint8)  # (1, 1, 1, 3)
    out = to_float(x)
    assert out.shape == (1, 3, 1, 1) and out.dtype == torch.float32
    torch.testing.assert_close(out.flatten(), torch.tensor([0.0, 1.0, 0.2]))


# ---------------------------------------------------------------------------------------------- augment


def test_augment_none_returns_input_unchanged():
    x = distinct_batch()
    assert torch.equal(augment(x, "none", torch.Generator().manual_seed(0)), x)


def test_augment_flip_keeps_each_sample_or_mirrors_it():
    x = distinct_batch(n=64)
    out = augment(x, "flip", torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    flipped = 0
    for i in range(len(x)):
        same, mirror = torch.equal(out[i], x[i]), torch.equal(out[i], x[i].flip(-1))
        assert same or mirror, f"sample {i} is neither itself nor its horizontal mirror"
        flipped += mirror
    assert 10 < flipped < 54  # about half are flipped


def test_augment_flip_is_deterministic_per_generator_seed():
    x = distinct_batch(n=32)
    a = augment(x, "flip", torch.Generator().manual_seed(3))
    b = augment(x, "flip", torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def _find_window(out_i: torch.Tensor, x_i: torch.Tensor, pad=4):
    """(dy, dx, flipped) such that out_i is the (maybe mirrored) h x w window of the zero-padded x_i, or None."""
    _, h, w = x_i.shape
    xp = F.pad(x_i, (pad, pad, pad, pad))
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            window = xp[:, dy:dy + h, dx:dx + w]
            if torch.equal(out_i, window):
                return dy, dx, False
            if torch.equal(out_i, window.flip(-1)):
                return dy, dx, True
    return None


def test_augment_crop_flip_is_a_shifted_window_of_the_padded_sample():
    x = distinct_batch(n=24, h=10, w=12)
    out = augment(x, "crop_flip", torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    found = []
    for i in range(len(x)):
        hit = _find_window(out[i], x[i])
        assert hit is not None, f"sample {i} is not a window of its own padded image"
        found.append(hit)
    offsets = {(dy, dx) for dy, dx, _ in found}
    assert len(offsets) > 5  # offsets are drawn per sample
    assert any(f for _, _, f in found) and not all(f for _, _, f in found)
    # per-sample: a window of sample i is not taken from another sample
    assert _find_window(out[0], x[1]) is None


def test_train_keeps_labels_with_augmentation():
    # two classes of constant-colour images: separable whatever the flip or crop does to the pixels
    n = 64
    labels = torch.arange(n) % 2
    images = torch.where(labels[:, None, None, None] == 1, 220, 30).expand(n, 8, 8, 3).to(torch.uint8).contiguous()
    torch.manual_seed(0)
    model = TinyCNN()
    for mode in ("flip", "crop_flip"):
        history = train(model, images, labels, params(epochs=8, lr=0.1, augment=mode, batch_size=16), device=CPU)
        assert history[-1]["train_acc"] == 1.0, mode
    assert (predict(model, images, device=CPU).argmax(1) == labels).all()


# ---------------------------------------------------------------------------------------------- fast path


def test_channels_last_forward_matches_plain_fp32_forward():
    torch.manual_seed(0)
    model = build_model("resnet_s1", 10).eval()
    plain = copy.deepcopy(model)
    fast = copy.deepcopy(model).to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 16, 16, 3), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (8,), generator=g)
    xf = to_float(x)
    loss_plain = F.cross_entropy(plain(xf.contiguous()), y)
    loss_fast = F.cross_entropy(fast(xf.contiguous(memory_format=torch.channels_last)), y)
    assert abs(loss_plain.item() - loss_fast.item()) < 1e-5


def test_train_loss_matches_plain_forward_of_the_same_batch():
    torch.manual_seed(0)
    model = build_model("resnet_s1", 10)
    reference = copy.deepcopy(model).train()  # same weights, train-mode batch norm as in the loop
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (12, 16, 16, 3), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (12,), generator=g)
    with torch.no_grad():
        expected = F.cross_entropy(reference(to_float(x).contiguous()), y).item()
    # one batch holding every sample: the recorded loss is that batch's loss, before the optimizer step
    history = train(model, x, y, params(epochs=1, batch_size=12, augment="none", channels_last=True), device=CPU)
    assert history[0]["loss"] == pytest.approx(expected, abs=1e-5)
    convs = [q for q in model.parameters() if q.dim() == 4]
    assert convs and all(q.is_contiguous(memory_format=torch.channels_last) for q in convs)  # the fast path ran
    # and the step changed the weights (the loop trains in place)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


class TinyBNNet(nn.Module):
    def __init__(self, k=2):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, k)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_compile_on_and_off_train_to_the_same_model():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 8, 8, 3), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 2, (64,), generator=g)
    torch.manual_seed(0)
    eager, comp = TinyBNNet(), TinyBNNet()
    comp.load_state_dict(eager.state_dict())
    h_eager = train(eager, x, y, params(epochs=2, augment="flip", compile=False), device=CPU)
    h_comp = train(comp, x, y, params(epochs=2, augment="flip", compile=True), device=CPU)
    assert counters["stats"]["unique_graphs"] == 1  # the compiled path really ran
    assert [h["loss"] for h in h_comp] == pytest.approx([h["loss"] for h in h_eager], abs=1e-5)
    for a, b in zip(eager.state_dict().values(), comp.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(comp.eval())(to_float(x)), eager.eval()(to_float(x)),
                                   rtol=1e-4, atol=1e-5)
    # a second model of the same architecture reuses the compiled graph: once per architecture, not per training
    graphs = counters["stats"]["unique_graphs"]
    train(TinyBNNet(), x, y, params(epochs=1, compile=True), device=CPU)
    assert counters["stats"]["unique_graphs"] == graphs


def test_machine_threads_is_within_the_cores_of_the_machine():
    from components.engine import machine_threads, use_machine_threads

    assert 1 <= machine_threads() <= (os.cpu_count() or 1)
    use_machine_threads()
    assert torch.get_num_threads() == machine_threads()


# ---------------------------------------------------------------------------------------------- loss functions


def test_cross_entropy_is_per_sample():
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    y = torch.tensor([0, 0])
    out = engine.cross_entropy(logits, y, torch.arange(2))
    assert out.shape == (2,)
    torch.testing.assert_close(out, F.cross_entropy(logits, y, reduction="none"))


def test_bounded_ascent_zero_gradient_above_ceiling_negative_ce_below():
    logits = torch.tensor([[4.0, 0.0, 0.0],    # CE small: below the ceiling
                           [0.0, 0.0, 0.0],    # CE = log 3 ~ 1.10: below
                           [-6.0, 3.0, 0.0]],  # CE ~ 9.05: above
                          requires_grad=True)
    y = torch.tensor([0, 0, 0])
    ceiling = 2.0
    ce = F.cross_entropy(logits.detach(), y, reduction="none")
    assert ce[0] < ceiling and ce[1] < ceiling and ce[2] > ceiling
    loss = bounded_ascent(ceiling)(logits, y, torch.arange(3))
    assert loss.shape == (3,)
    torch.testing.assert_close(loss.detach(), -ce.clamp(max=ceiling))
    assert loss[2].item() == pytest.approx(-ceiling)
    loss.sum().backward()
    assert torch.equal(logits.grad[2], torch.zeros(3))  # forgotten: contributes nothing
    ce_grad = torch.softmax(logits.detach(), 1) - F.one_hot(y, 3).float()
    torch.testing.assert_close(logits.grad[:2], -ce_grad[:2])  # ascent: minus the CE gradient
    assert logits.grad[:2].abs().sum() > 0


def test_train_with_bounded_ascent_raises_the_loss():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (32, 8, 8, 3), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 2, (32,), generator=g)
    model = TinyCNN()
    before = F.cross_entropy(predict(model, x, device=CPU), y).item()
    train(model, x, y, params(epochs=5, lr=0.1), loss_fn=bounded_ascent(5.0), device=CPU)
    after = F.cross_entropy(predict(model, x, device=CPU), y).item()
    assert after > before + 0.1


def test_train_weights_scale_the_per_sample_loss():
    model = Bias()
    x = torch.zeros(4, 2, 2, 3, dtype=torch.uint8)
    y = torch.zeros(4, dtype=torch.long)
    # loss = b0 per sample; weights (1, 1, 1, -3) average to 0: b must not move
    train(model, x, y, params(momentum=0.0, batch_size=4), loss_fn=lambda lg, yb, idx: lg[:, 0],
          weights=torch.tensor([1.0, 1.0, 1.0, -3.0]), device=CPU)
    assert model.b.detach().abs().max().item() < 1e-7
    train(model, x, y, params(momentum=0.0, batch_size=4, lr=0.5), loss_fn=lambda lg, yb, idx: lg[:, 0],
          weights=torch.tensor([1.0, 1.0, 1.0, 1.0]), device=CPU)
    assert model.b[0].item() == pytest.approx(-0.5)


# ---------------------------------------------------------------------------------------------- predict


def test_predict_returns_float32_logits_on_cpu():
    torch.manual_seed(0)
    model = build_model("resnet_s1", 10)
    x = torch.randint(0, 256, (7, 16, 16, 3), dtype=torch.uint8)
    out = predict(model, x, batch_size=3, device=CPU)
    assert out.shape == (7, 10) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert not model.training  # evaluated in eval mode
    with torch.no_grad():
        torch.testing.assert_close(out, model(to_float(x)), rtol=1e-5, atol=1e-5)


def test_predict_works_on_a_channels_last_model():
    torch.manual_seed(0)
    model = build_model("resnet_s1", 10).eval()
    x = torch.randint(0, 256, (5, 16, 16, 3), dtype=torch.uint8)
    expected = predict(model, x, device=CPU)
    model = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(predict(model, x, device=CPU), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- divergence


def test_train_raises_floating_point_error_when_loss_diverges():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 8, 8, 3), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 2, (64,), generator=g)
    p = params(epochs=5, lr=1e6, weight_decay=5e-4, batch_size=8, grad_clip=None)
    with pytest.raises(FloatingPointError, match="loss became .* lower the learning rate"):
        train(TinyCNN(), x, y, p, desc="diverging", device=CPU)


# ---------------------------------------------------------------------------------------------- schedules


def _lr_used_per_epoch(p: TrainParams) -> tuple[list[float], list[dict]]:
    """Train `Bias` with loss b0 (gradient 1 per step, one step per epoch, plain SGD): b0 falls by the lr used."""
    model = Bias()
    x = torch.zeros(4, 2, 2, 3, dtype=torch.uint8)
    y = torch.zeros(4, dtype=torch.long)
    values = [0.0]
    history = train(model, x, y, p, loss_fn=lambda lg, yb, idx: lg[:, 0], device=CPU,
                    on_epoch=lambda e, m, r: values.append(m.b[0].item()))
    return [a - b for a, b in zip(values, values[1:])], history


def test_step_schedule_divides_lr_by_ten_at_the_milestone():
    p = params(epochs=4, batch_size=4, lr=0.1, momentum=0.0, schedule="step", milestones=[1, 3])
    used, history = _lr_used_per_epoch(p)
    assert used == pytest.approx([0.1, 0.01, 0.01, 0.001], rel=1e-4)
    # record["lr"] is the learning rate in effect after the epoch (the one the next epoch starts with)
    assert [h["lr"] for h in history] == pytest.approx([0.01, 0.01, 0.001, 0.001])


def test_constant_schedule_keeps_lr():
    used, history = _lr_used_per_epoch(params(epochs=3, batch_size=4, lr=0.2, momentum=0.0, schedule="constant"))
    assert used == pytest.approx([0.2, 0.2, 0.2], rel=1e-4)
    assert [h["lr"] for h in history] == pytest.approx([0.2, 0.2, 0.2])


def test_onecycle_schedule_warms_up_then_decays():
    used, _ = _lr_used_per_epoch(params(epochs=8, batch_size=4, lr=0.1, momentum=0.0, schedule="onecycle"))
    peak = max(range(8), key=lambda i: used[i])
    assert used[peak] == pytest.approx(0.1, rel=0.05)
    assert 1 <= peak <= 3  # linear warm-up over the first 25 % of the steps
    assert used[0] < used[peak] and used[-1] < 0.2 * used[peak]
    assert all(a >= b for a, b in zip(used[peak:], used[peak + 1:]))


def test_the_monitor_uses_a_fifth_of_the_training_set_between_its_bounds(tmp_path):
    from components import stages
    from components.data import ImageSet, save_npz

    assert stages.monitor_size(10_000) == stages.MONITOR_SIZE == 2000  # the CPU protocol's curves are unchanged
    assert stages.monitor_size(5000) == 1000 and stages.monitor_size(1500) == 300
    assert stages.monitor_size(100) == stages.MONITOR_MIN and stages.monitor_size(10**6) == stages.MONITOR_SIZE
    images = np.zeros((37, 32, 32, 3), np.uint8)
    path = save_npz(ImageSet(images, np.zeros(37, np.int64), tuple(f"c{i}" for i in range(10))), tmp_path / "d.npz")
    assert stages.dataset_size(path) == 37
