"""Knowledge distillation: a student trained on a teacher's word distributions (Hinton et al.).

The teacher is one trained captioner or an ensemble of several (`load_model([...])`); an
ensemble decodes better than any one member but costs K times as much at every step. Distilling
it into one model of the usual size keeps part of the gain at the cost of one model. At every
teacher-forced step of the reference caption the student matches the teacher's next-word
distribution as well as the reference word:

    loss = (1 - weight) * cross-entropy(reference) + weight * T^2 * H(p_teacher^T, p_student^T)

where p^T is the distribution at temperature T (T = 1: the model's own) and H the cross-entropy,
whose gradient is the KL divergence's. The teacher reads the student's inputs: its own encoding of
the batch's images, or, when the student trains from cached features, those very features, which
needs the student's frozen encoder (same weights, grid and preprocessing).

Letters: B captions, T steps, V vocabulary.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError
from .inference import CaptionModel, load_model, same_weights
from .model import HasInputs


def check_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in and values checked: teachers, weight, temperature."""
    out = {"weight": 0.5, "temperature": 1.0, **cfg}
    teachers = out.get("teachers")
    if isinstance(teachers, str):
        teachers = [teachers]
    if not teachers:
        raise ConfigError("distill.teachers must name one or more checkpoints")
    out["teachers"] = [str(t) for t in teachers]
    if not 0.0 < float(out["weight"]) <= 1.0:
        raise ConfigError(f"distill.weight must be in (0, 1]; got {out['weight']}")
    if float(out["temperature"]) <= 0:
        raise ConfigError(f"distill.temperature must be > 0; got {out['temperature']}")
    return out


def load_teacher(cfg: dict[str, Any]) -> CaptionModel:
    """The frozen teacher of a `check_config` result: one checkpoint or an ensemble."""
    teacher = load_model(cfg["teachers"])
    for p in teacher.model.parameters():
        p.requires_grad_(False)
    teacher.model.eval()
    return teacher


def check_teacher(teacher: CaptionModel, vocab_itos: list[str], student_encoder=None) -> None:
    """The teacher must share the student's vocabulary and, with `student_encoder` (the
    student trains from its cached features, which the teacher then reads), its encoder."""
    if teacher.vocab.itos != vocab_itos:
        raise ConfigError("distill.teachers have another vocabulary than the student")
    if student_encoder is None:
        return
    encoders = getattr(teacher.model.encoder, "encoders", [teacher.model.encoder])
    if (
        len(encoders) != 1
        or getattr(encoders[0], "grid", None) != getattr(student_encoder, "grid", None)
        or not same_weights(encoders[0], student_encoder)
        or teacher.preprocess != student_encoder.preprocess
    ):
        raise ConfigError(
            "the student trains from cached features, which the teacher reads too, so "
            "distill.teachers must have the student's frozen encoder (same weights, grid and "
            "preprocessing); with another encoder set data.feature_cache=false"
        )


@torch.no_grad()
def teacher_log_probs(
    teacher: CaptionModel, batch: HasInputs, inputs: Tensor, lengths: Tensor
) -> Tensor:
    """The teacher's next-word log-probabilities (B, T, V) for the teacher-forced `inputs`."""
    model = teacher.model
    logits, _ = model(model.features(batch), inputs, lengths=lengths)  # (B, T, V)
    return logits.float().log_softmax(dim=-1)


def distill_loss(
    student_logits: Tensor, teacher_logp: Tensor, mask: Tensor, temperature: float = 1.0
) -> Tensor:
    """T^2 * cross-entropy of the student's distribution against the teacher's, per real word.

    student_logits (B, T, V), teacher_logp (B, T, V) log-probabilities at temperature 1,
    mask (B, T) 1 for real words. The T^2 keeps the gradient's scale independent of T.
    """
    t = float(temperature)
    p_teacher = (teacher_logp / t).log_softmax(dim=-1).exp()  # (B, T, V)
    logq = (student_logits.float() / t).log_softmax(dim=-1)  # (B, T, V)
    per_word = -(p_teacher * logq).sum(dim=-1)  # (B, T)
    mask = mask.to(per_word.dtype)
    return t * t * (per_word * mask).sum() / mask.sum().clamp(min=1)


def kl_to_teacher(student_logits: Tensor, teacher_logp: Tensor, mask: Tensor) -> Tensor:
    """KL(teacher || student) per real word, at temperature 1: 0 when they agree (for logs)."""
    logq = F.log_softmax(student_logits.float(), dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - logq)).sum(dim=-1)  # (B, T)
    mask = mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp(min=1)
