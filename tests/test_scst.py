"""Self-critical training and hard attention: loss signs, sampling distributions, wiring."""

import math

import pytest
import torch
from torch import Tensor

from captioning.decoders import Decoder, build_decoder, list_decoders
from captioning.decoding import generate, sample
from captioning.errors import ConfigError
from captioning.metrics import CiderD, bleu, sentence_bleu
from captioning.scst import (
    END_WORD,
    baseline_rewards,
    check_config,
    reward_scorer,
    rewards_of,
    scst_loss,
    self_critical_step,
    sequence_log_probs,
)
from captioning.vocab import Vocab


def toy_vocab() -> Vocab:
    return Vocab.build(["a red circle", "a blue square", "a green triangle left"], min_freq=1)


@pytest.mark.parametrize("flip", [False, True])
def test_scst_loss_pushes_up_the_sample_with_the_higher_reward(flip):
    """One SGD step on the loss raises log p of the better sample and lowers the worse one's."""
    logits = torch.zeros(4, requires_grad=True)  # a one-word policy over 4 words
    tokens = torch.tensor([1, 2])  # two samples
    rewards = torch.tensor([[0.0, 1.0]] if flip else [[1.0, 0.0]])  # (B=1, S=2)
    advantage = (rewards - baseline_rewards(rewards, None, "mean")).flatten()
    logp = logits.log_softmax(0)[tokens].unsqueeze(1)  # (R, T=1)
    before = logp.detach().clone()
    scst_loss(logp, torch.ones_like(logp), advantage).backward()
    with torch.no_grad():
        logits -= 1.0 * logits.grad
    after = logits.log_softmax(0)[tokens].unsqueeze(1)
    better, worse = (1, 0) if flip else (0, 1)
    assert after[better] > before[better]
    assert after[worse] < before[worse]


def test_baselines():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 3.0]])
    greedy = torch.tensor([0.5, 1.0])
    torch.testing.assert_close(baseline_rewards(rewards, greedy, "greedy")[:, 2], greedy)
    mean = baseline_rewards(rewards, None, "mean")  # the other samples' mean
    torch.testing.assert_close(mean, torch.tensor([[2.5, 2.0, 1.5], [1.5, 1.5, 0.0]]))
    with pytest.raises(ConfigError):
        check_config({"baseline": "max"})
    with pytest.raises(ConfigError):
        check_config({"baseline": "mean", "samples": 1})


def test_loss_ignores_padding_and_carries_no_gradient_into_the_reward():
    logp = torch.tensor([[-1.0, -2.0, -5.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv = torch.tensor([2.0], requires_grad=True)
    loss = scst_loss(logp, mask, adv)
    assert math.isclose(float(loss.detach()), 2.0 * 3.0 / 2)
    loss.backward()
    assert logp.grad[0, 2] == 0 and adv.grad is None


class FixedDecoder(Decoder):
    """Same next-word distribution at every step: softmax(`logits`)."""

    def __init__(self, logits: Tensor):
        super().__init__()
        self.logits = logits

    def prepare(self, feats):
        return (feats,)

    def init_state(self, memory):
        return (memory[0].new_zeros(memory[0].size(0), 1),)

    def step(self, tokens, state, memory):
        return self.logits.expand(tokens.size(0), -1), state, None


def test_samples_follow_the_decoder_distribution_and_end_properly():
    V, end, pad, start, banned = 6, 2, 0, 1, (0, 1, 3)
    logits = torch.tensor([0.0, 0.0, 0.5, 3.0, 1.0, 0.0])
    torch.manual_seed(0)
    toks = sample(
        FixedDecoder(logits),
        torch.zeros(400, 1, 1),
        num_samples=5,
        start_id=start,
        end_id=end,
        pad_id=pad,
        max_len=4,
        banned=banned,
    )  # (2000, <= 5)
    first = toks[:, 0]
    allowed = logits.clone()
    allowed[list(banned)] = -math.inf
    expected = allowed.softmax(0)
    freq = torch.bincount(first, minlength=V).float() / first.numel()
    assert (freq - expected).abs().max() < 0.04  # 2000 draws: ~4 standard errors
    assert not torch.isin(toks, torch.tensor([start, 3])).any()  # banned words never drawn
    for row in toks.tolist():
        n = row.index(end)  # every sample ends, within max_len words
        assert n <= 4 and all(t == pad for t in row[n + 1 :]) and pad not in row[:n]


@pytest.mark.parametrize("name", list_decoders())
def test_rows_that_leave_the_batch_change_no_draw(name):
    """sample(compact=True) steps only the samples still going; with the same seed it draws
    what stepping every row to the batch's last word draws (state rows stay with their
    images as others leave)."""
    torch.manual_seed(0)
    vocab = toy_vocab()
    dec = build_decoder(name, len(vocab), 12, embed_dim=8, hidden_dim=16).eval()
    feats = torch.randn(7, 5, 12)
    kw = dict(num_samples=4, start_id=vocab.start_id, end_id=vocab.end_id, pad_id=vocab.pad_id)
    draws = []
    for compact in (True, False):
        torch.manual_seed(3)
        draws.append(sample(dec, feats, max_len=12, banned=vocab.banned(), compact=compact, **kw))
    lengths = (draws[0] != vocab.pad_id).sum(1)
    assert lengths.min() < lengths.max() - 2  # rows did leave the batch early
    assert torch.equal(draws[0], draws[1])


@pytest.mark.parametrize("samples", [1, 3])
@pytest.mark.parametrize("name", list_decoders())
def test_sequence_log_probs_equal_the_stepwise_log_probs(name, samples):
    """With several samples per image, each image's regions are prepared once (group=S): the
    log-probabilities are still those of stepping each sample with its own copy."""
    torch.manual_seed(0)
    vocab = toy_vocab()
    dec = build_decoder(name, len(vocab), 12, embed_dim=8, hidden_dim=16).eval()
    feats = torch.randn(6 // samples, 5, 12)
    banned = vocab.banned()
    toks = sample(
        dec,
        feats,
        num_samples=samples,
        start_id=vocab.start_id,
        end_id=vocab.end_id,
        pad_id=vocab.pad_id,
        max_len=6,
        banned=banned,
    )
    logp, mask = sequence_log_probs(dec, feats, toks, vocab, banned, group=samples)
    # the same by stepping, each sample with its own copy of its image
    memory = dec.prepare(feats.repeat_interleave(samples, dim=0))
    state = dec.init_state(memory)
    tok = torch.full((6,), vocab.start_id)
    ref = torch.zeros_like(logp)
    with torch.no_grad():
        for t in range(toks.size(1)):
            out, state, _ = dec.step(tok, state, memory)
            out = out.clone()
            out[:, list(banned)] = -math.inf
            ref[:, t] = out.log_softmax(-1).gather(1, toks[:, t : t + 1]).squeeze(1)
            tok = toks[:, t]
    torch.testing.assert_close(logp, ref.masked_fill(~mask, 0.0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list_decoders())
def test_self_critical_step_rewards_come_from_training_references(name):
    torch.manual_seed(0)
    vocab = toy_vocab()
    dec = build_decoder(name, len(vocab), 12, embed_dim=8, hidden_dim=16)
    refs = {"x": ["a red circle"], "y": ["a blue square"], "z": ["a green triangle left"]}
    cider = CiderD(refs)
    for baseline in ("greedy", "mean"):
        cfg = check_config({"samples": 4, "baseline": baseline})
        loss, stats = self_critical_step(
            dec, torch.randn(2, 5, 12), ["x", "y"], vocab, cider, cfg, vocab.banned()
        )
        loss.backward()
        assert torch.isfinite(loss) and stats["reward"] >= 0
        assert dec.training  # restored after the dropout-free sampling
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in dec.parameters())
        dec.zero_grad()


def test_rewards_mix_cider_and_sentence_bleu4():
    refs = {
        "x": ["a dog runs on the grass", "a brown dog running in a field"],
        "y": ["two people ride bikes down a street", "people cycling on a road"],
    }
    cider = CiderD(refs, tokenized=True)
    caps, keys = (
        ["a dog runs on the grass", "a dog in a field", "people ride bikes on grass"],
        list("xxy"),
    )
    ciders = torch.tensor(cider.score_each(caps, keys, tokenized=True))
    bleus = torch.tensor([bleu({k: c}, refs)[1][k][3] for c, k in zip(caps, keys, strict=True)])
    assert [sentence_bleu(c, refs[k]) for c, k in zip(caps, keys, strict=True)] == pytest.approx(
        bleus.tolist()
    )
    assert bleus[0] > 0.99 and bleus[2] < 0.01  # exact reference; no 4-gram match
    only_cider = rewards_of(caps, keys, cider, check_config({}))
    assert only_cider.tolist() == pytest.approx(ciders.tolist(), rel=1e-6)
    mixed = rewards_of(caps, keys, cider, check_config({"cider_weight": 0.5, "bleu4_weight": 2}))
    assert mixed.tolist() == pytest.approx((0.5 * ciders + 2 * bleus).tolist(), rel=1e-6)
    with pytest.raises(ConfigError):
        check_config({"cider_weight": 0, "bleu4_weight": 0})
    with pytest.raises(ConfigError):
        check_config({"bleu4_weight": -1})


def test_score_end_costs_a_caption_cut_off_mid_phrase_more():
    """With scst.score_end the reward sees the end: "... in front of a <end>" matches no reference."""
    refs = {
        "x": [
            "a man stands in front of a building",
            "a man in a coat stands in front of a shop",
            "a man is standing in front of a store",
            "a man waits in front of a door",
        ],
        "y": ["a dog runs on the grass", "a brown dog running in a field"],
        "z": ["two people ride bikes down a street", "people cycling on a road"],
    }
    pairs = [  # (whole, cut off)
        ("a man stands in front of a building", "a man stands in front of a"),
        ("a man is standing in front of a store", "a man is standing in front of a"),
        ("a dog runs on the grass", "a dog runs on the"),
    ]
    keys = ["x", "x", "y"]
    for bleu4_weight in (0.0, 1.0):
        gaps = {}
        for score_end in (False, True):
            cfg = check_config({"score_end": score_end, "bleu4_weight": bleu4_weight})
            cider = reward_scorer(refs, cfg)
            assert all(r.endswith(f" {END_WORD}") == score_end for r in cider.refs["x"])
            whole = rewards_of([w for w, _ in pairs], keys, cider, cfg)
            cut = rewards_of([c for _, c in pairs], keys, cider, cfg)
            gaps[score_end] = whole - cut
        assert (gaps[True] > gaps[False] + 0.2).all(), gaps
    assert check_config({})["score_end"] is False  # the reward as before unless asked for


# -- hard attention ----------------------------------------------------------------------------


def hard_decoder(**kw) -> Decoder:
    return build_decoder(
        "hard_attention", 30, 12, embed_dim=8, hidden_dim=16, attention_dim=8, **kw
    )


def test_hard_attention_samples_regions_from_its_distribution():
    torch.manual_seed(0)
    dec = hard_decoder()
    alpha = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]]).expand(20000, -1)
    freq = torch.bincount(dec.sample_regions(alpha), minlength=5).float() / 20000
    assert (freq - alpha[0]).abs().max() < 0.015  # ~4 standard errors
    assert freq[4] == 0  # a region of probability 0 is never chosen


def test_hard_attention_context_is_one_region_in_training():
    torch.manual_seed(0)
    dec = hard_decoder(soft_mix=0.0, dropout=0.0, gate=False).train()
    feats = torch.randn(4, 5, 12)
    alpha = torch.rand(4, 5).softmax(1)
    context, logp_s, _ = dec._hard_context(feats, alpha)
    chosen = (context.unsqueeze(1) == feats).all(2)  # (4, 5): which region was copied
    assert (chosen.sum(1) == 1).all()
    torch.testing.assert_close(logp_s, alpha[chosen].log())
    dec.eval()
    expected, _, _ = dec._hard_context(feats, alpha)
    torch.testing.assert_close(expected, torch.bmm(alpha.unsqueeze(1), feats).squeeze(1))


def test_hard_attention_reinforce_raises_the_sampled_region_when_the_caption_did_well():
    """The REINFORCE term pushes log p(s) up for above-baseline captions, down for below."""
    torch.manual_seed(0)
    dec = hard_decoder(soft_mix=0.0, entropy_weight=0.0, dropout=0.0)
    dec.baseline.fill_(-2.0)
    dec.baseline_ready.fill_(True)
    feats, inputs = torch.randn(2, 5, 12), torch.randint(4, 30, (2, 3))
    dec(feats, inputs)
    logp_s = dec._last[0]
    mask = torch.ones(2, 3)
    token_logp = torch.tensor([[-1.0] * 3, [-3.0] * 3])  # row 0 above the baseline, row 1 below
    loss = dec.attention_loss(token_logp, mask)
    g = torch.autograd.grad(loss, logp_s)[0]
    assert (g[0] < 0).all() and (g[1] > 0).all()  # descent raises row 0's, lowers row 1's
    assert math.isclose(float(dec.baseline), 0.9 * -2.0 + 0.1 * -2.0)


def test_hard_attention_decodes_with_beam_search():
    torch.manual_seed(0)
    for inference in ("expectation", "argmax"):
        dec = hard_decoder(inference=inference).eval()
        feats = torch.randn(3, 5, 12)
        kw = dict(start_id=1, end_id=2, pad_id=0, max_len=6, banned=(0, 1))
        greedy = generate(dec, feats, beam_size=1, **kw)
        again = generate(dec, feats, beam_size=1, **kw)
        assert [g[0].tokens for g in greedy] == [g[0].tokens for g in again]  # deterministic
        beams = generate(dec, feats, beam_size=3, **kw)
        assert all(len(b) == 3 and all(math.isfinite(h.score) for h in b) for b in beams)
        assert all(b[0].alphas is not None for b in beams)  # attention maps for the app
