"""GRU recurrence (PyTorch's gate order r, z, n) as persistent Triton kernels, forward and backward.

    from kernels.gru import gru_scan, gru_scan_ref
    gi = x @ W_ih.T + b_ih                        # (B, T, 3C): the input projection, plain torch ops
    hs, hT = gru_scan(gi, h0, w_hh, b_hh)         # (B, T, C) = h_1..h_T, (B, C) = h_T

Only the part of a GRU layer that is sequential over T runs here: for t = 1..T

    gh_t = h_{t-1} @ w_hh^T + b_hh                           (B, 3C), split gh_r, gh_z, gh_n
    r = sigmoid(gi_r + gh_r);  z = sigmoid(gi_z + gh_z);  n = tanh(gi_n + r * gh_n)
    h_t = (1 - z) * n + z * h_{t-1}

Kernel design: the T steps depend on each other through h, so each step's latency is what counts, not
throughput. One program owns BLOCK_B batch rows for the whole sequence (the time loop runs inside the
kernel); it loads w_hh once, as three C x C blocks kept on chip, and each step is three (BLOCK_B, C) x (C, C)
tensor-core products plus elementwise gates. The next step's inputs (gi in the forward; the saved gates,
h_{t-1} and dhs in the backward) do not depend on h, so their loads are issued one step ahead.
The forward saves r, z, n and gh_n of every step (B, T, 4, C) fp32; the backward runs the same loop
reversed and writes d(gi) and d(gh_n); dW_hh, db_hh are then two plain torch reductions over (B*T).

Precision (`precision=`):
* "bf16" (default): the operands of the h @ w_hh^T products (h_{t-1}, w_hh) and of the backward's
  d(gh) @ w_hh are rounded to bfloat16 (round to nearest even), products accumulate in fp32; everything else
  (the state h, the gates, gi, all stored tensors) is fp32. This is what the rest of the model does under
  bf16 autocast. Against an fp64 GRU, outputs differ by ~1e-3 at C = 128 (the tests derive the bound from
  `gru_scan_ref(..., dot_dtype=torch.bfloat16)`, which rounds the same operands and agrees far closer).
* "tf32": fp32 operands on tensor cores in TF32 (10-bit mantissa, 8 times finer than bf16's 7 bits); w_hh
  then takes 3 x 64 KB of shared memory at C = 128 (200 KB forward, 224 KB backward with triton 3.6, under
  the H100/H200's 227 KB).
* "ieee": fp32 products without tensor cores: agrees with fp32 `nn.GRU` to fp32 rounding. An accuracy option,
  not a fast one: at C = 128 its forward spills ~8 KB of registers a thread (ptxas, sm_90).

Supported: CUDA tensors; C a power of two in [16, 128]; any B >= 1, T >= 1. gi, h0, w_hh, b_hh in float32
(bfloat16 / float16 are upcast to fp32 first); outputs are always fp32. Anything else is refused with a
ValueError naming the argument.

`gru_scan_ref` is the sequential pure-PyTorch twin (any dtype, fp64 in the tests). The kernels are exposed
as torch.library custom ops (namespace "gt_kernels", with fake implementations and autograd registered),
so torch.compile(fullgraph=True) traces a model that calls `gru_scan` without a graph break.

Testing without a GPU: `_cpu_interpreter()` (private, tests only) lets `gru_scan` take CPU tensors and run
the same kernels in Triton's interpreter (numpy). That interpreter computes bf16 `tl.dot` wrongly (as of
triton 3.9.0 it multiplies the raw bit patterns) and truncates fp32 -> bf16 casts, so there precision "bf16"
runs as "bf16_emulated": the operands are rounded to bf16 values by integer arithmetic (the same round to
nearest even as the GPU's cast) and multiplied in fp32, which gives the same numbers up to summation order;
"tf32" runs as fp32 products there (numpy ignores input_precision). Triton 3.6's interpreter cannot run the
kernels under numpy >= 2.4 (`_interpreter_problem` says why); triton 3.9's can.

Triton is optional at import: without it this module still imports and `gru_scan_ref` works; `gru_scan`
raises ValueError saying so. Timings: `python -m kernels.gru_bench`.
"""
import types

import torch

from . import triton_interp

try:
    import triton
    import triton.language as tl
except ImportError:          # CPU-only installs: the reference works, gru_scan says what is missing
    triton = None
    tl = types.SimpleNamespace(constexpr=None)   # lets the kernel signatures below be defined, never run

__all__ = ["gru_scan", "gru_scan_ref", "PRECISIONS", "SUPPORTED_C"]

PRECISIONS = ("bf16", "tf32", "ieee")
SUPPORTED_C = (16, 32, 64, 128)
_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Launch configuration, fixed (no autotuning: its cost would be paid by every fresh GPU machine).
# BLOCK_B = 16 is the smallest M tl.dot takes; B = 64 then runs in 4 programs, each on its own SM.
_BLOCK_B = 16


def _num_warps(C: int) -> int:
    """Warps per program: the products' N = C is split across warps. Chosen from ptxas's register report for
    sm_90 (triton 3.6 and 3.9 give the same), not from timings: at C = 128 with bf16 operands 8 warps use
    238 (forward) / 244 (backward) registers a thread and spill nothing, 4 warps spill (255 registers,
    232 / 648 bytes), as does BLOCK_B = 32; at C = 64, 8 warps use ~120 against 4 warps' 216 / 246. At C <= 32
    an 8-warp split would leave warps less than one 8-column MMA tile."""
    return 8 if C >= 64 else 4


# ------------------------------------------------------------------------------------------------ reference
class _RoundedMatmul(torch.autograd.Function):
    """h @ w^T with both operands rounded to `dot_dtype` (then back), and the kernels' backward: dh =
    round(g) @ round(w) (the backward kernel's product), dw = g^T @ h unrounded (the torch matmul after it)."""

    @staticmethod
    def forward(ctx, h, w, dot_dtype):
        ctx.save_for_backward(h, w)
        ctx.dot_dtype = dot_dtype
        rnd = lambda x: x.to(dot_dtype).to(x.dtype)  # noqa: E731
        return rnd(h) @ rnd(w).T

    @staticmethod
    def backward(ctx, g):
        h, w = ctx.saved_tensors
        rnd = lambda x: x.to(ctx.dot_dtype).to(x.dtype)  # noqa: E731
        return rnd(g) @ rnd(w), g.T @ h, None


def gru_scan_ref(gi: torch.Tensor, h0: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor,
                 dot_dtype: torch.dtype | None = None):
    """The sequential definition of `gru_scan`, one Python iteration per step (tests; differentiable).

    gi (B, T, 3C), h0 (B, C), w_hh (3C, C), b_hh (3C,): any floating dtype; everything is computed in gi's
    dtype (fp64 in the tests). dot_dtype: None for exact products, or torch.bfloat16 to round the operands
    of every product to it as gru_scan(precision="bf16") does: h_{t-1} and w_hh in the forward, d(gh_t) and
    w_hh in the backward's d(gh_t) @ w_hh (dw_hh stays unrounded, as in gru_scan).
    Returns hs (B, T, C) = h_1..h_T and hT (B, C), in gi's dtype.
    """
    dtype = gi.dtype
    h0, w_hh, b_hh = h0.to(dtype), w_hh.to(dtype), b_hh.to(dtype)
    C = h0.shape[-1]
    h, hs = h0, []
    for t in range(gi.shape[1]):
        hw = h @ w_hh.T if dot_dtype is None else _RoundedMatmul.apply(h, w_hh, dot_dtype)
        gh = hw + b_hh                                                                     # (B, 3C)
        gi_r, gi_z, gi_n = gi[:, t].split(C, dim=-1)                                       # (B, C) each
        gh_r, gh_z, gh_n = gh.split(C, dim=-1)
        r = torch.sigmoid(gi_r + gh_r)
        z = torch.sigmoid(gi_z + gh_z)
        n = torch.tanh(gi_n + r * gh_n)
        h = (1 - z) * n + z * h                                                            # (B, C)
        hs.append(h)
    return torch.stack(hs, dim=1), h


# --------------------------------------------------------------------------------------------- the kernels

def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


@_jit
def _dot_operand(x, DOT: tl.constexpr):
    """x (fp32 block) as a tl.dot operand for precision DOT (module docstring)."""
    if DOT == "bf16":
        return x.to(tl.bfloat16)                      # round to nearest even
    elif DOT == "bf16_emulated":
        # the bf16 value nearest x (ties to even), kept in fp32: add half an ulp of bf16, drop 16 bits
        b = x.to(tl.uint32, bitcast=True)
        b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
        return b.to(tl.float32, bitcast=True)
    else:
        return x


@_jit
def _sigmoid(x):
    # tl.sigmoid's formula; written here because tl.sigmoid is itself a @triton.jit function, which the
    # interpreter hook below cannot call (only `tl` builtins and this module's helpers are re-bound)
    return 1.0 / (1.0 + tl.exp(-x))


@_jit
def _tanh(x):
    # tanh(x) = 2 sigmoid(2x) - 1 (absolute error ~1e-7, which is what the gates need)
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@_jit
def _gru_fwd_kernel(gi_ptr, h0_ptr, w_ptr, b_ptr, hs_ptr, hT_ptr, gates_ptr, B, T,
                    C: tl.constexpr, BLOCK_B: tl.constexpr, DOT: tl.constexpr, IP: tl.constexpr):
    """One program: BLOCK_B batch rows, all T steps. gi (B, T, 3C), h0 (B, C), w (3C, C), b (3C,) fp32
    contiguous; writes hs (B, T, C), hT (B, C), gates (B, T, 4, C) = r, z, n, gh_n of every step."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)                             # (BLOCK_B,)
    cols = tl.arange(0, C)                                                                # (C,)
    mask = (rows < B)[:, None]                                                            # (BLOCK_B, 1)
    row = rows.to(tl.int64)[:, None]                                                      # (BLOCK_B, 1)

    # W_g^T[k, j] = w[g C + j, k]: the (C_in, C_out) right operand of h @ W_g^T, loaded once, kept on chip
    w_t = cols[None, :] * C + cols[:, None]                                               # (C, C)
    w_r = _dot_operand(tl.load(w_ptr + w_t), DOT)                                         # (C, C)
    w_z = _dot_operand(tl.load(w_ptr + C * C + w_t), DOT)                                 # (C, C)
    w_n = _dot_operand(tl.load(w_ptr + 2 * C * C + w_t), DOT)                             # (C, C)
    b_r = tl.load(b_ptr + cols)[None, :]                                                  # (1, C)
    b_z = tl.load(b_ptr + C + cols)[None, :]                                              # (1, C)
    b_n = tl.load(b_ptr + 2 * C + cols)[None, :]                                          # (1, C)

    h = tl.load(h0_ptr + row * C + cols[None, :], mask=mask, other=0.0)                  # (BLOCK_B, C) fp32
    gi_p = gi_ptr + row * (T * 3 * C) + cols[None, :]                                     # (BLOCK_B, C) at t=0
    hs_p = hs_ptr + row * (T * C) + cols[None, :]
    g_p = gates_ptr + row * (T * 4 * C) + cols[None, :]

    gi_r = tl.load(gi_p, mask=mask, other=0.0)                                            # (BLOCK_B, C)
    gi_z = tl.load(gi_p + C, mask=mask, other=0.0)
    gi_n = tl.load(gi_p + 2 * C, mask=mask, other=0.0)
    for t in range(T):
        # step t+1's inputs do not depend on h: load them now, they arrive while this step computes
        # (the last step reloads step T-1, unused)
        nxt = gi_p + tl.minimum(t + 1, T - 1) * 3 * C
        gi_r_next = tl.load(nxt, mask=mask, other=0.0)                                    # (BLOCK_B, C)
        gi_z_next = tl.load(nxt + C, mask=mask, other=0.0)
        gi_n_next = tl.load(nxt + 2 * C, mask=mask, other=0.0)

        h_op = _dot_operand(h, DOT)                                                       # (BLOCK_B, C)
        r = _sigmoid(gi_r + tl.dot(h_op, w_r, input_precision=IP) + b_r)                # (BLOCK_B, C)
        z = _sigmoid(gi_z + tl.dot(h_op, w_z, input_precision=IP) + b_z)
        gh_n = tl.dot(h_op, w_n, input_precision=IP) + b_n
        n = _tanh(gi_n + r * gh_n)
        h = n + z * (h - n)                                                               # (1 - z) n + z h

        tl.store(hs_p + t * C, h, mask=mask)
        tl.store(g_p + t * 4 * C, r, mask=mask)
        tl.store(g_p + t * 4 * C + C, z, mask=mask)
        tl.store(g_p + t * 4 * C + 2 * C, n, mask=mask)
        tl.store(g_p + t * 4 * C + 3 * C, gh_n, mask=mask)
        gi_r, gi_z, gi_n = gi_r_next, gi_z_next, gi_n_next
    tl.store(hT_ptr + row * C + cols[None, :], h, mask=mask)


@_jit
def _gru_bwd_kernel(dhs_ptr, dhT_ptr, hprev_ptr, gates_ptr, w_ptr, dgi_ptr, dghn_ptr, dh0_ptr, B, T,
                    C: tl.constexpr, BLOCK_B: tl.constexpr, DOT: tl.constexpr, IP: tl.constexpr):
    """Reverse loop of _gru_fwd_kernel. dhs (B, T, C), dhT (B, C), hprev (B, T, C) = h_0..h_{T-1},
    gates (B, T, 4, C), w (3C, C) fp32 contiguous; writes dgi (B, T, 3C) = d(gi) = [dr_pre, dz_pre, dn_pre],
    dghn (B, T, C) = dn_pre * r (d(gh) is [dr_pre, dz_pre, dghn]) and dh0 (B, C)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)                             # (BLOCK_B,)
    cols = tl.arange(0, C)                                                                # (C,)
    mask = (rows < B)[:, None]                                                            # (BLOCK_B, 1)
    row = rows.to(tl.int64)[:, None]                                                      # (BLOCK_B, 1)

    # W_g[j, k] = w[g C + j, k]: the (C_out, C_in) right operand of d(gh_g) @ W_g, loaded once
    w_o = cols[:, None] * C + cols[None, :]                                               # (C, C)
    w_r = _dot_operand(tl.load(w_ptr + w_o), DOT)                                         # (C, C)
    w_z = _dot_operand(tl.load(w_ptr + C * C + w_o), DOT)
    w_n = _dot_operand(tl.load(w_ptr + 2 * C * C + w_o), DOT)

    dh = tl.load(dhT_ptr + row * C + cols[None, :], mask=mask, other=0.0)                # (BLOCK_B, C) carried
    bt_p = row * T * C + cols[None, :]                              # (BLOCK_B, C) offsets into (B, T, C) at t=0
    g_p = gates_ptr + row * (T * 4 * C) + cols[None, :]
    dgi_p = dgi_ptr + row * (T * 3 * C) + cols[None, :]

    last = T - 1
    dhs_t = tl.load(dhs_ptr + bt_p + last * C, mask=mask, other=0.0)                      # (BLOCK_B, C)
    hp = tl.load(hprev_ptr + bt_p + last * C, mask=mask, other=0.0)                       # h_{t-1}
    r = tl.load(g_p + last * 4 * C, mask=mask, other=0.0)
    z = tl.load(g_p + last * 4 * C + C, mask=mask, other=0.0)
    n = tl.load(g_p + last * 4 * C + 2 * C, mask=mask, other=0.0)
    gh_n = tl.load(g_p + last * 4 * C + 3 * C, mask=mask, other=0.0)
    for i in range(T):
        t = T - 1 - i
        # step t-1's saved values do not depend on the carried gradient: load them one step ahead
        # (the last iteration, t = 0, reloads step 0, unused)
        tp = tl.maximum(t - 1, 0)
        dhs_next = tl.load(dhs_ptr + bt_p + tp * C, mask=mask, other=0.0)
        hp_next = tl.load(hprev_ptr + bt_p + tp * C, mask=mask, other=0.0)
        r_next = tl.load(g_p + tp * 4 * C, mask=mask, other=0.0)
        z_next = tl.load(g_p + tp * 4 * C + C, mask=mask, other=0.0)
        n_next = tl.load(g_p + tp * 4 * C + 2 * C, mask=mask, other=0.0)
        gh_n_next = tl.load(g_p + tp * 4 * C + 3 * C, mask=mask, other=0.0)

        dh = dh + dhs_t                                                                   # (BLOCK_B, C)
        dn_pre = dh * (1.0 - z) * (1.0 - n * n)                                           # d/d(gi_n + r gh_n)
        dz_pre = dh * (hp - n) * z * (1.0 - z)
        dr_pre = dn_pre * gh_n * r * (1.0 - r)
        dgh_n = dn_pre * r
        tl.store(dgi_p + t * 3 * C, dr_pre, mask=mask)
        tl.store(dgi_p + t * 3 * C + C, dz_pre, mask=mask)
        tl.store(dgi_p + t * 3 * C + 2 * C, dn_pre, mask=mask)
        tl.store(dghn_ptr + bt_p + t * C, dgh_n, mask=mask)

        # dh_{t-1} = dh z + d(gh) @ w_hh, d(gh) = [dr_pre, dz_pre, dgh_n]   (BLOCK_B, 3C) @ (3C, C)
        dh = dh * z
        dh = tl.dot(_dot_operand(dr_pre, DOT), w_r, acc=dh, input_precision=IP)
        dh = tl.dot(_dot_operand(dz_pre, DOT), w_z, acc=dh, input_precision=IP)
        dh = tl.dot(_dot_operand(dgh_n, DOT), w_n, acc=dh, input_precision=IP)

        dhs_t, hp, r, z, n, gh_n = dhs_next, hp_next, r_next, z_next, n_next, gh_n_next
    tl.store(dh0_ptr + row * C + cols[None, :], dh, mask=mask)


# ------------------------------------------------------------------------------------- interpreter hook
# Tests only (kernels/triton_interp.py): inside `_cpu_interpreter()` gru_scan takes CPU tensors.
_interpreter_problem = triton_interp.problem


def _cpu_interpreter():
    """Tests only: `gru_scan` accepts CPU tensors inside and runs the kernels in Triton's interpreter; precision
    "bf16" runs as "bf16_emulated" there (module docstring). RuntimeError if the interpreter cannot run here."""
    return triton_interp.cpu_interpreter("gru")


def _kernels_for(x: torch.Tensor, precision: str):
    """(fwd kernel, bwd kernel, DOT, IP) for tensors on x's device: compiled on CUDA, interpreted on CPU."""
    fwd, bwd = triton_interp.kernels_for(globals(), x, ("_gru_fwd_kernel", "_gru_bwd_kernel"), "gru")
    # interpreted on the CPU, and on CUDA too when TRITON_INTERPRET=1 was set at import
    interpreted = not isinstance(fwd, triton.runtime.JITFunction)
    dot = "bf16_emulated" if precision == "bf16" and interpreted else precision
    return fwd, bwd, dot, "tf32" if precision == "tf32" else "ieee"


# ---------------------------------------------------------------------------------------------- custom ops
# torch.library custom ops: torch.compile sees an opaque op with a fake (shape) implementation and an
# autograd formula, so a compiled model calls the kernels without a graph break.

@torch.library.custom_op("gt_kernels::gru_scan_fwd", mutates_args=())
def _gru_scan_fwd(gi: torch.Tensor, h0: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor,
                  precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gi (B, T, 3C), h0 (B, C), w_hh (3C, C), b_hh (3C,) fp32 contiguous, validated by gru_scan.
    Returns hs (B, T, C), hT (B, C), gates (B, T, 4, C) = r, z, n, gh_n (saved for the backward)."""
    B, T, C3 = gi.shape
    C = C3 // 3
    hs = gi.new_empty(B, T, C)
    hT = gi.new_empty(B, C)
    gates = gi.new_empty(B, T, 4, C)
    fwd, _, dot, ip = _kernels_for(gi, precision)
    with triton_interp.on_device(gi):
        fwd[(triton.cdiv(B, _BLOCK_B),)](gi, h0, w_hh, b_hh, hs, hT, gates, B, T, C=C, BLOCK_B=_BLOCK_B,
                                         DOT=dot, IP=ip, num_warps=_num_warps(C))
    return hs, hT, gates


@_gru_scan_fwd.register_fake
def _(gi, h0, w_hh, b_hh, precision):
    B, T, C3 = gi.shape
    C = C3 // 3
    return gi.new_empty(B, T, C), gi.new_empty(B, C), gi.new_empty(B, T, 4, C)


@torch.library.custom_op("gt_kernels::gru_scan_bwd", mutates_args=())
def _gru_scan_bwd(dhs: torch.Tensor, dhT: torch.Tensor, hprev: torch.Tensor, gates: torch.Tensor,
                  w_hh: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dhs (B, T, C), dhT (B, C), hprev (B, T, C) = h_0..h_{T-1}, gates (B, T, 4, C), w_hh (3C, C), fp32
    contiguous. Returns dgi (B, T, 3C), dghn (B, T, C) = d(gh_n), dh0 (B, C)."""
    B, T, C = dhs.shape
    dgi = dhs.new_empty(B, T, 3 * C)
    dghn = dhs.new_empty(B, T, C)
    dh0 = dhs.new_empty(B, C)
    _, bwd, dot, ip = _kernels_for(dhs, precision)
    with triton_interp.on_device(dhs):
        bwd[(triton.cdiv(B, _BLOCK_B),)](dhs, dhT, hprev, gates, w_hh, dgi, dghn, dh0, B, T, C=C,
                                         BLOCK_B=_BLOCK_B, DOT=dot, IP=ip, num_warps=_num_warps(C))
    return dgi, dghn, dh0


@_gru_scan_bwd.register_fake
def _(dhs, dhT, hprev, gates, w_hh, precision):
    B, T, C = dhs.shape
    return dhs.new_empty(B, T, 3 * C), dhs.new_empty(B, T, C), dhs.new_empty(B, C)


def _setup_context(ctx, inputs, output):
    gi, h0, w_hh, b_hh, precision = inputs
    hs, hT, gates = output
    ctx.save_for_backward(h0, w_hh, hs, gates)
    ctx.precision = precision


def _backward(ctx, dhs, dhT, dgates):
    h0, w_hh, hs, gates = ctx.saved_tensors
    B, T, C = hs.shape
    dhs = hs.new_zeros(B, T, C) if dhs is None else dhs.contiguous()
    dhT = h0.new_zeros(B, C) if dhT is None else dhT.contiguous()
    hprev = torch.cat([h0[:, None], hs[:, :-1]], dim=1)                                   # (B, T, C) h_0..h_{T-1}
    dgi, dghn, dh0 = _gru_scan_bwd(dhs, dhT, hprev, gates, w_hh, ctx.precision)
    dgh = torch.cat([dgi[..., :2 * C], dghn], dim=-1).reshape(B * T, 3 * C)              # (B T, 3C)
    dw_hh = dgh.T @ hprev.reshape(B * T, C)                                               # (3C, C)
    db_hh = dgh.sum(dim=0)                                                                # (3C,)
    return dgi, dh0, dw_hh, db_hh, None


_gru_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------ public
def _validate(gi, h0, w_hh, b_hh, precision) -> None:
    """ValueError naming the argument, what was expected and what was got; the kernels assume the rest."""
    named = {"gi": gi, "h0": h0, "w_hh": w_hh, "b_hh": b_hh}
    for name, x in named.items():
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"gru_scan: {name} must be a torch.Tensor, got {type(x).__name__}")
    if precision not in PRECISIONS:
        raise ValueError(f"gru_scan: precision must be one of {PRECISIONS}, got {precision!r}")
    if gi.dim() != 3 or gi.shape[2] % 3 != 0:
        raise ValueError(f"gru_scan: gi must be (B, T, 3C), got shape {tuple(gi.shape)}")
    B, T, C = gi.shape[0], gi.shape[1], gi.shape[2] // 3
    if B < 1 or T < 1:
        raise ValueError(f"gru_scan: gi must have B >= 1 and T >= 1, got shape {tuple(gi.shape)}")
    if C not in SUPPORTED_C:
        raise ValueError(f"gru_scan: hidden size C = gi.shape[2] / 3 must be one of {SUPPORTED_C} "
                         f"(a power of two in [16, 128]), got C = {C} (gi shape {tuple(gi.shape)}); "
                         "use nn.GRU or gru_scan_ref for other sizes")
    for name, want in (("h0", (B, C)), ("w_hh", (3 * C, C)), ("b_hh", (3 * C,))):
        if tuple(named[name].shape) != want:
            raise ValueError(f"gru_scan: {name} must have shape {want} (B = {B}, C = {C} from gi), "
                             f"got {tuple(named[name].shape)}")
    for name, x in named.items():
        if x.dtype not in _INPUT_DTYPES:
            raise ValueError(f"gru_scan: {name} must be float32 (bfloat16 / float16 are upcast), got {x.dtype}; "
                             "the kernels compute in fp32 (gru_scan_ref runs in any dtype)")
    for name, x in named.items():
        if x.device != gi.device:
            raise ValueError(f"gru_scan: all inputs must be on one device; gi is on {gi.device}, "
                             f"{name} on {x.device}")
    if triton is None:
        raise ValueError("gru_scan: needs triton, which is not installed (it comes with CUDA builds of "
                         "torch); gru_scan_ref is the pure-PyTorch version")
    if not triton_interp.runs_on(gi):
        raise ValueError(f"gru_scan: inputs must be CUDA tensors, got {gi.device}; "
                         "on CPU use nn.GRU or gru_scan_ref")


def gru_scan(gi: torch.Tensor, h0: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor,
             precision: str = "bf16"):
    """The GRU recurrence over T (module docstring), differentiable in gi, h0, w_hh and b_hh.

    gi:   (B, T, 3C) float32, the input projection x_t @ W_ih^T + b_ih, gates in the order r, z, n.
    h0:   (B, C) float32, the state before step 1.
    w_hh: (3C, C) float32, the hidden-to-hidden weight (nn.GRU's weight_hh_l0 / nn.GRUCell's weight_hh).
    b_hh: (3C,) float32, its bias.
    bfloat16 / float16 inputs are upcast to float32. All on one CUDA device; C in SUPPORTED_C; B, T >= 1.
    precision: "bf16" (default), "tf32" or "ieee": the operand precision of the h @ w_hh^T products
    (module docstring); the state and gates are fp32 in every case.
    Returns (hs (B, T, C) float32 = h_1..h_T, hT (B, C) float32 = h_T).
    Raises ValueError naming the argument for anything else.
    """
    _validate(gi, h0, w_hh, b_hh, precision)
    args = [x.float().contiguous() for x in (gi, h0, w_hh, b_hh)]
    hs, hT, _ = _gru_scan_fwd(*args, precision)
    return hs, hT
