"""What the fast paths must keep: the same beams as the simple search, the same loss and
gradients as the step-by-step forward, and state dicts without `_orig_mod.` keys.

The simple references: `benchmarks/reference.py` (the batched beam search this project started
with) and `Decoder.forward_stepwise` (one `step`, an `nn.LSTMCell`, at a time).
"""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from captioning.decoders import build_decoder, fast_tanh, list_decoders
from captioning.decoding import beam_search, generate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reference import beam_search_reference  # noqa: E402

V, D, N, START, END = 30, 16, 9, 1, 2


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny decoders: a second thread only adds synchronisation (20x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(name: str = "soft_attention", **kw):
    torch.manual_seed(0)
    dims = {"embed_dim": 12, "hidden_dim": 20, "dropout": 0.0}
    if name in ("soft_attention", "updown"):
        dims["attention_dim"] = 10
    return build_decoder(name, vocab_size=V, encoder_dim=D, **(dims | kw)).eval()


def spread_out(dec, feats, max_len: int):
    """Sharpen the output layer, and favour <end> until some captions end at once while others
    run to `max_len`; returns the decoder."""
    with torch.no_grad():
        dec.fc.weight.mul_(3.0)
        for _ in range(40):
            hyps = beam_search_reference(
                dec, feats, beam_size=3, start_id=START, end_id=END, max_len=max_len
            )
            lengths = [len(bs[0].tokens) for bs in hyps]
            if min(lengths) <= 2 and max(lengths) == max_len:
                return dec
            dec.fc.bias[END] += 0.1 if max(lengths) == max_len else -0.07
    raise AssertionError(f"no <end> bias spreads the caption lengths: {sorted(lengths)}")


def assert_same_beams(got, want, atol=1e-5):
    assert len(got) == len(want)
    for g_beams, w_beams in zip(got, want, strict=True):
        assert [h.tokens for h in g_beams] == [h.tokens for h in w_beams]
        for g, w in zip(g_beams, w_beams, strict=True):
            assert g.score == pytest.approx(w.score, abs=atol)
            assert g.logprob == pytest.approx(w.logprob, abs=atol)
            if w.alphas is None:
                assert g.alphas is None
            else:
                torch.testing.assert_close(g.alphas, w.alphas, rtol=0, atol=atol)


DECODERS = [
    ("soft_attention", {}),
    ("soft_attention", {"deep_output": True}),
    ("soft_attention", {"gate": False}),
    ("updown", {}),
    ("show_tell", {}),
    ("merge", {}),
]


@pytest.mark.parametrize("name,kw", DECODERS, ids=lambda x: str(x))
@pytest.mark.parametrize("beam", [1, 3, 5])
def test_beam_search_equals_reference(name, kw, beam):
    feats = torch.randn(23, N, D) * 2
    dec = spread_out(make(name, **kw), feats, max_len=12)
    opts = dict(beam_size=beam, start_id=START, end_id=END, max_len=12, banned=(0, 1))
    want = beam_search_reference(dec, feats, **opts)
    for chunk in (1, 4, 64):  # one image, chunks that split the batch, one chunk
        assert_same_beams(beam_search(dec, feats, chunk_size=chunk, **opts), want)


@pytest.mark.parametrize("beam", [3, 5])
def test_beam_search_length_penalty_and_allowed_pad(beam):
    """Other settings of the search: no length normalisation, nothing banned."""
    feats = torch.randn(9, N, D) * 2
    dec = spread_out(make(), feats, max_len=7)
    opts = dict(beam_size=beam, start_id=START, end_id=END, max_len=7, length_penalty=0.0)
    assert_same_beams(
        beam_search(dec, feats, chunk_size=2, **opts), beam_search_reference(dec, feats, **opts)
    )


def test_batched_equals_one_at_a_time_with_compaction():
    """An image's beams do not depend on which images share its chunk or when they end."""
    feats = torch.randn(17, N, D) * 2
    dec = spread_out(make(), feats, max_len=12)
    opts = dict(beam_size=5, start_id=START, end_id=END, max_len=12, banned=(0, 1))
    batched = beam_search(dec, feats, **opts)
    singles = [beam_search(dec, feats[i : i + 1], **opts)[0] for i in range(17)]
    assert_same_beams(batched, singles)


def test_generate_passes_chunk_size():
    feats = torch.randn(5, N, D) * 2
    dec = spread_out(make(), feats, max_len=8)
    opts = dict(beam_size=3, start_id=START, end_id=END, max_len=8)
    a = generate(dec, feats, chunk_size=2, **opts)
    assert_same_beams(a, generate(dec, feats, **opts))
    with pytest.raises(ValueError):
        beam_search(dec, feats, chunk_size=0, **opts)


@pytest.mark.parametrize("name", list_decoders())
def test_step_grouped_equals_step_on_repeated_memory(name):
    dec = make(name)
    B, G = 3, 4
    feats = torch.randn(B, N, D)
    memory = dec.prepare(feats)
    rows = torch.arange(B).repeat_interleave(G)
    repeated = tuple(m.index_select(0, rows) for m in memory)
    state = tuple(
        s.index_select(0, rows) + 0.1 * torch.randn_like(s.index_select(0, rows))
        for s in dec.init_state(memory)
    )
    tokens = torch.randint(3, V, (B * G,))
    with torch.no_grad():
        want = dec.step(tokens, state, repeated)
        got = dec.step_grouped(tokens, state, memory, G)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-5)
    for g, w in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
    if want[2] is None:
        assert got[2] is None
    else:
        torch.testing.assert_close(got[2], want[2], rtol=0, atol=1e-6)


def test_fast_tanh():
    x = torch.linspace(-12, 12, 2001, dtype=torch.float64, requires_grad=True)
    (fast_tanh(x) * x.cos()).sum().backward()
    g = x.grad.clone()
    x.grad = None
    (torch.tanh(x) * x.cos()).sum().backward()
    torch.testing.assert_close(fast_tanh(x.detach()), torch.tanh(x.detach()), rtol=0, atol=1e-12)
    torch.testing.assert_close(g, x.grad, rtol=0, atol=1e-12)
    y = torch.randn(1000) * 4
    torch.testing.assert_close(fast_tanh(y), torch.tanh(y), rtol=0, atol=3e-7)


def batch(B: int = 7, T: int = 9, lengths=(9, 3, 5, 1, 9, 7, 2), seed: int = 1):
    """Captions (B, T + 1) with <pad> after each row's length; lengths count the targets."""
    g = torch.Generator().manual_seed(seed)
    caps = torch.randint(3, V, (B, T + 1), generator=g)
    caps[:, 0] = START
    for b, n in enumerate(lengths):
        caps[b, n] = END
        caps[b, n + 1 :] = 0
    feats = torch.randn(B, N, D, generator=g)
    return feats, caps[:, :-1], caps[:, 1:]


def loss_and_grads(dec, forward, targets):
    """Loss as the LightningModule computes it, with the gradient of every parameter."""
    dec.zero_grad(set_to_none=True)
    logits, alphas = forward()
    mask = (targets != 0).to(logits.dtype)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=0)
    loss = ce + dec.regularizer(alphas, mask)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in dec.named_parameters() if p.grad is not None}
    return loss.detach(), logits.detach(), alphas.detach(), grads


FAST_FORWARD = [
    ("soft_attention", {}),
    ("soft_attention", {"deep_output": True}),
    ("soft_attention", {"gate": False}),
    ("updown", {"alpha_c": 1.0}),  # with its regulariser, so the alphas' gradients count
]


@pytest.mark.parametrize("name,kw", FAST_FORWARD, ids=str)
@pytest.mark.parametrize("packed", [True, False], ids=["lengths", "all-steps"])
def test_fast_forward_equals_stepwise(name, kw, packed):
    """Loss and every gradient as in the step loop (fp32, 1e-5); logits on the real steps."""
    dec = make(name, **kw).train()  # dropout 0: train mode without randomness
    feats, inputs, targets = batch()
    lengths = (targets != 0).sum(1)

    def fast():
        return dec(feats, inputs, lengths=lengths if packed else None)

    def slow():
        return dec.forward_stepwise(feats, inputs)

    f_loss, f_logits, f_alphas, f_grads = loss_and_grads(dec, fast, targets)
    s_loss, s_logits, s_alphas, s_grads = loss_and_grads(dec, slow, targets)
    torch.testing.assert_close(f_loss, s_loss, rtol=0, atol=1e-5)
    assert f_grads.keys() == s_grads.keys()
    for k in s_grads:
        torch.testing.assert_close(f_grads[k], s_grads[k], rtol=1e-4, atol=1e-5, msg=k)
    real = targets != 0
    torch.testing.assert_close(f_logits[real], s_logits[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(f_alphas[real], s_alphas[real], rtol=0, atol=1e-6)
    if packed:  # nothing is computed past a row's length
        assert (f_logits[~real] == 0).all() and (f_alphas[~real] == 0).all()
    else:
        torch.testing.assert_close(f_logits, s_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["soft_attention", "updown"])
def test_fast_forward_without_autograd_equals_with_it(name):
    """Validation's loss runs under no_grad, where Up-Down takes its plain step."""
    dec = make(name)
    feats, inputs, targets = batch()
    lengths = (targets != 0).sum(1)
    with_grad, _ = dec(feats, inputs, lengths=lengths)
    with torch.no_grad():
        without, _ = dec(feats, inputs, lengths=lengths)
    torch.testing.assert_close(without, with_grad.detach(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["soft_attention", "updown"])
def test_fast_forward_float64_is_exact(name):
    """In float64 the fast path and the step loop agree to rounding: same maths, reordered."""
    dec = make(name, alpha_c=1.0).double().train()
    feats, inputs, targets = batch()
    feats = feats.double()
    lengths = (targets != 0).sum(1)
    f = loss_and_grads(dec, lambda: dec(feats, inputs, lengths=lengths), targets)
    s = loss_and_grads(dec, lambda: dec.forward_stepwise(feats, inputs), targets)
    torch.testing.assert_close(f[0], s[0], rtol=0, atol=1e-12)
    for k in s[3]:
        torch.testing.assert_close(f[3][k], s[3][k], rtol=0, atol=1e-12, msg=k)


@pytest.mark.parametrize("name", ["soft_attention", "updown"])
def test_fast_forward_second_backward_through_retained_graph(name):
    """The gradient buffers of the hand-written backward start from zero on every backward."""
    dec = make(name).train()
    feats, inputs, targets = batch()
    logits, _ = dec(feats, inputs, lengths=(targets != 0).sum(1))
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=0)
    loss.backward(retain_graph=True)
    first = {k: p.grad.clone() for k, p in dec.named_parameters() if p.grad is not None}
    dec.zero_grad(set_to_none=True)
    loss.backward()
    for k, p in dec.named_parameters():
        if k in first:
            torch.testing.assert_close(p.grad, first[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("name", ["soft_attention", "updown"])
def test_fast_forward_all_full_length_and_single_row(name):
    dec = make(name).train()
    for lengths in [(9, 9, 9), (4,)]:
        feats, inputs, targets = batch(B=len(lengths), lengths=lengths)
        n = torch.tensor(lengths)
        f = loss_and_grads(dec, lambda f=feats, i=inputs, n=n: dec(f, i, lengths=n), targets)
        s = loss_and_grads(dec, lambda f=feats, i=inputs: dec.forward_stepwise(f, i), targets)
        torch.testing.assert_close(f[0], s[0], rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["soft_attention", "updown"])
def test_compile_step_keeps_state_dict_keys_and_results(name):
    """`compile_step` compiles in place: no `_orig_mod.` keys, the same loss and gradients."""
    dec = make(name, alpha_c=1.0).train()
    keys = list(dec.state_dict())
    feats, inputs, targets = batch()
    lengths = (targets != 0).sum(1)
    eager = loss_and_grads(dec, lambda: dec(feats, inputs, lengths=lengths), targets)
    dec.compile_step()
    assert list(dec.state_dict()) == keys
    assert not any("_orig_mod" in k for k in dec.state_dict())
    compiled = loss_and_grads(dec, lambda: dec(feats, inputs, lengths=lengths), targets)
    torch.testing.assert_close(compiled[0], eager[0], rtol=0, atol=1e-5)
    for k in eager[3]:
        torch.testing.assert_close(compiled[3][k], eager[3][k], rtol=1e-4, atol=1e-5, msg=k)
