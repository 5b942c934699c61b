"""wkv6 (RWKV-6 linear attention) kernels: CUDA and C++ CPU backends, JIT-built on first use.

    from kernels import wkv6
    y, state = wkv6(r, k, v, w, u, initial_state=None, output_final_state=True)

`wkv6_ref` (sequential, the ground truth) and `wkv6_chunked_ref` (chunked parallel form) are its
pure-PyTorch twins with the same signature. `build_extension(device)` builds or finds the extension
and reports the toolchain; `smoke_test(backend)` checks it against `wkv6_ref`;
`toolchain_fingerprint(device)` is what a cache key should hash. Importing this package is cheap:
nothing is compiled until the first call. This package never imports dagster.

`kernels.gru` (imported on its own) holds the GRU arbiter's recurrence as Triton kernels, `gru_scan`, with
its sequential twin `gru_scan_ref`.
"""
from .build import build_extension, toolchain_fingerprint
from .reference import wkv6_chunked_ref, wkv6_ref
from .smoke import smoke_test
from .wkv6 import IMPLS, WKV6Function, check_impl, pick_impl, resolve_impl, set_auto_impl, wkv6

__all__ = [
    "wkv6",
    "wkv6_ref",
    "wkv6_chunked_ref",
    "WKV6Function",
    "set_auto_impl",
    "pick_impl",
    "resolve_impl",
    "check_impl",
    "IMPLS",
    "build_extension",
    "smoke_test",
    "toolchain_fingerprint",
]
