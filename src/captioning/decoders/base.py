"""The decoder contract, additive attention, and the registry that builds decoders by name.

Every decoder maps region features (B, N, D) and caption tokens to next-word logits:

- ``prepare(feats) -> memory``: step-independent tensors, batch first (beam search reindexes them)
- ``init_state(memory) -> state``: the recurrent state, a tuple of (B, ...) tensors
- ``step(tokens, state, memory) -> (logits (B, V), state, alpha (B, N) or None)``
- ``step_grouped(tokens, state, memory, group)``: `step` for G state rows per memory row, or
  group[i] for row i (the beams of one image share its memory, so beam search never copies
  the image features, and ended beams can be left out)
- ``forward(feats, inputs, lengths=None, group=1) -> (logits (B, T, V), alphas (B, T, N) or
  None)``: teacher forcing; with `lengths` a decoder may skip the steps of row b past
  lengths[b] (their logits and alphas are then zeros: they must be masked, as the loss does
  with padding); with `group` G, feats has B / G rows and image i serves the G caption rows
  iG ... iG + G - 1 (self-critical's samples), so `prepare` runs once per image

Letters: B batch, T caption steps, N image regions, D feature width, E embedding width,
H hidden width, A attention width, V vocabulary, G state rows per memory row.

A decoder class registers itself with ``@DECODERS.register(name)``; importing
`captioning.decoders` imports every module that holds one.
"""

import inspect
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import Registry

DECODERS = Registry("decoder")
log = logging.getLogger(__name__)

State = tuple[Tensor, ...]
Memory = tuple[Tensor, ...]
Group = int | list[int]  # state rows per memory row: the same for every row, or one count each


class Decoder(nn.Module):
    """Base class: the straightforward teacher-forced forward is a loop over `step`."""

    def prepare(self, feats: Tensor) -> Memory:
        return (feats,)

    def init_state(self, memory: Memory) -> State:
        raise NotImplementedError

    def step(self, tokens: Tensor, state: State, memory: Memory):
        raise NotImplementedError

    def step_grouped(self, tokens: Tensor, state: State, memory: Memory, group: Group):
        """`step` where memory row i serves the next G state rows, G = `group` or `group[i]`.

        Tokens and state have one row per (image, beam), the beams of each image together;
        with a list, an image may have fewer rows (ended beams are left out) or none. This
        default copies each memory row per state row; decoders with a large memory override it.
        """
        if group != 1:
            counts = torch.tensor(group, device=tokens.device) if isinstance(group, list) else group
            rows = torch.arange(memory[0].size(0), device=tokens.device).repeat_interleave(counts)
            memory = tuple(m.index_select(0, rows) for m in memory)
        return self.step(tokens, state, memory)

    def forward(self, feats: Tensor, inputs: Tensor, lengths: Tensor | None = None, group: int = 1):
        # `lengths` lets a decoder skip padding steps; the plain loop computes them all.
        return self.forward_stepwise(expand_images(feats, inputs, group), inputs)

    def compile_step(self, **options) -> None:
        """Compile the training hot path in place; the state dict keeps its keys.

        `nn.Module.compile` compiles in place, unlike `torch.compile(module)`, whose wrapper puts
        `_orig_mod.` in front of every key of the state dict.
        """
        self.compile(**options)

    def forward_stepwise(self, feats: Tensor, inputs: Tensor):
        """Teacher forcing one `step` at a time: the reference the fast paths must match."""
        memory = self.prepare(feats)
        state = self.init_state(memory)
        logits, alphas = [], []
        for t in range(inputs.size(1)):
            out, state, alpha = self.step(inputs[:, t], state, memory)
            logits.append(out)
            alphas.append(alpha)
        alphas_t = None if alphas[0] is None else torch.stack(alphas, 1)  # (B, T, N)
        return torch.stack(logits, 1), alphas_t  # (B, T, V)

    def regularizer(self, alphas: Tensor | None, mask: Tensor) -> Tensor:
        """Extra loss term from the attention weights; none by default."""
        return mask.new_zeros((), dtype=torch.float32)

    def attention_loss(self, token_logp: Tensor, mask: Tensor) -> Tensor:
        """Extra loss of the last teacher-forced `forward` given its words' log-probabilities
        (B, T) (detached) and mask (B, T); hard attention's REINFORCE term, else zero."""
        return mask.new_zeros((), dtype=torch.float32)


class Attention(nn.Module):
    """Additive (Bahdanau) attention over image regions."""

    def __init__(self, encoder_dim: int, hidden_dim: int, attention_dim: int):
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(hidden_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)

    def forward(self, feats: Tensor, feats_proj: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        # feats (B, N, D), feats_proj = encoder_att(feats) (B, N, A), h (B, H)
        e = self.full_att(torch.tanh(feats_proj + self.decoder_att(h).unsqueeze(1)))  # (B, N, 1)
        alpha = e.squeeze(2).softmax(dim=1)  # (B, N)
        context = torch.bmm(alpha.unsqueeze(1), feats).squeeze(1)  # (B, D)
        return context, alpha

    def grouped(
        self, feats: Tensor, feats_proj: Tensor, d: Tensor, group: Group
    ) -> tuple[Tensor, Tensor]:
        """Attention of R queries d = decoder_att(h) (R, A) over their images' regions: alpha
        (R, N), context (R, D); the rows of image i are the next `group` (or group[i]) rows.

        The beams of an image attend to its one copy of feats (B, N, D) and feats_proj (B, N, A).
        """
        B, N, _ = feats.shape
        full_att = self.full_att
        if isinstance(group, int) and feats.device.type != "cpu":
            z = feats_proj.unsqueeze(1) + d.view(B, group, 1, -1)  # (B, G, N, A)
            alpha = full_att(torch.tanh(z)).view(B, group, N).softmax(dim=2)
            return alpha.view(-1, N), torch.bmm(alpha, feats).view(B * group, -1)
        counts = [group] * B if isinstance(group, int) else group
        if feats.device.type != "cpu":  # rows of their image's memory, copied
            img = torch.repeat_interleave(torch.tensor(counts, device=d.device))
            z = feats_proj.index_select(0, img) + d.unsqueeze(1)  # (R, N, A)
            alpha = full_att(torch.tanh(z)).squeeze(2).softmax(dim=1)
            return alpha, torch.bmm(alpha.unsqueeze(1), feats.index_select(0, img)).squeeze(1)
        # On the CPU, one image at a time: the energies of a step, a (R, N, A) tensor, are by
        # far its largest, and an image's (G, N, A) share of them stays in cache. As in
        # fast_tanh, tanh(z) = 2*sigmoid(2z) - 1, with the 2 and the -1 folded into full_att.
        w2, b2 = 2 * full_att.weight, full_att.bias - full_att.weight.sum()  # (1, A), (1,)
        d2 = (2 * d).unsqueeze(1)  # (R, 1, A)
        alphas, contexts, r = [], [], 0
        for i, g in enumerate(counts):
            if g:
                z2 = torch.add(d2[r : r + g], feats_proj[i], alpha=2)  # 2 (proj + d): (G, N, A)
                alpha = F.linear(z2.sigmoid_(), w2, b2).squeeze(2).softmax(dim=1)
                alphas.append(alpha)  # (G, N)
                contexts.append(alpha @ feats[i])  # (G, D)
                r += g
        return torch.cat(alphas), torch.cat(contexts)


def check_group(feats: Tensor, inputs: Tensor, group: int) -> None:
    """A ValueError unless `group` caption rows per image account for every row of `inputs`."""
    if group < 1 or feats.size(0) * group != inputs.size(0):
        raise ValueError(
            f"{inputs.size(0)} caption rows cannot be {group} per image of {feats.size(0)}"
        )


def expand_images(feats: Tensor, inputs: Tensor, group: int) -> Tensor:
    """feats (B / G, N, D) with one row per caption row of `inputs`: (B, N, D)."""
    check_group(feats, inputs, group)
    return feats if group == 1 else feats.repeat_interleave(group, dim=0)


def memory_rows(
    n_images: int, group: int, order: Tensor | None, device: torch.device
) -> Tensor | None:
    """The image row each caption row reads, after sorting by `order`; None: row i reads i.

    Decoders that embed or project the regions (`prepare`) do it once per image and then
    index the result, so G captions of an image cost one projection (and its gradient sums
    over them).
    """
    rows = None if group == 1 else torch.arange(n_images, device=device).repeat_interleave(group)
    if order is None:
        return rows
    return order if rows is None else rows.index_select(0, order)


def unpack_steps(
    logits: Tensor, alphas: Tensor, order: Tensor | None, alive: Tensor
) -> tuple[Tensor, Tensor]:
    """The fast teacher-forced path's packed outputs back to (B, T, V) and (B, T, N).

    logits (P, V) and alphas (P, N) hold the computed steps in (T, B) order, rows sorted by
    `order` (B,) when lengths were given (`order` None: every step of every row, a transpose
    away); `alive` (T, B) marks the computed steps. Steps past a row's length are zeros.
    """
    T, B = alive.shape
    if order is None:
        return logits.view(T, B, -1).transpose(0, 1), alphas.view(T, B, -1).transpose(0, 1)
    rows = order.expand(T, B)[alive]  # (P,) input row of each packed entry
    at = torch.arange(T, device=alive.device).unsqueeze(1).expand(T, B)[alive]  # (P,) its step
    # In place into fresh zeros: the out-of-place index_put would copy the (B, T, V) zeros.
    logits_t = logits.new_zeros(B, T, logits.size(1)).index_put_((rows, at), logits)
    alphas_t = alphas.new_zeros(B, T, alphas.size(1)).index_put_((rows, at), alphas)
    return logits_t, alphas_t


def doubly_stochastic(alphas: Tensor, mask: Tensor, weight: float) -> Tensor:
    """Xu et al.'s attention regulariser: every region should get about one unit of attention
    over the caption; alphas (B, T, N), mask (B, T), so padding steps do not count."""
    coverage = (alphas * mask.unsqueeze(2)).sum(dim=1)  # (B, N)
    return weight * ((1.0 - coverage) ** 2).mean()


def check_dropout(p: float) -> float:
    """`p` if it is a valid dropout probability, else a ConfigError naming decoder.dropout."""
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"decoder.dropout must be in [0, 1), got {p}")
    return p


def _options(cls: type) -> set[str]:
    """Keyword options of a decoder class, its base classes' included."""
    names: set[str] = set()
    for c in cls.__mro__:
        init = c.__dict__.get("__init__")
        if init is not None and c is not nn.Module and c is not object:
            names |= {
                p.name
                for p in inspect.signature(init).parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            }
    return names - {"self", "vocab_size", "encoder_dim"}


def build_decoder(name: str, vocab_size: int, encoder_dim: int, **cfg) -> Decoder:
    """Build a registered decoder; dimensions come from the vocabulary and the encoder."""
    cls = DECODERS.get(name)
    # An experiment sets the options of its decoder; swapping the decoder on the command line
    # (experiment=flickr8k decoder=show_tell) leaves options only other decoders have, which
    # are dropped here. A key no decoder knows is still an error (a typo).
    own = _options(cls)
    others = set().union(*(_options(DECODERS.get(n)) for n in DECODERS.names())) - own
    dropped = sorted(k for k in cfg if k in others)
    if dropped:
        log.info("decoder %s ignores options of other decoders: %s", name, ", ".join(dropped))
        cfg = {k: v for k, v in cfg.items() if k not in others}
    try:
        return cls(vocab_size=vocab_size, encoder_dim=encoder_dim, **cfg)
    except TypeError as e:  # an unknown or misspelt option in decoder=...
        raise ConfigError(f"decoder {name!r}: {e}") from None


def list_decoders() -> list[str]:
    return DECODERS.names()
