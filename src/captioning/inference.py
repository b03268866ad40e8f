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

from .decoding import Hypothesis, generate
from .encoders import Preprocess
from .ensemble import EnsembleDecoder, EnsembleEncoder
from .errors import CheckpointError
from .model import Captioner, build_captioner
from .transforms import make_transform
from .vocab import SPECIALS, Vocab

SUPPORTED_FORMAT = 1
# What `load_model` needs from a checkpoint's "captioning" block.
_REQUIRED = ("encoder", "decoder", "vocab", "preprocess")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint of this project, or raise `CheckpointError` saying why it is not one.

    `weights_only=True` unpickles only plain containers, numbers, strings and tensors, so a file
    holding any other object (a pickled class whose `__reduce__` would run code, say) is refused
    before anything in it runs.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty, not a checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types on foreign or corrupt files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated, corrupt, or it holds objects that "
            f"are not plain tensors and values): {first[:300]}"
        ) from None
    info = ckpt.get("captioning") if isinstance(ckpt, dict) else None
    if not isinstance(info, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(
            f"{path} is not a checkpoint of this project (no 'captioning' block and 'state_dict'; "
            "a checkpoint written by train.py has both)"
        )
    fmt = info.get("format")
    if type(fmt) is not int or fmt < 1:
        raise CheckpointError(f"{path} has an invalid checkpoint format {fmt!r}")
    if fmt > SUPPORTED_FORMAT:
        raise CheckpointError(
            f"{path} has checkpoint format {fmt}, newer than this version supports "
            f"({SUPPORTED_FORMAT}); upgrade the captioning package"
        )
    missing = [k for k in _REQUIRED if not isinstance(info.get(k), dict)]
    itos = info.get("vocab", {}).get("itos") if isinstance(info.get("vocab"), dict) else None
    bad_vocab = not isinstance(itos, list) or tuple(itos[: len(SPECIALS)]) != SPECIALS
    if missing or bad_vocab or not isinstance(info["vocab"].get("max_len"), int):
        what = ", ".join(missing) or "vocab"
        raise CheckpointError(f"{path}: the 'captioning' block is incomplete (bad or no {what})")
    if not all(isinstance(v, torch.Tensor) for v in ckpt["state_dict"].values()):
        raise CheckpointError(f"{path}: 'state_dict' holds values that are not tensors")
    return ckpt


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
        self,
        images: Tensor,
        beam_size: int = 3,
        max_len: int | None = None,
        length_penalty: float = 1.0,
        allow_unk: bool = False,
        precision: str = "auto",
    ) -> list[list[Hypothesis]]:
        """Beams for a batch of images; `precision` of beam search's matmuls: auto (bf16 on
        CPUs with AMX, else fp32), fp32 or bf16 (see `captioning.precision`)."""
        feats = self.model.encode(images)  # (B, N, D)
        return generate(
            self.model.decoder,
            feats,
            beam_size=beam_size,
            start_id=self.vocab.start_id,
            end_id=self.vocab.end_id,
            pad_id=self.vocab.pad_id,
            max_len=max_len or self.vocab.max_len,
            length_penalty=length_penalty,
            banned=self.vocab.banned(allow_unk),
            precision=precision,
        )

    def caption(self, images: list[Image.Image], **decode: Any) -> list[list[Hypothesis]]:
        """Beams (best first) for each PIL image."""
        return self.caption_tensor(self.images_to_tensor(images), **decode)

    def text(self, hyp: Hypothesis) -> str:
        return self.vocab.decode(hyp.tokens)

    @property
    def grid(self) -> int | None:
        """Side of the square attention grid, if the encoder's regions form one."""
        n = self.meta.get("num_regions")
        if not n:
            return None
        side = int(round(n**0.5))
        return side if side * side == n else None


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
    state = {
        k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")
    }
    try:
        model.load_state_dict(state)
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
            (i for i, e in enumerate(encoders) if configs[i] == cfg and _same_weights(e, enc)), None
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


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Same class and the same tensors (parameters and buffers)."""
    if type(a) is not type(b):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa
    )
