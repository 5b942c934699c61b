"""Mamba-2 mixer with mamba_ssm.Mamba2's parameter names, shapes and initialisation, plus carried state.

    layer = Mamba2(d_model=128, d_state=64)          # headdim 64, expand 2 -> 4 heads
    y = layer(x)                                      # x, y: (B, T, d_model)
    y, st = layer(x, return_state=True)               # st: {"mamba_conv_state", "mamba_ssm_state"}
    y2, st = layer(x2, state=st, return_state=True)   # continues exactly where x stopped

Parameters (G = ngroups, N = d_state, P = headdim, H = d_inner / P, conv_dim = d_inner + 2GN), laid out like
mamba_ssm 2.x so a state_dict loads either way:
    in_proj.weight (2*d_inner + 2GN + H, d_model)   output split [z | x | B | C | dt]
    conv1d.weight (conv_dim, 1, d_conv), conv1d.bias (conv_dim)   depthwise causal conv over xBC, then SiLU
    dt_bias (H), A_log (H), D (H)                    no weight decay (`_no_weight_decay = True`)
    norm.weight (d_inner)                            gated RMSNorm: rmsnorm(y * silu(z)) * weight, eps 1e-5
    out_proj.weight (d_model, d_inner)
Only mamba_ssm's defaults are supported (d_ssm = d_inner, rmsnorm, norm_before_gate False, D per head).

Three SSD paths with the same maths (tested against each other and, on a GPU, against mamba_ssm.Mamba2).
`backend` "triton" / "torch" / "wkv6" forces one; "auto" (default) takes the fastest measured path that applies:
"wkv6" on CUDA where its limits hold, else "triton" on CUDA with mamba_ssm importable, else "torch" (the CPU
default). `ssd_path(u)` says which one a call takes; a CUDA call that cannot take "wkv6" logs it once.
  * "wkv6": the scan through our RWKV-6 kernel `kernels.wkv6` on CPU or CUDA (mapping in `ssd_wkv6`); 3.2x faster
    than the Triton SSD forward+backward alone at the 5m shape on an H100, and the fastest whole training step
    measured (BENCHMARKS.md); traceable by torch.compile. Needs d_state == headdim (the kernel's K = V;
    checked at construction when forced), on CUDA also d_state in kernels.build.HEAD_SIZES_CUDA (32, 64, 128)
    and fp32 or bf16. Under CUDA autocast the kernel gets bf16 r/k/v with fp32 decays; on CPU everything is
    fp32 (fp64 for fp64 modules).
  * "triton": CUDA with mamba_ssm importable: mamba_ssm's Triton `mamba_chunk_scan_combined`;
  * "torch": `models.ssd.ssd_chunked`, a chunked pure-PyTorch SSD.
The depthwise causal conv + SiLU, `conv_impl` "auto" (default), "triton" or "torch"; `conv_path(x, conv_state)`
says which one a call takes. Every path computes the same maths in fp32 (tested against each other):
  * "triton": `kernels.conv.causal_conv1d_silu`, our Triton kernels (CUDA; fp32/fp16/bf16; d_conv <= 8). A custom
    op, so torch.compile traces it without a graph break.
  * "causal_conv1d": the causal_conv1d package's CUDA kernel (importable, CUDA, fp32/fp16/bf16, d_conv 2..4). It
    gets xBC in a layout it accepts (`causal_conv1d_layout`): channel-last copy when conv_dim % 8 == 0, else
    channel-first; a strided view into the in_proj output would be refused for most widths.
  * "torch": W shifted multiply-adds in PyTorch; the only path for a carried conv state (chunked evaluation,
    decoding) and for fp64.
"auto" takes "triton" under torch.compile on CUDA (BENCHMARKS.md: faster than the PyTorch conv Inductor fuses),
"causal_conv1d" in eager CUDA calls, and "torch" elsewhere; "triton" forces the Triton kernels wherever they
apply. Where the Triton or causal_conv1d kernels cannot run on a CUDA call (device, width, package missing)
the layer falls back to "torch" and says so once in the log.
State: conv state = the last d_conv *pre-conv* xBC columns (B, conv_dim, d_conv), as mamba_ssm's inference
cache; SSM state (B, H, P, N) fp32.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels import conv as kconv
from kernels.build import HEAD_SIZES_CUDA

from .ssd import ssd_chunked

__all__ = ["Mamba2", "RMSNormGated", "ssd_wkv6", "BACKENDS", "CONV_IMPLS", "causal_conv1d_layout"]

BACKENDS = ("auto", "torch", "triton", "wkv6")   # "auto": the fastest that applies (module docstring)
CONV_IMPLS = ("auto", "triton", "torch")         # "auto": the fastest that applies (module docstring)
# Devices causal_conv1d_fn runs on (its kernels are CUDA only); tests widen this to drive a CPU stand-in.
CAUSAL_CONV1D_DEVICES = ("cuda",)
CAUSAL_CONV1D_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The pure-PyTorch SSD materialises (B, H, T, chunk) decay matrices: a 64-long chunk keeps that small on CPU.
# The result does not depend on the chunk length (up to rounding), so this is a memory choice only.
TORCH_SSD_CHUNK = 64   # (short calls, e.g. one-token decoding, use chunk = T: no padding)


log = logging.getLogger(__name__)
_LOGGED: set[str] = set()   # fallbacks already logged in this process (each once), models.arbiter's too


def log_once(msg: str, logger: logging.Logger = log) -> None:
    """A fallback a layer takes, logged the first time this process takes it (layers resolve paths per call)."""
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        logger.warning(msg)


_OPS: tuple | None = None   # filled once, eagerly (Mamba2.__init__), so torch.compile reads a constant


def _mamba_ssm_ops():
    """mamba_ssm's Triton SSD and causal_conv1d's conv, or None for each one that cannot be imported."""
    global _OPS
    if _OPS is None:
        _OPS = _import_mamba_ssm_ops()
    return _OPS


def _import_mamba_ssm_ops():
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError:
        mamba_chunk_scan_combined = None
    try:
        from causal_conv1d import causal_conv1d_fn
    except ImportError:
        causal_conv1d_fn = None
    return mamba_chunk_scan_combined, causal_conv1d_fn


def causal_conv1d_layout(xBC: torch.Tensor) -> torch.Tensor:
    """xBC (B, T, D) as the (B, D, T) input causal_conv1d_fn accepts, for any D, T and B.

    The kernel takes channel-first (stride(2) == 1) or channel-last (stride(1) == 1 and stride(2) > 1)
    tensors, and channel-last ones only when D and the strides of dims 0 and 2 are multiples of 8. xBC is a
    column slice of the in_proj output, so its row stride is d_in_proj (644 at the 5m preset): the plain
    transposed view is refused. A dense copy fixes that: channel-last when D % 8 == 0 (strides (T*D, 1, D),
    and the output comes back channel-last, i.e. contiguous once transposed), channel-first otherwise
    (strides (D*T, T, 1)). The strides are set explicitly: `contiguous()` leaves the strides of size-1
    dimensions as they were (a one-token or one-row slice keeps d_in_proj), which the kernel reads.
    """
    B, T, D = xBC.shape
    if D % 8 == 0:
        return xBC.contiguous().as_strided((B, T, D), (T * D, D, 1)).transpose(1, 2)   # (B, D, T), (T*D, 1, D)
    return xBC.transpose(1, 2).contiguous().as_strided((B, D, T), (D * T, T, 1))        # (B, D, T), (D*T, T, 1)


def ssd_wkv6(x, dt, A_log, B, C, D=None, initial_state=None, impl="auto"):
    """The SSD scan of `models.ssd.ssd_chunked` computed by the RWKV-6 kernel `kernels.wkv6`.

    x:  (B, T, H, P)     inputs per head
    dt: (B, T, H)        step sizes, already softplus'ed (and clamped), fp32 (fp64 for fp64 tests), >= 0
    A_log: (H,)          A = -exp(A_log) < 0
    B, C: (B, T, G, N)   head h uses group h // (H // G); N must equal P (the kernel's K = V)
    D:  (H,) or None     skip connection
    initial_state: (B, H, P, N) or None (zeros)
    impl: the layer's wkv6_impl (kernels.pick_impl: "chunked" where the chunked kernels apply)
    Returns y (B, T, H, P) in x.dtype and final_state (B, H, P, N) in fp32 (fp64 for fp64 inputs).

    Mapping (state S = h^T, key index n = the SSD state index, value index p = the head channel):
        h_t = a_t h_{t-1} + (dt_t x_t) B_t^T,  a_t = exp(dt_t A)    y_t = h_t C_t + D x_t
        k_t = B_t,  v_t = dt_t x_t,  w_t = log(dt_t) + A_log  (so exp(-exp(w_t)) = exp(dt_t A) = a_t),
        one per head: w is [B, T, H, 1] (kernels.wkv6 reads it as is on the chunked kernels)
        r_t = a_t C_t,  u = 0:  wkv6 gives r_t S_{t-1} = C_t^T (a_t h_{t-1}); the current token's term
        C_t^T B_t dt_t x_t is added here, since wkv6 reads S_{t-1} (not S_t) and u is constant over t.
    Dtypes: on CPU r, k, v, w are all fp32 (fp64 for fp64 x); on CUDA r, k, v are bf16 when x is bf16
    (autocast) and fp32 otherwise, w and the carried state always fp32.
    """
    H = x.shape[2]
    G, N = B.shape[-2], B.shape[-1]
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32                 # compute dtype
    kd = torch.bfloat16 if (x.is_cuda and x.dtype == torch.bfloat16) else cd         # kernel r/k/v dtype
    with torch.autocast(device_type=x.device.type, enabled=False):
        xc, dt, A_log = x.to(cd), dt.to(cd), A_log.to(cd)
        Bc, Cc = B.to(cd), C.to(cd)                                                    # (B, T, G, N)
        Bh = Bc.repeat_interleave(H // G, dim=2)                                       # (B, T, H, N)
        Ch = Cc.repeat_interleave(H // G, dim=2)                                       # (B, T, H, N)
        a = torch.exp(dt * -torch.exp(A_log))                                          # (B, T, H) in (0, 1]
        r = Ch * a[..., None]                                                          # (B, T, H, N)
        v = xc * dt[..., None]                                                         # (B, T, H, P)
        # log(dt): dt = 0 (softplus underflow, a zero dt_limit) would give w = -inf and NaN gradients, so dt
        # is floored at f = sqrt(tiny) (1e-154 fp64, 1e-19 fp32). Below f the decay exp(-dt |A|) is 1 to the
        # dtype's rounding either way, so the forward is unchanged. The floor passes the gradient straight
        # through: d decay/d dt = (d decay/d w) / f = -|A| decay, the exact derivative even at dt = 0 (a plain
        # clamp would drop it), and f keeps exp(w) = f |A| far from underflow, so d decay/d w keeps its digits.
        floor = torch.finfo(cd).tiny ** 0.5
        dt_f = dt + (dt.clamp_min(floor) - dt).detach()                                # value max(dt, f), grad 1
        w = torch.log(dt_f) + A_log                                                    # (B, T, H)
        w = w[..., None]                                                               # (B, T, H, 1): one per head
        u = torch.zeros(H, N, dtype=cd, device=x.device)                               # no current-token bonus
        h0 = None if initial_state is None else initial_state.transpose(-1, -2)         # (B, H, N, P)
        rk = r.to(kd)
        y, S = kernels.wkv6(rk, Bh.to(kd), v.to(kd), w, u, initial_state=h0, output_final_state=True,
                            impl=kernels.pick_impl(impl, rk))                          # (B,T,H,P), (B,H,N,P)
        cb = (Cc * Bc).sum(-1).repeat_interleave(H // G, dim=2)                        # C_t . B_t per head
        y = y.to(cd) + (cb * dt)[..., None] * xc                                       # current token
        if D is not None:
            y = y + D.to(cd)[:, None] * xc
    return y.to(x.dtype), S.transpose(-1, -2).contiguous()                            # (B,T,H,P), (B,H,P,N)


def wkv6_backend_problem(d_state: int, headdim: int, device_type: str | None = None,
                         dtype: torch.dtype | None = None) -> str | None:
    """Why backend "wkv6" cannot run these sizes (device_type/dtype: also that device's limits), or None."""
    if d_state != headdim:
        return (f"backend 'wkv6' runs the SSD through kernels.wkv6, whose state is [K, V] = [d_state, headdim] "
                f"with K == V; got d_state {d_state} != headdim {headdim}. Set d_state == headdim "
                f"(ModelConfig: d_state == mamba_headdim) or use backend 'auto' / 'torch' / 'triton'")
    if device_type == "cuda":
        if d_state not in HEAD_SIZES_CUDA:
            return (f"backend 'wkv6' on CUDA needs d_state == headdim in {HEAD_SIZES_CUDA} (the CUDA kernel's "
                    f"head sizes), got {d_state}; use one of those sizes or backend 'auto' / 'torch' / 'triton'")
        if dtype == torch.float64:
            return "backend 'wkv6' on CUDA runs fp32 or bf16 (autocast), not float64; use the CPU for fp64"
    return None


class RMSNormGated(nn.Module):
    """mamba_ssm.ops.triton.layernorm_gated.RMSNorm (norm_before_gate=False): rmsnorm_g(x * silu(z)) * weight.

    Normalised per group of `group_size` channels, computed in fp32. Holds `weight` only (its bias is None).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None):
        super().__init__()
        self.eps = eps
        self.group_size = hidden_size if group_size is None else group_size
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.register_parameter("bias", None)

    def forward(self, x, z=None):
        dtype = x.dtype
        x = x.float() if x.dtype != torch.float64 else x
        if z is not None:
            x = x * F.silu(z.to(x.dtype))
        xg = x.unflatten(-1, (-1, self.group_size))                                      # (..., G, d/G)
        xg = xg * torch.rsqrt(xg.square().mean(dim=-1, keepdim=True) + self.eps)
        return (xg.flatten(-2) * self.weight.to(x.dtype)).to(dtype)


class Mamba2(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        chunk_size: int = 256,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, float("inf")),
        bias: bool = False,
        conv_bias: bool = True,
        conv_init: float | None = None,
        layer_idx: int | None = None,
        backend: str = "auto",
        wkv6_impl: str = "auto",
        conv_impl: str = "auto",
    ):
        super().__init__()
        for field, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand),
                             ("headdim", headdim), ("ngroups", ngroups), ("chunk_size", chunk_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Mamba2: {field} must be a positive int, got {value!r}")
        d_inner = expand * d_model
        if d_inner % headdim != 0:
            raise ValueError(f"Mamba2: headdim ({headdim}) must divide d_inner = expand * d_model = {d_inner}")
        nheads = d_inner // headdim
        if nheads % ngroups != 0:
            raise ValueError(f"Mamba2: ngroups ({ngroups}) must divide the number of heads ({nheads})")
        if not (0 < A_init_range[0] <= A_init_range[1]):
            raise ValueError(f"Mamba2: A_init_range must satisfy 0 < lo <= hi, got {A_init_range}")
        if backend not in BACKENDS:
            raise ValueError(f"Mamba2: backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
        if backend == "wkv6" and (problem := wkv6_backend_problem(d_state, headdim)):
            raise ValueError(f"Mamba2: {problem}")
        kernels.check_impl(wkv6_impl, "Mamba2: wkv6_impl")
        if conv_impl not in CONV_IMPLS:
            raise ValueError(f"Mamba2: conv_impl must be one of {', '.join(map(repr, CONV_IMPLS))}, got {conv_impl!r}")
        self.backend = backend   # "auto": see the module docstring
        self.conv_impl = conv_impl
        self.wkv6_impl = wkv6_impl  # backend "wkv6" only: kernels.pick_impl's choice
        _mamba_ssm_ops()         # probe the optional imports now, outside any traced forward
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.headdim, self.ngroups, self.chunk_size = headdim, ngroups, chunk_size
        self.d_inner, self.d_ssm, self.nheads = d_inner, d_inner, nheads
        self.dt_limit = tuple(dt_limit)
        self.layer_idx = layer_idx
        self.conv_dim = d_inner + 2 * ngroups * d_state

        # Parameters in mamba_ssm's order and with its initialisation (nn.Linear / nn.Conv1d defaults included).
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * ngroups * d_state + nheads, bias=bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel_size=d_conv, groups=self.conv_dim,
                                padding=d_conv - 1, bias=conv_bias)
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)
        # dt ~ logUniform[dt_min, dt_max] floored, stored as its softplus inverse so softplus(dt_bias) = dt.
        dt = torch.exp(torch.rand(nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = torch.clamp(dt, min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.dt_bias._no_weight_decay = True
        self.A_log = nn.Parameter(torch.log(torch.empty(nheads).uniform_(*A_init_range)))   # A = -exp(A_log)
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(nheads))
        self.D._no_weight_decay = True
        self.norm = RMSNormGated(d_inner, eps=1e-5, group_size=d_inner // ngroups)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)

    # ------------------------------------------------------------------------------------------------ state
    def init_state(self, batch_size: int, device=None) -> dict:
        device = self.in_proj.weight.device if device is None else device
        return {
            "mamba_conv_state": torch.zeros(batch_size, self.conv_dim, self.d_conv, device=device,
                                            dtype=self.conv1d.weight.dtype),
            "mamba_ssm_state": torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device,
                                           dtype=torch.float32),
        }

    def ssd_path(self, u: torch.Tensor) -> str:
        """The SSD path this call takes: "triton", "torch" or "wkv6" (`backend` may be reassigned, so checked here)."""
        if self.backend not in BACKENDS:
            raise ValueError(f"Mamba2: backend must be one of {', '.join(map(repr, BACKENDS))}, "
                             f"got {self.backend!r}")
        if self.backend == "wkv6":
            problem = wkv6_backend_problem(self.d_state, self.headdim, u.device.type, u.dtype)
            if problem:
                raise ValueError(f"Mamba2: {problem}")
            return "wkv6"
        available = u.is_cuda and _mamba_ssm_ops()[0] is not None
        if self.backend == "triton" and not available:
            raise RuntimeError("Mamba2(backend='triton') needs CUDA inputs and an importable mamba_ssm "
                               "(pip install -e '.[cuda]'); use backend='auto' or 'torch' otherwise")
        if self.backend == "auto" and u.is_cuda:
            problem = wkv6_backend_problem(self.d_state, self.headdim, "cuda", u.dtype)
            if problem is None:
                return "wkv6"
            fallback = "triton" if available else "torch"
            log_once(f"Mamba2 backend 'auto' on CUDA: the fastest SSD path (wkv6) does not apply ({problem}); "
                      f"using the {fallback} SSD (same maths, tested against it)")
            return fallback
        return "triton" if available and self.backend != "torch" else "torch"

    def conv_path(self, xBC: torch.Tensor, conv_state: torch.Tensor | None = None, compiled: bool | None = None) -> str:
        """The depthwise-conv path this call takes: "triton", "causal_conv1d" or "torch" (module docstring).
        `compiled`: whether the call is traced by torch.compile (default: whether this call is being traced)."""
        traced = torch.compiler.is_compiling() if compiled is None else compiled
        if self.conv_impl not in CONV_IMPLS:
            raise ValueError(f"Mamba2: conv_impl must be one of {', '.join(map(repr, CONV_IMPLS))}, "
                             f"got {self.conv_impl!r}")
        if self.conv_impl == "torch" or conv_state is not None or xBC.dtype not in CAUSAL_CONV1D_DTYPES:
            return "torch"   # asked for, carried conv state (chunked evaluation, decoding), or fp64
        if self.conv_impl == "triton" or traced:
            # the parameters as they would be on xBC's device (describe_paths asks about CUDA for a CPU model)
            bias = None if self.conv1d.bias is None else self.conv1d.bias.to(xBC.device)
            problem = kconv.problem(xBC, self.conv1d.weight[:, 0, :].to(xBC.device), bias)
            if problem is None:
                return "triton"
            # said once from an eager call (describe_paths, which training runs before compiling, is one);
            # Dynamo cannot trace a logger
            if (self.conv_impl == "triton" or xBC.is_cuda) and not torch.compiler.is_compiling():
                log_once(f"Mamba2 conv_impl {self.conv_impl!r}: the Triton conv does not apply here ({problem}); "
                         "the depthwise conv runs in PyTorch (same maths, tested against it)")
            return "torch"
        if xBC.device.type not in CAUSAL_CONV1D_DEVICES:
            return "torch"
        if _mamba_ssm_ops()[1] is None:
            log_once("Mamba2 conv_impl 'auto': causal_conv1d is not importable, so the depthwise conv runs in "
                      "PyTorch (same maths, tested against it); pip install -e '.[cuda]' for the CUDA kernel")
            return "torch"
        if not 2 <= self.d_conv <= 4:
            return "torch"   # widths the kernel lacks
        return "causal_conv1d"

    # ---------------------------------------------------------------------------------------------- forward
    def _conv(self, xBC, conv_state):
        """Depthwise causal conv + SiLU over (B, T, conv_dim), continuing from conv_state (B, conv_dim, d_conv)."""
        W = self.d_conv
        if conv_state is None:
            prev = xBC.new_zeros(xBC.shape[0], W - 1, self.conv_dim)
        else:
            prev = conv_state[..., 1:].transpose(1, 2).to(xBC.dtype)   # the last W-1 inputs before this chunk
        new_conv_state = torch.cat([prev, xBC[:, -W:]], dim=-2)[:, -W:].transpose(1, 2)  # (B, conv_dim, W)
        path = self.conv_path(xBC, conv_state)
        if path == "triton":
            out = kconv.causal_conv1d_silu(xBC, self.conv1d.weight[:, 0, :], self.conv1d.bias)  # (B, T, conv_dim)
        elif path == "causal_conv1d":
            causal_conv1d_fn = _mamba_ssm_ops()[1]
            out = causal_conv1d_fn(causal_conv1d_layout(xBC), self.conv1d.weight.squeeze(1), bias=self.conv1d.bias,
                                   activation="silu").transpose(1, 2)                      # (B, T, conv_dim)
        else:
            # nn.Conv1d is a cross-correlation: out[t] = b + sum_j w[:, j] * x[t + j - (W-1)]. W shifted
            # multiply-adds in (B, T, C) layout are much faster on CPU than a depthwise conv (no transposes).
            # Accumulate in fp32 under AMP, as causal_conv1d does.
            T, cd = xBC.shape[1], (torch.float64 if xBC.dtype == torch.float64 else torch.float32)
            full = torch.cat([prev, xBC], dim=-2)                                         # (B, W-1+T, conv_dim)
            full_c, w = full.to(cd), self.conv1d.weight[:, 0, :].to(cd)                   # w: (conv_dim, W)
            out = full_c[:, 0:T] * w[:, 0]
            for j in range(1, W):
                out = out + full_c[:, j:j + T] * w[:, j]
            if self.conv1d.bias is not None:
                out = out + self.conv1d.bias.to(cd)
            out = F.silu(out).to(xBC.dtype)
        return out, new_conv_state

    def forward(self, u, state: dict | None = None, return_state: bool = False):
        """u: (B, T, d_model) -> (B, T, d_model); with return_state also the new state dict (see module doc)."""
        Bsz, T, _ = u.shape
        conv_state = None if state is None else state["mamba_conv_state"]
        ssm_state = None if state is None else state["mamba_ssm_state"]
        zxbcdt = self.in_proj(u)                                                          # (B, T, d_in_proj)
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xBC, new_conv_state = self._conv(xBC, conv_state)
        x, Bm, Cm = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        x = x.unflatten(-1, (self.nheads, self.headdim))                                  # (B, T, H, P)
        Bm = Bm.unflatten(-1, (self.ngroups, self.d_state))                               # (B, T, G, N)
        Cm = Cm.unflatten(-1, (self.ngroups, self.d_state))
        # fp32 as mamba_ssm ("if the model is loaded in fp16, without .float() A might be -inf"); fp64 stays fp64
        A = -torch.exp(self.A_log if self.A_log.dtype == torch.float64 else self.A_log.float())   # (H,)

        path = self.ssd_path(u)
        if path == "triton":
            mamba_chunk_scan_combined, _ = _mamba_ssm_ops()
            kw = {} if self.dt_limit == (0.0, float("inf")) else {"dt_limit": self.dt_limit}
            y, new_ssm_state = mamba_chunk_scan_combined(
                x, dt, A, Bm, Cm, chunk_size=self.chunk_size, D=self.D, z=None, dt_bias=self.dt_bias,
                dt_softplus=True, initial_states=None if ssm_state is None else ssm_state.float(),
                return_final_states=True, **kw)
        else:
            # dt in fp32 (fp64 for fp64 tests) as the Triton kernel does: softplus (identity above 20), clamp.
            cd = torch.float64 if dt.dtype == torch.float64 else torch.float32
            dtc = F.softplus(dt.to(cd) + self.dt_bias.to(cd), threshold=20.0)              # (B, T, H)
            if self.dt_limit != (0.0, float("inf")):
                dtc = dtc.clamp(self.dt_limit[0], self.dt_limit[1])
            if path == "wkv6":
                y, new_ssm_state = ssd_wkv6(x, dtc, self.A_log, Bm, Cm, D=self.D, initial_state=ssm_state,
                                            impl=self.wkv6_impl)
            else:
                with torch.autocast(device_type=u.device.type, enabled=False):   # keep the scan in fp32 under AMP
                    y, new_ssm_state = ssd_chunked(x, dtc, A, Bm, Cm, D=self.D, initial_state=ssm_state,
                                                   chunk_size=min(self.chunk_size, TORCH_SSD_CHUNK, T))
        y = self.norm(y.flatten(-2), z)                                                   # (B, T, d_inner)
        out = self.out_proj(y)
        if not return_state:
            return out
        ssm_dtype = torch.float64 if new_ssm_state.dtype == torch.float64 else torch.float32
        return out, {"mamba_conv_state": new_conv_state, "mamba_ssm_state": new_ssm_state.to(ssm_dtype)}
