"""Training shell: configs compose, a fast_dev_run trains, a checkpoint reloads to the same captions."""

import json
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONF, ROOT, compose_cfg

sys.path.insert(0, str(ROOT))
import train as train_script  # noqa: E402

GROUPS = [
    "data",
    "encoder",
    "decoder",
    "trainer",
    "callbacks",
    "logger",
    "debug",
    "experiment",
    "hparams_search",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "override", [f"{g}={o}" for g in GROUPS for o in options(g)], ids=lambda s: s
)
def test_every_config_option_composes(override, tmp_path):
    cfg = compose_cfg("train", [override], out=tmp_path, cache=tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["encoder"]["name"] and resolved["decoder"]["name"] and resolved["data"]["name"]


def test_evaluate_config_composes(tmp_path):
    cfg = compose_cfg("evaluate", ["ckpt_path=x.ckpt"], out=tmp_path)
    assert cfg.decode.beam_size == 3 and cfg.split == "test"


def test_trainer_gpu_settings_are_config_keys_applied_on_cuda_only(tmp_path):
    from captioning.cli import instantiate_all
    from captioning.errors import ConfigError

    cfg = compose_cfg("train", ["trainer=gpu"], out=tmp_path)
    assert cfg.trainer.matmul_precision == "high" and cfg.trainer.benchmark is True
    assert compose_cfg("train", [], out=tmp_path).trainer.matmul_precision == "highest"
    before = torch.get_float32_matmul_precision()
    # the same settings on a CPU trainer: the Trainer takes them, TF32 is left alone
    cfg = compose_cfg("train", ["trainer=gpu", "trainer.accelerator=cpu"], out=tmp_path)
    trainer, _ = instantiate_all(cfg)
    assert trainer.precision == "bf16-mixed"
    assert torch.get_float32_matmul_precision() == before
    bad = compose_cfg(
        "train", ["trainer.matmul_precision=fast", "trainer.accelerator=cpu"], out=tmp_path
    )
    with pytest.raises(ConfigError, match="highest, high, medium"):
        instantiate_all(bad)


def tiny(tmp_path: Path, cache: Path, *extra: str):
    return compose_cfg(
        "train", ["debug=tiny", "trainer.accelerator=cpu", *extra], out=tmp_path, cache=cache
    )


def test_fast_dev_run_trains(tmp_path, data_cache):
    cfg = tiny(tmp_path, data_cache, "trainer.fast_dev_run=true")
    train_script.train(cfg)
    metrics = json.loads((tmp_path / "test_metrics.json").read_text())["metrics"]
    assert set(metrics) >= {"BLEU-1", "BLEU-4", "CIDEr"}


def test_checkpoint_reloads_to_identical_captions(tmp_path, data_cache):
    from captioning.decoding import generate
    from captioning.inference import load_model
    from captioning.training.datamodule import CaptionDataModule

    cfg = tiny(tmp_path, data_cache, "trainer.max_epochs=1", "test=false")
    train_script.train(cfg)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    cm = load_model(ckpt)
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert raw["captioning"]["vocab"]["itos"] == cm.vocab.itos

    dm = CaptionDataModule(
        OmegaConf.to_container(cfg.data, resolve=True),
        cache_dir=str(data_cache),
        preprocess=cm.preprocess,
        vocab=cm.vocab,
    )
    images = torch.stack([dm.dataset("val")[i]["image"] for i in range(8)])
    loaded = [cm.text(b[0]) for b in cm.caption_tensor(images, beam_size=3)]

    # The same weights, put into a freshly built model by hand, give the same captions.
    from captioning.model import build_captioner

    fresh = build_captioner(
        {**raw["captioning"]["encoder"], "pretrained": False},
        raw["captioning"]["decoder"],
        len(cm.vocab),
    ).eval()
    fresh.load_state_dict(
        {k[6:]: v for k, v in raw["state_dict"].items() if k.startswith("model.")}
    )
    with torch.no_grad():
        beams = generate(
            fresh.decoder,
            fresh.encode(images),
            beam_size=3,
            start_id=1,
            end_id=2,
            max_len=cm.vocab.max_len,
        )
    assert loaded == [cm.text(b[0]) for b in beams]
    assert raw["captioning"]["data"]["name"] == "synthetic"
    assert raw["captioning"]["preprocess"]["image_size"] == 64


def test_only_a_frozen_trunk_in_eval_mode_goes_unreported(tmp_path, data_cache, monkeypatch):
    """A frozen trunk is in eval mode by design; any other eval-mode module still gets warned about."""
    import re
    import warnings

    from captioning.training import lit_module

    def eval_mode_warnings(out: Path) -> list:
        cfg = tiny(out, data_cache, "trainer.fast_dev_run=true", "encoder.fine_tune=none")
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            train_script.train(cfg)
        return [w for w in seen if re.search(lit_module.EVAL_MODE_WARNING, str(w.message))]

    assert eval_mode_warnings(tmp_path / "frozen") == []

    # The same run with one decoder module left in eval mode, as a forgotten .eval() would.
    on_fit_start = lit_module.CaptioningModule.on_fit_start

    def leave_a_decoder_module_in_eval_mode(self):
        next(self.model.decoder.children()).eval()
        on_fit_start(self)

    monkeypatch.setattr(
        lit_module.CaptioningModule, "on_fit_start", leave_a_decoder_module_in_eval_mode
    )
    assert len(eval_mode_warnings(tmp_path / "forgotten")) == 1


def test_label_smoothing_changes_the_objective_not_the_logged_nll(data_cache):
    """optim.label_smoothing mixes a uniform target into the loss; `ce` stays the plain NLL."""
    import torch.nn.functional as F

    from captioning.data.dataset import collate
    from captioning.errors import ConfigError
    from conftest import module_and_data

    losses = {}
    for eps in (0.0, 0.2):
        torch.manual_seed(0)
        cfg = compose_cfg("train", ["debug=tiny", f"optim.label_smoothing={eps}"], cache=data_cache)
        module, dm = module_and_data(cfg, data_cache)
        module.eval()  # no dropout: both modules compute the same logits
        with torch.no_grad():  # a confident output layer, so smoothing has something to cost
            for layer in module.model.decoder.modules():
                if isinstance(layer, torch.nn.Linear) and layer.out_features == len(module.vocab):
                    layer.weight.mul_(30.0)
        train = dm.dataset("train")
        batch = collate([train[i] for i in range(8)])
        losses[eps] = module.loss(batch)
    (plain, ce0), (smoothed, ce1) = losses[0.0], losses[0.2]
    torch.testing.assert_close(ce0, ce1)  # the logged NLL ignores smoothing

    captions = batch.captions
    logits, _ = module.model(module.model.features(batch), captions[:, :-1])
    targets = captions[:, 1:].flatten()
    pad = module.vocab.pad_id
    flat = logits.detach().flatten(0, 1)
    gap = F.cross_entropy(flat, targets, ignore_index=pad, label_smoothing=0.2) - F.cross_entropy(
        flat, targets, ignore_index=pad
    )
    assert float(gap) > 0.01  # smoothing costs something on a confident model's logits
    torch.testing.assert_close((smoothed - plain).detach(), gap, atol=1e-5, rtol=1e-4)

    cfg = compose_cfg("train", ["debug=tiny", "optim.label_smoothing=1.0"], cache=data_cache)
    with pytest.raises(ConfigError, match="label_smoothing"):
        module_and_data(cfg, data_cache)


def test_weight_ema_is_what_checkpoints_hold_and_the_test_scores(tmp_path, data_cache, monkeypatch):
    """callbacks.ema: checkpoints' state_dict is the average, and the test after fit scores it."""
    from captioning.training.lit_module import CaptioningModule

    seen = {}

    def record(self):  # the weights the test runs with
        seen.update({k: v.detach().clone() for k, v in self.state_dict().items()})

    monkeypatch.setattr(CaptioningModule, "on_test_start", record, raising=False)
    ema = "callbacks.ema={_target_: captioning.callbacks.WeightEMA, decay: 0.5}"
    cfg = tiny(tmp_path, data_cache, ema, "trainer.max_epochs=2")
    train_script.train(cfg)
    best = json.loads((tmp_path / "test_metrics.json").read_text())["checkpoint"]
    raw = torch.load(best, map_location="cpu", weights_only=True)
    averaged, current = raw["state_dict"], raw["current_model_state"]
    assert int(raw["averaging_state"]["n_averaged"]) == raw["global_step"]
    trained = [k for k in averaged if k.startswith("model.decoder.")]
    assert max(float((averaged[k] - current[k]).abs().max()) for k in trained) > 1e-4
    for k in trained:
        torch.testing.assert_close(seen[k], averaged[k], rtol=0, atol=0)


def test_weight_ema_rejects_a_decay_outside_0_1():
    from captioning.training.callbacks import WeightEMA

    with pytest.raises(ValueError, match="decay"):
        WeightEMA(decay=1.0)


def test_weight_ema_decay_warms_up():
    from captioning.training.callbacks import ema_update

    avg, cur = torch.zeros(3), torch.ones(3)
    for n, d in [(1, 2 / 11), (10, 11 / 20), (20000, 0.999)]:
        out = ema_update(0.999, warmup=True)(avg, cur, torch.tensor(n))
        torch.testing.assert_close(out, torch.full((3,), 1 - d))
    fixed = ema_update(0.9, warmup=False)(avg, cur, torch.tensor(1))
    torch.testing.assert_close(fixed, torch.full((3,), 0.1))


def sweep_jobs(experiment: str) -> list[list[str]]:
    """The jobs Hydra's basic sweeper launches for a sweep experiment: one override list each."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", [f"experiment={experiment}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    (batch,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [list(job) for job in batch]


def test_model_sweep_is_every_encoder_with_every_decoder():
    jobs = sweep_jobs("flickr8k_sweep")
    pairs = {tuple(o.split("=")[1] for o in job) for job in jobs}
    encoders = {f"efficientnet_lite{i}" for i in range(3)}
    decoders = {"show_tell", "merge", "soft_attention"}
    assert pairs == {(e, d) for e in encoders for d in decoders}
    # the encoder changes slowest, so each encoder's first job extracts what the next two read
    assert [job[0] for job in jobs[:3]] == ["encoder=efficientnet_lite0"] * 3


def test_attention_sweep_changes_one_setting_per_job(tmp_path):
    jobs = sweep_jobs("flickr8k_sweep_attention")
    assert len(jobs) == len(options("attention_ablation")) == 5
    decoders = {}
    for job in jobs:
        cfg = compose_cfg("train", ["experiment=flickr8k_sweep_attention", *job], out=tmp_path)
        assert cfg.encoder.name == "efficientnet_lite2" and cfg.seed == 1
        decoders[dict(o.split("=") for o in job)["attention_ablation"]] = dict(cfg.decoder)
    base = decoders.pop("baseline")
    assert base["name"] == "soft_attention"
    changed = {v: {k for k in base if d[k] != base[k]} for v, d in decoders.items()}
    assert changed == {
        "no_regulariser": {"alpha_c"},
        "no_gate": {"gate"},
        "width128": {"attention_dim"},
        "width512": {"attention_dim"},
    }
