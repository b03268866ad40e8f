"""benchmarks/report.py: the web app's table from app_latency.json (timings stay in benchmarks)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import report  # noqa: E402


def run(rps: float, batch: float) -> dict:
    return {
        "requests": 100,
        "requests_per_s": rps,
        "p50_ms": [200.0, 210.0],
        "p95_ms": [250.0, 260.0],
        "mean_batch": [batch, batch],
        "load_avg_1m": [1.0, 1.1],
    }


def test_app_table_gives_each_setting_its_gain_over_no_batching(monkeypatch):
    result = {
        "checkpoint": "x.ckpt",
        "encoder": "efficientnet_lite2",
        "decoder": "soft_attention",
        "beam_size": 3,
        "photos": "16 photos",
        "torch_threads": 1,
        "command": "python benchmarks/app_latency.py --ckpt x.ckpt --mode concurrency",
        "hardware": {"cpu": "CPU", "cores": 2, "flags": ["avx2"], "torch": "2.x", "date": "d"},
        "concurrency": {
            "wait_0.0ms": {"1": run(4.0, 1.0), "16": run(5.0, 1.0)},
            "wait_50.0ms": {"1": run(3.8, 1.0), "16": run(15.0, 12.0)},
        },
    }
    monkeypatch.setattr(report, "load", lambda name: result if name == "app_latency" else None)
    lines: list[str] = []
    report.app_table(lines)
    rows = [line for line in lines if line.startswith("| 1") and "|" in line[2:]]
    assert rows == [
        "| 1 | off | 4.0 | - | 200.0, 210.0 | 250.0, 260.0 | 1.0, 1.0 | 1.0, 1.1 |",
        "| 1 | on (50 ms) | 3.8 | 0.95x | 200.0, 210.0 | 250.0, 260.0 | 1.0, 1.0 | 1.0, 1.1 |",
        "| 16 | off | 5.0 | - | 200.0, 210.0 | 250.0, 260.0 | 1.0, 1.0 | 1.0, 1.1 |",
        "| 16 | on (50 ms) | 15.0 | 3.00x | 200.0, 210.0 | 250.0, 260.0 | 12.0, 12.0 | 1.0, 1.1 |",
    ]
    assert "CPU, 2 cores" in "\n".join(lines) and lines[-2] == f"`{result['command']}`"


def test_no_app_result_no_table(monkeypatch):
    monkeypatch.setattr(report, "load", lambda name: None)
    lines: list[str] = []
    report.app_table(lines)
    assert lines == []
