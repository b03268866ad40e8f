"""Simple reference implementations that the optimised code is tested and timed against."""

import torch
import torch.nn.functional as F
from torch import Tensor

from captioning.decoders import Decoder
from captioning.decoding import Hypothesis


def _ban(logp: Tensor, banned: tuple[int, ...]) -> Tensor:
    if banned:
        logp[:, list(banned)] = float("-inf")
    return logp


def _select(xs: tuple[Tensor, ...], idx: Tensor) -> tuple[Tensor, ...]:
    return tuple(x.index_select(0, idx) for x in xs)


@torch.no_grad()
def beam_search_reference(
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
    """The simple batched beam search this project started with (commit 8b1f2b5), kept as is.

    Every image keeps its K beams in the batch until the last image ends, and the image memory
    is copied K times. `captioning.decoding.beam_search` must return the same beams.

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


def forward_hoisted_reference(dec, feats: Tensor, inputs: Tensor) -> tuple[Tensor, Tensor]:
    """`SoftAttentionDecoder.forward` as of commit 8b1f2b5: encoder-side attention projection,
    embedding half of the gates and output layer hoisted out of the time loop; every step of
    every row computed, padding included."""
    B, T = inputs.shape
    E = dec.embed_dim
    memory = dec.prepare(feats)  # encoder-side attention projection, once
    h, c = dec.init_state(memory)
    emb = dec.embedding(inputs)  # (B, T, E)
    w_ih = dec.lstm.weight_ih
    # The embedding half of the LSTM gates for all steps in one matmul: (B, T, 4H).
    emb_gates = F.linear(emb, w_ih[:, :E], dec.lstm.bias_ih + dec.lstm.bias_hh)
    # Per step, the context and hidden halves share one matmul.
    w_step = torch.cat([w_ih[:, E:], dec.lstm.weight_hh], dim=1)  # (4H, D + H)
    hs, contexts, alphas = [], [], []
    for t in range(T):
        context, alpha = dec._attend(h, memory)
        gates = emb_gates[:, t] + F.linear(torch.cat([context, h], dim=1), w_step)
        i, f, g, o = gates.chunk(4, dim=1)  # LSTMCell's gate order
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        hs.append(h)
        contexts.append(context)
        alphas.append(alpha)
    h_all = torch.stack(hs, 1)  # (B, T, H)
    # The output layer runs once over all steps rather than T times.
    logits = dec._logits(h_all, emb, torch.stack(contexts, 1))  # (B, T, V)
    return logits, torch.stack(alphas, 1)  # (B, T, N)
