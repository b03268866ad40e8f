"""Baselines without attention: Show and Tell, and Merge. Both see the mean image feature.

Letters: B batch, D feature width, E embedding width, H hidden width.
"""

import torch
from torch import Tensor, nn

from .base import DECODERS, Decoder, Memory, State, check_dropout


@DECODERS.register("show_tell")
class ShowTellDecoder(Decoder):
    """Show and Tell (Vinyals et al.): the mean image feature is the first LSTM input."""

    def __init__(
        self,
        vocab_size: int,
        encoder_dim: int,
        embed_dim: int = 256,
        hidden_dim: int = 512,
        dropout: float = 0.5,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.image_embed = nn.Linear(encoder_dim, embed_dim)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTMCell(embed_dim, hidden_dim)
        self.dropout = nn.Dropout(check_dropout(dropout))
        self.fc = nn.Linear(hidden_dim, vocab_size)

    def prepare(self, feats: Tensor) -> Memory:
        return (self.image_embed(feats.mean(dim=1)),)  # (B, E)

    def init_state(self, memory: Memory) -> State:
        return self.lstm(memory[0])  # the image is step -1, as in Vinyals et al.

    def step(self, tokens: Tensor, state: State, memory: Memory):
        h, c = self.lstm(self.embedding(tokens), state)
        return self.fc(self.dropout(h)), (h, c), None


@DECODERS.register("merge")
class MergeDecoder(Decoder):
    """Merge (Tanti et al.): an LSTM reads the words; a dense layer merges it with the image."""

    def __init__(
        self,
        vocab_size: int,
        encoder_dim: int,
        embed_dim: int = 256,
        hidden_dim: int = 512,
        merge_dim: int = 512,
        dropout: float = 0.5,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.image_proj = nn.Linear(encoder_dim, hidden_dim)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTMCell(embed_dim, hidden_dim)
        self.merge = nn.Linear(2 * hidden_dim, merge_dim)
        self.dropout = nn.Dropout(check_dropout(dropout))
        self.fc = nn.Linear(merge_dim, vocab_size)

    def prepare(self, feats: Tensor) -> Memory:
        return (torch.relu(self.image_proj(feats.mean(dim=1))),)  # (B, H)

    def init_state(self, memory: Memory) -> State:
        v = memory[0]
        return v.new_zeros(v.shape), v.new_zeros(v.shape)

    def step(self, tokens: Tensor, state: State, memory: Memory):
        h, c = self.lstm(self.embedding(tokens), state)
        merged = torch.relu(self.merge(self.dropout(torch.cat([h, memory[0]], dim=1))))
        return self.fc(self.dropout(merged)), (h, c), None
