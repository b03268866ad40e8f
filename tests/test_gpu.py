"""CUDA tier, `pytest -m gpu`: what the CPU tiers prove, proven again on the GPU, plus real runs.

Skipped without CUDA (CI never has a GPU). `CAPTIONING_TEST_DEVICE=cpu pytest -m gpu` runs the
same checks on the CPU: a dry run of this file's logic before a GPU is at hand, in which every
"device against CPU" comparison compares the CPU with itself, and some runs are smaller. What a
CPU cannot run is skipped there with its reason.

CPU counterparts: tests/test_speed_contract.py (fast path = step loop), test_checkpoints.py and
test_train.py (checkpoints), test_features.py (cache), test_end_to_end.py (real runs).
"""

import copy
import csv
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from captioning.decoders import build_decoder
from captioning.decoding import generate
from captioning.encoders import build_encoder
from captioning.inference import load_model
from captioning.training.datamodule import CaptionDataModule
from captioning.training.lit_module import CaptioningModule
from captioning.vocab import Vocab
from conftest import ROOT, compose_cfg, path_without_java

DEVICE = os.environ.get("CAPTIONING_TEST_DEVICE", "cuda")
ON_CUDA = DEVICE.startswith("cuda")
ACCELERATOR = "gpu" if ON_CUDA else "cpu"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        ON_CUDA and not torch.cuda.is_available(),
        reason="no CUDA device (CAPTIONING_TEST_DEVICE=cpu runs this tier on the CPU)",
    ),
]

NOT_ON_CPU_FP16 = "Lightning runs precision=16-mixed as bf16-mixed on a CPU: only CUDA has it"
SAME_CAPTIONS = 0.995  # fraction of images whose best caption must be the same on both devices


@pytest.fixture(autouse=True)
def full_fp32():
    """fp32 means fp32 here: no TF32 (trainer=gpu's setting) leaking in from another test."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


# --- the fast teacher-forced path against the step loop, fp32 -----------------------------------

V, D, N = 500, 256, 49


def decoder(**kw):
    torch.manual_seed(0)
    dims = {"embed_dim": 64, "hidden_dim": 128, "attention_dim": 64, "dropout": 0.0}
    return build_decoder("soft_attention", vocab_size=V, encoder_dim=D, **(dims | kw)).to(DEVICE)


def caption_batch(B: int = 24, T: int = 16, seed: int = 1):
    """Features (B, N, D) and captions with <pad> after each row's length (1..T)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    caps = torch.randint(3, V, (B, T + 1), generator=g)
    caps[:, 0] = 1
    for b, n in enumerate(lengths.tolist()):
        caps[b, n] = 2
        caps[b, n + 1 :] = 0
    feats = torch.randn(B, N, D, generator=g)
    return feats.to(DEVICE), caps[:, :-1].to(DEVICE), caps[:, 1:].to(DEVICE)


def loss_and_grads(dec, forward, targets):
    """Loss as the LightningModule computes it, and the gradient of every parameter."""
    dec.zero_grad(set_to_none=True)
    logits, alphas = forward()
    mask = (targets != 0).to(logits.dtype)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=0)
    loss = loss + dec.regularizer(alphas, mask)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in dec.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
def test_fast_forward_equals_stepwise_in_fp32(compiled):
    dec = decoder().train()
    feats, inputs, targets = caption_batch()
    lengths = (targets != 0).sum(1)
    slow_loss, slow_grads = loss_and_grads(
        dec, lambda: dec.forward_stepwise(feats, inputs), targets
    )
    if compiled:  # what `compile: true` does to the training step
        dec.compile_step()
    fast_loss, fast_grads = loss_and_grads(
        dec, lambda: dec(feats, inputs, lengths=lengths), targets
    )
    torch.testing.assert_close(fast_loss, slow_loss, rtol=0, atol=1e-5)
    assert fast_grads.keys() == slow_grads.keys()
    for k in slow_grads:
        torch.testing.assert_close(fast_grads[k], slow_grads[k], rtol=0, atol=1e-4, msg=k)


# --- mixed precision: close to fp32, and it learns ----------------------------------------------

AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def small_module() -> tuple[CaptioningModule, dict]:
    """A CaptioningModule (small CNN trained from scratch + attention decoder) and one batch."""
    torch.manual_seed(0)
    module = CaptioningModule(
        encoder={"name": "small_cnn", "fine_tune": "all"},
        decoder={"name": "soft_attention", "embed_dim": 64, "hidden_dim": 128,
                 "attention_dim": 64, "dropout": 0.0},
        vocab=Vocab([f"w{i}" for i in range(96)]).to_dict(),
        optim={"encoder_lr": 1e-3, "decoder_lr": 1e-3},
        val_decode={}, test_decode={},
    ).to(DEVICE).train()  # fmt: skip
    g = torch.Generator().manual_seed(2)
    B, T = (32 if ON_CUDA else 8), 14  # 8 on a CPU: its bf16/fp16 convolutions are slow
    caps = torch.randint(4, 100, (B, T + 1), generator=g)
    caps[:, 0] = 1
    for b in range(B):
        n = int(torch.randint(3, T + 1, (1,), generator=g))
        caps[b, n] = 2
        caps[b, n + 1 :] = 0
    images = torch.rand(B, 3, 64, 64, generator=g) * 2 - 1
    return module, {"images": images.to(DEVICE), "captions": caps.to(DEVICE)}


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_is_close_to_fp32_and_learns(precision):
    """As Lightning runs it: autocast around the forward, fp32 weights, a scaler for fp16."""
    module, batch = small_module()
    dtype = AUTOCAST[precision]
    device_type = torch.device(DEVICE).type
    with torch.no_grad():
        fp32 = float(module.loss(batch)[0])
        with torch.autocast(device_type, dtype=dtype):
            mixed = float(module.loss(batch)[0])
    assert math.isfinite(mixed) and abs(mixed - fp32) / fp32 < 0.02, (precision, mixed, fp32)

    opt = torch.optim.AdamW(module.parameters(), lr=2e-3)
    scaler = torch.amp.GradScaler(device_type, enabled=precision == "16-mixed")
    losses = []
    for _ in range(50):
        with torch.autocast(device_type, dtype=dtype):
            loss = module.loss(batch)[0]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < 0.8 * losses[0], (precision, losses[0], losses[-1])


# --- features cached on the device --------------------------------------------------------------

DATA = {
    "name": "synthetic",
    "args": {"num_train": 24, "num_val": 8, "num_test": 8},
    "batch_size": 8,
    "eval_batch_size": 8,
    "num_workers": 0,
}


def cached_features(cache: Path, trainer: L.Trainer | None) -> dict[str, np.ndarray]:
    """Each split's cached features, computed on the trainer's device (the CPU without one)."""
    torch.manual_seed(0)
    enc = build_encoder("small_cnn", fine_tune="none")
    dm = CaptionDataModule(DATA, cache_dir=str(cache))
    assert dm.use_feature_cache(enc)
    dm.trainer = trainer
    dm.prepare_data()
    return {
        str(dm._feature_dir(s).relative_to(cache)): np.load(dm._feature_dir(s) / "features.npy")
        for s in ("train", "val", "test")
    }


def test_features_cached_on_the_device_match_the_cpu_ones_under_the_same_key(tmp_path):
    trainer = L.Trainer(accelerator=ACCELERATOR, devices=1, logger=False)
    assert trainer.strategy.root_device.type == torch.device(DEVICE).type
    on_device = cached_features(tmp_path / "device", trainer)
    on_cpu = cached_features(tmp_path / "cpu", None)
    assert on_device.keys() == on_cpu.keys()  # the same cache key, whatever computed it
    for key, feats in on_cpu.items():
        assert feats.dtype == np.float16 and np.abs(feats).max() > 0.01
        got = torch.from_numpy(on_device[key].astype(np.float32))
        want = torch.from_numpy(feats.astype(np.float32))
        # fp16 storage: two roundings of nearly equal values differ by at most one unit in the
        # last place, 2**-10 of the value (atol: the spacing of fp16 near zero, ~6e-8 x 256)
        torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-5, msg=key)


def test_trainer_gpu_uses_tf32_on_cuda_only(tmp_path):
    from captioning.cli import instantiate_all

    cfg = compose_cfg("train", ["trainer=gpu", f"trainer.accelerator={ACCELERATOR}"], out=tmp_path)
    instantiate_all(cfg)
    assert torch.get_float32_matmul_precision() == ("high" if ON_CUDA else "highest")


# --- real runs: train.py in subprocesses, without Java -------------------------------------------

TINY = ["debug=tiny", "trainer.enable_progress_bar=false"]
TEST_IMAGES = 400 if ON_CUDA else 100  # of the run whose checkpoint the equality checks use
RUNS = {
    "gpu": ["trainer=gpu", f"data.args.num_test={TEST_IMAGES}"],
    "fp16": ["trainer=gpu", "trainer.precision=16-mixed"],
    "ddp": ["trainer=ddp", "trainer.devices=1", "trainer.accelerator=gpu"],
    "resnet101": [
        "encoder=resnet101", "encoder.pretrained=false", "encoder.fine_tune=all", "trainer=gpu",
        "trainer.max_epochs=1", "trainer.limit_train_batches=5", "trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
    ],
}  # fmt: skip
# The dry run on a CPU: the same runs, smaller (bf16 convolutions are slow on CPUs without AMX)
ON_CPU = {"resnet101": ["encoder.image_size=64", "data.batch_size=4", "data.eval_batch_size=8"]}


@dataclass
class Run:
    code: int
    out: str
    dir: Path
    cache: Path


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, Run]:
    """The real runs, started together (each is small: the GPU and the cores have room)."""
    root = tmp_path_factory.mktemp("runs")
    env = {**os.environ, "PATH": path_without_java(root), "PYTHONUNBUFFERED": "1"}
    env.pop("JAVA_HOME", None)
    if not ON_CUDA:  # several runs at once share the cores: one thread each
        env["OMP_NUM_THREADS"] = "1"
    procs = {}
    for name, args in RUNS.items():
        if name == "fp16" and not ON_CUDA:
            continue
        if not ON_CUDA:  # the same runs on the CPU (dry run of this tier)
            args = [a for a in args if not a.startswith("trainer.accelerator=")]
            args += ["trainer.accelerator=cpu", *ON_CPU.get(name, [])]
        run_dir, cache = root / name, root / f"cache-{name}"
        log = open(root / f"{name}.log", "w")  # noqa: SIM115 (closed below)
        cmd = [sys.executable, str(ROOT / "train.py"), *TINY, *args, f"hydra.run.dir={run_dir}"]
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**env, "CAPTIONING_CACHE": str(cache)}, stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        procs[name] = (proc, log, run_dir, cache)
    out = {}
    try:
        for name, (proc, log, run_dir, cache) in procs.items():
            code = proc.wait(timeout=900 if ON_CUDA else 2400)
            log.close()
            out[name] = Run(code, (root / f"{name}.log").read_text(), run_dir, cache)
    finally:
        for proc, log, _, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
            log.close()
    return out


def finished(run: Run) -> dict:
    assert run.code == 0, run.out[-4000:]
    return json.loads((run.dir / "test_metrics.json").read_text())


@pytest.mark.parametrize("name", ["gpu", "fp16", "ddp"])
def test_real_run_completes_its_test_without_java(name, runs):
    if name == "fp16" and not ON_CUDA:
        pytest.skip(NOT_ON_CPU_FP16)
    result = finished(runs[name])
    metrics, out = result["metrics"], runs[name].out
    assert metrics["METEOR"] is None and 0.0 <= metrics["BLEU-4"] <= 1.0, metrics
    assert math.isfinite(metrics["CIDEr"])
    notes = [line for line in out.splitlines() if "METEOR skipped" in line]
    assert len(notes) == 1 and "pip install pycocoevalcap" in notes[0]
    assert "sync_dist=True" not in out  # every rank scores the same gathered captions
    if ON_CUDA:
        assert "GPU available: True" in out and "used: True" in out
        amp = "16bit Automatic Mixed Precision" if name == "fp16" else "bfloat16 Automatic Mixed"
        assert name == "ddp" or amp in out, out[-3000:]
    if name == "ddp":  # one-rank DDP, NCCL initialised on a GPU (gloo on the CPU)
        assert f"distributed_backend={'nccl' if ON_CUDA else 'gloo'}" in out, out[-3000:]


def test_resnet101_fine_tunes_a_few_steps_under_bf16(runs):
    run = runs["resnet101"]
    finished(run)
    with open(run.dir / "csv" / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses), losses


# --- a fixed checkpoint: the same captions on the device and on the CPU --------------------------


def differing(a: list[str], b: list[str], ids: list, what: str) -> float:
    """Fraction of equal captions; prints the images whose captions differ."""
    diff = [(i, x, y) for i, x, y in zip(ids, a, b, strict=True) if x != y]
    for i, x, y in diff:
        print(f"{what}: image {i}: cpu {x!r} / {DEVICE} {y!r}")
    return 1 - len(diff) / len(ids)


@pytest.mark.parametrize("beam", [3, 5])
def test_batched_beam_search_on_the_device_equals_the_cpu(beam, runs):
    """fp32, the same features: only the order of float sums differs (cuBLAS vs MKL), so a
    caption can change only where two beams' scores are within rounding of each other."""
    ckpt = finished(runs["gpu"])["checkpoint"]
    cm = load_model(ckpt, "cpu")
    dm = CaptionDataModule(
        cm.meta["data"]["config"], cache_dir=str(runs["gpu"].cache), preprocess=cm.preprocess,
        vocab=cm.vocab,
    )  # fmt: skip
    ds = dm.dataset("test", evaluation=True)
    images = torch.stack([ds.image_tensor(i) for i in range(len(ds.image_ids))])
    with torch.no_grad():
        feats = cm.model.encode(images)  # (TEST_IMAGES, N, D) on the CPU, given to both searches
    opts = dict(
        beam_size=beam, start_id=cm.vocab.start_id, end_id=cm.vocab.end_id,
        pad_id=cm.vocab.pad_id, max_len=cm.vocab.max_len, banned=cm.vocab.banned(),
    )  # fmt: skip
    with torch.no_grad():
        on_cpu = generate(cm.model.decoder, feats, **opts)
        on_device = generate(copy.deepcopy(cm.model.decoder).to(DEVICE), feats.to(DEVICE), **opts)
    cpu_text = [cm.text(b[0]) for b in on_cpu]
    device_text = [cm.text(b[0]) for b in on_device]
    assert len(cpu_text) == TEST_IMAGES
    assert differing(cpu_text, device_text, ds.image_ids, f"beam {beam}") >= SAME_CAPTIONS


def test_checkpoint_trained_on_the_device_captions_the_same_in_a_cpu_only_process(runs, tmp_path):
    ckpt = finished(runs["gpu"])["checkpoint"]
    env = {**os.environ, "CAPTIONING_CACHE": str(runs["gpu"].cache)}
    cpu_only = {**env, "CUDA_VISIBLE_DEVICES": ""}
    probe = [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"]
    assert subprocess.run(probe, env=cpu_only, capture_output=True, text=True).stdout == "False\n"
    common = [f"ckpt_path={ckpt}", "decode.meteor=false", "report=false"]
    procs = {
        where: subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "evaluate.py"),
                *common,
                f"device={device}",
                f"hydra.run.dir={tmp_path / where}",
            ],
            cwd=ROOT,
            env=e,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for where, device, e in (("device", DEVICE, env), ("cpu", "auto", cpu_only))
    }
    for p in procs.values():
        out = p.communicate(timeout=600)[0]
        assert p.returncode == 0, out[-3000:]
    preds = {
        w: {p["image_id"]: p["caption"] for p in json.loads((tmp_path / w / "predictions.json").read_text())}
        for w in procs
    }  # fmt: skip
    ids = sorted(preds["cpu"])
    assert len(ids) == TEST_IMAGES and sorted(preds["device"]) == ids
    same = differing([preds["cpu"][i] for i in ids], [preds["device"][i] for i in ids], ids, "ckpt")
    assert same >= SAME_CAPTIONS
