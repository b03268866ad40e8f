"""The Lightning shell around the pure core: the only package that imports Lightning.

lit_module (LightningModule), datamodule (DataModule), callbacks (console, run_info.json, EMA),
wandb_log (W&B logger and caption table), resume (exact resume), guards (signals, NaN/Inf),
checkpointing (the checkpoint callback and atomic writer), setup (what train.py runs).
"""
