"""Triton kernels of hetero: UVA gathers from pinned host memory, split-K decode attention, lse merge.

Every function runs its Triton kernel on CUDA tensors (or in Triton's interpreter when
TRITON_INTERPRET=1) and falls back to the PyTorch version in `reference` on CPU tensors.
"""

from .decode_attention import DecodeLaunch, decode_attention, default_launches
from .gather import gather_blocks, gather_tokens
from .merge import merge_partials, merge_two
from .segment import Segment

__all__ = [
    "DecodeLaunch",
    "Segment",
    "decode_attention",
    "default_launches",
    "gather_blocks",
    "gather_tokens",
    "merge_partials",
    "merge_two",
]
