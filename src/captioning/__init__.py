"""Show, Attend and Tell image captioning: a pure-PyTorch core with a Lightning + Hydra shell."""

__version__ = "0.1.0"
