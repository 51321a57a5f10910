"""Attacks: trigger formulas, poison selection, determinism, spec round trip and input errors, on small synthetic images."""

import json
import math

import numpy as np
import pytest
import torch

from components.attacks import ATTACKS, BadNets, Blend, WaNet, attack_from_spec, build_attack

INJECTING = {n: a for n, a in ATTACKS.items() if n != "none"}  # "none" is the data set as delivered
OTHER_TRAIN_TRIGGER = {"adaptive_blend", "adaptive_patch", "refool", "physical_ba", "cba", "hybrid", "lc", "narcissus"}  # poisoned in training
# with another trigger than at test (or per-image triggers)
SOURCE_SPECIFIC = {"tact", "cba"}  # poisons and measures ASR on given source classes only (tests/test_attacks_more.py, _extra.py)
TRAINED = {"adaptive_pgd", "narcissus", "input_aware"}  # optimises its trigger while it poisons: no trigger before (tests/test_attacks_extra.py,
# tests/test_attacks_optimised.py)
FAST = {"lc": {"epochs": 1}, "narcissus": {"epochs": 1, "warmup_epochs": 1, "rounds": 20}}  # attacks that train: tiny runs
from components.data import ImageSet
from components.errors import UnpoisonError

N, H, W, C, K = 200, 32, 32, 3, 10  # the shape of the `ds` fixture (tests/conftest.py)
RATE, TARGET = 0.05, 0


def make(name: str, seed: int = 1, **params):
    return build_attack(name, target=TARGET, rate=RATE, seed=seed, num_classes=K, **{**FAST.get(name, {}), **params})


def batch(seed: int = 0, n: int = 4) -> torch.Tensor:
    return torch.rand(n, C, H, W, generator=torch.Generator().manual_seed(seed))


# --- trigger formulas ---


def test_badnets_patch_bottom_right():
    x = batch()
    y = make("badnets").apply(x)
    assert y.shape == x.shape
    assert torch.all(y[:, :, -3:, -3:] == 1.0)
    mask = torch.ones(H, W, dtype=torch.bool)
    mask[-3:, -3:] = False
    assert torch.equal(y[:, :, mask], x[:, :, mask])


def test_badnets_size_param():
    y = make("badnets", size=5).apply(torch.zeros(1, C, H, W))
    assert y.sum().item() == 5 * 5 * C
    assert torch.all(y[:, :, -5:, -5:] == 1.0)


def test_blend_formula_and_pattern_seed():
    x = batch()
    attack = make("blend")
    p = attack.pattern(C, H, W)[0]
    assert torch.allclose(attack.apply(x), 0.8 * x + 0.2 * p, atol=1e-6)
    assert torch.equal(p, make("blend", seed=7).pattern(C, H, W)[0])  # the poison seed does not move the pattern
    assert torch.equal(p, make("blend", pattern_seed=0).pattern(C, H, W)[0])
    assert not torch.equal(p, make("blend", pattern_seed=1).pattern(C, H, W)[0])
    assert 0 <= p.min() and p.max() <= 1 and p.std() > 0.2  # uniform noise, not a constant


def test_blend_pattern_path(tmp_path):
    from PIL import Image

    img = np.zeros((8, 8, 3), dtype=np.uint8)
    img[:, 4:] = 255  # left half black, right half white
    path = tmp_path / "pattern.png"
    Image.fromarray(img).save(path)
    y = make("blend", pattern_path=str(path), alpha=0.5).apply(torch.zeros(1, C, H, W))
    assert torch.allclose(y[..., :, :12], torch.zeros(1)) and torch.allclose(y[..., :, -12:], torch.full((1,), 0.5))
    with pytest.raises(UnpoisonError, match="pattern_path"):
        make("blend", pattern_path=str(tmp_path / "missing.png")).apply(torch.zeros(1, C, H, W))


def test_trojan_square_is_an_opaque_fixed_pattern_bottom_right():
    x = batch()
    attack = make("trojan")
    y = attack.apply(x)
    patch = y[:, :, -8:, -8:]
    assert torch.equal(patch, patch[:1].expand_as(patch))  # the same patch on every image, whatever the image
    assert patch.std() > 0.2  # a coloured pattern, not a flat square
    mask = torch.ones(H, W, dtype=torch.bool)
    mask[-8:, -8:] = False
    assert torch.equal(y[:, :, mask], x[:, :, mask])
    assert torch.equal(make("trojan", seed=9).apply(x), y)  # the poison seed does not move the pattern
    assert not torch.equal(make("trojan", pattern_seed=1).apply(x), y)


def test_trojan_watermark_tiles_the_patch_over_the_image():
    x = batch()
    attack = make("trojan", variant="watermark", alpha=0.3)
    p, w = attack.pattern(C, H, W)
    assert torch.equal(p[:, :8, :8], p[:, 8:16, 24:32])  # tiled with period 8
    assert torch.equal(p[:, -8:, -8:], make("trojan").pattern(C, H, W)[0][:, -8:, -8:])  # the square's patch
    torch.testing.assert_close(attack.apply(x), 0.7 * x + 0.3 * p)


def test_sig_signal_on_constant_image():
    x = torch.full((2, C, H, W), 0.5)
    y = make("sig").apply(x)
    j = torch.arange(W, dtype=torch.float64)
    v = (20 / 255) * torch.sin(2 * math.pi * j * 6 / W)
    assert torch.allclose(y - x, v.float().expand(2, C, H, W), atol=1e-6)
    assert torch.equal(make("sig", delta=0.6).apply(x).amax(), torch.tensor(1.0))  # clipped to [0, 1]


def test_sig_poisons_only_target_class_and_keeps_labels(ds):
    out = make("sig").poison(ds)
    assert out.is_poison.sum() == round(RATE * N)
    assert np.all(ds.labels[out.is_poison] == TARGET)
    assert np.array_equal(out.dataset.labels, ds.labels)
    assert not out.is_cover.any()


def test_sig_too_few_target_samples(ds):
    with pytest.raises(UnpoisonError, match=r"needs 30 .* has 20; lower the rate"):
        build_attack("sig", target=TARGET, rate=0.15, seed=0, num_classes=K).poison(ds)


def test_wanet_poison_and_cover(ds):
    out = make("wanet").poison(ds)
    assert out.is_poison.sum() == round(RATE * N) and out.is_cover.sum() == round(2 * RATE * N)
    assert not (out.is_poison & out.is_cover).any()
    assert np.array_equal(out.dataset.labels[out.is_cover], ds.labels[out.is_cover])
    assert np.array_equal(out.true_label, ds.labels)
    changed = (out.dataset.images != ds.images).reshape(N, -1).any(1)
    assert changed[out.is_cover].all() and changed[out.is_poison].all()
    # cover samples carry noise on top of the warp: they differ from the plain warp
    warped = make("wanet").apply_uint8(ds.images[out.is_cover])
    assert not np.array_equal(warped, out.dataset.images[out.is_cover])


def test_wanet_warp_changes_image_within_range_and_is_deterministic():
    x = batch()
    y = make("wanet").apply(x)
    assert (y - x).abs().max() > 0.05
    assert y.min() >= 0 and y.max() <= 1
    assert torch.equal(y, make("wanet").apply(x))
    assert not torch.equal(y, make("wanet", seed=2).apply(x))  # the warping field follows the seed
    assert torch.allclose(make("wanet", s=0.0).apply(x), x, atol=1e-5)  # s = 0 is the identity warp


# --- every attack ---


@pytest.mark.parametrize("name", sorted(INJECTING))
def test_poison_counts_labels_and_untouched_samples(ds, name):
    attack = make(name)
    out = attack.poison(ds)
    assert out.is_poison.sum() == round(RATE * N)
    assert out.dataset.images.dtype == np.uint8 and out.dataset.images.shape == ds.images.shape
    assert out.dataset.classes == ds.classes and np.array_equal(out.true_label, ds.labels)
    if not attack.clean_label:
        assert np.all(out.dataset.labels[out.is_poison] == TARGET)
        assert np.all(out.true_label[out.is_poison] != TARGET)
    if name not in OTHER_TRAIN_TRIGGER:
        assert np.array_equal(out.dataset.images[out.is_poison], attack.apply_uint8(ds.images[out.is_poison]))
    rest = ~(out.is_poison | out.is_cover)
    assert np.array_equal(out.dataset.images[rest], ds.images[rest])
    assert np.array_equal(out.dataset.labels[rest], ds.labels[rest])
    assert (out.dataset.images[out.is_poison] != ds.images[out.is_poison]).reshape(len(out.dataset.images[out.is_poison]), -1).any(1).all()


@pytest.mark.parametrize("name", sorted(n for n, a in INJECTING.items() if not a.clean_label and n not in SOURCE_SPECIFIC))
def test_dirty_label_never_picks_target_class(ds, name):
    # 160 of the 180 non-target samples: a selection that ignored the label would pick target-class samples
    params = {"cross_ratio": 0} if name == "wanet" else {}
    out = build_attack(name, target=TARGET, rate=0.8, seed=0, num_classes=K, **params).poison(ds)
    assert out.is_poison.sum() == 160 and np.all(out.true_label[out.is_poison] != TARGET)
    assert np.all(out.dataset.labels[out.is_poison] == TARGET)


@pytest.mark.parametrize("name", sorted(INJECTING))
def test_determinism(ds, name):
    a, b, c = make(name, seed=5).poison(ds), make(name, seed=5).poison(ds), make(name, seed=6).poison(ds)
    for field in ("true_label", "is_poison", "is_cover"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert np.array_equal(a.dataset.images, b.dataset.images) and np.array_equal(a.dataset.labels, b.dataset.labels)
    assert not np.array_equal(a.is_poison, c.is_poison)


@pytest.mark.parametrize("name", sorted(INJECTING))
def test_spec_round_trip(ds, name):
    attack = make(name, seed=3)
    if name in TRAINED:
        attack.poison(ds)
    spec = json.loads(json.dumps(attack.spec()))
    assert spec["name"] == name and spec["target"] == TARGET and spec["rate"] == RATE and spec["seed"] == 3
    again = attack_from_spec(spec)
    assert type(again) is type(attack) and again.spec() == attack.spec()
    x = batch(seed=9)
    assert torch.equal(again.apply(x), attack.apply(x))
    assert np.array_equal(again.apply_uint8(ds.images[:8]), attack.apply_uint8(ds.images[:8]))


def test_spec_keeps_params():
    spec = make("badnets", size=4).spec()
    assert spec["params"] == {"size": 4, "position": "bottom-right", "style": "white", "pattern_seed": 0, "mapping": "all2one"}
    assert attack_from_spec(spec).size == 4


@pytest.mark.parametrize("name", sorted(set(INJECTING) - SOURCE_SPECIFIC))
def test_test_inputs_exclude_target(ds, name):
    attack = make(name)
    if name in TRAINED:
        attack.poison(ds)
    images, labels = attack.test_inputs(ds)
    keep = ds.labels != TARGET
    assert len(images) == len(labels) == keep.sum()
    assert np.all(labels == TARGET) and labels.dtype == np.int64
    assert np.array_equal(images, attack.apply_uint8(ds.images[keep]))


def test_apply_uint8_rounds_and_chunks(monkeypatch):
    import components.attacks.base as base

    images = np.random.default_rng(0).integers(0, 256, (10, H, W, C), dtype=np.uint8)
    attack = make("blend")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    expected = (attack.apply(x) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    whole = attack.apply_uint8(images)
    monkeypatch.setattr(base, "CHUNK", 3)
    assert np.array_equal(whole, expected) and np.array_equal(attack.apply_uint8(images), whole)


# --- bad input ---


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": 0}, r"poison rate 0 is outside \(0, 1\)"),
        ({"rate": 1.2}, r"poison rate 1.2 is outside \(0, 1\)"),
        ({"target": 10}, r"target class 10 does not exist among 10 classes; choose 0 to 9"),
        ({"target": -1}, r"target class -1 does not exist"),
    ],
)
def test_bad_rate_and_target(kwargs, message):
    args = {"target": TARGET, "rate": RATE, "seed": 0, "num_classes": K, **kwargs}
    for name in INJECTING:
        with pytest.raises(UnpoisonError, match=message):
            build_attack(name, **args)


def test_unknown_attack_lists_choices():
    with pytest.raises(UnpoisonError, match=r"unknown attack 'badnet'; choose one of: none, badnets, blend, sig, trojan, wanet, bpp, tact, adaptive_blend, adaptive_patch, "
                                     r"refool, physical_ba, cba, adaptive_pgd, hybrid, lc, narcissus"):
        make("badnet")


def test_unknown_param_names_it_and_valid_ones():
    with pytest.raises(UnpoisonError, match=r"unknown parameter\(s\) alpha for attack 'badnets'; valid parameters: size, position, style, pattern_seed, mapping"):
        make("badnets", alpha=0.3)
    with pytest.raises(UnpoisonError, match=r"unknown parameter\(s\) size .*valid parameters: k, s, cross_ratio, grid_rescale, mapping"):
        attack_from_spec({**make("wanet").spec(), "params": {"size": 3}})


def test_bad_params_and_sizes(ds):
    with pytest.raises(UnpoisonError, match="badnets size 0"):
        make("badnets", size=0)
    with pytest.raises(UnpoisonError, match="patch size 40 exceeds the 32x32 images"):
        make("badnets", size=40).apply(torch.zeros(1, C, H, W))
    with pytest.raises(UnpoisonError, match="blend alpha 1.5"):
        make("blend", alpha=1.5)
    with pytest.raises(UnpoisonError, match="sig delta -0.1"):
        make("sig", delta=-0.1)
    with pytest.raises(UnpoisonError, match="wanet k 1"):
        make("wanet", k=1)
    with pytest.raises(UnpoisonError, match="trojan variant 'logo' is unknown"):
        make("trojan", variant="logo")
    with pytest.raises(UnpoisonError, match="trojan patch size 8 exceeds the 4x4 images"):
        make("trojan").apply(torch.zeros(1, C, 4, 4))
    with pytest.raises(UnpoisonError, match="attack spec lacks seed"):
        attack_from_spec({"name": "badnets", "target": 0, "rate": 0.1, "num_classes": 10})
    with pytest.raises(UnpoisonError, match="selects 0 of 200 samples"):
        build_attack("badnets", target=0, rate=0.001, seed=0, num_classes=K).poison(ds)
    with pytest.raises(UnpoisonError, match="target class 5 does not exist in a data set of 3 classes"):
        build_attack("badnets", target=5, rate=0.1, seed=0, num_classes=K).poison(ImageSet(ds.images, ds.labels % 3, ("a", "b", "c")))
    with pytest.raises(UnpoisonError, match="wanet needs 180 cover samples"):
        build_attack("wanet", target=0, rate=0.3, seed=0, num_classes=K, cross_ratio=3).poison(ds)


def test_no_attack_delivers_the_data_set_unchanged_and_has_no_trigger():
    from components.data import load_images

    ds = load_images("sample", "test").subset(slice(0, 50))
    atk = build_attack("none", target=3, rate=0.05, seed=0, num_classes=10)
    out = atk.poison(ds)
    assert out.dataset is ds and not out.is_poison.any() and not out.is_cover.any()
    images, targets = atk.test_inputs(ds)
    assert len(images) == len(targets) == 0  # no trigger: ASR is not defined
    assert attack_from_spec(atk.spec()).spec() == atk.spec() and atk.spec()["target"] == 3
    with pytest.raises(UnpoisonError, match="target class 10 does not exist"):
        build_attack("none", target=10, rate=0.05, seed=0, num_classes=10)
