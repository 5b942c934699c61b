"""The language model: embedding -> blocks -> RMSNorm -> tied head, with carried recurrent state.

    model = models.get_model("GF-MH", vocab_size=16000, size="5m")
    out = model(idx)                               # idx (B, T) int64 -> out.logits (B, T, V), out.state
    out2 = model(idx2, state=out.state)            # continues the sequence: same logits as one long call
    out = model(idx, return_states=True, return_activations=True)
    out.layer_states[i]   # {"rwkv_state" (B,H,K,V), "rwkv_shift" (B,C), "mamba_ssm_state" (B,H,P,N),
                          #  "mamba_conv_state" (B,conv_dim,d_conv), "gate": ...}
    out.activations[i]    # {"rwkv": (B,T,C), "mamba": (B,T,C)}: branch outputs as they enter the fusion

    gpt = models.get_model("GPT", vocab_size=16000, size="5m")     # no recurrent state; out.state is None ...
    with torch.no_grad():                                           # ... unless it is given a KV cache:
        out = gpt(prompt, state=gpt.kv_cache(B, capacity=T + 100))  # out.state: the KVCache, length T
        out = gpt(next_tok, state=out.state)                        # (B, 1): attends to the T + 1 cached keys

Blocks (pre-norm, one residual per sub-block; no positional embedding except RoPE in GPT):
    hybrid (ParallelHybridBlock): h = RMSNorm(x); a = RWKV6TimeMix(h); m = Mamba2(h)
                                  x = x + fuse(a, m) [+ m with mamba_residual]; x = x + FFN(RMSNorm(x)),
                                  FFN = Linear(C,4C) GELU Linear(4C,C); in training a = 0 with rwkv_drop_prob
                                  The arbiter fusions (GRU, MINGRU, LINREC) add their own "arbiter_*" states.
    RWKV6:  x = x + RWKV6TimeMix(RMSNorm(x)); x = x + RWKV6ChannelMix(RMSNorm(x))
    MAMBA2: x = x + Mamba2(RMSNorm(x));       x = x + FFN(RMSNorm(x))
    GPT:    x = x + CausalSelfAttention(RMSNorm(x)) (RoPE, SDPA); x = x + FFN(RMSNorm(x))
Init: embedding (= tied head), FFN, attention and fusion Linears N(0, 0.02) (RF 0.01, GF-MH/GF-RH gate W 0), each
set where the module is built. The RWKV-6 and Mamba-2 layers keep their own initialisation: nothing is
re-initialised model-wide (the seeds' global re-init destroyed those inits).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from .config import ModelConfig
from .fusion import RMSNorm, make_fusion
from .mamba2 import Mamba2
from .rwkv6 import RWKV6ChannelMix, RWKV6TimeMix

__all__ = ["LM", "ModelOutput", "ModelState", "KVCache", "HybridBlock", "RWKV6Block", "Mamba2Block", "GPTBlock",
           "make_block"]


# ---------------------------------------------------------------------------------------------------- state
@dataclass
class ModelState:
    """Every layer's recurrent state, one dict per layer (keys as in `ModelOutput.layer_states`, minus "gate").

    Pass it back as `model(idx, state=...)` to continue. `detach()` cuts the graph (truncated BPTT);
    `reset_rows(mask)` zeroes the rows where mask (B,) is True - a new document starts there.
    """
    layers: list[dict[str, torch.Tensor]]

    @property
    def batch_size(self) -> int:
        return next(iter(self.layers[0].values())).shape[0]

    def detach(self) -> "ModelState":
        return ModelState([{k: v.detach() for k, v in d.items()} for d in self.layers])

    def reset_rows(self, mask: torch.Tensor) -> "ModelState":
        """Zero the state of rows where mask is True. Replaces the tensors (no in-place write into tensors
        autograd may hold) and returns self, so both `state.reset_rows(m)` and `state = state.reset_rows(m)` work."""
        mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool or mask.dim() != 1 or mask.shape[0] != self.batch_size:
            raise ValueError(f"reset_rows: mask must be a bool tensor of shape ({self.batch_size},), "
                             f"got {tuple(mask.shape)} {mask.dtype}")
        for d in self.layers:
            for k, v in d.items():
                reset = mask.to(v.device).view(-1, *([1] * (v.dim() - 1)))
                d[k] = torch.where(reset, torch.zeros((), dtype=v.dtype, device=v.device), v)
        return self

    def to(self, *args, **kwargs) -> "ModelState":
        return ModelState([{k: v.to(*args, **kwargs) for k, v in d.items()} for d in self.layers])


@dataclass
class KVCache(ModelState):
    """GPT's decoding state: every layer's keys and values, in buffers allocated once (`LM.kv_cache`).

    layers[i] = {"attn_k": (B, H, capacity, D), "attn_v": (B, H, capacity, D)} (keys after RoPE); positions
    [0, length) hold the tokens seen so far. `model(idx, state=cache)` writes positions [length, length + T)
    in place and returns a KVCache over the same buffers with length + T, so a decoding step costs the
    attention over the cached keys, not a copy of the cache. Continue from the newest cache; an older one may
    be resumed (that overwrites what followed it). Inference only: in-place writes cannot be differentiated,
    so the model refuses a cache while autograd records.
    """
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.layers[0]["attn_k"].shape[2]

    def detach(self) -> "KVCache":
        return KVCache([{k: v.detach() for k, v in d.items()} for d in self.layers], self.length)

    def reset_rows(self, mask: torch.Tensor) -> "KVCache":
        raise ValueError("KVCache.reset_rows: a KV cache has one position counter for the whole batch, so a row "
                         "cannot restart alone; start a new cache (LM.kv_cache) for a new batch of prompts")

    def to(self, *args, **kwargs) -> "KVCache":
        return KVCache([{k: v.to(*args, **kwargs) for k, v in d.items()} for d in self.layers], self.length)


@dataclass
class ModelOutput:
    logits: torch.Tensor                                   # (B, T, V)
    state: ModelState | None                               # None only for GPT without a KVCache
    layer_states: list[dict] | None = None                 # with return_states
    activations: list[dict] | None = None                  # with return_activations


# --------------------------------------------------------------------------------------------------- blocks
class FFN(nn.Module):
    """Linear(C, mult*C) -> GELU (exact) -> Linear(mult*C, C), no biases, N(0, 0.02) init."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.fc = nn.Linear(dim, mult * dim, bias=False)
        self.proj = nn.Linear(mult * dim, dim, bias=False)
        for lin in (self.fc, self.proj):
            nn.init.normal_(lin.weight, 0.0, 0.02)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


def _mamba(cfg: ModelConfig, layer_id: int) -> Mamba2:
    return Mamba2(cfg.hidden_size, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand,
                  headdim=cfg.mamba_headdim, ngroups=cfg.ngroups, chunk_size=cfg.mamba_chunk_size,
                  layer_idx=layer_id, backend=cfg.mamba_backend, wkv6_impl=cfg.wkv6_impl,
                  conv_impl=cfg.mamba_conv)


class HybridBlock(nn.Module):
    """ParallelHybridBlock: RWKV-6 and Mamba-2 read the same normalised input; their outputs are fused."""
    branches = ("rwkv", "mamba")

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        C = cfg.hidden_size
        self.norm1 = RMSNorm(C, cfg.norm_eps)
        self.rwkv = RWKV6TimeMix(C, head_size=cfg.head_size, layer_id=layer_id, n_layer=cfg.n_layer,
                                 wkv6_impl=cfg.wkv6_impl)
        self.mamba = _mamba(cfg, layer_id)
        self.fusion = make_fusion(cfg.name, C, gate_init=cfg.gate_init, norm_eps=cfg.norm_eps)
        self.norm2 = RMSNorm(C, cfg.norm_eps)
        self.ffn = FFN(C, cfg.ffn_mult)
        self.ablated: set[str] = set()
        self.stateful_fusion = getattr(self.fusion, "stateful", False)   # the arbiters carry a state over time
        self.mamba_residual = cfg.mamba_residual
        self.rwkv_drop_prob = float(cfg.rwkv_drop_prob)

    def forward(self, x, state):
        h = self.norm1(x)
        a, st_r = self.rwkv(h, state, return_state=True)                                  # (B, T, C)
        m, st_m = self.mamba(h, state, return_state=True)                                 # (B, T, C)
        if "rwkv" in self.ablated:
            a = torch.zeros_like(a)
        if "mamba" in self.ablated:
            m = torch.zeros_like(m)
        if self.training and self.rwkv_drop_prob > 0:
            # one draw per layer and forward from torch's RNG (the seeds' rwkv_drop_prob); eval never drops
            keep = torch.rand((), device=a.device) >= self.rwkv_drop_prob
            a = torch.where(keep, a, torch.zeros((), dtype=a.dtype, device=a.device))
        if self.stateful_fusion:
            fused, gate, st_f = self.fusion(a, m, state)
        else:
            (fused, gate), st_f = self.fusion(a, m), {}
        x = x + fused
        if self.mamba_residual:
            x = x + m
        x = x + self.ffn(self.norm2(x))
        return x, {**st_r, **st_m, **st_f}, gate, {"rwkv": a, "mamba": m}


class RWKV6Block(nn.Module):
    """Pure RWKV-6 block: time-mix then channel-mix (RWKV-LM's Block with RMSNorm pre-norms)."""
    branches = ("rwkv",)

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        C = cfg.hidden_size
        self.norm1 = RMSNorm(C, cfg.norm_eps)
        self.rwkv = RWKV6TimeMix(C, head_size=cfg.head_size, layer_id=layer_id, n_layer=cfg.n_layer,
                                 wkv6_impl=cfg.wkv6_impl)
        self.norm2 = RMSNorm(C, cfg.norm_eps)
        self.ffn = RWKV6ChannelMix(C, layer_id=layer_id, n_layer=cfg.n_layer)
        self.ablated: set[str] = set()

    def forward(self, x, state):
        a, st_r = self.rwkv(self.norm1(x), state, return_state=True)
        if "rwkv" in self.ablated:
            a = torch.zeros_like(a)
        x = x + a
        f, st_c = self.ffn(self.norm2(x), state, return_state=True)
        return x + f, {**st_r, **st_c}, None, {"rwkv": a}


class Mamba2Block(nn.Module):
    """Pure Mamba-2 block: the hybrid block without the RWKV branch and the fusion."""
    branches = ("mamba",)

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        C = cfg.hidden_size
        self.norm1 = RMSNorm(C, cfg.norm_eps)
        self.mamba = _mamba(cfg, layer_id)
        self.norm2 = RMSNorm(C, cfg.norm_eps)
        self.ffn = FFN(C, cfg.ffn_mult)
        self.ablated: set[str] = set()

    def forward(self, x, state):
        m, st_m = self.mamba(self.norm1(x), state, return_state=True)
        if "mamba" in self.ablated:
            m = torch.zeros_like(m)
        x = x + m
        return x + self.ffn(self.norm2(x)), st_m, None, {"mamba": m}


def _rope(x, base: float = 10000.0, offset: int = 0):
    """Rotary position embedding over the last dim of x (B, H, T, D), positions offset..offset+T-1 (pairs
    (i, i + D/2))."""
    T, D = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)   # (D/2,)
    pos = torch.arange(offset, offset + T, device=x.device, dtype=torch.float32)                 # (T,)
    ang = pos[:, None] * inv_freq                                                                # (T, D/2)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


# SDPA backends of a KV-cache call: every one except cuDNN's (see CausalSelfAttention.forward)
_CACHE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, head_size: int):
        super().__init__()
        if head_size % 2:
            raise ValueError(f"CausalSelfAttention: head_size must be even for RoPE, got {head_size}")
        self.n_head, self.head_size = dim // head_size, head_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        for lin in (self.qkv, self.proj):
            nn.init.normal_(lin.weight, 0.0, 0.02)

    def forward(self, x, cache: dict | None = None, pos: int = 0):
        """x (B, T, C) -> (B, T, C). With `cache` ({"attn_k", "attn_v"}: (B, H, capacity, D), a KVCache layer),
        x holds positions pos..pos+T-1: its keys and values are written there and the queries attend to
        positions 0..pos+T-1 (causal within x)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_size).permute(2, 0, 3, 1, 4)   # 3 x (B,H,T,D)
        if cache is None:
            y = F.scaled_dot_product_attention(_rope(q), _rope(k), v, is_causal=True)             # (B, H, T, D)
        else:
            kc, vc = cache["attn_k"], cache["attn_v"]                                            # (B, H, cap, D)
            kc[:, :, pos:pos + T] = _rope(k, offset=pos)
            vc[:, :, pos:pos + T] = v
            q = _rope(q, offset=pos).to(kc.dtype)
            S = pos + T
            # one query sees every cached key; T > 1 queries (a prompt chunk after earlier ones) are causal
            # aligned to the end: query i may see keys 0..pos+i (causal_lower_right keeps the flash kernels)
            mask = None if T == 1 else causal_lower_right(T, S)
            # The key length S grows with every call, and cuDNN's attention builds an execution plan per new
            # shape (milliseconds each), so a cached call leaves cuDNN out of SDPA's choices.
            with sdpa_kernel(_CACHE_SDPA_BACKENDS):
                y = F.scaled_dot_product_attention(q, kc[:, :, :S], vc[:, :, :S], attn_mask=mask).to(v.dtype)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class GPTBlock(nn.Module):
    branches = ()

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        C = cfg.hidden_size
        self.norm1 = RMSNorm(C, cfg.norm_eps)
        self.attn = CausalSelfAttention(C, cfg.head_size)
        self.norm2 = RMSNorm(C, cfg.norm_eps)
        self.ffn = FFN(C, cfg.ffn_mult)
        self.ablated: set[str] = set()

    def forward(self, x, state, pos: int = 0):
        """state: None, or a KVCache layer {"attn_k", "attn_v"} that x continues at position `pos`."""
        a = self.attn(self.norm1(x), state, pos)
        x = x + a
        return x + self.ffn(self.norm2(x)), ({} if state is None else state), None, {"attn": a}


def make_block(cfg: ModelConfig, layer_id: int) -> nn.Module:
    if cfg.is_hybrid:
        return HybridBlock(cfg, layer_id)
    return {"RWKV6": RWKV6Block, "MAMBA2": Mamba2Block, "GPT": GPTBlock}[cfg.name](cfg, layer_id)


# ------------------------------------------------------------------------------------------------------ model
class LM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        nn.init.normal_(self.tok_emb.weight, 0.0, 0.02)
        self.blocks = nn.ModuleList([make_block(cfg, i) for i in range(cfg.n_layer)])
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight                                            # tied

    @property
    def is_recurrent(self) -> bool:
        return self.config.name != "GPT"

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())      # the tied matrix counts once

    def kv_cache(self, batch_size: int, capacity: int, dtype: torch.dtype | None = None, device=None) -> KVCache:
        """An empty KVCache for GPT: room for `capacity` positions of `batch_size` sequences, every layer's K and V
        (B, H, capacity, D) in `dtype` (default: the parameters'; torch.bfloat16 for bf16-autocast decoding)."""
        if self.is_recurrent:
            raise ValueError(f"kv_cache: {self.config.name} is recurrent; its state is the ModelState that "
                             f"model(idx) returns (only GPT decodes with a KV cache)")
        for field, value in (("batch_size", batch_size), ("capacity", capacity)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"kv_cache: {field} must be a positive int, got {value!r}")
        w = self.tok_emb.weight
        H, D = self.config.hidden_size // self.config.head_size, self.config.head_size
        shape = (batch_size, H, capacity, D)
        kw = dict(dtype=w.dtype if dtype is None else dtype, device=w.device if device is None else device)
        return KVCache([{"attn_k": torch.zeros(shape, **kw), "attn_v": torch.zeros(shape, **kw)}
                        for _ in self.blocks])

    def forward(self, idx: torch.Tensor, state: ModelState | None = None, return_states: bool = False,
                return_activations: bool = False) -> ModelOutput:
        """idx: (B, T) int64 token ids. state: a ModelState from a previous call (or None = fresh start); for GPT
        a KVCache (`kv_cache`), which the call extends by T positions and returns as out.state."""
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32) or idx.shape[1] < 1:
            raise ValueError(f"idx must be an integer tensor of shape (B, T) with T >= 1, got "
                             f"{tuple(idx.shape)} {idx.dtype}")
        cache = isinstance(state, KVCache)
        if cache:
            self._check_cache(state, idx)
        elif state is not None:
            if not self.is_recurrent:
                raise ValueError("GPT has no recurrent state: pass state=None and the whole context in one call, "
                                 "or a KV cache from model.kv_cache(batch_size, capacity)")
            if not isinstance(state, ModelState) or len(state.layers) != len(self.blocks):
                raise ValueError(f"state must be the ModelState of a previous call of this model "
                                 f"({len(self.blocks)} layers), got {type(state).__name__}")
            if state.batch_size != idx.shape[0]:
                raise ValueError(f"state batch size {state.batch_size} != idx batch size {idx.shape[0]}")
        x = self.tok_emb(idx)                                                             # (B, T, C)
        new_layers, layer_states, activations = [], [], []
        extra = {"pos": state.length} if cache else {}
        for i, block in enumerate(self.blocks):
            x, st, gate, act = block(x, None if state is None else state.layers[i], **extra)
            new_layers.append(st)
            if return_states:
                layer_states.append({**st, **({} if gate is None else {"gate": gate})})
            if return_activations:
                activations.append(act)
        logits = self.head(self.norm_f(x))                                                # (B, T, V)
        if cache:
            new_state = KVCache(new_layers, state.length + idx.shape[1])
        else:
            new_state = ModelState(new_layers) if self.is_recurrent else None
        return ModelOutput(logits=logits,
                           state=new_state,
                           layer_states=layer_states if return_states else None,
                           activations=activations if return_activations else None)

    def _check_cache(self, cache: KVCache, idx: torch.Tensor) -> None:
        """ValueError naming the problem unless `cache` is this model's KV cache with room for idx (B, T)."""
        if self.is_recurrent:
            raise ValueError(f"a KVCache is GPT's state; {self.config.name} is recurrent: pass the ModelState "
                             f"of its previous call (or None)")
        if len(cache.layers) != len(self.blocks):
            raise ValueError(f"KVCache has {len(cache.layers)} layers, the model {len(self.blocks)}: make it with "
                             f"this model's kv_cache()")
        if cache.batch_size != idx.shape[0]:
            raise ValueError(f"KVCache batch size {cache.batch_size} != idx batch size {idx.shape[0]}")
        if cache.length + idx.shape[1] > cache.capacity:
            raise ValueError(f"KVCache full: {cache.length} cached + {idx.shape[1]} new positions > capacity "
                             f"{cache.capacity}; make the cache with capacity >= prompt + new tokens")
        if torch.is_grad_enabled():
            raise ValueError("a KVCache is written in place, which autograd cannot differentiate: decode under "
                             "torch.no_grad() or torch.inference_mode()")
