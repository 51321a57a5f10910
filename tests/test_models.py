import copy

import pytest
import torch

from components.errors import UnpoisonError
from components.models import MODELS, Normalize, build_model, list_models


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("num_classes", [10, 43])
def test_forward_shape_and_input_gradient(name, num_classes):
    model = build_model(name, num_classes)  # train mode: BN uses batch statistics
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    out = model(x)
    assert out.shape == (2, num_classes) and out.dtype == torch.float32
    out.sum().backward()  # attacks and adversarial training differentiate through the pixels
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", list_models())
def test_head_of_features_is_the_model(name):
    model = build_model(name, 10).eval()
    x = torch.rand(2, 3, 32, 32)
    feats = model.features(x)
    assert feats.shape == (2, model.head.in_features)
    assert isinstance(model.head, torch.nn.Linear)
    torch.testing.assert_close(model.head(feats), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", list_models())
def test_other_input_sizes(name):
    model = build_model(name, 10).eval()
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 10)


@pytest.mark.parametrize("name", list_models())
def test_channels_last_matches_contiguous(name):
    model = build_model(name, 10).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        out = cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_parameter_counts():
    assert 250_000 <= n_params(build_model("small_cnn", 10)) <= 350_000
    assert abs(n_params(build_model("resnet18", 10)) - 11.17e6) <= 0.01 * 11.17e6
    # LfD section 5.3: ResNet-S1 < ResNet-S < ResNet-S2 < ResNet-18
    s1, s, s2, r18 = (n_params(build_model(n, 10)) for n in ("resnet_s1", "resnet_s", "resnet_s2", "resnet18"))
    assert s1 < s < s2 < r18


def test_resnet_s_widths_follow_lfd():
    # one block per stage; the last stage's width is what the head sees
    for name, width in (("resnet_s1", 1), ("resnet_s", 4), ("resnet_s2", 512)):
        model = build_model(name, 10)
        assert model.head.in_features == width
        assert sum(type(m).__name__ == "BasicBlock" for m in model.modules()) == 4


def test_normalize_math():
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    x = torch.rand(2, 3, 5, 5)
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(Normalize(mean, std)(x), expected)


def test_model_normalizes_first_and_once():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    model = build_model("small_cnn", 10, mean=mean, std=std).eval()
    assert isinstance(next(model.children()), Normalize)
    assert {"normalize.mean", "normalize.std"} <= set(model.state_dict())  # saved with the weights
    plain = build_model("small_cnn", 10, mean=(0, 0, 0), std=(1, 1, 1)).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("normalize.")}, strict=False)
    x = torch.rand(2, 3, 32, 32)
    pre = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(pre))
        # the per-channel mean image maps to what zeros give the identity-normalized model
        torch.testing.assert_close(model(torch.tensor(mean).view(1, 3, 1, 1).expand(2, 3, 32, 32)),
                                   plain(torch.zeros(2, 3, 32, 32)))


def test_unknown_name_names_the_choices():
    with pytest.raises(UnpoisonError) as err:
        build_model("resnet19", 10)
    msg = str(err.value)
    assert msg.startswith("unknown model 'resnet19'; choose one of: ") and "\n" not in msg
    assert all(name in msg for name in MODELS)


def test_bad_arguments_raise_unpoison_error():
    with pytest.raises(UnpoisonError):
        build_model("small_cnn", 1)
    with pytest.raises(UnpoisonError):
        build_model("small_cnn", 10, std=(0.2, 0.0, 0.2))
