"""Beam search on Flickr8k's test images: batched fp32 and bf16 against one image at a time.

    python benchmarks/beam_search.py                          # beams 3,5 x threads 1,2
    python benchmarks/beam_search.py --ckpt x.ckpt            # a trained model (or BENCH_CKPT)
    python benchmarks/beam_search.py --beams 3 --threads 1 --n 200
    python benchmarks/beam_search.py --beams 3 --chunks 32,64,128,256 --n 256   # chunk size
    python benchmarks/beam_search.py --naive                  # + the original batched search

Features: the cached EfficientNet-Lite2 features of the Flickr8k test split when the cache
(CAPTIONING_CACHE, default outputs/cache) has them, else random ones of that shape; decoder:
the checkpoint given, else a random one of the flickr8k experiment's size (the JSON says
which). For every beam size and thread count:

- one at a time (fp32): `beam_search` on each image alone, what the web app pays per image;
- batched fp32 and batched bf16 (`precision="bf16"`, see `captioning.precision`): all images
  in one call. With one thread, also an ablation: bf16 with the output layer in bf16 too
  (emulated), to show why `precision` keeps it in fp32. On a CPU without bf16 units bf16 is not timed (torch's bf16 matmul is a slow
  reference loop there: see roofline.json); its captions are still computed, with
  `precision.emulate_bf16()`, which rounds as bf16 does at fp32 speed.

Every batched caption is compared with one at a time (all beams) and bf16's best caption with
fp32's; with references (the test split) and a checkpoint, BLEU-4 and CIDEr-D of fp32 and bf16.
FLOPs: the decoder rows the search ran (counted by wrapping `step_grouped`) times
`captioning.flops.step_flops`, plus `prepare_flops` per image.

Writes outputs/bench/beam_search.json.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch
from common import flickr8k_decoder, flickr8k_test, hardware, load, load_avg, write_result
from reference import beam_search_reference
from roofline import peaks

from captioning import precision
from captioning.decoding import CHUNK_SIZE, beam_search
from captioning.flops import DecoderSizes, decode_flops


def captions(beams) -> list[list[tuple[int, ...]]]:
    return [[tuple(h.tokens) for h in bs] for bs in beams]


def timed(fn):
    t0, c0, load0 = time.perf_counter(), time.process_time(), load_avg()
    out = fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return out, {
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "load_avg": [load0, load_avg()],  # before and after
    }


def add_rates(t: dict, flops: int) -> None:
    """GFLOP/s per wall second, and per CPU second of this process (all its threads together:
    with one thread, what it ran at while it had a core, which a busy machine changes less)."""
    t["gflops"] = round(flops / t["wall_s"] / 1e9, 1)
    t["gflops_cpu"] = round(flops / t["cpu_s"] / 1e9, 1)


class RowCounter:
    """Counts the decoder rows `step_grouped` runs (an instance attribute over the method)."""

    def __init__(self, dec):
        self.dec, self.rows = dec, 0
        method = type(dec).step_grouped

        def counted(tokens, *args, **kwargs):
            self.rows += tokens.size(0)
            return method(dec, tokens, *args, **kwargs)

        dec.step_grouped = counted

    def take(self) -> int:
        rows, self.rows = self.rows, 0
        return rows


@contextlib.contextmanager
def bf16_logits(dec):
    """The output layer in bf16 as well (an ablation: `precision` keeps it fp32)."""
    weights = dec._inference_weights

    def patched(dtype=torch.float32):
        emb_gates, w_h, b_h, w_ctx, (fc_w, fc_b) = weights(dtype)
        return emb_gates, w_h, b_h, w_ctx, (fc_w.to(dtype), fc_b.to(dtype))

    dec._inference_weights = patched
    try:
        yield
    finally:
        del dec._inference_weights


def scores(beams, refs, vocab) -> dict[str, float] | None:
    if refs is None or vocab is None:
        return None
    from captioning.metrics import score_corpus

    preds = {i: vocab.decode(bs[0].tokens) for i, bs in enumerate(beams)}
    s = score_corpus(preds, dict(enumerate(refs)), meteor=False)
    return {"bleu4": round(s["BLEU-4"], 4), "cider": round(s["CIDEr"], 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--beams", default="3,5")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--ckpt", default=None, help="a checkpoint (else $BENCH_CKPT, else random)")
    p.add_argument("--n", type=int, default=1000, help="images (the test split has 1000)")
    p.add_argument("--chunk", type=int, default=CHUNK_SIZE)
    p.add_argument("--chunks", default="", help="comma-separated chunk sizes to sweep instead")
    p.add_argument("--latency-n", type=int, default=30, help="images for single-image latency")
    p.add_argument("--no-single", action="store_true", help="skip one image at a time")
    p.add_argument("--naive", action="store_true", help="also time the original batched search")
    p.add_argument("--name", default="beam_search", help="outputs/bench/NAME.json")
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the runs of NAME.json for other beams/threads (same decoder and features)",
    )
    a = p.parse_args()

    dec, ids, dec_desc, vocab = flickr8k_decoder(a.ckpt)
    test = flickr8k_test()
    if test is None:
        torch.manual_seed(0)
        feats = torch.randn(a.n, 81, 1280).relu()
        refs, feat_desc = None, "no Flickr8k feature cache: random (relu'd normal) features"
    else:
        feats, refs, feat_desc = test["feats"][: a.n], test["refs"][: a.n], test["description"]
    if feats.size(2) != dec.attention.encoder_att.in_features:
        sys.exit(f"features are {feats.size(2)} wide; the decoder expects another encoder")
    sizes = DecoderSizes.of(dec, feats.size(1))
    kw = dict(
        start_id=ids["start_id"],
        end_id=ids["end_id"],
        pad_id=ids["pad_id"],
        max_len=ids["max_len"],
        banned=tuple(ids["banned"]),
    )
    hw = hardware()
    result = {
        "benchmark": "beam_search",
        "images": len(feats),
        "decoder": dec_desc,
        "decoder_sizes": sizes.__dict__,
        "features": feat_desc,
        "hardware": hw,
        "command": " ".join(["python benchmarks/beam_search.py", *sys.argv[1:]]),
        "runs": [],
    }
    counter = RowCounter(dec)
    old = load(a.name) if a.merge else None
    if old and (old["decoder"], old["features"], old["images"]) == (
        dec_desc,
        feat_desc,
        len(feats),
    ):
        result["runs"] = old["runs"]
        result["command"] = old["command"] + "; " + result["command"]

    if a.chunks:
        sweep = {}
        for c in [int(x) for x in a.chunks.split(",")]:
            beam_search(dec, feats[: min(len(feats), 2 * c)], beam_size=3, chunk_size=c, **kw)
            _, t = timed(lambda c=c: beam_search(dec, feats, beam_size=3, chunk_size=c, **kw))
            sweep[c] = {"ms_per_image_wall": round(t["wall_s"] / len(feats) * 1e3, 2), **t}
            print(c, sweep[c], flush=True)
        result["chunk_sweep"] = sweep
        print(write_result(a.name + "_chunks", result))
        return

    for threads in [int(x) for x in a.threads.split(",")]:
        torch.set_num_threads(threads)
        peak = peaks(threads)
        for K in [int(x) for x in a.beams.split(",")]:
            run = {
                "beam": K,
                "threads": threads,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            }
            kwk = {**kw, "beam_size": K, "chunk_size": a.chunk}
            beam_search(dec, feats[: a.chunk], **kwk)  # warm-up
            counter.take()
            fp32, run["fp32"] = timed(lambda kwk=kwk: beam_search(dec, feats, **kwk))
            rows = counter.take()
            flops = decode_flops(sizes, len(feats), rows)
            run["row_steps"], run["gflop_per_image"] = rows, round(flops / len(feats) / 1e9, 3)
            add_rates(run["fp32"], flops)
            print(K, threads, "fp32", run["fp32"], flush=True)

            if hw["bf16_units"]:
                beam_search(dec, feats[: a.chunk], precision="bf16", **kwk)  # casts the weights
                bf16, run["bf16"] = timed(
                    lambda kwk=kwk: beam_search(dec, feats, precision="bf16", **kwk)
                )
                rows_bf16 = counter.take()
                add_rates(run["bf16"], decode_flops(sizes, len(feats), rows_bf16))
            else:
                with precision.emulate_bf16():
                    bf16 = beam_search(dec, feats, precision="bf16", **kwk)
                counter.take()
                run["bf16"] = {"skipped": "no bf16 units (amx_bf16 / avx512_bf16) on this CPU"}
            run["bf16"]["emulated"] = not hw["bf16_units"]
            run["bf16_same_best_caption"] = sum(
                g[0] == w[0] for g, w in zip(captions(bf16), captions(fp32), strict=True)
            )
            run["bf16_same_all_beams"] = sum(
                g == w for g, w in zip(captions(bf16), captions(fp32), strict=True)
            )
            print(K, threads, "bf16", run["bf16"], run["bf16_same_best_caption"], flush=True)
            if threads == 1:  # captions do not depend on threads: score them once
                with precision.emulate_bf16(), bf16_logits(dec):
                    ablation = beam_search(dec, feats, precision="bf16", **kwk)
                counter.take()
                run["bf16_logits_same_best_caption"] = sum(
                    g[0] == w[0] for g, w in zip(captions(ablation), captions(fp32), strict=True)
                )
                run["scores"] = {
                    "fp32": scores(fp32, refs, vocab),
                    "bf16": scores(bf16, refs, vocab),
                }

            if not a.no_single:
                singles, run["one_at_a_time"] = timed(
                    lambda kwk=kwk: [
                        beam_search(dec, feats[i : i + 1], **kwk)[0] for i in range(len(feats))
                    ]
                )
                counter.take()
                add_rates(run["one_at_a_time"], flops)
                got, want = captions(fp32), captions(singles)
                run["identical_all_beams"] = sum(g == w for g, w in zip(got, want, strict=True))
                run["max_score_diff"] = max(
                    abs(x.score - y.score)
                    for bs, ss in zip(fp32, singles, strict=True)
                    for x, y in zip(bs, ss, strict=True)
                )
                print(K, threads, "one at a time", run["one_at_a_time"], flush=True)
            if threads == 1 and K == 3 and a.latency_n:
                run["single_image_latency_ms"] = latency(
                    dec, feats, {**kw, "beam_size": K}, a.latency_n
                )
            if a.naive:
                _, run["reference_batched"] = timed(
                    lambda K=K: beam_search_reference(dec, feats, beam_size=K, **kw)
                )
                counter.take()
            if peak:
                for t, p in (
                    (run["fp32"], peak["fp32"]),
                    (run.get("one_at_a_time"), peak["fp32"]),
                    (run["bf16"], peak["bf16"]),
                ):
                    if t and "gflops" in t:
                        t["fraction_of_peak"] = round(t["gflops"] / p["gflops"], 3)
                        t["fraction_of_peak_cpu"] = round(t["gflops_cpu"] / p["gflops_cpu"], 3)
            lengths = [len(bs[0].tokens) for bs in fp32]
            run["best_caption_words_mean"] = round(statistics.fmean(lengths), 2)
            result["runs"] = [
                x for x in result["runs"] if (x["beam"], x["threads"]) != (K, threads)
            ] + [run]
            result["runs"].sort(key=lambda x: (x["threads"], x["beam"]))
            write_result(a.name, result)  # partial results survive an interrupted run
    result["load_avg_end"] = load_avg()
    print(write_result(a.name, result))


def latency(dec, feats, kw, n: int) -> dict:
    """Median ms of one image alone, the original search and the current one, alternating."""
    old, new = [], []
    for i in range(min(n, len(feats))):
        x = feats[i : i + 1]
        t0 = time.perf_counter()
        beam_search_reference(dec, x, **kw)
        t1 = time.perf_counter()
        beam_search(dec, x, **kw)
        old.append((t1 - t0) * 1e3)
        new.append((time.perf_counter() - t1) * 1e3)
    return {
        "reference_median": round(statistics.median(old), 1),
        "current_median": round(statistics.median(new), 1),
        "images": len(old),
        "load_avg": load_avg(),
    }


if __name__ == "__main__":
    main()
