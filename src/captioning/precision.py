"""Matmul precision of CPU decoding: fp32, or bf16 where the CPU has bf16 matrix units.

Beam search is bound by its matmuls (see docs/performance.md). On CPUs with AMX tiles
(`amx_bf16`, Intel Sapphire Rapids and later) or AVX-512 bf16 dot products (`avx512_bf16`),
a bf16 matmul does several times the multiply-adds of an fp32 one per cycle; on CPUs without
them (AVX2 only) torch runs bf16 matmuls through a slow reference path, tens of times slower
than fp32. So `auto` picks bf16 only where the units exist, and fp32 everywhere else.

bf16 here means: the recurrent matmuls of a step (decoder_att + f_beta + weight_hh on h, and
the context half of the gates: about four fifths of its multiply-adds at the flickr8k sizes)
with weights cast once to bf16, inputs rounded to bf16, products summed in fp32, the result
rounded to bf16 and used as fp32 from there on. The output layer, the recurrent state, the
attention energies, softmax and the search stay fp32: a bf16 result carries 8 bits, and a
logit of 10 rounded to bf16 moves by up to 0.03, enough to reorder close beams (on a Flickr8k
model, bf16 logits changed 12% of the best captions; fp32 logits, under 1.5%).

`emulate_bf16()` computes exactly those roundings with fp32 kernels, so the captions bf16
decoding gives can be checked (and tested) on a machine without bf16 units, at fp32 speed.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

_matmul_dtype: contextvars.ContextVar[torch.dtype] = contextvars.ContextVar(
    "matmul_dtype", default=torch.float32
)
_emulate: contextvars.ContextVar[bool] = contextvars.ContextVar("emulate_bf16", default=False)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16_units() -> str | None:
    """`amx_bf16` or `avx512_bf16` when the CPU has that bf16 matmul unit (AMX first), else None."""
    flags = cpu_flags()
    for unit in ("amx_bf16", "avx512_bf16"):
        if unit in flags:
            return unit
    return None


def resolve(precision: str, device: torch.device | str = "cpu") -> str:
    """`fp32` or `bf16` for `precision` (auto | fp32 | bf16) on `device`.

    auto: bf16 on a CPU with AMX, fp32 otherwise (GPUs included: their decoding is not matmul
    bound at these sizes). A CPU with only `avx512_bf16` gains less than the rounding costs
    (docs/performance.md), so auto leaves it at fp32; `bf16` asks for it anyway.
    """
    if precision not in PRECISIONS:
        raise ConfigError(
            f"decode precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
        )
    if precision != "auto":
        return precision
    cpu = torch.device(device).type == "cpu"
    return "bf16" if cpu and cpu_bf16_units() == "amx_bf16" else "fp32"


def matmul_dtype() -> torch.dtype:
    """The dtype decoders cast their inference matmul weights to (fp32 unless inside `use`)."""
    return _matmul_dtype.get()


@contextlib.contextmanager
def use(precision: str) -> Iterator[None]:
    """Decode with `precision` (fp32 | bf16; resolve `auto` first) inside this block."""
    if precision not in _DTYPES:
        raise ConfigError(f"use() takes fp32 or bf16 (resolve auto first), got {precision!r}")
    token = _matmul_dtype.set(_DTYPES[precision])
    try:
        yield
    finally:
        _matmul_dtype.reset(token)


@contextlib.contextmanager
def emulate_bf16() -> Iterator[None]:
    """bf16 matmuls computed as fp32 kernels on bf16-rounded values: the same numbers (up to
    the order of fp32 sums), at fp32 speed, on CPUs without bf16 units."""
    token = _emulate.set(True)
    try:
        yield
    finally:
        _emulate.reset(token)


def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """x @ w.T + b in w's dtype, returned as fp32; fp32 weights: plain `F.linear`."""
    if w.dtype == torch.float32:
        return F.linear(x, w, b)
    if _emulate.get():
        y = F.linear(x.to(w.dtype).float(), w.float(), None if b is None else b.float())
        return y.to(w.dtype).float()
    return F.linear(x.to(w.dtype), w, b).float()
