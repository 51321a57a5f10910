"""The input-aware dynamic attack (components/attacks/input_aware.py): a per-image pattern and mask from generators
the attack trains while it poisons, stored in the spec. One epoch of each stage on the `ds` fixture (200 random
32 x 32 images, 10 classes); the generic checks over every attack are in tests/test_attacks.py."""

import json

import numpy as np
import pytest
import torch

from components.attacks import attack_from_spec, build_attack, describe
from components.data import ImageSet
from components.errors import UnpoisonError

N, H, W, C, K = 200, 32, 32, 3, 10  # the shape of the `ds` fixture (tests/conftest.py)
RATE, TARGET = 0.05, 0
FAST = {"epochs": 1, "mask_epochs": 1}


def make(seed: int = 1, rate: float = RATE, **params):
    return build_attack("input_aware", target=TARGET, rate=rate, seed=seed, num_classes=K, **{**FAST, **params})


def floats(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def trained(ds):
    attack = make()
    return attack, attack.poison(ds)


@pytest.fixture(scope="module")
def ds():  # the conftest fixture's set, at module scope so that one trained attack serves several tests
    rng = np.random.default_rng(123)
    images = rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(10), 20).astype(np.int64)
    rng.shuffle(labels)
    return ImageSet(images, labels, tuple(f"c{i}" for i in range(10)))


def test_poisons_rate_of_non_target_images_relabelled_to_the_target(ds, trained):
    attack, out = trained
    assert out.is_poison.sum() == round(RATE * N) and not out.is_cover.any()
    assert np.all(out.true_label[out.is_poison] != TARGET) and np.array_equal(out.true_label, ds.labels)
    assert np.all(out.dataset.labels[out.is_poison] == TARGET)
    rest = ~out.is_poison
    assert np.array_equal(out.dataset.images[rest], ds.images[rest]) and np.array_equal(out.dataset.labels[rest], ds.labels[rest])
    changed = (out.dataset.images != ds.images).reshape(N, -1).any(1)
    assert changed[out.is_poison].all()
    # x' = x + m(x) (G(x) - x): the poison is the trigger the spec's generators make
    x = floats(ds.images[out.is_poison])
    pattern, mask = attack.pattern_mask(x)
    assert pattern.shape == x.shape and mask.shape == (len(x), 1, H, W)
    assert 0 <= pattern.min() and pattern.max() <= 1 and 0 <= mask.min() and mask.max() <= 1
    expected = ((x + mask * (pattern - x)) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(out.dataset.images[out.is_poison], expected)


def test_spec_alone_reproduces_the_training_trigger(ds, trained):
    attack, out = trained
    text = json.dumps(attack.spec())
    assert len(text) < 1_000_000 and isinstance(attack.trigger, str)
    again = attack_from_spec(json.loads(text))
    assert again.spec() == attack.spec()
    poisoned = out.dataset.images[out.is_poison]
    assert np.array_equal(again.apply_uint8(ds.images[out.is_poison]), poisoned)
    one = np.flatnonzero(out.is_poison)[3]  # alone in its batch: the same trigger (eval-mode batch norm), to rounding
    alone = again.apply_uint8(ds.images[one : one + 1])[0].astype(int)
    assert np.abs(alone - out.dataset.images[one].astype(int)).max() <= 1
    images, targets = again.test_inputs(ds)
    keep = ds.labels != TARGET
    assert np.all(targets == TARGET) and len(images) == keep.sum()
    assert np.array_equal(images, attack.test_inputs(ds)[0])
    assert np.array_equal(images, again.apply_uint8(ds.images[keep]))
    given = make(trigger=attack.trigger)  # a given trigger skips the training
    assert np.array_equal(given.poison(ds).dataset.images, out.dataset.images)


def test_trigger_is_input_dependent(ds, trained):
    attack, _ = trained
    x = floats(ds.images[:8])
    pattern, mask = attack.pattern_mask(x)
    for i in range(1, 8):  # every image gets its own pattern
        assert not torch.equal(pattern[0], pattern[i])
    assert pattern.std(0).mean() > 1e-3
    y = attack.apply(x)
    assert not torch.equal(y[0] - x[0], y[1] - x[1])
    # image 0 with image 1's pattern and mask (a cross sample) differs from image 0's own trigger
    assert not torch.equal(attack.cross(x[:1], x[1:2]), y[:1])


def test_deterministic_per_seed_and_the_seed_moves_the_generators(ds, trained):
    attack, out = trained
    same = make()
    again = same.poison(ds)
    assert same.trigger == attack.trigger
    assert np.array_equal(again.dataset.images, out.dataset.images) and np.array_equal(again.is_poison, out.is_poison)
    other = make(seed=2)
    other.poison(ds)
    assert other.trigger != attack.trigger
    x = floats(ds.images[:4])
    assert not torch.equal(other.pattern_mask(x)[0], attack.pattern_mask(x)[0])  # a different generator output


def test_all2all_and_cross_samples(ds):
    out = make(mapping="all2all").poison(ds)
    assert out.is_poison.sum() == round(RATE * N)
    assert np.array_equal(out.dataset.labels[out.is_poison], (ds.labels[out.is_poison] + 1) % K)
    attack = make(cross_ratio=2)
    crossed = attack.poison(ds)
    assert crossed.is_cover.sum() == round(2 * RATE * N) and not (crossed.is_cover & crossed.is_poison).any()
    assert np.array_equal(crossed.dataset.labels[crossed.is_cover], ds.labels[crossed.is_cover])  # labels kept
    assert (crossed.dataset.images != ds.images).reshape(N, -1).any(1)[crossed.is_cover].all()
    own = attack.apply_uint8(ds.images[crossed.is_cover])  # a partner's pattern, not the image's own
    assert not np.array_equal(own, crossed.dataset.images[crossed.is_cover])
    plain = make().poison(ds)  # the cross samples leave the poison as it is
    assert np.array_equal(plain.dataset.images[plain.is_poison], crossed.dataset.images[crossed.is_poison])
    assert np.array_equal(make(cross_ratio=2).poison(ds).dataset.images, crossed.dataset.images)


def test_errors(ds, trained):
    attack, _ = trained
    with pytest.raises(UnpoisonError, match="input_aware has no trigger yet: its generators are trained when the attack poisons"):
        make().apply(torch.zeros(1, C, H, W))
    with pytest.raises(UnpoisonError, match="input_aware epochs -1 is not a valid count"):
        make(epochs=-1)
    with pytest.raises(UnpoisonError, match="input_aware batch_size 1 is not a valid count"):
        make(batch_size=1)
    with pytest.raises(UnpoisonError, match=r"input_aware train_ratio 0.6 is outside \(0, 0.5\]"):
        make(train_ratio=0.6)
    with pytest.raises(UnpoisonError, match="input_aware train_ratio 0.1 of batch_size 8 gives no backdoor image"):
        make(batch_size=8)
    with pytest.raises(UnpoisonError, match="input_aware lambda_div -1 is not a non-negative number"):
        make(lambda_div=-1)
    with pytest.raises(UnpoisonError, match=r"input_aware mask_density 1 is outside \(0, 1\)"):
        make(mask_density=1)
    with pytest.raises(UnpoisonError, match="input_aware trigger is not the base64 text of the generators' float32 weights"):
        make(trigger="not base64!")
    with pytest.raises(UnpoisonError, match="input_aware trigger is not the base64 text"):
        make(trigger=[1.0, 2.0])
    with pytest.raises(UnpoisonError, match="input_aware trigger holds 22436 weights but the generators of 1-channel images have"):
        make(trigger=attack.trigger).apply(torch.zeros(1, 1, H, W))
    with pytest.raises(UnpoisonError, match="input_aware generators need image sides that are multiples of 4 but the images are 30x30"):
        make(trigger=attack.trigger).apply(torch.zeros(1, C, 30, 30))
    with pytest.raises(UnpoisonError, match="input_aware generators need image sides that are multiples of 4"):
        make().poison(ImageSet(ds.images[:, :30, :30].copy(), ds.labels, ds.classes))
    with pytest.raises(UnpoisonError, match="target class 5 does not exist in a data set of 3 classes"):
        build_attack("input_aware", target=5, rate=RATE, seed=0, num_classes=K).poison(ImageSet(ds.images, ds.labels % 3, ("a", "b", "c")))
    with pytest.raises(UnpoisonError, match="hybrid second 'input_aware' optimises its trigger"):
        build_attack("hybrid", target=TARGET, rate=0.2, seed=1, num_classes=K, second="input_aware")


def test_listed_with_its_params_and_set_from_the_config():
    from components.config import load_config, parse_overrides
    from pipelines.local import validate

    text = describe("input_aware")
    assert text.startswith("input_aware  (dirty label)  ") and "Input-Aware Dynamic Backdoor Attack" in text
    assert "params: epochs=2, mask_epochs=1, batch_size=128, train_ratio=0.1, lambda_div=1, lambda_norm=100, mask_density=0.032, " \
           "cross_ratio=0, trigger=None, mapping='all2one'" in text
    sets = ["attack.params.epochs=3", "attack.params.cross_ratio=1", "attack.params.mapping=all2all"]
    cfg = load_config("cpu", parse_overrides(sets, **{"attack.name": "input_aware", "data": "sample"}))
    validate("none", cfg)
    assert cfg.attack.params == {"epochs": 3, "cross_ratio": 1, "mapping": "all2all"}
    cfg = load_config("cpu", parse_overrides(["attack.params.mask_density=2"], **{"attack.name": "input_aware", "data": "sample"}))
    with pytest.raises(UnpoisonError, match=r"input_aware mask_density 2 is outside \(0, 1\)"):
        validate("none", cfg)
