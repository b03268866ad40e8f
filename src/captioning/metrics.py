"""Caption metrics equal to coco-caption's (pycocoevalcap): BLEU, ROUGE-L, CIDEr-D, `score_corpus`.

Everything here is pure Python, so validation can score every epoch without Java; METEOR, the
one metric that needs Java, lives in captioning.meteor and is optional. The numbers match
pycocoevalcap 1.2 to 1e-6 on the same inputs (see tests/test_metrics.py):

- captions are tokenised by captioning.tokenizer, a pure-Python copy of its `PTBTokenizer`;
- `bleu` is corpus BLEU with the "closest" reference length (ties go to the shorter reference)
  and pycocoevalcap's tiny/small smoothing constants.
- ROUGE-L uses beta=1.2, precision and recall each maximised over references.
- `CiderD` is pycocoevalcap's `Cider` (the "CIDEr" in coco-caption papers), which is CIDEr-D:
  clipped n-gram counts, a Gaussian length penalty (sigma=6) and a x10 scale.
- METEOR runs pycocoevalcap's Java METEOR 1.5 when Java and pycocoevalcap are installed;
  otherwise it is reported as None, never 0.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from captioning import meteor as _meteor_bridge
from captioning.errors import DataError
from captioning.tokenizer import tokenize_caption

__all__ = [
    "LOG_NAMES",
    "METRIC_KEYS",
    "CiderD",
    "bleu",
    "rouge_l",
    "score_corpus",
    "sentence_bleu",
]

# Each score's name as coco-caption prints it -> its name in training logs (`val/bleu4`,
# `test/rouge_l`). METRIC_KEYS, in coco-caption's order, are the keys of score_corpus's result,
# of metrics.json and of the score CLI's output.
LOG_NAMES = {
    "BLEU-1": "bleu1",
    "BLEU-2": "bleu2",
    "BLEU-3": "bleu3",
    "BLEU-4": "bleu4",
    "METEOR": "meteor",
    "ROUGE-L": "rouge_l",
    "CIDEr": "cider",
}
METRIC_KEYS = tuple(LOG_NAMES)


# ---------------------------------------------------------------------------------------------
# BLEU, ROUGE-L, CIDEr-D on tokenized captions (strings from tokenize_caption), written to give
# pycocoevalcap's numbers: same n-gram bookkeeping, same smoothing, same reductions.
# ---------------------------------------------------------------------------------------------

_TINY, _SMALL = 1e-15, 1e-9  # pycocoevalcap's BLEU constants: 0/0 precision gives 0, not NaN


@functools.lru_cache(maxsize=1 << 17)
def _ngrams(caption: str, n: int = 4) -> Counter[tuple[str, ...]]:
    """1..n-gram counts of a tokenized caption (cached: references recur every epoch; read-only)."""
    words = caption.split()
    counts: Counter[tuple[str, ...]] = Counter()
    for k in range(1, n + 1):
        counts.update(zip(*(words[i:] for i in range(k)), strict=False))  # shifted copies
    return counts


def bleu(
    preds: Mapping[Hashable, str], refs: Mapping[Hashable, Sequence[str]], n: int = 4
) -> tuple[list[float], dict[Hashable, list[float]]]:
    """Corpus BLEU-1..n and per-image sentence BLEU-1..n of tokenized captions (coco-caption)."""
    total_test = total_ref = 0
    total_guess, total_correct = [0] * n, [0] * n
    per_image: dict[Hashable, list[float]] = {}
    for key, hyp in preds.items():
        correct, guess, test_len, ref_len = _bleu_counts(hyp, refs[key], n)
        total_test += test_len
        total_ref += ref_len
        for k in range(n):
            total_guess[k] += guess[k]
            total_correct[k] += correct[k]
        per_image[key] = _bleu_from_counts(correct, guess, test_len, ref_len)
    return _bleu_from_counts(total_correct, total_guess, total_test, total_ref), per_image


def _bleu_counts(hyp: str, refs: Sequence[str], n: int) -> tuple[list[int], list[int], int, int]:
    """Clipped n-gram matches, n-gram counts, length and "closest" reference length of hyp."""
    max_counts: dict[tuple[str, ...], int] = {}
    ref_lens = []
    for ref in refs:
        ref_lens.append(len(ref.split()))
        for gram, count in _ngrams(ref, n).items():
            max_counts[gram] = max(max_counts.get(gram, 0), count)
    test_len = len(hyp.split())
    # "closest" reference length; on a tie the shorter reference wins (tuple order)
    ref_len = min((abs(length - test_len), length) for length in ref_lens)[1]
    guess = [max(0, test_len - k) for k in range(n)]
    correct = [0] * n
    for gram, count in _ngrams(hyp, n).items():
        correct[len(gram) - 1] += min(max_counts.get(gram, 0), count)
    return correct, guess, test_len, ref_len


def sentence_bleu(hyp: str, refs: Sequence[str], n: int = 4) -> float:
    """Sentence BLEU-n of one tokenized caption, as coco-caption scores each image."""
    return _bleu_from_counts(*_bleu_counts(hyp, refs, n))[n - 1]


def _bleu_from_counts(
    correct: list[int], guess: list[int], test_len: int, ref_len: int
) -> list[float]:
    scores, product = [], 1.0
    for k in range(len(correct)):
        product *= (float(correct[k]) + _TINY) / (float(guess[k]) + _SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + _TINY) / (ref_len + _SMALL)
    if ratio < 1:  # brevity penalty
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence length, bit-parallel (Allison-Dix/Hyyro) over `a`."""
    masks: dict[str, int] = {}
    for i, word in enumerate(a):
        masks[word] = masks.get(word, 0) | (1 << i)
    full = v = (1 << len(a)) - 1
    for word in b:
        u = v & masks.get(word, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l(
    preds: Mapping[Hashable, str], refs: Mapping[Hashable, Sequence[str]], beta: float = 1.2
) -> tuple[float, dict[Hashable, float]]:
    """Mean and per-image ROUGE-L of tokenized captions, as coco-caption computes it."""
    per_image: dict[Hashable, float] = {}
    for key, hyp in preds.items():
        cand = hyp.split(" ")  # " " and not whitespace: an empty caption is one empty token
        prec_max = rec_max = 0.0
        for ref in refs[key]:
            ref_words = ref.split(" ")
            lcs = _lcs_length(ref_words, cand)
            # precision and recall are maximised separately, possibly over different references
            prec_max = max(prec_max, lcs / float(len(cand)))
            rec_max = max(rec_max, lcs / float(len(ref_words)))
        if prec_max != 0 and rec_max != 0:
            per_image[key] = ((1 + beta**2) * prec_max * rec_max) / float(
                rec_max + beta**2 * prec_max
            )
        else:
            per_image[key] = 0.0
    return float(np.mean(np.array(list(per_image.values())))), per_image


class _TfIdf(NamedTuple):
    vec: list[dict[tuple[str, ...], float]]  # per n-gram order: n-gram -> tf * idf
    norm: list[float]
    length: int  # pycocoevalcap counts bigrams here (its `if n == 1`), so we do too


class CiderD:
    """CIDEr-D (coco-caption's "CIDEr"): build once from references, score many caption sets.

    Document frequencies come from the references given here, one document per image, as
    pycocoevalcap does for the corpus it scores. For self-critical training build it from the
    training references and score each batch against its own references:

        cider = CiderD(train_refs)
        mean, per_image = cider.score(sampled, refs=batch_refs)

    Captions are raw text and go through `tokenize_caption`, unless `tokenized=True`.
    """

    def __init__(
        self,
        refs: Mapping[Hashable, Sequence[str]],
        *,
        n: int = 4,
        sigma: float = 6.0,
        tokenized: bool = False,
    ) -> None:
        if not refs:
            raise DataError("CiderD needs references for at least one image")
        self.n, self.sigma, self.tokenized = n, sigma, tokenized
        self.refs = self._prepare_refs(refs)
        doc_freq: Counter[tuple[str, ...]] = Counter()
        for captions in self.refs.values():
            doc_freq.update({gram for c in captions for gram in _ngrams(c, n)})
        self.doc_freq = doc_freq
        self.log_num_docs = float(np.log(float(len(self.refs))))
        # idf per n-gram, as pycocoevalcap computes it: log(N) - log(max(1, df))
        grams = list(doc_freq)
        log_df = np.log(np.maximum(1.0, np.array([doc_freq[g] for g in grams], dtype=float)))
        self._idf = dict(zip(grams, (self.log_num_docs - log_df).tolist(), strict=True))
        self._ref_vecs: dict[str, _TfIdf] = {}

    def _prepare_refs(self, refs: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
        out = {}
        for key, captions in refs.items():
            if isinstance(captions, str) or not captions:
                raise DataError(f"references of image {key!r} must be a non-empty list of captions")
            out[key] = [c if self.tokenized else tokenize_caption(c) for c in captions]
        return out

    def _tfidf(self, caption: str) -> _TfIdf:
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        idf, unseen = self._idf, self.log_num_docs  # an unseen n-gram has df 0, log(max(1, 0))=0
        for gram, tf in _ngrams(caption, self.n).items():
            k = len(gram) - 1
            weight = vec[k][gram] = float(tf) * idf.get(gram, unseen)
            norm[k] += weight * weight
            if k == 1:
                length += tf
        return _TfIdf(vec, [math.sqrt(x) for x in norm], length)

    def _ref_tfidf(self, caption: str) -> _TfIdf:
        cached = self._ref_vecs.get(caption)
        if cached is None:
            if len(self._ref_vecs) >= 1 << 17:  # bounded: batches may bring a whole dataset
                self._ref_vecs.clear()
            cached = self._ref_vecs[caption] = self._tfidf(caption)
        return cached

    def _image_score(self, hyp: _TfIdf, refs: Sequence[str]) -> float:
        totals = [0.0] * self.n
        for ref_caption in refs:
            ref = self._ref_tfidf(ref_caption)
            delta = float(hyp.length - ref.length)
            penalty = np.e ** (-(delta**2) / (2 * self.sigma**2))
            for k in range(self.n):
                ref_vec = ref.vec[k]
                val = 0.0
                for gram, weight in hyp.vec[k].items():
                    ref_weight = ref_vec.get(gram, 0.0)
                    val += min(weight, ref_weight) * ref_weight  # clipped, the "-D" in CIDEr-D
                if hyp.norm[k] != 0 and ref.norm[k] != 0:
                    val /= hyp.norm[k] * ref.norm[k]
                totals[k] += val * penalty
        return float(np.mean(totals)) / len(refs) * 10.0

    def score(
        self,
        preds: Mapping[Hashable, str],
        refs: Mapping[Hashable, Sequence[str]] | None = None,
    ) -> tuple[float, dict[Hashable, float]]:
        """Mean CIDEr-D over `preds` and the score of each image (~1.0 is good).

        `refs` defaults to the references given at construction; pass a batch's references
        to score other images with this corpus's document frequencies.
        """
        image_refs = self.refs if refs is None else self._prepare_refs(refs)
        if not preds:
            raise DataError("no captions to score")
        per_image: dict[Hashable, float] = {}
        for key, caption in preds.items():
            if key not in image_refs:
                raise DataError(f"caption for image {key!r} has no references")
            if not isinstance(caption, str):
                raise DataError(f"caption for image {key!r} must be a str")
            hyp = self._tfidf(caption if self.tokenized else tokenize_caption(caption))
            per_image[key] = self._image_score(hyp, image_refs[key])
        return float(np.mean(np.array(list(per_image.values())))), per_image

    def score_each(
        self, captions: Sequence[str], keys: Sequence[Hashable], *, tokenized: bool = False
    ) -> list[float]:
        """CIDEr-D of captions[i] against the references given at construction for keys[i].

        Several captions may share a key (the samples of one image, in self-critical training);
        `tokenized` skips the PTB tokenizer for captions that already are (a vocabulary's words).
        """
        out = []
        for caption, key in zip(captions, keys, strict=True):
            refs = self.refs.get(key)
            if refs is None:
                raise DataError(f"caption for image {key!r} has no references")
            hyp = self._tfidf(caption if tokenized or self.tokenized else tokenize_caption(caption))
            out.append(self._image_score(hyp, refs))
        return out


# ---------------------------------------------------------------------------------------------
# The corpus score used by validation, evaluation and the score CLI.
# ---------------------------------------------------------------------------------------------


def _check_inputs(
    preds: Mapping[Hashable, str], refs: Mapping[Hashable, Sequence[str]], allow_missing: bool
) -> None:
    if not isinstance(preds, Mapping) or not isinstance(refs, Mapping):
        raise DataError("predictions and references must be dicts keyed by image id")
    if not preds:
        raise DataError("no predictions to score")
    for key, caption in preds.items():
        if not isinstance(caption, str):
            raise DataError(
                f"prediction for image {key!r} must be a str, got {type(caption).__name__}"
            )
        if key not in refs:
            raise DataError(f"prediction for image {key!r} has no references")
        captions = refs[key]
        if (
            isinstance(captions, str)
            or not captions
            or not all(isinstance(c, str) for c in captions)
        ):
            raise DataError(f"references of image {key!r} must be a non-empty list of str")
    if not allow_missing and len(refs) > len(preds):
        missing = [key for key in refs if key not in preds]
        raise DataError(
            f"{len(missing)} image(s) have references but no prediction (first: {missing[0]!r}); "
            "allow missing predictions (--allow-missing) to score only the predicted images"
        )


@functools.lru_cache(maxsize=2)
def _corpus_cider(gts: tuple[tuple[Hashable, tuple[str, ...]], ...]) -> CiderD:
    # validation scores the same references every epoch: keep their document frequencies and
    # tf-idf vectors instead of rebuilding them
    return CiderD(dict(gts), tokenized=True)


def score_corpus(
    preds: Mapping[Hashable, str],
    refs: Mapping[Hashable, Sequence[str]],
    *,
    meteor: bool | str | None = None,
    per_image: bool = False,
    allow_missing: bool = False,
) -> dict[str, Any]:
    """coco-caption scores of raw captions: BLEU-1..4, METEOR, ROUGE-L, CIDEr (0-1 scale).

    CIDEr is on coco-caption's own scale (~1.0 is good). METEOR is None when `meteor=False`
    or, with `meteor=None` ("auto"), when Java or pycocoevalcap is missing (said once in the
    log); `meteor=True` requires it.
    Only the images in `preds` are scored (document frequencies come from their references);
    references of other images are an error unless `allow_missing`. With `per_image=True` the
    result also has "per_image": {image id: {metric: score}} (sentence BLEU as coco-caption
    computes it).
    """
    _check_inputs(preds, refs, allow_missing)
    res = {key: tokenize_caption(caption) for key, caption in preds.items()}
    gts = {key: [tokenize_caption(c) for c in refs[key]] for key in preds}
    bleu_scores, bleu_images = bleu(res, gts)
    rouge, rouge_images = rouge_l(res, gts)
    cider, cider_images = _corpus_cider(tuple((k, tuple(v)) for k, v in gts.items())).score(res)
    meteor = _meteor_bridge.meteor_mode(meteor)
    meteor_score, meteor_images = None, None
    if meteor:
        meteor_score, meteor_images = _meteor_bridge.meteor(res, gts)
    elif meteor is None and not _meteor_bridge.meteor_available():
        _meteor_bridge.note_skipped()
    elif meteor is None:
        try:
            meteor_score, meteor_images = _meteor_bridge.meteor(res, gts)
        except (OSError, ValueError, RuntimeError) as err:  # "if available": a broken JVM too
            warnings.warn(f"METEOR failed, reported as None: {err}", RuntimeWarning, stacklevel=2)
    scores: dict[str, Any] = {f"BLEU-{k + 1}": float(bleu_scores[k]) for k in range(4)}
    scores.update({"METEOR": meteor_score, "ROUGE-L": rouge, "CIDEr": cider})
    if per_image:
        scores["per_image"] = {
            key: {
                **{f"BLEU-{k + 1}": float(bleu_images[key][k]) for k in range(4)},
                "METEOR": None if meteor_images is None else meteor_images[key],
                "ROUGE-L": rouge_images[key],
                "CIDEr": cider_images[key],
            }
            for key in preds
        }
    return scores
