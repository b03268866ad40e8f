"""Training step of the attention decoder: the fast forward against the step-by-step one.

    python benchmarks/train_step.py                  # fp32, eager, 1 thread
    python benchmarks/train_step.py --compile        # also compile_step() (minutes on a CPU)
    python benchmarks/train_step.py --bf16           # also bf16 autocast of the fast path

One step = forward, the LightningModule's loss (cross-entropy + attention regulariser), backward,
AdamW step, on a batch of 64 Flickr8k training captions (from the converted dataset when it is
there, encoded as training does; else random words with Flickr8k-like lengths) and random
9x9x1280 features; a decoder of the flickr8k experiment's size (random weights: speed does not
depend on them), the same weights for every variant:

- stepwise: `Decoder.forward_stepwise`, one `step` (an `nn.LSTMCell`) at a time, the baseline
- hoisted: the forward this project started with (`reference.forward_hoisted_reference`)
- fast: `SoftAttentionDecoder.forward` without lengths (every step of every row)
- fast+lengths: with the number of real targets per row, as the LightningModule passes them

Before timing, each variant's loss and gradients are checked against stepwise's (dropout off).
Writes outputs/bench/train_step.json.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    FLICKR8K_DECODER,
    FLICKR8K_VOCAB,
    LITE2_DIM,
    LITE2_REGIONS,
    ROOT,
    hardware,
    interleaved,
    load_avg,
    write_result,
)
from reference import forward_hoisted_reference

from captioning.decoders import build_decoder


def flickr8k_captions() -> tuple[list[list[int]], int, str]:
    """Flickr8k's training captions encoded as training encodes them: (captions, V, source).

    Vocabulary from the training split with min_word_freq 5 and at most 20 words, as
    conf/data/flickr8k.yaml. Without the converted dataset: random words, Flickr8k-like lengths.
    """
    import glob

    from captioning.vocab import Vocab

    for d in sorted(glob.glob(str(ROOT / "outputs" / "cache" / "flickr8k-*"))):
        try:
            import datasets

            caps = [c for cs in datasets.load_from_disk(d)["train"]["captions"] for c in cs]
        except Exception:  # not converted (yet)
            continue
        vocab = Vocab.build(caps, min_freq=5, max_len=20)
        return [vocab.encode(c) for c in caps], len(vocab), f"Flickr8k train captions ({d})"
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.normal(11.8, 3.8, 30000).round(), 2, 20).astype(int)
    caps = [[1, *rng.integers(4, FLICKR8K_VOCAB, n).tolist(), 2] for n in lengths]
    return caps, FLICKR8K_VOCAB, "random words, lengths drawn like Flickr8k's (N(11.8, 3.8))"


def make_batches(captions: list[list[int]], n: int, B: int, seed: int = 0):
    """n batches of B captions: (feats (B, N, D), inputs (B, T), targets (B, T)), padded."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        picked = [torch.tensor(captions[i]) for i in rng.choice(len(captions), B, replace=False)]
        caps = torch.nn.utils.rnn.pad_sequence(picked, batch_first=True)  # (B, T + 1)
        feats = torch.randn(B, LITE2_REGIONS, LITE2_DIM, generator=g).relu()
        out.append((feats, caps[:, :-1], caps[:, 1:]))
    return out


def loss_fn(dec, variant: str, feats, inputs, targets):
    if variant == "stepwise":
        logits, alphas = dec.forward_stepwise(feats, inputs)
    elif variant == "hoisted":
        logits, alphas = forward_hoisted_reference(dec, feats, inputs)
    elif variant == "fast":
        logits, alphas = dec(feats, inputs)
    else:
        logits, alphas = dec(feats, inputs, lengths=(targets != 0).sum(1))
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=0)
    mask = (targets != 0).to(logits.dtype)
    return ce + dec.regularizer(alphas, mask)


def check_equal(dec, variants, batch) -> dict[str, dict[str, float]]:
    """Max |loss - stepwise loss| and max |grad - stepwise grad| per variant, dropout off."""
    p = dec.dropout.p
    dec.dropout.p = 0.0
    out, ref = {}, None
    for v in ["stepwise", *[v for v in variants if v != "stepwise"]]:
        dec.zero_grad(set_to_none=True)
        loss = loss_fn(dec, v, *batch)
        loss.backward()
        grads = {k: q.grad.clone() for k, q in dec.named_parameters() if q.grad is not None}
        if ref is None:
            ref = (loss.item(), grads)
            continue
        out[v] = {
            "loss_diff": abs(loss.item() - ref[0]),
            "max_grad_diff": max((grads[k] - ref[1][k]).abs().max().item() for k in ref[1]),
        }
    dec.dropout.p = p
    dec.zero_grad(set_to_none=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="timed steps per variant")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", default="stepwise,hoisted,fast,fast+lengths")
    p.add_argument("--compile", action="store_true", help="also fast+lengths after compile_step")
    p.add_argument("--bf16", action="store_true", help="also fast+lengths under bf16 autocast")
    p.add_argument("--name", default="train_step", help="outputs/bench/NAME.json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    captions, vocab_size, captions_desc = flickr8k_captions()
    dec = build_decoder(
        "soft_attention",
        vocab_size=vocab_size,
        encoder_dim=LITE2_DIM,
        dropout=0.5,
        **FLICKR8K_DECODER,
    ).train()
    opt = torch.optim.AdamW(dec.parameters(), lr=1e-4)
    batches = make_batches(captions, a.rounds + 1, a.batch)
    variants = a.variants.split(",")
    result = {
        "benchmark": "train_step",
        "batch": a.batch,
        "captions": captions_desc,
        "decoder": {
            "vocab": vocab_size,
            "encoder_dim": LITE2_DIM,
            "regions": LITE2_REGIONS,
            **FLICKR8K_DECODER,
            "dropout": 0.5,
        },
        "hardware": hardware(),
        "command": " ".join(["python benchmarks/train_step.py", *sys.argv[1:]]),
    }
    real = sum(int((t != 0).sum()) for _, _, t in batches)
    padded = sum(t.numel() for _, _, t in batches)
    result["real_target_fraction"] = round(real / padded, 3)

    result["equality_vs_stepwise_fp32"] = check_equal(dec, variants, batches[0])
    print("equality", result["equality_vs_stepwise_fp32"], flush=True)

    def runner(variant: str, autocast: bool = False):
        it = iter(range(10**9))

        def run():
            feats, inputs, targets = batches[next(it) % len(batches)]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = loss_fn(dec, variant, feats, inputs, targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return run

    fns = {v: runner(v) for v in variants}
    if a.bf16:
        fns["fast+lengths bf16"] = runner("fast+lengths", autocast=True)
    timings = interleaved(fns, rounds=a.rounds)
    if a.compile:
        t0 = time.perf_counter()
        dec.compile_step()
        runner("fast+lengths")()
        result["compile_s"] = round(time.perf_counter() - t0, 1)
        timings["fast+lengths compiled"] = interleaved(
            {"c": runner("fast+lengths")}, rounds=a.rounds
        )["c"]
        result["equality_compiled_vs_stepwise_fp32"] = check_equal(
            dec, ["fast+lengths"], batches[0]
        )
    base = timings["stepwise"]
    rows = {}
    for v, t in timings.items():
        rows[v] = {
            "captions_per_s_cpu": round(a.batch / t["cpu_s"], 1),
            "captions_per_s_wall": round(a.batch / t["wall_s"], 1),
            "step_ms_cpu": round(t["cpu_s"] * 1e3),
            "step_ms_wall": round(t["wall_s"] * 1e3),
            "speedup_cpu": round(base["cpu_s"] / t["cpu_s"], 2),
            "speedup_wall": round(base["wall_s"] / t["wall_s"], 2),
        }
        print(v, rows[v], flush=True)
    result["variants"] = rows
    result["load_avg_end"] = load_avg()
    result["threads"] = a.threads
    print(write_result(a.name, result))
    print("\n| variant | captions/s cpu (wall) | step ms cpu | vs stepwise cpu (wall) | load |")
    print("| --- | --- | --- | --- | --- |")
    for v, r in rows.items():
        print(
            f"| {v} | {r['captions_per_s_cpu']} ({r['captions_per_s_wall']}) | "
            f"{r['step_ms_cpu']} | {r['speedup_cpu']}x ({r['speedup_wall']}x) | "
            f"{result['load_avg_end']} |"
        )


if __name__ == "__main__":
    main()
