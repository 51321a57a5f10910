"""The clean-label attacks that optimise on a surrogate of their own: LC (PGD per image, then a corner patch) and
Narcissus (one target-like noise stored in the spec). Each trains its surrogate for one epoch on the `ds` fixture.
Determinism, spec round trips and poison counts of every attack are also in tests/test_attacks.py. Last, the
protocol's training budget (attack.epochs) of every attack that trains a model while it poisons."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from components.attacks import attack_from_spec, build_attack
from components.errors import UnpoisonError
from components.params import AttackParams

N, H, W, C, K = 200, 32, 32, 3, 10  # the shape of the `ds` fixture (tests/conftest.py)
RATE, TARGET = 0.05, 0
FAST = {"lc": {"epochs": 1}, "narcissus": {"epochs": 1, "warmup_epochs": 1, "rounds": 20}}


def make(name: str, seed: int = 1, rate: float = RATE, **params):
    return build_attack(name, target=TARGET, rate=rate, seed=seed, num_classes=K, **{**FAST[name], **params})


def corner_mask(size: int = 3) -> np.ndarray:
    """(H, W) bool: the four size x size corners."""
    m = np.zeros((H, W), dtype=bool)
    m[:size, :size] = m[:size, -size:] = m[-size:, :size] = m[-size:, -size:] = True
    return m


def clean_label_checks(out, ds):
    assert out.is_poison.sum() == round(RATE * N) and not out.is_cover.any()
    assert np.all(ds.labels[out.is_poison] == TARGET)  # target-class images only
    assert np.array_equal(out.dataset.labels, ds.labels) and np.array_equal(out.true_label, ds.labels)  # labels kept
    assert np.array_equal(out.dataset.images[~out.is_poison], ds.images[~out.is_poison])


# --- LC ---

TURNER_RIGHT = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 1]]) * 255  # the reference's bottom-right (and top-right) pattern


def test_lc_perturbs_target_images_within_eps_then_stamps_the_four_corners(ds):
    attack = make("lc")
    out = attack.poison(ds)
    clean_label_checks(out, ds)
    poisoned, clean = out.dataset.images[out.is_poison].astype(int), ds.images[out.is_poison].astype(int)
    off = ~corner_mask()
    diff = np.abs(poisoned - clean)[:, off]
    assert diff.max() <= 16 and (diff > 0).mean() > 0.5  # the PGD noise: l_inf 16/255 in uint8 steps, on most pixels
    for img in poisoned:  # the reference's all-corners trigger: the right pattern, mirrored left-right on the left
        for rows, cols, pattern in ((slice(0, 3), slice(-3, None), TURNER_RIGHT), (slice(-3, None), slice(-3, None), TURNER_RIGHT),
                                    (slice(0, 3), slice(0, 3), TURNER_RIGHT[:, ::-1]), (slice(-3, None), slice(0, 3), TURNER_RIGHT[:, ::-1])):
            assert np.all(img[rows, cols] == pattern[..., None])
    # the test trigger is the patch alone: corners stamped, nothing else changed
    images, targets = attack.test_inputs(ds)
    keep = ds.labels != TARGET
    assert np.all(targets == TARGET) and len(images) == keep.sum()
    assert np.array_equal(images[:, off], ds.images[keep][:, off])
    assert np.all(images[:, :3, -3:] == TURNER_RIGHT[..., None])


def test_lc_noise_raises_the_surrogate_loss_and_follows_eps(ds):
    from components.attacks.surrogate import freeze, to_float, train_surrogate

    out = make("lc").poison(ds)
    model = freeze(train_surrogate(ds.images, ds.labels, num_classes=K, seed=1, epochs=1, batch_size=128))
    target = torch.full((int(out.is_poison.sum()),), TARGET)
    patched = make("lc").apply_uint8(ds.images[out.is_poison])  # the patch without the noise
    with torch.no_grad():
        loss = lambda images: F.cross_entropy(model(to_float(images)), target, reduction="none")  # noqa: E731
        assert torch.all(loss(out.dataset.images[out.is_poison]) > loss(patched))  # untargeted: away from the label
    small = make("lc", eps=4 / 255).poison(ds)
    diff = np.abs(small.dataset.images.astype(int) - ds.images.astype(int))[small.is_poison][:, ~corner_mask()]
    assert diff.max() <= 4 and diff.max() > 0


def test_lc_is_deterministic_per_seed(ds):
    a, b, c = make("lc", seed=4).poison(ds), make("lc", seed=4).poison(ds), make("lc", seed=5).poison(ds)
    assert np.array_equal(a.dataset.images, b.dataset.images) and np.array_equal(a.is_poison, b.is_poison)
    assert not np.array_equal(a.dataset.images, c.dataset.images)
    # the same images under both seeds still get different noise: the surrogate depends on the seed
    both = a.is_poison & c.is_poison
    if both.any():
        assert not np.array_equal(a.dataset.images[both], c.dataset.images[both])


def test_lc_patch_variants():
    from components.attacks import BadNets

    x = torch.rand(2, C, H, W, generator=torch.Generator().manual_seed(0))
    one = make("lc", position="bottom-right", style="grid")  # LfD's CL: one grid corner
    bad = build_attack("badnets", target=TARGET, rate=RATE, seed=1, num_classes=K, style="grid")
    assert torch.equal(one.apply(x), bad.apply(x))
    turner = make("lc", position="bottom-right")  # the reference's bottom-right pattern = ABL's gridTrigger
    y = turner.apply(x)
    assert torch.equal(y[:, :, -3:, -3:], torch.from_numpy(TURNER_RIGHT / 255).float().expand(2, C, 3, 3))
    assert torch.equal(y[:, :, :-3], x[:, :, :-3])
    bsd = make("lc", size=2, style="white", position="top-left")  # BSD's BadNets trigger
    y = bsd.apply(x)
    assert torch.all(y[:, :, :2, :2] == 1) and torch.equal(y[:, :, 2:], x[:, :, 2:]) and torch.equal(y[:, :, :, 2:], x[:, :, :, 2:])
    p, w = make("lc", style="white", size=4).pattern(C, H, W)
    assert w.sum() == 4 * 16 and torch.equal(p, w.expand(C, H, W))  # four white 4x4 corners
    assert isinstance(one, BadNets) and one.clean_label


def test_lc_errors():
    with pytest.raises(UnpoisonError, match=r"lc eps 0 is outside \(0, 1\]; give it on the \[0, 1\] pixel scale"):
        make("lc", eps=0)
    with pytest.raises(UnpoisonError, match=r"lc eps 16 is outside"):
        make("lc", eps=16)
    with pytest.raises(UnpoisonError, match="lc steps -1 is not a non-negative integer"):
        make("lc", steps=-1)
    with pytest.raises(UnpoisonError, match="lc style 'turner' is the reference's 3x3 pattern but size is 4; give size 3"):
        make("lc", size=4)
    with pytest.raises(UnpoisonError, match="lc style 'checker' is unknown; choose one of: turner, white, grid, random"):
        make("lc", style="checker")
    with pytest.raises(UnpoisonError, match="lc position 'middle' is unknown; choose one of: all-corners, bottom-right"):
        make("lc", position="middle")
    with pytest.raises(UnpoisonError, match="lc patch of size 3 at"):
        make("lc", position=[30, 0]).apply(torch.zeros(1, C, H, W))
    with pytest.raises(UnpoisonError, match="lc patch size 8 exceeds the 4x4 images"):
        make("lc", style="white", size=8).apply(torch.zeros(1, C, 4, 4))
    with pytest.raises(UnpoisonError, match=r"clean-label attack 'lc' needs 40 samples of target class 0 but the data set has 20"):
        from components.data import ImageSet

        rng = np.random.default_rng(0)
        make("lc", rate=0.2).poison(ImageSet(rng.integers(0, 256, (200, H, W, C), dtype=np.uint8),
                                              np.repeat(np.arange(10), 20), tuple("abcdefghij")))


# --- Narcissus ---


def test_narcissus_trigger_within_eps_in_the_spec_and_three_times_at_test(ds):
    attack = make("narcissus")
    with pytest.raises(UnpoisonError, match="narcissus has no trigger yet"):
        attack.apply(torch.zeros(1, C, H, W))
    out = attack.poison(ds)
    clean_label_checks(out, ds)
    delta = np.array(attack.trigger)
    assert delta.shape == (C, H, W) and delta.dtype.kind == "i" and np.abs(delta).max() <= 16 and np.any(delta != 0)
    noise = delta.transpose(1, 2, 0)
    expected = np.clip(ds.images[out.is_poison].astype(int) + noise, 0, 255)  # training poison: x + delta
    assert np.array_equal(out.dataset.images[out.is_poison], expected)
    assert np.abs(out.dataset.images.astype(int) - ds.images.astype(int)).max() <= 16
    # the spec alone reproduces the test trigger, x + 3 delta
    again = attack_from_spec(json.loads(json.dumps(attack.spec())))
    images, targets = again.test_inputs(ds)
    keep = ds.labels != TARGET
    assert np.array_equal(images, np.clip(ds.images[keep].astype(int) + 3 * noise, 0, 255))
    assert np.array_equal(images, attack.test_inputs(ds)[0]) and np.all(targets == TARGET)
    plain = make("narcissus", trigger=attack.trigger, test_multiplier=1)  # given a trigger: no optimisation
    assert np.array_equal(plain.poison(ds).dataset.images, out.dataset.images)
    assert np.array_equal(plain.test_inputs(ds)[0], np.clip(ds.images[keep].astype(int) + noise, 0, 255))


def test_narcissus_is_deterministic_per_seed_and_follows_eps(ds):
    a, b, c = make("narcissus"), make("narcissus"), make("narcissus", seed=2)
    pa, pb, _ = a.poison(ds), b.poison(ds), c.poison(ds)
    assert a.trigger == b.trigger and np.array_equal(pa.dataset.images, pb.dataset.images)
    assert a.trigger != c.trigger
    small = make("narcissus", eps=4 / 255)
    out = small.poison(ds)
    assert np.abs(np.array(small.trigger)).max() <= 4
    assert np.abs(out.dataset.images.astype(int) - ds.images.astype(int)).max() <= 4


def test_narcissus_noise_lowers_the_target_loss_on_its_warmed_up_surrogate(ds, monkeypatch):
    import components.attacks.narcissus as narcissus

    models = []
    freeze = narcissus.freeze
    monkeypatch.setattr(narcissus, "freeze", lambda model: models.append(freeze(model)) or model)  # the warmed-up model
    attack = make("narcissus", rounds=40)
    attack.poison(ds)
    (model,) = models
    x = torch.from_numpy(ds.images[ds.labels == TARGET]).permute(0, 3, 1, 2).float() / 255
    delta = torch.tensor(attack.trigger, dtype=torch.float32) / 255
    target = torch.full((len(x),), TARGET)
    with torch.no_grad():
        assert F.cross_entropy(model((x + delta).clamp(0, 1)), target) < F.cross_entropy(model(x), target)


def test_narcissus_errors(ds):
    with pytest.raises(UnpoisonError, match=r"narcissus eps 0 is outside \(0, 1\]"):
        make("narcissus", eps=0)
    with pytest.raises(UnpoisonError, match="narcissus test_multiplier 0 is not a positive number"):
        make("narcissus", test_multiplier=0)
    with pytest.raises(UnpoisonError, match="narcissus rounds 0 is not a valid count"):
        make("narcissus", rounds=0)
    with pytest.raises(UnpoisonError, match=r"narcissus trigger is not a C x H x W array of integers within \+-16"):
        make("narcissus", trigger=[[[17]]])
    with pytest.raises(UnpoisonError, match="narcissus trigger has shape"):
        make("narcissus", trigger=[[[1]]]).apply(torch.zeros(1, C, H, W))
    with pytest.raises(UnpoisonError, match="hybrid first 'narcissus' optimises its trigger"):
        build_attack("hybrid", target=TARGET, rate=0.2, seed=1, num_classes=K, first="narcissus")


def test_lc_and_narcissus_params_from_set():
    from components.config import load_config, parse_overrides
    from pipelines.local import validate

    for name, sets, expected in (
        ("lc", ["attack.params.eps=0.0314", "attack.params.steps=10", "attack.params.position=bottom-right"],
         {"eps": 0.0314, "steps": 10, "position": "bottom-right"}),
        ("narcissus", ["attack.params.test_multiplier=1", "attack.params.rounds=50"], {"test_multiplier": 1, "rounds": 50}),
    ):
        cfg = load_config("cpu", parse_overrides(sets, **{"attack.name": name, "data": "sample"}))
        validate("none", cfg)
        assert cfg.attack.params == expected
    cfg = load_config("cpu", parse_overrides(["attack.params.eps=2"], **{"attack.name": "lc", "data": "sample"}))
    with pytest.raises(UnpoisonError, match=r"lc eps 2 is outside \(0, 1\]"):
        validate("none", cfg)


# --- the protocol's training budget (attack.epochs) ---

TRAINS = {"lc", "narcissus", "adaptive_pgd", "input_aware"}  # the attacks that train a model while they poison


def test_only_the_attacks_that_train_a_model_take_the_budget_and_the_cpu_protocols_keeps_their_defaults():
    from components.attacks import ATTACKS, describe, from_params, trains_model
    from components.config import load_config

    assert {name for name in ATTACKS if trains_model(name)} == TRAINS
    assert load_config("cpu").attack.epochs == 5  # the budget the attacks' defaults are set for
    for name in ATTACKS:
        assert ("attack.epochs" in describe(name)) == (name in TRAINS), name  # `unpoison attacks` says which
        default = from_params(AttackParams(name=name), K).spec()
        assert from_params(AttackParams(name=name, epochs=5), K).spec() == default, name
        if name not in TRAINS:  # no model trained: a budget changes nothing
            assert from_params(AttackParams(name=name, epochs=1), K).spec() == default, name


@pytest.mark.parametrize("name,epochs,expected", [
    ("lc", 1, {"epochs": 1}), ("adaptive_pgd", 1, {"epochs": 1}), ("lc", 200, {"epochs": 200}),
    ("narcissus", 200, {"epochs": 200, "warmup_epochs": 5}),  # the reference's warm-up whatever the budget
    ("input_aware", 200, {"epochs": 80, "mask_epochs": 1}), ("input_aware", 1, {"epochs": 1, "mask_epochs": 1})])
def test_the_budget_sets_each_attacks_epochs_and_a_param_given_by_name_wins(name, epochs, expected):
    from components.attacks import from_params

    params = from_params(AttackParams(name=name, epochs=epochs), K).spec()["params"]
    assert {k: params[k] for k in expected} == expected
    given = from_params(AttackParams(name=name, epochs=epochs, params={"epochs": 3}), K)
    assert given.epochs == 3


@pytest.mark.parametrize("name", ["lc", "adaptive_pgd"])
def test_the_poison_stage_trains_the_surrogate_for_the_configured_budget(name, tmp_path, monkeypatch):
    """Through the poison stage, as the pipelines run it: attack.epochs 1 trains the surrogate one epoch, unless
    attack.params.epochs says otherwise."""
    import importlib

    from components import stages
    from components.config import load_config

    module = importlib.import_module(f"components.attacks.{name}")
    trained = []
    real = module.train_surrogate
    monkeypatch.setattr(module, "train_surrogate", lambda *a, **kw: trained.append(kw["epochs"]) or real(*a, **kw))
    for sets, epochs in (({}, 1), ({"attack.params.epochs": 2}, 2)):
        cfg = load_config("cpu", {"attack.name": name, "attack.epochs": 1, "attack.params.steps": 1, **sets})
        stages.poison("sample", cfg.attack, tmp_path / str(epochs), train_limit=300)
        assert json.loads((tmp_path / str(epochs) / "attack.json").read_text())["params"]["epochs"] == epochs
    assert trained == [1, 2]
