"""Caption your own images: `python caption.py photo.jpg other.png photos/ [ckpt_path=x.ckpt]`.

Paths, folders (the images in them) and quoted globs ('photos/*.jpg') work as they are, as does
Hydra's `images=[a.jpg,b.png]`. Without `ckpt_path` the best checkpoint of the newest completed
run under outputs/ is used (captioning/checkpoint.py); the line before the captions names it.
Prints each caption with its top beams and scores, and saves one attention figure per image
(what the model saw, then one overlay per word) into the run directory. A missing file is named
before the model loads; an image that cannot be read gets one error line and the others are
still captioned. The exit status is 0 only when every image got a caption (else 2).
"""

import glob
import json
import logging
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from captioning.checkpoint import describe_data, locate_checkpoint
from captioning.cli import paths_as_override, run_safely
from captioning.data.images import ImageDecodeError, load_rgb
from captioning.decoding import DecodeConfig
from captioning.errors import UserError
from captioning.inference import load_model, resolve_device
from captioning.transforms import centre_square
from captioning.viz import caption_figure

log = logging.getLogger("caption")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
FIGURE_SIDE = 320  # decode at least this much of the shorter side: figure tiles stay sharp


def image_paths(images: str | list[str]) -> tuple[list[Path], list[str]]:
    """The files named, a folder standing for the images directly in it, a glob for its
    matches; and one problem line per name that gave no image (missing, empty folder)."""
    if isinstance(images, str):
        images = [images]
    out: list[Path] = []
    problems: list[str] = []
    for item in images:
        p = Path(str(item)).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            out += found
            if not found:
                problems.append(
                    f"{p}: no images in this folder ({', '.join(sorted(IMAGE_SUFFIXES))})"
                )
        elif p.is_file():
            out.append(p)
        elif glob.has_magic(str(p)):
            found = sorted(Path(f) for f in glob.glob(str(p)) if Path(f).is_file())
            out += found
            if not found:
                problems.append(f"{p}: no file matches")
        else:
            problems.append(f"{p}: no such file")
    return out, problems


def caption(cfg: DictConfig) -> list[dict]:
    names = OmegaConf.to_container(cfg.images) if cfg.images else []
    if not names:
        raise UserError(
            "no images given: python caption.py photo.jpg other.png photos/ "
            "(files, folders or quoted globs; or images=[a.jpg,b.png])"
        )
    d = cfg.decode
    if int(d.beam_size) < 1:
        raise UserError(f"decode.beam_size must be at least 1, got {d.beam_size}")
    paths, problems = image_paths(names)
    for line in problems:  # before the model loads: a typo costs no waiting
        print(f"error: {line}", file=sys.stderr)
    if not paths:
        raise UserError(f"none of the {len(names)} names given is an image to caption (see above)")
    found = locate_checkpoint(cfg.ckpt_path)
    device = resolve_device(cfg.device)
    cm = load_model(found.path, device=device)
    pp = cm.preprocess
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"checkpoint {found.describe()}: {cm.meta['encoder']['name']} + "
        f"{cm.meta['decoder']['name']}"
    )
    note = describe_data(cm.meta.get("data"))
    if note:
        print(note)

    loaded, failed = [], len(problems)
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
            beams = cm.caption_tensor(x, DecodeConfig.from_dict(d))
        for (path, image), hyps in zip(batch, beams, strict=True):
            results.append(_report(cm, path, image, hyps, cfg, run_dir, used_names))
    if results:  # nothing captioned: no captions.json that looks like a result
        (run_dir / "captions.json").write_text(json.dumps(results, indent=1))
        print(f"saved {run_dir / 'captions.json'}")
    if failed:
        total = len(paths) + len(problems)
        raise UserError(f"{failed} of {total} images could not be captioned (see above)")
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
        caption_figure(image, best.tokens, best.alphas, cm.vocab.itos, cm.preprocess).save(
            run_dir / name
        )
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
    sys.argv[1:] = paths_as_override(sys.argv[1:])  # python caption.py a.jpg b.png
    main()
