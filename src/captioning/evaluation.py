"""Caption a dataset split with a loaded model, score it, report the best and worst captions."""

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from .data.dataset import CaptionDataset, collate
from .data.images import load_rgb
from .decoding import DecodeConfig, Hypothesis
from .inference import CaptionModel
from .viz import caption_figure


@torch.no_grad()
def caption_dataset(
    cm: CaptionModel,
    dataset: CaptionDataset,
    *,
    batch_size: int = 100,
    decode: DecodeConfig = DecodeConfig(beam_size=3),
    num_workers: int = 0,
) -> tuple[dict[str, str], dict[str, list[str]], dict[str, Hypothesis]]:
    """Best caption, references and best hypothesis (with attention) for every image."""
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=num_workers
    )
    preds, refs, hyps = {}, {}, {}
    for batch in loader:
        beams = cm.caption_tensor(batch.images.to(cm.device), decode)
        for image_id, image_refs, b in zip(batch.image_ids, batch.refs, beams, strict=True):
            preds[image_id] = cm.text(b[0])
            refs[image_id] = image_refs
            hyps[image_id] = b[0]
    return preds, refs, hyps


# Words no English caption ends on: a caption that does was cut off mid-phrase ("a dog runs
# in front of a"), the way self-critical training on a reward blind to the end learns to stop.
FUNCTION_WORDS = frozenset(
    ["a", "an", "the", "and", "or", "but", "of", "in", "on", "at", "to", "for", "from", "with",
     "by", "into", "onto", "near", "upon", "before", "after", "is", "are", "was", "were", "am",
     "be", "its", "their", "his", "her"]
)  # fmt: skip


def caption_stats(preds: Mapping[Any, str]) -> dict[str, float]:
    """What n-gram scores miss: length, vocabulary, repetition and captions cut off mid-phrase.

    mean_words, distinct_words (vocabulary used), distinct_captions (fraction of captions no
    other image got) and ends_mid_phrase (fraction whose last word is in FUNCTION_WORDS).
    """
    words = [c.split() for c in preds.values()]
    if not words:
        return {"mean_words": 0.0, "distinct_words": 0, "distinct_captions": 0.0,
                "ends_mid_phrase": 0.0}  # fmt: skip
    counts = Counter(preds.values())
    return {
        "mean_words": sum(map(len, words)) / len(words),
        "distinct_words": len({w for ws in words for w in ws}),
        "distinct_captions": sum(counts[c] == 1 for c in preds.values()) / len(words),
        "ends_mid_phrase": sum(bool(ws) and ws[-1] in FUNCTION_WORDS for ws in words) / len(words),
    }


def rank_examples(
    per_image: dict[str, dict[str, float]], key: str = "CIDEr", n: int = 5
) -> tuple[list[str], list[str]]:
    """Image ids of the n best and n worst captions by a per-image score."""
    order = sorted(per_image, key=lambda i: (per_image[i].get(key) or 0.0, i))
    n = max(n, 0)  # order[-0:] would be every image
    return list(reversed(order[len(order) - n :])), order[:n]


def summary(scores: dict[str, Any]) -> dict[str, Any]:
    """Round for printing; None (unavailable) stays None."""
    return {k: (None if v is None else round(float(v), 4)) for k, v in scores.items()}


SHOWN = {"CIDEr": "CIDEr-D"}  # the CIDEr computed here is CIDEr-D


def overall(
    scores: Mapping[str, Any],
    decode: Mapping[str, Any],
    split: str,
    images: int,
    stats: Mapping[str, Any] | None = None,
) -> list[str]:
    """The head of a report: split, decoding settings, the corpus scores, caption statistics."""
    beam = int(decode.get("beam_size", 1))
    how = "greedy" if beam == 1 else f"beam {beam}, length penalty {decode.get('length_penalty')}"
    if decode.get("max_len"):
        how += f", at most {decode['max_len']} words"
    if decode.get("no_repeat_ngram"):
        how += f", no repeated {decode['no_repeat_ngram']}-gram"
    lines = [
        f"Split `{split}`, {images} images; decoding: {how}.",
        "",
        "| " + " | ".join(SHOWN.get(k, k) for k in scores) + " |",
        "|" + "---|" * len(scores),
        "| "
        + " | ".join("n/a" if v is None else f"{float(v):.4f}" for v in scores.values())
        + " |",
        "",
    ]
    if any(v is None for v in scores.values()):
        lines += ["n/a: not computed (METEOR needs Java, or `decode.meteor=false`).", ""]
    if stats:
        lines += [
            f"Captions: {stats['mean_words']:.1f} words on average, {stats['distinct_words']} "
            f"distinct words, {stats['distinct_captions']:.0%} given to one image only, "
            f"{stats['ends_mid_phrase']:.1%} ending mid-phrase.",
            "",
        ]
    return lines


def write_report(
    run_dir: Path,
    cm: CaptionModel,
    dataset: CaptionDataset,
    preds: dict[str, str],
    refs: dict[str, list[str]],
    hyps: dict[str, Hypothesis],
    per_image: dict[str, dict[str, float]],
    n: int = 5,
    scores: Mapping[str, Any] | None = None,
    decode: Mapping[str, Any] | None = None,
    split: str = "",
) -> Path:
    """Write report.md (+ report/*.png) beside the metrics; returns the Markdown path.

    It opens with the overall scores and the decoding settings (when given), then shows the
    best and worst captions by per-image CIDEr-D with their attention maps.
    """
    fig_dir = run_dir / "report"
    fig_dir.mkdir(parents=True, exist_ok=True)
    best, worst = rank_examples(per_image, "CIDEr", n)
    row_of = {image_id: i for i, image_id in enumerate(dataset.image_ids)}
    lines = [f"# Evaluation report: {cm.meta.get('path', '')}", ""]
    if scores is not None:
        lines += overall(scores, decode or {}, split, len(preds), caption_stats(preds))
    for title, ids in (
        ("Best captions (per-image CIDEr-D)", best),
        ("Worst captions (per-image CIDEr-D)", worst),
    ):
        lines += [f"## {title}", ""]
        for image_id in ids:
            hyp = hyps[image_id]
            image = load_rgb(dataset.ds[row_of[image_id]]["image"])
            name = f"{len(list(fig_dir.iterdir())):03d}.png"
            figure = caption_figure(image, hyp.tokens, hyp.alphas, cm.vocab.itos, cm.preprocess)
            figure.save(fig_dir / name)
            s = per_image[image_id]
            lines += [
                f"### {image_id}",
                "",
                f"**{preds[image_id]}**  (CIDEr-D {s.get('CIDEr', 0):.3f}, "
                f"BLEU-4 {s.get('BLEU-4', 0):.3f})",
                "",
                f"![attention](report/{name})",
                "",
                "References:",
                "",
                *[f"- {r}" for r in refs[image_id]],
                "",
            ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
