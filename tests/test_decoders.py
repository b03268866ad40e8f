"""Decoder contract: shapes, padding, attention, fast path = step loop, beam 1 = greedy."""

import pytest
import torch

from captioning.decoders import build_decoder, list_decoders
from captioning.decoding import beam_search, generate, greedy_search
from captioning.errors import ConfigError

V, D, N = 30, 16, 9


def make(name: str, **kw):
    torch.manual_seed(0)
    dec = build_decoder(
        name, vocab_size=V, encoder_dim=D, embed_dim=12, hidden_dim=20, dropout=0.0, **kw
    )
    return dec.eval()


def captions(B: int = 3, T: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(4, V, (B, T), generator=g)


@pytest.mark.parametrize("name", list_decoders())
def test_shapes(name):
    dec = make(name)
    feats = torch.randn(3, N, D)
    logits, alphas = dec(feats, captions())
    assert logits.shape == (3, 7, V)
    if hasattr(dec, "attention"):
        assert alphas.shape == (3, 7, N)
    else:
        assert alphas is None


@pytest.mark.parametrize("name", list_decoders())
def test_padding_changes_nothing(name):
    """Logits of the real steps do not depend on how much padding follows them."""
    dec = make(name)
    feats = torch.randn(3, N, D)
    caps = captions()
    padded = torch.cat([caps, torch.zeros(3, 5, dtype=torch.long)], 1)
    a, _ = dec(feats, caps)
    b, _ = dec(feats, padded)
    torch.testing.assert_close(a, b[:, :7], rtol=0, atol=1e-6)


ATTENTION_DECODERS = [n for n in list_decoders() if hasattr(make(n), "attention")]


def test_attention_decoders_are_found():
    assert {"soft_attention", "hard_attention", "updown"} <= set(ATTENTION_DECODERS)


@pytest.mark.parametrize("name", ATTENTION_DECODERS)
def test_attention_sums_to_one(name):
    dec = make(name)
    _, alphas = dec(torch.randn(3, N, D), captions())
    torch.testing.assert_close(alphas.sum(-1), torch.ones(3, 7))
    assert (alphas >= 0).all()


@pytest.mark.parametrize("deep_output", [False, True])
def test_hoisted_forward_matches_step_loop(deep_output):
    dec = make("soft_attention", deep_output=deep_output)
    feats, caps = torch.randn(4, N, D), captions(4, 9)
    fast, fa = dec(feats, caps)
    slow, sa = dec.forward_stepwise(feats, caps)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)
    torch.testing.assert_close(fa, sa, rtol=0, atol=1e-6)


@pytest.mark.parametrize("packed", [True, False], ids=["lengths", "all-steps"])
@pytest.mark.parametrize("name", list_decoders())
def test_forward_equals_stepwise(name, packed):
    """Every decoder's teacher-forced `forward` (fast where it has one) is its step loop."""
    dec = make(name)
    feats, caps = torch.randn(4, N, D), captions(4, 9)
    lengths = torch.tensor([9, 3, 6, 1])
    fast, fa = dec(feats, caps, lengths=lengths if packed else None)
    slow, sa = dec.forward_stepwise(feats, caps)
    real = torch.arange(9) < lengths.unsqueeze(1) if packed else torch.ones(4, 9, dtype=bool)
    torch.testing.assert_close(fast[real], slow[real], rtol=0, atol=1e-5)
    if sa is None:
        assert fa is None
    else:
        torch.testing.assert_close(fa[real], sa[real], rtol=0, atol=1e-6)


# hard attention samples its regions in training: its two paths draw different ones
@pytest.mark.parametrize("name", [n for n in list_decoders() if n != "hard_attention"])
def test_forward_gradients_equal_stepwise(name):
    """Training through the fast path is training through the step loop: same gradients."""
    grads = []
    for path in ("forward", "forward_stepwise"):
        dec = make(name)
        feats, caps = torch.randn(4, N, D), captions(4, 9)
        lengths = torch.tensor([9, 3, 6, 1])
        real = torch.arange(9) < lengths.unsqueeze(1)
        if path == "forward":
            logits, _ = dec(feats, caps, lengths=lengths)
        else:
            logits, _ = dec.forward_stepwise(feats, caps)
        logits[real].logsumexp(-1).sum().backward()
        grads.append({k: p.grad.clone() for k, p in dec.named_parameters() if p.grad is not None})
    fast, slow = grads
    assert fast.keys() == slow.keys() and fast
    for k in fast:
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-4, atol=1e-5, msg=k)


# hard attention samples regions: its two calls would draw different ones
@pytest.mark.parametrize("name", [n for n in list_decoders() if n != "hard_attention"])
def test_forward_grouped_equals_copied_images(name):
    """forward(..., group=G) with one feature row per image is forward with each image copied
    G times (self-critical's samples): same logits, alphas and gradients."""
    G, lengths = 3, torch.tensor([9, 3, 6, 1, 9, 2])
    caps = captions(6, 9)
    real = torch.arange(9) < lengths.unsqueeze(1)
    outs = []
    for grouped in (True, False):
        dec = make(name)
        feats = torch.randn(2, N, D, generator=torch.Generator().manual_seed(2))
        feats.requires_grad_(True)
        logits, alphas = (
            dec(feats, caps, lengths=lengths, group=G)
            if grouped
            else dec(feats.repeat_interleave(G, dim=0), caps, lengths=lengths)
        )
        logits[real].logsumexp(-1).sum().backward()
        grads = {k: p.grad for k, p in dec.named_parameters() if p.grad is not None}
        outs.append((logits[real], None if alphas is None else alphas[real], feats.grad, grads))
    (a, aa, af, ag), (b, ba, bf, bg) = outs
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    if ba is not None:
        torch.testing.assert_close(aa, ba, rtol=0, atol=1e-6)
    torch.testing.assert_close(af, bf, rtol=1e-4, atol=1e-5)
    assert ag.keys() == bg.keys() and ag
    for k in ag:
        torch.testing.assert_close(ag[k], bg[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("name", list_decoders())
def test_forward_group_must_account_for_every_caption(name):
    with pytest.raises(ValueError, match="3 per image"):
        make(name)(torch.randn(2, N, D), captions(5, 4), group=3)


def test_regularizer_masks_padding():
    dec = make("soft_attention")
    alphas = torch.full((2, 4, N), 1.0 / N)
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    reg = dec.regularizer(alphas, mask)
    # coverage per region: 4/N for row 0, 2/N for row 1
    expected = ((1 - 4 / N) ** 2 + (1 - 2 / N) ** 2) / 2
    assert reg.item() == pytest.approx(expected, rel=1e-6)


def test_updown_regularizer_is_off_unless_asked():
    alphas = torch.full((2, 4, N), 1.0 / N)
    mask = torch.ones(2, 4)
    assert make("updown").regularizer(alphas, mask).item() == 0.0
    reg = make("updown", alpha_c=2.0).regularizer(alphas, mask)
    assert reg.item() == pytest.approx(2.0 * (1 - 4 / N) ** 2, rel=1e-6)


@pytest.mark.parametrize("name", list_decoders())
def test_beam_one_is_greedy(name):
    dec = make(name)
    feats = torch.randn(5, N, D)
    g = greedy_search(dec, feats, start_id=1, end_id=2, max_len=12)
    b = beam_search(dec, feats, beam_size=1, start_id=1, end_id=2, max_len=12)
    assert [h.tokens for h in g] == [bs[0].tokens for bs in b]
    for h, bs in zip(g, b, strict=True):
        assert h.logprob == pytest.approx(bs[0].logprob, abs=1e-4)


def test_beam_search_batched_equals_one_at_a_time():
    dec = make("soft_attention")
    feats = torch.randn(4, N, D)
    batched = beam_search(dec, feats, beam_size=3, start_id=1, end_id=2, max_len=10)
    for i in range(4):
        single = beam_search(dec, feats[i : i + 1], beam_size=3, start_id=1, end_id=2, max_len=10)
        assert [h.tokens for h in single[0]] == [h.tokens for h in batched[i]]


def test_beam_search_returns_sorted_beams_with_attention():
    dec = make("soft_attention")
    beams = beam_search(dec, torch.randn(2, N, D), beam_size=4, start_id=1, end_id=2, max_len=8)
    for bs in beams:
        assert len(bs) == 4
        scores = [h.score for h in bs]
        assert scores == sorted(scores, reverse=True)
        for h in bs:
            assert len(h.tokens) <= 8
            assert h.alphas.shape == (len(h.tokens), N)
            assert 2 not in h.tokens and 1 not in h.tokens


def test_beam_search_not_worse_than_greedy_in_logprob():
    """With no length normalisation, the best beam is at least as likely as the greedy path."""
    dec = make("soft_attention")
    feats = torch.randn(6, N, D)
    g = greedy_search(dec, feats, start_id=1, end_id=2, max_len=10)
    b = beam_search(dec, feats, beam_size=5, start_id=1, end_id=2, max_len=10, length_penalty=0.0)
    for h, bs in zip(g, b, strict=True):
        assert bs[0].logprob >= h.logprob - 1e-5


def test_generate_rejects_bad_beam():
    with pytest.raises(ValueError):
        generate(make("merge"), torch.randn(1, N, D), beam_size=0, start_id=1, end_id=2)


def test_unknown_decoder_lists_choices():
    with pytest.raises(ConfigError, match="merge.*show_tell.*soft_attention"):
        build_decoder("transformer", vocab_size=V, encoder_dim=D)


def test_unknown_decoder_option_is_config_error():
    with pytest.raises(ConfigError, match="soft_attention"):
        build_decoder("soft_attention", vocab_size=V, encoder_dim=D, hiden_dim=3)


def test_options_of_other_decoders_are_dropped_not_typos():
    """experiment=flickr8k decoder=show_tell: attention options do not break the swap."""
    dec = build_decoder("show_tell", vocab_size=V, encoder_dim=D, attention_dim=8, alpha_c=1.0)
    assert type(dec).__name__ == "ShowTellDecoder"
    with pytest.raises(ConfigError, match="attention_dims"):
        build_decoder("show_tell", vocab_size=V, encoder_dim=D, attention_dims=8)
