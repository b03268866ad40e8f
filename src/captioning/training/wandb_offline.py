"""What an offline W&B run holds, read back without an account or the network.

An offline run (`<run dir>/wandb/offline-run-*/run-<id>.wandb`) is what `wandb sync` uploads:
its config, every `log` call (the history: one row per logged step) and the summary. This reads
that file, so a sweep's W&B records can be checked, or looked at, before anything is uploaded:

    python -m captioning.training.wandb_offline outputs/sweeps/flickr8k_models/0/wandb/offline-run-*

The file is W&B's transaction log: a 7-byte header (":W&B", a magic number, a version), then
LevelDB log records (32 KiB blocks; each record a 4-byte checksum, 2-byte length and 1-byte type,
split across blocks as FIRST/MIDDLE/LAST pieces), each a protobuf `Record` of
`wandb.proto.wandb_internal_pb2`.
"""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADER = b":W&B"
HEADER_LEN = 7
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    path: Path
    id: str = ""
    name: str = ""
    group: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per logged step
    summary: dict[str, Any] = field(default_factory=dict)  # the last value of each key

    def series(self, key: str) -> list[Any]:
        """Every logged value of `key`, in order."""
        return [row[key] for row in self.history if key in row]


def _payloads(data: bytes) -> list[bytes]:
    if data[:4] != HEADER:
        raise ValueError("not a W&B run file (no :W&B header)")
    pos, parts, out = HEADER_LEN, [], []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding up to the end of the block
            pos += left
            continue
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            out.append(payload)
        elif kind == FIRST:
            parts = [payload]
        elif kind == MIDDLE:
            parts.append(payload)
        elif kind == LAST:
            out.append(b"".join([*parts, payload]))
            parts = []
    return out


def _items(items) -> dict[str, Any]:
    out = {}
    for item in items:
        key = item.key or "/".join(item.nested_key)
        try:
            out[key] = json.loads(item.value_json)
        except ValueError:
            out[key] = item.value_json
    return out


def read_offline_run(path: str | Path) -> OfflineRun:
    """An offline run's config, history and summary; `path` is the offline-run-* folder or its
    run-*.wandb file."""
    from wandb.proto.wandb_internal_pb2 import Record  # only where W&B is installed

    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("run-*.wandb"))
        if not files:
            raise FileNotFoundError(f"no run-*.wandb in {path}")
        path = files[0]
    run = OfflineRun(path=path)
    for payload in _payloads(path.read_bytes()):
        record = Record.FromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.id, run.name, run.group = (
                record.run.run_id,
                record.run.display_name,
                record.run.run_group,
            )
            run.config |= _items(record.run.config.update)
        elif kind == "config":
            run.config |= _items(record.config.update)
        elif kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "summary":
            run.summary |= _items(record.summary.update)
    run.config.pop("_wandb", None)
    return run


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m captioning.training.wandb_offline",
        description="What offline W&B runs hold (config, logged keys, summary), read locally.",
    )
    parser.add_argument("runs", nargs="+", type=Path, help="offline-run-* folders or run-*.wandb")
    args = parser.parse_args(argv)
    for p in args.runs:
        try:
            run = read_offline_run(p)
        except (OSError, ValueError) as e:
            print(f"error: {p}: {e}", file=sys.stderr)
            return 2
        keys = sorted({k for row in run.history for k in row if not k.startswith("_")})
        summary = {k: v for k, v in run.summary.items() if not k.startswith("_")}
        print(f"{run.path}: run {run.id} {run.name!r}, group {run.group!r}")
        print(f"  config: {len(run.config)} keys; history: {len(run.history)} rows of {keys}")
        print(f"  summary: {json.dumps(summary, default=str)[:2000]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
