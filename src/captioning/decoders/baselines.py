"""Baselines without attention: Show and Tell, and Merge. Both see the mean image feature.

Letters: B batch, D feature width, E embedding width, H hidden width.
"""

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .base import DECODERS, Decoder, Memory, State, check_dropout, expand_images


def lstm_over_words(
    cell: nn.LSTMCell, x: Tensor, state: State, lengths: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """The cell run over every step of x (B, T, E) from `state` in one call: outputs (B, T, H)
    and, with `lengths` (steps per row), the mask (B, T) of the steps computed; the rest are 0.

    Teacher forcing needs no step's output to choose the next input, so torch's fused LSTM
    (the recurrence in C++, rows that have ended dropped) replaces a Python loop of cells, and
    the layers after it run once over all steps instead of once per step.
    """
    B, T, _ = x.shape
    params = [cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh]
    h0, c0 = state
    if lengths is None:
        out, _, _ = torch.lstm(
            x, (h0.unsqueeze(0), c0.unsqueeze(0)), params, True, 1, 0.0, False, False, True
        )
        return out, None
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    order = packed.sorted_indices
    hx = (h0.index_select(0, order).unsqueeze(0), c0.index_select(0, order).unsqueeze(0))
    data, _, _ = torch.lstm(packed.data, packed.batch_sizes, hx, params, True, 1, 0.0, False, False)
    out, _ = pad_packed_sequence(
        PackedSequence(data, packed.batch_sizes, order, packed.unsorted_indices),
        batch_first=True,
        total_length=T,
    )
    mask = torch.arange(T, device=x.device) < lengths.to(x.device).unsqueeze(1)  # (B, T)
    return out, mask


def scatter_steps(values: Tensor, mask: Tensor | None, shape: tuple[int, int]) -> Tensor:
    """values (P, V) of the computed steps into (B, T, V), zeros elsewhere (mask None: all)."""
    if mask is None:
        return values.view(*shape, -1)
    out = values.new_zeros(*shape, values.size(-1))
    out[mask] = values
    return out


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

    def forward(self, feats: Tensor, inputs: Tensor, lengths: Tensor | None = None, group: int = 1):
        """Teacher forcing, equal to `forward_stepwise` on every step it computes (those within
        `lengths`; the logits of the others are zeros)."""
        feats = expand_images(feats, inputs, group)
        out, mask = lstm_over_words(
            self.lstm, self.embedding(inputs), self.init_state(self.prepare(feats)), lengths
        )
        h = out[mask] if mask is not None else out.reshape(-1, out.size(-1))  # (P, H)
        return scatter_steps(self.fc(self.dropout(h)), mask, inputs.shape), None


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

    def forward(self, feats: Tensor, inputs: Tensor, lengths: Tensor | None = None, group: int = 1):
        """Teacher forcing, equal to `forward_stepwise` on every step it computes (those within
        `lengths`; the logits of the others are zeros)."""
        feats = expand_images(feats, inputs, group)
        memory = self.prepare(feats)
        out, mask = lstm_over_words(
            self.lstm, self.embedding(inputs), self.init_state(memory), lengths
        )
        image = memory[0].unsqueeze(1).expand(-1, inputs.size(1), -1)  # (B, T, H)
        if mask is None:
            h, v = out.reshape(-1, out.size(-1)), image.reshape(-1, image.size(-1))
        else:
            h, v = out[mask], image[mask]  # (P, H) each
        merged = torch.relu(self.merge(self.dropout(torch.cat([h, v], dim=1))))
        return scatter_steps(self.fc(self.dropout(merged)), mask, inputs.shape), None
