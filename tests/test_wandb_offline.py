"""Reading an offline W&B run file: the LevelDB framing and the records in it."""

import struct

import pytest

pytest.importorskip("wandb")
from wandb.proto.wandb_internal_pb2 import Record  # noqa: E402

from captioning.training import wandb_offline  # noqa: E402


def frame(records: list[Record]) -> bytes:
    """W&B's file: header, then each record as LevelDB log pieces within 32 KiB blocks."""
    out = bytearray(wandb_offline.HEADER + struct.pack("<HB", 0xBEE1, 0))
    for record in records:
        data, first = record.SerializeToString(), True
        while True:
            left = wandb_offline.BLOCK - len(out) % wandb_offline.BLOCK
            if left < 7:
                out += b"\0" * left
                continue
            piece, data = data[: left - 7], data[left - 7 :]
            kind = (1 if not data else 2) if first else (4 if not data else 3)
            out += struct.pack("<IHB", 0, len(piece), kind) + piece
            first = False
            if not data:
                break
    return bytes(out)


def history(step: int, **values) -> Record:
    r = Record()
    for k, v in {"_step": step, **values}.items():
        item = r.history.item.add()
        item.key, item.value_json = k, str(v)
    return r


def test_reads_config_history_and_summary_across_block_boundaries(tmp_path):
    run = Record()
    run.run.run_id, run.run.display_name, run.run.run_group = "abc", "decoder=merge", "sweep"
    item = run.run.config.update.add()
    item.key, item.value_json = "decoder", '{"name": "merge", "hidden_dim": 512}'
    big = Record()  # a record longer than a block: FIRST, MIDDLE, LAST pieces
    item = big.config.update.add()
    item.key, item.value_json = "notes", '"' + "x" * 70_000 + '"'
    rows = [history(e, **{"val/cider": 0.1 * e, "epoch": e}) for e in range(400)]
    summary = Record()
    item = summary.summary.update.add()
    item.key, item.value_json = "test/cider", "0.5"
    path = tmp_path / "offline-run-1" / "run-abc.wandb"
    path.parent.mkdir()
    path.write_bytes(frame([run, *rows[:200], big, *rows[200:], summary]))
    assert path.stat().st_size > 2 * wandb_offline.BLOCK  # the rows cross block boundaries too

    logged = wandb_offline.read_offline_run(path.parent)
    assert (logged.id, logged.name, logged.group) == ("abc", "decoder=merge", "sweep")
    assert logged.config["decoder"] == {"name": "merge", "hidden_dim": 512}
    assert len(logged.config["notes"]) == 70_000
    assert logged.series("epoch") == list(range(400))
    assert logged.series("val/cider")[3] == pytest.approx(0.3)
    assert logged.summary == {"test/cider": 0.5}


def test_refuses_a_file_that_is_not_a_run(tmp_path, capsys):
    path = tmp_path / "run-x.wandb"
    path.write_bytes(b"PK\x03\x04 not a run")
    with pytest.raises(ValueError, match="not a W&B run file"):
        wandb_offline.read_offline_run(path)
    assert wandb_offline.main([str(path)]) == 2
    assert "not a W&B run file" in capsys.readouterr().err
