"""bf16 decoding and the FLOP counts the roofline divides by.

Contracts: bf16 beam search is the fp32 search with bf16-rounded matmuls (the emulation, which
the benchmark uses on CPUs without bf16 units, gives the same beams as the real bf16 kernels),
its captions stay close to fp32's on a fixed small model (tolerance below), `auto` picks bf16
only on CPUs with AMX, and the FLOP count of a step equals a hand count and torch's own count.
Timings are in benchmarks/, not here.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from captioning import precision
from captioning.decoders import build_decoder
from captioning.decoding import beam_search, generate
from captioning.errors import ConfigError
from captioning.flops import DecoderSizes, decode_flops, prepare_flops, step_flops, train_flops

V, D, N, START, END = 30, 16, 9, 1, 2
# bf16 against fp32 on the small model below, 64 images, beam 3: at least this share of best
# captions identical, and every best caption's score (length-normalised log-probability)
# within this of fp32's. Measured: 62/64 identical, largest score difference 0.011 (with the
# output layer in bf16 too, under 95%: logits are ranked, so they stay fp32).
MIN_SAME_BEST, MAX_SCORE_DIFF = 0.95, 0.03


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(**kw):
    torch.manual_seed(0)
    dec = build_decoder(
        "soft_attention",
        vocab_size=V,
        encoder_dim=D,
        embed_dim=12,
        hidden_dim=20,
        attention_dim=10,
        dropout=0.0,
        **kw,
    ).eval()
    with torch.no_grad():
        dec.fc.weight.mul_(3.0)  # peaked word distributions, as a trained model has
    return dec, torch.randn(64, N, D, generator=torch.Generator().manual_seed(1))


def search(dec, feats, prec="fp32", beam=3):
    return beam_search(
        dec, feats, beam_size=beam, start_id=START, end_id=END, max_len=12, precision=prec
    )


def tokens(beams):
    return [[h.tokens for h in bs] for bs in beams]


@pytest.mark.parametrize("kw", [{}, {"deep_output": True, "gate": False}])
def test_bf16_emulation_gives_the_beams_of_bf16_kernels(kw):
    dec, feats = small_model(**kw)
    real = search(dec, feats[:16], "bf16")
    with precision.emulate_bf16():
        emulated = search(dec, feats[:16], "bf16")
    assert tokens(real) == tokens(emulated)
    for r, e in zip(real, emulated, strict=True):
        assert [h.score for h in r] == pytest.approx([h.score for h in e], abs=1e-5)


def test_bf16_captions_match_fp32_within_tolerance():
    dec, feats = small_model()
    fp32 = search(dec, feats)
    with precision.emulate_bf16():
        bf16 = search(dec, feats, "bf16")
    same = sum(f[0].tokens == b[0].tokens for f, b in zip(fp32, bf16, strict=True))
    assert same >= MIN_SAME_BEST * len(feats)
    assert max(abs(f[0].score - b[0].score) for f, b in zip(fp32, bf16, strict=True)) < (
        MAX_SCORE_DIFF
    )
    assert tokens(bf16) != tokens(fp32)  # bf16 did round: the check above is not vacuous


def test_bf16_casts_the_weights_once_and_fp32_comes_back_unchanged():
    dec, feats = small_model()
    before = search(dec, feats[:8])
    search(dec, feats[:8], "bf16")
    _, w_h, b_h, w_ctx, fc = dec._inference_cache[1]
    assert {w_h.dtype, w_ctx.dtype} == {torch.bfloat16}
    assert fc[0].dtype == torch.float32  # logits in fp32: beams are ranked on them
    after = search(dec, feats[:8])
    assert dec._inference_cache[1][1].dtype == torch.float32
    assert tokens(after) == tokens(before)
    assert [h.score for bs in after for h in bs] == [h.score for bs in before for h in bs]


def test_linear_rounds_like_bf16_and_returns_fp32():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(5, 64, generator=g), torch.randn(7, 64, generator=g), torch.randn(7)
    exact = torch.nn.functional.linear(x, w, b)
    got = precision.linear(x, w.bfloat16(), b.bfloat16())
    assert got.dtype == torch.float32
    with precision.emulate_bf16():
        emulated = precision.linear(x, w.bfloat16(), b.bfloat16())
    torch.testing.assert_close(got, emulated, rtol=1e-2, atol=1e-2)  # one bf16 ulp apart at most
    assert (got - exact).abs().max() > 0  # rounded
    assert (got - exact).abs().max() < 0.02 * exact.abs().max()
    assert precision.linear(x, w, b).equal(exact)  # fp32 weights: plain F.linear


def test_auto_picks_bf16_only_with_amx(monkeypatch):
    for flags, want in [
        ({"avx2", "avx512f", "amx_tile", "amx_bf16", "avx512_bf16"}, "bf16"),
        ({"avx2", "avx512f", "avx512_bf16"}, "fp32"),  # bf16 dot products, no tiles
        ({"avx2"}, "fp32"),
    ]:
        monkeypatch.setattr(precision, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert precision.resolve("auto", "cpu") == want
        assert precision.resolve("auto", "cuda") == "fp32"
        assert precision.resolve("bf16", "cpu") == "bf16"
        assert precision.resolve("fp32", "cpu") == "fp32"
    with pytest.raises(ConfigError, match="auto, fp32, bf16"):
        precision.resolve("fp16")
    dec, feats = small_model()
    with pytest.raises(ConfigError):
        generate(dec, feats[:1], beam_size=1, start_id=START, end_id=END, precision="fp16")


# -- FLOPs -------------------------------------------------------------------------------------


def tiny(**kw):
    dims = {"embed_dim": 3, "hidden_dim": 4, "attention_dim": 5, "dropout": 0.0}
    return build_decoder("soft_attention", vocab_size=7, encoder_dim=6, **(dims | kw)).eval()


def test_flops_equal_a_hand_count():
    # V 7, E 3, H 4, A 5, D 6, N 9; a FLOP is half a multiply-add
    s = DecoderSizes.of(tiny(), regions=9)
    assert s == DecoderSizes(vocab=7, embed=3, hidden=4, attention=5, encoder_dim=6, regions=9)
    assert step_flops(s) == {
        "attention": 2 * (4 * 5 + 9 * 5 + 9 * 6),  # decoder_att, full_att per region, context
        "gate": 2 * 4 * 6,  # f_beta
        "lstm": 2 * 16 * (3 + 6 + 4),  # 4H gates from embedding, context and h
        "output": 2 * 4 * 7,
    }
    assert step_flops(s) == {"attention": 238, "gate": 48, "lstm": 416, "output": 56}
    assert step_flops(s, embedding=False)["lstm"] == 320  # looked up from a table
    assert prepare_flops(s) == 540 + 96  # encoder_att over 9 regions; init_h and init_c
    assert decode_flops(s, images=2, row_steps=5) == 2 * 636 + 5 * (238 + 48 + 320 + 56)
    assert train_flops(s, captions=2, words=7) == 3 * (2 * 636 + 7 * 758)
    deep = DecoderSizes.of(tiny(deep_output=True, gate=False), regions=9)
    assert step_flops(deep)["output"] == 2 * (4 * 3 + 6 * 3 + 3 * 7)
    assert step_flops(deep)["gate"] == 0


@pytest.mark.parametrize("kw", [{}, {"gate": False}, {"deep_output": True}])
def test_flops_equal_torch_flop_counter(kw):
    dec = tiny(**kw)
    s, B = DecoderSizes.of(dec, regions=9), 2
    feats = torch.randn(B, 9, 6)
    with torch.no_grad(), FlopCounterMode(display=False) as prep:
        memory = dec.prepare(feats)
        state = dec.init_state(memory)
    with torch.no_grad(), FlopCounterMode(display=False) as step:
        dec.step(torch.tensor([1, 2]), state, memory)
    assert prep.get_total_flops() == B * prepare_flops(s)
    assert step.get_total_flops() == B * sum(step_flops(s).values())


def test_bf16_autocast_training_step_stays_close_to_fp32():
    """The fast teacher-forced path under bf16 autocast (trainer.precision=bf16-mixed): loss
    within 1% and every gradient pointing the same way as fp32's (cosine above 0.99)."""
    dec, _ = small_model()
    dec.train()
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(8, N, D, generator=g)
    caps = torch.randint(3, V, (8, 9), generator=g)
    caps[:, 0] = START
    lengths = torch.tensor([8, 8, 7, 6, 5, 4, 3, 2])
    caps[torch.arange(9) > lengths.unsqueeze(1)] = 0  # padding after each caption
    inputs, targets = caps[:, :-1], caps[:, 1:]

    def loss_and_grads(bf16: bool):
        dec.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, alphas = dec(feats, inputs, lengths=(targets != 0).sum(1))
            ce = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten(), ignore_index=0
            )
            loss = ce + dec.regularizer(alphas.float(), (targets != 0).float())
        loss.backward()
        return loss.item(), {k: p.grad.float().clone() for k, p in dec.named_parameters()}

    loss32, grads32 = loss_and_grads(False)
    loss16, grads16 = loss_and_grads(True)
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    assert loss16 != loss32  # autocast did run in bf16
    for k, g32 in grads32.items():
        if k == "attention.full_att.bias":  # softmax ignores a shift: its gradient is 0 + noise
            assert abs(grads16[k].item()) < 1e-2
            continue
        cos = torch.nn.functional.cosine_similarity(g32.flatten(), grads16[k].flatten(), dim=0)
        assert cos > 0.99, (k, cos)
