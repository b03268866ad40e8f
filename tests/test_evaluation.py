"""Caption statistics beside the scores: length, vocabulary, repetition, captions cut off."""

import pytest

from captioning.evaluation import caption_stats


def test_caption_stats_count_what_the_scores_miss():
    preds = {
        1: "a dog runs on the grass",
        2: "a man stands in front of a",  # cut off mid-phrase
        3: "a dog runs on the grass",  # the same caption as image 1
        4: "two children play in the",  # cut off
    }
    stats = caption_stats(preds)
    assert stats["mean_words"] == pytest.approx((6 + 7 + 6 + 5) / 4)
    assert stats["distinct_words"] == len(
        {"a", "dog", "runs", "on", "the", "grass", "man", "stands", "in", "front", "of"}
        | {"two", "children", "play"}
    )
    assert stats["distinct_captions"] == pytest.approx(2 / 4)  # images 2 and 4 alone
    assert stats["ends_mid_phrase"] == pytest.approx(2 / 4)
    assert caption_stats({1: "a brown dog"})["ends_mid_phrase"] == 0.0
    assert caption_stats({})["mean_words"] == 0.0
