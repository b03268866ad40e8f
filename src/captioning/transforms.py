"""Image -> normalised tensor, following an encoder's own preprocessing."""

from collections.abc import Callable

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode

from .encoders import Preprocess


def make_transform(pp: Preprocess) -> Callable[[Image.Image], Tensor]:
    """Resize the shorter side to `resize_size`, centre-crop `image_size`, normalise: (3, S, S)."""
    mode = InterpolationMode(pp.interpolation)

    def transform(img: Image.Image) -> Tensor:
        x = TF.pil_to_tensor(img)  # (3, H, W) uint8
        x = TF.resize(x, [pp.resize_size], interpolation=mode, antialias=True)
        x = TF.center_crop(x, [pp.image_size, pp.image_size])
        x = TF.to_dtype(x, torch.float32, scale=True)
        return TF.normalize(x, list(pp.mean), list(pp.std))

    return transform
