"""Caption statistics beside the scores: length, vocabulary, repetition, captions cut off."""

import pytest

from captioning.evaluation import caption_stats, overall


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


def test_report_opens_with_the_scores_and_the_decoding(tmp_path_factory, data_cache, tmp_path):
    import sys

    from test_app import trained_checkpoint

    from conftest import ROOT, compose_cfg

    sys.path.insert(0, str(ROOT))
    import evaluate as evaluate_script

    ckpt = trained_checkpoint(tmp_path_factory, data_cache)
    cfg = compose_cfg(
        "evaluate",
        [
            f"ckpt_path={ckpt}",
            "split=val",
            "decode.beam_size=2",
            "decode.length_penalty=0.7",
            "decode.meteor=false",
            "report_examples=1",
        ],
        out=tmp_path,
        cache=data_cache,
    )
    scores = evaluate_script.evaluate(cfg)
    head = (tmp_path / "report.md").read_text().split("## Best captions")[0]
    assert "Split `val`, 32 images; decoding: beam 2, length penalty 0.7" in head
    table = [line for line in head.splitlines() if line.startswith("| ")]
    assert table[0] == "| BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | METEOR | ROUGE-L | CIDEr-D |"
    assert f"{scores['BLEU-4']:.4f}" in table[1] and "n/a" in table[1]  # METEOR was off
    assert "words on average" in head


def test_report_head_names_every_decoding_setting_that_changes_captions():
    scores = {"BLEU-4": 0.25, "CIDEr": 0.6}
    plain = overall(scores, {"beam_size": 5, "length_penalty": 0.4}, "test", 1000)[0]
    assert plain == "Split `test`, 1000 images; decoding: beam 5, length penalty 0.4."
    blocked = {"beam_size": 1, "no_repeat_ngram": 2, "max_len": 16}
    head = overall(scores, blocked, "val", 10)[0]
    assert head == "Split `val`, 10 images; decoding: greedy, at most 16 words, no repeated 2-gram."


def test_rank_examples_with_none_asked_shows_none():
    from captioning.evaluation import rank_examples

    per_image = {"a": {"CIDEr": 1.0}, "b": {"CIDEr": 0.5}, "c": {"CIDEr": 0.1}}
    assert rank_examples(per_image, n=0) == ([], [])
    assert rank_examples(per_image, n=1) == (["a"], ["c"])
