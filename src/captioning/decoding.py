"""Greedy and beam search, written once over the decoder step API and batched over images.

Letters: B images, K beams, V vocabulary, N regions, L generated length.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from .decoders import Decoder


@dataclass
class Hypothesis:
    """One generated caption: word ids (no <start>/<end>), scores, and attention per word."""

    tokens: list[int]
    score: float  # log-probability divided by length**length_penalty (what beams are ranked by)
    logprob: float  # summed log-probability, <end> included
    alphas: Tensor | None  # (L, N) attention over regions for each generated word


def _ban(logp: Tensor, banned: tuple[int, ...]) -> Tensor:
    """Words that may never be generated (e.g. <unk>): log-probability -inf."""
    if banned:
        logp[:, list(banned)] = float("-inf")
    return logp


def _select(xs: tuple[Tensor, ...], idx: Tensor) -> tuple[Tensor, ...]:
    return tuple(x.index_select(0, idx) for x in xs)


@torch.no_grad()
def greedy_search(
    decoder: Decoder,
    feats: Tensor,
    *,
    start_id: int,
    end_id: int,
    max_len: int = 20,
    banned: tuple[int, ...] = (),
) -> list[Hypothesis]:
    """Pick the most likely word at every step; at most `max_len` words, then <end>."""
    B = feats.size(0)
    memory = decoder.prepare(feats)
    state = decoder.init_state(memory)
    tokens = torch.full((B,), start_id, dtype=torch.long, device=feats.device)
    words, lps, alphas = [], [], []
    done = torch.zeros(B, dtype=torch.bool, device=feats.device)
    for t in range(max_len + 1):
        logits, state, alpha = decoder.step(tokens, state, memory)
        logp = _ban(logits.float().log_softmax(dim=-1), banned)  # (B, V)
        if t == max_len:  # the longest caption allowed: only <end> may follow
            best_lp, tokens = logp[:, end_id], torch.full_like(tokens, end_id)
        else:
            best_lp, tokens = logp.max(dim=-1)
        words.append(tokens)
        lps.append(torch.where(done, torch.zeros_like(best_lp), best_lp))
        alphas.append(alpha)
        done = done | (tokens == end_id)
        if bool(done.all()):
            break
    words_t = torch.stack(words, 1).tolist()  # (B, L)
    lps_t = torch.stack(lps, 1)  # (B, L)
    alphas_t = None if alphas[0] is None else torch.stack(alphas, 1).float().cpu()  # (B, L, N)
    out = []
    for b in range(B):
        n = words_t[b].index(end_id)  # number of words before <end>
        lp = float(lps_t[b, : n + 1].sum())
        out.append(
            Hypothesis(
                tokens=words_t[b][:n],
                score=lp / (n + 1),
                logprob=lp,
                alphas=None if alphas_t is None else alphas_t[b, :n],
            )
        )
    return out


@torch.no_grad()
def beam_search(
    decoder: Decoder,
    feats: Tensor,
    *,
    beam_size: int,
    start_id: int,
    end_id: int,
    pad_id: int = 0,
    max_len: int = 20,
    length_penalty: float = 1.0,
    banned: tuple[int, ...] = (),
) -> list[list[Hypothesis]]:
    """Beam search for a batch of images at once; returns each image's beams, best first.

    Finished beams stay in the beam with a frozen score (they can only continue with <pad> at
    no cost), so every tensor keeps its (B, K) shape. Beams are ranked at the end by
    logprob / length**length_penalty, since raw summed log-probability favours short captions.
    """
    B, K, device = feats.size(0), beam_size, feats.device
    memory = decoder.prepare(feats)
    state = decoder.init_state(memory)
    rows = torch.arange(B, device=device).repeat_interleave(K)  # (B*K,) image of each beam
    memory, state = _select(memory, rows), _select(state, rows)
    tokens = torch.full((B * K,), start_id, dtype=torch.long, device=device)
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # at the first step all beams are the same; keep one
    finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, K, dtype=torch.long, device=device)
    seqs = torch.zeros(B, K, 0, dtype=torch.long, device=device)
    hist: Tensor | None = None  # (B, K, L, N)
    base = (torch.arange(B, device=device) * K).unsqueeze(1)  # (B, 1)
    for t in range(max_len + 1):
        logits, state, alpha = decoder.step(tokens, state, memory)
        logp = _ban(logits.float().log_softmax(dim=-1), banned)  # (B*K, V)
        V = logp.size(-1)
        logp = logp.view(B, K, V)
        if t == max_len:  # only <end> may follow the longest caption allowed
            forced = torch.full_like(logp, float("-inf"))
            forced[..., end_id] = logp[..., end_id]
            logp = forced
        pad_row = torch.full((V,), float("-inf"), device=device)
        pad_row[pad_id] = 0.0
        logp = torch.where(finished.unsqueeze(2), pad_row, logp)
        cand = (scores.unsqueeze(2) + logp).view(B, K * V)
        scores, flat = cand.topk(K, dim=1)  # (B, K)
        origin, word = flat // V, flat % V  # beam each candidate extends, and its word
        finished = finished.gather(1, origin)
        lengths = lengths.gather(1, origin) + (~finished).long()
        seqs = torch.cat(
            [seqs.gather(1, origin.unsqueeze(2).expand_as(seqs)), word.unsqueeze(2)], 2
        )
        beam_rows = (base + origin).view(-1)  # (B*K,) rows of the beams being extended
        state = _select(state, beam_rows)
        if alpha is not None:
            a = alpha.float().index_select(0, beam_rows).view(B, K, 1, -1)  # (B, K, 1, N)
            if hist is None:
                hist = a
            else:
                hist = hist.gather(1, origin[:, :, None, None].expand_as(hist))
                hist = torch.cat([hist, a], dim=2)  # (B, K, t + 1, N)
        finished = finished | (word == end_id)
        tokens = word.view(-1)
        if bool(finished.all()):
            break
    norm = scores / lengths.clamp(min=1).float() ** length_penalty
    order = norm.argsort(dim=1, descending=True)
    seqs_l, lengths_l = seqs.tolist(), lengths.tolist()
    hist_c = None if hist is None else hist.cpu()
    out = []
    for b in range(B):
        beams = []
        for k in order[b].tolist():
            n = lengths_l[b][k] - 1  # words before <end>
            beams.append(
                Hypothesis(
                    tokens=seqs_l[b][k][:n],
                    score=float(norm[b, k]),
                    logprob=float(scores[b, k]),
                    alphas=None if hist_c is None else hist_c[b, k, :n],
                )
            )
        out.append(beams)
    return out


def generate(
    decoder: Decoder,
    feats: Tensor,
    *,
    beam_size: int = 1,
    start_id: int,
    end_id: int,
    pad_id: int = 0,
    max_len: int = 20,
    length_penalty: float = 1.0,
    banned: tuple[int, ...] = (),
) -> list[list[Hypothesis]]:
    """Captions for a batch of region features: greedy for beam 1, else beam search."""
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if beam_size == 1:
        hyps = greedy_search(
            decoder, feats, start_id=start_id, end_id=end_id, max_len=max_len, banned=banned
        )
        return [[h] for h in hyps]
    return beam_search(
        decoder,
        feats,
        beam_size=beam_size,
        start_id=start_id,
        end_id=end_id,
        pad_id=pad_id,
        max_len=max_len,
        length_penalty=length_penalty,
        banned=banned,
    )
