"""Self-critical sequence training (Rennie et al. 2017): REINFORCE with CIDEr-D as the reward.

For each image, sample S captions from the model, score each with CIDEr-D against the image's
references (document frequencies from the training references only), and push up the
log-probability of the samples that beat a baseline: the greedy caption's reward ("greedy",
the paper's) or the mean reward of the image's other samples ("mean", Luo 2020), which needs
no extra decode. The reward is CIDEr-D, optionally mixed with sentence BLEU-4
(`bleu4_weight`, as some SCST implementations do to trade CIDEr-D for BLEU).

With `score_end`, the reward also sees where a caption ends: an end word follows every
sampled caption and every reference, so "... in front of a <end>" no longer matches the
references' "in front of a building" as well as a whole caption does. Without it, CIDEr-D
rewards captions cut off mid-phrase (their n-grams all match; what is missing costs little),
and a model trained long on it ends about one caption in five on "a" or "the".

The decoder runs without dropout here, in sampling and in scoring alike: the log-probabilities
that get the gradient are then those of the distribution the samples were drawn from.

Letters: B images, S samples per image, T steps, V vocabulary.
"""

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .decoders import Decoder
from .decoding import greedy_search, sample
from .errors import ConfigError
from .metrics import CiderD, sentence_bleu
from .tokenizer import tokenize_caption
from .vocab import Vocab

BASELINES = ("greedy", "mean")
END_WORD = "<end>"  # what the reward sees after each caption's last word, with score_end


def check_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in and values checked (the keys of conf/experiment/flickr8k_scst.yaml)."""
    defaults = {
        "samples": 5,
        "baseline": "greedy",
        "temperature": 1.0,
        "max_len": None,
        "score_end": False,
    }
    out = {**defaults, "cider_weight": 1.0, "bleu4_weight": 0.0, **cfg}
    if out["baseline"] not in BASELINES:
        raise ConfigError(
            f"scst.baseline must be one of {', '.join(BASELINES)}; got {out['baseline']!r}"
        )
    if int(out["samples"]) < 1 or (out["baseline"] == "mean" and int(out["samples"]) < 2):
        raise ConfigError("scst.samples must be >= 1 (>= 2 with the mean baseline)")
    if float(out["temperature"]) <= 0:
        raise ConfigError("scst.temperature must be > 0")
    weights = float(out["cider_weight"]), float(out["bleu4_weight"])
    if min(weights) < 0 or max(weights) == 0:
        raise ConfigError("scst.cider_weight and scst.bleu4_weight must be >= 0, not both 0")
    return out


def reward_scorer(train_refs: Mapping[Hashable, Sequence[str]], cfg: dict[str, Any]) -> CiderD:
    """CIDEr-D for `rewards_of`: raw training references in, their document frequencies.

    With `cfg["score_end"]` every reference gets the end word (see the module docstring).
    """
    if not cfg["score_end"]:
        return CiderD(train_refs)
    ended = {k: [f"{tokenize_caption(c)} {END_WORD}" for c in cs] for k, cs in train_refs.items()}
    return CiderD(ended, tokenized=True)


def rewards_of(
    captions: Sequence[str], keys: Sequence[Hashable], cider: CiderD, cfg: dict[str, Any]
) -> Tensor:
    """Reward of each tokenized caption against its image's references: (len(captions),).

    `cfg` is a `check_config` result: cider_weight * CIDEr-D + bleu4_weight * sentence BLEU-4;
    `cider` comes from `reward_scorer` with the same `cfg`.
    """
    if cfg["score_end"]:  # every caption ended: sampling and greedy search end them at max_len
        captions = [f"{c} {END_WORD}".lstrip() for c in captions]
    w_cider, w_bleu = float(cfg["cider_weight"]), float(cfg["bleu4_weight"])
    out = torch.zeros(len(captions), dtype=torch.float64)
    if w_cider:
        out += w_cider * torch.tensor(cider.score_each(captions, keys, tokenized=True))
    if w_bleu:
        bleu = [sentence_bleu(c, cider.refs[k]) for c, k in zip(captions, keys, strict=True)]
        out += w_bleu * torch.tensor(bleu, dtype=torch.float64)
    return out.float()


def baseline_rewards(rewards: Tensor, greedy: Tensor | None, kind: str) -> Tensor:
    """Baseline (B, S) for rewards (B, S): the greedy reward (B,) or the other samples' mean."""
    if kind == "greedy":
        if greedy is None:
            raise ValueError("the greedy baseline needs the greedy captions' rewards")
        return greedy.unsqueeze(1).expand_as(rewards)
    S = rewards.size(1)
    return (rewards.sum(1, keepdim=True) - rewards) / (S - 1)  # leave-one-out mean


def scst_loss(logp: Tensor, mask: Tensor, advantage: Tensor) -> Tensor:
    """REINFORCE loss: -(reward - baseline) * log p(word), averaged over the real words.

    logp (R, T) log-probabilities of the sampled words (the <end> included), mask (R, T) 1 for
    real words, advantage (R,) reward minus baseline; no gradient flows into the advantage.
    """
    mask = mask.to(logp.dtype)
    return -(advantage.detach().unsqueeze(1) * logp * mask).sum() / mask.sum().clamp(min=1)


def sequence_log_probs(
    decoder: Decoder,
    feats: Tensor,
    tokens: Tensor,
    vocab: Vocab,
    banned: tuple[int, ...],
    group: int = 1,
) -> tuple[Tensor, Tensor]:
    """Teacher-forced log-probabilities of sampled `tokens` (R, L): logp (R, L), mask (R, L).

    feats (R / G, N, D) are the images' features, image i's samples the G = `group` rows
    iG ... iG + G - 1 of `tokens`: the decoder prepares each image's regions once for all of
    its samples. The banned words get -inf before the softmax, as they did when sampling, so
    this is the sampling distribution itself.
    """
    R = tokens.size(0)
    start = torch.full((R, 1), vocab.start_id, dtype=tokens.dtype, device=tokens.device)
    inputs = torch.cat([start, tokens[:, :-1]], dim=1)  # (R, L)
    mask = tokens != vocab.pad_id  # (R, L): words and <end>
    inputs = inputs.masked_fill(~mask, vocab.pad_id)
    logits, _ = decoder(feats, inputs, lengths=mask.sum(1), group=group)  # (R, L, V)
    logits = logits.float()
    if banned:
        logits[..., list(banned)] = float("-inf")
    logp = F.log_softmax(logits, dim=-1).gather(2, tokens.unsqueeze(2)).squeeze(2)  # (R, L)
    return logp.masked_fill(~mask, 0.0), mask


def self_critical_step(
    decoder: Decoder,
    feats: Tensor,
    image_ids: Sequence[Hashable],
    vocab: Vocab,
    cider: CiderD,
    cfg: dict[str, Any],
    banned: tuple[int, ...],
) -> tuple[Tensor, dict[str, float]]:
    """One self-critical loss for a batch of images: (loss, statistics to log)."""
    S, kind = int(cfg["samples"]), cfg["baseline"]
    max_len = int(cfg.get("max_len") or vocab.max_len)
    was_training = decoder.training
    decoder.eval()  # no dropout: see the module docstring
    try:
        tokens = sample(
            decoder,
            feats.detach(),
            num_samples=S,
            start_id=vocab.start_id,
            end_id=vocab.end_id,
            pad_id=vocab.pad_id,
            max_len=max_len,
            temperature=float(cfg.get("temperature", 1.0)),
            banned=banned,
        )  # (B*S, L)
        keys = [k for k in image_ids for _ in range(S)]
        captions = [vocab.decode(row) for row in tokens.tolist()]
        rewards = rewards_of(captions, keys, cider, cfg).view(-1, S)  # (B, S)
        greedy = None
        if kind == "greedy":
            with torch.no_grad():
                hyps = greedy_search(
                    decoder,
                    feats.detach(),
                    start_id=vocab.start_id,
                    end_id=vocab.end_id,
                    max_len=max_len,
                    banned=banned,
                )
            greedy_caps = [vocab.decode(h.tokens) for h in hyps]
            greedy = rewards_of(greedy_caps, list(image_ids), cider, cfg)
        advantage = (rewards - baseline_rewards(rewards, greedy, kind)).flatten()  # (B*S,)
        logp, mask = sequence_log_probs(decoder, feats, tokens, vocab, banned, group=S)
        loss = scst_loss(logp, mask, advantage.to(logp.device))
    finally:
        decoder.train(was_training)
    stats = {
        "reward": float(rewards.mean()),
        "advantage_abs": float(advantage.abs().mean()),
        "sample_len": float(mask.sum(1).float().mean()) - 1,
    }
    if greedy is not None:
        stats["greedy_reward"] = float(greedy.mean())
    return loss, stats
