"""Score caption predictions against references, as coco-caption does: `python -m captioning.score`.

    python -m captioning.score --pred preds.json --refs refs.json [--out scores.json]
        [--allow-missing] [--no-meteor]

Prints {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"} as JSON (0-1
scale; CIDEr on coco-caption's scale; METEOR null when Java or pycocoevalcap is missing).
Bad input gives a one-line message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

from captioning.errors import DataError, UserError
from captioning.metrics import METRIC_KEYS, score_corpus

_ID_HELP = (
    "Image ids may be JSON integers or strings; a string that spells an integer in canonical "
    'form ("42", "-7"; not "042", "+42" or "4.2e1") is read as that integer, so 42 and "42" '
    "name the same image in either file. Other strings (file names, ...) are compared as is."
)


def normalize_image_id(raw: Any, *, where: str) -> Hashable:
    """Image id as a comparable key: ints stay ints, canonical integer strings become ints."""
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise DataError(f"{where}: image id must be an integer or a string, got {raw!r}")
    if isinstance(raw, str):
        try:
            as_int = int(raw)
        except ValueError:
            return raw
        return as_int if str(as_int) == raw else raw
    return raw


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.load silently keeps the last of repeated keys; for {id: ...} files that would hide
    # a duplicate prediction, so repeated keys are an error
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DataError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _load_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{what} file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {what} file {path}: {err}") from None
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as err:
        raise DataError(f"{what} file {path} is not valid JSON: {err}") from None
    except DataError as err:
        raise DataError(f"{what} file {path}: {err}") from None


def load_predictions(path: Path) -> dict[Hashable, str]:
    """Predictions from COCO results `[{"image_id", "caption"}, ...]` or `{image_id: caption}`."""
    data = _load_json(path, "predictions")
    if isinstance(data, dict):
        items = list(data.items())
    elif isinstance(data, list):
        items = []
        for i, entry in enumerate(data):
            if not isinstance(entry, dict) or "image_id" not in entry or "caption" not in entry:
                raise DataError(
                    f"predictions file {path}: entry {i} is not an object with "
                    '"image_id" and "caption"'
                )
            items.append((entry["image_id"], entry["caption"]))
    else:
        raise DataError(
            f"predictions file {path}: expected a list of {{image_id, caption}} objects "
            "or an {image_id: caption} object"
        )
    preds: dict[Hashable, str] = {}
    for raw_id, caption in items:
        key = normalize_image_id(raw_id, where=f"predictions file {path}")
        if not isinstance(caption, str):
            raise DataError(f"predictions file {path}: caption of image {raw_id!r} is not a string")
        if key in preds:
            raise DataError(
                f"predictions file {path}: more than one prediction for image {raw_id!r}"
            )
        preds[key] = caption
    if not preds:
        raise DataError(f"predictions file {path} holds no predictions")
    return preds


def load_references(path: Path) -> dict[Hashable, list[str]]:
    """References from `{image_id: [captions]}` or a COCO captions annotation file."""
    data = _load_json(path, "references")
    where = f"references file {path}"
    refs: dict[Hashable, list[str]] = {}
    if isinstance(data, dict) and "annotations" in data:
        annotations = data["annotations"]
        if not isinstance(annotations, list):
            raise DataError(f'{where}: "annotations" must be a list')
        for i, ann in enumerate(annotations):
            if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
                raise DataError(f'{where}: annotation {i} lacks "image_id" or "caption"')
            if not isinstance(ann["caption"], str):
                raise DataError(f"{where}: annotation {i} has a caption that is not a string")
            key = normalize_image_id(ann["image_id"], where=where)
            refs.setdefault(key, []).append(ann["caption"])
    elif isinstance(data, dict):
        for raw_id, captions in data.items():
            key = normalize_image_id(raw_id, where=where)
            if key in refs:
                raise DataError(f"{where}: image {raw_id!r} appears twice")
            if not _is_caption_list(captions):
                raise DataError(f"{where}: image {raw_id!r} needs a non-empty list of captions")
            refs[key] = list(captions)
    else:
        raise DataError(
            f"{where}: expected an {{image_id: [captions]}} object or a COCO annotation file"
        )
    if not refs:
        raise DataError(f"{where} holds no references")
    return refs


def _is_caption_list(value: Any) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and bool(value)
        and all(isinstance(c, str) for c in value)
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m captioning.score",
        description="Score captions with coco-caption's metrics (BLEU-1..4, METEOR, ROUGE-L, "
        "CIDEr), computed natively in Python; METEOR uses Java when available.",
        epilog=_ID_HELP,
    )
    parser.add_argument(
        "--pred",
        required=True,
        type=Path,
        help='predictions: [{"image_id": ..., "caption": ...}, ...] or {"image_id": "caption"}',
    )
    parser.add_argument(
        "--refs",
        required=True,
        type=Path,
        help='references: {"image_id": ["caption", ...]} or a COCO captions annotation file',
    )
    parser.add_argument("--out", type=Path, help="also write the scores to this JSON file")
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="score only the predicted images when some referenced images have no prediction",
    )
    parser.add_argument(
        "--no-meteor", action="store_true", help="skip METEOR (reported as null); no Java needed"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input)."""
    args = _parser().parse_args(argv)
    try:
        preds = load_predictions(args.pred)
        refs = load_references(args.refs)
        scores = score_corpus(
            preds, refs, meteor=False if args.no_meteor else None, allow_missing=args.allow_missing
        )
        result = {key: scores[key] for key in METRIC_KEYS}
        if any(v is not None and not math.isfinite(v) for v in result.values()):
            raise DataError(f"scoring produced a non-finite value: {result}")
        text = json.dumps(result, indent=2)
        if args.out is not None:
            try:
                args.out.write_text(text + "\n", encoding="utf-8")
            except OSError as err:
                raise UserError(f"cannot write {args.out}: {err}") from None
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
