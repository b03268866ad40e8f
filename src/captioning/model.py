"""Captioner = encoder + decoder, plain PyTorch: no Lightning, no Hydra."""

from typing import Any

from torch import Tensor, nn

from .decoders import Decoder, build_decoder
from .encoders import Encoder, build_encoder


class Captioner(nn.Module):
    """Images (B, 3, H, W) -> region features (B, N, D) -> next-word logits (B, T, V)."""

    def __init__(self, encoder: Encoder, decoder: Decoder):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def encode(self, images: Tensor) -> Tensor:
        return self.encoder(images)  # (B, N, D)

    def forward(self, images: Tensor, inputs: Tensor):
        return self.decoder(self.encode(images), inputs)


def build_captioner(
    encoder_cfg: dict[str, Any], decoder_cfg: dict[str, Any], vocab_size: int
) -> Captioner:
    """Build from plain config dicts (each with a `name`), wiring dimensions in code."""
    enc = dict(encoder_cfg)
    dec = dict(decoder_cfg)
    encoder = build_encoder(enc.pop("name"), **enc)
    decoder = build_decoder(
        dec.pop("name"), vocab_size=vocab_size, encoder_dim=encoder.out_dim, **dec
    )
    return Captioner(encoder, decoder)
