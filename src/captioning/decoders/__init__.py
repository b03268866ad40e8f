"""Caption decoders behind one step API, so search is written once (see `decoding.py`).

- `base`: the `Decoder` contract, additive `Attention`, the `DECODERS` registry, `build_decoder`
- `soft_attention`: the paper's decoder, with its fast teacher-forced and decoding paths
- `hard_attention`: the paper's stochastic attention, trained with REINFORCE
- `updown`: the top-down decoder of Up-Down (Anderson et al. 2018): two LSTMs around attention
- `baselines`: Show and Tell, Merge
- `_kernels`: hand-written autograd pieces of soft attention's training loop

Importing this package imports every decoder module, so each one registers itself.
"""

from ._kernels import fast_tanh
from .base import (
    DECODERS,
    Attention,
    Decoder,
    Group,
    Memory,
    State,
    build_decoder,
    doubly_stochastic,
    list_decoders,
)
from .baselines import MergeDecoder, ShowTellDecoder
from .hard_attention import HardAttentionDecoder
from .soft_attention import SoftAttentionDecoder
from .updown import UpDownDecoder

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
    "UpDownDecoder",
    "build_decoder",
    "doubly_stochastic",
    "fast_tanh",
    "list_decoders",
]
