"""Compare the jobs of a Hydra multirun: `python -m captioning.report <multirun dir>`."""

from .jobs import *  # noqa: F403
