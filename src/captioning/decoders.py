"""Caption decoders behind one step API, so search is written once (see `decoding.py`).

Every decoder maps region features (B, N, D) and caption tokens to next-word logits:

- ``prepare(feats) -> memory``: step-independent tensors, batch first (beam search reindexes them)
- ``init_state(memory) -> state``: the recurrent state, a tuple of (B, ...) tensors
- ``step(tokens, state, memory) -> (logits (B, V), state, alpha (B, N) or None)``
- ``forward(feats, inputs) -> (logits (B, T, V), alphas (B, T, N) or None)``: teacher forcing

Letters: B batch, T caption steps, N image regions, D feature width, E embedding width,
H hidden width, A attention width, V vocabulary.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError
from .registry import Registry

DECODERS = Registry("decoder")

State = tuple[Tensor, ...]
Memory = tuple[Tensor, ...]


class Decoder(nn.Module):
    """Base class: the straightforward teacher-forced forward is a loop over `step`."""

    def prepare(self, feats: Tensor) -> Memory:
        return (feats,)

    def init_state(self, memory: Memory) -> State:
        raise NotImplementedError

    def step(self, tokens: Tensor, state: State, memory: Memory):
        raise NotImplementedError

    def forward(self, feats: Tensor, inputs: Tensor):
        return self.forward_stepwise(feats, inputs)

    def forward_stepwise(self, feats: Tensor, inputs: Tensor):
        """Teacher forcing one `step` at a time: the reference the fast paths must match."""
        memory = self.prepare(feats)
        state = self.init_state(memory)
        logits, alphas = [], []
        for t in range(inputs.size(1)):
            out, state, alpha = self.step(inputs[:, t], state, memory)
            logits.append(out)
            alphas.append(alpha)
        alphas_t = None if alphas[0] is None else torch.stack(alphas, 1)  # (B, T, N)
        return torch.stack(logits, 1), alphas_t  # (B, T, V)

    def regularizer(self, alphas: Tensor | None, mask: Tensor) -> Tensor:
        """Extra loss term from the attention weights; none by default."""
        return mask.new_zeros((), dtype=torch.float32)


class Attention(nn.Module):
    """Additive (Bahdanau) attention over image regions."""

    def __init__(self, encoder_dim: int, hidden_dim: int, attention_dim: int):
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(hidden_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)

    def forward(self, feats: Tensor, feats_proj: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        # feats (B, N, D), feats_proj = encoder_att(feats) (B, N, A), h (B, H)
        e = self.full_att(torch.tanh(feats_proj + self.decoder_att(h).unsqueeze(1)))  # (B, N, 1)
        alpha = e.squeeze(2).softmax(dim=1)  # (B, N)
        context = torch.bmm(alpha.unsqueeze(1), feats).squeeze(1)  # (B, D)
        return context, alpha


def _check_dropout(p: float) -> float:
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"decoder.dropout must be in [0, 1), got {p}")
    return p


class SoftAttentionDecoder(Decoder):
    """The paper's decoder: LSTM with soft attention, gating scalar beta, doubly stochastic loss."""

    def __init__(
        self,
        vocab_size: int,
        encoder_dim: int,
        embed_dim: int = 256,
        hidden_dim: int = 512,
        attention_dim: int = 256,
        dropout: float = 0.5,
        alpha_c: float = 1.0,
        deep_output: bool = False,
        gate: bool = True,
    ):
        super().__init__()
        self.vocab_size, self.alpha_c, self.deep_output, self.gate = (
            vocab_size,
            alpha_c,
            deep_output,
            gate,
        )
        self.attention = Attention(encoder_dim, hidden_dim, attention_dim)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.init_h = nn.Linear(encoder_dim, hidden_dim)
        self.init_c = nn.Linear(encoder_dim, hidden_dim)
        self.f_beta = nn.Linear(hidden_dim, encoder_dim)  # gating scalar per feature channel
        self.lstm = nn.LSTMCell(embed_dim + encoder_dim, hidden_dim)
        self.dropout = nn.Dropout(_check_dropout(dropout))
        if deep_output:  # p(y_t) ~ exp(L_o(E y_{t-1} + L_h h_t + L_z z_t)), eq. 7 of the paper
            self.out_h = nn.Linear(hidden_dim, embed_dim)
            self.out_z = nn.Linear(encoder_dim, embed_dim, bias=False)
            self.fc = nn.Linear(embed_dim, vocab_size)
        else:
            self.fc = nn.Linear(hidden_dim, vocab_size)
        self.embed_dim = embed_dim

    def prepare(self, feats: Tensor) -> Memory:
        return feats, self.attention.encoder_att(feats)  # (B, N, D), (B, N, A)

    def init_state(self, memory: Memory) -> State:
        mean = memory[0].mean(dim=1)  # (B, D)
        return self.init_h(mean), self.init_c(mean)  # (B, H) each

    def _attend(self, h: Tensor, memory: Memory) -> tuple[Tensor, Tensor]:
        context, alpha = self.attention(memory[0], memory[1], h)  # (B, D), (B, N)
        if self.gate:
            context = torch.sigmoid(self.f_beta(h)) * context
        return context, alpha

    def _logits(self, h: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        if self.deep_output:
            return self.fc(self.dropout(emb + self.out_h(h) + self.out_z(context)))
        return self.fc(self.dropout(h))

    def step(self, tokens: Tensor, state: State, memory: Memory):
        h, c = state
        emb = self.embedding(tokens)  # (B, E)
        context, alpha = self._attend(h, memory)
        h, c = self.lstm(torch.cat([emb, context], dim=1), (h, c))
        return self._logits(h, emb, context), (h, c), alpha

    def forward(self, feats: Tensor, inputs: Tensor):
        """Teacher forcing with everything that does not depend on the step hoisted out of the loop."""
        B, T = inputs.shape
        E = self.embed_dim
        memory = self.prepare(feats)  # encoder-side attention projection, once
        h, c = self.init_state(memory)
        emb = self.embedding(inputs)  # (B, T, E)
        w_ih = self.lstm.weight_ih
        # The embedding half of the LSTM gates for all steps in one matmul: (B, T, 4H).
        emb_gates = F.linear(emb, w_ih[:, :E], self.lstm.bias_ih + self.lstm.bias_hh)
        # Per step, the context and hidden halves share one matmul.
        w_step = torch.cat([w_ih[:, E:], self.lstm.weight_hh], dim=1)  # (4H, D + H)
        hs, contexts, alphas = [], [], []
        for t in range(T):
            context, alpha = self._attend(h, memory)
            gates = emb_gates[:, t] + F.linear(torch.cat([context, h], dim=1), w_step)
            i, f, g, o = gates.chunk(4, dim=1)  # LSTMCell's gate order
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            hs.append(h)
            contexts.append(context)
            alphas.append(alpha)
        h_all = torch.stack(hs, 1)  # (B, T, H)
        # The output layer runs once over all steps rather than T times.
        logits = self._logits(h_all, emb, torch.stack(contexts, 1))  # (B, T, V)
        return logits, torch.stack(alphas, 1)  # (B, T, N)

    def regularizer(self, alphas: Tensor | None, mask: Tensor) -> Tensor:
        """Doubly stochastic attention: every region should get about one unit of attention."""
        # alphas (B, T, N), mask (B, T): padding steps must not count.
        coverage = (alphas * mask.unsqueeze(2)).sum(dim=1)  # (B, N)
        return self.alpha_c * ((1.0 - coverage) ** 2).mean()


class ShowTellDecoder(Decoder):
    """ "Show and Tell" baseline: the mean image feature is the LSTM's first input, no attention."""

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
        self.dropout = nn.Dropout(_check_dropout(dropout))
        self.fc = nn.Linear(hidden_dim, vocab_size)

    def prepare(self, feats: Tensor) -> Memory:
        return (self.image_embed(feats.mean(dim=1)),)  # (B, E)

    def init_state(self, memory: Memory) -> State:
        return self.lstm(memory[0])  # the image is step -1, as in Vinyals et al.

    def step(self, tokens: Tensor, state: State, memory: Memory):
        h, c = self.lstm(self.embedding(tokens), state)
        return self.fc(self.dropout(h)), (h, c), None


class MergeDecoder(Decoder):
    """ "Merge" baseline: the LSTM reads words only; its state is merged with the image by a dense layer."""

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
        self.dropout = nn.Dropout(_check_dropout(dropout))
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


DECODERS.register("soft_attention")(SoftAttentionDecoder)
DECODERS.register("show_tell")(ShowTellDecoder)
DECODERS.register("merge")(MergeDecoder)


def build_decoder(name: str, vocab_size: int, encoder_dim: int, **cfg) -> Decoder:
    """Build a registered decoder; dimensions come from the vocabulary and the encoder."""
    cls = DECODERS.get(name)
    try:
        return cls(vocab_size=vocab_size, encoder_dim=encoder_dim, **cfg)
    except TypeError as e:  # an unknown or misspelt option in decoder=...
        raise ConfigError(f"decoder {name!r}: {e}") from None


def list_decoders() -> list[str]:
    return DECODERS.names()
