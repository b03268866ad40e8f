"""Soft attention (Xu et al., "Show, Attend and Tell", section 4.2): the paper's decoder.

Letters: B batch, T caption steps, N image regions, D feature width, E embedding width,
H hidden width, A attention width, V vocabulary, R state rows (beams), b rows of a step,
P packed (row, step) entries.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import precision
from ._kernels import attention_energies, deferred_linear, fast_tanh, lstm_ifog
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


@DECODERS.register("soft_attention")
class SoftAttentionDecoder(Decoder):
    """The paper's decoder: LSTM with soft attention, gating scalar beta, doubly stochastic loss.

    One step is written three times: plainly, as the reference, and twice for speed, where beam
    search and teacher forcing each allow what the other does not. They share the gate
    (`_gated`), the output layer (`_logits`) and the stacked h weights (`_h_weights`), and
    tests/test_speed_contract.py holds them to the same results:

    - `step` (and `step_grouped` under autograd): the declared modules, `Attention` and
      `nn.LSTMCell`, one step at a time: the reference the other two are tested against
      (`forward_stepwise`), differentiable step by step, and what hard attention builds on (it
      replaces `_attend`).
    - `step_grouped` without autograd (beam search): weights regrouped once and cached
      (`_inference_weights`): a (V, 4H) table of the embedding half of the gates, looked up per
      word; the beams of an image attend to its one copy of the memory. It keeps LSTMCell's
      (i, f, g, o) rows, so the context half of weight_ih is a view, not a (4H, D) copy held
      beside the model.
    - `forward` (teacher forcing): every step's input is known up front, so the embedding half
      of the gates and the output layer run once for all steps, over the rows still running.
      Its loop body is `_cell_eager` (hand-written backward from `_kernels`: autograd's costs
      several passes more) or, after `compile_step`, `_cell` (the same step in plain ops,
      which the compiler can see through, unlike custom autograd Functions with a stash).
    """

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
        self.dropout = nn.Dropout(check_dropout(dropout))
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

    def _gated(self, h: Tensor, context: Tensor) -> Tensor:
        """The context scaled by the gating scalar beta = sigmoid(f_beta(h)), with the gate on."""
        return torch.sigmoid(self.f_beta(h)) * context if self.gate else context

    def _attend(self, h: Tensor, memory: Memory) -> tuple[Tensor, Tensor]:
        context, alpha = self.attention(memory[0], memory[1], h)  # (B, D), (B, N)
        return self._gated(h, context), alpha

    def _logits(
        self,
        h: Tensor,
        emb: Tensor | None,
        context: Tensor,
        fc: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Output layer; `fc` replaces its (weight, bias), e.g. by a padded copy."""
        if self.deep_output:
            x = self.dropout(emb + self.out_h(h) + self.out_z(context))
        else:
            x = self.dropout(h)
        return self.fc(x) if fc is None else precision.linear(x, *fc)[..., : self.vocab_size]

    def _advance(self, tokens: Tensor, state: State, context: Tensor, alpha: Tensor):
        """The LSTM and output layer of `step`, given the step's (gated) context."""
        emb = self.embedding(tokens)  # (B, E)
        h, c = self.lstm(torch.cat([emb, context], dim=1), state)
        return self._logits(h, emb, context), (h, c), alpha

    def step(self, tokens: Tensor, state: State, memory: Memory):
        context, alpha = self._attend(state[0], memory)
        return self._advance(tokens, state, context, alpha)

    def step_grouped(self, tokens: Tensor, state: State, memory: Memory, group: Group):
        """`step` with the rows of an image (its beams) attending to its one copy of the memory.

        Without autograd (beam search), the weights are regrouped as in training (see
        `_inference_weights`), in the matmul dtype of `precision.use` (fp32 unless bf16 is
        asked for); with autograd, the step stays the plain, differentiable one.
        """
        h, c = state  # (R, H) each
        feats, feats_proj = memory  # (B, N, D), (B, N, A)
        if torch.is_grad_enabled():
            d = self.attention.decoder_att(h)  # (R, A)
            alpha, context = self.attention.grouped(feats, feats_proj, d, group)
            return self._advance(tokens, state, self._gated(h, context), alpha)
        emb_gates, w_h, b_h, w_ctx, fc = self._inference_weights(precision.matmul_dtype())
        d, *beta, hh = precision.linear(h, w_h, b_h).split(self._h_split, dim=1)  # (R, A),..
        alpha, context = self.attention.grouped(feats, feats_proj, d, group)  # (R, N), (R, D)
        if beta:
            context = torch.sigmoid(beta[0]) * context
        if w_ctx.dtype == torch.float32:
            gates = torch.addmm(emb_gates[tokens] + hh, context, w_ctx.t())  # (R, 4H): i, f, g, o
        else:  # the sum in fp32: only the matmul rounds
            gates = emb_gates[tokens] + hh + precision.linear(context, w_ctx)
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        emb = self.embedding(tokens) if self.deep_output else None
        return self._logits(h, emb, context, fc), (h, c), alpha

    _inference_cache: tuple | None = None  # (key, tensors): derived weights, not in state dict

    def _inference_weights(
        self, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[Tensor, Tensor]]:
        """Weights regrouped for decoding, recomputed only when a parameter or `dtype` changes.

        emb_gates (V, 4H): the embedding half of the LSTM gates for every word, with both
        biases, so a step looks its rows up instead of multiplying by that half of weight_ih;
        w_h (A [+ D] + 4H, H) and b_h: decoder_att, f_beta and weight_hh as one matmul on h;
        w_ctx (4H, D): the context half of weight_ih; the output layer with zero rows up to a
        multiple of 16 words: MKL's matmul runs 1.6x faster with 2544 output columns than
        with 2543. With `dtype` bf16, w_h, b_h and w_ctx are cast once, here; the output layer
        stays fp32 (see `captioning.precision`).
        """
        att, lstm, fc = self.attention.decoder_att, self.lstm, self.fc
        parts = [
            att.weight,
            att.bias,
            self.embedding.weight,
            lstm.weight_ih,
            lstm.weight_hh,
            lstm.bias_ih,
            lstm.bias_hh,
            self.f_beta.weight,
            self.f_beta.bias,
            fc.weight,
            fc.bias,
        ]
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in parts)
        key += (self.gate, dtype)
        if self._inference_cache is None or self._inference_cache[0] != key:
            with torch.no_grad():
                E = self.embed_dim
                emb_gates = F.linear(
                    self.embedding.weight, lstm.weight_ih[:, :E], lstm.bias_ih + lstm.bias_hh
                )  # (V, 4H)
                w_h, b_h = self._h_weights(lstm.weight_hh)
                pad = -fc.out_features % 16
                fc_w = torch.cat([fc.weight, fc.weight.new_zeros(pad, fc.in_features)])
                fc_b = torch.cat([fc.bias, fc.bias.new_zeros(pad)])
                w_ctx = lstm.weight_ih[:, E:]  # (4H, D), a view: no copy in fp32
                if dtype != torch.float32:
                    w_h, b_h, w_ctx = (x.to(dtype).contiguous() for x in (w_h, b_h, w_ctx))
            self._inference_cache = (key, (emb_gates, w_h, b_h, w_ctx, (fc_w, fc_b)))
        return self._inference_cache[1]

    # -- teacher forcing, fast ---------------------------------------------------------------
    def _fused_weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The step's linears regrouped by what they read, and the LSTM gates as (i, f, o, g).

        Returns w_h (A [+ D] + 4H, H) and its bias: every linear of h (decoder_att, f_beta,
        weight_hh) in one matmul; w_ctx (4H, D) for the context; w_emb (4H, E) and b_emb (4H,)
        for the embedding half of the gates, which is computed for all steps at once.
        Sigmoid gates next to each other take one sigmoid call instead of three.
        """
        E = self.embed_dim

        # chunk/split rather than slicing: in backward, each slice of a weight would zero-fill
        # a gradient the size of the whole weight.
        def ifog(w: Tensor) -> Tensor:  # LSTMCell's rows are (i, f, g, o)
            i, f, g, o = w.chunk(4)
            return torch.cat([i, f, o, g])

        w_emb, w_ctx = ifog(self.lstm.weight_ih).split([E, self.lstm.input_size - E], dim=1)
        w_hh = ifog(self.lstm.weight_hh)
        b_emb = ifog(self.lstm.bias_ih + self.lstm.bias_hh)
        w_h, b_h = self._h_weights(w_hh)
        return w_h, b_h, w_ctx, w_emb, b_emb

    def _h_weights(self, w_hh: Tensor) -> tuple[Tensor, Tensor]:
        """Every linear of h as one: decoder_att, f_beta (with the gate) and `w_hh` (weight_hh,
        its rows in the caller's gate order) stacked, (A [+ D] + 4H, H), and their bias."""
        att = self.attention.decoder_att
        ws, bs = [att.weight], [att.bias]
        if self.gate:
            ws.append(self.f_beta.weight)
            bs.append(self.f_beta.bias)
        return torch.cat([*ws, w_hh]), torch.cat([*bs, w_hh.new_zeros(w_hh.size(0))])

    def _cell(
        self,
        h: Tensor,
        c: Tensor,
        emb_gates: Tensor,
        feats: Tensor,
        feats_proj: Tensor,
        w_h: Tensor,
        b_h: Tensor,
        w_ctx: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One teacher-forced step in plain ops (what `compile_step` compiles): `_cell_eager`."""
        # h, c (b, H); emb_gates (b, 4H); feats (b, N, D); feats_proj (b, N, A)
        # d (b, A), beta [(b, D)] with the gate, hh (b, 4H)
        d, *beta, hh = F.linear(h, w_h, b_h).split(self._h_split, dim=1)
        e = self.attention.full_att(fast_tanh(feats_proj + d.unsqueeze(1))).squeeze(2)  # (b, N)
        alpha = e.softmax(dim=1)  # (b, N)
        context = torch.bmm(alpha.unsqueeze(1), feats).squeeze(1)  # (b, D)
        if beta:
            context = torch.sigmoid(beta[0]) * context
        h, c = lstm_ifog(torch.addmm(emb_gates + hh, context, w_ctx.t()), c)
        return h, c, context, alpha

    def _cell_eager(
        self,
        h: Tensor,
        c: Tensor,
        emb_gates: Tensor,
        feats: Tensor,
        energies: Callable[[Tensor], Tensor],
        lin_h: Callable[[Tensor], Tensor],
        lin_ctx: Callable[[Tensor], Tensor],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """`_cell` with the hand-written backward pieces (`deferred_linear`, `attention_energies`)."""
        d, *beta, hh = lin_h(h).split(self._h_split, dim=1)  # (b, A), [(b, D)], (b, 4H)
        alpha = energies(d).softmax(dim=1)  # (b, N)
        context = torch.bmm(alpha.unsqueeze(1), feats).squeeze(1)  # (b, D)
        if beta:
            context = torch.sigmoid(beta[0]) * context
        h, c = lstm_ifog(emb_gates + hh + lin_ctx(context), c)
        return h, c, context, alpha

    @property
    def _h_split(self) -> list[int]:
        """Widths of the parts of `h @ w_h.T`: decoder_att, f_beta (with the gate), weight_hh."""
        att, H = self.attention.decoder_att.out_features, self.lstm.hidden_size
        return [att, self.f_beta.out_features, 4 * H] if self.gate else [att, 4 * H]

    def compile_step(self, **options) -> None:
        """Compile the loop body of `forward` (dynamic in the batch, which shrinks as captions end).

        The time loop stays in Python: compiling it would unroll it once per caption length.
        """
        self._cell_fn = torch.compile(self._cell, dynamic=True, **options)

    _cell_fn: Callable | None = None  # set by compile_step; a function, so not in the state dict

    def forward(self, feats: Tensor, inputs: Tensor, lengths: Tensor | None = None, group: int = 1):
        """Teacher forcing, equal to `forward_stepwise` on every step it computes.

        Step-independent work runs once: the encoder-side attention projection (once per image
        of `group` caption rows), the embedding
        half of the gates, the output layer. With `lengths` (steps to compute per row, e.g. the
        number of non-padding targets), rows are sorted longest first so that step t runs on
        the first b_t rows only and padding costs nothing; logits and alphas past a row's
        length are zeros, and rows come back in their input order.
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
        w_h, b_h, w_ctx, w_emb, b_emb = self._fused_weights()
        feats_proj = self.attention.encoder_att(feats)  # (B / G, N, A), once per image
        rows = memory_rows(feats.size(0), group, order, inputs.device)
        if rows is not None:
            feats, feats_proj = feats.index_select(0, rows), feats_proj.index_select(0, rows)
        h, c = self.init_state((feats, feats_proj))  # (B, H) each
        # Inputs packed like a PackedSequence: step 0's b_0 rows, then step 1's b_1, ...; P rows.
        # A batch of 64 captions has ~280 distinct words in ~760 positions: the embedding half
        # of the gates is computed once per word, in one matmul, then spread to the positions.
        words, where = torch.unique(inputs.t()[alive], return_inverse=True)  # (U,), (P,)
        emb_u = self.embedding(words)  # (U, E)
        emb = emb_u.index_select(0, where) if self.deep_output else None  # (P, E)
        # `split` hands each step its rows with one gradient for all (slicing would zero-fill a
        # full-size one per step).
        emb_gates = F.linear(emb_u, w_emb, b_emb).index_select(0, where).split(sizes)  # b_t x 4H
        if self._cell_fn is None:
            full_att = self.attention.full_att
            energies = attention_energies(feats_proj, full_att.weight, full_att.bias)
            lin_h, lin_ctx = deferred_linear(w_h, b_h), deferred_linear(w_ctx)
        hs, contexts, alphas = [], [], []
        for t, b in enumerate(sizes):
            if self._cell_fn is None:
                out = self._cell_eager(
                    h[:b], c[:b], emb_gates[t], feats[:b], energies, lin_h, lin_ctx
                )
            else:  # compiled: the plain version, which the compiler can see through
                out = self._cell_fn(
                    h[:b], c[:b], emb_gates[t], feats[:b], feats_proj[:b], w_h, b_h, w_ctx
                )
            h, c, context, alpha = out
            hs.append(h)
            contexts.append(context)
            alphas.append(alpha)
        # The output layer runs once over all computed steps rather than T times.
        logits = self._logits(torch.cat(hs), emb, torch.cat(contexts))  # (P, V)
        return unpack_steps(logits, torch.cat(alphas), None if lengths is None else order, alive)

    def regularizer(self, alphas: Tensor | None, mask: Tensor) -> Tensor:
        """Doubly stochastic attention: every region should get about one unit of attention."""
        return doubly_stochastic(alphas, mask, self.alpha_c)
