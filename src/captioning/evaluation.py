"""Caption a dataset split with a loaded model and score it (no Lightning needed)."""

from typing import Any

import torch
from torch.utils.data import DataLoader

from .datamodule import CaptionDataset, collate
from .decoding import Hypothesis
from .inference import CaptionModel


@torch.no_grad()
def caption_dataset(
    cm: CaptionModel, dataset: CaptionDataset, *, batch_size: int = 100, beam_size: int = 3,
    max_len: int | None = None, length_penalty: float = 1.0, num_workers: int = 0,
) -> tuple[dict[str, str], dict[str, list[str]], dict[str, Hypothesis]]:
    """Best caption, references and best hypothesis (with attention) for every image."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate,
                        num_workers=num_workers)
    preds, refs, hyps = {}, {}, {}
    for batch in loader:
        beams = cm.caption_tensor(batch["images"].to(cm.device), beam_size=beam_size,
                                  max_len=max_len, length_penalty=length_penalty)
        for image_id, image_refs, b in zip(batch["image_ids"], batch["refs"], beams, strict=True):
            preds[image_id] = cm.text(b[0])
            refs[image_id] = image_refs
            hyps[image_id] = b[0]
    return preds, refs, hyps


def rank_examples(per_image: dict[str, dict[str, float]], key: str = "CIDEr",
                  n: int = 5) -> tuple[list[str], list[str]]:
    """Image ids of the n best and n worst captions by a per-image score."""
    order = sorted(per_image, key=lambda i: (per_image[i].get(key) or 0.0, i))
    return list(reversed(order[-n:])), order[:n]


def summary(scores: dict[str, Any]) -> dict[str, Any]:
    """Round for printing; None (unavailable) stays None."""
    return {k: (None if v is None else round(float(v), 4)) for k, v in scores.items()}
