"""Stochastic "hard" attention (Xu et al., section 4.1): the context is one sampled region.

Letters: B batch, T caption steps, N image regions, D feature width, b rows of a step.
"""

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import DECODERS, Decoder, Group, Memory, State, expand_images
from .soft_attention import SoftAttentionDecoder


@DECODERS.register("hard_attention")
class HardAttentionDecoder(SoftAttentionDecoder):
    """The paper's stochastic "hard" attention (section 4.1): the context is one region.

    Training samples a region s_t ~ Multinoulli(alpha_t) at every step and maximises the
    variational lower bound with the paper's estimator (eq. 12):

        d log p(y|s) + lambda_r (log p(y|s) - b) d log p(s) + lambda_e d H[s]

    with b a moving average of log p(y|s) (momentum 0.9) and, with probability `soft_mix`
    (the paper's 0.5), the step uses the expected context instead of a sample. log p(y|s)
    is averaged per word here, so the advantage does not scale with caption length.
    Decoding uses the expected context (`inference: expectation`, as the authors' code does) or
    the most likely region (`argmax`); both are deterministic, so beam search applies as is.
    """

    def __init__(
        self,
        *args,
        reinforce_weight: float = 1.0,
        entropy_weight: float = 0.01,
        baseline_momentum: float = 0.9,
        soft_mix: float = 0.5,
        inference: str = "expectation",
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if inference not in ("expectation", "argmax"):
            raise ConfigError(f"decoder.inference must be expectation or argmax, got {inference!r}")
        if not 0.0 <= soft_mix <= 1.0 or not 0.0 <= baseline_momentum < 1.0:
            raise ConfigError("decoder.soft_mix must be in [0, 1], baseline_momentum in [0, 1)")
        self.reinforce_weight, self.entropy_weight = reinforce_weight, entropy_weight
        self.baseline_momentum, self.soft_mix, self.inference = (
            baseline_momentum,
            soft_mix,
            inference,
        )
        # The moving-average baseline is state: in the checkpoint, so a resumed run continues it.
        self.register_buffer("baseline", torch.zeros(()))
        self.register_buffer("baseline_ready", torch.zeros((), dtype=torch.bool))
        self._last: tuple[Tensor, Tensor] | None = None  # (log p(s_t), H_t) of the last forward

    def sample_regions(self, alpha: Tensor) -> Tensor:
        """One region per row drawn from alpha (B, N): indices (B,)."""
        return torch.multinomial(alpha.float(), 1).squeeze(1)

    def _hard_context(self, feats: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Context (b, D) of one step, log p(s_t) (b,) (0 where no sample) and entropy (b,)."""
        rows = torch.arange(alpha.size(0), device=alpha.device)
        entropy = -(alpha * alpha.clamp_min(1e-12).log()).sum(1)
        if self.training:
            s = self.sample_regions(alpha.detach())
            context = feats[rows, s]  # (b, D)
            logp_s = alpha[rows, s].clamp_min(1e-12).log()
            if self.soft_mix > 0:  # these rows take the expectation: no sampling decision
                soft = torch.rand(alpha.size(0), device=alpha.device) < self.soft_mix
                expected = torch.bmm(alpha.unsqueeze(1), feats).squeeze(1)
                context = torch.where(soft.unsqueeze(1), expected, context)
                logp_s = logp_s.masked_fill(soft, 0.0)
            return context, logp_s, entropy
        if self.inference == "argmax":
            context = feats[rows, alpha.argmax(1)]
        else:
            context = torch.bmm(alpha.unsqueeze(1), feats).squeeze(1)
        return context, alpha.new_zeros(alpha.size(0)), entropy

    def _attend(self, h: Tensor, memory: Memory) -> tuple[Tensor, Tensor]:
        feats, feats_proj = memory
        _, alpha = self.attention(feats, feats_proj, h)  # (B, N)
        context, _, _ = self._hard_context(feats, alpha)
        return self._gated(h, context), alpha

    def step_grouped(self, tokens: Tensor, state: State, memory: Memory, group: Group):
        if self.inference == "expectation" and not self.training:  # soft attention's fast path
            return super().step_grouped(tokens, state, memory, group)
        return Decoder.step_grouped(self, tokens, state, memory, group)

    def compile_step(self, **options) -> None:
        raise ConfigError("compile applies to soft attention's training step, not hard attention")

    def forward(self, feats: Tensor, inputs: Tensor, lengths: Tensor | None = None, group: int = 1):
        """Teacher forcing with sampled regions; with `lengths`, rows past their end are skipped
        (longest first, as in soft attention) and their logits and alphas are zeros."""
        feats = expand_images(feats, inputs, group)
        B, T = inputs.shape
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long, device=inputs.device)
        order = lengths.argsort(descending=True, stable=True)
        feats, inputs = feats.index_select(0, order), inputs.index_select(0, order)
        sizes = (
            (
                lengths.index_select(0, order).unsqueeze(0)
                > torch.arange(T, device=inputs.device).unsqueeze(1)
            )
            .sum(1)
            .tolist()
        )  # (T,) b_t
        memory = self.prepare(feats)
        h, c = self.init_state(memory)
        emb = self.embedding(inputs)  # (B, T, E)
        logits = feats.new_zeros(B, T, self.vocab_size)
        alphas = feats.new_zeros(B, T, feats.size(1))
        logp_s, entropy = feats.new_zeros(B, T), feats.new_zeros(B, T)
        for t, b in enumerate(sizes):
            if b == 0:
                break
            _, alpha = self.attention(memory[0][:b], memory[1][:b], h[:b])  # (b, N)
            context, lp, ent = self._hard_context(feats[:b], alpha)
            context = self._gated(h[:b], context)
            h, c = self.lstm(torch.cat([emb[:b, t], context], dim=1), (h[:b], c[:b]))
            logits[:b, t] = self._logits(h, emb[:b, t], context)
            alphas[:b, t], logp_s[:b, t], entropy[:b, t] = alpha, lp, ent
        inverse = order.argsort()  # back to the input order
        self._last = (logp_s.index_select(0, inverse), entropy.index_select(0, inverse))
        return logits.index_select(0, inverse), alphas.index_select(0, inverse)

    def attention_loss(self, token_logp: Tensor, mask: Tensor) -> Tensor:
        if self._last is None or not self.training:
            return mask.new_zeros((), dtype=torch.float32)
        logp_s, entropy = self._last
        self._last = None
        mask = mask.to(logp_s.dtype)
        words = mask.sum(1).clamp(min=1)
        reward = (token_logp.detach() * mask).sum(1) / words  # (B,) mean log p(y|s) per word
        with torch.no_grad():
            if not bool(self.baseline_ready):
                self.baseline.fill_(float(reward.mean()))
                self.baseline_ready.fill_(True)
            advantage = reward - self.baseline
            m = self.baseline_momentum
            self.baseline.mul_(m).add_((1 - m) * reward.mean())
        reinforce = -(advantage * (logp_s * mask).sum(1) / words).mean()
        bonus = (entropy * mask).sum() / mask.sum().clamp(min=1)
        return self.reinforce_weight * reinforce - self.entropy_weight * bonus
