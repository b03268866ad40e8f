"""Vocabulary: built from training captions, round trip, <unk>, truncation."""

from captioning.vocab import Vocab, tokenize


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A Dog, running!  On the beach.") == [
        "a",
        "dog",
        "running",
        "on",
        "the",
        "beach",
    ]


def test_build_min_freq_and_deterministic_order():
    caps = ["a dog runs", "a dog sits", "a cat"]
    v = Vocab.build(caps, min_freq=2)
    assert v.itos[4:] == ["a", "dog"]
    assert Vocab.build(list(reversed(caps)), min_freq=2).itos == v.itos


def test_encode_decode_round_trip_and_unk():
    v = Vocab.build(["a red circle", "a blue square"])
    ids = v.encode("A red square!")
    assert ids[0] == v.start_id and ids[-1] == v.end_id
    assert v.decode(ids) == "a red square"
    assert v.encode("a green circle")[2] == v.unk_id
    assert v.decode(v.encode("a green circle")) == "a <unk> circle"


def test_truncation_to_max_len():
    v = Vocab.build(["one two three four five"], max_len=3)
    assert v.decode(v.encode("one two three four five")) == "one two three"
    assert len(v.encode("one two three four five")) == 5


def test_dict_round_trip():
    v = Vocab.build(["a red circle left of a blue square"], max_len=7)
    w = Vocab.from_dict(v.to_dict())
    assert w.itos == v.itos and w.max_len == 7
