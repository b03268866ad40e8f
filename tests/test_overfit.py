"""Slow tier: the model memorises a few training images (the first check of any model change)."""

import pytest
import torch

from captioning.data.dataset import collate
from captioning.metrics import score_corpus
from conftest import compose_cfg, module_and_data

pytestmark = pytest.mark.slow


def test_overfits_a_few_samples(data_cache):
    """8 images x 5 captions, full-batch steps: greedy captions match their references."""
    torch.manual_seed(0)
    cfg = compose_cfg(
        "train",
        ["debug=tiny", "data.args.num_train=8", "decoder.hidden_dim=128", "decoder.embed_dim=64"],
        cache=data_cache,
    )
    module, dm = module_and_data(cfg, data_cache)
    train = dm.dataset("train")
    batch = collate([train[i] for i in range(len(train))])  # all 40 captions
    assert batch.captions.size(0) == 40
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
        beams = module.model.generate(module.model.features(evalb), module.vocab)
    captions = [module.vocab.decode(b[0].tokens) for b in beams]  # greedy
    preds = dict(zip(evalb.image_ids, captions, strict=True))
    refs = dict(zip(evalb.image_ids, evalb.refs, strict=True))
    scores = score_corpus(preds, refs, meteor=False)
    assert scores["BLEU-4"] > 0.8, (scores, preds)  # memorised: each caption one of its refs
