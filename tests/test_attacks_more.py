"""Attack variants and the code-generated attacks of issue 15: BadNets placement and styles, all-to-all mapping, Bpp's
colour levels, TaCT's source-specific poison and covers, Adaptive-Blend's masked pieces, Adaptive-Patch's patches, and
attack params given on the command line. Determinism, spec round trips and poison counts of every attack are in
tests/test_attacks.py (parametrized over ATTACKS)."""

import numpy as np
import pytest
import torch

from components.attacks import build_attack
from components.errors import UnpoisonError

N, H, W, C, K = 200, 32, 32, 3, 10  # the shape of the `ds` fixture (tests/conftest.py)
RATE, TARGET = 0.05, 0


def make(name: str, seed: int = 1, rate: float = RATE, **params):
    return build_attack(name, target=TARGET, rate=rate, seed=seed, num_classes=K, **params)


def changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, H, W) bool: pixels where a and b differ on any channel."""
    return (a != b).any(-1)


# --- BadNets variants ---


@pytest.mark.parametrize(("position", "rows", "cols"), [("bottom-right", slice(29, 32), slice(29, 32)),
                                                        ("bottom-left", slice(29, 32), slice(0, 3)),
                                                        ("top-right", slice(0, 3), slice(29, 32)),
                                                        ("top-left", slice(0, 3), slice(0, 3)),
                                                        ([5, 10], slice(10, 13), slice(5, 8))])
def test_badnets_position(position, rows, cols):
    y = make("badnets", position=position).apply(torch.zeros(2, C, H, W))
    assert torch.all(y[:, :, rows, cols] == 1) and y.sum() == 2 * 3 * 3 * C


def test_badnets_grid_and_random_styles():
    x = torch.full((1, C, H, W), 0.5)
    grid = make("badnets", style="grid", size=4).apply(x)[0, :, -4:, -4:]
    expected = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.float32)
    assert torch.equal(grid, expected.expand(C, 4, 4))  # checkerboard, white at the bottom-right pixel
    rand = make("badnets", style="random", size=4).apply(x)
    assert rand[0, :, -4:, -4:].std() > 0.2 and torch.equal(rand[0, :, :-4], x[0, :, :-4])
    assert torch.equal(rand, make("badnets", style="random", size=4, seed=9).apply(x))  # the poison seed does not move it
    assert not torch.equal(rand, make("badnets", style="random", size=4, pattern_seed=1).apply(x))


def test_badnets_bad_variants():
    with pytest.raises(UnpoisonError, match=r"badnets style 'checker' is unknown; choose one of: white, grid, random"):
        make("badnets", style="checker")
    with pytest.raises(UnpoisonError, match=r"badnets position 'center' is unknown; choose one of: bottom-right"):
        make("badnets", position="center")
    with pytest.raises(UnpoisonError, match=r"badnets position \[1\] is not \[x, y\]"):
        make("badnets", position=[1])
    with pytest.raises(UnpoisonError, match=r"at \[x, y\] = \[30, 0\] leaves the 32x32 images; choose x <= 29"):
        make("badnets", position=[30, 0]).apply(torch.zeros(1, C, H, W))


# --- all-to-all ---


@pytest.mark.parametrize("name", ["badnets", "blend", "bpp", "adaptive_patch"])
def test_all2all_maps_each_class_to_the_next(ds, name):
    attack = make(name, mapping="all2all", rate=0.5)
    out = attack.poison(ds)
    p = out.is_poison
    assert p.sum() == 100
    assert np.array_equal(out.dataset.labels[p], (ds.labels[p] + 1) % K)
    assert (ds.labels[p] == TARGET).any()  # drawn from every class, the target's included
    images, targets = attack.test_inputs(ds)
    assert len(images) == N and np.array_equal(targets, (ds.labels + 1) % K)  # ASR against the mapped label
    assert make(name).test_inputs(ds)[1].tolist() == [TARGET] * int((ds.labels != TARGET).sum())  # all2one unchanged


def test_mapping_errors():
    with pytest.raises(UnpoisonError, match=r"attack 'badnets' mapping 'one2one' is unknown; choose all2one .* or all2all"):
        make("badnets", mapping="one2one")
    with pytest.raises(UnpoisonError, match=r"unknown parameter\(s\) mapping for attack 'sig'"):  # clean label
        make("sig", mapping="all2all")
    with pytest.raises(UnpoisonError, match=r"unknown parameter\(s\) mapping for attack 'tact'"):  # source-specific
        make("tact", mapping="all2all")


# --- Bpp ---


@pytest.mark.parametrize("dithering", [True, False])
def test_bpp_colour_levels(ds, dithering):
    attack = make("bpp", dithering=dithering)
    out = attack.poison(ds)
    levels = np.round(np.arange(8) / 7 * 255).astype(np.uint8)  # squeeze_num 8
    poisoned = out.dataset.images[out.is_poison]
    assert np.isin(poisoned, levels).all() and set(np.unique(poisoned)) == set(levels)
    assert np.array_equal(out.dataset.images[~out.is_poison], ds.images[~out.is_poison])
    four = make("bpp", squeeze_num=4, dithering=dithering).apply_uint8(ds.images[:5])
    assert np.isin(four, np.round(np.arange(4) / 3 * 255).astype(np.uint8)).all()


def test_bpp_dithering_diffuses_the_error():
    x = torch.full((1, C, H, W), 0.3)  # 76.5: between the levels 72.9 and 109.3
    plain, dithered = make("bpp", dithering=False).apply(x), make("bpp").apply(x)
    assert plain.unique().numel() == 1  # a flat image squeezes to one flat level
    assert dithered.unique().numel() == 2 and abs(dithered.mean().item() - 0.3) < 0.01  # dithering keeps the mean
    with pytest.raises(UnpoisonError, match="bpp squeeze_num 1 is not an integer in"):
        make("bpp", squeeze_num=1)


# --- TaCT ---


def test_tact_source_specific_with_covers(ds):
    attack = make("tact", cover_rate=0.05)
    out = attack.poison(ds)
    assert out.is_poison.sum() == 10 and np.all(ds.labels[out.is_poison] == 1)  # only from the source class
    assert np.all(out.dataset.labels[out.is_poison] == TARGET)
    assert out.is_cover.sum() == 10 and np.isin(ds.labels[out.is_cover], [5, 7]).all()
    assert np.array_equal(out.dataset.labels[out.is_cover], ds.labels[out.is_cover])  # covers keep their labels
    assert np.array_equal(out.dataset.images[out.is_cover], attack.apply_uint8(ds.images[out.is_cover]))  # same trigger
    images, targets = attack.test_inputs(ds)
    assert len(images) == 20 and np.all(targets == TARGET)  # ASR on the source class only
    assert np.array_equal(images, attack.apply_uint8(ds.images[ds.labels == 1]))


def test_tact_errors(ds):
    with pytest.raises(UnpoisonError, match="tact source 0 is not a class other than the target 0"):
        make("tact", source=0)
    with pytest.raises(UnpoisonError, match=r"tact cover_classes \[1\] is not a list of classes other than the source 1"):
        make("tact", cover_classes=[1])
    with pytest.raises(UnpoisonError, match=r"needs 30 samples of source class 1 but the data set has 20"):
        make("tact", rate=0.15).poison(ds)
    with pytest.raises(UnpoisonError, match=r"needs 60 cover samples of cover classes \[5, 7\] but only 40 remain"):
        make("tact", cover_rate=0.3).poison(ds)


# --- Adaptive-Blend ---


def test_adaptive_blend_masks_half_the_pieces_and_covers_keep_labels(ds):
    attack = make("adaptive_blend", cover_rate=0.05)
    out = attack.poison(ds)
    assert out.is_poison.sum() == 10 and out.is_cover.sum() == 10 and not (out.is_poison & out.is_cover).any()
    assert np.array_equal(out.dataset.labels[out.is_cover], ds.labels[out.is_cover])
    assert np.all(out.dataset.labels[out.is_poison] == TARGET)
    touched = out.is_poison | out.is_cover
    diff = changed(out.dataset.images[touched], ds.images[touched]).reshape(-1, 4, 8, 4, 8).any((2, 4))  # 4 x 4 pieces
    assert np.all(diff.sum((1, 2)) == 8)  # 8 of 16 pieces blended, 8 masked, in every training image
    assert len({d.tobytes() for d in diff}) > 1  # a new mask per image
    p, _ = attack.pattern(C, H, W)
    x = torch.rand(2, C, H, W)
    torch.testing.assert_close(attack.apply(x), 0.8 * x + 0.2 * p)  # the whole pattern at test


def test_adaptive_blend_bad_pieces():
    with pytest.raises(UnpoisonError, match="adaptive_blend pieces 10 is not a square number"):
        make("adaptive_blend", pieces=10)
    with pytest.raises(UnpoisonError, match="cannot cut 32x32 images into 9 equal pieces"):
        make("adaptive_blend", pieces=9).poison_images(np.zeros((1, 32, 32, 3), np.uint8), np.random.default_rng(0))


# --- Adaptive-Patch ---


def test_adaptive_patch_one_training_patch_per_image_other_patches_at_test(ds):
    attack = make("adaptive_patch", rate=0.1, cover_rate=0.04)
    out = attack.poison(ds)
    assert out.is_poison.sum() == 20 and out.is_cover.sum() == 8
    assert np.array_equal(out.dataset.labels[out.is_cover], ds.labels[out.is_cover])
    corners = {"tl": (slice(0, 4), slice(0, 4)), "tr": (slice(0, 4), slice(28, 32)),
               "bl": (slice(28, 32), slice(0, 4)), "br": (slice(28, 32), slice(28, 32))}
    for which in (out.is_poison, out.is_cover):
        d = changed(out.dataset.images[which], ds.images[which])
        hit = np.stack([d[:, r, c].any((1, 2)) for r, c in corners.values()], 1)
        assert np.all(hit.sum(1) == 1) and d.sum((1, 2)).max() <= 16  # one 4x4 corner patch per image
        groups = hit.argmax(1)
        assert np.array_equal(groups, np.sort(groups)) and np.all(np.bincount(groups, minlength=4) == which.sum() // 4)
    dt = changed(attack.apply_uint8(ds.images[:10]), ds.images[:10])
    assert dt[:, 14:18, 14:18].all() and dt[:, 28:, :4].all() and dt.sum((1, 2)).max() == 32  # centre + bottom-left
    y = attack.apply(torch.zeros(1, C, H, W))
    p0, _ = attack.patch(0, C, H, W, "top-left")
    assert torch.equal(y[0, :, 14:18, 14:18], p0[:, :4, :4])  # patch 0 at full opacity, moved to the centre


def test_adaptive_patch_bad_alphas():
    with pytest.raises(UnpoisonError, match=r"adaptive_patch alphas \[0.5, 2\] is not a list of 1 to 4 weights"):
        make("adaptive_patch", alphas=[0.5, 2])


# --- params from the command line ---


def test_attack_params_from_set_are_validated():
    from components.config import load_config, parse_overrides
    from pipelines.local import validate

    def cfg(name, *pairs):
        return load_config("cpu", parse_overrides(list(pairs), **{"attack.name": name, "data": "sample"}))

    validate("none", cfg("badnets", "attack.params.position=[2, 3]", "attack.params.style=grid", "attack.params.mapping=all2all"))
    validate("none", cfg("tact", "attack.params.cover_classes=[4]"))
    with pytest.raises(UnpoisonError, match=r"unknown parameter\(s\) sise for attack 'badnets'; valid parameters: size"):
        validate("none", cfg("badnets", "attack.params.sise=4"))
    with pytest.raises(UnpoisonError, match=r"bpp squeeze_num 300 is not an integer in \[2, 255\]; give"):
        validate("none", cfg("bpp", "attack.params.squeeze_num=300"))


def test_unpoison_attacks_lists_every_attack_with_its_params(capsys):
    from components.attacks import ATTACKS
    from pipelines.cli import main

    assert main(["attacks"]) == 0
    out = capsys.readouterr().out
    for name, cls in ATTACKS.items():
        assert f"\n{name}  (" in f"\n{out}" and cls.__doc__.splitlines()[0] in out
    assert "params: size=3, position='bottom-right', style='white', pattern_seed=0, mapping='all2one'" in out
    assert "params: source=1, cover_classes=[5, 7], cover_rate=0.01, size=8, pattern_seed=0" in out
    assert "BppAttack (Wang et al." in out and "--set attack.params." in out
