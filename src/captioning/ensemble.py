"""Ensembles: several trained captioners that decode as one.

Each step averages the members' next-word probabilities, p(w) = mean_k p_k(w), so greedy, beam
search and sampling (`decoding.py`) run unchanged on an `EnsembleDecoder`: it is a `Decoder`
whose memory and state are its members' tuples laid end to end, and whose "logits" are
log p(w) (already normalised, so the search's log_softmax leaves them as they are). Attention
maps are the members' mean. Members must share the vocabulary, the image preprocessing and the
number of regions; members with the same encoder (same config and weights: a frozen pretrained
trunk) share one encoding of the images.

Letters: B images, N regions, D_k member k's feature width, K members, V vocabulary.
"""

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .decoders import Decoder, Group, Memory, State


class EnsembleEncoder(nn.Module):
    """The distinct encoders of the members; features (B, N, sum of distinct D) side by side."""

    def __init__(self, encoders: Sequence[nn.Module]):
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.out_dim = sum(e.out_dim for e in encoders)

    def forward(self, images: Tensor) -> Tensor:
        return torch.cat([e(images) for e in self.encoders], dim=2)  # (B, N, sum D)


class EnsembleDecoder(Decoder):
    """Members' decoders as one; member k reads features[..., slices[k]]."""

    def __init__(self, members: Sequence[Decoder], slices: Sequence[tuple[int, int]]):
        super().__init__()
        if len(members) < 2 or len(members) != len(slices):
            raise ValueError("an ensemble needs two or more members, each with its feature slice")
        self.members = nn.ModuleList(members)
        self.slices = [tuple(s) for s in slices]
        self._memory_sizes: list[int] = []  # how many tensors each member's memory / state has
        self._state_sizes: list[int] = []

    @staticmethod
    def _split(xs: tuple[Tensor, ...], sizes: list[int]) -> list[tuple[Tensor, ...]]:
        out, i = [], 0
        for n in sizes:
            out.append(tuple(xs[i : i + n]))
            i += n
        return out

    def prepare(self, feats: Tensor) -> Memory:
        memories = [
            m.prepare(feats[..., a:b]) for m, (a, b) in zip(self.members, self.slices, strict=True)
        ]
        self._memory_sizes = [len(x) for x in memories]
        return tuple(t for x in memories for t in x)

    def init_state(self, memory: Memory) -> State:
        parts = self._split(memory, self._memory_sizes)
        states = [m.init_state(p) for m, p in zip(self.members, parts, strict=True)]
        self._state_sizes = [len(s) for s in states]
        return tuple(t for s in states for t in s)

    @staticmethod
    def _mean(logits: list[Tensor], alphas: list[Tensor | None]):
        """log of the members' mean word probabilities, and their mean attention (or None)."""
        # log mean_k p_k(w) = logsumexp_k log p_k(w) - log K; in fp32 whatever the members ran in
        logp = torch.stack([x.float().log_softmax(dim=-1) for x in logits])  # (K, ..., V)
        logp = torch.logsumexp(logp, dim=0) - math.log(len(logits))  # (..., V)
        alpha = None if any(a is None for a in alphas) else torch.stack(alphas).mean(0)
        return logp, alpha

    def _combine(self, outs: list[tuple[Tensor, State, Tensor | None]]):
        logp, alpha = self._mean([o[0] for o in outs], [o[2] for o in outs])  # (B, V), (B, N)
        return logp, tuple(t for o in outs for t in o[1]), alpha

    def forward(self, feats: Tensor, inputs: Tensor, lengths: Tensor | None = None, group: int = 1):
        """Teacher forcing through each member's own (fast) forward; log p averaged as in `step`.

        Steps a member skips (past `lengths`) have zero logits, so their log p is uniform there:
        padding, masked like any decoder's.
        """
        outs = [
            m(feats[..., a:b], inputs, lengths=lengths, group=group)
            for m, (a, b) in zip(self.members, self.slices, strict=True)
        ]
        return self._mean([o[0] for o in outs], [o[1] for o in outs])  # (B, T, V), (B, T, N)

    def step(self, tokens: Tensor, state: State, memory: Memory):
        states = self._split(state, self._state_sizes)
        memories = self._split(memory, self._memory_sizes)
        return self._combine(
            [
                m.step(tokens, s, mem)
                for m, s, mem in zip(self.members, states, memories, strict=True)
            ]
        )

    def step_grouped(self, tokens: Tensor, state: State, memory: Memory, group: Group):
        states = self._split(state, self._state_sizes)
        memories = self._split(memory, self._memory_sizes)
        return self._combine(
            [
                m.step_grouped(tokens, s, mem, group)
                for m, s, mem in zip(self.members, states, memories, strict=True)
            ]
        )
