"""Training step of the attention decoder: the fast forward against the step-by-step one.

    python benchmarks/train_step.py                  # fp32, eager, 1 thread
    python benchmarks/train_step.py --compile        # also compile_step() (minutes on a CPU)
    python benchmarks/train_step.py --bf16           # also bf16 autocast of the fast path
    python benchmarks/train_step.py --bf16 --curve 200   # + 200-step loss curves, fp32 vs bf16
    python benchmarks/train_step.py --decoder updown --name train_step_updown   # Up-Down's

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
FLOPs per step: `captioning.flops.train_flops` of the batch (3 x the forward's multiply-adds
over the real target words), so captions/s is also GFLOP/s, against roofline.json's peak
(soft attention only). `--decoder updown`: experiment=flickr8k_updown's decoder instead, with
"fast+lengths" its fast forward (`UpDownDecoder.forward`).

bf16 (`--bf16`, `--curve`) runs under `torch.autocast("cpu", torch.bfloat16)`, as Lightning's
`trainer.precision=bf16-mixed` does; on a CPU without bf16 units it is skipped (torch's bf16
matmul is a slow reference loop there) unless `--force-bf16`. `--curve N`: N AdamW steps from
the same weights on the same batches, fp32, bf16, and fp32 again with another dropout seed: the
difference between the two fp32 curves is the noise that bf16's difference is measured against.
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
    CACHE,
    DECODER_SIZES,
    FLICKR8K_VOCAB,
    LITE2_DIM,
    LITE2_REGIONS,
    hardware,
    interleaved,
    load_avg,
    write_result,
)
from reference import forward_hoisted_reference
from roofline import peaks

from captioning.decoders import build_decoder
from captioning.flops import DecoderSizes, train_flops


def flickr8k_captions() -> tuple[list[list[int]], int, str]:
    """Flickr8k's training captions encoded as training encodes them: (captions, V, source).

    Vocabulary from the training split with min_word_freq 5 and at most 20 words, as
    conf/data/flickr8k.yaml. Without the converted dataset: random words, Flickr8k-like lengths.
    """
    import glob

    from captioning.vocab import Vocab

    for d in sorted(glob.glob(str(CACHE / "flickr8k-*"))):
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


def loss_curves(dec, captions, B: int, steps: int) -> dict:
    """Per-step training loss of `steps` AdamW steps from the decoder's current weights: fp32
    (dropout seed 0), bf16 autocast (seed 0) and fp32 (seed 1), each from the same start."""
    import copy

    start = copy.deepcopy(dec.state_dict())
    losses = {}
    for name, bf16, seed in (("fp32", False, 0), ("bf16", True, 0), ("fp32_seed1", False, 1)):
        dec.load_state_dict(start)
        opt = torch.optim.AdamW(dec.parameters(), lr=4e-4)
        torch.manual_seed(seed)
        curve = []
        t0 = time.perf_counter()
        for i in range(steps):  # batch i is the same in every curve (made on the fly: memory)
            ((feats, inputs, targets),) = make_batches(captions, 1, B, seed=1000 + i)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(dec, "fast+lengths", feats, inputs, targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(dec.parameters(), 5.0)
            opt.step()
            curve.append(round(loss.item(), 4))
        losses[name] = curve
        print(name, "curve", round(time.perf_counter() - t0, 1), "s", curve[::20], flush=True)
    dec.load_state_dict(start)

    def gap(x: list[float], y: list[float]) -> dict:
        d = [abs(p - q) for p, q in zip(x, y, strict=True)]
        tail = len(x) // 10 or 1  # the last tenth of the steps, averaged
        return {
            "mean_abs": round(sum(d) / len(d), 4),
            "max_abs": round(max(d), 4),
            "last_mean_diff": round(abs(sum(x[-tail:]) - sum(y[-tail:])) / tail, 4),
        }

    return {
        "steps": steps,
        "first_last": {k: (v[0], v[-1]) for k, v in losses.items()},
        "bf16_vs_fp32": gap(losses["bf16"], losses["fp32"]),
        "noise_fp32_dropout_seeds": gap(losses["fp32_seed1"], losses["fp32"]),
        "losses": losses,
        "load_avg": load_avg(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="timed steps per variant")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", default="stepwise,fast+lengths", help="+ hoisted, fast")
    p.add_argument("--compile", action="store_true", help="also fast+lengths after compile_step")
    p.add_argument("--bf16", action="store_true", help="also fast+lengths under bf16 autocast")
    p.add_argument("--force-bf16", action="store_true", help="bf16 even without bf16 units")
    p.add_argument("--curve", type=int, default=0, help="loss curves of N steps, fp32 vs bf16")
    p.add_argument("--name", default="train_step", help="outputs/bench/NAME.json")
    p.add_argument("--decoder", default="soft_attention", choices=sorted(DECODER_SIZES))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    captions, vocab_size, captions_desc = flickr8k_captions()
    dec = build_decoder(
        a.decoder,
        vocab_size=vocab_size,
        encoder_dim=LITE2_DIM,
        dropout=0.5,
        **DECODER_SIZES[a.decoder],
    ).train()
    opt = torch.optim.AdamW(dec.parameters(), lr=1e-4)
    batches = make_batches(captions, a.rounds + 1, a.batch)
    variants = a.variants.split(",")
    hw = hardware()
    bf16_ok = bool(hw["bf16_units"]) or a.force_bf16
    no_bf16 = "no bf16 units (amx_bf16 / avx512_bf16) on this CPU: bf16 not run (--force-bf16)"
    words = [int((t != 0).sum()) for _, _, t in batches]
    step_flops = None  # FLOPs are counted for soft attention's shapes
    if a.decoder == "soft_attention":
        sizes = DecoderSizes.of(dec, LITE2_REGIONS)
        step_flops = sum(train_flops(sizes, a.batch, w) for w in words) / len(words)
    result = {
        "benchmark": "train_step",
        "batch": a.batch,
        "captions": captions_desc,
        "decoder": {
            "vocab": vocab_size,
            "encoder_dim": LITE2_DIM,
            "regions": LITE2_REGIONS,
            "name": a.decoder,
            **DECODER_SIZES[a.decoder],
            "dropout": 0.5,
        },
        "hardware": hw,
        "command": " ".join(["python benchmarks/train_step.py", *sys.argv[1:]]),
        "gflop_per_step": step_flops and round(step_flops / 1e9, 2),
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
    if a.bf16 and bf16_ok:
        fns["fast+lengths bf16"] = runner("fast+lengths", autocast=True)
    elif a.bf16:
        result["bf16_skipped"] = no_bf16
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
    peak = peaks(a.threads)
    for v, t in timings.items():
        rows[v] = {
            "captions_per_s_cpu": round(a.batch / t["cpu_s"], 1),
            "captions_per_s_wall": round(a.batch / t["wall_s"], 1),
            "step_ms_cpu": round(t["cpu_s"] * 1e3),
            "step_ms_wall": round(t["wall_s"] * 1e3),
            "speedup_cpu": round(base["cpu_s"] / t["cpu_s"], 2),
            "speedup_wall": round(base["wall_s"] / t["wall_s"], 2),
        }
        if step_flops:
            rows[v]["gflops"] = round(step_flops / t["wall_s"] / 1e9, 1)
            rows[v]["gflops_cpu"] = round(step_flops / t["cpu_s"] / 1e9, 1)
        if peak and step_flops:
            ref = peak["bf16" if v.endswith("bf16") else "fp32"]
            rows[v]["fraction_of_peak"] = round(rows[v]["gflops"] / ref["gflops"], 3)
            rows[v]["fraction_of_peak_cpu"] = round(rows[v]["gflops_cpu"] / ref["gflops_cpu"], 3)
        print(v, rows[v], flush=True)
    result["variants"] = rows
    result["load_avg_timed"] = load_avg()
    if a.curve and bf16_ok:
        result["curve"] = loss_curves(dec, captions, a.batch, a.curve)
        print("curve", {k: v for k, v in result["curve"].items() if k != "losses"}, flush=True)
    elif a.curve:
        result["curve"] = {"skipped": no_bf16}
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
