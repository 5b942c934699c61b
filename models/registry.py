"""Model registry and the helpers trainers and reports use: get_model, list_models, list_sizes,
component_of, no_weight_decay, ablate, mean_ablate, force_gate.

    model = get_model("gf_mh", vocab_size=16000, size="5m", d_state=32)   # names are case-insensitive
    for n, p in model.named_parameters(): component_of(n), no_weight_decay(n, p)
    with ablate(model, "mamba"): loss_without_mamba = ...
    with mean_ablate(model, "mamba", means): ...          # means: one (C,) tensor per layer
    with force_gate(model, 1.0, layers=[0]): ...

Baseline sizing rule (GPT, RWKV6, MAMBA2): same hidden size, vocab and tied embedding as the hybrids at the same
preset; depth n_layer = max(1, round(L * P(GF-MH block) / P(baseline block))), where L is the preset's depth and
P(.) the parameter count of one block (computed by building one). Total parameters then match GF-MH's within
half a baseline block. An explicit n_layer override skips the rule.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

import kernels

from .config import BASELINE_NAMES, HYBRID_NAMES, MODEL_NAMES, SIZE_PRESETS, ModelConfig

# hybrids whose fusion has a gate force_gate can set (HY's gains, RF and CP have none)
GATED_NAMES = ("GF", "GF-MH", "GF-RH", "GF-XM", "GF-XR", "HGF", "HGF-MH", "HGF-RH", "WS", "GRU", "MINGRU", "LINREC")
from .arbiter import GRUArbiter
from .lm import LM, make_block
from .mamba2 import Mamba2
from .rwkv6 import RWKV6TimeMix

__all__ = ["get_model", "list_models", "list_sizes", "canonical_name", "make_config", "component_of",
           "no_weight_decay", "ablate", "mean_ablate", "force_gate", "describe_paths"]

_ALIASES = {"MAMBA-2": "MAMBA2", "RWKV-6": "RWKV6", "GPT-2": "GPT", "GPT2": "GPT", "GFMH": "GF-MH", "GFRH": "GF-RH",
            "GFXM": "GF-XM", "GFXR": "GF-XR", "HGFMH": "HGF-MH", "HGFRH": "HGF-RH", "MIN-GRU": "MINGRU"}


def list_models() -> list[str]:
    return list(MODEL_NAMES)


def list_sizes() -> list[str]:
    return list(SIZE_PRESETS)


def canonical_name(name: str) -> str:
    """'gf_mh', 'GF-MH', 'Gf-Mh' -> 'GF-MH'; raises ValueError listing the valid names."""
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string, got {name!r}")
    key = name.strip().upper().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in MODEL_NAMES:
        raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(MODEL_NAMES)} "
                         f"(case-insensitive, '_' accepted for '-')")
    return key


def _block_params(cfg: ModelConfig) -> int:
    return sum(p.numel() for p in make_block(cfg, 0).parameters())


def make_config(name: str, vocab_size: int, size: str = "5m", **overrides) -> ModelConfig:
    """Resolve name + size preset + overrides into a validated ModelConfig (baseline depth rule applied)."""
    canon = canonical_name(name)
    if not isinstance(size, str) or size.lower() not in SIZE_PRESETS:
        raise ValueError(f"unknown size {size!r}; valid sizes: {', '.join(SIZE_PRESETS)}")
    size = size.lower()
    allowed = [f for f in ModelConfig.field_names() if f not in ("name", "size", "vocab_size")]
    for key in overrides:
        if key not in allowed:
            raise ValueError(f"unknown model override {key!r}; valid overrides: {', '.join(allowed)}")
    fields = {**SIZE_PRESETS[size], **overrides}
    if canon in BASELINE_NAMES and "n_layer" not in overrides:
        try:
            ref = ModelConfig(name="GF-MH", size=size, vocab_size=vocab_size,
                              **{k: v for k, v in fields.items() if k != "gate_init"})
        except ValueError as e:
            raise ValueError(f"cannot size baseline {canon} by the GF-MH parameter-matching rule ({e}); "
                             f"pass n_layer explicitly") from e
        base = ModelConfig(name=canon, size=size, vocab_size=vocab_size, **{**fields, "n_layer": 1})
        fields["n_layer"] = max(1, round(ref.n_layer * _block_params(ref) / _block_params(base)))
    return ModelConfig(name=canon, size=size, vocab_size=vocab_size, **fields)


def get_model(name: str, vocab_size: int, size: str = "5m", **overrides) -> LM:
    """Build a model: name in list_models(), size in list_sizes(), overrides = ModelConfig fields."""
    return LM(make_config(name, vocab_size, size, **overrides))


# ------------------------------------------------------------------------------------------- parameter groups
def component_of(param_name: str) -> str:
    """'rwkv' | 'mamba' | 'fusion' | 'other' from a parameter name of these models (by module path)."""
    parts = param_name.split(".")
    for comp in ("rwkv", "mamba", "fusion"):
        if comp in parts:
            return comp
    return "other"


def no_weight_decay(param_name: str, param: nn.Parameter) -> bool:
    """RWKV-LM's rule: decay only >= 2-D weight matrices (after squeeze; the leaf name `weight`, or `weight_*`
    as nn.GRU's weight_ih_l0 / weight_hh_l0), so biases, norms, time_* / *_w1 / *_w2 mixing parameters and
    scalars are exempt; plus anything marked `_no_weight_decay` (Mamba-2's A_log, D, dt_bias)."""
    if getattr(param, "_no_weight_decay", False):
        return True
    leaf = param_name.split(".")[-1]
    if leaf in ("A_log", "D", "dt_bias"):
        return True
    return not (leaf == "weight" or leaf.startswith("weight_")) or param.squeeze().dim() < 2


# --------------------------------------------------------------------------------------------------- ablation
def _select_blocks(model: LM, layers) -> list:
    n = len(model.blocks)
    if layers is None:
        return list(model.blocks)
    layers = [layers] if isinstance(layers, int) else list(layers)
    bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < n]
    if bad:
        raise ValueError(f"layers: {bad} out of range for a model with {n} layers (valid 0..{n - 1})")
    return [model.blocks[i] for i in layers]


def _branch_blocks(who: str, model: LM, branch: str, layers) -> list:
    """The blocks of `layers` (None = all), each checked to have `branch`; ValueError naming `who` otherwise."""
    if branch not in ("rwkv", "mamba"):
        raise ValueError(f"{who}: branch must be 'rwkv' or 'mamba', got {branch!r}")
    blocks = _select_blocks(model, layers)
    if not all(branch in b.branches for b in blocks):
        raise ValueError(f"{who}: model {model.config.name} has no {branch!r} branch "
                         f"(hybrids: {', '.join(HYBRID_NAMES)}; also RWKV6 for 'rwkv', MAMBA2 for 'mamba')")
    return blocks


@contextlib.contextmanager
def ablate(model: LM, branch: str, layers=None):
    """Zero `branch` ('rwkv' or 'mamba') output before fusion in `layers` (None = all) while inside the block."""
    blocks = _branch_blocks("ablate", model, branch, layers)
    added = [b for b in blocks if branch not in b.ablated]
    for b in added:
        b.ablated.add(branch)
    try:
        yield model
    finally:
        for b in added:
            b.ablated.discard(branch)


@contextlib.contextmanager
def force_gate(model: LM, value: float, layers=None):
    """Force the RWKV weight of the fusion to `value` in [0, 1] in `layers` (None = all): g of the GF family,
    s of the HGF family (every channel), alpha of WS, w_a of the arbiters (GRU, MINGRU, LINREC; w_m = 1 - w_a;
    their recurrences still run, so their states are unchanged)."""
    if not hasattr(model, "blocks") or not all(hasattr(getattr(b, "fusion", None), "forced_gate")
                                               for b in model.blocks):
        name = getattr(getattr(model, "config", None), "name", type(model).__name__)
        raise ValueError(f"force_gate: model {name} has no fusion gate; gated variants: {', '.join(GATED_NAMES)}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"force_gate: value must lie in [0, 1], got {value}")
    blocks = _select_blocks(model, layers)
    saved = [(b.fusion, b.fusion.forced_gate) for b in blocks]
    for b in blocks:
        b.fusion.forced_gate = float(value)
    try:
        yield model
    finally:
        for fusion, old in saved:
            fusion.forced_gate = old



@contextlib.contextmanager
def mean_ablate(model: LM, branch: str, means, layers=None):
    """Replace `branch`'s output ('rwkv' or 'mamba'), before fusion, by a constant vector per layer while
    inside the block: its mean activation over held-out text, so the fusion still sees a typical input
    and only the token-dependent information is removed (zero-ablation also removes the offset).

    means: one (C,) tensor per layer of the model (a list of n_layer, or a dict layer -> (C,)), e.g. from
    `gt_pipeline.engine.evaluate.branch_means`; layers None = all. The branch still runs, so its
    recurrent state evolves as usual; only what it hands to the fusion changes."""
    blocks = _branch_blocks("mean_ablate", model, branch, layers)
    index = {id(b): i for i, b in enumerate(model.blocks)}
    C = model.config.hidden_size
    handles = []

    def vector(i: int):
        try:
            v = means[i]
        except (KeyError, IndexError):
            raise ValueError(f"mean_ablate: means has no vector for layer {i} (give one (C,) tensor per layer)") from None
        if tuple(v.shape) != (C,):
            raise ValueError(f"mean_ablate: the mean of layer {i} has shape {tuple(v.shape)}, expected ({C},)")
        return v

    def hook(vec):
        def replace(module, args, out):
            y, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
            y = vec.to(device=y.device, dtype=y.dtype).expand_as(y)  # (B, T, C)
            return y if rest is None else (y, *rest)
        return replace

    try:
        for b in blocks:
            handles.append(getattr(b, branch).register_forward_hook(hook(vector(index[id(b)]))))
        yield model
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------------------ kernel paths
def describe_paths(model: nn.Module, device: str | torch.device, amp: bool = True,
                   compiled: bool = False) -> dict[str, str]:
    """Which kernels `model`'s layers take on `device` (CUDA calls under bf16 autocast when `amp`, traced by
    torch.compile when `compiled`), as they
    resolve them at run time: `rwkv_wkv6` ("chunked" / "sequential"), `mamba_ssd` ("wkv6" / "triton" / "torch"),
    `mamba_wkv6` (the wkv6 kernels of the Mamba SSD when it runs on them) and `mamba_conv`
    ("triton" / "causal_conv1d" / "torch"); "n/a" where the model has no such layer. A model with a GRU arbiter adds
    `arbiter_gru` ("triton" / "cudnn", models.arbiter). A fallback a layer takes is logged
    by the layer itself (models.mamba2)."""
    dev = torch.device(device)
    param_dtype = next(model.parameters()).dtype
    act = torch.bfloat16 if (amp and dev.type == "cuda") else param_dtype   # what the layers see in training
    out = dict.fromkeys(("rwkv_wkv6", "mamba_ssd", "mamba_wkv6", "mamba_conv"), "n/a")
    for m in model.modules():
        if isinstance(m, RWKV6TimeMix):
            r = torch.empty(1, 1, m.n_head, m.head_size, device=dev, dtype=act)
            out["rwkv_wkv6"] = kernels.resolve_impl(kernels.pick_impl(m.wkv6_impl, r), r)
        elif isinstance(m, Mamba2):
            out["mamba_ssd"] = m.ssd_path(torch.empty(1, 1, m.d_model, device=dev, dtype=act))
            out["mamba_conv"] = m.conv_path(torch.empty(1, 1, m.conv_dim, device=dev, dtype=act), compiled=compiled)
            if out["mamba_ssd"] == "wkv6":
                r = torch.empty(1, 1, m.nheads, m.d_state, device=dev, dtype=act)
                out["mamba_wkv6"] = kernels.resolve_impl(kernels.pick_impl(m.wkv6_impl, r), r)
        elif isinstance(m, GRUArbiter):   # only models with a GRU arbiter carry this key
            with torch.autocast("cuda", dtype=torch.bfloat16) if act == torch.bfloat16 and dev.type == "cuda" \
                    else contextlib.nullcontext():
                out["arbiter_gru"] = m.path(torch.empty(1, 1, m.dim, device=dev, dtype=act))
    return out
