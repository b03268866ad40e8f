"""Dataset sources: each turns its raw form into `datasets.Dataset` splits with one schema.

Every source is registered in `SOURCES` and returns ``{"train": ds, "val": ds, "test": ds}``
whose rows have at least:

- ``image_id``: str, unique within the source
- ``image``: ``datasets.Image(decode=False)``, i.e. ``{"bytes": bytes | None, "path": str | None}``
  (decoding is ours, so a corrupt file is skipped and counted instead of crashing a worker)
- ``captions``: list[str], the reference captions (raw text; tokenised by `captioning.vocab`)

The built-in synthetic source also keeps ``boxes`` (normalised x0, y0, x1, y1 per object) and
``objects`` (the phrase naming each object), so attention can be checked against them.
"""

from ..registry import Registry

SOURCES = Registry("data source")
SPLITS = ("train", "val", "test")


def load_splits(source: str, **cfg):
    """Build (or load from cache) the train/val/test splits of a registered source."""
    _import_sources()
    return SOURCES.build(source, **cfg)


def _import_sources() -> None:
    # Imported lazily: each module registers itself, and some pull in heavy dependencies.
    from . import coco, flickr, hub, synthetic  # noqa: F401
