"""Causal depthwise conv1d + SiLU over channel-last sequences, forward and backward as Triton kernels.

    from kernels.conv import causal_conv1d_silu, causal_conv1d_silu_ref
    y = causal_conv1d_silu(x, weight, bias)     # x (B, T, D), weight (D, W), bias (D,) or None -> y (B, T, D)

    y[b, t, d] = silu(p[b, t, d]),  p[b, t, d] = sum_{j<W} weight[d, j] x[b, t - (W-1) + j, d] + bias[d]

with x = 0 before t = 0: nn.Conv1d(D, D, W, groups=D, padding=W-1) cut to its first T outputs, then SiLU.
This is Mamba-2's conv over xBC (`models.mamba2`), which reads x as a column slice of the in_proj output:
any batch and time strides are taken as they are, only the channels must be contiguous.

Numerics: p accumulates in fp32 in the order j = 0 .. W-1, then the bias, as the PyTorch conv of
models.mamba2 does; y is stored in x's dtype. The backward recomputes p (nothing but x is saved):
    dp = dy silu'(p),  silu'(p) = s (1 + p (1 - s)),  s = sigmoid(p)
    dx[t] = sum_j weight[:, j] dp[t + (W-1) - j],   dweight[:, j] = sum_{b,t} dp[t] x[t - (W-1) + j],
    dbias = sum_{b,t} dp
dp never goes to memory: the backward recomputes it at the W - 1 steps past each tile that dx needs. The weight
and bias gradients are summed in fp32 per program (a run of rows), then over the programs by torch
(deterministic: no atomics).

Kernel design: each program owns BT steps x BD channels of one sequence (the backward: a run of such tiles).
The shifted reads of x and dy overlap and come from cache, so each kernel moves about its inputs and outputs
once: forward x and y, backward x, dy and dx.

Supported: B, T >= 1, any D, 1 <= W <= MAX_WIDTH; x fp32, bf16 or fp16 on CUDA; weight and bias any float
dtype (computed in fp32). Exposed as torch.library custom ops (namespace "gt_kernels") with fake
implementations and autograd, so torch.compile traces a model that calls them without a graph break.
`causal_conv1d_silu_ref` is the same map through F.conv1d, in any dtype (fp64 in the tests).
Without a GPU the kernels run in Triton's interpreter inside `kernels.triton_interp.cpu_interpreter()` (tests).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from . import triton_interp

try:
    import triton
    import triton.language as tl
except ImportError:          # CPU-only installs: the reference works, causal_conv1d_silu says what is missing
    triton = None
    tl = types.SimpleNamespace(constexpr=None)

__all__ = ["causal_conv1d_silu", "causal_conv1d_silu_ref", "MAX_WIDTH"]

MAX_WIDTH = 8         # the backward kernel has one gradient accumulator per tap, acc0 .. acc7
MAX_BATCH = 65535   # the batch runs on grid axis z, which CUDA bounds at 65535
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Launch configuration, fixed (no autotune). Forward: tiles of BT steps x BD channels, 32 x 128 at 8 warps (ptxas,
# sm_90, W = 4: 62 registers a thread). Backward: each program walks TILES = 16 tiles of 8 x 128 (128 steps) at
# 8 warps, 4 elements a thread per (BT, BD) value; 128 registers, so two blocks share an SM. Of six configurations
# timed at d = 512 on an H200 this was the fastest (BENCHMARKS.md): the time per tile falls with the run's length
# (the final reductions are paid once a run) and rises with the registers of a 16-step tile (190, one block per
# SM). The weight-gradient partials are (B * T / (BT TILES)) x (W + 1) x D fp32.
_BT, _BD, _WARPS = 32, 128, 8
_BWD_BT, _BWD_TILES, _BWD_WARPS = 8, 16, 8


def causal_conv1d_silu_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The definition through F.conv1d, computed in x's dtype (module docstring). x (B, T, D), weight (D, W)."""
    T, W = x.shape[1], weight.shape[1]
    p = F.conv1d(x.transpose(1, 2), weight.to(x.dtype)[:, None, :], None if bias is None else bias.to(x.dtype),
                 padding=W - 1, groups=x.shape[2])[..., :T]
    return F.silu(p).transpose(1, 2)


# --------------------------------------------------------------------------------------------- the kernels
def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


@_jit
def _add(a, b):
    # tl.sum's combine, written here: tl.sum is itself a @triton.jit function, which the interpreter hook
    # (kernels/triton_interp.py) cannot call
    return a + b


@_jit
def _preact(x_ptr, w_ptr, b_ptr, t, d, dm, T, D, sxt,
            HAS_BIAS: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """p for steps t (BT,) and channels d (BD,) of one sequence (x_ptr at its start), fp32 (BT, BD)."""
    acc = tl.full([BT, BD], 0.0, tl.float32)
    for j in tl.static_range(W):
        ts = t - (W - 1) + j
        m = ((ts >= 0) & (ts < T))[:, None] & dm[None, :]
        xv = tl.load(x_ptr + ts.to(tl.int64)[:, None] * sxt + d[None, :], mask=m, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + j * D + d, mask=dm, other=0.0)
        acc += xv * wv[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + d, mask=dm, other=0.0)[None, :]
    return acc


@_jit
def _fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, T, D, sxb, sxt,
                HAS_BIAS: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    b = tl.program_id(2).to(tl.int64)
    dm = d < D
    p = _preact(x_ptr + b * sxb, w_ptr, b_ptr, t, d, dm, T, D, sxt, HAS_BIAS, W, BT, BD)
    y = p / (1.0 + tl.exp(-p))
    rows = b * T + t.to(tl.int64)
    tl.store(y_ptr + rows[:, None] * D + d[None, :], y.to(y_ptr.dtype.element_ty), mask=(t < T)[:, None] & dm[None, :])


@_jit
def _dp(xb, w_ptr, b_ptr, dyb, t, d, dm, T, D, sxt,
        HAS_BIAS: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """dp = dy silu'(p) at steps t (BT,) and channels d (BD,) of one sequence, fp32 (BT, BD); 0 where t >= T."""
    p = _preact(xb, w_ptr, b_ptr, t, d, dm, T, D, sxt, HAS_BIAS, W, BT, BD)
    m = (t < T)[:, None] & dm[None, :]
    dy = tl.load(dyb + t.to(tl.int64)[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-p))
    return dy * s * (p * (1.0 - s) + 1.0)


@_jit
def _shifted(xb, t, j, d, dm, T, sxt, W: tl.constexpr):
    """x[t - (W-1) + j] for steps t and channels d, fp32 (BT, BD), 0 outside the sequence."""
    ts = t - (W - 1) + j
    m = ((ts >= 0) & (ts < T))[:, None] & dm[None, :]
    return tl.load(xb + ts.to(tl.int64)[:, None] * sxt + d[None, :], mask=m, other=0.0).to(tl.float32)


@_jit
def _bwd_kernel(x_ptr, w_ptr, b_ptr, dy_ptr, dx_ptr, part_ptr, T, D, sxb, sxt,
                HAS_BIAS: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                TILES: tl.constexpr):
    """One program: TILES tiles of BT steps x BD channels of one sequence, walked in time order.
    dx[t] = sum_j weight[:, j] dp[t + (W-1) - j], with dp at t + 1 .. t + W-1 recomputed from x and dy (the rows
    past the tile) instead of read back. The weight and bias gradients of the program's rows accumulate
    elementwise in registers (acc_j += dp[t] x[t - (W-1) + j], accb += dp[t]; the unused ones stay 1 x 1) and are
    reduced over the rows once, into part[(b, program), :, d], part (B * programs, W + 1, D) fp32."""
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    b = tl.program_id(2).to(tl.int64)
    dm = d < D
    xb = x_ptr + b * sxb
    dyb = dy_ptr + b * T * D
    acc0 = tl.full([BT, BD], 0.0, tl.float32)
    acc1 = tl.full([BT if W > 1 else 1, BD if W > 1 else 1], 0.0, tl.float32)
    acc2 = tl.full([BT if W > 2 else 1, BD if W > 2 else 1], 0.0, tl.float32)
    acc3 = tl.full([BT if W > 3 else 1, BD if W > 3 else 1], 0.0, tl.float32)
    acc4 = tl.full([BT if W > 4 else 1, BD if W > 4 else 1], 0.0, tl.float32)
    acc5 = tl.full([BT if W > 5 else 1, BD if W > 5 else 1], 0.0, tl.float32)
    acc6 = tl.full([BT if W > 6 else 1, BD if W > 6 else 1], 0.0, tl.float32)
    acc7 = tl.full([BT if W > 7 else 1, BD if W > 7 else 1], 0.0, tl.float32)
    accb = tl.full([BT, BD], 0.0, tl.float32)
    for i in range(TILES):
        t = (tl.program_id(0) * TILES + i) * BT + tl.arange(0, BT)
        dp = _dp(xb, w_ptr, b_ptr, dyb, t, d, dm, T, D, sxt, HAS_BIAS, W, BT, BD)
        dx = dp * tl.load(w_ptr + (W - 1) * D + d, mask=dm, other=0.0)[None, :]
        for s in tl.static_range(1, W):
            dps = _dp(xb, w_ptr, b_ptr, dyb, t + s, d, dm, T, D, sxt, HAS_BIAS, W, BT, BD)
            dx += dps * tl.load(w_ptr + (W - 1 - s) * D + d, mask=dm, other=0.0)[None, :]
        tl.store(dx_ptr + (b * T + t.to(tl.int64))[:, None] * D + d[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=(t < T)[:, None] & dm[None, :])
        acc0 += dp * _shifted(xb, t, 0, d, dm, T, sxt, W)
        if W > 1:
            acc1 += dp * _shifted(xb, t, 1, d, dm, T, sxt, W)
        if W > 2:
            acc2 += dp * _shifted(xb, t, 2, d, dm, T, sxt, W)
        if W > 3:
            acc3 += dp * _shifted(xb, t, 3, d, dm, T, sxt, W)
        if W > 4:
            acc4 += dp * _shifted(xb, t, 4, d, dm, T, sxt, W)
        if W > 5:
            acc5 += dp * _shifted(xb, t, 5, d, dm, T, sxt, W)
        if W > 6:
            acc6 += dp * _shifted(xb, t, 6, d, dm, T, sxt, W)
        if W > 7:
            acc7 += dp * _shifted(xb, t, 7, d, dm, T, sxt, W)
        accb += dp
    part = part_ptr + (b * tl.num_programs(0) + tl.program_id(0)) * (W + 1) * D
    tl.store(part + 0 * D + d, tl.reduce(acc0, 0, _add), mask=dm)
    if W > 1:
        tl.store(part + 1 * D + d, tl.reduce(acc1, 0, _add), mask=dm)
    if W > 2:
        tl.store(part + 2 * D + d, tl.reduce(acc2, 0, _add), mask=dm)
    if W > 3:
        tl.store(part + 3 * D + d, tl.reduce(acc3, 0, _add), mask=dm)
    if W > 4:
        tl.store(part + 4 * D + d, tl.reduce(acc4, 0, _add), mask=dm)
    if W > 5:
        tl.store(part + 5 * D + d, tl.reduce(acc5, 0, _add), mask=dm)
    if W > 6:
        tl.store(part + 6 * D + d, tl.reduce(acc6, 0, _add), mask=dm)
    if W > 7:
        tl.store(part + 7 * D + d, tl.reduce(acc7, 0, _add), mask=dm)
    tl.store(part + W * D + d, tl.reduce(accb, 0, _add), mask=dm)


def _grid(B, T, D):
    return (triton.cdiv(T, _BT), triton.cdiv(D, _BD), B)   # B on grid axis z: at most MAX_BATCH


def _bwd_grid(B, T, D):
    return (triton.cdiv(T, _BWD_BT * _BWD_TILES), triton.cdiv(D, _BD), B)


def _channels_contiguous(x):
    """x itself when its channels are contiguous (the kernels take any batch and time strides), else a copy.
    Inside the ops, so the layout holds whatever strides torch.compile hands them."""
    return x if x.stride(2) == 1 else x.contiguous()


# ---------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("gt_kernels::causal_conv1d_silu_fwd", mutates_args=())
def _conv_fwd(x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (B, T, D), any strides (channel-strided x is copied); w_t (W, D) and bias (D,) fp32. Returns y (B, T, D)
    contiguous."""
    x, w_t = _channels_contiguous(x), w_t.contiguous()
    bias = None if bias is None else bias.contiguous()
    B, T, D = x.shape
    y = x.new_empty(B, T, D)
    (fwd,) = triton_interp.kernels_for(globals(), x, ("_fwd_kernel",), "conv")
    with triton_interp.on_device(x):
        fwd[_grid(B, T, D)](
            x, w_t, w_t if bias is None else bias, y, T, D, x.stride(0), x.stride(1),
            HAS_BIAS=bias is not None, W=w_t.shape[0], BT=_BT, BD=_BD, num_warps=_WARPS)
    return y


@_conv_fwd.register_fake
def _(x, w_t, bias):
    return x.new_empty(x.shape)


@torch.library.custom_op("gt_kernels::causal_conv1d_silu_bwd", mutates_args=())
def _conv_bwd(x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None,
              dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x, w_t, bias as _conv_fwd's, dy (B, T, D). Returns dx (B, T, D) contiguous in x's dtype and (W + 1, D) fp32:
    the dw_t rows, then dbias."""
    x, w_t, dy = _channels_contiguous(x), w_t.contiguous(), dy.contiguous()
    bias = None if bias is None else bias.contiguous()
    B, T, D = x.shape
    W = w_t.shape[0]
    grid = _bwd_grid(B, T, D)
    part = torch.empty(B * grid[0], W + 1, D, device=x.device, dtype=torch.float32)
    dx = x.new_empty(B, T, D)
    (bwd,) = triton_interp.kernels_for(globals(), x, ("_bwd_kernel",), "conv")
    with triton_interp.on_device(x):
        bwd[grid](x, w_t, w_t if bias is None else bias, dy, dx, part, T, D, x.stride(0), x.stride(1),
                  HAS_BIAS=bias is not None, W=W, BT=_BWD_BT, BD=_BD, TILES=_BWD_TILES, num_warps=_BWD_WARPS)
    return dx, part.sum(dim=0)


@_conv_bwd.register_fake
def _(x, w_t, bias, dy):
    return x.new_empty(x.shape), x.new_empty(w_t.shape[0] + 1, x.shape[2], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, w_t, bias = inputs
    ctx.save_for_backward(x, w_t, bias)


def _backward(ctx, dy):
    x, w_t, bias = ctx.saved_tensors
    dx, dwb = _conv_bwd(x, w_t, bias, dy)
    W = w_t.shape[0]
    return dx, dwb[:W], None if bias is None else dwb[W]


_conv_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------ public
def problem(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> str | None:
    """Why `causal_conv1d_silu` cannot take these arguments (a sentence naming the argument), or None."""
    named = {"x": x, "weight": weight, **({} if bias is None else {"bias": bias})}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            return f"{name} must be a torch.Tensor, got {type(t).__name__}"
    if x.dim() != 3 or x.shape[0] < 1 or x.shape[1] < 1 or x.shape[2] < 1:
        return f"x must be (B, T, D) with B, T, D >= 1, got shape {tuple(x.shape)}"
    if x.shape[0] > MAX_BATCH:
        return f"x's batch size must be at most {MAX_BATCH} (a CUDA grid axis), got {x.shape[0]}; split the batch"
    D = x.shape[2]
    if weight.dim() != 2 or weight.shape[0] != D or not 1 <= weight.shape[1] <= MAX_WIDTH:
        return (f"weight must be (D, W) with D = {D} (x's channels) and 1 <= W <= {MAX_WIDTH}, "
                f"got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (D,):
        return f"bias must have shape ({D},), got {tuple(bias.shape)}"
    if x.dtype not in _DTYPES:
        return f"x must be float32, bfloat16 or float16, got {x.dtype}; causal_conv1d_silu_ref takes any dtype"
    for name, t in named.items():
        if not t.is_floating_point():
            return f"{name} must be a floating tensor, got {t.dtype}"
        if t.device != x.device:
            return f"all inputs must be on one device; x is on {x.device}, {name} on {t.device}"
    if triton is None:
        return "needs triton, which is not installed (CUDA builds of torch bring it)"
    if not triton_interp.runs_on(x):
        return f"x must be a CUDA tensor, got {x.device}; on CPU use causal_conv1d_silu_ref"
    return None


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu(causal depthwise conv1d(x)) (module docstring), differentiable in x, weight and bias.

    x (B, T, D) fp32 / bf16 / fp16 on CUDA, any batch and time strides; weight (D, W), 1 <= W <= MAX_WIDTH;
    bias (D,) or None. Returns y (B, T, D) contiguous in x's dtype. ValueError naming the argument otherwise.
    """
    why = problem(x, weight, bias)
    if why is not None:
        raise ValueError(f"causal_conv1d_silu: {why}")
    return _conv_fwd(x, weight.float().t(), None if bias is None else bias.float())   # w_t: (W, D)
