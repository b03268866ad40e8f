"""The self-critical step's gradient pass: each image's regions prepared once, or per sample.

    python benchmarks/scst_step.py                    # soft attention and Up-Down, 2 threads
    python benchmarks/scst_step.py --threads 1 --rounds 5

A self-critical batch (experiment=flickr8k_scst: 16 images, 5 samples each) samples 80 captions
without gradients, then runs the teacher-forced forward over them with gradients
(`scst.sequence_log_probs`). The decoders project every image's 81 regions before the first step
(`Decoder.prepare`: soft attention's attention projection, Up-Down's region embedding and its
projection); with `group=5` that runs once per image and its gradient sums over the samples,
without it once per sample on copied features, as before. Both variants are timed here, with
the sampling pass for scale, on random 9x9x1280 features and random weights of the flickr8k
experiments' sizes (speed does not depend on the weights), sampled captions replaced by random
words with Flickr8k-like lengths (a random decoder's samples run to the length limit). Before
timing, the two variants' log-probabilities and gradients are checked against each other.

With `--checkpoint`, the sampling pass is also timed as training runs it: that checkpoint's
decoder on cached Flickr8k test features (16 images a batch, 5 samples each), with rows leaving
the batch as their samples end (`sample(compact=True)`, the default) and with every row stepping
until the batch's last sample ends (`compact=False`). Both draw the same captions from the same
seed (checked). Writes outputs/bench/scst_step.json.

    python benchmarks/scst_step.py --threads 1 --checkpoint outputs/flickr8k/updown_ce/checkpoints/epoch008.ckpt
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from common import (
    DECODER_SIZES,
    FLICKR8K_VOCAB,
    LITE2_DIM,
    LITE2_REGIONS,
    hardware,
    interleaved,
    load_avg,
    write_result,
)

from captioning.decoders import build_decoder
from captioning.decoding import sample
from captioning.scst import scst_loss, sequence_log_probs
from captioning.vocab import Vocab

IMAGES, SAMPLES = 16, 5  # experiment=flickr8k_scst's batch


def toy_vocab() -> Vocab:
    words = [f"w{i}" for i in range(FLICKR8K_VOCAB - 4)]
    return Vocab.build([" ".join(words)], min_freq=1, max_len=20)


def random_samples(rows: int, seed: int = 0) -> torch.Tensor:
    """Sampled captions' tokens (rows, L): random words, Flickr8k-like lengths, <end>, padding."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.normal(11.8, 3.8, rows).round(), 2, 20).astype(int)
    out = torch.zeros(rows, int(lengths.max()) + 1, dtype=torch.long)
    for r, n in enumerate(lengths):
        out[r, :n] = torch.from_numpy(rng.integers(4, FLICKR8K_VOCAB, n))
        out[r, n] = 2  # <end>
    return out


def bench(
    dec, feats: torch.Tensor, tokens: torch.Tensor, advantage: torch.Tensor, vocab: Vocab,
    rounds: int,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Times of the two gradient passes (checked equal first) and of the sampling pass."""
    banned = vocab.banned()
    copies = feats.repeat_interleave(SAMPLES, dim=0)

    def grad_pass(grouped: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        dec.zero_grad(set_to_none=True)
        if grouped:
            logp, mask = sequence_log_probs(dec, feats, tokens, vocab, banned, SAMPLES)
        else:
            logp, mask = sequence_log_probs(dec, copies, tokens, vocab, banned)
        scst_loss(logp, mask, advantage).backward()
        return logp.detach(), {k: p.grad for k, p in dec.named_parameters()}

    a, ga = grad_pass(True)
    b, gb = grad_pass(False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-3, atol=1e-6, msg=k)

    def sampling() -> None:
        with torch.no_grad():
            sample(dec, feats, num_samples=SAMPLES, start_id=vocab.start_id,
                   end_id=vocab.end_id, pad_id=vocab.pad_id, max_len=tokens.size(1),
                   banned=banned)  # fmt: skip

    fns = {"grouped": lambda: grad_pass(True), "copied": lambda: grad_pass(False)}
    return interleaved({**fns, "sampling": sampling}, rounds=rounds)


def bench_trained_sampling(ckpt: str, batches: int, rounds: int) -> dict:
    """Sampling with a trained decoder on real features: compact vs every row to the end."""
    from common import ROOT, flickr8k_test

    from captioning.inference import load_model

    cm = load_model(ckpt)
    dec, vocab = cm.model.decoder.eval(), cm.vocab
    test = flickr8k_test(encoder=cm.meta["encoder"]["name"])
    if test is None:
        raise SystemExit(f"no cached Flickr8k test features of {cm.meta['encoder']['name']}")
    feats = test["feats"][: batches * IMAGES].split(IMAGES)
    kw = dict(num_samples=SAMPLES, start_id=vocab.start_id, end_id=vocab.end_id,
              pad_id=vocab.pad_id, max_len=vocab.max_len, banned=vocab.banned())  # fmt: skip

    def run(compact: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        with torch.no_grad():
            return [sample(dec, f, compact=compact, **kw) for f in feats]

    a, b = run(True), run(False)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), "compact changed a draw"
    lengths = torch.cat([(t != vocab.pad_id).sum(1) for t in a])  # words + <end>
    full_rows = sum(t.numel() for t in a)  # every row to its batch's longest sample
    times = interleaved({"compact": lambda: run(True), "full": lambda: run(False)}, rounds)
    return {
        "checkpoint": ckpt,
        "features": test["description"].replace(f"{ROOT}/", ""),
        "batches": batches,
        "mean_sample_words": float(lengths.float().mean()) - 1,
        "row_steps_compact": int(lengths.sum()),
        "row_steps_full": full_rows,
        "times": times,
        "speedup": times["full"]["wall_s"] / times["compact"]["wall_s"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--checkpoint", help="also time sampling with this checkpoint's decoder")
    ap.add_argument("--batches", type=int, default=8, help="with --checkpoint: batches timed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vocab = toy_vocab()
    assert len(vocab) == FLICKR8K_VOCAB, len(vocab)
    feats = torch.randn(
        IMAGES, LITE2_REGIONS, LITE2_DIM, generator=torch.Generator().manual_seed(0)
    )
    tokens = random_samples(IMAGES * SAMPLES)
    advantage = torch.randn(IMAGES * SAMPLES, generator=torch.Generator().manual_seed(1))
    result = {"hardware": hardware(), "threads": args.threads, "load_before": load_avg()}
    result.update(images=IMAGES, samples=SAMPLES, decoders={})
    for name, sizes in DECODER_SIZES.items():
        torch.manual_seed(0)
        dec = build_decoder(name, FLICKR8K_VOCAB, LITE2_DIM, dropout=0.5, **sizes).eval()
        times = bench(dec, feats, tokens, advantage, vocab, args.rounds)
        g, c = times["grouped"]["wall_s"], times["copied"]["wall_s"]
        result["decoders"][name] = {"times": times, "speedup": c / g}
        print(
            f"{name:15s} gradient pass: grouped {g * 1e3:7.1f} ms  copied {c * 1e3:7.1f} ms  "
            f"({c / g:.2f}x)   sampling {times['sampling']['wall_s'] * 1e3:7.1f} ms "
            f"(random weights: samples to the length limit)"
        )
    if args.checkpoint:
        r = bench_trained_sampling(args.checkpoint, args.batches, args.rounds)
        result["trained_sampling"] = r
        c, f = r["times"]["compact"]["wall_s"], r["times"]["full"]["wall_s"]
        print(
            f"sampling, {r['checkpoint']}: {args.batches} batches, mean {r['mean_sample_words']:.1f}"
            f" words; rows leave as they end {c / args.batches * 1e3:.0f} ms a batch, every row to"
            f" the end {f / args.batches * 1e3:.0f} ms ({f / c:.2f}x; row-steps"
            f" {r['row_steps_compact']} vs {r['row_steps_full']})"
        )
    result["load_after"] = load_avg()
    print(f"load average before/after: {result['load_before']} / {result['load_after']}")
    print(f"wrote {write_result('scst_step', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
