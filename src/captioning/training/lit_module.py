"""LightningModule: plain hyperparameters in, builds the Captioner itself, scores generated captions."""

import math
import warnings
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from ..checkpoint import checkpoint_block
from ..data.dataset import Batch
from ..decoding import DecodeConfig
from ..distill import distill_loss, kl_to_teacher, teacher_log_probs
from ..errors import ConfigError
from ..inference import CaptionModel
from ..meteor import meteor_mode
from ..metrics import LOG_NAMES, CiderD, score_corpus
from ..model import build_captioner
from ..scst import reward_scorer, self_critical_step
from ..vocab import Vocab

# Lightning's warning at the start of training (see CaptioningModule.on_fit_start).
EVAL_MODE_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training"

# Lightning's advice, under DDP, to log epoch-level metrics with sync_dist=True. The caption
# scores need no reduction across ranks: `_gather_and_score` gives every rank all the captions
# (each image once), and every rank scores that same set identically, so each rank logs the
# corpus score itself. Averaging those would be a no-op at best; averaging per-rank scores
# instead would be wrong (corpus BLEU and CIDEr-D are not means over images). Only these names
# are quieted; the losses are per-batch means and are logged with sync_dist=True.
SYNC_DIST_ADVICE = (
    r"It is recommended to use `self\.log\('(val|test)/(bleu[1-4]|meteor|rouge_l|cider)(_best)?'"
)


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
        meteor_mode(test_decode.get("meteor"), "test_decode.meteor")  # a bad value fails now
        # Self-critical stage (captioning/scst.py): batches are images with their references.
        self.scst = scst or None  # checked by scst.check_config (training/setup.py)
        self._cider: CiderD | None = None
        # Distillation (captioning/distill.py): the teacher is set with `set_teacher`. It is kept
        # out of the module tree so that its weights stay out of the checkpoints and optimiser.
        self.distill = distill or None  # checked by distill.check_config
        self._teacher: list[CaptionModel] = []
        if compile:  # torch.compile of the decoder's training step; weights keep their keys
            self.model.decoder.compile_step()
        self._outputs: list[tuple[str, str, list[str]]] = []
        self.best: float = -math.inf
        self.test_predictions: dict[str, str] = {}
        self.test_metrics: dict[str, float | None] = {}

    # -- training ---------------------------------------------------------------------------
    def loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        captions = batch.captions  # (B, L): <start> w1 .. wn <end> <pad>..
        inputs, targets = captions[:, :-1], captions[:, 1:]  # (B, T) each
        # lengths: the decoder skips the padding steps of each row (their logits are masked)
        lengths = (targets != self.vocab.pad_id).sum(1)  # (B,)
        logits, alphas = self.model(self.model.features(batch), inputs, lengths=lengths)
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
        warnings.filterwarnings("ignore", message=SYNC_DIST_ADVICE)

    def on_test_start(self) -> None:
        warnings.filterwarnings("ignore", message=SYNC_DIST_ADVICE)  # trainer.test without fit

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        if self.scst is not None:
            return self._self_critical_step(batch)
        loss, ce = self.loss(batch)
        bs = batch.captions.size(0)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/ce", ce, batch_size=bs)
        return loss

    def _self_critical_step(self, batch: Batch) -> torch.Tensor:
        if batch.image_ids is None:
            raise ConfigError("self-critical training needs batches of images with references")
        # No dropout and no batch statistics here (see captioning/scst.py); gradients still flow.
        self.model.encoder.eval()
        loss, stats = self_critical_step(
            self.model.decoder,
            self.model.features(batch),
            batch.image_ids,
            self.vocab,
            self._cider,
            self.scst,
            self.vocab.banned(False),
        )
        bs = len(batch.image_ids)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log_dict({f"train/{k}": v for k, v in stats.items()}, batch_size=bs)
        return loss

    # -- evaluation -------------------------------------------------------------------------
    def _eval_step(self, batch: Batch, decode: dict[str, Any], stage: str) -> None:
        feats = self.model.features(batch)
        captions = batch.captions
        lengths = (captions[:, 1:] != self.vocab.pad_id).sum(1)  # (B,)
        logits, _ = self.model(feats, captions[:, :-1], lengths=lengths)
        ce = F.cross_entropy(
            logits.flatten(0, 1).float(), captions[:, 1:].flatten(), ignore_index=self.vocab.pad_id
        )
        self.log(f"{stage}/loss", ce, batch_size=len(batch.image_ids), sync_dist=True)
        beams = self.model.generate(feats, self.vocab, DecodeConfig.from_dict(decode))
        captions = [self.vocab.decode(b[0].tokens) for b in beams]
        self._outputs.extend(zip(batch.image_ids, captions, batch.refs, strict=True))

    def _gather_and_score(
        self, meteor: bool | None
    ) -> tuple[dict[str, str], dict[str, float | None]]:
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

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, self.hparams.val_decode, "val")

    def on_validation_epoch_end(self) -> None:
        _, scores = self._gather_and_score(meteor=False)
        if self.trainer.sanity_checking:
            return
        values = {f"val/{LOG_NAMES[k]}": v for k, v in scores.items() if v is not None}
        self.log_dict(values, sync_dist=False)  # identical on every rank: see SYNC_DIST_ADVICE
        current = values[self.monitor]
        if math.isfinite(current):
            self.best = max(self.best, current)
        self.log(f"{self.monitor}_best", self.best)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, self.hparams.test_decode, "test")

    def on_test_epoch_end(self) -> None:
        # test_decode.meteor: auto (None) when absent, as in conf/train.yaml; `true` was checked
        # before training (captioning.meteor.require_meteor)
        mode = meteor_mode(self.hparams.test_decode.get("meteor"), "test_decode.meteor")
        preds, scores = self._gather_and_score(meteor=mode)
        self.test_predictions, self.test_metrics = preds, scores
        self.log_dict({f"test/{LOG_NAMES[k]}": v for k, v in scores.items() if v is not None})

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
        checkpoint["captioning"] = checkpoint_block(
            encoder=h.encoder,
            decoder=h.decoder,
            vocab=self.vocab.to_dict(),
            preprocess=self.model.encoder.preprocess.to_dict(),
            data=h.data_info,
            metrics=metrics,
            monitor=self.monitor,
            monitor_best=self.best,
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A resumed run logs the same `{monitor}_best` as the uninterrupted one."""
        self.best = float(checkpoint.get("captioning", {}).get("monitor_best", -math.inf))
