"""FLOPs of the soft attention decoder, counted from its sizes: what a roofline divides by.

FLOPs here are 2 x the multiply-adds of every matrix product of the model (matmuls,
matrix-vector products, bmm), the operations a matmul peak is measured on. Elementwise work
(sigmoid, tanh, softmax, sums) is not counted: at the flickr8k sizes it is under 1% of the
multiply-adds, and it is bound by memory, not by the matmul units.

Letters: V vocabulary, E embedding, H hidden, A attention, D feature width, N regions.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class DecoderSizes:
    vocab: int  # V
    embed: int  # E
    hidden: int  # H
    attention: int  # A
    encoder_dim: int  # D
    regions: int  # N
    gate: bool = True
    deep_output: bool = False

    @classmethod
    def of(cls, decoder: nn.Module, regions: int) -> DecoderSizes:
        """The sizes of a `SoftAttentionDecoder` (or a subclass) seeing `regions` regions."""
        att = decoder.attention
        return cls(
            vocab=decoder.vocab_size,
            embed=decoder.embed_dim,
            hidden=decoder.lstm.hidden_size,
            attention=att.decoder_att.out_features,
            encoder_dim=att.encoder_att.in_features,
            regions=regions,
            gate=bool(decoder.gate),
            deep_output=bool(decoder.deep_output),
        )


def step_flops(s: DecoderSizes, embedding: bool = True) -> dict[str, int]:
    """FLOPs of one decoder step for one row (one beam, one word), by part.

    attention: decoder_att(h) (H x A), the energies full_att over N regions (N x A) and the
    context alpha @ feats (N x D); gate: f_beta(h) (H x D); lstm: the gates, 4H x (E + D + H);
    output: the output layer (H x V, or the deep output's three layers). `embedding=False`
    leaves out the embedding half of the gates (4H x E): beam search looks it up from a table
    computed once per vocabulary.
    """
    E, H, A, D, N, V = s.embed, s.hidden, s.attention, s.encoder_dim, s.regions, s.vocab
    output = 2 * (H * E + D * E + E * V) if s.deep_output else 2 * H * V
    return {
        "attention": 2 * (H * A + N * A + N * D),
        "gate": 2 * H * D if s.gate else 0,
        "lstm": 2 * 4 * H * ((E if embedding else 0) + D + H),
        "output": output,
    }


def prepare_flops(s: DecoderSizes) -> int:
    """FLOPs per image before the first word: encoder_att over the regions, init_h and init_c."""
    N, D, A, H = s.regions, s.encoder_dim, s.attention, s.hidden
    return 2 * N * D * A + 2 * 2 * D * H


def decode_flops(s: DecoderSizes, images: int, row_steps: int) -> int:
    """FLOPs of decoding `images` images whose search ran `row_steps` decoder rows in all
    (a beam that is still running costs one row per word; the first word, one per image)."""
    return images * prepare_flops(s) + row_steps * sum(step_flops(s, embedding=False).values())


def train_flops(s: DecoderSizes, captions: int, words: int) -> int:
    """FLOPs of a training step (forward + backward) on `captions` captions with `words` real
    target words in all: 3 x the forward, the usual count (backward does two matmuls, one for
    the input's gradient and one for the weight's, per forward one)."""
    return 3 * (captions * prepare_flops(s) + words * sum(step_flops(s).values()))
