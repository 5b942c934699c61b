"""wkv6 (RWKV-6 linear attention) kernels: CUDA and C++ CPU backends, JIT-built on first use.

`wkv6(r, k, v, w, u, initial_state=None, output_final_state=False) -> (y, state)` is the public op;
`wkv6_ref` (sequential) and `wkv6_chunked_ref` (chunked) are its pure-PyTorch twins.
Importing this package is cheap: nothing is compiled until the first call (or `build_extension`).
"""
from .reference import wkv6_chunked_ref, wkv6_ref


def wkv6(r, k, v, w, u, initial_state=None, output_final_state=False):
    """Temporary entry point (dispatches to the reference while the compiled backends land)."""
    return wkv6_ref(r, k, v, w, u, initial_state, output_final_state)


__all__ = ["wkv6", "wkv6_ref", "wkv6_chunked_ref"]
