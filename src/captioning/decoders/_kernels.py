"""Hand-written autograd kernels of the attention decoders' teacher-forced loops (CPU-minded).

Autograd gives every step of the loop its own weight-gradient matmul over the step's b rows
(thin, 2-3x slower per FLOP here than one matmul over all P rows) plus an add into the running
sum, and a zero-filled full-size gradient for every tensor a step reads a slice of. Here the
steps leave their part of those gradients in a stash, and a `Sink` placed before the loop turns
the stash into the gradient once all steps are done. The fast `forward`s of soft attention and
Up-Down use them; `tests/test_speed_contract.py` holds them to the step-by-step loss and
gradients.

Letters: b rows of a step, N image regions, A attention width, H hidden width, P packed rows.
"""

from collections.abc import Callable

import torch
from torch import Tensor


class SigmoidTanh(torch.autograd.Function):
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
    return SigmoidTanh.apply(x) if x.device.type == "cpu" else torch.tanh(x)


class Sink(torch.autograd.Function):
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


class StepLinear(torch.autograd.Function):
    """x @ w.T (+ b) whose weight gradient is left for `Sink`: (x, grad) go to the stash."""

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


def deferred_linear(weight: Tensor, bias: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    """x -> x @ weight.T + bias for every step; weight (and bias) gradients in one matmul."""
    stash: list[tuple[Tensor, Tensor]] = []

    def collect() -> tuple[Tensor, ...]:
        x, g = (torch.cat(t) for t in zip(*stash, strict=True))  # (P, in), (P, out)
        stash.clear()
        grad_w = g.t() @ x.to(g.dtype)
        return (grad_w,) if bias is None else (grad_w, g.sum(0))

    params = Sink.apply(collect, weight) if bias is None else Sink.apply(collect, weight, bias)
    w, b = params if bias is not None else (params[0], None)
    return lambda x: StepLinear.apply(x, w, b, stash)


class Energies(torch.autograd.Function):
    """Attention energies full_att(tanh(feats_proj[:b] + d)) as one autograd node.

    tanh(z) = 2*sigmoid(2z) - 1 (see `fast_tanh`) with the 2 and the -1 folded into full_att's
    weight and bias; the gradient of feats_proj[:b] is added in place into a buffer that a
    `Sink` hands on; and rows go through in blocks small enough for a core's L2 cache, so the
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
        R = max(1, Energies.BLOCK_BYTES // (N * A * s.element_size()))
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


def attention_energies(feats_proj: Tensor, w: Tensor, bias: Tensor) -> Callable[[Tensor], Tensor]:
    """d (b, A) -> energies (b, N) over the first b rows of feats_proj, for every step."""
    buf = torch.zeros_like(feats_proj)  # (B, N, A) gradient of feats_proj, summed over steps

    def collect() -> tuple[Tensor]:
        g = buf.clone()
        buf.zero_()  # so that a second backward through a retained graph starts again
        return (g,)

    (proj,) = Sink.apply(collect, feats_proj)
    return lambda d: Energies.apply(proj, d, w, bias, buf)


class Context(torch.autograd.Function):
    """The attended feature alpha @ feats[:b] (b, D), the gradient of feats[:b] added in place.

    For region features that need a gradient (Up-Down's embedded regions): autograd would give
    each step a zero-filled gradient of the whole (B, N, D) tensor for its slice, and an add of
    it into the running sum; here each step adds its rows' part into one buffer that a `Sink`
    hands on.
    """

    @staticmethod
    def forward(ctx, feats: Tensor, alpha: Tensor, buf: Tensor):
        # feats (B, N, D), alpha (b, N), buf (B, N, D)
        f = feats[: alpha.size(0)]
        ctx.save_for_backward(f, alpha)
        ctx.buf = buf
        return torch.bmm(alpha.unsqueeze(1).to(f.dtype), f).squeeze(1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        f, alpha = ctx.saved_tensors  # (b, N, D), (b, N)
        buf = ctx.buf[: alpha.size(0)]
        g = grad.to(buf.dtype).unsqueeze(1)  # (b, 1, D)
        buf.baddbmm_(alpha.to(buf.dtype).unsqueeze(2), g)  # += alpha_n * grad, (b, N, D)
        return None, torch.bmm(f, grad.to(f.dtype).unsqueeze(2)).squeeze(2), None


def attended(feats: Tensor) -> Callable[[Tensor], Tensor]:
    """alpha (b, N) -> alpha @ feats[:b] (b, D) for every step; one gradient buffer for feats."""
    buf = torch.zeros_like(feats)

    def collect() -> tuple[Tensor]:
        g = buf.clone()
        buf.zero_()  # so that a second backward through a retained graph starts again
        return (g,)

    (f,) = Sink.apply(collect, feats)
    return lambda alpha: Context.apply(f, alpha, buf)


def ifog(w: Tensor) -> Tensor:
    """An LSTM weight's (or bias's) gate rows from nn.LSTMCell's (i, f, g, o) to (i, f, o, g).

    chunk rather than slicing: in backward, each slice of a weight would zero-fill a gradient
    the size of the whole weight.
    """
    i, f, g, o = w.chunk(4)
    return torch.cat([i, f, o, g])


def lstm_ifog(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """LSTM update from gates (b, 4H) ordered (i, f, o, g): one sigmoid for three gates."""
    H = c.size(1)
    ifo = torch.sigmoid(gates[:, : 3 * H])
    c = ifo[:, H : 2 * H] * c + ifo[:, :H] * torch.tanh(gates[:, 3 * H :])
    return ifo[:, 2 * H :] * torch.tanh(c), c
