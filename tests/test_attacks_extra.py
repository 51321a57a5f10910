"""Picture triggers and the attacks built on them or on other attacks: bundled pictures (Blend, Adaptive-Blend), Refool,
PhysicalBA, CBA, the universal-noise adaptive attack and the hybrid of two attacks. Determinism, spec round trips and
poison counts of every attack are in tests/test_attacks.py (parametrized over ATTACKS)."""

import numpy as np
import pytest
import torch

from components.attacks import build_attack
from components.attacks.pictures import PICTURES, load_picture, picture_file
from components.errors import UnpoisonError

N, H, W, C, K = 200, 32, 32, 3, 10  # the shape of the `ds` fixture (tests/conftest.py)
RATE, TARGET = 0.05, 0


def make(name: str, seed: int = 1, rate: float = RATE, **params):
    return build_attack(name, target=TARGET, rate=rate, seed=seed, num_classes=K, **params)


def changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, H, W) bool: pixels where a and b differ on any channel."""
    return (a != b).any(-1)


# --- bundled pictures ---


@pytest.mark.parametrize("name", sorted(PICTURES))
def test_bundled_pictures_ship_with_the_installed_packages(name):
    assert picture_file(name).is_file()  # inside an installed wheel: nothing is downloaded
    p = load_picture(name, C, H, W, "test")
    assert p.shape == (C, H, W) and 0 <= p.min() and p.max() <= 1 and p.std() > 0.05


def test_blend_picture_is_the_bundled_picture_resized():
    from PIL import Image

    with Image.open(picture_file("present")) as img:  # RGBA clip art: on white, then resized as Blend resizes
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
        expected = np.asarray(img.convert("RGB").resize((W, H), Image.BILINEAR), dtype=np.float32) / 255
    for name in ("blend", "adaptive_blend"):
        p, _ = make(name, picture="present").pattern(C, H, W)
        assert np.array_equal(p.permute(1, 2, 0).numpy(), expected)
    x = torch.rand(2, C, H, W)
    p = torch.from_numpy(expected).permute(2, 0, 1)
    torch.testing.assert_close(make("blend", picture="present", alpha=0.1).apply(x), 0.9 * x + 0.1 * p)


def test_blend_picture_errors(tmp_path):
    with pytest.raises(UnpoisonError, match="blend has both picture 'present' and pattern_path"):
        make("blend", picture="present", pattern_path="x.png")
    with pytest.raises(UnpoisonError, match=r"cannot read blend picture '.*missing.png'.*bundled pictures \(present, logo"):
        make("blend", picture=str(tmp_path / "missing.png")).apply(torch.zeros(1, C, H, W))
    with pytest.raises(UnpoisonError, match="blend picture 3 is not a picture"):
        make("blend", picture=3)


# --- Refool ---


def test_refool_clean_label_reflections(ds):
    attack = make("refool")
    out = attack.poison(ds)
    assert out.is_poison.sum() == 10 and np.all(ds.labels[out.is_poison] == TARGET)  # target class only
    assert np.array_equal(out.dataset.labels, ds.labels) and not out.is_cover.any()  # labels kept
    # each poisoned image is one of the reflections blended in: the one that reproduces it
    x = torch.from_numpy(ds.images[out.is_poison]).permute(0, 3, 1, 2).float() / 255
    options = [attack.apply_uint8(ds.images[out.is_poison], lambda v, j=j: attack.blend(v, torch.full((len(v),), j)))
               for j in range(3)]
    hits = np.stack([(o == out.dataset.images[out.is_poison]).all((1, 2, 3)) for o in options], 1)
    assert np.all(hits.sum(1) >= 1) and hits.any(0).sum() >= 2  # several reflections in use
    # the formula: a flat black image shows the reflection layer alone, ((alpha r_k)^2.2)^(1/2.2) = alpha^(1/2.2) r_k
    r = attack.reflection("hopper", C, H, W)
    y = attack.apply(torch.zeros(1, C, H, W))
    torch.testing.assert_close(y[0], (0.3 * r.clamp(0, 1) ** 2.2) ** (1 / 2.2))
    assert x.shape[0] == 10


def test_refool_ghost_and_blur():
    ghost, blur = make("refool", reflections=["china"]), make("refool", reflections=["china"], mode="blur")
    g, b = ghost.reflection("china", C, H, W), blur.reflection("china", C, H, W)
    big = load_picture("china", C, H + 3, W + 3, "test")
    torch.testing.assert_close(g, 0.3 * big[:, :H, :W] + 0.7 * big[:, 3:, 3:])  # two shifted copies
    sharp = load_picture("china", C, H, W, "test")
    assert (b[:, 1:] - b[:, :-1]).abs().mean() < (sharp[:, 1:] - sharp[:, :-1]).abs().mean()  # blurred
    with pytest.raises(UnpoisonError, match="refool mode 'focus' is unknown"):
        make("refool", mode="focus")
    with pytest.raises(UnpoisonError, match=r"refool offset \[3\] is not \[dy, dx\]"):
        make("refool", offset=[3])


# --- PhysicalBA ---


def test_physical_ba_logo_patch_and_random_transforms(ds):
    attack = make("physical_ba")
    p, m = attack.pattern(C, H, W)
    assert torch.equal(p[:, -8:, -8:], load_picture("logo", C, 8, 8, "test")) and m.sum() == 64
    x = torch.rand(3, C, H, W)
    y = attack.apply(x)
    assert torch.equal(y[:, :, :-8], x[:, :, :-8]) and torch.equal(y[:, :, -8:, -8:], p[:, -8:, -8:].expand(3, -1, -1, -1))
    out = attack.poison(ds)
    assert out.is_poison.sum() == 10 and np.all(out.dataset.labels[out.is_poison] == TARGET)
    plain = attack.apply_uint8(ds.images[out.is_poison])
    assert not (out.dataset.images[out.is_poison] == plain).all((1, 2, 3)).any()  # every poison image transformed
    still = make("physical_ba", brightness=0, contrast=0, translate=0, scale=[1, 1]).poison(ds)
    assert np.array_equal(still.dataset.images[still.is_poison], plain)  # no transform: the digital patch
    with pytest.raises(UnpoisonError, match=r"physical_ba scale \[1.2, 0.9\] is not \[low, high\]"):
        make("physical_ba", scale=[1.2, 0.9])


# --- CBA ---


def test_cba_mixes_two_classes_into_the_target_with_same_class_covers(ds):
    attack = make("cba", rate=0.1, cover_rate=0.05, jitter=0)
    assert attack.classes == [1, 2]  # the two classes after the target
    out = attack.poison(ds)
    p = out.is_poison
    assert p.sum() == 20 and np.isin(ds.labels[p], [1, 2]).all() and np.all(out.dataset.labels[p] == TARGET)
    ones, twos = ds.images[ds.labels == 1], ds.images[ds.labels == 2]
    for i in np.flatnonzero(p):  # class 1 first (left or top half), class 2 second: one of them sample i itself
        img, own = out.dataset.images[i], ds.images[i]
        cuts = [(np.s_[:, :16], np.s_[:, 16:]), (np.s_[:16], np.s_[16:])]  # vertical or horizontal split at 16

        def fits(a: tuple, b: tuple) -> bool:
            mine, partners = (a, twos) if ds.labels[i] == 1 else (b, ones)
            other = b if mine is a else a
            return np.array_equal(img[mine], own[mine]) and any(np.array_equal(img[other], q[other]) for q in partners)

        assert any(fits(a, b) for a, b in cuts), f"poison sample {i} is not a class-1 / class-2 mix"
    c = out.is_cover
    assert c.sum() == 10 and np.array_equal(out.dataset.labels[c], ds.labels[c]) and np.all(ds.labels[c] != TARGET)
    assert changed(out.dataset.images[c], ds.images[c]).any((1, 2)).all()
    images, targets = attack.test_inputs(ds)
    assert len(images) == 20 and np.all(targets == TARGET)
    assert np.array_equal(images[:, :, :16], ds.images[ds.labels == 1][:, :, :16])
    assert np.array_equal(images[:, :, 16:], ds.images[ds.labels == 2][:, :, 16:])
    with pytest.raises(UnpoisonError, match=r"cba classes \[0, 3\] is not two different classes other than the target 0"):
        make("cba", classes=[0, 3])


# --- the adaptive attack against perturbation scores (BSD App. E.5) ---


def test_adaptive_pgd_universal_noise_within_eps_and_stored_in_the_spec(ds):
    from components.attacks import attack_from_spec

    attack = make("adaptive_pgd", epochs=1)
    with pytest.raises(UnpoisonError, match="adaptive_pgd has no trigger yet"):
        attack.apply(torch.zeros(1, C, H, W))
    out = attack.poison(ds)
    delta = np.array(attack.trigger)
    assert delta.shape == (C, H, W) and np.abs(delta).max() == 8 and np.abs(delta).mean() > 4  # l_inf 8/255, used
    diff = out.dataset.images[out.is_poison].astype(int) - ds.images[out.is_poison].astype(int)
    raw = ds.images[out.is_poison].astype(int) + delta.transpose(1, 2, 0)
    unclipped = (raw >= 0) & (raw <= 255)
    assert np.array_equal(diff[unclipped], np.broadcast_to(delta.transpose(1, 2, 0), diff.shape)[unclipped])  # x + delta
    again = attack_from_spec(attack.spec())  # the test set is triggered from the spec alone
    assert np.array_equal(again.apply_uint8(ds.images[:5]), attack.apply_uint8(ds.images[:5]))
    twin = make("adaptive_pgd", epochs=1)
    twin.poison(ds)
    assert twin.trigger == attack.trigger  # deterministic per seed
    other = make("adaptive_pgd", epochs=1, seed=2)
    other.poison(ds)
    assert other.trigger != attack.trigger
    with pytest.raises(UnpoisonError, match="adaptive_pgd trigger is not a C x H x W array of integers within"):
        make("adaptive_pgd", trigger=[[[9]]])


# --- hybrid ---


def test_hybrid_two_disjoint_poison_sets(ds):
    attack = make("hybrid", rate=0.2, first="badnets", second="blend", second_params={"alpha": 0.1})
    first, second, rest = attack.poison_parts(ds)
    assert first.is_poison.sum() == 20 and second.is_poison.sum() == 20  # share 0.5 of 40
    out = attack.poison(ds)
    assert out.is_poison.sum() == 40 and np.all(out.dataset.labels[out.is_poison] == TARGET)
    a, b = np.flatnonzero(first.is_poison), rest[second.is_poison]
    assert not set(a) & set(b)
    bad, blend = make("badnets"), make("blend", alpha=0.1)
    assert np.array_equal(out.dataset.images[a], bad.apply_uint8(ds.images[a]))
    assert np.array_equal(out.dataset.images[b], blend.apply_uint8(ds.images[b]))
    untouched = ~out.is_poison
    assert np.array_equal(out.dataset.images[untouched], ds.images[untouched])
    # ASR: the first trigger by default, the second, or both (each test image once with each)
    images, targets = attack.test_inputs(ds)
    assert np.array_equal(images, bad.apply_uint8(ds.images[ds.labels != TARGET]))
    second_only = make("hybrid", rate=0.2, second_params={"alpha": 0.1}, asr_on="second").test_inputs(ds)[0]
    assert np.array_equal(second_only, blend.apply_uint8(ds.images[ds.labels != TARGET]))
    both, both_targets = make("hybrid", rate=0.2, second_params={"alpha": 0.1}, asr_on="both").test_inputs(ds)
    assert len(both) == 2 * 180 and np.array_equal(both, np.concatenate([images, second_only]))


def test_hybrid_with_a_clean_label_attack_and_covers(ds):
    out = make("hybrid", rate=0.1, first="wanet", second="sig", share=0.5).poison(ds)
    assert out.is_poison.sum() == 20 and out.is_cover.sum() == 20  # WaNet's noise covers: cross_ratio 2 x its 10
    sig = out.is_poison & (ds.labels == TARGET)
    assert sig.sum() == 10 and np.array_equal(out.dataset.labels[sig], ds.labels[sig])  # SIG keeps labels


def test_hybrid_errors(ds):
    with pytest.raises(UnpoisonError, match="hybrid second 'hybrid' is not an attack to combine"):
        make("hybrid", second="hybrid")
    with pytest.raises(UnpoisonError, match=r"unknown parameter\(s\) sise for attack 'badnets'"):
        make("hybrid", first_params={"sise": 3})
    with pytest.raises(UnpoisonError, match="hybrid first 'adaptive_pgd' optimises its trigger"):
        make("hybrid", first="adaptive_pgd")
    with pytest.raises(UnpoisonError, match="gives 0 and 1 of 200 samples"):
        make("hybrid", rate=0.005).poison(ds)


def test_hybrid_params_from_set():
    from components.config import load_config, parse_overrides
    from pipelines.local import validate

    cfg = load_config("cpu", parse_overrides(["attack.params.second=sig", "attack.params.second_params.delta=0.1",
                                              "attack.params.asr_on=both"], **{"attack.name": "hybrid", "data": "sample"}))
    validate("none", cfg)
    assert cfg.attack.params == {"second": "sig", "second_params": {"delta": 0.1}, "asr_on": "both"}


# --- the report's poisoned examples ---


def test_report_shows_poisoned_images_beside_their_clean_originals(tmp_path):
    from PIL import Image

    from components import artifacts, stages
    from components.artifacts import SAMPLE_SCHEMA
    from components.params import AttackParams

    stages.poison("sample", AttackParams(name="badnets", rate=0.1), tmp_path / "data", train_limit=100)
    table = artifacts.read_table(tmp_path / "data" / "samples.parquet", SAMPLE_SCHEMA)
    train_set = stages.load_dataset(tmp_path / "data" / "dataset.npz")
    path = tmp_path / "examples.png"
    assert stages.poison_examples("sample", tmp_path / "data", train_set, table, path)
    with Image.open(path) as img:
        assert img.size[0] > 600 and img.size[1] > 200  # two rows of 8
    artifacts.write_json({"source": "sample"}, tmp_path / "data" / "dataset.json")  # as delivered: no clean originals
    assert not stages.poison_examples("sample", tmp_path / "data", train_set, table, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
