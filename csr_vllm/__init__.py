"""csr-vllm: Cache Sparse Representation (CSR) KV cache for vLLM.

Each key/value head vector is stored as a few indices into a learned dictionary plus a few
quantised coefficients (about 1-2 bits per channel instead of 16).

Shape notation used in every docstring of this package:
    N  vectors (tokens x heads, flattened)     T  tokens of one sequence
    L  decoder layers                           H  KV heads
    D  head_dim                                 C  channel chunks per vector (paper's s_n)
    Dc channels per chunk (D / C)               A  atoms per dictionary
    S  atoms per chunk (MP-level per chunk)
"""

__version__ = "0.1.0"
