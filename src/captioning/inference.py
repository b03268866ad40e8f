"""Load a checkpoint and caption images; used by evaluate.py, the CLI and the web app.

Imports neither Lightning nor Hydra: one `.ckpt` file is the whole model.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from .checkpoint import model_state, read_checkpoint
from .decoding import DecodeConfig, Hypothesis
from .encoders import Preprocess
from .ensemble import EnsembleDecoder, EnsembleEncoder
from .errors import CheckpointError
from .model import Captioner, build_captioner
from .transforms import make_transform
from .viz import square_grid
from .vocab import Vocab


def resolve_device(device: str | torch.device) -> str | torch.device:
    """`auto`: the GPU when there is one, else the CPU; any other name as it is."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@dataclass
class CaptionModel:
    """A loaded model with everything needed to caption an image."""

    model: Captioner
    vocab: Vocab
    preprocess: Preprocess
    meta: dict[str, Any]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> "CaptionModel":
        self.model.to(device)
        return self

    def images_to_tensor(self, images: list[Image.Image]) -> Tensor:
        t = make_transform(self.preprocess)
        return torch.stack([t(im.convert("RGB")) for im in images]).to(self.device)  # (B, 3, S, S)

    @torch.no_grad()
    def caption_tensor(
        self, images: Tensor, decode: DecodeConfig | None = None, **options: Any
    ) -> list[list[Hypothesis]]:
        """Beams (best first) for each image (B, 3, S, S). `decode`, or its fields as keywords
        (`beam_size=3`, the default here)."""
        if decode is None:
            decode = DecodeConfig(**{"beam_size": 3, **options})
        return self.model.generate(self.model.encode(images), self.vocab, decode)

    def caption(
        self, images: list[Image.Image], decode: DecodeConfig | None = None, **options: Any
    ) -> list[list[Hypothesis]]:
        """Beams (best first) for each PIL image."""
        return self.caption_tensor(self.images_to_tensor(images), decode, **options)

    def text(self, hyp: Hypothesis) -> str:
        return self.vocab.decode(hyp.tokens)

    @property
    def grid(self) -> int | None:
        """Side of the square attention grid, if the encoder's regions form one."""
        return square_grid(self.meta.get("num_regions") or 0)


def load_model(
    path: str | Path | Sequence[str | Path], device: str | torch.device = "cpu"
) -> CaptionModel:
    """Rebuild the Captioner from a checkpoint alone (no pretrained download, no Hydra).

    Several paths: an ensemble of those checkpoints (`captioning/ensemble.py`).
    """
    if not isinstance(path, str | Path):
        paths = list(path)
        if len(paths) == 1:
            return load_model(paths[0], device)
        return load_ensemble(paths, device)
    ckpt = read_checkpoint(path)
    info = ckpt["captioning"]
    vocab = Vocab.from_dict(info["vocab"])
    # The trained weights come from the checkpoint, so never fetch the pretrained ones again.
    encoder_cfg = {**info["encoder"], "pretrained": False}
    model = build_captioner(encoder_cfg, info["decoder"], len(vocab))
    try:
        model.load_state_dict(model_state(ckpt["state_dict"]))
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the model it describes: {e}") from None
    model.eval().to(device)
    with torch.no_grad():
        pp = Preprocess.from_dict(info["preprocess"])
        probe = torch.zeros(1, 3, pp.image_size, pp.image_size, device=device)
        num_regions = model.encode(probe).size(1)
    meta = {k: v for k, v in info.items() if k not in ("vocab", "format")}
    meta["num_regions"] = num_regions
    meta["path"] = str(path)
    return CaptionModel(model=model, vocab=vocab, preprocess=pp, meta=meta)


def load_ensemble(paths: Sequence[str | Path], device: str | torch.device = "cpu") -> CaptionModel:
    """Checkpoints that caption as one model: each step averages their word probabilities.

    They must share the vocabulary, the preprocessing and the number of regions; members whose
    encoders are the same (config and weights) share one encoding of the images.
    """
    members = [load_model(p, "cpu") for p in paths]
    first = members[0]
    for m in members[1:]:
        why = None
        if m.vocab.itos != first.vocab.itos:
            why = "vocabularies differ (train them on the same data and vocabulary settings)"
        elif m.preprocess != first.preprocess:
            why = f"image preprocessing differs ({m.preprocess} vs {first.preprocess})"
        elif m.meta["num_regions"] != first.meta["num_regions"]:
            why = f"{m.meta['num_regions']} regions vs {first.meta['num_regions']}"
        if why:
            raise CheckpointError(
                f"cannot ensemble {first.meta['path']} and {m.meta['path']}: {why}"
            )
    encoders, configs, slices = [], [], []
    for m in members:
        enc, cfg = m.model.encoder, m.meta["encoder"]
        same = next(
            (i for i, e in enumerate(encoders) if configs[i] == cfg and same_weights(e, enc)), None
        )
        if same is None:
            encoders.append(enc)
            configs.append(cfg)
            same = len(encoders) - 1
        start = sum(e.out_dim for e in encoders[:same])
        slices.append((start, start + enc.out_dim))
    model = Captioner(
        EnsembleEncoder(encoders), EnsembleDecoder([m.model.decoder for m in members], slices)
    )
    model.eval().to(device)
    meta = {**first.meta, "path": " + ".join(str(p) for p in paths)}
    meta["ensemble"] = [m.meta for m in members]
    return CaptionModel(model=model, vocab=first.vocab, preprocess=first.preprocess, meta=meta)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Same class and the same tensors (parameters and buffers)."""
    if type(a) is not type(b):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa
    )
