"""Caption decoders behind one step API, so search is written once (see `decoding.py`).

Every decoder maps region features (B, N, D) and caption tokens to next-word logits:

- ``prepare(feats) -> memory``: step-independent tensors, batch first (beam search reindexes them)
- ``init_state(memory) -> state``: the recurrent state, a tuple of (B, ...) tensors
- ``step(tokens, state, memory) -> (logits (B, V), state, alpha (B, N) or None)``
- ``step_grouped(tokens, state, memory, group)``: `step` for G state rows per memory row, or
  group[i] for row i (the beams of one image share its memory, so beam search never copies
  the image features, and ended beams can be left out)
- ``forward(feats, inputs, lengths=None) -> (logits (B, T, V), alphas (B, T, N) or None)``:
  teacher forcing; with `lengths` a decoder may skip the steps of row b past lengths[b] (their
  logits and alphas are then zeros: they must be masked, as the loss does with padding)

Letters: B batch, T caption steps, N image regions, D feature width, E embedding width,
H hidden width, A attention width, V vocabulary, G state rows per memory row.
"""

import inspect
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import precision
from .errors import ConfigError
from .registry import Registry

DECODERS = Registry("decoder")
log = logging.getLogger(__name__)

State = tuple[Tensor, ...]
Memory = tuple[Tensor, ...]
Group = int | list[int]  # state rows per memory row: the same for every row, or one count each


class Decoder(nn.Module):
    """Base class: the straightforward teacher-forced forward is a loop over `step`."""

    def prepare(self, feats: Tensor) -> Memory:
        return (feats,)

    def init_state(self, memory: Memory) -> State:
        raise NotImplementedError

    def step(self, tokens: Tensor, state: State, memory: Memory):
        raise NotImplementedError

    def step_grouped(self, tokens: Tensor, state: State, memory: Memory, group: Group):
        """`step` where memory row i serves the next G state rows, G = `group` or `group[i]`.

        Tokens and state have one row per (image, beam), the beams of each image together;
        with a list, an image may have fewer rows (ended beams are left out) or none. This
        default copies each memory row per state row; decoders with a large memory override it.
        """
        if group != 1:
            counts = torch.tensor(group, device=tokens.device) if isinstance(group, list) else group
            rows = torch.arange(memory[0].size(0), device=tokens.device).repeat_interleave(counts)
            memory = tuple(m.index_select(0, rows) for m in memory)
        return self.step(tokens, state, memory)

    def forward(self, feats: Tensor, inputs: Tensor, lengths: Tensor | None = None):
        # `lengths` lets a decoder skip padding steps; the plain loop computes them all.
        return self.forward_stepwise(feats, inputs)

    def compile_step(self, **options) -> None:
        """Compile the training hot path in place; the state dict keeps its keys.

        `nn.Module.compile` compiles in place, unlike `torch.compile(module)`, whose wrapper puts
        `_orig_mod.` in front of every key of the state dict.
        """
        self.compile(**options)

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

    def attention_loss(self, token_logp: Tensor, mask: Tensor) -> Tensor:
        """Extra loss of the last teacher-forced `forward` given its words' log-probabilities
        (B, T) (detached) and mask (B, T); hard attention's REINFORCE term, else zero."""
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


class _SigmoidTanh(torch.autograd.Function):
    """tanh(x) computed as 2*sigmoid(2x) - 1 (within 2e-7 of torch.tanh).

    PyTorch's CPU tanh runs ~5x slower than its sigmoid (0.3 vs 2 G elements/s on one AVX-512
    core here), and the attention's (B, N, A) tanh is the largest elementwise op of a step.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = torch.sigmoid(x * 2).mul_(2).sub_(1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad, y)


def fast_tanh(x: Tensor) -> Tensor:
    """`torch.tanh`, through sigmoid on the CPU where that is faster."""
    return _SigmoidTanh.apply(x) if x.device.type == "cpu" else torch.tanh(x)


# -- the teacher-forced loop's backward, by hand where autograd's costs several passes more --
# Autograd gives every step of the loop its own weight-gradient matmul over the step's b rows
# (thin, 2-3x slower per FLOP here than one matmul over all P rows) plus an add into the
# running sum, and a zero-filled full-size gradient for every tensor a step reads a slice of.
# Below, the steps leave their part of those gradients in a stash, and a `_Sink` placed before
# the loop turns the stash into the gradient once all steps are done.


class _Sink(torch.autograd.Function):
    """Identity on `xs` whose gradients come from `collect()`, after every step's backward."""

    @staticmethod
    def forward(ctx, collect: Callable[[], tuple[Tensor, ...]], *xs: Tensor):
        ctx.set_materialize_grads(False)
        ctx.collect = collect
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        parts = ctx.collect()
        return None, *(p if g is None else p + g for p, g in zip(parts, grads, strict=True))


class _StepLinear(torch.autograd.Function):
    """x @ w.T (+ b) whose weight gradient is left for `_Sink`: (x, grad) go to the stash."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, stash: list[tuple[Tensor, Tensor]]):
        ctx.save_for_backward(x, w)
        ctx.stash = stash
        return x @ w.t() if b is None else torch.addmm(b, x, w.t())

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        ctx.stash.append((x, grad))
        # Under autocast grad is in the compute dtype and w is not; autograd casts the results.
        return grad @ w.to(grad.dtype), None, None, None


def _deferred_linear(weight: Tensor, bias: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    """x -> x @ weight.T + bias for every step; weight (and bias) gradients in one matmul."""
    stash: list[tuple[Tensor, Tensor]] = []

    def collect() -> tuple[Tensor, ...]:
        x, g = (torch.cat(t) for t in zip(*stash, strict=True))  # (P, in), (P, out)
        stash.clear()
        grad_w = g.t() @ x.to(g.dtype)
        return (grad_w,) if bias is None else (grad_w, g.sum(0))

    params = _Sink.apply(collect, weight) if bias is None else _Sink.apply(collect, weight, bias)
    w, b = params if bias is not None else (params[0], None)
    return lambda x: _StepLinear.apply(x, w, b, stash)


class _Energies(torch.autograd.Function):
    """Attention energies full_att(tanh(feats_proj[:b] + d)) as one autograd node.

    tanh(z) = 2*sigmoid(2z) - 1 (see `fast_tanh`) with the 2 and the -1 folded into full_att's
    weight and bias; the gradient of feats_proj[:b] is added in place into a buffer that a
    `_Sink` hands on; and rows go through in blocks small enough for a core's L2 cache, so the
    four passes over the step's largest tensor, (b, N, A), run from cache rather than memory.
    """

    BLOCK_BYTES = 1 << 20

    @staticmethod
    def forward(ctx, feats_proj: Tensor, d: Tensor, w: Tensor, bias: Tensor, buf: Tensor):
        # feats_proj (B, N, A), d (b, A), w (1, A), bias (1,), buf (B, N, A)
        (b, A), N = d.shape, feats_proj.size(1)
        s = torch.empty((b, N, A), dtype=torch.result_type(feats_proj, d), device=d.device)
        e = torch.empty((b * N, 1), dtype=s.dtype, device=d.device)
        w2, b2 = (2 * w).t().to(s.dtype), (bias - w.sum()).to(s.dtype)  # (A, 1), (1,)
        R = max(1, _Energies.BLOCK_BYTES // (N * A * s.element_size()))
        if d.device.type != "cpu":  # a GPU gains nothing from blocks, and pays per launch
            R = b
        d2 = (2 * d).unsqueeze(1)  # (b, 1, A)
        for i in range(0, b, R):
            j = min(b, i + R)
            # 2z = 2 d + 2 proj in one pass (and exactly 2 (d + proj): doubling is exact)
            si = torch.add(d2[i:j], feats_proj[i:j], alpha=2, out=s[i:j]).sigmoid_()
            torch.addmm(b2, si.view(-1, A), w2, out=e[i * N : j * N])
        ctx.save_for_backward(s, w)
        ctx.buf, ctx.R = buf, R
        return e.view(b, N)

    @staticmethod
    def backward(ctx, ge: Tensor):
        s, w = ctx.saved_tensors  # s = sigmoid(2z) (b, N, A); w (1, A)
        (b, N, A), R = s.shape, ctx.R
        w4 = (4 * w).to(s.dtype)
        ge = ge.to(s.dtype)
        gd = s.new_empty(b, A)
        gz = s.new_empty(min(R, b), N, A)
        gs = s.new_zeros(1, A)  # sum over rows and regions of ge * s
        for i in range(0, b, R):
            j = min(b, i + R)
            si = s[i:j]
            gs.addmm_(ge[i:j].reshape(1, -1), si.reshape(-1, A))
            # e = sum_a w_a (2 s_a - 1) + bias, so de/dz_a = 4 w_a s_a (1 - s_a)
            g = torch.addcmul(si, si, si, value=-1, out=gz[: j - i])
            g.mul_(ge[i:j].unsqueeze(2)).mul_(w4)
            ctx.buf[i:j] += g
            torch.sum(g, dim=1, out=gd[i:j])
        return None, gd, 2 * gs - ge.sum(), ge.sum().view(1), None


def _energies(feats_proj: Tensor, w: Tensor, bias: Tensor) -> Callable[[Tensor], Tensor]:
    """d (b, A) -> energies (b, N) over the first b rows of feats_proj, for every step."""
    buf = torch.zeros_like(feats_proj)  # (B, N, A) gradient of feats_proj, summed over steps

    def collect() -> tuple[Tensor]:
        g = buf.clone()
        buf.zero_()  # so that a second backward through a retained graph starts again
        return (g,)

    (proj,) = _Sink.apply(collect, feats_proj)
    return lambda d: _Energies.apply(proj, d, w, bias, buf)


def _lstm_ifog(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """LSTM update from gates (b, 4H) ordered (i, f, o, g): one sigmoid for three gates."""
    H = c.size(1)
    ifo = torch.sigmoid(gates[:, : 3 * H])
    c = ifo[:, H : 2 * H] * c + ifo[:, :H] * torch.tanh(gates[:, 3 * H :])
    return ifo[:, 2 * H :] * torch.tanh(c), c


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

    def step(self, tokens: Tensor, state: State, memory: Memory):
        h, c = state
        emb = self.embedding(tokens)  # (B, E)
        context, alpha = self._attend(h, memory)
        h, c = self.lstm(torch.cat([emb, context], dim=1), (h, c))
        return self._logits(h, emb, context), (h, c), alpha

    def step_grouped(self, tokens: Tensor, state: State, memory: Memory, group: Group):
        """`step` with the rows of an image (its beams) attending to its one copy of the memory.

        Without autograd (beam search), the weights are regrouped as in training (see
        `_inference_weights`), in the matmul dtype of `precision.use` (fp32 unless bf16 is
        asked for); with autograd, the step stays the plain, differentiable one.
        """
        h, c = state  # (R, H) each
        feats, feats_proj = memory  # (B, N, D), (B, N, A)
        if torch.is_grad_enabled():
            emb = self.embedding(tokens)  # (R, E)
            alpha, context = self._grouped_attention(
                feats, feats_proj, self.attention.decoder_att(h), group
            )
            if self.gate:
                context = torch.sigmoid(self.f_beta(h)) * context
            h, c = self.lstm(torch.cat([emb, context], dim=1), (h, c))
            return self._logits(h, emb, context), (h, c), alpha
        emb_gates, w_h, b_h, w_ctx, fc = self._inference_weights(precision.matmul_dtype())
        d, *beta, hh = precision.linear(h, w_h, b_h).split(self._h_split, dim=1)  # (R, A),..
        alpha, context = self._grouped_attention(feats, feats_proj, d, group)  # (R, N), (R, D)
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

    def _grouped_attention(
        self, feats: Tensor, feats_proj: Tensor, d: Tensor, group: Group
    ) -> tuple[Tensor, Tensor]:
        """Attention of R queries d (R, A) over their images' regions: alpha (R, N), context
        (R, D); the rows of image i are the next `group` (or group[i]) rows."""
        B, N, _ = feats.shape
        full_att = self.attention.full_att
        if isinstance(group, int) and feats.device.type != "cpu":
            z = feats_proj.unsqueeze(1) + d.view(B, group, 1, -1)  # (B, G, N, A)
            alpha = full_att(torch.tanh(z)).view(B, group, N).softmax(dim=2)
            return alpha.view(-1, N), torch.bmm(alpha, feats).view(B * group, -1)
        counts = [group] * B if isinstance(group, int) else group
        if feats.device.type != "cpu":  # rows of their image's memory, copied
            img = torch.repeat_interleave(torch.tensor(counts, device=d.device))
            z = feats_proj.index_select(0, img) + d.unsqueeze(1)  # (R, N, A)
            alpha = full_att(torch.tanh(z)).squeeze(2).softmax(dim=1)
            return alpha, torch.bmm(alpha.unsqueeze(1), feats.index_select(0, img)).squeeze(1)
        # On the CPU, one image at a time: the energies of a step, a (R, N, A) tensor, are by
        # far its largest, and an image's (G, N, A) share of them stays in cache. As in
        # fast_tanh, tanh(z) = 2*sigmoid(2z) - 1, with the 2 and the -1 folded into full_att.
        w2, b2 = 2 * full_att.weight, full_att.bias - full_att.weight.sum()  # (1, A), (1,)
        d2 = (2 * d).unsqueeze(1)  # (R, 1, A)
        alphas, contexts, r = [], [], 0
        for i, g in enumerate(counts):
            if g:
                z2 = torch.add(d2[r : r + g], feats_proj[i], alpha=2)  # 2 (proj + d): (G, N, A)
                alpha = F.linear(z2.sigmoid_(), w2, b2).squeeze(2).softmax(dim=1)
                alphas.append(alpha)  # (G, N)
                contexts.append(alpha @ feats[i])  # (G, D)
                r += g
        return torch.cat(alphas), torch.cat(contexts)

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
                ws, bs = [att.weight], [att.bias]
                if self.gate:
                    ws.append(self.f_beta.weight)
                    bs.append(self.f_beta.bias)
                w_h = torch.cat([*ws, lstm.weight_hh])
                b_h = torch.cat([*bs, lstm.weight_hh.new_zeros(lstm.weight_hh.size(0))])
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
        att = self.attention
        hs_w, hs_b = [att.decoder_att.weight], [att.decoder_att.bias]
        if self.gate:
            hs_w.append(self.f_beta.weight)
            hs_b.append(self.f_beta.bias)
        w_h = torch.cat([*hs_w, w_hh])
        b_h = torch.cat([*hs_b, w_hh.new_zeros(w_hh.size(0))])
        return w_h, b_h, w_ctx, w_emb, b_emb

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
        h, c = _lstm_ifog(torch.addmm(emb_gates + hh, context, w_ctx.t()), c)
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
        """`_cell` with the hand-written backward pieces (`_deferred_linear`, `_energies`)."""
        d, *beta, hh = lin_h(h).split(self._h_split, dim=1)  # (b, A), [(b, D)], (b, 4H)
        alpha = energies(d).softmax(dim=1)  # (b, N)
        context = torch.bmm(alpha.unsqueeze(1), feats).squeeze(1)  # (b, D)
        if beta:
            context = torch.sigmoid(beta[0]) * context
        h, c = _lstm_ifog(emb_gates + hh + lin_ctx(context), c)
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

    def forward(self, feats: Tensor, inputs: Tensor, lengths: Tensor | None = None):
        """Teacher forcing, equal to `forward_stepwise` on every step it computes.

        Step-independent work runs once: the encoder-side attention projection, the embedding
        half of the gates, the output layer. With `lengths` (steps to compute per row, e.g. the
        number of non-padding targets), rows are sorted longest first so that step t runs on
        the first b_t rows only and padding costs nothing; logits and alphas past a row's
        length are zeros, and rows come back in their input order.
        """
        B, T = inputs.shape
        steps = torch.arange(T, device=inputs.device)
        if lengths is None:
            alive = torch.ones(T, B, dtype=torch.bool, device=inputs.device)
        else:
            order = lengths.argsort(descending=True, stable=True)  # (B,) longest first
            feats, inputs = feats.index_select(0, order), inputs.index_select(0, order)
            alive = lengths.index_select(0, order).unsqueeze(0) > steps.unsqueeze(1)  # (T, B)
        sizes = [n for n in alive.sum(1).tolist() if n > 0]  # b_t: rows [b_t:] have ended
        w_h, b_h, w_ctx, w_emb, b_emb = self._fused_weights()
        feats_proj = self.attention.encoder_att(feats)  # (B, N, A), once
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
            energies = _energies(feats_proj, full_att.weight, full_att.bias)
            lin_h, lin_ctx = _deferred_linear(w_h, b_h), _deferred_linear(w_ctx)
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
        alphas_p = torch.cat(alphas)  # (P, N)
        if lengths is None:  # every step of every row: (T, B) order, a transpose away
            return logits.view(T, B, -1).transpose(0, 1), alphas_p.view(T, B, -1).transpose(0, 1)
        rows = order.expand(T, B)[alive]  # (P,) input row of each packed entry
        at = steps.unsqueeze(1).expand(T, B)[alive]  # (P,) its step
        # In place into fresh zeros: the out-of-place index_put would copy the (B, T, V) zeros.
        logits = logits.new_zeros(B, T, logits.size(1)).index_put_((rows, at), logits)  # (B,T,V)
        alphas_t = alphas_p.new_zeros(B, T, alphas_p.size(1)).index_put_((rows, at), alphas_p)
        return logits, alphas_t

    def regularizer(self, alphas: Tensor | None, mask: Tensor) -> Tensor:
        """Doubly stochastic attention: every region should get about one unit of attention."""
        # alphas (B, T, N), mask (B, T): padding steps must not count.
        coverage = (alphas * mask.unsqueeze(2)).sum(dim=1)  # (B, N)
        return self.alpha_c * ((1.0 - coverage) ** 2).mean()


@DECODERS.register("hard_attention")
class HardAttentionDecoder(SoftAttentionDecoder):
    """The paper's stochastic "hard" attention (section 4.1): the context is one region.

    Training samples a region s_t ~ Multinoulli(alpha_t) at every step and maximises the
    variational lower bound with the paper's estimator (eq. 12):

        d log p(y|s) + lambda_r (log p(y|s) - b) d log p(s) + lambda_e d H[s]

    with b a moving average of log p(y|s) (momentum 0.9) and, with probability `soft_mix`
    (the paper's 0.5), the step uses the expected context instead of a sample. log p(y|s)
    is averaged per word here, so the advantage does not scale with caption length.
    Decoding uses the expected context (`inference: expectation`, as the authors' code does) or
    the most likely region (`argmax`); both are deterministic, so beam search applies as is.
    """

    def __init__(
        self,
        *args,
        reinforce_weight: float = 1.0,
        entropy_weight: float = 0.01,
        baseline_momentum: float = 0.9,
        soft_mix: float = 0.5,
        inference: str = "expectation",
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if inference not in ("expectation", "argmax"):
            raise ConfigError(f"decoder.inference must be expectation or argmax, got {inference!r}")
        if not 0.0 <= soft_mix <= 1.0 or not 0.0 <= baseline_momentum < 1.0:
            raise ConfigError("decoder.soft_mix must be in [0, 1], baseline_momentum in [0, 1)")
        self.reinforce_weight, self.entropy_weight = reinforce_weight, entropy_weight
        self.baseline_momentum, self.soft_mix, self.inference = (
            baseline_momentum,
            soft_mix,
            inference,
        )
        # The moving-average baseline is state: in the checkpoint, so a resumed run continues it.
        self.register_buffer("baseline", torch.zeros(()))
        self.register_buffer("baseline_ready", torch.zeros((), dtype=torch.bool))
        self._last: tuple[Tensor, Tensor] | None = None  # (log p(s_t), H_t) of the last forward

    def sample_regions(self, alpha: Tensor) -> Tensor:
        """One region per row drawn from alpha (B, N): indices (B,)."""
        return torch.multinomial(alpha.float(), 1).squeeze(1)

    def _hard_context(self, feats: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Context (b, D) of one step, log p(s_t) (b,) (0 where no sample) and entropy (b,)."""
        rows = torch.arange(alpha.size(0), device=alpha.device)
        entropy = -(alpha * alpha.clamp_min(1e-12).log()).sum(1)
        if self.training:
            s = self.sample_regions(alpha.detach())
            context = feats[rows, s]  # (b, D)
            logp_s = alpha[rows, s].clamp_min(1e-12).log()
            if self.soft_mix > 0:  # these rows take the expectation: no sampling decision
                soft = torch.rand(alpha.size(0), device=alpha.device) < self.soft_mix
                expected = torch.bmm(alpha.unsqueeze(1), feats).squeeze(1)
                context = torch.where(soft.unsqueeze(1), expected, context)
                logp_s = logp_s.masked_fill(soft, 0.0)
            return context, logp_s, entropy
        if self.inference == "argmax":
            context = feats[rows, alpha.argmax(1)]
        else:
            context = torch.bmm(alpha.unsqueeze(1), feats).squeeze(1)
        return context, alpha.new_zeros(alpha.size(0)), entropy

    def _attend(self, h: Tensor, memory: Memory) -> tuple[Tensor, Tensor]:
        feats, feats_proj = memory
        _, alpha = self.attention(feats, feats_proj, h)  # (B, N)
        context, _, _ = self._hard_context(feats, alpha)
        if self.gate:
            context = torch.sigmoid(self.f_beta(h)) * context
        return context, alpha

    def step_grouped(self, tokens: Tensor, state: State, memory: Memory, group: Group):
        if self.inference == "expectation" and not self.training:  # soft attention's fast path
            return super().step_grouped(tokens, state, memory, group)
        return Decoder.step_grouped(self, tokens, state, memory, group)

    def compile_step(self, **options) -> None:
        raise ConfigError("compile applies to soft attention's training step, not hard attention")

    def forward(self, feats: Tensor, inputs: Tensor, lengths: Tensor | None = None):
        """Teacher forcing with sampled regions; with `lengths`, rows past their end are skipped
        (longest first, as in soft attention) and their logits and alphas are zeros."""
        B, T = inputs.shape
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long, device=inputs.device)
        order = lengths.argsort(descending=True, stable=True)
        feats, inputs = feats.index_select(0, order), inputs.index_select(0, order)
        sizes = (
            (
                lengths.index_select(0, order).unsqueeze(0)
                > torch.arange(T, device=inputs.device).unsqueeze(1)
            )
            .sum(1)
            .tolist()
        )  # (T,) b_t
        memory = self.prepare(feats)
        h, c = self.init_state(memory)
        emb = self.embedding(inputs)  # (B, T, E)
        logits = feats.new_zeros(B, T, self.vocab_size)
        alphas = feats.new_zeros(B, T, feats.size(1))
        logp_s, entropy = feats.new_zeros(B, T), feats.new_zeros(B, T)
        for t, b in enumerate(sizes):
            if b == 0:
                break
            _, alpha = self.attention(memory[0][:b], memory[1][:b], h[:b])  # (b, N)
            context, lp, ent = self._hard_context(feats[:b], alpha)
            if self.gate:
                context = torch.sigmoid(self.f_beta(h[:b])) * context
            h, c = self.lstm(torch.cat([emb[:b, t], context], dim=1), (h[:b], c[:b]))
            logits[:b, t] = self._logits(h, emb[:b, t], context)
            alphas[:b, t], logp_s[:b, t], entropy[:b, t] = alpha, lp, ent
        inverse = order.argsort()  # back to the input order
        self._last = (logp_s.index_select(0, inverse), entropy.index_select(0, inverse))
        return logits.index_select(0, inverse), alphas.index_select(0, inverse)

    def attention_loss(self, token_logp: Tensor, mask: Tensor) -> Tensor:
        if self._last is None or not self.training:
            return mask.new_zeros((), dtype=torch.float32)
        logp_s, entropy = self._last
        self._last = None
        mask = mask.to(logp_s.dtype)
        words = mask.sum(1).clamp(min=1)
        reward = (token_logp.detach() * mask).sum(1) / words  # (B,) mean log p(y|s) per word
        with torch.no_grad():
            if not bool(self.baseline_ready):
                self.baseline.fill_(float(reward.mean()))
                self.baseline_ready.fill_(True)
            advantage = reward - self.baseline
            m = self.baseline_momentum
            self.baseline.mul_(m).add_((1 - m) * reward.mean())
        reinforce = -(advantage * (logp_s * mask).sum(1) / words).mean()
        bonus = (entropy * mask).sum() / mask.sum().clamp(min=1)
        return self.reinforce_weight * reinforce - self.entropy_weight * bonus


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


def _options(cls: type) -> set[str]:
    """Keyword options of a decoder class, its base classes' included."""
    names: set[str] = set()
    for c in cls.__mro__:
        init = c.__dict__.get("__init__")
        if init is not None and c is not nn.Module and c is not object:
            names |= {
                p.name
                for p in inspect.signature(init).parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            }
    return names - {"self", "vocab_size", "encoder_dim"}


def build_decoder(name: str, vocab_size: int, encoder_dim: int, **cfg) -> Decoder:
    """Build a registered decoder; dimensions come from the vocabulary and the encoder."""
    cls = DECODERS.get(name)
    # An experiment sets the options of its decoder; swapping the decoder on the command line
    # (experiment=flickr8k decoder=show_tell) leaves options only other decoders have, which
    # are dropped here. A key no decoder knows is still an error (a typo).
    own = _options(cls)
    others = set().union(*(_options(DECODERS.get(n)) for n in DECODERS.names())) - own
    dropped = sorted(k for k in cfg if k in others)
    if dropped:
        log.info("decoder %s ignores options of other decoders: %s", name, ", ".join(dropped))
        cfg = {k: v for k, v in cfg.items() if k not in others}
    try:
        return cls(vocab_size=vocab_size, encoder_dim=encoder_dim, **cfg)
    except TypeError as e:  # an unknown or misspelt option in decoder=...
        raise ConfigError(f"decoder {name!r}: {e}") from None


def list_decoders() -> list[str]:
    return DECODERS.names()
