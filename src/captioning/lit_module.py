"""LightningModule: plain hyperparameters in, builds the Captioner itself, scores generated captions."""

import math
import subprocess
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from . import __version__
from .decoding import generate
from .distill import check_config as distill_config
from .distill import distill_loss, kl_to_teacher, teacher_log_probs
from .errors import ConfigError
from .inference import CaptionModel
from .metrics import CiderD, score_corpus
from .model import build_captioner
from .scst import check_config as scst_config
from .scst import reward_scorer, self_critical_step
from .vocab import Vocab

# Lightning's warning at the start of training (see CaptioningModule.on_fit_start).
EVAL_MODE_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training"

CHECKPOINT_FORMAT = 1  # bump when the "captioning" block of a checkpoint changes incompatibly

METRIC_KEYS = {
    "BLEU-1": "bleu1",
    "BLEU-2": "bleu2",
    "BLEU-3": "bleu3",
    "BLEU-4": "bleu4",
    "METEOR": "meteor",
    "ROUGE-L": "rouge_l",
    "CIDEr": "cider",
}


def only_the_frozen_trunk_in_eval_mode(module: L.LightningModule) -> bool:
    """Whether the modules in eval mode are all part of the encoder's frozen trunk.

    A frozen trunk stays in eval mode on purpose (Encoder.train keeps its ImageNet BatchNorm
    statistics), and Lightning warns about every eval-mode module when training starts. That
    warning is quieted only when the trunk is all it would name: a module left in eval mode by
    mistake is still reported.
    """
    in_eval = [name for name, m in module.named_modules() if not m.training]
    return bool(in_eval) and all(name.startswith("model.encoder.trunk") for name in in_eval)


class CaptioningModule(L.LightningModule):
    """Trains a Captioner with teacher forcing; validates on captions it generates."""

    def __init__(
        self,
        encoder: dict[str, Any],
        decoder: dict[str, Any],
        vocab: dict[str, Any],
        optim: dict[str, Any],
        val_decode: dict[str, Any],
        test_decode: dict[str, Any],
        data_info: dict[str, Any] | None = None,
        monitor: str = "val/bleu4",
        compile: bool = False,
        scst: dict[str, Any] | None = None,
        distill: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.vocab = Vocab.from_dict(vocab)
        self.model = build_captioner(encoder, decoder, len(self.vocab))
        self.optim = dict(optim)
        self.label_smoothing = float(self.optim.get("label_smoothing", 0.0))
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(
                f"optim.label_smoothing must be in [0, 1); got {self.label_smoothing}"
            )
        if monitor not in ("val/bleu4", "val/cider"):
            raise ConfigError(f"monitor must be one of val/bleu4, val/cider; got {monitor!r}")
        self.monitor = monitor
        # Self-critical stage (captioning/scst.py): batches are images with their references.
        self.scst = scst_config(scst) if scst else None
        self._cider: CiderD | None = None
        # Distillation (captioning/distill.py): the teacher is set with `set_teacher`. It is kept
        # out of the module tree so that its weights stay out of the checkpoints and optimiser.
        self.distill = distill_config(distill) if distill else None
        self._teacher: list[CaptionModel] = []
        if compile:  # torch.compile of the decoder's training step; weights keep their keys
            self.model.decoder.compile_step()
        self._outputs: list[tuple[str, str, list[str]]] = []
        self.best: float = -math.inf
        self.test_predictions: dict[str, str] = {}
        self.test_metrics: dict[str, float | None] = {}

    def features(self, batch: dict[str, Any]) -> torch.Tensor:
        """Region features (B, N, D): cached ones when the batch has them, else the encoder's."""
        if "feats" in batch:
            return batch["feats"]
        return self.model.encode(batch["images"])

    # -- training ---------------------------------------------------------------------------
    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        captions = batch["captions"]  # (B, L): <start> w1 .. wn <end> <pad>..
        inputs, targets = captions[:, :-1], captions[:, 1:]  # (B, T) each
        # lengths: the decoder skips the padding steps of each row (their logits are masked)
        lengths = (targets != self.vocab.pad_id).sum(1)  # (B,)
        logits, alphas = self.model.decoder(self.features(batch), inputs, lengths=lengths)
        token_nll = F.cross_entropy(
            logits.flatten(0, 1).float(),
            targets.flatten(),
            ignore_index=self.vocab.pad_id,
            reduction="none",
        ).view_as(targets)  # (B, T), 0 at padding
        mask = (targets != self.vocab.pad_id).to(logits.dtype)  # (B, T)
        ce = token_nll.sum() / mask.sum().clamp(min=1)
        objective = ce
        if self.label_smoothing > 0:  # the objective only: ce (logged) stays the plain NLL
            objective = F.cross_entropy(
                logits.flatten(0, 1).float(),
                targets.flatten(),
                ignore_index=self.vocab.pad_id,
                label_smoothing=self.label_smoothing,
            )
        if self.distill is not None and self.training:
            if not self._teacher:
                raise ConfigError("distillation needs its teacher: call set_teacher first")
            teacher_logp = teacher_log_probs(self._teacher[0], batch, inputs, lengths)
            kd = distill_loss(logits, teacher_logp, mask, float(self.distill["temperature"]))
            w = float(self.distill["weight"])
            objective = (1 - w) * objective + w * kd
            kl = kl_to_teacher(logits.detach(), teacher_logp, mask)
            self.log("train/kl_teacher", kl, batch_size=inputs.size(0))
        decoder = self.model.decoder
        reg = decoder.regularizer(alphas, mask) if alphas is not None else ce.new_zeros(())
        extra = decoder.attention_loss(-token_nll.detach(), mask)  # hard attention: REINFORCE
        return objective + reg + extra, ce

    def set_teacher(self, teacher: CaptionModel) -> None:
        """The model whose word distributions the student learns (`distill` config)."""
        self._teacher = [teacher.to(self.device)]

    def on_fit_start(self) -> None:
        if self._teacher:  # the student may have moved to a GPU since set_teacher
            self._teacher[0].to(self.device)
        if self.scst is not None:  # rewards use document frequencies of the training refs only
            train = self.trainer.datamodule.dataset("train", evaluation=True)
            refs = dict(zip(train.image_ids, train.refs, strict=True))
            self._cider = reward_scorer(refs, self.scst)
        if only_the_frozen_trunk_in_eval_mode(self):
            warnings.filterwarnings("ignore", message=EVAL_MODE_WARNING)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.scst is not None:
            return self._self_critical_step(batch)
        loss, ce = self.loss(batch)
        bs = batch["captions"].size(0)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/ce", ce, batch_size=bs)
        return loss

    def _self_critical_step(self, batch: dict[str, Any]) -> torch.Tensor:
        if "image_ids" not in batch:
            raise ConfigError("self-critical training needs batches of images with references")
        # No dropout and no batch statistics here (see captioning/scst.py); gradients still flow.
        self.model.encoder.eval()
        loss, stats = self_critical_step(
            self.model.decoder,
            self.features(batch),
            batch["image_ids"],
            self.vocab,
            self._cider,
            self.scst,
            self.vocab.banned(False),
        )
        bs = len(batch["image_ids"])
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log_dict({f"train/{k}": v for k, v in stats.items()}, batch_size=bs)
        return loss

    # -- evaluation -------------------------------------------------------------------------
    def _generate(self, feats: torch.Tensor, decode: dict[str, Any]) -> list[str]:
        beams = generate(
            self.model.decoder,
            feats,
            beam_size=int(decode.get("beam_size", 1)),
            start_id=self.vocab.start_id,
            end_id=self.vocab.end_id,
            pad_id=self.vocab.pad_id,
            max_len=int(decode.get("max_len") or self.vocab.max_len),
            length_penalty=float(decode.get("length_penalty", 1.0)),
            banned=self.vocab.banned(bool(decode.get("allow_unk", False))),
            precision=str(decode.get("precision", "auto")),
        )
        return [self.vocab.decode(b[0].tokens) for b in beams]

    def _eval_step(self, batch: dict[str, Any], decode: dict[str, Any], stage: str) -> None:
        feats = self.features(batch)
        captions = batch["captions"]
        lengths = (captions[:, 1:] != self.vocab.pad_id).sum(1)  # (B,)
        logits, _ = self.model.decoder(feats, captions[:, :-1], lengths=lengths)
        ce = F.cross_entropy(
            logits.flatten(0, 1).float(), captions[:, 1:].flatten(), ignore_index=self.vocab.pad_id
        )
        self.log(f"{stage}/loss", ce, batch_size=len(batch["image_ids"]), sync_dist=True)
        captions = self._generate(feats, decode)
        self._outputs.extend(zip(batch["image_ids"], captions, batch["refs"], strict=True))

    def _gather_and_score(self, meteor: bool) -> tuple[dict[str, str], dict[str, float | None]]:
        outputs = self._outputs
        self._outputs = []
        if self.trainer.world_size > 1:  # every rank gets every caption
            gathered: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, outputs)
            outputs = [o for part in gathered for o in part]
        # DistributedSampler pads the last batch with repeated images: count each image once.
        preds, refs = {}, {}
        for image_id, caption, image_refs in outputs:
            preds[image_id], refs[image_id] = caption, image_refs
        return preds, score_corpus(preds, refs, meteor=meteor)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.hparams.val_decode, "val")

    def on_validation_epoch_end(self) -> None:
        _, scores = self._gather_and_score(meteor=False)
        if self.trainer.sanity_checking:
            return
        values = {f"val/{METRIC_KEYS[k]}": v for k, v in scores.items() if v is not None}
        self.log_dict(values, sync_dist=False)  # identical on every rank after the gather
        current = values[self.monitor]
        if math.isfinite(current):
            self.best = max(self.best, current)
        self.log(f"{self.monitor}_best", self.best)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.hparams.test_decode, "test")

    def on_test_epoch_end(self) -> None:
        preds, scores = self._gather_and_score(
            meteor=bool(self.hparams.test_decode.get("meteor", True))
        )
        self.test_predictions, self.test_metrics = preds, scores
        self.log_dict({f"test/{METRIC_KEYS[k]}": v for k, v in scores.items() if v is not None})

    # -- optimisation -----------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.optim
        groups = [
            {
                "params": [p for p in self.model.decoder.parameters() if p.requires_grad],
                "lr": float(o["decoder_lr"]),
            }
        ]
        enc = [p for p in self.model.encoder.parameters() if p.requires_grad]
        if enc:
            groups.append({"params": enc, "lr": float(o["encoder_lr"])})
        optimizer = torch.optim.AdamW(groups, weight_decay=float(o.get("weight_decay", 0.0)))
        name = o.get("scheduler", "cosine")
        if name in (None, "none"):
            return optimizer
        if name == "cosine":
            total = max(1, int(self.trainer.estimated_stepping_batches))
            warmup = min(int(o.get("warmup_steps", 0)), total // 2)
            floor = float(o.get("min_lr_ratio", 0.05))

            def factor(step: int) -> float:
                if step < warmup:
                    return (step + 1) / warmup
                progress = (step - warmup) / max(1, total - warmup)
                return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

            sched = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": sched, "interval": "step"},
            }
        if name == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer,
                mode="max",
                factor=float(o.get("plateau_factor", 0.5)),
                patience=int(o.get("plateau_patience", 2)),
            )
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": sched, "monitor": self.monitor, "interval": "epoch"},
            }
        raise ConfigError(f"unknown optim.scheduler {name!r}; valid choices: none, cosine, plateau")

    # -- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Make the checkpoint describe itself, so it loads without Hydra or this config."""
        h = self.hparams
        metrics = {
            k: float(v)
            for k, v in self.trainer.callback_metrics.items()
            if isinstance(v, torch.Tensor) and v.numel() == 1
        }
        checkpoint["captioning"] = {
            "format": CHECKPOINT_FORMAT,
            "encoder": dict(h.encoder),
            "decoder": dict(h.decoder),
            "vocab": self.vocab.to_dict(),
            "preprocess": self.model.encoder.preprocess.to_dict(),
            "data": dict(h.data_info or {}),
            "metrics": metrics,
            "monitor": self.monitor,
            "monitor_best": float(self.best),  # exact, for `{monitor}_best` after a resume
            "code_version": code_version(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A resumed run logs the same `{monitor}_best` as the uninterrupted one."""
        self.best = float(checkpoint.get("captioning", {}).get("monitor_best", -math.inf))


def code_version() -> str:
    """Package version plus the git commit when run from a checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__
