"""decode.no_repeat_ngram: greedy and beam search never repeat an n-gram of the hypothesis."""

import pytest
import torch

from captioning.decoders import Decoder, build_decoder
from captioning.decoding import beam_search, block_repeated_ngrams, generate, greedy_search

PAD, START, END = 0, 1, 2
V = 8


class Chain(Decoder):
    """Next-word scores that depend on the previous word only: its argmax says 3 4 3 4 ..."""

    def __init__(self):
        super().__init__()
        table = torch.full((V, V), -9.0)
        prefs = {  # previous word: the next words, most likely first
            START: [3],
            3: [4, 5, END],
            4: [3, 6, END],
            5: [3, END],
            6: [END, 7],
            7: [END],
        }
        for prev, nexts in prefs.items():
            for rank, w in enumerate(nexts):
                table[prev, w] = 5.0 - 3.0 * rank
        self.register_buffer("table", table)

    def init_state(self, memory):
        return (memory[0].new_zeros(memory[0].size(0), 1),)

    def step(self, tokens, state, memory):
        return self.table[tokens], state, None


def greedy_words(n: int, max_len: int = 10) -> list[int]:
    feats = torch.zeros(1, 1, 1)
    hyp = greedy_search(Chain(), feats, start_id=START, end_id=END, max_len=max_len,
                        no_repeat_ngram=n)[0]  # fmt: skip
    return hyp.tokens


def ngrams(tokens: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def test_block_repeated_ngrams_blocks_the_completing_words():
    seqs = torch.tensor([[3, 4, 3, 5, 3], [3, 4, 5, 6, 7]])
    logp = block_repeated_ngrams(torch.zeros(2, V), seqs, 2)
    # row 0 ends on 3, which was followed by 4 and 5; row 1 ends on 7, never seen before
    assert (logp[0] == float("-inf")).nonzero().flatten().tolist() == [4, 5]
    assert (logp[1] == 0).all()
    one = block_repeated_ngrams(torch.zeros(2, V), seqs, 1)
    assert (one[1] == float("-inf")).nonzero().flatten().tolist() == [3, 4, 5, 6, 7]
    assert (block_repeated_ngrams(torch.zeros(2, V), seqs, 0) == 0).all()
    assert (block_repeated_ngrams(torch.zeros(2, V), seqs, 6) == 0).all()  # longer than seqs


def test_greedy_repeats_without_it_and_not_with_it():
    assert greedy_words(0) == [3, 4] * 5  # the argmax loops until max_len
    assert greedy_words(2) == [3, 4, 3, 5, 3]  # then 3 -> 4 and 3 -> 5 are both taken: <end>
    assert greedy_words(3) == [3, 4, 3, 4, 6]  # 4 -> 3 would repeat "3 4 3"
    assert greedy_words(1) == [3, 4, 6]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_beam_search_repeats_without_it_and_not_with_it(n):
    feats = torch.zeros(2, 1, 1)
    opts = dict(beam_size=3, start_id=START, end_id=END, pad_id=PAD, max_len=10)
    free = beam_search(Chain(), feats, **opts)
    grams = ngrams(free[0][0].tokens, n)
    assert len(set(grams)) < len(grams), free[0][0].tokens  # the best beam loops "3 4 3 4 .."
    blocked = beam_search(Chain(), feats, no_repeat_ngram=n, **opts)
    assert blocked[0][0].tokens != free[0][0].tokens
    for beams in blocked:
        assert len(beams) == 3
        for h in beams:
            grams = ngrams(h.tokens, n)
            assert len(grams) == len(set(grams)), h.tokens


def decoder_and_feats():
    torch.manual_seed(0)
    dec = build_decoder("soft_attention", vocab_size=12, encoder_dim=6, embed_dim=8,
                        hidden_dim=16, attention_dim=8, dropout=0.0).eval()  # fmt: skip
    with torch.no_grad():
        dec.fc.weight.mul_(4.0)  # peaked: a small vocabulary soon repeats itself
        dec.fc.bias[END] -= 2.0  # and runs long
    return dec, torch.randn(9, 5, 6) * 2


@pytest.mark.parametrize("beam", [1, 3])
def test_off_by_default_and_when_no_ngram_can_repeat(beam):
    dec, feats = decoder_and_feats()
    opts = dict(beam_size=beam, start_id=START, end_id=END, max_len=8, banned=(PAD, START))
    default = generate(dec, feats, **opts)
    assert any(len(set(ngrams(b[0].tokens, 2))) < len(ngrams(b[0].tokens, 2)) for b in default)
    for n in (0, 10):  # off; longer than any caption
        same = generate(dec, feats, no_repeat_ngram=n, **opts)
        for a, b in zip(default, same, strict=True):
            assert [h.tokens for h in a] == [h.tokens for h in b]
            assert [h.score for h in a] == [h.score for h in b]


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("beam", [1, 3])
def test_no_caption_repeats_an_ngram(beam, n):
    """On a decoder that repeats itself: no beam repeats, and batching changes nothing."""
    dec, feats = decoder_and_feats()
    opts = dict(beam_size=beam, start_id=START, end_id=END, max_len=8, banned=(PAD, START))
    batched = generate(dec, feats, no_repeat_ngram=n, chunk_size=4, **opts)
    for i, beams in enumerate(batched):
        for h in beams:
            grams = ngrams(h.tokens, n)
            assert len(grams) == len(set(grams)), h.tokens
        alone = generate(dec, feats[i : i + 1], no_repeat_ngram=n, **opts)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in beams]


def test_negative_is_an_error():
    with pytest.raises(ValueError, match="no_repeat_ngram"):
        generate(Chain(), torch.zeros(1, 1, 1), start_id=START, end_id=END, no_repeat_ngram=-1)


def test_the_decode_config_carries_it():
    from captioning.decoding import DecodeConfig

    assert DecodeConfig.from_dict({"beam_size": 3, "no_repeat_ngram": 2}).no_repeat_ngram == 2
    assert DecodeConfig.from_dict({"beam_size": 3}).no_repeat_ngram == 0
