"""Stateful arbiter fusions: a small recurrent net reads both branch outputs and weighs them per token.

    fused_t = w_a,t * a_t + w_m,t * m_t,   (w_a, w_m) = softmax(head(c_t)),  c_t = the arbiter's context at t

| code   | context c_t                                                         | state (carried in ModelState)     |
|--------|---------------------------------------------------------------------|-----------------------------------|
| GRU    | h_t = GRUCell([a_t; m_t], h_{t-1})                                   | "arbiter_h" (B, C)                |
| MINGRU | h_t = (1 - z_t) h_{t-1} + z_t g(u_t), [u; z'] = W [RMSNorm(a); RMSNorm(m)], z = sigmoid(z') | "arbiter_h" (B, 1.5C) |
| LINREC | (sum_s q_s x_s) / (sum_s q_s + 1e-6) over s <= t, x = [a; m], q = sigmoid(w.x + b) | "arbiter_sum" (B, 2C), "arbiter_norm" (B, 1) |

g(u) = u + 0.5 for u >= 0, sigmoid(u) otherwise (positive, so the minGRU scan runs in log space). The heads
are zero at init (weight and bias), so every arbiter starts at w_a = w_m = 0.5 exactly. A softmax over two
logits is the sigmoid of their difference: w_a = sigmoid(l_a - l_m), w_m = 1 - w_a; the fusions compute that.
Each returns (fused, w_a (B, T, 1), new state); `forced_gate` (models.force_gate) replaces w_a by a constant.
States start at zero and `ModelState.reset_rows` zeroes them, which is a fresh start for all three.

Fast paths (the same math as the sequential definitions; tests compare them in fp64, the GRU's bf16 path with
bf16 tolerances):
* GRU: the input projections of all T steps are one matmul; only the hidden recurrence runs step by step
  (it cannot be parallel over T: the GRU is nonlinear in h, no associative scan exists). Two backends, chosen
  per call (`GRUArbiter.path`):
  - "triton" (CUDA under bf16 autocast, the training path): `kernels.gru.gru_scan`, persistent Triton
    kernels that run all T steps in one launch each way, with w_hh on chip. As every matmul under autocast,
    the products h @ w_hh^T take bf16 operands (fp32 accumulation); the state h, the gates and gi stay fp32.
    It is a torch.library custom op, so a compiled step stays one graph. On the H200 the kernels alone run at
    0.78x cuDNN's speed, but the GRU model trains 1.04x as fast as through cuDNN, whose call breaks the step's
    graph (one machine, `engine.bench --gru-backend auto|cudnn`: BENCHMARKS.md, issue 17).
  - "cudnn" (everything else: fp32 / fp64, the CPU): torch's fused multi-step GRU (`nn.GRU`, cuDNN on CUDA,
    ATen's C++ loop on CPU) in fp32 or wider with autocast off. Dynamo leaves that call to eager (a graph break).
  A CUDA call under autocast that cannot take "triton" (no triton, or C not in kernels.gru.SUPPORTED_C) is
  logged once and runs "cudnn".
* MINGRU: the recurrence is linear in h (coefficients do not depend on h), so h_t = A_t h_0 + sum_s A_t/A_s b_s
  with A_t = prod_{s<=t} (1 - z_s), b_s = z_s g(u_s): a cumulative sum and a logcumsumexp over T (Heinsen's
  log-space scan), computed in fp64 (see mingru_scan). `mingru_ref` is the sequential loop.
* LINREC: two cumulative sums.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import gru as gru_kernels

from .fusion import RMSNorm
from .mamba2 import log_once

__all__ = ["GRUArbiter", "MinGRUArbiter", "LinearRecurrenceArbiter", "make_arbiter", "ARBITER_KINDS",
           "set_gru_backend", "GRU_BACKENDS", "gru_arbiter_ref", "mingru_scan", "mingru_ref", "log_g"]

log = logging.getLogger(__name__)

GRU_BACKENDS = ("auto", "cudnn")
_GRU_BACKEND = {"prefer": "auto"}   # "auto": Triton where it applies (GRUArbiter.path); set_gru_backend changes it


def set_gru_backend(prefer: str) -> None:
    """Make every GRU arbiter in this process take `prefer`: "auto" (the Triton recurrence where it applies,
    cuDNN elsewhere) or "cudnn" (always nn.GRU). For A/B comparisons of whole models (bench --gru-backend)."""
    if prefer not in GRU_BACKENDS:
        raise ValueError(f"set_gru_backend takes one of {GRU_BACKENDS}, got {prefer!r}")
    _GRU_BACKEND["prefer"] = prefer


ARBITER_KINDS = ("GRU", "MINGRU", "LINREC")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 at least (fp64 stays fp64): the recurrences and scans accumulate over T."""
    return torch.promote_types(x.dtype, torch.float32)


def _weigh(head: nn.Linear, ctx: torch.Tensor, a, m, forced: float | None):
    """(fused (B, T, C) in a's dtype, w_a (B, T, 1)) from the head logits of ctx (B, T, D)."""
    logits = head(ctx)                                                                   # (B, T, 2)
    w_a = torch.sigmoid(logits[..., :1] - logits[..., 1:])                               # softmax(logits)[0]
    if forced is not None:
        w_a = torch.full_like(w_a, forced)
    w_a = w_a.to(a.dtype)
    return w_a * a + (1.0 - w_a) * m, w_a


def _zero_head(dim_in: int, bias: bool = True) -> nn.Linear:
    head = nn.Linear(dim_in, 2, bias=bias)
    with torch.no_grad():
        head.weight.zero_()
        if bias:
            head.bias.zero_()
    return head


# ------------------------------------------------------------------------------------------------------ GRU
class GRUArbiter(nn.Module):
    """GRU arbiter: h_t = GRUCell([a_t; m_t], h_{t-1}) with hidden C; (w_a, w_m) = softmax(A h_t + c), A, c = 0.

    `self.gru` is an `nn.GRU(2C, C)` whose weight_ih_l0 (3C, 2C), weight_hh_l0 (3C, C), bias_ih_l0, bias_hh_l0
    are exactly an `nn.GRUCell(2C, C)`'s weight_ih, weight_hh, bias_ih, bias_hh (PyTorch's default GRU init).
    Parameters 9C^2 + 6C + 2C + 2 (the seeds': 148,224 + 258 at C = 128)."""
    stateful = True

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.gru = nn.GRU(2 * dim, dim, num_layers=1, batch_first=True)
        self.head = _zero_head(dim)
        self.forced_gate: float | None = None

    def path(self, a: torch.Tensor) -> str:
        """The recurrence backend a call on `a` takes (module docstring): "triton" or "cudnn"."""
        if _GRU_BACKEND["prefer"] == "cudnn" or not (a.is_cuda and torch.is_autocast_enabled("cuda")):
            return "cudnn"
        why = ("triton is not installed" if gru_kernels.triton is None else
               f"hidden size {self.dim} is not one of {gru_kernels.SUPPORTED_C}"
               if self.dim not in gru_kernels.SUPPORTED_C else None)
        if why is not None:
            log_once(f"GRU arbiter: the Triton recurrence does not apply ({why}); running cuDNN's fp32 GRU", log)
            return "cudnn"
        return "triton"

    def forward(self, a, m, state: dict | None = None):
        """a, m (B, T, C); state {"arbiter_h": (B, C)} or None (zeros). Returns fused, w_a (B, T, 1), state."""
        if self.path(a) == "triton":
            x = torch.cat([a, m], dim=-1)                                                 # (B, T, 2C)
            gi = F.linear(x, self.gru.weight_ih_l0, self.gru.bias_ih_l0)                  # (B, T, 3C) autocast
            h0 = (a.new_zeros(a.shape[0], self.dim, dtype=torch.float32) if state is None
                  else state["arbiter_h"].float())                                        # (B, C)
            hs, hT = gru_kernels.gru_scan(gi, h0, self.gru.weight_hh_l0, self.gru.bias_hh_l0)  # fp32
            fused, w_a = _weigh(self.head, hs, a, m, self.forced_gate)
            return fused, w_a, {"arbiter_h": hT}
        cd = _compute_dtype(a)
        x = torch.cat([a, m], dim=-1).to(cd)                                              # (B, T, 2C)
        h0 = (x.new_zeros(1, a.shape[0], self.dim) if state is None
              else state["arbiter_h"].to(cd)[None])                                       # (1, B, C)
        with torch.autocast(device_type=a.device.type, enabled=False):
            if self.gru.weight_ih_l0.dtype != cd:       # bf16 / fp16 weights: run the recurrence in fp32 anyway
                hs, hT = torch._VF.gru(x, h0, [p.to(cd) for p in self.gru._flat_weights], True, 1, 0.0,
                                       self.training, False, True)
            else:
                hs, hT = self.gru(x, h0)                                                  # (B, T, C), (1, B, C)
        fused, w_a = _weigh(self.head, hs.to(self.head.weight.dtype), a, m, self.forced_gate)
        return fused, w_a, {"arbiter_h": hT[0]}


def gru_arbiter_ref(arb: GRUArbiter, a, m, h0=None):
    """The plain definition: an nn.GRUCell with the arbiter's weights, stepped over T in Python.
    Returns (fused (B, T, C), w_a (B, T, 1), h_T (B, C)). For tests only (one step per Python iteration)."""
    B, T, C = a.shape
    cell = nn.GRUCell(2 * C, C).to(device=a.device, dtype=a.dtype)
    cell.weight_ih, cell.weight_hh = arb.gru.weight_ih_l0, arb.gru.weight_hh_l0          # shared: grads flow back
    cell.bias_ih, cell.bias_hh = arb.gru.bias_ih_l0, arb.gru.bias_hh_l0
    h = a.new_zeros(B, C) if h0 is None else h0
    fused, ws = [], []
    for t in range(T):
        h = cell(torch.cat([a[:, t], m[:, t]], dim=-1), h)
        w = torch.softmax(arb.head(h), dim=-1)                                            # (B, 2)
        fused.append(w[:, :1] * a[:, t] + w[:, 1:] * m[:, t])
        ws.append(w[:, :1])
    return torch.stack(fused, 1), torch.stack(ws, 1), h


# --------------------------------------------------------------------------------------------------- minGRU
def log_g(u: torch.Tensor) -> torch.Tensor:
    """log g(u), g(u) = u + 0.5 (u >= 0) or sigmoid(u) (u < 0): continuous at 0 (both 0.5), always > 0."""
    return torch.where(u >= 0, torch.log(F.relu(u) + 0.5), -F.softplus(-u))


def mingru_scan(log_coef: torch.Tensor, log_val: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """h_t = exp(log_coef_t) h_{t-1} + exp(log_val_t) for t = 1..T, in parallel over T.

    log_coef, log_val (B, T, D) (fp32 / fp64); h0 (B, D) >= 0 (zeros allowed: it enters linearly, never logged).
    Returns h (B, T, D) in log_coef's dtype. With A_t = cumsum(log_coef)_t:
    h_t = exp(A_t) h0 + exp(A_t + logcumsumexp(log_val - A)_t).

    |A_t| grows linearly with t, and the last term adds two numbers of that size before exp: in fp32 the relative
    error grows as ~1e-7 |A_t| (1e-4 at T = 512 with sharp gates, 4e-3 at T = 16384). The scan therefore runs in
    fp64 (an elementwise pass over (B, T, D); small next to the mixers), which holds fp32 accuracy at any T.
    """
    dtype = log_coef.dtype
    log_coef, log_val, h0 = log_coef.double(), log_val.double(), h0.double()
    a_star = torch.cumsum(log_coef, dim=1)                                                # (B, T, D)
    h = torch.exp(a_star) * h0[:, None] + torch.exp(a_star + torch.logcumsumexp(log_val - a_star, dim=1))
    return h.to(dtype)


def mingru_ref(log_coef, log_val, h0):
    """The sequential loop of `mingru_scan` (tests)."""
    h, out = h0, []
    for t in range(log_coef.shape[1]):
        h = torch.exp(log_coef[:, t]) * h + torch.exp(log_val[:, t])
        out.append(h)
    return torch.stack(out, 1)


class MinGRUArbiter(nn.Module):
    """minGRU arbiter (Feng et al. 2024 minGRU, as the seeds' last phase): RMSNorm on both inputs,
    [u; z'] = W [RMSNorm(a); RMSNorm(m)] with W (2D, 2C) N(0, 0.02), no bias, D = int(1.5 C) (the seeds'
    expansion 1.5); z = sigmoid(z'); h_t = (1 - z_t) h_{t-1} + z_t g(u_t); head Linear(D, 2) zero, no bias.
    Fused from the raw (un-normalised) branch outputs. Parameters 2C + 4CD + 2D (98,944 at C = 128)."""
    stateful = True

    def __init__(self, dim: int, expansion: float = 1.5, eps: float = 1e-6):
        super().__init__()
        self.dim, self.inner = dim, int(dim * expansion)
        self.norm_a = RMSNorm(dim, eps)
        self.norm_m = RMSNorm(dim, eps)
        self.proj = nn.Linear(2 * dim, 2 * self.inner, bias=False)
        nn.init.normal_(self.proj.weight, 0.0, 0.02)
        self.head = _zero_head(self.inner, bias=False)
        self.forced_gate: float | None = None

    def log_terms(self, a, m):
        """(log(1 - z), log(z g(u))), each (B, T, D) in fp32 at least."""
        x = torch.cat([self.norm_a(a), self.norm_m(m)], dim=-1)                           # (B, T, 2C)
        u, zl = self.proj(x).to(_compute_dtype(a)).chunk(2, dim=-1)                       # (B, T, D) each
        return -F.softplus(zl), -F.softplus(-zl) + log_g(u)

    def forward(self, a, m, state: dict | None = None):
        """a, m (B, T, C); state {"arbiter_h": (B, D)} or None. Returns fused, w_a (B, T, 1), state."""
        log_coef, log_val = self.log_terms(a, m)
        h0 = log_coef.new_zeros(a.shape[0], self.inner) if state is None else state["arbiter_h"].to(log_coef.dtype)
        h = mingru_scan(log_coef, log_val, h0)                                            # (B, T, D)
        fused, w_a = _weigh(self.head, h.to(self.head.weight.dtype), a, m, self.forced_gate)
        return fused, w_a, {"arbiter_h": h[:, -1]}


# ---------------------------------------------------------------------------------------- linear recurrence
class LinearRecurrenceArbiter(nn.Module):
    """Linear-recurrence arbiter (the seeds' last-phase "LinearRecurrenceArbiter"): x = [a; m] (2C),
    q_t = sigmoid(w . x_t + b) (one gate per token, w N(0, 0.02), b 0), context c_t = (S_0 + sum_{s<=t} q_s x_s)
    / (G_0 + sum_{s<=t} q_s + 1e-6), a gated running average of the branch outputs since the state's start;
    head Linear(2C, 2) zero (weight and bias). Parameters 2C + 1 + 4C + 2 = 6C + 3."""
    stateful = True
    eps = 1e-6

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.gate = nn.Linear(2 * dim, 1, bias=True)
        with torch.no_grad():
            nn.init.normal_(self.gate.weight, 0.0, 0.02)
            self.gate.bias.zero_()
        self.head = _zero_head(2 * dim)
        self.forced_gate: float | None = None

    def forward(self, a, m, state: dict | None = None):
        """a, m (B, T, C); state {"arbiter_sum": (B, 2C), "arbiter_norm": (B, 1)} or None (zeros)."""
        cd = _compute_dtype(a)
        x = torch.cat([a, m], dim=-1)                                                     # (B, T, 2C)
        q = torch.sigmoid(self.gate(x)).to(cd)                                            # (B, T, 1)
        s = torch.cumsum(q * x.to(cd), dim=1)                                             # (B, T, 2C)
        g = torch.cumsum(q, dim=1)                                                        # (B, T, 1)
        if state is not None:
            s = s + state["arbiter_sum"].to(cd)[:, None]
            g = g + state["arbiter_norm"].to(cd)[:, None]
        ctx = s / (g + self.eps)
        fused, w_a = _weigh(self.head, ctx.to(self.head.weight.dtype), a, m, self.forced_gate)
        return fused, w_a, {"arbiter_sum": s[:, -1], "arbiter_norm": g[:, -1]}


def make_arbiter(kind: str, dim: int, norm_eps: float = 1e-6) -> nn.Module:
    if kind == "GRU":
        return GRUArbiter(dim)
    if kind == "MINGRU":
        return MinGRUArbiter(dim, eps=norm_eps)
    if kind == "LINREC":
        return LinearRecurrenceArbiter(dim)
    raise ValueError(f"arbiter: unknown kind {kind!r}; valid: {', '.join(ARBITER_KINDS)}")
