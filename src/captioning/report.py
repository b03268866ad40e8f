"""A Markdown report of the best and worst captions of an evaluation, with attention maps."""

from pathlib import Path

from .data.images import load_rgb
from .datamodule import CaptionDataset
from .decoding import Hypothesis
from .evaluation import rank_examples
from .inference import CaptionModel
from .viz import attention_figure


def write_report(run_dir: Path, cm: CaptionModel, dataset: CaptionDataset, preds: dict[str, str],
                 refs: dict[str, list[str]], hyps: dict[str, Hypothesis],
                 per_image: dict[str, dict[str, float]], n: int = 5) -> Path:
    """Write report.md (+ report/*.png) beside the metrics; returns the Markdown path."""
    fig_dir = run_dir / "report"
    fig_dir.mkdir(parents=True, exist_ok=True)
    best, worst = rank_examples(per_image, "CIDEr", n)
    row_of = {image_id: i for i, image_id in enumerate(dataset.image_ids)}
    lines = [f"# Evaluation report: {cm.meta.get('path', '')}", ""]
    for title, ids in (("Best captions (per-image CIDEr-D)", best),
                       ("Worst captions (per-image CIDEr-D)", worst)):
        lines += [f"## {title}", ""]
        for image_id in ids:
            hyp = hyps[image_id]
            image = load_rgb(dataset.ds[row_of[image_id]]["image"])
            words = [cm.vocab.itos[t] for t in hyp.tokens]
            name = f"{len(list(fig_dir.iterdir())):03d}.png"
            attention_figure(image, words, hyp.alphas, cm.grid).save(fig_dir / name)
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
