"""Greedy and beam search, written once over the decoder step API and batched over images.

Letters: B images, K beams, V vocabulary, N regions, L generated length.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import precision as _precision
from .decoders import Decoder


@dataclass
class Hypothesis:
    """One generated caption: word ids (no <start>/<end>), scores, and attention per word."""

    tokens: list[int]
    score: float  # log-probability divided by length**length_penalty (what beams are ranked by)
    logprob: float  # summed log-probability, <end> included
    alphas: Tensor | None  # (L, N) attention over regions for each generated word


@dataclass(frozen=True)
class DecodeConfig:
    """How captions are generated: the `decode`, `val_decode` and `test_decode` config blocks."""

    beam_size: int = 1  # 1: greedy
    max_len: int | None = None  # None: the vocabulary's longest caption
    length_penalty: float = 1.0  # beams ranked by log-probability / length**length_penalty
    allow_unk: bool = False  # never generate <unk> unless allowed
    no_repeat_ngram: int = 0  # n > 0: no caption repeats one of its n-grams
    precision: str = "auto"  # beam search's matmuls: auto (bf16 on CPUs with AMX) | fp32 | bf16

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None) -> "DecodeConfig":
        """From a config block; its other keys (`meteor`) are not about decoding."""
        cfg = cfg or {}
        return cls(
            beam_size=int(cfg.get("beam_size", 1)),
            max_len=int(cfg["max_len"]) if cfg.get("max_len") else None,
            length_penalty=float(cfg.get("length_penalty", 1.0)),
            allow_unk=bool(cfg.get("allow_unk", False)),
            no_repeat_ngram=int(cfg.get("no_repeat_ngram") or 0),
            precision=str(cfg.get("precision") or "auto"),
        )


def _ban(logp: Tensor, banned: tuple[int, ...]) -> Tensor:
    """Words that may never be generated (e.g. <unk>): log-probability -inf."""
    if banned:
        logp[:, list(banned)] = float("-inf")
    return logp


def block_repeated_ngrams(logp: Tensor, seqs: Tensor, n: int) -> Tensor:
    """Words that would repeat an n-gram already in the hypothesis: log-probability -inf.

    logp (R, V) the next word's log-probabilities; seqs (R, L) the words so far, one row per
    row of logp. A word w is blocked in row r when seqs[r]'s last n-1 words followed by w occur
    earlier in seqs[r] (n = 1: no word twice). n = 0 blocks nothing. In place; returns logp.
    """
    L = seqs.size(1)
    if n <= 0 or n > L:
        return logp
    windows = seqs.unfold(1, n, 1)  # (R, L-n+1, n): every n-gram so far
    prefix = seqs[:, L - n + 1 :].unsqueeze(1)  # (R, 1, n-1): what the next word completes
    r, w = (windows[:, :, : n - 1] == prefix).all(dim=2).nonzero(as_tuple=True)
    logp[r, windows[r, w, n - 1]] = float("-inf")
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
    no_repeat_ngram: int = 0,
) -> list[Hypothesis]:
    """Pick the most likely word at every step; at most `max_len` words, then <end>.

    With `no_repeat_ngram` n > 0, no n-gram occurs twice in a caption (`block_repeated_ngrams`).
    """
    B = feats.size(0)
    memory = decoder.prepare(feats)
    state = decoder.init_state(memory)
    tokens = torch.full((B,), start_id, dtype=torch.long, device=feats.device)
    words, lps, alphas = [], [], []
    done = torch.zeros(B, dtype=torch.bool, device=feats.device)
    for t in range(max_len + 1):
        logits, state, alpha = decoder.step(tokens, state, memory)
        logp = _ban(logits.float().log_softmax(dim=-1), banned)  # (B, V)
        if no_repeat_ngram and words:
            block_repeated_ngrams(logp, torch.stack(words, 1), no_repeat_ngram)
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


# Beam search runs this many images at a time: enough rows per step that the decoder's weights
# are read once for many beams, few enough that a step's attention tensors (C, K, N, A) stay
# near the cache (benchmarks/beam_search.py --chunks picks it).
CHUNK_SIZE = 128
# Images whose beams have all ended leave the batch once they are this fraction of it: each
# compaction copies the remaining images' memory, so it waits until it saves more than that.
COMPACT_FRACTION = 0.125


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
    chunk_size: int = CHUNK_SIZE,
    no_repeat_ngram: int = 0,
    precision: str = "fp32",
) -> list[list[Hypothesis]]:
    """Beam search for a batch of images at once; returns each image's beams, best first.

    Finished beams stay in the beam with a frozen score (they can only continue with <pad> at
    no cost), so every tensor of an image keeps its K beams. Beams are ranked at the end by
    logprob / length**length_penalty, since raw summed log-probability favours short captions.

    Each image's result depends on that image alone, so the batch is cut into chunks of
    `chunk_size` images, an image leaves its chunk once all its beams have ended, the K beams
    of an image share one copy of its memory (`Decoder.step_grouped`), and the first step runs
    once per image, since all its beams are still the same.

    With `no_repeat_ngram` n > 0, no beam repeats one of its n-grams (`block_repeated_ngrams`).
    `precision` (auto | fp32 | bf16, see `captioning.precision`): the dtype of the step's
    matmuls; auto is bf16 on CPUs with AMX, else fp32.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out: list[list[Hypothesis]] = []
    with _precision.use(_precision.resolve(precision, feats.device)):
        for s in range(0, feats.size(0), chunk_size):
            out += _beam_chunk(
                decoder,
                feats[s : s + chunk_size],
                beam_size,
                start_id,
                end_id,
                pad_id,
                max_len,
                length_penalty,
                banned,
                no_repeat_ngram,
            )
    return out


def _beam_chunk(
    decoder: Decoder,
    feats: Tensor,
    K: int,
    start_id: int,
    end_id: int,
    pad_id: int,
    max_len: int,
    length_penalty: float,
    banned: tuple[int, ...],
    no_repeat_ngram: int = 0,
) -> list[list[Hypothesis]]:
    # A: images still running; G: state rows per image (1 before the first word, then K)
    C, device = feats.size(0), feats.device
    memory = decoder.prepare(feats)  # per image, never repeated per beam
    state = decoder.init_state(memory)
    img = torch.arange(C, device=device)  # (A,) position in the chunk of each running image
    tokens = torch.full((C,), start_id, dtype=torch.long, device=device)
    G = 1
    scores = torch.zeros(C, 1, device=device)  # (A, G) summed log-probability
    finished = torch.zeros(C, 1, dtype=torch.bool, device=device)
    lengths = torch.zeros(C, 1, dtype=torch.long, device=device)  # words, <end> included
    seqs = torch.zeros(C, 1, 0, dtype=torch.long, device=device)  # (A, G, t)
    hist: Tensor | None = None  # (A, G, t, N) attention per word
    results: list[list[Hypothesis]] = [[] for _ in range(C)]
    pad_row: Tensor | None = None  # (V,): an ended beam's only continuation, <pad>, at no cost
    for t in range(max_len + 1):
        A, live = img.numel(), ~finished  # live (A, G)
        if t == 0 or bool(live.all()):
            logits, state, alpha = decoder.step_grouped(tokens, state, memory, G)
            logp = _log_probs(logits, banned, end_id, t == max_len)  # (A*G, V)
            if no_repeat_ngram:
                block_repeated_ngrams(logp, seqs.reshape(A * G, t), no_repeat_ngram)
        else:  # ended beams can only add <pad>: the step leaves them out
            rows = live.view(-1).nonzero().squeeze(1)  # (R,)
            logits, new, alpha_r = decoder.step_grouped(
                tokens[rows], _select(state, rows), memory, live.sum(dim=1).tolist()
            )
            state = tuple(
                s.index_copy(0, rows, x.to(s.dtype)) for s, x in zip(state, new, strict=True)
            )
            scored = _log_probs(logits, banned, end_id, t == max_len)  # (R, V)
            if no_repeat_ngram:  # live beams only: an ended beam's <pad>s are no n-grams
                block_repeated_ngrams(scored, seqs.reshape(A * G, t)[rows], no_repeat_ngram)
            logp = pad_row.expand(A * G, -1).index_copy(0, rows, scored)  # (A*G, V)
            alpha = None
            if alpha_r is not None:
                alpha = alpha_r.new_zeros(A * G, alpha_r.size(1)).index_copy_(0, rows, alpha_r)
        V = logp.size(-1)
        if pad_row is None:
            pad_row = torch.full((V,), float("-inf"), device=device)
            pad_row[pad_id] = 0.0
        logp = logp.view(A, G, V)
        cand = (scores.unsqueeze(2) + logp).view(A, G * V)
        scores, flat = cand.topk(K, dim=1)  # (A, K)
        origin, word = flat // V, flat % V  # beam each candidate extends, and its word
        finished = finished.gather(1, origin)
        lengths = lengths.gather(1, origin) + (~finished).long()
        seqs = torch.cat(
            [seqs.gather(1, origin.unsqueeze(2).expand(A, K, t)), word.unsqueeze(2)], 2
        )
        beam_rows = (torch.arange(A, device=device).unsqueeze(1) * G + origin).view(-1)  # (A*K,)
        state = _select(state, beam_rows)
        if alpha is not None:
            a = alpha.float().index_select(0, beam_rows).view(A, K, 1, -1)  # (A, K, 1, N)
            if hist is None:
                hist = a
            else:
                hist = hist.gather(1, origin[:, :, None, None].expand(A, K, t, hist.size(3)))
                hist = torch.cat([hist, a], dim=2)  # (A, K, t + 1, N)
        finished = finished | (word == end_id)
        tokens = word.view(-1)
        G = K
        done = finished.all(dim=1)  # (A,)
        n_done = int(done.sum())
        if n_done == 0 or (n_done < A and n_done < COMPACT_FRACTION * A):
            continue
        rows = done.nonzero().squeeze(1)
        _emit(
            results,
            img[rows],
            scores[rows],
            lengths[rows],
            seqs[rows],
            None if hist is None else hist[rows],
            length_penalty,
        )
        if n_done == A:
            break
        keep = (~done).nonzero().squeeze(1)  # (A',)
        img, scores, finished, lengths, seqs = (
            x[keep] for x in (img, scores, finished, lengths, seqs)
        )
        hist = None if hist is None else hist[keep]
        memory = _select(memory, keep)
        keep_rows = (keep.unsqueeze(1) * K + torch.arange(K, device=device)).view(-1)  # (A'*K,)
        state, tokens = _select(state, keep_rows), tokens[keep_rows]
    return results


def _log_probs(logits: Tensor, banned: tuple[int, ...], end_id: int, last: bool) -> Tensor:
    """Log-probabilities (R, V) of the next word; at the last step allowed, <end> only."""
    logp = _ban(logits.float().log_softmax(dim=-1), banned)
    if last:
        forced = torch.full_like(logp, float("-inf"))
        forced[:, end_id] = logp[:, end_id]
        logp = forced
    return logp


def _emit(
    results: list[list[Hypothesis]],
    img: Tensor,
    scores: Tensor,
    lengths: Tensor,
    seqs: Tensor,
    hist: Tensor | None,
    length_penalty: float,
) -> None:
    """Write the ranked beams of images that have ended into `results` at their positions."""
    norm = scores / lengths.clamp(min=1).float() ** length_penalty  # (R, K)
    order = norm.argsort(dim=1, descending=True).tolist()
    norm_l, scores_l, lengths_l = norm.tolist(), scores.tolist(), lengths.tolist()
    seqs_l = seqs.tolist()
    hist_c = None if hist is None else hist.cpu()
    for r, i in enumerate(img.tolist()):
        beams = []
        for k in order[r]:
            n = lengths_l[r][k] - 1  # words before <end>
            beams.append(
                Hypothesis(
                    tokens=seqs_l[r][k][:n],
                    score=norm_l[r][k],
                    logprob=scores_l[r][k],
                    alphas=None if hist_c is None else hist_c[r, k, :n],
                )
            )
        results[i] = beams


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
    chunk_size: int = CHUNK_SIZE,
    no_repeat_ngram: int = 0,
    precision: str = "fp32",
) -> list[list[Hypothesis]]:
    """Captions for a batch of region features: greedy for beam 1, else beam search.

    `no_repeat_ngram` n > 0: no caption repeats one of its n-grams (0: off). `precision`
    applies to beam search (greedy decoding runs in fp32).
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if no_repeat_ngram < 0:
        raise ValueError(f"no_repeat_ngram must be >= 0 (0: off), got {no_repeat_ngram}")
    _precision.resolve(precision, feats.device)  # a bad value fails for greedy too
    if beam_size == 1:
        hyps = greedy_search(
            decoder,
            feats,
            start_id=start_id,
            end_id=end_id,
            max_len=max_len,
            banned=banned,
            no_repeat_ngram=no_repeat_ngram,
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
        chunk_size=chunk_size,
        no_repeat_ngram=no_repeat_ngram,
        precision=precision,
    )


@torch.no_grad()  # the samples are words: nothing to differentiate, no graph to keep
def sample(
    decoder: Decoder,
    feats: Tensor,
    *,
    num_samples: int,
    start_id: int,
    end_id: int,
    pad_id: int = 0,
    max_len: int = 20,
    temperature: float = 1.0,
    banned: tuple[int, ...] = (),
    compact: bool = True,
) -> Tensor:
    """Draw `num_samples` captions per image from the decoder (self-critical training).

    Returns tokens (B * S, L): the S samples of image b are rows b*S .. b*S+S-1, each its words
    then <end> then <pad>; at most `max_len` words, then <end> (as in greedy search). The samples
    of an image share its memory (`Decoder.step_grouped`), as beams do.

    With `compact`, a sample that has ended leaves the batch: the next steps run only the rows
    still sampling (a batch's longest sample runs far past its mean, so the full batch would
    spend about a third of its row-steps on samples already ended). Each step draws by the Gumbel-max trick, with
    noise drawn for every row whether it still samples or not, so `compact=False` (every row steps
    until the last one ends) draws the same captions from the same seed.
    """
    if num_samples < 1 or temperature <= 0:
        raise ValueError("num_samples must be >= 1 and temperature > 0")
    B, S = feats.size(0), num_samples
    memory = decoder.prepare(feats)
    state = tuple(s.repeat_interleave(S, dim=0) for s in decoder.init_state(memory))  # (BS, ..)
    image_of = torch.arange(B, device=feats.device).repeat_interleave(S)  # (BS,)
    rows = torch.arange(B * S, device=feats.device)  # the rows still sampling, in image order
    tokens = torch.full((B * S,), start_id, dtype=torch.long, device=feats.device)
    group: int | list[int] = S
    done = torch.zeros(B * S, dtype=torch.bool, device=feats.device)  # without compact
    out = []
    for t in range(max_len + 1):
        logits, state, _ = decoder.step_grouped(tokens, state, memory, group)  # (R, V)
        if t == max_len:  # the longest caption allowed: only <end> may follow
            tokens = torch.full_like(tokens, end_id)
        else:
            scores = _ban(logits.float() / temperature, banned)  # (R, V)
            # argmax(scores + Gumbel noise) is a draw from softmax(scores); -log(Exp(1)) is
            # Gumbel noise
            noise = torch.empty(B * S, scores.size(1), device=scores.device).exponential_()
            tokens = (scores - noise.index_select(0, rows).log()).argmax(dim=-1)
        if not compact:  # ended rows go on stepping; what they draw is dropped
            tokens = tokens.masked_fill(done, pad_id)
        row_tokens = torch.full((B * S,), pad_id, dtype=torch.long, device=feats.device)
        out.append(row_tokens.index_put_((rows,), tokens))
        ended = tokens == end_id
        if not compact:
            done = done | ended
            if bool(done.all()):
                break
        elif bool(ended.all()):
            break
        elif bool(ended.any()):
            keep = (~ended).nonzero().squeeze(1)
            rows, tokens = rows.index_select(0, keep), tokens.index_select(0, keep)
            state = _select(state, keep)
            group = torch.bincount(image_of.index_select(0, rows), minlength=B).tolist()
    return torch.stack(out, 1)  # (BS, L)
