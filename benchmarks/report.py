"""Markdown tables from outputs/bench/*.json, into outputs/bench/README.md.

Every row keeps the load average it was measured under (1-minute, from /proc/loadavg) and
the command that reproduces it; numbers taken on a busy machine are upper bounds on time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import OUT


def load(name: str) -> dict | None:
    path = OUT / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def beam_tables(lines: list[str]) -> None:
    runs = [r for k in (3, 5) if (r := load(f"beam_search_k{k}"))]
    if not runs:
        return
    lines += [
        "## Beam search: batched vs one image at a time",
        "",
        f"Decoder: {runs[0]['decoder']}. Features: {runs[0]['features']}. One thread.",
        "",
        "| beam | images | one at a time, s wall (cpu) | batched, s wall (cpu) | speedup wall "
        "(cpu) | same beams | 1-image latency ms, original / now | load |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        s, b, lat = r["one_at_a_time"], r["batched"], r["single_image_latency_ms"]
        lines.append(
            f"| {r['beam']} | {r['images']} | {s['wall_s']} ({s['cpu_s']}) | {b['wall_s']} "
            f"({b['cpu_s']}) | **{r['speedup_wall']}x** ({r['speedup_cpu']}x) | "
            f"{r['identical_all_beams']}/{r['images']} | {lat['reference_median']} / "
            f"{lat['current_median']} | {b['load_avg']}, {s['load_avg']} |"
        )
    extra = []
    for r in runs:
        if "reference_batched" in r:
            n = r["reference_batched"]
            extra.append(
                f"| {r['beam']} | original batched search (all 1000 at once) | "
                f"{n['wall_s']} ({n['cpu_s']}) | {n['load_avg']} |"
            )
        if "bf16_batched" in r:
            f = r["bf16_batched"]
            extra.append(
                f"| {r['beam']} | batched, bf16 autocast ({f['best_caption_same_as_fp32']}"
                f"/{r['images']} best captions as fp32) | {f['wall_s']} ({f['cpu_s']}) | "
                f"{f['load_avg']} |"
            )
    if extra:
        lines += [
            "",
            "| beam | other variant | s wall (cpu) | load |",
            "| --- | --- | --- | --- |",
            *extra,
        ]
    lines += ["", "Commands: " + "; ".join(f"`{r['command']}`" for r in runs), ""]
    for k in (3, 5):
        sweep = load(f"beam_search_chunks_k{k}")
        if sweep:
            lines += [
                f"Chunk size, beam {k}, {sweep['images']} images (ms per image, cpu / wall, load):",
                "",
                "| chunk | " + " | ".join(sweep["chunk_sweep"]) + " |",
                "| --- |" + " --- |" * len(sweep["chunk_sweep"]),
                "| ms | "
                + " | ".join(
                    f"{v['ms_per_image_cpu']} / {v['ms_per_image_wall']} ({v['load_avg']})"
                    for v in sweep["chunk_sweep"].values()
                )
                + " |",
                "",
                f"`{sweep['command']}`",
                "",
            ]


def train_table(lines: list[str]) -> None:
    for name in ("train_step", "train_step_r10", "train_step_2threads", "train_step_compile"):
        if r := load(name):
            train_rows(lines, r)


def train_rows(lines: list[str], r: dict) -> None:
    threads = r.get("threads", r["hardware"]["torch_threads"])
    lines += [
        f"## Training step of the attention decoder (CPU, {threads} thread(s), fp32 unless named)",
        "",
        f"Batch {r['batch']}, captions: {r.get('captions', r.get('caption_lengths'))} (real "
        f"targets: "
        f"{r['real_target_fraction']:.0%} of the padded batch). One step = forward, loss, "
        "backward, AdamW.",
        "",
        "| variant | captions/s cpu (wall) | step ms cpu (wall) | vs stepwise cpu (wall) | "
        "max loss diff vs stepwise | load |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    eq = r.get("equality_vs_stepwise_fp32", {})
    for v, x in r["variants"].items():
        diff = eq.get(v.replace(" bf16", "").replace(" compiled", ""), {}).get("loss_diff")
        diff_s = "-" if v == "stepwise" or diff is None or " bf16" in v else f"{diff:.1e}"
        lines.append(
            f"| {v} | {x['captions_per_s_cpu']} ({x['captions_per_s_wall']}) | {x['step_ms_cpu']} "
            f"({x['step_ms_wall']}) | **{x['speedup_cpu']}x** ({x['speedup_wall']}x) | {diff_s} | "
            f"{r['load_avg_end']} |"
        )
    if "compile_s" in r:
        lines += ["", f"compile_step(): {r['compile_s']} s to compile (first step)."]
    lines += ["", f"`{r['command']}`", ""]


def memory_table(lines: list[str]) -> None:
    names = [
        "memory_flickr8k",
        "memory_flickr8k_malloc_fix",
        "memory_coco",
        "memory_coco_malloc_fix",
        "memory_coco_full_captions",
    ]
    runs = [(n, r) for n in names if (r := load(n))]
    if not runs:
        return
    lines += [
        "## Resident memory, CPU training from the memory-mapped cache",
        "",
        "MiB. anon = anonymous memory (what the process itself holds), file = mapped pages of "
        "the cache (page cache: shared, reclaimable). Workers: 2. Last loader sample, then peak "
        "(VmHWM) of the main process after the training steps.",
        "",
        "| cache | images / captions | file GB (on disk) | dataset | malloc | main anon / file | "
        "each worker anon / file | main peak RSS training | load |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for _, r in runs:
        last = r["trace"]["loader"][-1]
        m = last["main"]
        w = ", ".join(f"{x['RssAnon']:.0f} / {x['RssFile']:.0f}" for x in last["workers"])
        peak = r.get("train", {}).get("main", {}).get("VmHWM", "-")
        size = r.get("size") or ("coco" if r["images"] > 10000 else "flickr8k")
        malloc = "fixed" if "131072" in str(r.get("malloc_mmap_threshold", "")) else "default"
        dataset = r.get("captions_dataset", "CaptionDataset")
        lines.append(
            f"| {size} | {r['images']} / {r['captions']} | {r['cache_bytes'] / 1e9:.1f} "
            f"({r['cache_bytes_on_disk'] / 1e9:.1f}) | {dataset} | {malloc} | "
            f"{m['RssAnon']:.0f} / {m['RssFile']:.0f} | {w} | {peak} | {r.get('load_avg', '-')} |"
        )
    lines += [
        "",
        "Commands: " + "; ".join(f"`{r['command']}`" for _, r in runs if "command" in r),
        "",
    ]


def gpu_table(lines: list[str]) -> None:
    r = load("gpu_train")
    if not r:
        return
    lines += ["## GPU training: ResNet-101 + attention decoder, batch 64", ""]
    if "skipped" in r:
        lines += [f"Not measured: {r['skipped']}. Run `{r['command']}` on a CUDA machine.", ""]
        return
    lines += [
        "| precision | images/s | step ms | peak GPU memory GiB |",
        "| --- | --- | --- | --- |",
    ]
    for k, x in r["runs"].items():
        lines.append(f"| {k} | {x['images_per_s']} | {x['step_ms']} | {x['peak_memory_gib']} |")
    lines += ["", f"{r['hardware']['cuda']}. `{r['command']}`", ""]


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    hw = next(
        (
            r["hardware"]
            for n in ("beam_search_k3", "train_step", "memory_flickr8k")
            if (r := load(n))
        ),
        None,
    )
    lines = ["# Benchmarks", ""]
    if hw:
        lines += [
            f"CPU: {hw['cpu']}, {hw['cores']} cores (avx512_bf16: {hw['avx512_bf16']}, "
            f"AMX: {hw['amx_bf16']}); torch {hw['torch']}; GPU: {hw['cuda'] or 'none'}.",
            "Shared machine: the load column is the 1-minute load average during the run; "
            "times under load are upper bounds, CPU time (cpu) moves less than wall time.",
            "",
        ]
    beam_tables(lines)
    train_table(lines)
    memory_table(lines)
    gpu_table(lines)
    out = OUT / "README.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(out, file=sys.stderr)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
