"""kernels.gru: `gru_scan` (Triton, persistent over T) against `gru_scan_ref` (sequential, fp64) and nn.GRU.

Without a GPU the kernels run in Triton's interpreter through the private hook `kernels.gru._cpu_interpreter()`
(these tests skip where triton is not installed). There precision "bf16" runs as "bf16_emulated": the same
operands rounded to bf16 values, multiplied in fp32 (kernels/gru.py docstring says why). The `gpu` tests run
the compiled kernels (tests/conftest.py skips them without CUDA).

Tolerances are relative to the largest magnitude of the reference tensor (`scale`):
* "ieee" (fp32 products) against the fp64 reference: fixed, fp32 rounding.
* "bf16" against `gru_scan_ref(..., dot_dtype=torch.bfloat16)` (the same operands rounded, in fp64): fixed,
  in rms (err_ratio) and in max abs. The two runs round the same values except where an operand lies within
  fp32 noise of a bf16 rounding boundary: then one element moves by one bf16 ulp in one of them. At C <= 32
  that is rare and they agree to fp32 rounding (err_ratio ~1e-7); at C = 128 it happens a few times a run
  and the agreement is 4 to 10 times tighter than bf16's own error, not more.
* "bf16" against the exact fp64 reference: derived from the rounded reference's own error against it
  (mamba's tests/test_generation.py style): max abs <= 2 x that + 1e-5 scale.
"""
import functools

import pytest
import torch

from kernels import gru
from kernels.gru import gru_scan, gru_scan_ref
from numerics import assert_close, assert_ratio

# (B, T, C): a single step; odd B and T; B past one 16-row block (17 = 2 programs, the second masked) at the
# smallest C; the target C. Interpreter time of the whole file stays well under a minute.
CASES = [(1, 1, 16), (3, 7, 32), (17, 33, 16), (16, 64, 128)]
CASE_IDS = [f"B{b}-T{t}-C{c}" for b, t, c in CASES]
NAMES = ["hs", "hT", "d_gi", "d_h0", "d_w_hh", "d_b_hh"]
IEEE_TOL = 2e-6                 # fp32 products, fp32 state: observed <= 4e-7 of scale in the interpreter
# bf16 vs the bf16-rounded reference: err_ratio (rms), observed ~1e-7 at C <= 32 and up to 1.3e-4 (d_h0) at
# C = 128, where boundary flips (module docstring) dominate; bf16's own err_ratio against fp64 is 4e-4 .. 1e-3
BF16_RMS_TOL = 3e-4
BF16_MAX_TOL = 1e-3             # ... max abs / scale (observed <= 3e-4)
TF32_TOL = 1e-3                 # tf32 (GPU only) vs fp64, max abs / scale


@pytest.fixture
def interp():
    """The CPU interpreter hook, or a skip where triton is absent."""
    pytest.importorskip("triton", reason="triton is not installed: the interpreter tests need it "
                                         "(pip install triton; CUDA builds of torch bring it)")
    problem = gru._interpreter_problem()
    if problem is not None:
        pytest.skip(f"Triton's CPU interpreter is unusable here: {problem}")
    with gru._cpu_interpreter():
        yield


def make_inputs(B, T, C, seed=0, device="cpu"):
    """fp64 (gi, h0, w_hh, b_hh) and cotangents (gy (B, T, C), gT (B, C)), at nn.GRU's init scale:
    w_hh, b_hh ~ U(-1/sqrt(C), 1/sqrt(C)), gi ~ N(0, 1) (x @ W_ih^T of unit-variance x), |h0| < 1."""
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    k = C ** -0.5
    gi = torch.randn(B, T, 3 * C, **f64)
    h0 = torch.tanh(torch.randn(B, C, **f64))
    w_hh = (torch.rand(3 * C, C, **f64) * 2 - 1) * k
    b_hh = (torch.rand(3 * C, **f64) * 2 - 1) * k
    gy, gT = torch.randn(B, T, C, **f64), torch.randn(B, C, **f64)
    return [x.to(device) for x in (gi, h0, w_hh, b_hh)], gy.to(device), gT.to(device)


def outputs_and_grads(fn, xs, gy, gT, **kw):
    """{name: tensor (fp64)} for hs, hT and the gradients of sum(hs gy) + sum(hT gT) w.r.t. gi, h0, w_hh, b_hh."""
    xs = [x.detach().clone().requires_grad_() for x in xs]
    hs, hT = fn(*xs, **kw)
    grads = torch.autograd.grad((hs.double() * gy).sum() + (hT.double() * gT).sum(), xs)
    return dict(zip(NAMES, [t.detach().double() for t in (hs, hT, *grads)]))


@functools.lru_cache(maxsize=None)
def interpreter_run(case, precision):
    """(kernel, exact fp64 reference, bf16-rounded fp64 reference), each {name: tensor}, for one case: the
    forward and gradient tests share one (slow) interpreter run."""
    xs, gy, gT = make_inputs(*case)
    with gru._cpu_interpreter():
        got = outputs_and_grads(gru_scan, [x.float() for x in xs], gy, gT, precision=precision)
    exact = outputs_and_grads(gru_scan_ref, xs, gy, gT)
    rounded = outputs_and_grads(gru_scan_ref, xs, gy, gT, dot_dtype=torch.bfloat16)
    return got, exact, rounded


def check(names, got, exact, rounded, precision, ieee_tol=IEEE_TOL):
    """One named assertion per tensor, with the tolerances of the module docstring."""
    for name in names:
        scale = exact[name].abs().max().item()
        if precision == "ieee":
            assert_close(f"{name} (ieee vs fp64)", got[name], exact[name], ieee_tol * scale)
        elif precision == "tf32":          # 10-bit mantissa operands: ~8x closer than bf16's 7 bits
            assert_close(f"{name} (tf32 vs fp64)", got[name], exact[name], TF32_TOL * scale)
        else:
            assert_ratio(f"{name} (bf16 vs bf16-rounded fp64, rms)", got[name], rounded[name], BF16_RMS_TOL)
            assert_close(f"{name} (bf16 vs bf16-rounded fp64)", got[name], rounded[name], BF16_MAX_TOL * scale)
            base = (rounded[name] - exact[name]).abs().max().item()
            assert_close(f"{name} (bf16 vs fp64, 2 x the rounded reference's {base:.2e})", got[name],
                         exact[name], 2 * base + 1e-5 * scale)


# ------------------------------------------------------------------------------ interpreter (CPU) tests
@pytest.mark.parametrize("precision", ["bf16", "ieee"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_matches_reference(interp, case, precision):
    got, exact, rounded = interpreter_run(case, precision)
    check(["hs", "hT"], got, exact, rounded, precision)


@pytest.mark.parametrize("precision", ["bf16", "ieee"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradients_match_reference(interp, case, precision):
    got, exact, rounded = interpreter_run(case, precision)
    check(["d_gi", "d_h0", "d_w_hh", "d_b_hh"], got, exact, rounded, precision)


def test_rounded_reference_is_a_real_bf16_baseline():
    """The derived bf16 bound is meaningful only if the rounded reference differs from the exact one by about
    bf16's error (not 0, not large)."""
    xs, gy, gT = make_inputs(16, 64, 128)
    exact = outputs_and_grads(gru_scan_ref, xs, gy, gT)
    rounded = outputs_and_grads(gru_scan_ref, xs, gy, gT, dot_dtype=torch.bfloat16)
    for name in NAMES:
        rel = (rounded[name] - exact[name]).abs().max().item() / exact[name].abs().max().item()
        assert 1e-4 < rel < 1e-2, f"{name}: bf16-rounded reference off the exact one by {rel:.2e} of scale"


@pytest.mark.parametrize("precision", ["bf16", "ieee"])
def test_state_chaining_equals_one_run(interp, precision):
    """gru_scan over T1, then over T2 from its hT, equals one run over T1 + T2: outputs, and the gradients,
    which reach the first chunk only through hT (the backward's dhT input)."""
    B, T1, T2, C = 5, 6, 9, 32
    xs, gy, gT = make_inputs(B, T1 + T2, C, seed=3)
    xs = [x.float() for x in xs]

    def chained(gi, h0, w_hh, b_hh, precision):
        hs1, h1 = gru_scan(gi[:, :T1], h0, w_hh, b_hh, precision=precision)
        hs2, h2 = gru_scan(gi[:, T1:], h1, w_hh, b_hh, precision=precision)
        return torch.cat([hs1, hs2], dim=1), h2

    one = outputs_and_grads(gru_scan, xs, gy, gT, precision=precision)
    two = outputs_and_grads(chained, xs, gy, gT, precision=precision)
    for name in NAMES:
        assert_close(f"{name} (chained vs one run)", two[name], one[name], 1e-6 * one[name].abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["GRU-fp64", "GRU-fp32"])
def test_equals_torch_nn_gru(interp, dtype):
    """nn.GRU on the same weights, the input projection gi = x @ W_ih^T + b_ih computed outside: hs, hT and
    the gradients of x and of all four parameters (precision "ieee", fp32 products)."""
    torch.manual_seed(4)
    B, T, I, C = 3, 11, 24, 32
    net = torch.nn.GRU(I, C, batch_first=True).to(dtype)
    x = torch.randn(B, T, I, dtype=dtype, requires_grad=True)
    h0 = torch.tanh(torch.randn(B, C, dtype=dtype)).requires_grad_()
    gy, gT = torch.randn(B, T, C, dtype=torch.float64), torch.randn(B, C, dtype=torch.float64)
    params = [net.weight_ih_l0, net.bias_ih_l0, net.weight_hh_l0, net.bias_hh_l0]
    pnames = ["weight_ih", "bias_ih", "weight_hh", "bias_hh"]

    hs_ref, hT_ref = net(x, h0[None])
    hT_ref = hT_ref[0]
    g_ref = torch.autograd.grad((hs_ref.double() * gy).sum() + (hT_ref.double() * gT).sum(), [x, h0, *params])

    gi = x @ net.weight_ih_l0.T + net.bias_ih_l0                                         # (B, T, 3C)
    hs, hT = gru_scan(gi.float(), h0.float(), net.weight_hh_l0.float(), net.bias_hh_l0.float(), precision="ieee")
    g = torch.autograd.grad((hs.double() * gy).sum() + (hT.double() * gT).sum(), [x, h0, *params])

    tol = 2e-6 if dtype == torch.float64 else 1e-5          # fp32 kernel vs fp64 / vs fp32 ATen loop
    assert_close("hs vs nn.GRU", hs, hs_ref, tol)
    assert_close("hT vs nn.GRU", hT, hT_ref, tol)
    for name, a, b in zip(["x", "h0", *pnames], g, g_ref):
        assert_close(f"d_{name} vs nn.GRU", a, b, tol * b.abs().max().item())


def test_compile_fullgraph_no_graph_break(interp):
    """torch.compile(fullgraph=True) traces gru_scan (custom ops with fake and autograd implementations):
    no graph break, same outputs and gradients as eager. aot_eager keeps it quick on CPU; the GPU test below
    runs Inductor."""
    xs, gy, gT = make_inputs(4, 5, 16, seed=5)
    xs = [x.float() for x in xs]

    def f(gi, h0, w_hh, b_hh):
        hs, hT = gru_scan(gi * 1.5, h0, w_hh, b_hh)
        return hs.tanh(), hT

    eager = outputs_and_grads(f, xs, gy, gT)
    torch._dynamo.reset()
    compiled = outputs_and_grads(torch.compile(f, fullgraph=True, backend="aot_eager"), xs, gy, gT)
    for name in NAMES:
        assert_close(f"{name} (compiled vs eager)", compiled[name], eager[name], 1e-6 * eager[name].abs().max())


# ------------------------------------------------------------------------------------------- bad inputs
def _bad(**over):
    """Valid CPU fp32 inputs (B, T, C) = (2, 3, 16) with some replaced; precision "bf16" unless given."""
    (gi, h0, w, b), _, _ = make_inputs(2, 3, 16)
    args = dict(gi=gi.float(), h0=h0.float(), w_hh=w.float(), b_hh=b.float(), precision="bf16")
    args.update(over)
    return args


BAD = {
    "gi-2d": (_bad(gi=torch.zeros(2, 48)), "gi must be (B, T, 3C), got shape (2, 48)"),
    "gi-not-3C": (_bad(gi=torch.zeros(2, 3, 47)), "gi must be (B, T, 3C), got shape (2, 3, 47)"),
    "gi-T0": (_bad(gi=torch.zeros(2, 0, 48)), "T >= 1"),
    "C-not-pow2": (_bad(gi=torch.zeros(2, 3, 72)), "got C = 24"),
    "C-too-big": (_bad(gi=torch.zeros(2, 3, 768), h0=torch.zeros(2, 256)), "got C = 256"),
    "C-too-small": (_bad(gi=torch.zeros(2, 3, 24)), "got C = 8"),
    "h0-shape": (_bad(h0=torch.zeros(3, 16)), "h0 must have shape (2, 16)"),
    "w_hh-shape": (_bad(w_hh=torch.zeros(16, 48)), "w_hh must have shape (48, 16)"),
    "b_hh-shape": (_bad(b_hh=torch.zeros(1, 48)), "b_hh must have shape (48,)"),
    "gi-int": (_bad(gi=torch.zeros(2, 3, 48, dtype=torch.int32)), "gi must be float32"),
    "w_hh-fp64": (_bad(w_hh=torch.zeros(48, 16, dtype=torch.float64)), "w_hh must be float32"),
    "h0-not-tensor": (_bad(h0=[0.0] * 16), "h0 must be a torch.Tensor, got list"),
    "precision": (_bad(precision="fp8"), "precision must be one of"),
    "mixed-devices": (_bad(b_hh=torch.zeros(48, device="meta")), "all inputs must be on one device"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_inputs_raise_value_error(case):
    args, message = BAD[case]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        gru_scan(**args)


def test_cpu_tensors_refused_outside_the_interpreter_hook():
    with pytest.raises(ValueError, match="must be CUDA tensors|needs triton"):
        gru_scan(**_bad())


# ------------------------------------------------------------------------------------------------ GPU
GPU_CASES = [(64, 512, 128), (1, 1, 16), (5, 37, 64), (100, 129, 128), (33, 200, 32)]


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "tf32", "ieee"])
@pytest.mark.parametrize("case", GPU_CASES, ids=[f"B{b}-T{t}-C{c}" for b, t, c in GPU_CASES])
def test_gpu_matches_reference(case, precision, no_tf32):
    xs, gy, gT = make_inputs(*case, device="cuda")
    got = outputs_and_grads(gru_scan, [x.float() for x in xs], gy, gT, precision=precision)
    exact = outputs_and_grads(gru_scan_ref, xs, gy, gT)
    rounded = outputs_and_grads(gru_scan_ref, xs, gy, gT, dot_dtype=torch.bfloat16)
    check(NAMES, got, exact, rounded, precision, ieee_tol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "ieee"])
def test_gpu_equals_cudnn_gru(precision, no_tf32):
    """cuDNN's fp32 nn.GRU at the target shape, same weights, gi = x @ W_ih^T + b_ih computed outside: hs, hT
    and the gradients of x, h0 and all four parameters. "ieee" agrees to fp32 rounding; "bf16" within twice
    the bf16-rounded fp64 reference's own distance to cuDNN, + 1e-5 scale."""
    torch.manual_seed(6)
    B, T, C = 64, 512, 128
    net = torch.nn.GRU(2 * C, C, batch_first=True).cuda()
    x = torch.randn(B, T, 2 * C, device="cuda")
    h0 = torch.tanh(torch.randn(B, C, device="cuda"))
    gy, gT = torch.randn(B, T, C, device="cuda"), torch.randn(B, C, device="cuda")
    names = ["hs", "hT", "d_x", "d_h0", "d_weight_ih", "d_bias_ih", "d_weight_hh", "d_bias_hh"]

    def run(fn, dtype):
        """fn(x, h0, w_ih, b_ih, w_hh, b_hh) -> (hs, hT), on copies in dtype: {name: fp64 tensor}."""
        wrt = [t.detach().to(dtype).requires_grad_() for t in
               (x, h0, net.weight_ih_l0, net.bias_ih_l0, net.weight_hh_l0, net.bias_hh_l0)]
        hs, hT = fn(*wrt)
        g = torch.autograd.grad((hs * gy.to(dtype)).sum() + (hT * gT.to(dtype)).sum(), wrt)
        return dict(zip(names, [t.detach().double() for t in (hs, hT, *g)]))

    def cudnn_gru(x, h0, w_ih, b_ih, w_hh, b_hh):
        hs, hT = torch._VF.gru(x, h0[None], [w_ih, w_hh, b_ih, b_hh], True, 1, 0.0, True, False, True)  # train
        return hs, hT[0]

    cudnn = run(cudnn_gru, torch.float32)
    ours = run(lambda x, h0, w_ih, b_ih, w_hh, b_hh: gru_scan(x @ w_ih.T + b_ih, h0, w_hh, b_hh, precision),
               torch.float32)
    if precision == "bf16":
        rounded = run(lambda x, h0, w_ih, b_ih, w_hh, b_hh: gru_scan_ref(x @ w_ih.T + b_ih, h0, w_hh, b_hh,
                                                                         torch.bfloat16), torch.float64)
    for name in names:
        scale = cudnn[name].abs().max().item()
        if precision == "ieee":
            tol = 1e-5 * scale
        else:
            tol = 2 * (rounded[name] - cudnn[name]).abs().max().item() + 1e-5 * scale
        assert_close(f"{name} ({precision} vs cuDNN)", ours[name], cudnn[name], tol)


@pytest.mark.gpu
def test_gpu_compile_fullgraph_inductor():
    """torch.compile(fullgraph=True) with Inductor: the custom ops stay opaque calls (no graph break), outputs
    and gradients equal eager's. In "ieee" precision: with bf16 operands, Inductor's silu (one fp32 ulp from
    eager's) moves a few operands across a bf16 rounding boundary, which is bf16's error, not the op's."""
    xs, gy, gT = make_inputs(20, 45, 64, seed=7, device="cuda")
    xs = [x.float() for x in xs]

    def f(gi, h0, w_hh, b_hh):
        hs, hT = gru_scan(torch.nn.functional.silu(gi), h0, w_hh, b_hh, precision="ieee")
        return hs * 2.0, hT

    eager = outputs_and_grads(f, xs, gy, gT)
    torch._dynamo.reset()
    compiled = outputs_and_grads(torch.compile(f, fullgraph=True), xs, gy, gT)
    for name in NAMES:
        assert_close(f"{name} (compiled vs eager)", compiled[name], eager[name], 1e-5 * eager[name].abs().max())


@pytest.mark.gpu
def test_gpu_deterministic():
    """Two runs on the same inputs give bitwise-equal outputs and gradients (no atomics anywhere)."""
    xs, gy, gT = make_inputs(64, 100, 128, seed=8, device="cuda")
    xs = [x.float() for x in xs]
    a = outputs_and_grads(gru_scan, xs, gy, gT)
    b = outputs_and_grads(gru_scan, xs, gy, gT)
    for name in NAMES:
        assert torch.equal(a[name], b[name]), f"{name}: two runs differ"
