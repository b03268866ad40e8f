"""Two "nodes" of one CPU process each on 127.0.0.1, launched by torchrun as on two machines.

Each node runs `python -m torch.distributed.run --nnodes 2 --nproc-per-node 1 --node-rank r
--master-addr 127.0.0.1 --master-port P train.py ...`; Lightning reads torchrun's environment
(TorchElasticEnvironment) and trains with DDP over gloo. Both must train, and since validation
gathers every rank's captions before scoring, both must report the same val/bleu4.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

# Writes what each rank sees after every validation (Lightning loggers write on rank 0 only).
RANK_METRICS = textwrap.dedent("""
    import json

    import lightning as L


    class RankMetrics(L.Callback):
        def __init__(self, path: str):
            self.path = path

        def on_validation_end(self, trainer, pl_module):
            if trainer.sanity_checking:
                return
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                       if k.startswith("val/")}
            row = {"rank": trainer.global_rank, "world_size": trainer.world_size,
                   "num_nodes": trainer.num_nodes, "epoch": trainer.current_epoch,
                   "global_step": trainer.global_step, **metrics}
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\\n")
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_train_and_agree(tmp_path):
    (tmp_path / "rank_metrics.py").write_text(RANK_METRICS)
    env = {
        **os.environ,
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
    }
    port = free_port()
    procs = []
    for rank in (0, 1):
        node = tmp_path / f"node{rank}"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
            "--nproc-per-node", "1", "--node-rank", str(rank), "--master-addr", "127.0.0.1",
            "--master-port", str(port), str(ROOT / "train.py"),
            "debug=tiny", "trainer.accelerator=cpu", "trainer.num_nodes=2", "trainer.devices=1",
            "trainer.strategy=ddp", "trainer.enable_progress_bar=false", "test=false",
            f"hydra.run.dir={node}", f"paths.cache_dir={tmp_path / f'cache{rank}'}",
            "+callbacks.rank_metrics._target_=rank_metrics.RankMetrics",
            f"+callbacks.rank_metrics.path={tmp_path / f'rank{rank}.jsonl'}",
        ]  # fmt: skip
        log = open(tmp_path / f"node{rank}.log", "w")  # noqa: SIM115 (closed below)
        procs.append(
            (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
        )
    try:
        codes = [p.wait(timeout=600) for p, _ in procs]
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            log.close()
    logs = {r: (tmp_path / f"node{r}.log").read_text() for r in (0, 1)}
    assert codes == [0, 0], f"node 0:\n{logs[0][-3000:]}\nnode 1:\n{logs[1][-3000:]}"
    # validation scores are computed on every rank from the same gathered captions (see
    # lit_module.SYNC_DIST_ADVICE): Lightning's advice to average them must not appear
    assert all("sync_dist=True" not in log for log in logs.values())

    rows = {
        r: [json.loads(x) for x in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()]
        for r in (0, 1)
    }
    assert [x["rank"] for x in rows[0]] == [0, 0] and [x["rank"] for x in rows[1]] == [1, 1]
    for r in (0, 1):
        assert all(x["world_size"] == 2 and x["num_nodes"] == 2 for x in rows[r])
        assert rows[r][-1]["global_step"] > 0  # this rank ran optimizer steps
    # Each rank trained on its half of the data, the same number of steps, and the scores of
    # the gathered validation captions are the same on both.
    for a, b in zip(rows[0], rows[1], strict=True):
        assert a["global_step"] == b["global_step"]
        assert a["val/bleu4"] == b["val/bleu4"]
        assert a["val/cider"] == b["val/cider"]
    # Rank 0 alone writes the csv log and the checkpoints.
    assert (tmp_path / "node0" / "csv" / "metrics.csv").is_file()
    assert list((tmp_path / "node0" / "checkpoints").glob("*.ckpt"))
