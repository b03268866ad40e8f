"""Image -> normalised tensor, following an encoder's own preprocessing."""

from collections.abc import Callable

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode

from .encoders import Preprocess


def make_transform(pp: Preprocess) -> Callable[[Image.Image], Tensor]:
    """Resize the shorter side to `resize_size`, centre-crop `image_size`, normalise: (3, S, S).

    Without `center_crop` the whole image is resized to (S, S).
    """
    mode = InterpolationMode(pp.interpolation)

    def transform(img: Image.Image) -> Tensor:
        x = TF.pil_to_tensor(img)  # (3, H, W) uint8
        if pp.center_crop:
            x = TF.resize(x, [pp.resize_size], interpolation=mode, antialias=True)
            x = TF.center_crop(x, [pp.image_size, pp.image_size])
        else:
            x = TF.resize(x, [pp.image_size, pp.image_size], interpolation=mode, antialias=True)
        x = TF.to_dtype(x, torch.float32, scale=True)
        return TF.normalize(x, list(pp.mean), list(pp.std))

    return transform


def model_box(width: int, height: int, pp: Preprocess) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1): the part of a width x height image that `pp` feeds the model."""
    if not pp.center_crop:
        return 0.0, 0.0, float(width), float(height)
    side = min(width, height) * min(1.0, pp.image_size / pp.resize_size)
    x0, y0 = (width - side) / 2, (height - side) / 2
    return x0, y0, x0 + side, y0 + side


def model_view(image: Image.Image, pp: Preprocess) -> Image.Image:
    """The image cropped to what the model sees, for drawing attention over the right pixels."""
    return image.crop(tuple(round(v) for v in model_box(*image.size, pp)))


def centre_square(image: Image.Image, pp: Preprocess) -> Image.Image:
    """Crop to the centred square first when `pp` centre-crops: the same pixels reach the model,
    but a 20000 x 1 image no longer gets resized to a 256 x 5,120,000 tensor on the way."""
    if not pp.center_crop:
        return image  # resized straight to (S, S)
    w, h = image.size
    s = min(w, h)
    x0, y0 = (w - s) // 2, (h - s) // 2
    return image.crop((x0, y0, x0 + s, y0 + s))
