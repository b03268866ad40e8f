"""Caption decoders behind one step API, so search is written once (see `decoding.py`).

- `base`: the `Decoder` contract, additive `Attention`, the `DECODERS` registry, `build_decoder`
- `soft_attention`: the paper's decoder, with its fast teacher-forced and decoding paths
- `hard_attention`: the paper's stochastic attention, trained with REINFORCE
- `baselines`: Show and Tell, Merge
- `_kernels`: hand-written autograd pieces of soft attention's training loop

Importing this package imports every decoder module, so each one registers itself.
"""

from ._kernels import fast_tanh
from .base import DECODERS, Attention, Decoder, Group, Memory, State, build_decoder, list_decoders
from .baselines import MergeDecoder, ShowTellDecoder
from .hard_attention import HardAttentionDecoder
from .soft_attention import SoftAttentionDecoder

__all__ = [
    "DECODERS",
    "Attention",
    "Decoder",
    "Group",
    "HardAttentionDecoder",
    "Memory",
    "MergeDecoder",
    "ShowTellDecoder",
    "SoftAttentionDecoder",
    "State",
    "build_decoder",
    "fast_tanh",
    "list_decoders",
]
