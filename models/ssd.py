"""Mamba-2 state-space duality (SSD) ops in plain PyTorch: a chunked scan and its sequential `*_ref` twin.

The recurrence (Dao & Gu 2024; mamba_ssm `mamba_chunk_scan_combined`), per batch row and head h, with
x_t (P,), B_t, C_t (N,) (heads of one group share B and C), dt_t > 0 (already softplus'ed) and A_h < 0:

    h_t = exp(dt_t * A_h) * h_{t-1} + dt_t * x_t B_t^T        # state (P, N)
    y_t = h_t C_t + D_h * x_t                                 # the current token enters through the state

`ssd_chunked` is what the model runs on CPU (and on CUDA when mamba_ssm is not importable); `ssd_ref` is the
readable O(T) loop it is tested against. Both take and return the state in (B, H, P, N) float32 (float64 when
the inputs are float64). Every exponent in the chunked form is "later minus earlier" of a cumulative sum of
dt*A <= 0, so nothing overflows however strong the decay.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ssd_chunked", "ssd_ref", "segsum"]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # fp64 inputs stay fp64 (tests); everything else (fp32, bf16, fp16) is computed in fp32.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def segsum(a: torch.Tensor) -> torch.Tensor:
    """Stable segment sum: out[..., i, j] = sum_{k=j+1..i} a[..., k] for i >= j, -inf above the diagonal.

    a: (..., L) -> (..., L, L). Built from a masked cumulative sum (not a difference of cumsums), so
    exp(out) is exact to rounding even when the cumulative sums themselves are large.
    """
    L = a.shape[-1]
    a = a[..., None].expand(*a.shape, L)                                              # (..., L, L): a[..., k, j] = a_k
    strictly_lower = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device), diagonal=-1)
    a = a.masked_fill(~strictly_lower, 0.0)
    out = torch.cumsum(a, dim=-2)                                                     # sum over k in (j, i]
    lower = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device), diagonal=0)
    return out.masked_fill(~lower, float("-inf"))


def ssd_chunked(x, dt, A, B, C, D=None, initial_state=None, chunk_size: int = 64):
    """Chunked SSD scan (the `ssd_minimal` algorithm, with an initial state and the D skip).

    x:  (B, T, H, P)     inputs per head
    dt: (B, T, H)        step sizes, already softplus'ed (and clamped) - must be >= 0
    A:  (H,)             negative decay rates (A = -exp(A_log))
    B, C: (B, T, G, N)   input/output projections, H % G == 0 (head h uses group h // (H // G))
    D:  (H,) or None     skip connection
    initial_state: (B, H, P, N) or None (zeros)
    Returns y (B, T, H, P) in x.dtype and final_state (B, H, P, N) in fp32 (fp64 for fp64 inputs).
    """
    Bsz, T, H, P = x.shape
    G, N = B.shape[-2], B.shape[-1]
    if H % G != 0:
        raise ValueError(f"ssd_chunked: nheads {H} must be a multiple of ngroups {G}")
    out_dtype, cd = x.dtype, _compute_dtype(x)
    x, dt, A, B, C = x.to(cd), dt.to(cd), A.to(cd), B.to(cd), C.to(cd)
    B = B.repeat_interleave(H // G, dim=2)                                            # (B, T, H, N)
    C = C.repeat_interleave(H // G, dim=2)

    # pad T to a multiple of the chunk with dt = 0 and x = 0: decay exp(0) = 1 and no input, so the padded
    # steps leave the state unchanged and do not touch earlier outputs.
    Q = chunk_size
    pad = (-T) % Q
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    nc = (T + pad) // Q
    X = (x * dt[..., None]).view(Bsz, nc, Q, H, P)                                    # discretised input dt*x
    Bc, Cc = B.view(Bsz, nc, Q, H, N), C.view(Bsz, nc, Q, H, N)
    dA = (dt * A).view(Bsz, nc, Q, H).permute(0, 3, 1, 2)                             # (B, H, nc, Q), <= 0
    dA_cs = torch.cumsum(dA, dim=-1)                                                  # within-chunk cumsum

    # 1. outputs from inputs of the same chunk: y_l = sum_{s<=l} (C_l . B_s) exp(sum_{s<k<=l} dA_k) X_s
    Lmat = torch.exp(segsum(dA))                                                      # (B, H, nc, Q, Q)
    scores = torch.einsum("bclhn,bcshn->bhcls", Cc, Bc) * Lmat
    y = torch.einsum("bhcls,bcshp->bclhp", scores, X)

    # 2. state contributed by each chunk alone, at its end: sum_s exp(dA_cs[last] - dA_cs[s]) X_s B_s^T
    decay_to_end = torch.exp(dA_cs[..., -1:] - dA_cs)                                 # (B, H, nc, Q)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, decay_to_end, X)             # (B, nc, H, P, N)

    # 3. pass states across chunks: state entering chunk c = sum_{c'<c} decay(c'..c) * states[c'] + decayed h0
    if initial_state is None:
        initial_state = torch.zeros(Bsz, H, P, N, dtype=cd, device=x.device)
    states = torch.cat([initial_state.to(cd)[:, None], states], dim=1)                # (B, nc+1, H, P, N)
    chunk_decay = torch.exp(segsum(F.pad(dA_cs[..., -1], (1, 0))))                    # (B, H, nc+1, nc+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    entering, final_state = states[:, :-1], states[:, -1]                            # (B, nc, H, P, N), (B, H, P, N)

    # 4. outputs from the state entering the chunk: y_l += exp(dA_cs[l]) C_l . h_in
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, entering, torch.exp(dA_cs))
    y = y.reshape(Bsz, nc * Q, H, P)[:, :T]
    if D is not None:
        y = y + x[:, :T] * D.to(cd)[:, None]
    return y.to(out_dtype), final_state


def ssd_ref(x, dt, A, B, C, D=None, initial_state=None):
    """Sequential reference of `ssd_chunked` (same arguments, no chunk size): one step per token."""
    Bsz, T, H, P = x.shape
    G = B.shape[-2]
    out_dtype, cd = x.dtype, _compute_dtype(x)
    x, dt, A = x.to(cd), dt.to(cd), A.to(cd)
    B = B.to(cd).repeat_interleave(H // G, dim=2)                                     # (B, T, H, N)
    C = C.to(cd).repeat_interleave(H // G, dim=2)
    h = (torch.zeros(Bsz, H, P, B.shape[-1], dtype=cd, device=x.device) if initial_state is None
         else initial_state.to(cd).clone())                                           # (B, H, P, N)
    ys = []
    for t in range(T):
        decay = torch.exp(dt[:, t] * A)                                               # (B, H)
        h = decay[..., None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        y = torch.einsum("bhpn,bhn->bhp", h, C[:, t])
        if D is not None:
            y = y + D.to(cd)[:, None] * x[:, t]
        ys.append(y)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(Bsz, 0, H, P)
    return y.to(out_dtype), h
