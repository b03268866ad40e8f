"""What a training run prints: where it is, one line per validation, progress in a log file,
the test scores once, and none of the known third-party noise."""

import sys
import warnings
from types import SimpleNamespace

from lightning.pytorch.callbacks import RichProgressBar

from captioning.cli import instantiate_all
from captioning.training.callbacks import LineProgress, progress_bar
from conftest import ROOT, compose_cfg

sys.path.insert(0, str(ROOT))
import train as train_script  # noqa: E402


def test_a_terminal_gets_the_live_bar_a_file_gets_lines():
    assert isinstance(progress_bar(tty=True), RichProgressBar)
    lines = progress_bar(every_n_steps=7, tty=False)
    assert isinstance(lines, LineProgress) and lines.every_n_steps == 7


def test_a_run_resumed_mid_epoch_gets_its_true_speed(monkeypatch, capsys):
    """Resumed at batch 59 of 375 (Lightning calls no on_train_epoch_start then), after a
    long-running process clock: the rate counts from the first batch this process ran."""

    class Lines(LineProgress):
        total_train_batches = 375

        def get_metrics(self, trainer, pl_module):
            return {}

    now = [10_000.0]  # perf_counter, 10,000 s into the process; a batch takes 5 s
    monkeypatch.setattr("captioning.training.callbacks.time.perf_counter", lambda: now[0])
    bar, trainer = Lines(every_n_steps=50), SimpleNamespace(current_epoch=1, max_epochs=14)
    for i in range(59, 100):
        now[0] += 5
        bar.on_train_batch_end(trainer, None, None, None, i)
    line = capsys.readouterr().out.strip()
    assert line.startswith("epoch 2/14  step 100/375")
    assert "0.20 steps/s" in line and "epoch ends in 22:55" in line  # 275 steps at 5 s


def test_no_progress_callback_when_bars_are_off(tmp_path):
    cfg = compose_cfg("train", ["trainer.enable_progress_bar=false"], out=tmp_path, cache=tmp_path)
    trainer, callbacks = instantiate_all(cfg)
    assert "progress" not in callbacks and trainer.progress_bar_callback is None


def test_a_run_piped_to_a_file_says_where_it_is(tmp_path, data_cache, capsys, caplog):
    cfg = compose_cfg(
        "train",
        [
            "debug=tiny",
            "trainer.accelerator=cpu",
            "trainer.limit_train_batches=4",
            "callbacks.progress.every_n_steps=2",
            "test_decode.meteor=false",
        ],
        out=tmp_path,
        cache=data_cache,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # what a user sees; quiet_known_noise adds its filters
        train_script.train(cfg)
        warnings.warn("another deprecation", FutureWarning, stacklevel=1)
    out = capsys.readouterr().out  # captured: not a terminal, as under nohup, tee or CI
    lines = out.splitlines()
    assert lines[0] == f"run directory: {tmp_path}"
    assert lines[-1].startswith(f"done: run directory {tmp_path}")
    # Progress every 2 of the 4 steps of each of the 2 epochs, with speed and time left.
    steps = [line for line in lines if line.startswith("epoch ") and "  step " in line]
    assert len(steps) == 4 and "train/loss" in steps[0] and "steps/s" in steps[-1]
    assert "epoch ends in" in steps[0]
    # One line per validation: scores, loss, the best so far and the time.
    val = [line for line in lines if ": val BLEU-4 " in line]
    assert [v.split(":")[0] for v in val] == ["epoch 1/2", "epoch 2/2"]
    for v in val:
        assert "CIDEr-D" in v and "loss" in v and "best BLEU-4" in v and "(total" in v
    # The test scores once: train.py's, not Lightning's table as well.
    assert out.count('"BLEU-4"') == 1 and "Test metric" not in out and "test/bleu4" not in out
    # Known third-party noise is filtered at its source; nothing else is silenced.
    assert "Tip:" not in out and not any("Tip:" in r.getMessage() for r in caplog.records)
    assert not [w for w in caught if "LeafSpec" in str(w.message)]
    assert [w for w in caught if "another deprecation" in str(w.message)]  # only that narrow
