"""Pure-PyTorch references for the RWKV-6 wkv6 recurrence (no compiled code).

Two forms with the signature of `kernels.wkv6`:

- `wkv6_ref`: the sequential recurrence, one step per token. This is the ground truth every backend
  is tested against; run it in float64 for tests (it computes in float64 when given float64 inputs
  and in float32 otherwise). Gradients come from autograd.
- `wkv6_chunked_ref`: the chunked parallel form (intra-chunk attention matrix + inter-chunk state
  passing), the shape a tensor-core kernel takes. Every exponent it evaluates is a "later minus
  earlier" sum of log-decays, i.e. <= 0, so strong decays cannot overflow (the failure mode of
  chunked forms that use exp(-cumsum)).

Semantics (RWKV-LM x060 convention), per batch b and head h, row vectors r_t, k_t, w_t of size K and
v_t of size V, state S of shape (K, V):
    d_t = exp(-exp(w_t))                                  decay, acts on the key index
    y_t = r_t @ (diag(u) k_t^T v_t + S_{t-1})             reads the state *before* step t
    S_t = diag(d_t) S_{t-1} + k_t^T v_t                   S_{-1} = initial_state (or 0)
"""
from __future__ import annotations

import torch

__all__ = ["wkv6_ref", "wkv6_chunked_ref"]


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 inputs are upcast)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def wkv6_ref(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sequential wkv6 recurrence (the ground truth).

    Args:
        r, k, w: `[B, T, H, K]` receptance, key, raw decay (decay = exp(-exp(w))).
        v: `[B, T, H, V]` value.
        u: `[H, K]` bonus for the current token.
        initial_state: optional `[B, H, K, V]` state S_{-1}.
        output_final_state: return S_{T-1} as the second output.
    Returns:
        y `[B, T, H, V]` in r's dtype; state `[B, H, K, V]` (float32, float64 for float64 inputs) or None.
    """
    cd = _compute_dtype(r, k, v, w, u, initial_state)
    B, T, H, K = r.shape
    V = v.shape[-1]
    r_, k_, v_, w_ = (x.to(cd) for x in (r, k, v, w))
    u_HK = u.to(cd)
    decay_BTHK = torch.exp(-torch.exp(w_))
    if initial_state is None:
        S_BHKV = r_.new_zeros(B, H, K, V)
    else:
        S_BHKV = initial_state.to(cd)
    ys = []
    for t in range(T):
        kv_BHKV = k_[:, t, :, :, None] * v_[:, t, :, None, :]
        y_BHV = torch.einsum("bhk,bhkv->bhv", r_[:, t], u_HK[None, :, :, None] * kv_BHKV + S_BHKV)
        ys.append(y_BHV)
        S_BHKV = decay_BTHK[:, t, :, :, None] * S_BHKV + kv_BHKV
    y_BTHV = torch.stack(ys, dim=1).to(r.dtype)
    return y_BTHV, (S_BHKV if output_final_state else None)


def wkv6_chunked_ref(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked parallel form of wkv6; same arguments, shapes and results as `wkv6_ref`.

    Within a chunk of L steps with log-decays l_t = -exp(w_t) (<= 0), inclusive cumsum c_t and
    exclusive cumsum e_t = c_t - l_t (both taken inside the chunk), and S0 the state entering it:
        y_t = (r_t * exp(e_t)) @ S0 + sum_{s<t} [sum_i r_t[i] k_s[i] exp(e_t[i] - c_s[i])] v_s
              + (r_t * u * k_t).sum() v_t
        S_end = diag(exp(c_{L-1})) S0 + sum_s diag(exp(c_{L-1} - c_s)) k_s^T v_s
    e_t - c_s (s < t), e_t and c_{L-1} - c_s are sums of log-decays, hence <= 0: no overflow.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    cd = _compute_dtype(r, k, v, w, u, initial_state)
    B, T, H, K = r.shape
    V = v.shape[-1]
    L = chunk_size
    r_, k_, v_, w_ = (x.to(cd) for x in (r, k, v, w))
    u_HK = u.to(cd)
    logd_BTHK = -torch.exp(w_)
    S_BHKV = r_.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(cd)
    ys = []
    for t0 in range(0, T, L):
        t1 = min(t0 + L, T)
        n = t1 - t0
        rc = r_[:, t0:t1].transpose(1, 2)  # (B, H, n, K)
        kc = k_[:, t0:t1].transpose(1, 2)  # (B, H, n, K)
        vc = v_[:, t0:t1].transpose(1, 2)  # (B, H, n, V)
        lc = logd_BTHK[:, t0:t1].transpose(1, 2)  # (B, H, n, K)
        c_BHnK = torch.cumsum(lc, dim=2)
        e_BHnK = c_BHnK - lc
        # exponent[t, s, i] = e_t[i] - c_s[i] = sum_{s<tau<t} l_tau[i] (<= 0) for s < t; masked otherwise
        expo_BHnnK = e_BHnK[:, :, :, None, :] - c_BHnK[:, :, None, :, :]
        strict_lower = torch.tril(torch.ones(n, n, dtype=torch.bool, device=r.device), diagonal=-1)
        expo_BHnnK = expo_BHnnK.masked_fill(~strict_lower[None, None, :, :, None], float("-inf"))
        A_BHnn = torch.einsum("bhtk,bhsk,bhtsk->bhts", rc, kc, torch.exp(expo_BHnnK))
        diag_BHn = (rc * u_HK[None, :, None, :] * kc).sum(-1)  # bonus for the current token
        A_BHnn = A_BHnn + torch.diag_embed(diag_BHn)
        y_BHnV = A_BHnn @ vc + (rc * torch.exp(e_BHnK)) @ S_BHKV
        ys.append(y_BHnV.transpose(1, 2))
        c_last_BHK = c_BHnK[:, :, -1, :]
        k_dec_BHnK = kc * torch.exp(c_last_BHK[:, :, None, :] - c_BHnK)
        S_BHKV = torch.exp(c_last_BHK)[..., None] * S_BHKV + k_dec_BHnK.transpose(-1, -2) @ vc
    y_BTHV = torch.cat(ys, dim=1).to(r.dtype)
    return y_BTHV, (S_BHKV if output_final_state else None)
