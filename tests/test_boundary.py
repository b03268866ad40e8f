"""The pure core stays free of the training stack, and checkpoints of the older code still load."""

from __future__ import annotations

import subprocess
import sys

import torch
from PIL import Image

from captioning.decoding import generate
from captioning.inference import load_model
from captioning.model import build_captioner
from captioning.vocab import Vocab

CORE = (
    "captioning.inference",
    "captioning.evaluation",
    "captioning.model",
    "captioning.decoding",
    "captioning.metrics",
    "captioning.checkpoint",
    "captioning.scst",
    "captioning.distill",
    "captioning.viz",
)


def test_the_core_imports_neither_lightning_nor_hydra():
    code = (
        f"import sys; import {', '.join(CORE)}; "
        "print([m for m in sys.modules if m.split('.')[0] in ('lightning', 'hydra') "
        "or m.startswith('captioning.training')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# The checkpoint a run of the code as of commit 666a3c6 wrote: Lightning's keys, and the
# "captioning" block exactly as that code's `CaptioningModule.on_save_checkpoint` built it.
def old_format_checkpoint(model: torch.nn.Module, vocab: Vocab, encoder: dict, decoder: dict):
    return {
        "epoch": 2,
        "global_step": 30,
        "pytorch-lightning_version": "2.6.0",
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "loops": {},
        "callbacks": {},
        "optimizer_states": [],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"encoder": encoder, "decoder": decoder, "vocab": vocab.to_dict()},
        "captioning": {
            "format": 1,
            "encoder": dict(encoder),
            "decoder": dict(decoder),
            "vocab": vocab.to_dict(),
            "preprocess": model.encoder.preprocess.to_dict(),
            "data": {"name": "synthetic", "vocab_size": len(vocab)},
            "metrics": {"val/bleu4": 0.5, "val/bleu4_best": 0.5},
            "monitor": "val/bleu4",
            "monitor_best": 0.5,
            "code_version": "0.1.0+666a3c6",
        },
    }


def test_a_checkpoint_in_the_old_format_loads_and_captions_identically(tmp_path):
    torch.manual_seed(0)
    vocab = Vocab.build(["a red circle", "a blue square above a green circle"], max_len=8)
    encoder = {"name": "small_cnn", "pretrained": False, "channels": [8, 8, 8, 16]}
    decoder = {"name": "soft_attention", "embed_dim": 16, "hidden_dim": 24, "attention_dim": 12}
    model = build_captioner(encoder, decoder, len(vocab)).eval()
    # Random weights pick words almost uniformly: sharpen the output so beams differ clearly.
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.mul_(4)
    path = tmp_path / "old.ckpt"
    torch.save(old_format_checkpoint(model, vocab, encoder, decoder), path)

    loaded = load_model(path)
    images = [Image.new("RGB", (80, 64), c) for c in ("red", "navy", "white")]
    got = loaded.caption(images, beam_size=3)

    pixels = loaded.images_to_tensor(images)
    with torch.no_grad():
        want = generate(
            model.decoder,
            model.encode(pixels),
            beam_size=3,
            start_id=vocab.start_id,
            end_id=vocab.end_id,
            pad_id=vocab.pad_id,
            max_len=vocab.max_len,
            length_penalty=1.0,
            banned=vocab.banned(False),
        )
    assert [[h.tokens for h in beams] for beams in got] == [
        [h.tokens for h in beams] for beams in want
    ]
    assert [[h.score for h in beams] for beams in got] == [
        [h.score for h in beams] for beams in want
    ]
    assert loaded.meta["monitor"] == "val/bleu4" and loaded.vocab.itos == vocab.itos
