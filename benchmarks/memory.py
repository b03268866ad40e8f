"""Resident memory of training from the memory-mapped feature cache, as the dataset grows.

    python benchmarks/memory.py --size flickr8k                 # the real Lite2 cache
    python benchmarks/memory.py --size flickr8k --malloc-fix    # fixed mmap threshold
    python benchmarks/memory.py --size coco                     # 15.5 GB sparse cache
    python benchmarks/memory.py --size coco --full-captions     # + the real caption index (slow)

A fresh process builds the training dataset (5 captions per image), opens the fp16 cache with
`features.load_features` (np.load with mmap_mode="r"), iterates a shuffled DataLoader with 2
workers and the project's `collate` like training does, then runs CPU training steps of the
flickr8k decoder (fast path) on those batches. Memory is read from /proc: Rss, Pss and their
anonymous / file-backed parts for the main process and each worker, and the peak (VmHWM).

- flickr8k: the real cached EfficientNet-Lite2 train features (6000 x 81 x 1280 fp16, 1.2 GB)
  when they exist, else a sparse file of that size; the dataset is the project's CaptionDataset.
- coco: a sparse file the size of COCO's 123,287 images at 7x7x1280 fp16 (15.5 GB), made with
  truncate: it takes no disk blocks and reads back zeros. Page-cache behaviour (what RSS
  measures) is that of a real file; read throughput is not, and is not measured here. The
  dataset reads features exactly as CaptionDataset does but keeps the 616k captions in one
  int array: CaptionDataset's index (a tensor per caption) takes minutes to build at that size
  and is measured on its own with --full-captions.

`--malloc-fix` runs the child with MALLOC_MMAP_THRESHOLD_=131072: glibc then serves every
sample's 0.4 MB float32 copy with mmap and returns it at once, instead of raising the threshold
and growing the heap of each worker. Captions are synthetic (Flickr8k-like lengths over 3000
words): their number, not their words, is what costs memory. Writes
outputs/bench/memory_{size}[_full_captions][_malloc_fix].json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # images, regions, feature width
    "flickr8k": (6000, 81, 1280),
    "coco": (123_287, 49, 1280),
}


def proc_memory(pid: int | str = "self") -> dict[str, float]:
    """MiB: Rss, Pss, anonymous and file-backed parts (smaps_rollup), peak RSS (VmHWM)."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("Rss", "Pss", "Pss_Anon", "Pss_File", "Anonymous"):
                out[k] = int(v.split()[0]) / 1024
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "RssAnon", "RssFile")):
                k, _, v = line.partition(":")
                out[k] = int(v.split()[0]) / 1024
    return {k: round(v, 1) for k, v in out.items()}


def make_sparse_cache(path: Path, shape: tuple[int, int, int]) -> Path:
    """An fp16 .npy of `shape` whose data is a hole: header written, then truncated to size."""
    import numpy as np

    path.mkdir(parents=True, exist_ok=True)
    npy = path / "features.npy"
    header = np.lib.format.header_data_from_array_1_0(np.empty((0,), np.float16))
    header["shape"] = shape
    with open(npy, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        offset = f.tell()
    os.truncate(npy, offset + int(np.prod(shape)) * 2)
    (path / "image_ids.json").write_text(json.dumps([f"img{i}" for i in range(shape[0])]))
    return path


def compact_captions_dataset():
    """A training dataset reading features like CaptionDataset, captions in one int array."""
    import numpy as np
    import torch
    from torch.utils.data import Dataset

    class CompactCaptions(Dataset):
        def __init__(self, image_ids: list[str], caps: np.ndarray, lens: np.ndarray):
            self.image_ids = image_ids
            self.caps, self.lens = caps, lens  # (M, 5, L) int32 ids, 0 = <pad>; (M, 5)
            self.features = None

        def __len__(self) -> int:
            return self.caps.shape[0] * self.caps.shape[1]

        def __getitem__(self, k: int):
            i, j = divmod(k, self.caps.shape[1])
            feats = torch.from_numpy(np.asarray(self.features[i], dtype=np.float32))  # as ours
            caption = torch.from_numpy(self.caps[i, j, : self.lens[i, j]].astype(np.int64))
            return {"feats": feats, "caption": caption}

    return CompactCaptions


def child(a: argparse.Namespace) -> None:
    """One measurement in a fresh process; prints JSON."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from datasets import Dataset
    from torch.utils.data import DataLoader

    from captioning.data.dataset import CaptionDataset, collate
    from captioning.decoders import build_decoder
    from captioning.encoders import Preprocess
    from captioning.features import load_features
    from captioning.vocab import Vocab

    torch.set_num_threads(1)
    CompactCaptions = compact_captions_dataset()  # noqa: N806
    trace = {"start": proc_memory()}
    cache = Path(a.cache)
    ids = json.loads((cache / "image_ids.json").read_text())
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.normal(11.8, 3.8, (len(ids), 5)).round(), 2, 20).astype(int)
    t0 = time.perf_counter()
    if a.full_captions:  # the project's dataset, from caption strings
        words = [f"w{i}" for i in range(3000)]
        picks, k, captions = rng.integers(0, len(words), lengths.sum()), 0, []
        for row in lengths:
            captions.append([" ".join(words[j] for j in picks[k : k + n]) for n in row])
            k += row.sum()
        vocab = Vocab.build([c for cs in captions for c in cs], max_len=20)
        vocab_size = len(vocab)
        hf = Dataset.from_dict({"image_id": ids, "captions": captions})
        pre = Preprocess(image_size=260, resize_size=260, mean=(0.5,) * 3, std=(0.5,) * 3)
        ds = CaptionDataset(hf, vocab, pre, train=True)
        del captions
    else:  # the same numbers of captions and words, as ids: <start> w.. <end>
        vocab_size = 3004
        width = int(lengths.max()) + 2
        caps = rng.integers(4, vocab_size, (len(ids), 5, width)).astype(np.int32)
        caps[:, :, 0] = 1
        caps = np.where(np.arange(width) > lengths[..., None] + 1, 0, caps)
        np.put_along_axis(caps, lengths[..., None] + 1, 2, axis=2)
        ds = CompactCaptions(ids, caps, lengths + 2)
    ds.features = load_features(cache, ds.image_ids)  # memory-mapped
    trace["dataset_built"] = proc_memory()
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(
        ds,
        batch_size=64,
        shuffle=True,
        num_workers=a.workers,
        collate_fn=collate,
        persistent_workers=a.workers > 0,
        generator=g,
    )
    it = iter(loader)
    samples, touched = [], 0
    t0 = time.perf_counter()
    for i in range(a.batches):
        batch = next(it)
        touched += batch.feats.size(0)
        if i % max(1, a.batches // 8) == 0 or i == a.batches - 1:
            workers = [proc_memory(w.pid) for w in getattr(it, "_workers", [])]
            samples.append({"batches": i + 1, "main": proc_memory(), "workers": workers})
    iter_s = time.perf_counter() - t0
    trace["loader"] = samples

    train = {}
    if a.train_steps:
        torch.manual_seed(0)
        N, D = ds.features.shape[1:]
        dec = build_decoder(
            "soft_attention",
            vocab_size=vocab_size,
            encoder_dim=D,
            embed_dim=512,
            hidden_dim=512,
            attention_dim=512,
            dropout=0.5,
        )
        opt = torch.optim.AdamW(dec.parameters(), lr=1e-4)
        t0 = time.perf_counter()
        for _ in range(a.train_steps):
            batch = next(it)
            caps = batch.captions
            inputs, targets = caps[:, :-1], caps[:, 1:]
            logits, alphas = dec(batch.feats, inputs, lengths=(targets != 0).sum(1))
            ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=0)
            loss = ce + dec.regularizer(alphas, (targets != 0).float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        train = {
            "steps": a.train_steps,
            "s_per_step": round((time.perf_counter() - t0) / a.train_steps, 2),
            "main": proc_memory(),
            "workers": [proc_memory(w.pid) for w in getattr(it, "_workers", [])],
        }
    del it, loader
    print(
        json.dumps(
            {
                "images": len(ids),
                "captions": len(ds),
                "feature_shape": list(ds.features.shape),
                "cache_bytes": (cache / "features.npy").stat().st_size,
                "cache_bytes_on_disk": (cache / "features.npy").stat().st_blocks * 512,
                "build_s": round(build_s, 1),
                "batches": a.batches,
                "samples_read": touched,
                "iterate_s": round(iter_s, 1),
                "workers": a.workers,
                "trace": trace,
                "train": train,
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="flickr8k")
    p.add_argument("--batches", type=int, default=150)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument(
        "--full-captions",
        action="store_true",
        help="CaptionDataset for coco too (its caption index takes minutes)",
    )
    p.add_argument(
        "--malloc-fix", action="store_true", help="run with MALLOC_MMAP_THRESHOLD_=131072"
    )
    p.add_argument("--scratch", default=str(ROOT / "outputs" / "bench" / "scratch"))
    p.add_argument("--keep", action="store_true", help="keep the sparse cache")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)

    sys.path.insert(0, str(Path(__file__).parent))
    from common import FEATURES, hardware, load_avg, write_result

    shape = SIZES[a.size]
    full = a.full_captions or a.size == "flickr8k"
    real = [
        d
        for d in sorted(FEATURES.glob("efficientnet_lite2-*"))
        if a.size == "flickr8k"
        and (d / "image_ids.json").is_file()
        and len(json.loads((d / "image_ids.json").read_text())) == shape[0]
    ]
    made = None
    if real:
        cache, kind = real[0], f"real cache {real[0]}"
    else:
        cache = made = make_sparse_cache(Path(a.scratch) / f"{a.size}_sparse", shape)
        kind = "sparse file (no disk blocks; reads back zeros)"
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--cache",
        str(cache),
        "--batches",
        str(a.batches),
        "--workers",
        str(a.workers),
        "--train-steps",
        str(a.train_steps),
    ]
    if full:
        cmd.append("--full-captions")
    env = dict(os.environ)
    if a.malloc_fix:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    finally:
        if made is not None and not a.keep:
            shutil.rmtree(made, ignore_errors=True)
    if out.returncode != 0:
        raise SystemExit(f"{a.size}: child failed\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(
        {
            "benchmark": "memory",
            "size": a.size,
            "cache": kind,
            "captions_dataset": "CaptionDataset" if full else "compact int array",
            "malloc_mmap_threshold": "131072" if a.malloc_fix else "glibc default (dynamic)",
            "disk_free_gb": round(shutil.disk_usage(ROOT).free / 2**30),
            "hardware": hardware(),
            "wall_s": round(time.perf_counter() - t0, 1),
            "load_avg": load_avg(),
            "command": " ".join(["python benchmarks/memory.py", *sys.argv[1:]]),
        }
    )
    name = (
        f"memory_{a.size}"
        + ("_full_captions" if a.full_captions else "")
        + ("_malloc_fix" if a.malloc_fix else "")
    )
    print(write_result(name, result))
    print(
        json.dumps(
            {
                k: result[k]
                for k in ("size", "cache", "captions_dataset", "build_s", "iterate_s", "load_avg")
            }
        )
    )
    for t in result["trace"]["loader"]:
        w = [(x["RssAnon"], x["RssFile"]) for x in t["workers"]]
        print(
            f"batch {t['batches']:4d}: main anon/file MiB {t['main']['RssAnon']}/"
            f"{t['main']['RssFile']}, workers {w}"
        )
    if result["train"]:
        print("training: main", result["train"]["main"], "s/step", result["train"]["s_per_step"])


if __name__ == "__main__":
    main()
