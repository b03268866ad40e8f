"""Knowledge distillation: a student learns a teacher's (an ensemble's) word distributions."""

import sys

import pytest
import torch
from test_ensemble import SMALL, two_ckpts  # noqa: F401 (a fixture)

from conftest import ROOT, compose_cfg

sys.path.insert(0, str(ROOT))
import train as train_script  # noqa: E402
from captioning.checkpoint import read_checkpoint  # noqa: E402
from captioning.distill import check_config, distill_loss, kl_to_teacher  # noqa: E402
from captioning.errors import ConfigError  # noqa: E402
from captioning.inference import load_model  # noqa: E402


def test_the_loss_pulls_the_student_towards_the_teacher():
    torch.manual_seed(0)
    B, T, V = 3, 4, 11
    teacher_logp = torch.randn(B, T, V).log_softmax(-1)
    mask = torch.ones(B, T)
    mask[0, 3] = 0  # padding: no gradient there
    for temperature in (1.0, 2.0):
        # At the teacher's own logits the gradient (p_student - p_teacher) vanishes.
        at_teacher = teacher_logp.clone().requires_grad_()
        distill_loss(at_teacher, teacher_logp, mask, temperature).backward()
        assert at_teacher.grad.abs().max() < 1e-6
        # Elsewhere, gradient steps lower the KL divergence to the teacher.
        student = torch.randn(B, T, V, requires_grad=True)
        before = float(kl_to_teacher(student.detach(), teacher_logp, mask))
        opt = torch.optim.SGD([student], lr=20.0)  # the loss is a mean over 11 words
        for _ in range(20):
            opt.zero_grad()
            distill_loss(student, teacher_logp, mask, temperature).backward()
            opt.step()
        assert student.grad[0, 3].abs().max() == 0
        assert float(kl_to_teacher(student.detach(), teacher_logp, mask)) < 0.2 * before


def test_the_temperature_scales_as_t_squared():
    torch.manual_seed(1)
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7).log_softmax(-1)
    mask = torch.ones(2, 3)
    # T -> large: T^2 * H(p_t^T, p_s^T) ~ T^2 log V + const: the gradient keeps its scale.
    g = []
    for temperature in (1.0, 4.0):
        x = s.clone().requires_grad_()
        distill_loss(x, t, mask, temperature).backward()
        g.append(x.grad.norm())
    assert 0.1 < float(g[1] / g[0]) < 10


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({}, "teachers"),
        ({"teachers": []}, "teachers"),
        ({"teachers": ["a.ckpt"], "weight": 0}, "weight"),
        ({"teachers": ["a.ckpt"], "weight": 1.5}, "weight"),
        ({"teachers": ["a.ckpt"], "temperature": 0}, "temperature"),
    ],
)
def test_bad_config(cfg, match):
    with pytest.raises(ConfigError, match=match):
        check_config(cfg)


def test_ensemble_teacher_forcing_with_lengths_matches_its_steps(two_ckpts):  # noqa: F811
    ens = load_model(two_ckpts)
    torch.manual_seed(0)
    size = ens.preprocess.image_size
    feats = ens.model.encode(torch.rand(4, 3, size, size))
    tokens = torch.randint(4, len(ens.vocab), (4, 6))
    lengths = torch.tensor([6, 2, 4, 1])
    with torch.no_grad():
        fast, fast_alpha = ens.model.decoder(feats, tokens, lengths=lengths)
        ref, ref_alpha = ens.model.decoder.forward_stepwise(feats, tokens)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(fast[b, :n], ref[b, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast_alpha[b, :n], ref_alpha[b, :n], atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache, two_ckpts):  # noqa: F811
    """A student distilled from the two-model ensemble, and the same run without a teacher."""
    torch.set_num_threads(1)
    teachers = ",".join(str(p) for p in two_ckpts)
    out = {}
    for name, extra in {
        "plain": [],
        "distilled": [f"distill={{teachers: [{teachers}], weight: 1.0}}"],
    }.items():
        d = tmp_path_factory.mktemp(name)
        cfg = compose_cfg(
            "train", [*SMALL, "seed=5", "trainer.max_epochs=3", *extra], d, data_cache
        )
        train_script.train(cfg)
        out[name] = d / "checkpoints" / "last.ckpt"
    return out


def teacher_kl(student_path, teacher) -> float:
    """KL(teacher || student) per word over random captions of random images."""
    student = load_model(student_path)
    torch.manual_seed(0)
    size = student.preprocess.image_size
    x = torch.rand(16, 3, size, size)
    tokens = torch.randint(4, len(student.vocab), (16, 8))
    with torch.no_grad():
        t_logp, _ = teacher.model.decoder(teacher.model.encode(x), tokens)
        s_logits, _ = student.model.decoder(student.model.encode(x), tokens)
    return float(kl_to_teacher(s_logits, t_logp.log_softmax(-1), torch.ones(16, 8)))


def test_a_distilled_student_is_closer_to_its_teacher(runs, two_ckpts):  # noqa: F811
    teacher = load_model(two_ckpts)
    plain, distilled = teacher_kl(runs["plain"], teacher), teacher_kl(runs["distilled"], teacher)
    print(f"KL to the teacher: distilled {distilled:.4f}, plain {plain:.4f}")
    assert distilled < 0.7 * plain, (distilled, plain)


def test_the_teacher_stays_out_of_the_checkpoint(runs):
    plain, distilled = (read_checkpoint(runs[k]) for k in ("plain", "distilled"))
    assert distilled["state_dict"].keys() == plain["state_dict"].keys()
    opt_p, opt_d = plain["optimizer_states"][0], distilled["optimizer_states"][0]
    assert len(opt_d["state"]) == len(opt_p["state"])
    assert distilled["hyper_parameters"]["distill"]["weight"] == 1.0
    load_model(runs["distilled"])  # loads and captions like any checkpoint


def test_cached_features_need_the_teachers_encoder(tmp_path, data_cache, two_ckpts):  # noqa: F811
    # A frozen, randomly initialised student encoder: its cached features are not what the
    # teachers' trained encoders produce.
    teachers = ",".join(str(p) for p in two_ckpts[:1])
    cfg = compose_cfg(
        "train",
        [*SMALL, "encoder.fine_tune=none", f"distill={{teachers: [{teachers}]}}"],
        tmp_path,
        data_cache,
    )
    with pytest.raises(ConfigError, match="frozen encoder"):
        train_script.train(cfg)


def test_distill_and_scst_are_separate_stages(tmp_path, data_cache, two_ckpts):  # noqa: F811
    cfg = compose_cfg(
        "train",
        [
            *SMALL,
            f"init_from={two_ckpts[0]}",
            "scst={samples: 2}",
            f"distill={{teachers: [{two_ckpts[0]}]}}",
        ],
        tmp_path,
        data_cache,
    )
    with pytest.raises(ConfigError, match="separate stages"):
        train_script.train(cfg)
