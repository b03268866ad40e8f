"""Caption your own images: `python caption.py images=[a.jpg,b.png] [ckpt_path=x.ckpt]`.

Prints each caption with its top beams and scores, and saves one attention figure per image
(what the model saw, then one overlay per word) into the run directory. An image that cannot be
read gets one error line and the others are still captioned; the exit status is then 2.
"""

import json
import logging
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from captioning.app.service import resolve_checkpoint
from captioning.cli import run_safely
from captioning.data.images import ImageDecodeError, load_rgb
from captioning.errors import UserError
from captioning.inference import load_model
from captioning.transforms import centre_square, model_view
from captioning.viz import attention_figure

log = logging.getLogger("caption")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
FIGURE_SIDE = 320  # decode at least this much of the shorter side: figure tiles stay sharp


def image_paths(images: str | list[str]) -> list[Path]:
    """The files named, a folder standing for the images directly in it."""
    if isinstance(images, str):
        images = [images]
    out: list[Path] = []
    for item in images:
        p = Path(str(item)).expanduser()
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)  # a missing file is reported when it is read
    return out


def caption(cfg: DictConfig) -> list[dict]:
    paths = image_paths(OmegaConf.to_container(cfg.images) if cfg.images else [])
    if not paths:
        raise UserError(
            "no images given: python caption.py images=[a.jpg,b.png] (files or folders)"
        )
    d = cfg.decode
    if int(d.beam_size) < 1:
        raise UserError(f"decode.beam_size must be at least 1, got {d.beam_size}")
    ckpt = resolve_checkpoint(cfg.ckpt_path)
    device = (
        cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    cm = load_model(ckpt, device=device)
    pp = cm.preprocess
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"checkpoint {ckpt} ({cm.meta['encoder']['name']} + {cm.meta['decoder']['name']})")

    loaded, failed = [], 0
    for path in paths:
        try:
            loaded.append((path, load_rgb(path, target_size=max(pp.resize_size, FIGURE_SIDE))))
        except ImageDecodeError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1

    results, used_names = [], set()
    bs = max(1, int(cfg.batch_size))
    for i in range(0, len(loaded), bs):
        batch = loaded[i : i + bs]
        x = cm.images_to_tensor(
            [centre_square(im, cm.preprocess) for _, im in batch]
        )  # (B, 3, S, S)
        with torch.inference_mode():
            beams = cm.caption_tensor(
                x,
                beam_size=int(d.beam_size),
                max_len=d.max_len,
                length_penalty=float(d.length_penalty),
                precision=str(d.get("precision", "auto")),
            )
        for (path, image), hyps in zip(batch, beams, strict=True):
            results.append(_report(cm, path, image, hyps, cfg, run_dir, used_names))
    (run_dir / "captions.json").write_text(json.dumps(results, indent=1))
    print(f"saved {run_dir / 'captions.json'}")
    if failed:
        raise UserError(f"{failed} of {len(paths)} images could not be captioned (see above)")
    return results


def _report(
    cm, path: Path, image, hyps: list, cfg: DictConfig, run_dir: Path, used_names: set[str]
) -> dict:
    """Print one image's beams, save its attention figure; the JSON record of both."""
    print(f"\n{path}  ({image.width}x{image.height})")
    n = max(1, min(int(cfg.show_beams), len(hyps)))
    for k, h in enumerate(hyps[:n], 1):
        print(
            f"  {k}. {cm.text(h) or '(empty)':<60s} score {h.score:8.3f}  logprob {h.logprob:8.3f}"
        )
    best = hyps[0]
    figure = None
    if cfg.figures and best.alphas is not None and cm.grid:
        name = f"{path.stem}_attention.png"
        k = 1
        while name in used_names:  # a.jpg and a.png, or the same name in two folders
            k += 1
            name = f"{path.stem}_{k}_attention.png"
        used_names.add(name)
        seen = model_view(image, cm.preprocess)
        words = [cm.vocab.itos[t] for t in best.tokens]
        attention_figure(seen, words, best.alphas, cm.grid).save(run_dir / name)
        figure = str(run_dir / name)
        print(f"  attention: {figure}")
    elif cfg.figures:
        print(f"  (no attention figure: decoder {cm.meta['decoder']['name']} has no attention)")
    return {
        "image": str(path),
        "caption": cm.text(best),
        "beams": [{"caption": cm.text(h), "score": h.score, "logprob": h.logprob} for h in hyps],
        "figure": figure,
    }


@hydra.main(version_base="1.3", config_path="conf", config_name="caption")
def main(cfg: DictConfig) -> None:
    run_safely(caption, cfg)


if __name__ == "__main__":
    main()
