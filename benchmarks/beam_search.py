"""Batched beam search against one image at a time, same decoder, same features.

    python benchmarks/beam_search.py --beam 3            # all 1000 Flickr8k test images
    python benchmarks/beam_search.py --beam 5 --bf16     # also time bf16 autocast
    python benchmarks/beam_search.py --beam 3 --chunks 32,64,128,256 --n 256   # pick the chunk
    python benchmarks/beam_search.py --beam 3 --naive    # also the original batched search

Features: the cached EfficientNet-Lite2 features of the Flickr8k test split when they exist,
else random ones of that shape; decoder: the trained flickr8k checkpoint when it exists, else a
random one of that size (all of which the JSON says). Every caption of the batched search is
compared with the one-at-a-time search (beams, tokens). "Single-image latency" is the decoder's
part of what the web app pays per image: `beam_search` on one image, with the search this
project started with (`reference.beam_search_reference`) and with the current one.

Prints JSON and writes outputs/bench/beam_search_k{K}.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from common import flickr8k_decoder, hardware, lite2_test_features, load_avg, write_result
from reference import beam_search_reference

from captioning.decoding import CHUNK_SIZE, beam_search


def captions(beams) -> list[list[tuple[int, ...]]]:
    return [[tuple(h.tokens) for h in bs] for bs in beams]


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--n", type=int, default=1000, help="images (the test split has 1000)")
    p.add_argument("--chunk", type=int, default=CHUNK_SIZE)
    p.add_argument("--chunks", default="", help="comma-separated chunk sizes to sweep instead")
    p.add_argument("--latency-n", type=int, default=30, help="images for single-image latency")
    p.add_argument("--naive", action="store_true", help="also time the original batched search")
    p.add_argument("--bf16", action="store_true", help="also time bf16 autocast (batched)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default=None, help="output name (default beam_search_k{beam})")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    dec, ids, dec_desc = flickr8k_decoder()
    found = lite2_test_features()
    if found is None:
        torch.manual_seed(0)
        feats, feat_desc = torch.randn(a.n, 81, 1280).relu(), "random (relu'd normal) features"
    else:
        feats, feat_desc = found[0][: a.n], f"Flickr8k test split, cached at {found[1]}"
    kw = dict(
        start_id=ids["start_id"],
        end_id=ids["end_id"],
        pad_id=ids["pad_id"],
        max_len=ids["max_len"],
        banned=tuple(ids["banned"]),
        beam_size=a.beam,
    )
    result = {
        "benchmark": "beam_search",
        "beam": a.beam,
        "images": len(feats),
        "decoder": dec_desc,
        "features": feat_desc,
        "hardware": hardware(),
        "command": " ".join(["python benchmarks/beam_search.py", *sys.argv[1:]]),
    }

    if a.chunks:
        sweep = {}
        for c in [int(x) for x in a.chunks.split(",")]:
            beam_search(dec, feats[: min(len(feats), 2 * c)], chunk_size=c, **kw)  # warm-up
            _, wall, cpu = timed(lambda c=c: beam_search(dec, feats, chunk_size=c, **kw))
            sweep[c] = {
                "ms_per_image_cpu": round(cpu / len(feats) * 1e3, 2),
                "ms_per_image_wall": round(wall / len(feats) * 1e3, 2),
                "load_avg": load_avg(),
            }
            print(c, sweep[c], flush=True)
        result["chunk_sweep"] = sweep
        path = write_result(a.name or f"beam_search_chunks_k{a.beam}", result)
        print(path)
        return

    # Single-image latency, old and new search, alternating images so load hits both alike.
    lat_old, lat_new = [], []
    beam_search(dec, feats[:1], **kw)
    for i in range(min(a.latency_n, len(feats))):
        _, w_old, _ = timed(lambda i=i: beam_search_reference(dec, feats[i : i + 1], **kw))
        _, w_new, _ = timed(lambda i=i: beam_search(dec, feats[i : i + 1], **kw))
        lat_old.append(w_old * 1e3)
        lat_new.append(w_new * 1e3)
    result["single_image_latency_ms"] = {
        "reference_median": round(statistics.median(lat_old), 1),
        "current_median": round(statistics.median(lat_new), 1),
        "reference_min": round(min(lat_old), 1),
        "current_min": round(min(lat_new), 1),
        "images": len(lat_old),
        "load_avg": load_avg(),
    }
    print("latency", result["single_image_latency_ms"], flush=True)

    beam_search(dec, feats[: a.chunk], chunk_size=a.chunk, **kw)  # warm-up
    batched, b_wall, b_cpu = timed(lambda: beam_search(dec, feats, chunk_size=a.chunk, **kw))
    result["batched"] = {
        "wall_s": round(b_wall, 2),
        "cpu_s": round(b_cpu, 2),
        "chunk": a.chunk,
        "load_avg": load_avg(),
    }
    print("batched", result["batched"], flush=True)

    singles, s_wall, s_cpu = timed(
        lambda: [beam_search(dec, feats[i : i + 1], **kw)[0] for i in range(len(feats))]
    )
    result["one_at_a_time"] = {
        "wall_s": round(s_wall, 2),
        "cpu_s": round(s_cpu, 2),
        "load_avg": load_avg(),
    }
    print("one at a time", result["one_at_a_time"], flush=True)
    got, want = captions(batched), captions(singles)
    result["identical_best_captions"] = sum(g[0] == w[0] for g, w in zip(got, want, strict=True))
    result["identical_all_beams"] = sum(g == w for g, w in zip(got, want, strict=True))
    score_diff = max(
        abs(x.score - y.score)
        for bs, ss in zip(batched, singles, strict=True)
        for x, y in zip(bs, ss, strict=True)
    )
    result["max_score_diff"] = score_diff
    lengths = [len(bs[0].tokens) for bs in batched]
    result["best_caption_words"] = {
        "mean": round(statistics.fmean(lengths), 2),
        "min": min(lengths),
        "max": max(lengths),
    }
    result["speedup_wall"] = round(s_wall / b_wall, 2)
    result["speedup_cpu"] = round(s_cpu / b_cpu, 2)

    if a.naive:
        _, n_wall, n_cpu = timed(lambda: beam_search_reference(dec, feats, **kw))
        result["reference_batched"] = {
            "wall_s": round(n_wall, 2),
            "cpu_s": round(n_cpu, 2),
            "load_avg": load_avg(),
        }
        print("reference batched", result["reference_batched"], flush=True)
    if a.bf16:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            beam_search(dec, feats[: a.chunk], chunk_size=a.chunk, **kw)
            bf, f_wall, f_cpu = timed(lambda: beam_search(dec, feats, chunk_size=a.chunk, **kw))
        result["bf16_batched"] = {
            "wall_s": round(f_wall, 2),
            "cpu_s": round(f_cpu, 2),
            "load_avg": load_avg(),
            "best_caption_same_as_fp32": sum(
                g[0] == w[0] for g, w in zip(captions(bf), got, strict=True)
            ),
        }
        print("bf16", result["bf16_batched"], flush=True)

    result["load_avg_end"] = load_avg()
    path = write_result(a.name or f"beam_search_k{a.beam}", result)
    print(path)
    s, b = result["one_at_a_time"], result["batched"]
    lat = result["single_image_latency_ms"]
    print(
        "\n| beam | images | one at a time s (cpu) | batched s (cpu) | speedup wall (cpu) "
        "| identical | 1-image ms before / after | load |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {a.beam} | {len(feats)} | {s['wall_s']} ({s['cpu_s']}) | {b['wall_s']} "
        f"({b['cpu_s']}) | {result['speedup_wall']}x ({result['speedup_cpu']}x) | "
        f"{result['identical_all_beams']}/{len(feats)} | {lat['reference_median']} / "
        f"{lat['current_median']} | {result['load_avg_end']} |"
    )


if __name__ == "__main__":
    main()
