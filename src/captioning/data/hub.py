"""Any Hugging Face Hub dataset, or a local dataset folder, its columns mapped onto our schema."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import datasets

from ..errors import ConfigError, DataError
from . import SOURCES
from .convert import Converted, materialise, save_features

log = logging.getLogger(__name__)


@SOURCES.register("hub")
def build_hub(
    cache_dir: str,
    hub_id: str | None = None,
    config_name: str | None = None,
    revision: str | None = None,
    image_column: str = "image",
    caption_columns: list[str] | str | None = None,
    id_column: str | None = None,
    splits: dict[str, str] | None = None,
    split_column: str | None = None,
    limit_train: int | None = None,
    limit_val: int | None = None,
    limit_test: int | None = None,
    verify_images: bool = True,
    num_proc: int | None = None,
    hub_cache_dir: str | None = None,
) -> dict[str, datasets.Dataset]:
    """A Hub dataset (or a local dataset folder), its columns mapped onto our schema.

    `caption_columns`: one list-valued column or several string columns; None picks
    ``captions``/``caption``/``sentences`` or ``caption_0..caption_N``. `splits` maps our split
    names to the dataset's (default: train/validation/test, with val/valid/dev tried too); with
    `split_column` they are values of that column instead. The first conversion is cached, so
    later runs need no network; pin `revision` to notice upstream changes.
    """
    if not hub_id:
        raise ConfigError("data source 'hub' needs hub_id, e.g. data.args.hub_id=jxie/flickr8k")
    mapping = dict(splits or {"train": "train", "val": "validation", "test": "test"})

    def convert() -> Converted:
        try:
            raw = datasets.load_dataset(
                hub_id, config_name, revision=revision, cache_dir=hub_cache_dir
            )
        except Exception as e:
            raise _hub_error(hub_id, e) from e
        if split_column is not None:
            allset = datasets.concatenate_datasets(list(raw.values()))
            _require_columns(hub_id, allset, [split_column])
            values = allset[split_column]
            parts = {
                ours: allset.select([i for i, v in enumerate(values) if v == theirs])
                for ours, theirs in mapping.items()
            }
        else:
            parts = {ours: raw[_hub_split(hub_id, raw, theirs)] for ours, theirs in mapping.items()}
        out = {}
        dropped = 0
        for split, ds in parts.items():
            ds, n_empty = _normalise_hub(
                hub_id, split, ds, image_column, caption_columns, id_column
            )
            out[split], dropped = ds, dropped + n_empty
        if dropped:
            log.warning("%s: dropped %d rows without any caption", hub_id, dropped)
        return Converted(out)

    args = dict(
        hub_id=hub_id,
        config_name=config_name,
        revision=revision,
        image_column=image_column,
        caption_columns=caption_columns,
        id_column=id_column,
        splits=mapping,
        split_column=split_column,
        limits=[limit_train, limit_val, limit_test],
        verify_images=verify_images,
    )
    local = Path(hub_id).expanduser()
    if local.exists():  # a local dataset folder: its files belong in the fingerprint
        args["hub_id"] = str(local.resolve())
        files = sorted(p for p in local.rglob("*") if p.is_file())
    else:
        files = []
    return materialise("hub", cache_dir, args, files, convert, verify_images, num_proc)


def _hub_error(hub_id: str, e: Exception) -> DataError:
    chain: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and len(chain) < 10:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    names = {type(c).__name__ for c in chain}
    local = "Local files work without it: e.g. data=flickr8k data.args.root=/path/to/flickr8k."
    if "DatasetNotFoundError" in names or "RepositoryNotFoundError" in names:
        return DataError(
            f"Hugging Face dataset {hub_id!r} was not found on the Hub (check the id; private or "
            f"gated datasets need `hf auth login`). {local}"
        )
    if any(isinstance(c, ConnectionError | TimeoutError) for c in chain) or any(
        "Offline" in n or "Connect" in n or "Timeout" in n for n in names
    ):
        offline = any("Offline" in f"{type(c).__name__} {c}" for c in chain)
        why = " (offline mode is on: HF_HUB_OFFLINE is set)" if offline else ""
        return DataError(
            f"could not load the Hugging Face dataset {hub_id!r}: the Hub could not be reached"
            f"{why} and no cached copy exists. {local}"
        )
    return DataError(f"could not load the Hugging Face dataset {hub_id!r}: {e}. {local}")


def _hub_split(hub_id: str, raw: datasets.DatasetDict, name: str) -> str:
    aliases = {"validation": ("validation", "val", "valid", "dev"), "val": ("val", "validation")}
    for candidate in aliases.get(name, (name,)):
        if candidate in raw:
            return candidate
    raise ConfigError(
        f"{hub_id} has no split {name!r}; it has {', '.join(raw)}. Map ours with "
        "data.args.splits={train: ..., val: ..., test: ...} or use data.args.split_column."
    )


def _require_columns(hub_id: str, ds: datasets.Dataset, cols: Iterable[str]) -> None:
    missing = [c for c in cols if c not in ds.column_names]
    if missing:
        raise ConfigError(
            f"{hub_id} has no column {', '.join(map(repr, missing))}; its columns are "
            f"{', '.join(ds.column_names)} (set data.args.image_column / caption_columns)"
        )


def _normalise_hub(
    hub_id: str,
    split: str,
    ds: datasets.Dataset,
    image_column: str,
    caption_columns: list[str] | str | None,
    id_column: str | None,
) -> tuple[datasets.Dataset, int]:
    """Map a Hub split onto our schema; returns it and the number of rows with no caption."""
    cols = _caption_columns(hub_id, ds, caption_columns)
    _require_columns(hub_id, ds, [image_column, *cols, *([id_column] if id_column else [])])
    table = ds.select_columns(cols).to_dict()
    captions = [_flatten_captions(vals) for vals in zip(*(table[c] for c in cols), strict=True)]
    if id_column:
        ids = [str(v) for v in ds.select_columns([id_column]).to_dict()[id_column]]
    else:
        ids = [f"{split}-{i:07d}" for i in range(len(ds))]
    # Table-level casts only (no map): the image bytes are not rewritten here.
    images = ds.select_columns([image_column]).cast_column(
        image_column, datasets.Image(decode=False)
    )
    images = images.cast_column(image_column, save_features()["image"])
    if image_column != "image":
        images = images.rename_column(image_column, "image")
    out = images.add_column("captions", captions).add_column("image_id", ids)
    keep = [i for i, caps in enumerate(captions) if caps]
    if len(keep) < len(out):
        out = out.select(keep)
    return out.select_columns(["image_id", "image", "captions"]), len(captions) - len(keep)


def _caption_columns(hub_id: str, ds: datasets.Dataset, given: list[str] | str | None) -> list[str]:
    if isinstance(given, str):
        return [given]
    if given:
        return list(given)
    for name in ("captions", "caption", "sentences", "text"):
        if name in ds.column_names:
            return [name]
    numbered = [c for c in ds.column_names if re.fullmatch(r"captions?_?\d+", c)]
    if numbered:
        return sorted(numbered, key=lambda c: int(re.sub(r"\D", "", c)))
    raise ConfigError(
        f"{hub_id}: cannot tell which columns hold captions; its columns are "
        f"{', '.join(ds.column_names)} (set data.args.caption_columns)"
    )


def _flatten_captions(values: Iterable[Any]) -> list[str]:
    """Strings, lists of strings, or Karpathy-style {"raw": ...} dicts -> a list of captions."""
    out: list[str] = []
    for v in values:
        if isinstance(v, dict):
            v = v.get("raw") or v.get("caption") or v.get("text")
        if isinstance(v, list | tuple):
            out.extend(_flatten_captions(v))
        elif isinstance(v, str) and v.strip():
            out.append(" ".join(v.split()))
    return out
