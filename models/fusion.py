"""Fusion of the two branch outputs a (RWKV-6) and m (Mamba-2), each (B, T, C), into one (B, T, C) update.

| code  | fused                                   | parameters (C = hidden) | init                                   |
|-------|-----------------------------------------|-------------------------|----------------------------------------|
| HY    | g_r * RMSNorm_r(a) + g_m * RMSNorm_m(m) | 4C (gains + norm weights) | g_r 0.7, g_m 0.3, norm weights 1     |
| GF    | g a + (1-g) m, g = sigmoid(W[a;m] + b)  | 2C + 1                  | W ~ N(0, 0.02), b 0 (g ~ 0.5)          |
| GF-MH | as GF                                   | 2C + 1                  | W = 0, b = logit(0.3) (g = 0.3 exactly) |
| GF-RH | as GF                                   | 2C + 1                  | W = 0, b = logit(0.7) (g = 0.7 exactly) |
| GF-XM | as GF                                   | 2C + 1                  | W = 0, b = logit(0.03) (extreme Mamba) |
| GF-XR | as GF                                   | 2C + 1                  | W = 0, b = logit(0.97) (extreme RWKV)  |
| HGF   | s a + (1-s) m, s = sigmoid(W[a;m] + b), | 2C^2 + C                | W xavier-uniform gain 0.1, b = logit(0.5) |
|       | W (C, 2C): per token and channel        |                         |                                        |
| HGF-MH| as HGF                                  | 2C^2 + C                | W as HGF, b = logit(0.3) (s ~ 0.3)     |
| HGF-RH| as HGF                                  | 2C^2 + C                | W as HGF, b = logit(0.7) (s ~ 0.7)     |
| WS    | alpha a + (1-alpha) m, one scalar       | 1                       | alpha 0.5 (unconstrained, as the seeds) |
| RF    | a + P m                                 | C^2                     | P ~ N(0, 0.01)                         |
| CP    | P [a; m]                                | 2C^2                    | P ~ N(0, 0.02)                         |

Every fusion returns (fused, gate) where gate is what `layer_states[i]["gate"]` reports: g (B, T, 1) for the GF
family, s (B, T, C) for the HGF family, alpha (0-dim) for WS, g_r (C,) for HY and None for RF / CP (they have no
gate). `forced_gate` (set by `models.force_gate`) replaces g / s / alpha with a constant. The stateful arbiter
fusions (GRU, MINGRU, LINREC) live in `models.arbiter`; `make_fusion` builds those too.
The seeds' model-wide re-init redrew W and zeroed b of every HGF variant (identical at init); here each keeps its
own bias, so HGF / HGF-MH / HGF-RH start at mean gates 0.5 / 0.3 / 0.7.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["RMSNorm", "make_fusion", "FUSION_KINDS", "GatedFusion", "ChannelGatedFusion", "WeightedSum",
           "HybridGains", "ResidualFusion", "ConcatProjection", "GATE_DEFAULTS"]


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight (weight init 1), computed in fp32 at least; the seeds' RMSNorm."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x if x.dtype == torch.float64 else x.float()
        return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class GatedFusion(nn.Module):
    """GF / GF-MH / GF-RH: one sigmoid gate per token from the concatenated branch outputs."""

    def __init__(self, dim: int, gate_init: float | None):
        super().__init__()
        self.gate = nn.Linear(2 * dim, 1, bias=True)
        self.forced_gate: float | None = None
        with torch.no_grad():
            if gate_init is None:        # plain GF: data-dependent from the start, g ~ 0.5
                nn.init.normal_(self.gate.weight, 0.0, 0.02)
                self.gate.bias.zero_()
            else:                        # biased GF: exactly gate_init at init (the seeds re-randomised W here)
                self.gate.weight.zero_()
                self.gate.bias.fill_(math.log(gate_init / (1.0 - gate_init)))

    def forward(self, a, m):
        g = torch.sigmoid(self.gate(torch.cat([a, m], dim=-1)))                          # (B, T, 1)
        if self.forced_gate is not None:
            g = torch.full_like(g, self.forced_gate)
        return g * a + (1.0 - g) * m, g


class ChannelGatedFusion(nn.Module):
    """HGF / HGF-MH / HGF-RH: a sigmoid gate per token and channel, s = sigmoid(W [a; m] + b), W (C, 2C), b (C,)."""

    def __init__(self, dim: int, gate_init: float):
        super().__init__()
        self.gate = nn.Linear(2 * dim, dim, bias=True)
        self.forced_gate: float | None = None
        with torch.no_grad():
            # small data-dependent part (the seeds' intended xavier gain 0.1: std ~0.007 at C = 128), so the
            # start gate is sigmoid(b) up to a few 1e-3; the bias sets the variant's start mix
            nn.init.xavier_uniform_(self.gate.weight, gain=0.1)
            self.gate.bias.fill_(math.log(gate_init / (1.0 - gate_init)))

    def forward(self, a, m):
        s = torch.sigmoid(self.gate(torch.cat([a, m], dim=-1)))                          # (B, T, C)
        if self.forced_gate is not None:
            s = torch.full_like(s, self.forced_gate)
        return s * a + (1.0 - s) * m, s


class WeightedSum(nn.Module):
    """WS: alpha a + (1 - alpha) m with one learned scalar per layer."""

    def __init__(self, dim: int, alpha_init: float = 0.5):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.forced_gate: float | None = None

    def forward(self, a, m):
        alpha = self.alpha if self.forced_gate is None else torch.full_like(self.alpha, self.forced_gate)
        return alpha * a + (1.0 - alpha) * m, alpha


class HybridGains(nn.Module):
    """HY: per-channel gains on RMS-normalised branch outputs."""

    def __init__(self, dim: int, rwkv_gain: float = 0.7, mamba_gain: float = 0.3, eps: float = 1e-6):
        super().__init__()
        self.norm_r = RMSNorm(dim, eps)
        self.norm_m = RMSNorm(dim, eps)
        self.gain_r = nn.Parameter(torch.full((dim,), float(rwkv_gain)))
        self.gain_m = nn.Parameter(torch.full((dim,), float(mamba_gain)))

    def forward(self, a, m):
        return self.gain_r * self.norm_r(a) + self.gain_m * self.norm_m(m), self.gain_r


class ResidualFusion(nn.Module):
    """RF: a + P m, P small at init so the RWKV branch dominates early (the seeds overwrote this 0.01 init)."""

    def __init__(self, dim: int, proj_std: float = 0.01):
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)
        nn.init.normal_(self.proj.weight, 0.0, proj_std)

    def forward(self, a, m):
        return a + self.proj(m), None


class ConcatProjection(nn.Module):
    """CP: a free linear mix P [a; m]."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(2 * dim, dim, bias=False)
        nn.init.normal_(self.proj.weight, 0.0, 0.02)

    def forward(self, a, m):
        return self.proj(torch.cat([a, m], dim=-1)), None


FUSION_KINDS = ("HY", "GF", "GF-MH", "GF-RH", "GF-XM", "GF-XR", "HGF", "HGF-MH", "HGF-RH", "WS", "RF", "CP",
                "GRU", "MINGRU", "LINREC")
# start gate of each biased variant (None: plain GF, W ~ N(0, 0.02) and b = 0)
GATE_DEFAULTS = {"GF": None, "GF-MH": 0.3, "GF-RH": 0.7, "GF-XM": 0.03, "GF-XR": 0.97,
                 "HGF": 0.5, "HGF-MH": 0.3, "HGF-RH": 0.7}


def make_fusion(kind: str, dim: int, gate_init: float | None = None, norm_eps: float = 1e-6) -> nn.Module:
    """kind one of FUSION_KINDS; gate_init overrides the GF / HGF start value (GATE_DEFAULTS)."""
    if kind == "HY":
        return HybridGains(dim, eps=norm_eps)
    if kind in ("GF", "GF-MH", "GF-RH", "GF-XM", "GF-XR"):
        return GatedFusion(dim, GATE_DEFAULTS[kind] if gate_init is None else gate_init)
    if kind in ("HGF", "HGF-MH", "HGF-RH"):
        return ChannelGatedFusion(dim, GATE_DEFAULTS[kind] if gate_init is None else gate_init)
    if kind in ("GRU", "MINGRU", "LINREC"):
        from .arbiter import make_arbiter
        return make_arbiter(kind, dim, norm_eps=norm_eps)
    if kind == "WS":
        return WeightedSum(dim)
    if kind == "RF":
        return ResidualFusion(dim)
    if kind == "CP":
        return ConcatProjection(dim)
    raise ValueError(f"fusion: unknown kind {kind!r}; valid: {', '.join(FUSION_KINDS)}")
