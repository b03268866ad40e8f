"""Slow tier: the model memorises a few training images (the first check of any model change)."""

import pytest
import torch
from omegaconf import OmegaConf

from captioning.datamodule import CaptionDataModule, collate
from captioning.lit_module import CaptioningModule
from captioning.metrics import score_corpus
from conftest import compose_cfg

pytestmark = pytest.mark.slow


def test_overfits_a_few_samples(data_cache):
    """8 images x 5 captions, full-batch steps: greedy captions match their references."""
    torch.manual_seed(0)
    cfg = compose_cfg(
        "train",
        ["debug=tiny", "data.args.num_train=8", "decoder.hidden_dim=128", "decoder.embed_dim=64"],
        cache=data_cache,
    )
    conf = {
        k: OmegaConf.to_container(cfg[k], resolve=True)
        for k in ("data", "encoder", "decoder", "optim", "val_decode", "test_decode")
    }
    dm = CaptionDataModule(conf["data"], cache_dir=str(data_cache)).load()
    module = CaptioningModule(
        encoder=conf["encoder"],
        decoder=conf["decoder"],
        vocab=dm.vocab.to_dict(),
        optim=conf["optim"],
        val_decode=conf["val_decode"],
        test_decode=conf["test_decode"],
    )
    dm.use_feature_cache(module.model.encoder)
    train = dm.dataset("train")
    batch = collate([train[i] for i in range(len(train))])  # all 40 captions
    assert batch["captions"].size(0) == 40
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    module.train()
    for _ in range(300):
        loss, ce = module.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(ce) < 0.8  # per word; 5 different captions per image keep it above 0

    images = dm.dataset("train", evaluation=True)
    evalb = collate([images[i] for i in range(len(images))])
    module.eval()
    with torch.no_grad():
        captions = module._generate(module.features(evalb), {"beam_size": 1})
    preds = dict(zip(evalb["image_ids"], captions, strict=True))
    refs = dict(zip(evalb["image_ids"], evalb["refs"], strict=True))
    scores = score_corpus(preds, refs, meteor=False)
    assert scores["BLEU-4"] > 0.8, (scores, preds)  # memorised: each caption one of its refs
