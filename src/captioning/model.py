"""Captioner = encoder + decoder, plain PyTorch: no Lightning, no Hydra."""

from typing import Any, Protocol

from torch import Tensor, nn

from .decoders import Decoder, build_decoder
from .decoding import DecodeConfig, Hypothesis, generate
from .encoders import Encoder, build_encoder
from .vocab import Vocab


class HasInputs(Protocol):
    """A batch (`data.dataset.Batch`): cached region features, or else images."""

    feats: Tensor | None
    images: Tensor | None


class Captioner(nn.Module):
    """Images (B, 3, H, W) -> region features (B, N, D) -> next-word logits (B, T, V)."""

    def __init__(self, encoder: Encoder, decoder: Decoder):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def encode(self, images: Tensor) -> Tensor:
        return self.encoder(images)  # (B, N, D)

    def features(self, batch: HasInputs) -> Tensor:
        """Region features (B, N, D): the batch's cached ones, else the encoder's of its images."""
        return batch.feats if batch.feats is not None else self.encode(batch.images)

    def forward(
        self, feats: Tensor, inputs: Tensor, lengths: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Teacher forcing: logits (B, T, V) for each next word of `inputs` (B, T), and the
        attention (B, T, N) or None; `lengths` (B,) lets the decoder skip padding steps."""
        return self.decoder(feats, inputs, lengths=lengths)

    def generate(
        self, feats: Tensor, vocab: Vocab, decode: DecodeConfig = DecodeConfig()
    ) -> list[list[Hypothesis]]:
        """Captions for region features (B, N, D): per image, the beams, best first."""
        return generate(
            self.decoder,
            feats,
            beam_size=decode.beam_size,
            start_id=vocab.start_id,
            end_id=vocab.end_id,
            pad_id=vocab.pad_id,
            max_len=decode.max_len or vocab.max_len,
            length_penalty=decode.length_penalty,
            banned=vocab.banned(decode.allow_unk),
            no_repeat_ngram=decode.no_repeat_ngram,
            precision=decode.precision,
        )


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
