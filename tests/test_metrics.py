"""captioning.metrics and .tokenizer: hand-computed cases, equality with pycocoevalcap (coco-caption)."""

import csv
import json
import math
import random
import shutil
from pathlib import Path

import pytest

from captioning import meteor as MET
from captioning import metrics as M
from captioning.errors import DataError, UserError
from captioning.tokenizer import tokenize, tokenize_caption

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FLICKR = SHARED / "data" / "flickr8k"
HAS_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="needs Java (the reference PTBTokenizer)")


def coco():
    """pycocoevalcap's scorers, or skip: it is a dev dependency only."""
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    return Bleu, Rouge, Cider


def ptb_tokenize(captions: dict) -> dict:
    """pycocoevalcap's Java PTBTokenizer on {id: [caption, ...]}."""
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})


def coco_eval(preds: dict, refs: dict, meteor: bool) -> dict:
    """The whole COCOEvalCap pipeline (Java tokenizer, then each scorer) on raw captions."""
    Bleu, Rouge, Cider = coco()
    gts = ptb_tokenize(refs)
    res = ptb_tokenize({k: [preds[k]] for k in refs})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"BLEU-{n + 1}": bleu[n] for n in range(4)}
    out["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = Cider().compute_score(gts, res)[0]
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        out["METEOR"] = scorer.compute_score(gts, res)[0]
        MET.close_meteor(scorer)
    return out


# --- tokenizer ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("A dog's ball, don't!", ["a", "dog", "'s", "ball", "do", "n't"]),
        ("Two  dogs\nplay  .", ["two", "dogs", "play"]),  # extra spaces, newline inside
        ("A well-known e-mail (test)", ["a", "well-known", "e-mail", "-lrb-", "test", "-rrb-"]),
        ("He said \"hi\" and 'bye'", ["he", "said", "hi", "and", "bye"]),
        ("Café CRÈME naïve", ["café", "crème", "naïve"]),
        ("grey colour", ["grey", "colour"]),  # no americanisation
        ("It cannot", ["it", "can", "not"]),
        ("1 1/2 cups, 3.5 m", ["1\xa01/2", "cups", "3.5", "m"]),  # the fraction keeps its space
        ("U.S. The end", ["u.s.", "the", "end"]),
        ("Vitamin C.", ["vitamin", "c"]),  # as when the next caption starts with "A "
        ("...", []),
        ("", []),
    ],
)
def test_tokenize_known_cases(text: str, tokens: list[str]) -> None:
    assert tokenize(text) == tokens


TRICKY = [
    "A dog's ball isn't red, don't you think?",
    "I can't believe it won't work; they'd've gone.",
    "She said \"hello\" and 'goodbye' to the man.",
    "“Curly quotes” and ‘single curly’ and it’s fine",
    "Mr. Smith went to Washington D.C. yesterday.",
    "I live in the U.S. He is here.",
    "a well-known man with a e-mail and x-ray, state-of-the-art",
    "3.5 inches, 1,000 dogs and 10:30 am; 1/2 of 3/4 and 1 1/2 cups ½ cup",
    "$5.00 and US$10 and £3 and €4 and ¢ and 50% & 3 + 4 = 7",
    "call 555-123-4567 or (555) 123-4567 now",
    "email john.doe@example.com, see http://www.example.com/path?q=1 or foo.org",
    "#hashtag @user a -- b --- c - d ---- e wait... what.... ok . . . fine",
    "Hello!!! What?! (a dog) [a cat] {a bird} <a fish> <b>bold</b>",
    "café naïve résumé Ñandú Straße İstanbul ΣΊΣΥΦΟΣ кириллица 中文 😀 emoji",
    "tab\tseparated   multiple    spaces\u00a0nbsp",
    "o'clock O'Neill d'Artagnan rock'n'roll '90s y'all 'Tis 'twas gonna wanna",
    "I'M YOU'RE DON'T CAN'T the dogs' ball the boss's desk",
    "&amp; &lt; &gt; &quot; &apos; &nbsp; AT&T S&P 500 Q&A",
    "Jan. 5 etc. and so on e.g. this i.e. that No. 5 fig. 3",
    "a 2-year-old in a T-shirt :) ;-) ^_^ 1a.jpg my_file.txt",
    "-LRB- pro- anti- Cap'n c'est 5'10\" tall",
    "",
    "...",
    "vitamin C.",
    "see fig.",
    "end with abbreviation etc.",
]


@needs_java
def test_tokenizer_matches_ptbtokenizer() -> None:
    # PTBTokenizer reads the captions as consecutive lines and a few rules look into the next
    # one; tokenize assumes the next caption starts with "A ", so put one after each string.
    lines = [line for text in TRICKY for line in (text, "A dog.")]
    expected = ptb_tokenize({0: lines})[0][::2]
    for text, tokens in zip(TRICKY, expected, strict=True):
        assert tokenize_caption(text) == tokens, text


# --- BLEU -----------------------------------------------------------------------------------


def test_bleu_by_hand() -> None:
    # candidate "the cat sat on the mat", reference "the cat is on the mat" (6 words each):
    # unigrams: the x2 (ref has 2), cat, on, mat match; sat does not -> 5/6
    # bigrams: the cat, on the, the mat match of 5 -> 3/5; BLEU-2 = sqrt(5/6 * 3/5) = sqrt(1/2)
    scores, per_image = M.bleu({1: "the cat sat on the mat"}, {1: ["the cat is on the mat"]})
    assert scores[0] == pytest.approx(5 / 6, abs=1e-9)
    assert scores[1] == pytest.approx(math.sqrt(0.5), abs=1e-9)
    assert per_image[1][:2] == pytest.approx(scores[:2], abs=1e-12)  # one image: corpus = sentence


def test_bleu_brevity_penalty() -> None:
    # "the cat" against a 6-word reference: precision 1, BP = exp(1 - 6/2) = exp(-2)
    scores, _ = M.bleu({1: "the cat"}, {1: ["the cat sat on the mat"]})
    assert scores[0] == pytest.approx(math.exp(-2), abs=1e-9)


@pytest.mark.parametrize("refs", [["a b c d", "a b c d e f"], ["a b c d e f", "a b c d"]])
def test_bleu_closest_length_tie_takes_shorter_reference(refs: list[str]) -> None:
    # 5 words, references of 4 and 6 words are equally close: coco-caption takes 4, so there
    # is no brevity penalty (taking 6 would give exp(1 - 6/5) = 0.82)
    scores, _ = M.bleu({1: "a b c d e"}, {1: refs})
    assert scores[0] == pytest.approx(1.0, abs=1e-9)


# --- ROUGE-L --------------------------------------------------------------------------------


def test_rouge_l_by_hand() -> None:
    # "a b c d" vs "a c b d": LCS = 3 ("a c d"), P = R = 3/4, so F = 3/4 whatever beta is
    assert M.rouge_l({1: "a b c d"}, {1: ["a c b d"]})[0] == pytest.approx(0.75)
    # "a b" vs "a b c d": P = 1, R = 1/2, F = (1 + 1.44) * 1 * 0.5 / (0.5 + 1.44 * 1) = 1.22 / 1.94
    assert M.rouge_l({1: "a b"}, {1: ["a b c d"]})[0] == pytest.approx(1.22 / 1.94)


def test_lcs_matches_dynamic_programming() -> None:
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 12))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 12))]
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i in range(len(a)):
            for j in range(len(b)):
                table[i + 1][j + 1] = (
                    table[i][j] + 1 if a[i] == b[j] else max(table[i][j + 1], table[i + 1][j])
                )
        assert M._lcs_length(a, b) == table[-1][-1]


# --- CIDEr-D --------------------------------------------------------------------------------


def test_cider_identical_captions_score_ten() -> None:
    # Two images whose candidates equal their only reference and share no n-gram: every n-gram
    # has df 1 of 2 images, so both vectors are the same, cosine 1 for n = 1..4, no length
    # penalty, mean over n = 1, x10 -> 10. A one-word caption has only unigrams: 10 * 1/4.
    refs = {1: ["a b c d e"], 2: ["f g h i j"], 3: ["k"]}
    mean, per_image = M.CiderD(refs, tokenized=True).score({1: "a b c d e", 2: "f g h i j", 3: "k"})
    assert per_image == pytest.approx({1: 10.0, 2: 10.0, 3: 2.5})
    assert mean == pytest.approx(22.5 / 3)


def test_cider_training_document_frequencies() -> None:
    train = {1: ["a dog runs"], 2: ["a dog runs fast"]}
    cider = M.CiderD(train, tokenized=True)
    # every n-gram of "a dog runs" is in both training images: idf = log 2 - log 2 = 0
    assert cider.score({9: "a dog runs"}, refs={9: ["a dog runs"]})[0] == 0.0
    # n-grams unseen in training get the full idf, so an exact match still scores 10
    assert cider.score({9: "cats sit on mats"}, refs={9: ["cats sit on mats"]})[0] == pytest.approx(
        10.0
    )
    # by default the references given at construction are used
    assert cider.score({1: "a dog runs"}) == cider.score({1: "a dog runs"}, refs=train)


def test_cider_errors() -> None:
    with pytest.raises(DataError):
        M.CiderD({})
    with pytest.raises(DataError, match="no references"):
        M.CiderD({1: ["a"]}).score({2: "a"})


# --- equality with pycocoevalcap on fixed inputs --------------------------------------------

EDGE_REFS = {
    1: ["a cat sits on a mat", "the cat is on the red mat"],
    2: ["a dog runs", "a dog runs fast today ok"],
    3: ["one two three four", "one two three four five six"],  # 5-word candidate: a length tie
    4: ["Café au lait, s'il vous plaît!", "A naïve Zoë ate crème brûlée."],
    5: ["dog", "a dog"],
    6: ["...", "A dog."],  # a reference that tokenizes to nothing
    7: ['He said "hello" -- and (left).', "it's 1 1/2 cups; don't!"],
    8: ["a b c d e f g h", "h g f e d c b a"],
    9: ["A DOG RUNS.", "a dog, running"],
}
EDGE_PREDS = {
    1: "A cat is on the mat.",
    2: "",  # empty caption
    3: "one two three four five",
    4: "CAFÉ AU LAIT!!",
    5: "dog",  # one word
    6: "?!",
    7: "He said hello, don't (left) 1 1/2",
    8: "a",
    9: "a Dog runs .",  # case and punctuation variants
}


def test_scorers_match_pycocoevalcap() -> None:
    Bleu, Rouge, Cider = coco()
    res = {k: [tokenize_caption(v)] for k, v in EDGE_PREDS.items()}
    gts = {k: [tokenize_caption(c) for c in v] for k, v in EDGE_REFS.items()}
    flat = {k: v[0] for k, v in res.items()}

    bleu, bleu_images = Bleu(4).compute_score(gts, res, verbose=0)
    ours, ours_images = M.bleu(flat, gts)
    assert ours == pytest.approx(bleu, abs=1e-6)
    for n in range(4):
        assert [ours_images[k][n] for k in gts] == pytest.approx(bleu_images[n], abs=1e-6)

    rouge, rouge_images = Rouge().compute_score(gts, res)
    ours_rouge, ours_rouge_images = M.rouge_l(flat, gts)
    assert ours_rouge == pytest.approx(rouge, abs=1e-6)
    assert list(ours_rouge_images.values()) == pytest.approx(list(rouge_images), abs=1e-6)

    cider, cider_images = Cider().compute_score(gts, res)
    ours_cider, ours_cider_images = M.CiderD(gts, tokenized=True).score(flat)
    assert ours_cider == pytest.approx(cider, abs=1e-6)
    assert list(ours_cider_images.values()) == pytest.approx(list(cider_images), abs=1e-6)


@needs_java
def test_score_corpus_matches_coco_eval() -> None:
    ours = M.score_corpus(EDGE_PREDS, EDGE_REFS, meteor=False)
    expected = coco_eval(EDGE_PREDS, EDGE_REFS, meteor=False)
    for key in expected:
        assert ours[key] == pytest.approx(expected[key], abs=1e-6), key


@pytest.mark.slow  # starting METEOR's JVM takes 8-30 s
@needs_java
def test_meteor_runs_on_tokenized_captions_and_stops_the_jvm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    coco()
    if not MET.meteor_available():
        pytest.skip("METEOR jar not found")
    from pycocoevalcap.meteor import meteor as coco_meteor

    started = []

    class Recording(coco_meteor.Meteor):
        def __init__(self) -> None:
            super().__init__()
            started.append(self)

    monkeypatch.setattr(coco_meteor, "Meteor", Recording)
    scores = M.score_corpus(EDGE_PREDS, EDGE_REFS, meteor=None, per_image=True)
    assert 0.0 < scores["METEOR"] < 1.0
    assert scores["per_image"][2]["METEOR"] == 0.0  # the empty caption
    assert len(started) == 1 and started[0].meteor_p.returncode is not None


# --- score_corpus ---------------------------------------------------------------------------


def test_score_corpus_keys_and_per_image() -> None:
    preds = {"a.jpg": "a dog runs", "b.jpg": "a cat sleeps"}
    refs = {"a.jpg": ["a dog is running"], "b.jpg": ["the cat sleeps", "a cat naps"]}
    scores = M.score_corpus(preds, refs, meteor=False)
    assert tuple(scores) == M.METRIC_KEYS
    assert scores["METEOR"] is None
    assert all(0.0 <= scores[k] <= 1.0 for k in M.METRIC_KEYS if k not in ("METEOR", "CIDEr"))
    detailed = M.score_corpus(preds, refs, meteor=False, per_image=True)
    assert set(detailed["per_image"]) == set(preds)
    assert set(detailed["per_image"]["a.jpg"]) == set(M.METRIC_KEYS)
    mean_rouge = sum(v["ROUGE-L"] for v in detailed["per_image"].values()) / 2
    assert mean_rouge == pytest.approx(scores["ROUGE-L"])


def test_meteor_unavailable_is_none_not_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(MET.shutil, "which", lambda name: None)
    assert not MET.meteor_available()
    assert M.score_corpus({1: "a dog"}, {1: ["a dog"]})["METEOR"] is None
    with pytest.raises(UserError, match="METEOR needs Java"):
        M.score_corpus({1: "a dog"}, {1: ["a dog"]}, meteor=True)


def test_score_corpus_input_errors() -> None:
    with pytest.raises(DataError, match="no references"):
        M.score_corpus({1: "a"}, {2: ["a"]}, meteor=False)
    with pytest.raises(DataError, match="no prediction"):
        M.score_corpus({1: "a"}, {1: ["a"], 2: ["b"]}, meteor=False)
    assert M.score_corpus({1: "a"}, {1: ["a"], 2: ["b"]}, meteor=False, allow_missing=True)
    with pytest.raises(DataError, match="non-empty list"):
        M.score_corpus({1: "a"}, {1: []}, meteor=False)
    with pytest.raises(DataError, match="non-empty list"):
        M.score_corpus({1: "a"}, {1: "a"}, meteor=False)
    with pytest.raises(DataError, match="must be a str"):
        M.score_corpus({1: None}, {1: ["a"]}, meteor=False)
    with pytest.raises(DataError, match="no predictions"):
        M.score_corpus({}, {}, meteor=False)


# --- the whole Flickr8k test split and caption file against the Java pipeline -----------------


def flickr_test_split() -> tuple[dict, dict]:
    path = FLICKR / "dataset_flickr8k.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    images = [im for im in json.loads(path.read_text())["images"] if im["split"] == "test"]
    refs = {im["imgid"]: [s["raw"] for s in im["sentences"]] for im in images}
    ids = list(refs)
    rng = random.Random(0)
    preds = {}
    for i, key in enumerate(ids):
        own = refs[key]
        kind = i % 5
        if kind == 0:  # a reference of another image
            preds[key] = refs[ids[(i + 7) % len(ids)]][0]
        elif kind == 1:  # a shuffled reference
            words = own[1].split()
            rng.shuffle(words)
            preds[key] = " ".join(words)
        elif kind == 2:  # a truncated reference
            words = own[2].split()
            preds[key] = " ".join(words[: max(1, len(words) // 2)])
        elif kind == 3:  # a constant caption
            preds[key] = "A dog is running through the grass ."
        else:  # one of its own references
            preds[key] = own[0]
    return preds, refs


@pytest.mark.slow
@needs_java
def test_meteor_matches_coco_eval() -> None:
    coco()
    if not MET.meteor_available():
        pytest.skip("METEOR jar not found")
    ours = M.score_corpus(EDGE_PREDS, EDGE_REFS, meteor=True)
    assert ours["METEOR"] == pytest.approx(
        coco_eval(EDGE_PREDS, EDGE_REFS, True)["METEOR"], abs=1e-6
    )


@pytest.mark.slow
@needs_java
def test_flickr8k_test_split_matches_coco_eval() -> None:
    preds, refs = flickr_test_split()
    meteor = MET.meteor_available()
    ours = M.score_corpus(preds, refs, meteor=meteor)
    expected = coco_eval(preds, refs, meteor=meteor)
    assert len(refs) == 1000
    for key in expected:
        assert ours[key] == pytest.approx(expected[key], abs=1e-6), key


@pytest.mark.slow
@needs_java
def test_tokenizer_matches_ptbtokenizer_on_flickr8k_captions() -> None:
    path = FLICKR / "captions.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    with path.open(encoding="utf-8", newline="") as f:
        captions = [row["caption"] for row in csv.DictReader(f)]
    expected = ptb_tokenize({0: captions})[0]
    differ = [c for c, e in zip(captions, expected, strict=True) if tokenize_caption(c) != e]
    assert len(captions) == 40455
    assert differ == []
