"""Load a checkpoint and caption images; used by evaluate.py, the CLI and the web app.

Imports neither Lightning nor Hydra: one `.ckpt` file is the whole model.
"""

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from .decoding import Hypothesis, generate
from .encoders import Preprocess
from .errors import CheckpointError
from .model import Captioner, build_captioner
from .transforms import make_transform
from .vocab import Vocab

SUPPORTED_FORMAT = 1


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True` (no arbitrary pickles); clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError,
            OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated, corrupt, or it holds objects that "
            f"are not plain tensors and values): {first}"
        ) from None
    if not isinstance(ckpt, dict) or "captioning" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no 'captioning' block)")
    fmt = ckpt["captioning"].get("format")
    if not isinstance(fmt, int) or fmt > SUPPORTED_FORMAT:
        raise CheckpointError(
            f"{path} has checkpoint format {fmt!r}, newer than this version supports "
            f"({SUPPORTED_FORMAT}); upgrade the captioning package"
        )
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
    def caption_tensor(self, images: Tensor, beam_size: int = 3, max_len: int | None = None,
                       length_penalty: float = 1.0, allow_unk: bool = False
                       ) -> list[list[Hypothesis]]:
        feats = self.model.encode(images)  # (B, N, D)
        return generate(
            self.model.decoder, feats, beam_size=beam_size, start_id=self.vocab.start_id,
            end_id=self.vocab.end_id, pad_id=self.vocab.pad_id,
            max_len=max_len or self.vocab.max_len, length_penalty=length_penalty,
            banned=self.vocab.banned(allow_unk),
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


def load_model(path: str | Path, device: str | torch.device = "cpu") -> CaptionModel:
    """Rebuild the Captioner from a checkpoint alone (no pretrained download, no Hydra)."""
    ckpt = read_checkpoint(path)
    info = ckpt["captioning"]
    vocab = Vocab.from_dict(info["vocab"])
    # The trained weights come from the checkpoint, so never fetch the pretrained ones again.
    encoder_cfg = {**info["encoder"], "pretrained": False}
    model = build_captioner(encoder_cfg, info["decoder"], len(vocab))
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()
             if k.startswith("model.")}
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
