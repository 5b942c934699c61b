"""Model configuration: one typed, validated dataclass and the named size presets.

Sizes (shared by every variant; baselines then pick their depth, see `models.registry`):
    demo  hidden 64  x 2 layers, RWKV head 32, Mamba d_state 32 / headdim 32  (trains in minutes on 2 CPU cores)
    tiny  hidden 128 x 4 layers                                               (~3.6M parameters at vocab 16000)
    5m    hidden 128 x 8 layers  (the seeds' "5M" class)                      (~5.2M at vocab 16000)
    8m    hidden 192 x 12 layers (the seeds' 8M preset as SEEDS.md states it) (~12.9M at vocab 16000)
Defaults follow the seeds: RWKV-6 head size 64, Mamba-2 d_state 64 / d_conv 4 / expand 2 / headdim 64,
FFN 4x GELU, RMSNorm eps 1e-6, tied embeddings. `models/PARAMS.md` lists every count.
`mamba_backend` picks the Mamba-2 SSD path (models/mamba2.py): "auto" (default: the fastest that applies, "wkv6"
on CUDA where its limits hold, "torch" on CPU), "torch", "triton", or "wkv6" (the scan through the RWKV-6 kernel;
needs d_state == mamba_headdim). It changes numerics, not parameters, so a checkpoint loads under any backend;
configs saved before the field existed rebuild as "auto". `mamba_conv` picks the Mamba-2 depthwise conv: "auto"
(our Triton kernels under torch.compile, causal_conv1d's CUDA kernel in eager CUDA calls, where they apply),
"triton" or "torch".
`wkv6_impl` picks the wkv6 CUDA kernels: "auto" (default: `kernels.set_auto_impl`'s choice, the chunked
tensor-core kernels where they apply: CUDA, bf16 autocast, head size 64), "sequential", or "chunked".
Numerics only, like `mamba_backend`. `models.describe_paths` reports what a model runs on a device.
`mamba_residual` (hybrids) adds the Mamba-2 branch output to the residual stream beside the fusion:
x = x + fuse(a, m) + m. `rwkv_drop_prob` (hybrids) replaces a layer's whole RWKV-6 output by zeros with that
probability, one draw per layer and forward, in training mode only (eval is unaffected).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kernels import IMPLS as WKV6_IMPLS

from .mamba2 import BACKENDS as MAMBA2_BACKENDS
from .mamba2 import CONV_IMPLS as MAMBA2_CONV_IMPLS
from .mamba2 import wkv6_backend_problem

__all__ = ["ModelConfig", "SIZE_PRESETS", "HYBRID_NAMES", "BASELINE_NAMES", "MODEL_NAMES", "GATE_INIT_NAMES"]

HYBRID_NAMES = ("GF-MH", "GF-RH", "GF", "HY", "WS", "RF", "CP", "GF-XM", "GF-XR", "HGF", "HGF-MH", "HGF-RH",
                "GRU", "MINGRU", "LINREC")
GATE_INIT_NAMES = ("GF", "GF-MH", "GF-RH", "GF-XM", "GF-XR", "HGF", "HGF-MH", "HGF-RH")  # fusions with a bias b = logit(g0)
BASELINE_NAMES = ("GPT", "RWKV6", "MAMBA2")
MODEL_NAMES = HYBRID_NAMES + BASELINE_NAMES

SIZE_PRESETS: dict[str, dict] = {
    "demo": dict(hidden_size=64, n_layer=2, head_size=32, d_state=32, mamba_headdim=32),
    "tiny": dict(hidden_size=128, n_layer=4),
    "5m": dict(hidden_size=128, n_layer=8),
    "8m": dict(hidden_size=192, n_layer=12),
}


@dataclass
class ModelConfig:
    name: str                       # canonical variant name, one of MODEL_NAMES
    size: str                       # preset it came from (a key of SIZE_PRESETS), for records
    vocab_size: int
    hidden_size: int = 128
    n_layer: int = 8
    head_size: int = 64             # RWKV-6 head size; also the GPT attention head size
    d_state: int = 64               # Mamba-2 state size N
    d_conv: int = 4
    expand: int = 2
    mamba_headdim: int = 64         # Mamba-2 head dim P
    ngroups: int = 1
    mamba_chunk_size: int = 256     # Triton SSD chunk (the CPU path picks its own, result is the same)
    mamba_backend: str = "auto"     # Mamba-2 SSD path, one of models.mamba2.BACKENDS (module doc above)
    mamba_conv: str = "auto"        # Mamba-2 depthwise conv, one of models.mamba2.CONV_IMPLS
    wkv6_impl: str = "auto"         # wkv6 kernels of RWKV-6 (and of Mamba-2 on backend "wkv6"), module doc above
    ffn_mult: int = 4               # block FFN width = ffn_mult * hidden (GELU, no bias)
    gate_init: float | None = None  # GF / HGF start gate; None = the variant's own (GF-MH 0.3, GF-XM 0.03, ...)
    norm_eps: float = 1e-6
    mamba_residual: bool = False    # hybrids: x = x + fuse(a, m) + m (module doc above)
    rwkv_drop_prob: float = 0.0     # hybrids: P(RWKV-6 output zeroed) per layer and training forward

    def __post_init__(self):
        if self.name not in MODEL_NAMES:
            raise ValueError(f"ModelConfig.name: unknown model {self.name!r}; valid: {', '.join(MODEL_NAMES)}")
        for f in ("vocab_size", "hidden_size", "n_layer", "head_size", "d_state", "d_conv", "expand",
                  "mamba_headdim", "ngroups", "mamba_chunk_size", "ffn_mult"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ModelConfig.{f}: must be a positive int, got {v!r}")
        if self.vocab_size < 2:
            raise ValueError(f"ModelConfig.vocab_size: must be >= 2, got {self.vocab_size}")
        uses_heads = self.name in HYBRID_NAMES or self.name in ("GPT", "RWKV6")
        if uses_heads and self.hidden_size % self.head_size != 0:
            raise ValueError(f"ModelConfig.head_size: hidden_size {self.hidden_size} is not divisible by "
                             f"head_size {self.head_size}; choose a head_size that divides hidden_size")
        if self.name in HYBRID_NAMES or self.name == "MAMBA2":
            d_inner = self.expand * self.hidden_size
            if d_inner % self.mamba_headdim != 0:
                raise ValueError(f"ModelConfig.mamba_headdim: expand * hidden_size = {d_inner} is not divisible by "
                                 f"mamba_headdim {self.mamba_headdim}")
            if (d_inner // self.mamba_headdim) % self.ngroups != 0:
                raise ValueError(f"ModelConfig.ngroups: {self.ngroups} does not divide the Mamba-2 head count "
                                 f"{d_inner // self.mamba_headdim}")
        if self.mamba_backend not in MAMBA2_BACKENDS:
            raise ValueError(f"ModelConfig.mamba_backend: must be one of {', '.join(map(repr, MAMBA2_BACKENDS))}, "
                             f"got {self.mamba_backend!r}")
        if self.mamba_backend == "wkv6" and (problem := wkv6_backend_problem(self.d_state, self.mamba_headdim)):
            raise ValueError(f"ModelConfig.mamba_backend: {problem}")
        if self.mamba_conv not in MAMBA2_CONV_IMPLS:
            raise ValueError(f"ModelConfig.mamba_conv: must be one of {', '.join(map(repr, MAMBA2_CONV_IMPLS))}, "
                             f"got {self.mamba_conv!r}")
        if self.wkv6_impl not in WKV6_IMPLS:
            raise ValueError(f"ModelConfig.wkv6_impl: must be one of {', '.join(map(repr, WKV6_IMPLS))}, "
                             f"got {self.wkv6_impl!r}")
        if self.gate_init is not None:
            if self.name not in GATE_INIT_NAMES:
                raise ValueError(f"ModelConfig.gate_init: only {', '.join(GATE_INIT_NAMES)} have a gate init, "
                                 f"not {self.name}")
            if not 0.0 < float(self.gate_init) < 1.0:
                raise ValueError(f"ModelConfig.gate_init: must lie in (0, 1), got {self.gate_init}")
        if not isinstance(self.mamba_residual, bool):
            raise ValueError(f"ModelConfig.mamba_residual: must be a bool, got {self.mamba_residual!r}")
        if self.mamba_residual and self.name not in HYBRID_NAMES:
            raise ValueError(f"ModelConfig.mamba_residual: only hybrids ({', '.join(HYBRID_NAMES)}) have a Mamba "
                             f"branch beside a fusion, not {self.name}")
        if isinstance(self.rwkv_drop_prob, bool) or not isinstance(self.rwkv_drop_prob, (int, float)) \
                or not 0.0 <= self.rwkv_drop_prob < 1.0:
            raise ValueError(f"ModelConfig.rwkv_drop_prob: must be a float in [0, 1), got {self.rwkv_drop_prob!r}")
        if self.rwkv_drop_prob > 0 and self.name not in HYBRID_NAMES:
            raise ValueError(f"ModelConfig.rwkv_drop_prob: only hybrids ({', '.join(HYBRID_NAMES)}) drop the RWKV "
                             f"branch before a fusion, not {self.name}")
        if not self.norm_eps > 0:
            raise ValueError(f"ModelConfig.norm_eps: must be > 0, got {self.norm_eps}")

    @property
    def is_hybrid(self) -> bool:
        return self.name in HYBRID_NAMES

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
