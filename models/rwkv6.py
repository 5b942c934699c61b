"""RWKV-6 ("Finch", x060) time-mix and channel-mix, as RWKV-LM's RWKV_Tmix_x060 / RWKV_CMix_x060.

    tmix = RWKV6TimeMix(hidden_size=128, head_size=64, layer_id=0, n_layer=8)   # 2 heads
    y = tmix(x)                                        # x, y: (B, T, C)
    y, st = tmix(x, return_state=True)                 # st: {"rwkv_state": (B,H,K,V) fp32, "rwkv_shift": (B,C)}
    y2, st = tmix(x2, state=st, return_state=True)     # continues exactly where x stopped

Time-mix, per token t (C = hidden, H = C / N heads of size N; x_prev = previous token's x, 0 or the carried
shift state at t = 0):
    xx = x_prev - x;  m_* = tanh((x + xx*time_maa_x) @ time_maa_w1) @ time_maa_w2[*]   (LoRA order w, k, v, r, g)
    x_* = x + xx * (time_maa_* + m_*)
    r, k, v = receptance(x_r), key(x_k), value(x_v);  g = silu(gate(x_g))
    w = time_decay + tanh(x_w @ time_decay_w1) @ time_decay_w2     raw decay: per-step decay = exp(-exp(w))
    o = wkv6(r, k, v, w, u=time_faaaa)      S_t = diag(exp(-exp(w_t))) S_{t-1} + k_t^T v_t,
                                            o_t = r_t (diag(u) k_t^T v_t + S_{t-1})
    out = output(GroupNorm_H(o) * g)        GroupNorm eps = 1e-5 * head_size_divisor**2 = 6.4e-4
Initialisation: the constructor's layer-dependent time_* values and RWKV-LM's `generate_init_weight` for the
projections (receptance/value orthogonal gain 1, key/gate orthogonal gain 0.1, output zero, ln_x.weight
((1 + layer_id) / n_layer) ** 0.7). Models built on these layers must not re-initialise them.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

__all__ = ["RWKV6TimeMix", "RWKV6ChannelMix", "rwkv_dim_ffn"]


def rwkv_dim_ffn(hidden_size: int) -> int:
    """RWKV-LM's channel-mix width: 3.5 * C rounded down to a multiple of 32."""
    return int(3.5 * hidden_size) // 32 * 32


def _orthogonal_(weight: torch.Tensor, scale: float) -> None:
    # RWKV-LM: gain sqrt(out/in) for tall matrices, times the per-matrix scale; scale 0 means zeros.
    if scale == 0:
        nn.init.zeros_(weight)
        return
    out_f, in_f = weight.shape
    gain = (out_f / in_f) ** 0.5 if out_f > in_f else 1.0
    # One thread for the small QR inside orthogonal_: with OpenMP threads on a busy machine a 128x128 QR was
    # measured at 350 ms instead of 0.5 ms (spin-waiting), which made building a 5M model take seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        nn.init.orthogonal_(weight, gain=gain * scale)
    finally:
        torch.set_num_threads(threads)


def _validate_layer(cls: str, hidden_size: int, layer_id: int, n_layer: int) -> None:
    if not isinstance(hidden_size, int) or hidden_size < 2:
        raise ValueError(f"{cls}: hidden_size must be an int >= 2, got {hidden_size!r}")
    if not isinstance(n_layer, int) or n_layer < 1:
        raise ValueError(f"{cls}: n_layer must be a positive int, got {n_layer!r}")
    if not isinstance(layer_id, int) or not 0 <= layer_id < n_layer:
        raise ValueError(f"{cls}: layer_id must be in [0, n_layer={n_layer}), got {layer_id!r}")


def _token_shift(x, shift_state):
    """x (B, T, C) -> x_prev (B, T, C) with x_prev[:, 0] = shift_state (zeros when None), and the new state."""
    first = x.new_zeros(x.shape[0], 1, x.shape[2]) if shift_state is None else shift_state[:, None].to(x.dtype)
    return torch.cat([first, x[:, :-1]], dim=1), x[:, -1]


class RWKV6TimeMix(nn.Module):
    def __init__(self, hidden_size: int, head_size: int = 64, layer_id: int = 0, n_layer: int = 1,
                 head_size_divisor: int = 8, wkv6_impl: str = "auto"):
        super().__init__()
        _validate_layer("RWKV6TimeMix", hidden_size, layer_id, n_layer)
        kernels.check_impl(wkv6_impl, "RWKV6TimeMix: wkv6_impl")
        self.wkv6_impl = wkv6_impl  # kernels.pick_impl: "chunked" where it applies, else sequential
        if not isinstance(head_size, int) or head_size < 1 or hidden_size % head_size != 0:
            raise ValueError(f"RWKV6TimeMix: hidden_size ({hidden_size}) must be divisible by head_size "
                             f"({head_size}); pick head_size from the divisors of hidden_size (RWKV-LM uses 64)")
        C = hidden_size
        self.hidden_size, self.head_size, self.n_head = C, head_size, C // head_size
        self.layer_id, self.n_layer = layer_id, n_layer
        d_mix = 64 if C >= 4096 else 32          # RWKV-LM's D_MIX_LORA
        d_decay = 128 if C >= 4096 else 64       # RWKV-LM's D_DECAY_LORA

        with torch.no_grad():
            # RWKV-LM divides by n_layer - 1: guard the 1-layer model (its only layer counts as the first).
            r0 = layer_id / (n_layer - 1) if n_layer > 1 else 0.0     # ratio_0_to_1
            r1 = 1.0 - layer_id / n_layer                              # ratio_1_to_almost0
            ddd = (torch.arange(C, dtype=torch.float64) / C).view(1, 1, C)
            n = torch.arange(C, dtype=torch.float64)
            n_frac = n / max(C - 1, 1)
            f32 = lambda t: nn.Parameter(t.to(torch.float32))          # noqa: E731
            self.time_maa_x = f32(1.0 - ddd ** r1)                         # (1, 1, C)
            self.time_maa_w = f32(1.0 - ddd ** r1)
            self.time_maa_k = f32(1.0 - ddd ** r1)
            self.time_maa_v = f32(1.0 - (ddd ** r1 + 0.3 * r0))
            self.time_maa_r = f32(1.0 - ddd ** (0.5 * r1))
            self.time_maa_g = f32(1.0 - ddd ** (0.5 * r1))
            self.time_maa_w1 = nn.Parameter(torch.zeros(C, 5 * d_mix))                       # (C, 5*32)
            self.time_maa_w2 = nn.Parameter(torch.empty(5, d_mix, C).uniform_(-0.01, 0.01))  # (5, 32, C)
            # decay_speed spans the whole channel index: -6 (slowest, channel 0) to -1 (fastest, last channel)
            self.time_decay = f32((-6.0 + 5.0 * n_frac ** (0.7 + 1.3 * r0)).view(1, 1, C))
            self.time_decay_w1 = nn.Parameter(torch.zeros(C, d_decay))                       # (C, 64)
            self.time_decay_w2 = nn.Parameter(torch.empty(d_decay, C).uniform_(-0.01, 0.01))  # (64, C)
            zigzag = ((n + 1) % 3 - 1) * 0.1
            self.time_faaaa = f32((r0 * (1.0 - n_frac) + zigzag).view(self.n_head, head_size))  # (H, N)

        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.gate = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(self.n_head, C, eps=1e-5 * head_size_divisor ** 2)
        with torch.no_grad():   # RWKV-LM generate_init_weight
            _orthogonal_(self.receptance.weight, 1.0)
            _orthogonal_(self.key.weight, 0.1)
            _orthogonal_(self.value.weight, 1.0)
            _orthogonal_(self.gate.weight, 0.1)
            _orthogonal_(self.output.weight, 0.0)
            self.ln_x.weight.fill_(((1 + layer_id) / n_layer) ** 0.7)

    def init_state(self, batch_size: int, device=None) -> dict:
        device = self.receptance.weight.device if device is None else device
        N = self.head_size
        return {"rwkv_state": torch.zeros(batch_size, self.n_head, N, N, device=device, dtype=torch.float32),
                "rwkv_shift": torch.zeros(batch_size, self.hidden_size, device=device)}

    def forward(self, x, state: dict | None = None, return_state: bool = False):
        """x: (B, T, C) -> (B, T, C); with return_state also {"rwkv_state": (B,H,N,N) fp32, "rwkv_shift": (B,C)}."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        x_prev, new_shift = _token_shift(x, None if state is None else state["rwkv_shift"])
        xx = x_prev - x                                                                   # (B, T, C)
        xxx = x + xx * self.time_maa_x
        m = torch.tanh(xxx @ self.time_maa_w1).view(B * T, 5, -1).transpose(0, 1)         # (5, B*T, 32)
        mw, mk, mv, mr, mg = torch.bmm(m, self.time_maa_w2).view(5, B, T, C).unbind(0)
        xw = x + xx * (self.time_maa_w + mw)
        xk = x + xx * (self.time_maa_k + mk)
        xv = x + xx * (self.time_maa_v + mv)
        xr = x + xx * (self.time_maa_r + mr)
        xg = x + xx * (self.time_maa_g + mg)

        r = self.receptance(xr).view(B, T, H, N)
        k = self.key(xk).view(B, T, H, N)
        v = self.value(xv).view(B, T, H, N)
        g = F.silu(self.gate(xg))                                                         # (B, T, C)
        # raw decay w (B, T, C) in fp32 even under AMP: exp(w) is the per-step log-decay, and bf16 w would carry
        # up to 1.6% error into it (shared/notes/kernels.md section 2, numerics).
        with torch.autocast(device_type=x.device.type, enabled=False):
            xw = xw if xw.dtype == torch.float64 else xw.float()
            w = self.time_decay + torch.tanh(xw @ self.time_decay_w1.to(xw.dtype)) @ self.time_decay_w2.to(xw.dtype)
        w = w.view(B, T, H, N)
        # the CUDA kernel takes fp32 w beside bf16 r/k/v; otherwise all of r, k, v, w share r's dtype.
        if not (r.is_cuda and r.dtype == torch.bfloat16):
            w = w.to(r.dtype)
        o, wkv_state = kernels.wkv6(r, k, v.to(r.dtype), w, self.time_faaaa,
                                    initial_state=None if state is None else state["rwkv_state"],
                                    output_final_state=True, impl=kernels.pick_impl(self.wkv6_impl, r))                              # (B,T,H,N), (B,H,N,N)
        o = self.ln_x(o.reshape(B * T, C)).view(B, T, C)
        out = self.output(o * g)
        if not return_state:
            return out
        return out, {"rwkv_state": wkv_state, "rwkv_shift": new_shift}


class RWKV6ChannelMix(nn.Module):
    """RWKV_CMix_x060: out = sigmoid(receptance(x_r)) * value(relu(key(x_k))^2), x_* token-shift lerps.

    Init: time_maa_k = time_maa_r = 1 - ddd**(r1**3); key orthogonal (gain sqrt(dim_ffn/C)); receptance and
    value zero (RWKV-LM generate_init_weight). State: {"cmix_shift": (B, C)}.
    """

    def __init__(self, hidden_size: int, layer_id: int = 0, n_layer: int = 1, dim_ffn: int | None = None):
        super().__init__()
        _validate_layer("RWKV6ChannelMix", hidden_size, layer_id, n_layer)
        C = hidden_size
        dim_ffn = rwkv_dim_ffn(C) if dim_ffn is None else dim_ffn
        if dim_ffn < 1:
            raise ValueError(f"RWKV6ChannelMix: dim_ffn must be positive, got {dim_ffn}")
        self.hidden_size, self.dim_ffn = C, dim_ffn
        with torch.no_grad():
            r1 = 1.0 - layer_id / n_layer
            ddd = (torch.arange(C, dtype=torch.float64) / C).view(1, 1, C)
            self.time_maa_k = nn.Parameter((1.0 - ddd ** (r1 ** 3)).float())
            self.time_maa_r = nn.Parameter((1.0 - ddd ** (r1 ** 3)).float())
        self.key = nn.Linear(C, dim_ffn, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(dim_ffn, C, bias=False)
        with torch.no_grad():
            _orthogonal_(self.key.weight, 1.0)
            _orthogonal_(self.receptance.weight, 0.0)
            _orthogonal_(self.value.weight, 0.0)

    def forward(self, x, state: dict | None = None, return_state: bool = False):
        x_prev, new_shift = _token_shift(x, None if state is None else state["cmix_shift"])
        xx = x_prev - x
        xk = x + xx * self.time_maa_k
        xr = x + xx * self.time_maa_r
        out = torch.sigmoid(self.receptance(xr)) * self.value(torch.relu(self.key(xk)) ** 2)
        if not return_state:
            return out
        return out, {"cmix_shift": new_shift}
