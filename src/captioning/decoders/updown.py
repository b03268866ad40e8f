"""Top-down attention (Anderson et al., "Bottom-Up and Top-Down Attention", 2018, section 3.2).

Two LSTMs per step. The attention LSTM reads the language LSTM's previous h, the mean image
feature and the previous word, and its h queries the regions; the language LSTM reads the
attended feature and the attention LSTM's h, and its h gives the next word:

    h1_t = LSTM_att([h2_{t-1}, v_mean, W_e w_{t-1}], h1_{t-1})
    alpha_t = softmax(w_a^T tanh(W_v v_i + W_h h1_t)),  v_hat_t = sum_i alpha_t,i v_i
    h2_t = LSTM_lang([v_hat_t, h1_t], h2_{t-1}),         p(w_t) = softmax(W_p h2_t + b_p)

As in ruotianluo/self-critical.pytorch's UpDownModel, the regions are first embedded to the
LSTMs' width (linear, ReLU, dropout), v_mean is their mean, and both LSTMs start from zeros.

Letters: B batch, T caption steps, N image regions, D feature width, E embedding width,
H hidden width (both LSTMs and the embedded regions), A attention width, V vocabulary,
R state rows (beams), b rows of a step, P packed (row, step) entries.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._kernels import attended, attention_energies, deferred_linear, fast_tanh, ifog, lstm_ifog
from .base import (
    DECODERS,
    Attention,
    Decoder,
    Group,
    Memory,
    State,
    check_dropout,
    check_group,
    doubly_stochastic,
    memory_rows,
    unpack_steps,
)


@DECODERS.register("updown")
class UpDownDecoder(Decoder):
    """Up-Down's top-down decoder: an attention LSTM, additive attention, a language LSTM.

    Memory: embedded regions v (B, N, H), their attention projection (B, N, A) and their mean
    v_mean (B, H). State: (h1, c1, h2, c2), attention LSTM then language LSTM, (B, H) each.

    `step` runs the declared modules (`nn.LSTMCell`, `Attention`): the reference. `forward`
    (teacher forcing) computes what does not depend on the step once for all steps (the word
    and v_mean halves of the attention LSTM's gates, the output layer) and skips rows past
    their length; tests hold it to `forward_stepwise`.
    """

    def __init__(
        self,
        vocab_size: int,
        encoder_dim: int,
        embed_dim: int = 512,
        hidden_dim: int = 1024,
        attention_dim: int = 512,
        dropout: float = 0.5,
        alpha_c: float = 0.0,
    ):
        super().__init__()
        self.vocab_size, self.embed_dim, self.hidden_dim = vocab_size, embed_dim, hidden_dim
        self.alpha_c = alpha_c
        self.feat_embed = nn.Linear(encoder_dim, hidden_dim)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.att_lstm = nn.LSTMCell(2 * hidden_dim + embed_dim, hidden_dim)  # [h2, v_mean, w]
        self.attention = Attention(hidden_dim, hidden_dim, attention_dim)
        self.lang_lstm = nn.LSTMCell(2 * hidden_dim, hidden_dim)  # [v_hat, h1]
        self.dropout = nn.Dropout(check_dropout(dropout))
        self.fc = nn.Linear(hidden_dim, vocab_size)

    def prepare(self, feats: Tensor) -> Memory:
        v = self.dropout(torch.relu(self.feat_embed(feats)))  # (B, N, H)
        return v, self.attention.encoder_att(v), v.mean(dim=1)  # (B, N, H), (B, N, A), (B, H)

    def init_state(self, memory: Memory) -> State:
        zeros = memory[2].new_zeros(memory[2].size(0), self.hidden_dim)  # (B, H)
        return zeros, zeros, zeros, zeros

    def _advance(
        self,
        tokens: Tensor,
        state: State,
        v_mean: Tensor,
        attend: Callable[[Tensor], tuple[Tensor, Tensor]],
    ):
        """One step given each row's v_mean and how its h1 attends: (logits, state, alpha)."""
        h1, c1, h2, c2 = state  # (R, H) each
        emb = self.dropout(self.embedding(tokens))  # (R, E)
        h1, c1 = self.att_lstm(torch.cat([h2, v_mean, emb], dim=1), (h1, c1))
        context, alpha = attend(h1)  # (R, H), (R, N)
        h2, c2 = self.lang_lstm(torch.cat([context, h1], dim=1), (h2, c2))
        return self.fc(self.dropout(h2)), (h1, c1, h2, c2), alpha

    def step(self, tokens: Tensor, state: State, memory: Memory):
        v, v_proj, v_mean = memory
        return self._advance(tokens, state, v_mean, lambda h1: self.attention(v, v_proj, h1))

    def step_grouped(self, tokens: Tensor, state: State, memory: Memory, group: Group):
        """`step` with the beams of an image attending to its one copy of the regions.

        Decoding (no autograd, eval mode: beam search, self-critical sampling) takes
        `_decode_step`: the same step on regrouped weights, the v_mean part of the gates once
        per image; otherwise the declared modules run.
        """
        v, v_proj, v_mean = memory
        counts = torch.tensor(group, device=tokens.device) if isinstance(group, list) else group
        if not (torch.is_grad_enabled() or self.training):
            return self._decode_step(tokens, state, memory, group, counts)
        v_mean = v_mean.repeat_interleave(counts, dim=0)  # (R, H): small, so copied

        def attend(h1: Tensor) -> tuple[Tensor, Tensor]:
            alpha, context = self.attention.grouped(
                v, v_proj, self.attention.decoder_att(h1), group
            )
            return context, alpha

        return self._advance(tokens, state, v_mean, attend)

    _decode_cache: tuple | None = None  # (key, tensors): derived weights, not in state dict

    def _decode_weights(self) -> tuple[Tensor, ...]:
        """`_weights` and the output layer padded with zero rows to a multiple of 16 words (MKL's
        matmul runs faster with 2544 output columns than with 2543), recomputed only when a
        parameter changes (self-critical training changes them every batch, while a batch's
        sampling takes one step per word)."""
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self.parameters())
        if self._decode_cache is None or self._decode_cache[0] != key:
            with torch.no_grad():
                fc = self.fc
                pad = -fc.out_features % 16
                fc_w = torch.cat([fc.weight, fc.weight.new_zeros(pad, fc.in_features)])
                fc_b = torch.cat([fc.bias, fc.bias.new_zeros(pad)])
                self._decode_cache = (key, (*self._weights(), fc_w, fc_b))
        return self._decode_cache[1]

    def _decode_step(
        self, tokens: Tensor, state: State, memory: Memory, group: Group, counts: Tensor | int
    ):
        """`step_grouped` without autograd: five matmuls on the R state rows, gates in (i, f,
        o, g) order, the v_mean part of the attention LSTM's gates once per image."""
        v, v_proj, v_mean = memory
        w_mean, w_emb, b_att, w_h2, w_hh1, w_h1, b_h1, w_ctx, fc_w, fc_b = self._decode_weights()
        H = self.hidden_dim
        h1, c1, h2, c2 = state  # (R, H) each
        a2, l2 = F.linear(h2, w_h2).split([4 * H, 4 * H], dim=1)  # (R, 4H) each
        mean_gates = F.linear(v_mean, w_mean, b_att).repeat_interleave(counts, dim=0)  # (R, 4H)
        gates = torch.addmm(mean_gates + a2, self.embedding(tokens), w_emb.t())
        h1, c1 = lstm_ifog(gates.addmm_(h1, w_hh1.t()), c1)
        d, l1 = F.linear(h1, w_h1, b_h1).split([w_h1.size(0) - 4 * H, 4 * H], dim=1)
        alpha, context = self.attention.grouped(v, v_proj, d, group)  # (R, N), (R, H)
        h2, c2 = lstm_ifog(torch.addmm(l1 + l2, context, w_ctx.t()), c2)
        logits = F.linear(h2, fc_w, fc_b)[:, : self.vocab_size]
        return logits, (h1, c1, h2, c2), alpha

    # -- teacher forcing, fast ---------------------------------------------------------------
    def _weights(self) -> tuple[Tensor, ...]:
        """The step's linears grouped by what they read, each group one matmul, and both LSTMs'
        gates reordered (i, f, o, g) so that one sigmoid call covers three of them.

        w_mean, w_emb, b_att: the v_mean and word parts of the attention LSTM's input weight,
        with both its biases (computed for all steps at once); w_h2 (8H, H): the attention
        LSTM's h2 input and the language LSTM's weight_hh, which both read h2_{t-1}; w_hh1
        (4H, H): the attention LSTM's weight_hh; w_h1 (A + 4H, H) and b_h1: decoder_att and the
        language LSTM's h1 input, which both read h1_t, with the language LSTM's biases; w_ctx
        (4H, H): its v_hat input.
        """
        H, E = self.hidden_dim, self.embed_dim
        att, lang = self.att_lstm, self.lang_lstm
        # split rather than slicing: in backward, each slice of a weight would zero-fill a
        # gradient the size of the whole weight.
        w_att_h2, w_mean, w_emb = ifog(att.weight_ih).split([H, H, E], dim=1)
        w_ctx, w_lang_h1 = ifog(lang.weight_ih).split([H, H], dim=1)
        dec = self.attention.decoder_att
        w_h2 = torch.cat([w_att_h2, ifog(lang.weight_hh)])  # (8H, H)
        w_h1 = torch.cat([dec.weight, w_lang_h1])  # (A + 4H, H)
        b_h1 = torch.cat([dec.bias, ifog(lang.bias_ih + lang.bias_hh)])  # (A + 4H,)
        b_att = ifog(att.bias_ih + att.bias_hh)
        return w_mean, w_emb, b_att, w_h2, ifog(att.weight_hh), w_h1, b_h1, w_ctx

    def _cell(
        self,
        h1: Tensor,
        c1: Tensor,
        h2: Tensor,
        c2: Tensor,
        x_gates: Tensor,
        v: Tensor,
        v_proj: Tensor,
        w_h2: Tensor,
        w_hh1: Tensor,
        w_h1: Tensor,
        b_h1: Tensor,
        w_ctx: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """One teacher-forced step for b rows in plain ops (what `compile_step` compiles);
        x_gates (b, 4H) is its step-independent part."""
        H = self.hidden_dim
        a2, l2 = F.linear(h2, w_h2).split([4 * H, 4 * H], dim=1)  # (b, 4H) each
        h1, c1 = lstm_ifog(x_gates + a2 + F.linear(h1, w_hh1), c1)
        d, l1 = F.linear(h1, w_h1, b_h1).split([w_h1.size(0) - 4 * H, 4 * H], dim=1)
        e = self.attention.full_att(fast_tanh(v_proj + d.unsqueeze(1))).squeeze(2)  # (b, N)
        alpha = e.softmax(dim=1)
        context = torch.bmm(alpha.unsqueeze(1), v).squeeze(1)  # (b, H)
        h2, c2 = lstm_ifog(l1 + l2 + F.linear(context, w_ctx), c2)
        return h1, c1, h2, c2, alpha

    @staticmethod
    def _cell_eager(
        h1: Tensor,
        c1: Tensor,
        h2: Tensor,
        c2: Tensor,
        x_gates: Tensor,
        energies: Callable[[Tensor], Tensor],
        attend: Callable[[Tensor], Tensor],
        lin_h2: Callable[[Tensor], Tensor],
        lin_hh1: Callable[[Tensor], Tensor],
        lin_h1: Callable[[Tensor], Tensor],
        lin_ctx: Callable[[Tensor], Tensor],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """`_cell` with the hand-written backward pieces of `_kernels`: weight gradients once
        per batch (`deferred_linear`), the energies as one node (`attention_energies`), the
        regions' gradient summed in place (`attended`)."""
        H = c1.size(1)
        a2, l2 = lin_h2(h2).split([4 * H, 4 * H], dim=1)  # (b, 4H) each
        h1, c1 = lstm_ifog(x_gates + a2 + lin_hh1(h1), c1)
        dl = lin_h1(h1)  # (b, A + 4H)
        d, l1 = dl.split([dl.size(1) - 4 * H, 4 * H], dim=1)
        alpha = energies(d).softmax(dim=1)  # (b, N)
        h2, c2 = lstm_ifog(l1 + l2 + lin_ctx(attend(alpha)), c2)
        return h1, c1, h2, c2, alpha

    _cell_fn: Callable | None = None  # set by compile_step; a function, so not in the state dict

    def compile_step(self, **options) -> None:
        """Compile the loop body of `forward` (dynamic in the batch, which shrinks as captions end)."""
        self._cell_fn = torch.compile(self._cell, dynamic=True, **options)

    def forward(self, feats: Tensor, inputs: Tensor, lengths: Tensor | None = None, group: int = 1):
        """Teacher forcing, equal to `forward_stepwise` on every step it computes.

        With `lengths` (steps to compute per row), rows are sorted longest first so that step
        t runs on the first b_t rows only; logits and alphas past a row's length are zeros, and
        rows come back in their input order. With `group`, each image's regions are embedded
        once for its `group` caption rows.
        """
        check_group(feats, inputs, group)
        B, T = inputs.shape
        steps = torch.arange(T, device=inputs.device)
        order = None
        if lengths is None:
            alive = torch.ones(T, B, dtype=torch.bool, device=inputs.device)
        else:
            order = lengths.argsort(descending=True, stable=True)  # (B,) longest first
            inputs = inputs.index_select(0, order)
            alive = lengths.index_select(0, order).unsqueeze(0) > steps.unsqueeze(1)  # (T, B)
        sizes = [n for n in alive.sum(1).tolist() if n > 0]  # b_t: rows [b_t:] have ended
        w_mean, w_emb, b_att, w_h2, w_hh1, w_h1, b_h1, w_ctx = self._weights()
        memory = self.prepare(feats)  # once per image: (B / G, N, H), (B / G, N, A), (B / G, H)
        rows = memory_rows(feats.size(0), group, order, inputs.device)
        if rows is not None:
            memory = tuple(m.index_select(0, rows) for m in memory)
        v, v_proj, v_mean = memory  # (B, N, H), (B, N, A), (B, H)
        h1, c1, h2, c2 = self.init_state((v, v_proj, v_mean))
        # Packed like a PackedSequence: step 0's b_0 rows, then step 1's b_1, ...; P entries.
        rows = torch.arange(B, device=inputs.device).expand(T, B)[alive]  # (P,) row of each
        emb = self.dropout(self.embedding(inputs.t()[alive]))  # (P, E)
        mean_gates = F.linear(v_mean, w_mean, b_att)  # (B, 4H), once per row
        x_gates = torch.addmm(mean_gates.index_select(0, rows), emb, w_emb.t()).split(sizes)
        # Training runs the hand-written backward pieces; without autograd (validation loss)
        # or compiled, the plain step.
        eager = self._cell_fn is None and torch.is_grad_enabled()
        if eager:
            full_att = self.attention.full_att
            kernels = (
                attention_energies(v_proj, full_att.weight, full_att.bias),
                attended(v),
                deferred_linear(w_h2),
                deferred_linear(w_hh1),
                deferred_linear(w_h1, b_h1),
                deferred_linear(w_ctx),
            )
        cell = self._cell if self._cell_fn is None else self._cell_fn
        weights = w_h2, w_hh1, w_h1, b_h1, w_ctx
        hs, alphas = [], []
        for t, b in enumerate(sizes):
            state = h1[:b], c1[:b], h2[:b], c2[:b]
            if eager:
                h1, c1, h2, c2, alpha = self._cell_eager(*state, x_gates[t], *kernels)
            else:
                h1, c1, h2, c2, alpha = cell(*state, x_gates[t], v[:b], v_proj[:b], *weights)
            hs.append(h2)
            alphas.append(alpha)
        logits = self.fc(self.dropout(torch.cat(hs)))  # (P, V): the output layer once
        return unpack_steps(logits, torch.cat(alphas), None if lengths is None else order, alive)

    def regularizer(self, alphas: Tensor | None, mask: Tensor) -> Tensor:
        """Doubly stochastic attention (off by default: Up-Down does not use it)."""
        if alphas is None or self.alpha_c == 0:
            return mask.new_zeros((), dtype=torch.float32)
        return doubly_stochastic(alphas, mask, self.alpha_c)
