"""Numba kernels of hetero: decode attention over KV blocks in host memory, and the lse merge.

`host_decode_attention` (token ranges) and `host_decode_attention_indexed` (token lists) return
the (out, lse) partial of the tokens they cover; `merge_partials` joins partials; `warmup`
compiles every signature up front; `set_threads` picks the cores. `reference` holds the float64
PyTorch versions. On AVX-512 CPUs the import asks Numba for 512-bit vectors (`_vector_width`).
"""

from ._vector_width import prefer_512_bit_vectors

# Before the kernels' first @njit creates Numba's CPU target, which reads the features once.
prefer_512_bit_vectors()

from .attention import host_decode_attention, host_decode_attention_indexed, set_threads, warmup  # noqa: E402
from .merge import merge_partials  # noqa: E402

__all__ = [
    "host_decode_attention",
    "host_decode_attention_indexed",
    "merge_partials",
    "set_threads",
    "warmup",
]
