"""Markdown tables from outputs/bench/*.json: outputs/bench/README.md, and docs/performance.md.

    python benchmarks/report.py                              # outputs/bench/README.md
    python benchmarks/report.py --docs docs/performance.md   # also the tables in the docs

Every table says the machine it was measured on (CPU model, cores, flags, threads, torch), the
date and the load average beside each number (1-minute, from /proc/loadavg: on a busy machine
wall times are upper bounds, and CPU time moves less). `--docs` replaces what lies between the
`<!-- bench:begin -->` and `<!-- bench:end -->` lines of the file, so the docs' tables are
this output and nothing else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import OUT, load

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def machine(r: dict) -> str:
    hw = r["hardware"]
    flags = ", ".join(hw.get("flags", [])) or "-"
    gpu = f"; GPU {hw['cuda']}" if hw.get("cuda") else ""
    return (
        f"{hw['cpu']}, {hw['cores']} cores (flags: {flags}; bf16 units: "
        f"{hw.get('bf16_units') or 'none'}), torch {hw['torch']}{gpu}; {hw.get('date', 'date ?')}"
    )


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def load_s(x) -> str:
    return "/".join(str(v) for v in x) if isinstance(x, list) else str(x)


def roofline_table(lines: list[str]) -> None:
    r = load("roofline")
    if not r:
        return
    lines += [
        "### This machine's limits (`benchmarks/roofline.py`)",
        "",
        f"Machine: {machine(r)}.",
        "",
        "| threads | fp32 matmul peak GFLOP/s (n); per CPU second | bf16 matmul peak GFLOP/s (n); "
        "per CPU second | memory read GB/s | load |",
        "| --- | --- | --- | --- | --- |",
    ]
    for t, x in r["threads"].items():
        f, b = x["fp32"], x["bf16"]
        lines.append(
            f"| {t} | {f['gflops']} ({f['n']}); {f.get('gflops_cpu', '-')} | {b['gflops']} "
            f"({b['n']}); {b.get('gflops_cpu', '-')} | {x['read']['gb_s']} | "
            f"{f['load_avg']}, {b['load_avg']} |"
        )
    lines += ["", f"`{r['command']}`", ""]


def beam_tables(lines: list[str]) -> None:
    r = load("beam_search")
    if not r or not r.get("runs"):
        return
    lines += [
        "### Beam search, 1000 Flickr8k test images (`benchmarks/beam_search.py`)",
        "",
        f"Machine: {machine(r)}. Decoder: {r['decoder']}. Features: {r['features']}.",
        "",
        "Seconds for all images (wall); in brackets GFLOP/s and the fraction of the matmul peak "
        "of the same precision and thread count (roofline above), then the same per CPU second "
        "of the process (against the peak per CPU second): on a busy machine wall time counts "
        "the time others had the cores, CPU time does not. Speedups are wall time against one "
        "image at a time, fp32, same beam and threads. Load: 1-minute load average "
        "before/after.",
        "",
        "| beam | threads | GFLOP per image | one at a time | batched fp32 | batched bf16 | "
        "batched fp32 vs one | bf16 vs one | identical beams, batched vs one | bf16 best "
        "caption = fp32 | load (one; fp32; bf16) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def cell(t: dict | None) -> str:
        if not t:
            return "-"
        if "skipped" in t:
            return "not run: no bf16 units"
        return (
            f"{t['wall_s']} s ({t['gflops']}, {pct(t.get('fraction_of_peak'))}; cpu "
            f"{t['cpu_s']} s: {t['gflops_cpu']}, {pct(t.get('fraction_of_peak_cpu'))})"
        )

    for run in r["runs"]:
        one, f, b = run.get("one_at_a_time"), run["fp32"], run["bf16"]
        sp_f = f"**{one['wall_s'] / f['wall_s']:.1f}x**" if one else "-"
        sp_b = f"**{one['wall_s'] / b['wall_s']:.1f}x**" if one and "wall_s" in b else "-"
        same_b = f"{run['bf16_same_best_caption']}/{r['images']}"
        if b.get("emulated"):
            same_b += " (emulated)"
        ident = f"{run['identical_all_beams']}/{r['images']}" if one else "-"
        loads = "; ".join(
            load_s(t["load_avg"]) if t and "load_avg" in t else "-" for t in (one, f, b)
        )
        lines.append(
            f"| {run['beam']} | {run['threads']} | {run['gflop_per_image']} | {cell(one)} | "
            f"{cell(f)} | {cell(b)} | {sp_f} | {sp_b} | {ident} | {same_b} | {loads} |"
        )
    scored = [run for run in r["runs"] if run.get("scores") and run["scores"]["fp32"]]
    if scored:
        lines += [
            "",
            "Scores of the best captions (test split, coco-caption BLEU-4 and CIDEr-D), fp32 "
            "against bf16:",
            "",
            "| beam | BLEU-4 fp32 | BLEU-4 bf16 | difference | CIDEr-D fp32 | CIDEr-D bf16 | "
            "difference |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for run in scored:
            f, b = run["scores"]["fp32"], run["scores"]["bf16"]
            lines.append(
                f"| {run['beam']} | {f['bleu4']} | {b['bleu4']} | {b['bleu4'] - f['bleu4']:+.4f} | "
                f"{f['cider']} | {b['cider']} | {b['cider'] - f['cider']:+.4f} |"
            )
    roof = load("roofline")
    goal = []
    for run in r["runs"]:
        one = run.get("one_at_a_time")
        peak = roof and roof["threads"].get(str(run["threads"]))
        if not one or not peak:
            continue
        flops = run["gflop_per_image"] * r["images"]
        timed = [t for t in (run["fp32"], run["bf16"]) if "gflops" in t]
        cells = []
        for clock, rate in (("wall_s", "gflops"), ("cpu_s", "gflops_cpu")):
            need = flops / (one[clock] / 10)  # GFLOP/s a batched search needs for 10x
            best = max(t[rate] for t in timed)
            cells.append(
                f"{need:.0f} | {need / peak['fp32'][rate]:.0%} | {need / peak['bf16'][rate]:.0%} "
                f"| {best / need:.0%}"
            )
        goal.append(f"| {run['beam']} | {run['threads']} | " + " | ".join(cells) + " |")
    if goal:
        lines += [
            "",
            "The 10x goal against one image at a time, as a roofline: the GFLOP/s that batched "
            "search would need, against this machine's matmul peaks (a fraction over 100% "
            "cannot be reached in that precision), and how far the best batched run got; by "
            "wall time, then by CPU time of the process:",
            "",
            "| beam | threads | GFLOP/s for 10x | of fp32 peak | of bf16 peak | best batched "
            "reached | per CPU s: GFLOP/s for 10x | of fp32 peak | of bf16 peak | best reached |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *goal,
        ]
    abl = [run for run in r["runs"] if "bf16_logits_same_best_caption" in run]
    if abl:
        lines += [
            "",
            "Why bf16 decoding keeps the output layer in fp32: with bf16 logits too (emulated), "
            "the best caption equals fp32's for "
            + ", ".join(
                f"{run['bf16_logits_same_best_caption']}/{r['images']} images at beam {run['beam']}"
                for run in abl
            )
            + ".",
        ]
    lat = [run for run in r["runs"] if "single_image_latency_ms" in run]
    for run in lat:
        x = run["single_image_latency_ms"]
        lines += [
            "",
            f"One image alone, beam {run['beam']}, 1 thread (what the web app's decoder pays; "
            f"median of {x['images']}): {x['current_median']} ms, against "
            f"{x['reference_median']} ms for the batched search this project started with "
            f"(load {x['load_avg']}).",
        ]
    lines += ["", f"`{r['command']}`", ""]


def train_table(lines: list[str], name: str = "train_step") -> None:
    r = load(name)
    if not r:
        return
    threads = r.get("threads", r["hardware"]["torch_threads"])
    decoder = r["decoder"].get("name", "soft_attention")
    flops = r.get("gflop_per_step")
    lines += [
        f"### Training step from cached features, {decoder} (`benchmarks/train_step.py`)",
        "",
        f"Machine: {machine(r)}; {threads} thread(s). Batch {r['batch']}; captions: "
        f"{r['captions']} (real targets {r['real_target_fraction']:.0%} of the padded batch)"
        + (f"; {flops} GFLOP per step (forward + backward). " if flops else ". ")
        + "One step = forward, loss, backward, AdamW.",
        "",
        "| variant | captions/s wall (cpu) | GFLOP/s (fraction of peak); per CPU second | vs "
        "stepwise wall (cpu) | loss vs stepwise, fp32 | load |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    eq = r.get("equality_vs_stepwise_fp32", {})
    load_timed = r.get("load_avg_timed", r.get("load_avg_end"))
    for v, x in r["variants"].items():
        diff = eq.get(v.replace(" bf16", "").replace(" compiled", ""), {}).get("loss_diff")
        diff_s = "-" if v == "stepwise" or diff is None or " bf16" in v else f"{diff:.1e}"
        gflops = (
            f"{x['gflops']} ({pct(x.get('fraction_of_peak'))}); {x['gflops_cpu']} "
            f"({pct(x.get('fraction_of_peak_cpu'))})"
            if "gflops" in x
            else "- (not counted for this decoder)"
        )
        lines.append(
            f"| {v} | {x['captions_per_s_wall']} ({x['captions_per_s_cpu']}) | {gflops} "
            f"| **{x['speedup_wall']}x** "
            f"({x['speedup_cpu']}x) "
            f"| {diff_s} | {load_timed} |"
        )
    if "bf16_skipped" in r:
        lines += ["", f"bf16: {r['bf16_skipped']}."]
    c = r.get("curve")
    if c and "skipped" not in c:
        g, n = c["bf16_vs_fp32"], c["noise_fp32_dropout_seeds"]
        lines += [
            "",
            f"Loss curves, {c['steps']} steps from the same weights and batches (load "
            f"{c['load_avg']}): bf16 against fp32, mean |difference| {g['mean_abs']}, largest "
            f"{g['max_abs']}, last tenth's means {g['last_mean_diff']} apart; two fp32 runs with "
            f"other dropout draws (the noise): {n['mean_abs']}, {n['max_abs']}, "
            f"{n['last_mean_diff']}. First and last loss: "
            + ", ".join(f"{k} {v[0]} -> {v[1]}" for k, v in c["first_last"].items())
            + ".",
        ]
    elif c:
        lines += ["", f"Loss curves: {c['skipped']}."]
    lines += ["", f"`{r['command']}`", ""]


def scst_table(lines: list[str]) -> None:
    r = load("scst_step")
    if not r:
        return
    lines += [
        "### Self-critical gradient pass (`benchmarks/scst_step.py`)",
        "",
        f"Machine: {machine(r)}; {r['threads']} thread(s). {r['images']} images x "
        f"{r['samples']} sampled captions (experiment=flickr8k_scst's batch), random weights "
        "of the flickr8k experiments' sizes, captions of Flickr8k-like lengths. Grouped: each "
        "image's regions prepared once for its samples (`forward(..., group=5)`); copied: "
        "once per sample on copied features. Sampling: the batch's sampling pass (random "
        "weights sample to the length limit: longer than a trained model's).",
        "",
        "| decoder | gradient pass, grouped (ms wall) | copied (ms wall) | grouped vs copied | "
        "sampling (ms wall) | load before / after |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, d in r["decoders"].items():
        t = d["times"]
        lines.append(
            f"| {name} | {t['grouped']['wall_s'] * 1e3:.0f} | {t['copied']['wall_s'] * 1e3:.0f} "
            f"| **{d['speedup']:.2f}x** | {t['sampling']['wall_s'] * 1e3:.0f} | "
            f"{r['load_before']} / {r['load_after']} |"
        )
    command = f"python benchmarks/scst_step.py --threads {r['threads']}"
    ts = r.get("trained_sampling")
    if ts:
        c, f = ts["times"]["compact"], ts["times"]["full"]
        n = ts["batches"]
        command += f" --checkpoint {ts['checkpoint']} --batches {n}"
        lines += [
            "",
            f"Sampling with trained weights ({ts['checkpoint']}) on {n} batches of "
            f"{ts['features']}: mean {ts['mean_sample_words']:.1f} words a sample. Rows leave "
            "the batch as their samples end (`sample(compact=True)`, the default) or every row "
            "steps until the batch's last sample ends; both draw the same captions (checked).",
            "",
            "| sampling, trained weights | ms wall a batch | CPU s a batch | row-steps computed |",
            "| --- | --- | --- | --- |",
            f"| rows leave as they end | {c['wall_s'] / n * 1e3:.0f} | {c['cpu_s'] / n:.2f} | "
            f"{ts['row_steps_compact']} |",
            f"| every row to the batch's end | {f['wall_s'] / n * 1e3:.0f} | "
            f"{f['cpu_s'] / n:.2f} | {ts['row_steps_full']} |",
            f"| speed-up | **{ts['speedup']:.2f}x** | | |",
        ]
    lines += ["", f"`{command}`", ""]


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
        "### Resident memory, CPU training from the memory-mapped cache (`benchmarks/memory.py`)",
        "",
        f"Machine: {machine(runs[0][1])}. MiB. anon = anonymous memory (what the process itself "
        "holds), file = mapped pages of the cache (page cache: shared, reclaimable). Workers: 2. "
        "Last loader sample, then peak (VmHWM) of the main process after the training steps.",
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
        kind = "real" if str(r.get("cache", "")).startswith("real") else "sparse"
        malloc = "fixed" if "131072" in str(r.get("malloc_mmap_threshold", "")) else "default"
        dataset = r.get("captions_dataset", "CaptionDataset")
        lines.append(
            f"| {size} ({kind}) | {r['images']} / {r['captions']} | {r['cache_bytes'] / 1e9:.1f} "
            f"({r['cache_bytes_on_disk'] / 1e9:.1f}) | {dataset} | {malloc} | "
            f"{m['RssAnon']:.0f} / {m['RssFile']:.0f} | {w} | {peak} | {r.get('load_avg', '-')} |"
        )
    lines += [
        "",
        "Commands: " + "; ".join(f"`{r['command']}`" for _, r in runs if "command" in r),
        "",
    ]


def app_table(lines: list[str]) -> None:
    r = load("app_latency")
    if not r or "concurrency" not in r:
        return
    waits = list(r["concurrency"])
    clients = list(r["concurrency"][waits[0]])
    lines += [
        "### Web app under concurrent clients (`benchmarks/app_latency.py --mode concurrency`)",
        "",
        f"Machine: {machine(r)}. Model: {r['encoder']} + {r['decoder']} "
        f"(`{r['checkpoint']}`), beam {r['beam_size']}, attention maps in every answer; "
        f"{r['photos']}, each client sending its own photo; {r['torch_threads']} torch thread(s) "
        "in the server. Each setting ran twice (the order alternating), in the real server over "
        "HTTP: requests/s over both, then p50/p95 and the 1-minute load of each. Batching off: "
        "each request encoded and searched alone; on: requests arriving within the wait are "
        "searched together (`--batch-wait-ms`).",
        "",
        "| clients | batching | requests/s | vs off | p50 ms | p95 ms | mean batch | load |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in clients:
        off = r["concurrency"].get("wait_0.0ms", {}).get(c)
        for w in waits:
            x = r["concurrency"][w][c]
            ms = float(w.removeprefix("wait_").removesuffix("ms"))
            label = f"on ({ms:g} ms)" if ms > 0 else "off"
            gain = f"{x['requests_per_s'] / off['requests_per_s']:.2f}x" if off and ms > 0 else "-"
            cells = [", ".join(str(v) for v in x[k]) for k in ("p50_ms", "p95_ms", "mean_batch")]
            load_s = ", ".join(str(v) for v in x["load_avg_1m"])
            lines.append(
                f"| {c} | {label} | {x['requests_per_s']} | {gain} | "
                + " | ".join(cells)
                + f" | {load_s} |"
            )
    lines += ["", f"`{r['command']}`", ""]


def gpu_table(lines: list[str]) -> None:
    r = load("gpu_train")
    if not r:
        return
    lines += ["### GPU training: ResNet-101 + attention decoder, batch 64", ""]
    if "skipped" in r:
        lines += [
            f"Not measured on {r['hardware']['cpu']} ({r['hardware'].get('date', '')}): "
            f"{r['skipped']}. Run `{r['command']}` on a CUDA machine.",
            "",
        ]
        return
    lines += [
        f"Machine: {machine(r)}: a different machine from the CPU tables above.",
        "",
        "| precision | images/s | step ms | peak GPU memory GiB |",
        "| --- | --- | --- | --- |",
    ]
    for k, x in r["runs"].items():
        lines.append(f"| {k} | {x['images_per_s']} | {x['step_ms']} | {x['peak_memory_gib']} |")
    lines += ["", f"`{r['command']}`", ""]


def tables() -> list[str]:
    lines: list[str] = []
    roofline_table(lines)
    beam_tables(lines)
    train_table(lines)
    train_table(lines, "train_step_updown")
    scst_table(lines)
    memory_table(lines)
    app_table(lines)
    gpu_table(lines)
    return lines


def splice(path: Path, lines: list[str]) -> None:
    """Replace the lines between BEGIN and END in `path` with `lines`."""
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} block to fill")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(head + BEGIN + "\n" + "\n".join(lines).rstrip() + "\n" + END + tail)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", default=None, help="a Markdown file with a bench:begin/end block")
    a = p.parse_args()
    lines = tables()
    out = OUT / "README.md"
    OUT.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(["# Benchmarks", "", *lines]) + "\n")
    print("\n".join(lines))
    print(out, file=sys.stderr)
    if a.docs:
        splice(Path(a.docs), lines)
        print(a.docs, file=sys.stderr)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
