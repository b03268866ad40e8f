"""Ensembles: checkpoints that decode as one, by averaging word probabilities at every step."""

import json
import sys
from pathlib import Path

import pytest
import torch
from test_checkpoints import SMALL as CHECKPOINT_RUN

from conftest import ROOT, compose_cfg

sys.path.insert(0, str(ROOT))
import evaluate as evaluate_script  # noqa: E402
import train as train_script  # noqa: E402

# The checkpoint tests' tiny run, one epoch, no test.
SMALL = [*CHECKPOINT_RUN, "trainer.max_epochs=1", "test=false", "optim.decoder_lr=3e-3"]


@pytest.fixture(scope="module")
def two_ckpts(tmp_path_factory, data_cache) -> list[Path]:
    """Two tiny one-epoch models of the same data, different seeds: different weights."""
    torch.set_num_threads(1)
    out = []
    for seed in (0, 1):
        d = tmp_path_factory.mktemp(f"member{seed}")
        cfg = compose_cfg("train", [*SMALL, f"seed={seed}"], out=d, cache=data_cache)
        train_script.train(cfg)
        out.append(d / "checkpoints" / "last.ckpt")
    return out


def images(cm, n: int = 6) -> torch.Tensor:
    torch.manual_seed(0)
    size = cm.preprocess.image_size
    return torch.rand(n, 3, size, size)


def test_one_model_twice_decodes_as_the_model(two_ckpts):
    from captioning.inference import load_model

    single = load_model(two_ckpts[0])
    twice = load_model([two_ckpts[0], two_ckpts[0]])
    assert len(twice.model.encoder.encoders) == 1  # the same encoder encodes once
    x = images(single)
    for beam in (1, 3):
        a, b = single.caption_tensor(x, beam_size=beam), twice.caption_tensor(x, beam_size=beam)
        for ha, hb in zip(a, b, strict=True):
            assert [h.tokens for h in ha] == [h.tokens for h in hb]
            assert [h.score for h in ha] == pytest.approx([h.score for h in hb], abs=1e-4)
            torch.testing.assert_close(ha[0].alphas, hb[0].alphas, atol=1e-5, rtol=1e-4)


def test_each_step_averages_the_members_probabilities(two_ckpts):
    from captioning.decoding import generate
    from captioning.inference import load_model

    members = [load_model(p) for p in two_ckpts]
    ens = load_model(two_ckpts)
    assert len(ens.model.encoder.encoders) == 2  # trained encoders differ: each encodes
    x = images(ens)
    with torch.no_grad():
        feats = [m.model.encode(x) for m in members]
        torch.testing.assert_close(ens.model.encode(x), torch.cat(feats, dim=2))
        # Teacher forcing a caption through the ensemble (a loop over its `step`).
        tokens = torch.randint(4, len(ens.vocab), (x.size(0), 7))
        logp, alphas = ens.model.decoder(ens.model.encode(x), tokens)
        probs = [
            m.model.decoder(f, tokens)[0].softmax(-1) for m, f in zip(members, feats, strict=True)
        ]
        torch.testing.assert_close(logp.exp(), (probs[0] + probs[1]) / 2, atol=1e-6, rtol=1e-5)
        alpha_m = [m.model.decoder(f, tokens)[1] for m, f in zip(members, feats, strict=True)]
        torch.testing.assert_close(alphas, (alpha_m[0] + alpha_m[1]) / 2)
        assert not torch.allclose(probs[0], probs[1], atol=1e-3)  # the premise: they differ

        # Beam search batched (grouped steps, ended images dropped) = one image at a time.
        feats_e = ens.model.encode(x)
        kw = dict(start_id=1, end_id=2, max_len=ens.vocab.max_len, banned=ens.vocab.banned(False))
        together = generate(ens.model.decoder, feats_e, beam_size=3, **kw)
        alone = [
            generate(ens.model.decoder, feats_e[i : i + 1], beam_size=3, **kw)[0]
            for i in range(x.size(0))
        ]
    for a, b in zip(together, alone, strict=True):
        assert [h.tokens for h in a] == [h.tokens for h in b]


def test_every_decoder_kind_joins_an_ensemble():
    """Members of every registered decoder, each on its own feature slice, decode as one."""
    from captioning.decoders import build_decoder, list_decoders
    from captioning.decoding import generate
    from captioning.ensemble import EnsembleDecoder

    V, D, N = 20, 6, 5
    torch.manual_seed(0)
    names = list_decoders()
    members = [
        build_decoder(n, vocab_size=V, encoder_dim=D, embed_dim=8, hidden_dim=12).eval()
        for n in names
    ]
    slices = [(i * D, (i + 1) * D) for i in range(len(members))]
    ens = EnsembleDecoder(members, slices).eval()
    feats = torch.randn(4, N, D * len(members))
    tokens = torch.randint(3, V, (4, 6))
    with torch.no_grad():
        logp, _ = ens(feats, tokens)
        probs = [
            m(feats[..., a:b], tokens)[0].softmax(-1)
            for m, (a, b) in zip(members, slices, strict=True)
        ]
        torch.testing.assert_close(logp.exp(), sum(probs) / len(probs), atol=1e-6, rtol=1e-5)
        stepwise, _ = ens.forward_stepwise(feats, tokens)
        torch.testing.assert_close(stepwise, logp, atol=1e-5, rtol=0)
        kw = dict(start_id=1, end_id=2, max_len=8, banned=(0, 1))
        together = generate(ens, feats, beam_size=3, **kw)
        alone = [generate(ens, feats[i : i + 1], beam_size=3, **kw)[0] for i in range(4)]
    for a, b in zip(together, alone, strict=True):
        assert [h.tokens for h in a] == [h.tokens for h in b]


def test_members_must_share_the_vocabulary(two_ckpts, tmp_path):
    from captioning.errors import CheckpointError
    from captioning.inference import load_model

    ckpt = torch.load(two_ckpts[1], map_location="cpu", weights_only=True)
    itos = ckpt["captioning"]["vocab"]["itos"]
    itos[4], itos[5] = itos[5], itos[4]
    other = tmp_path / "other.ckpt"
    torch.save(ckpt, other)
    with pytest.raises(CheckpointError, match="vocabularies differ"):
        load_model([two_ckpts[0], other])


def test_evaluate_scores_an_ensemble(two_ckpts, tmp_path, data_cache):
    paths = ",".join(str(p) for p in two_ckpts)
    cfg = compose_cfg(
        "evaluate",
        [f"ckpt_path=[{paths}]", "decode.meteor=false", "report=false", "split=val"],
        out=tmp_path,
        cache=data_cache,
    )
    scores = evaluate_script.evaluate(cfg)
    out = json.loads((tmp_path / "metrics.json").read_text())
    assert out["checkpoint"] == [str(p) for p in two_ckpts]
    assert out["images"] == 8 and scores["BLEU-4"] == out["metrics"]["BLEU-4"]
