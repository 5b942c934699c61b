"""kernels.conv: `causal_conv1d_silu` (Triton) against the fp64 F.conv1d definition, in a Mamba-2 layer, and compiled.

Without a GPU the kernels run in Triton's interpreter (kernels/triton_interp.py) on fp32 inputs: the interpreter
truncates fp32 -> bf16 casts, so bf16 runs only on the GPU (`gpu` tests, skipped without CUDA). Tolerances are on
err_ratio (rms of the error over rms of the reference): fp32 accumulation of W <= 8 terms and fp32 sums over
B * T rows for the weight gradients; bf16 storage of y and dx.
"""
import pytest
import torch

import models
from kernels import conv as kconv
from kernels import triton_interp
from kernels.conv import causal_conv1d_silu, causal_conv1d_silu_ref
from numerics import assert_ratio

FP32_TOL = 2e-6
BF16_TOL = 1e-2           # y and dx stored in bf16 (8 bits); the fp32 products of bf16 x are exact
FP16_TOL = 2e-3           # ... in fp16 (11 bits)
PARAM_GRAD_TOL = 1e-4     # dweight, dbias (fp32) on GPU: fp32 sums over B * T rows of fp32 products


@pytest.fixture
def interp():
    pytest.importorskip("triton", reason="triton is not installed: the interpreter tests need it")
    problem = triton_interp.problem()
    if problem is not None:
        pytest.skip(f"Triton's CPU interpreter is unusable here: {problem}")
    with triton_interp.cpu_interpreter("test"):
        yield


PAD_T, PAD_D = 3, 5   # a strided x sits at [:, PAD_T:, 2:D + 2] of a (B, T + PAD_T, D + PAD_D) buffer


def make(B, T, D, W, bias=True, seed=0, device="cpu", strided=True):
    """fp64 x, weight, bias, cotangent. A strided x is a slice of a wider buffer in time and channels, as Mamba-2's
    xBC is a column slice of the in_proj output: its batch stride is not T times its time stride."""
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    wide = torch.randn(B, T + PAD_T, D + PAD_D, **f64).to(device) if strided else None
    x = wide[:, PAD_T:, 2:D + 2] if strided else torch.randn(B, T, D, **f64).to(device)
    w = torch.randn(D, W, **f64) * W ** -0.5
    b = torch.randn(D, **f64) if bias else None
    gy = torch.randn(B, T, D, **f64)
    return [x] + [t if t is None else t.to(device) for t in (w, b, gy)]


def outputs_and_grads(fn, x, w, b, gy, dtype, x_dtype=None):
    """fn(x, w, b)'s y and the gradients of x, w, b, with w and b in dtype and x in x_dtype (default dtype). A
    strided x (make's) is handed to fn as the same slice of a zeroed buffer, so the kernels read its strides;
    no gradient may reach the rest of that buffer."""
    B, T, D = x.shape
    if x.is_contiguous():
        buf = xl = x.to(x_dtype or dtype).detach().requires_grad_()
    else:
        buf = torch.zeros(B, T + PAD_T, D + PAD_D, dtype=x_dtype or dtype, device=x.device)
        buf[:, PAD_T:, 2:D + 2] = x
        xl = buf.requires_grad_()[:, PAD_T:, 2:D + 2]
        assert xl.stride() == x.stride()
    ws = [t if t is None else t.to(dtype).detach().requires_grad_() for t in (w, b)]
    y = fn(xl, *ws)
    y.backward(gy.to(y.dtype))
    gx = buf.grad
    if buf is not xl:
        gx, rest = gx[:, PAD_T:, 2:D + 2].clone(), gx.clone()
        rest[:, PAD_T:, 2:D + 2] = 0
        assert not rest.any(), "a gradient reached the buffer outside x's slice"
    return [y, gx] + [t.grad for t in ws if t is not None]


def check(got, ref, tol, what, names=("y", "dx", "dweight", "dbias")):
    for name, a, r in zip(names, got, ref):
        assert_ratio(f"{what}: {name}", a.double(), r.double(), tol)


CASES = [(1, 1, 5, 4), (1, 40, 130, 4), (3, 9, 7, 1), (1, 5, 3, 8), (1, 97, 16, 2), (2, 300, 9, 3),
         (1, 140, 3, 5), (1, 140, 3, 6), (1, 140, 3, 7), (1, 140, 3, 8)]


@pytest.mark.parametrize("B,T,D,W", CASES, ids=[f"B{b}-T{t}-D{d}-W{w}" for b, t, d, w in CASES])
def test_matches_fp64_definition(interp, B, T, D, W):
    """Single step, T shorter than the width, odd D past one channel tile, T over two and four step tiles (the
    last one partial) and over two or three programs of the backward, every W from 1 to 8."""
    x, w, b, gy = make(B, T, D, W)
    ref = outputs_and_grads(causal_conv1d_silu_ref, x, w, b, gy, torch.float64)
    got = outputs_and_grads(causal_conv1d_silu, x, w, b, gy, torch.float32)
    check(got, ref, FP32_TOL, f"{(B, T, D, W)}")


def test_without_bias_and_contiguous_input(interp):
    x, w, _, gy = make(2, 20, 9, 4, bias=False, strided=False)
    ref = outputs_and_grads(causal_conv1d_silu_ref, x, w, None, gy, torch.float64)
    got = outputs_and_grads(causal_conv1d_silu, x, w, None, gy, torch.float32)
    check(got, ref, FP32_TOL, "no bias")


def test_channel_strided_input_is_copied(interp):
    """x whose channels are not contiguous (every second column) is copied inside the op: the same numbers."""
    x, w, b, gy = make(2, 9, 5, 3, strided=False)
    wide = torch.zeros(2, 9, 10, dtype=torch.float64)
    wide[..., ::2] = x
    ref = outputs_and_grads(causal_conv1d_silu_ref, x, w, b, gy, torch.float64)
    xs = wide.float().requires_grad_()
    wf, bf = w.float().requires_grad_(), b.float().requires_grad_()
    y = causal_conv1d_silu(xs[..., ::2], wf, bf)
    y.backward(gy.float())
    check([y, xs.grad[..., ::2], wf.grad, bf.grad], ref, FP32_TOL, "channel-strided x")
    assert not xs.grad[..., 1::2].any()


def test_compile_fullgraph_no_graph_break(interp):
    """Custom ops with fake and autograd implementations: one graph, the same numbers as eager."""
    x, w, b, gy = make(2, 11, 6, 4)
    eager = outputs_and_grads(causal_conv1d_silu, x, w, b, gy, torch.float32)
    compiled = outputs_and_grads(torch.compile(causal_conv1d_silu, fullgraph=True, backend="aot_eager"),
                                 x, w, b, gy, torch.float32)
    for a, r in zip(compiled, eager):
        assert torch.equal(a, r)


@pytest.fixture
def conv_calls(monkeypatch):
    """Counts the layer's calls of kernels.conv.causal_conv1d_silu (traced calls count once per trace)."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return causal_conv1d_silu(*args, **kwargs)
    monkeypatch.setattr(kconv, "causal_conv1d_silu", spy)
    return calls


def test_mamba2_layer_triton_conv_matches_torch_conv(interp, conv_calls):
    """A Mamba-2 layer with conv_impl 'triton' (run by the interpreter here) against the PyTorch conv: outputs,
    input gradient and the conv's own parameter gradients; the carried conv state is the same tensor. The
    'triton' runs reach the kernels, the 'torch' runs do not."""
    torch.manual_seed(0)
    layer = models.Mamba2(16, d_state=8, headdim=8)
    u = torch.randn(2, 13, 16, requires_grad=True)
    res = {}
    for impl in ("triton", "torch"):
        layer.conv_impl = impl
        layer.zero_grad(set_to_none=True)
        assert layer.conv_path(u.new_empty(1, 1, layer.conv_dim)) == impl
        y, st = layer(u, return_state=True)
        (gu,) = torch.autograd.grad(y.square().sum(), u, retain_graph=True)
        y.square().sum().backward()
        res[impl] = (y, gu, layer.conv1d.weight.grad.clone(), layer.conv1d.bias.grad.clone(), st["mamba_conv_state"])
        assert len(conv_calls) == 1, f"after conv_impl {impl!r}: {len(conv_calls)} kernel calls (1 expected)"
    for name, a, r in zip(["y", "grad u", "grad conv weight", "grad conv bias"], res["triton"], res["torch"]):
        assert_ratio(f"Mamba2 triton vs torch conv: {name}", a, r, 1e-5)
    assert torch.equal(res["triton"][4], res["torch"][4])


def test_conv_paths(interp):
    """'auto' under compile and 'triton' take the kernels where they run; a carried state or fp64 takes torch."""
    layer = models.Mamba2(16, d_state=8, headdim=8)
    xbc = torch.empty(1, 1, layer.conv_dim)
    assert layer.conv_path(xbc, compiled=True) == "triton"
    assert layer.conv_path(xbc, torch.zeros(1, layer.conv_dim, layer.d_conv), compiled=True) == "torch"
    assert layer.conv_path(xbc.double(), compiled=True) == "torch"
    layer.conv_impl = "triton"
    assert layer.conv_path(xbc) == "triton"


def test_forced_triton_outside_its_reach_falls_back_and_logs(monkeypatch, caplog):
    """Without CUDA (and outside the interpreter hook) 'triton' runs the PyTorch conv and says so once."""
    import models.mamba2 as m2
    monkeypatch.setattr(m2, "_LOGGED", set())
    layer = models.Mamba2(16, d_state=8, headdim=8, conv_impl="triton")
    with caplog.at_level("WARNING", logger="models.mamba2"):
        assert layer.conv_path(torch.empty(1, 1, layer.conv_dim)) == "torch"
    assert "the Triton conv does not apply here (x must be a CUDA tensor, got cpu" in caplog.text


def test_forced_triton_off_its_reach_compiles_in_one_graph():
    """The fallback is said from eager calls only: a traced call must not reach the logger (Dynamo cannot trace
    it), so a compiled layer with conv_impl 'triton' on the CPU is one graph on the PyTorch conv."""
    layer = models.Mamba2(16, d_state=8, headdim=8, conv_impl="triton")
    u = torch.randn(1, 5, 16)
    y = torch.compile(layer, fullgraph=True, backend="eager")(u)
    assert torch.allclose(y, layer(u), atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.zeros(2, 3)), r"x must be \(B, T, D\)"),
    (dict(x=torch.zeros(1, 0, 4)), r"x must be \(B, T, D\) with B, T, D >= 1"),
    (dict(weight=torch.zeros(5, 4)), r"weight must be \(D, W\) with D = 4"),
    (dict(x=torch.zeros(65536, 1, 4)), "x's batch size must be at most 65535"),
    (dict(weight=torch.zeros(4, 9)), r"1 <= W <= 8"),
    (dict(bias=torch.zeros(3)), r"bias must have shape \(4,\)"),
    (dict(x=torch.zeros(1, 2, 4, dtype=torch.float64)), "x must be float32, bfloat16 or float16"),
    (dict(x=torch.zeros(1, 2, 4, dtype=torch.int32)), "x must be float32"),
    (dict(weight="w"), "weight must be a torch.Tensor"),
    (dict(weight=torch.zeros(4, 4, dtype=torch.int32)), "weight must be a floating tensor, got torch.int32"),
    (dict(bias=torch.zeros(4, device="meta")), "all inputs must be on one device; x is on cpu, bias on meta"),
])
def test_bad_input_is_named(bad, match):
    args = dict(x=torch.zeros(1, 2, 4), weight=torch.zeros(4, 4), bias=torch.zeros(4))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        causal_conv1d_silu(**args)


def test_cpu_tensors_are_refused_outside_the_interpreter():
    pytest.importorskip("triton")
    with pytest.raises(ValueError, match="x must be a CUDA tensor, got cpu; on CPU use causal_conv1d_silu_ref"):
        causal_conv1d_silu(torch.zeros(1, 2, 4), torch.zeros(4, 4))


# ------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("B,T,D,W", [(2, 1000, 1152, 4), (1, 3, 98, 4), (3, 129, 200, 2)],
                         ids=["d512-width", "short", "odd"])
def test_gpu_matches_fp64_definition(dtype, B, T, D, W):
    """The compiled kernels against the fp64 definition: bf16 y and dx within bf16 rounding, the fp32 parameter
    gradients within fp32 sums of rounded inputs (the reference sees the same bf16 x)."""
    x, w, b, gy = make(B, T, D, W, device="cuda")
    x.copy_(x.to(dtype))                          # rounded to dtype in place: still the strided slice
    gy = gy.to(dtype).double()
    ref = outputs_and_grads(causal_conv1d_silu_ref, x, w, b, gy, torch.float64)
    got = outputs_and_grads(causal_conv1d_silu, x, w, b, gy, torch.float32, x_dtype=dtype)
    io_tol = {torch.float32: FP32_TOL, torch.bfloat16: BF16_TOL, torch.float16: FP16_TOL}[dtype]
    check(got[:2], ref[:2], io_tol, f"{dtype} {(B, T, D, W)}")                          # y, dx: stored in dtype
    check(got[2:], ref[2:], PARAM_GRAD_TOL, f"{dtype} {(B, T, D, W)}", names=("dweight", "dbias"))


@pytest.mark.gpu
def test_gpu_offsets_past_int32():
    """B T D > 2^31 elements (4.6 GB a bf16 tensor): the last sequence's offsets pass 2^31 and must be formed in
    int64. Its last 64 steps of y and dx against the fp64 definition on a window that holds their history."""
    B, T, D, W, n = 2, 2 ** 20 + 5, 1100, 4, 64
    assert B * T * D > 2 ** 31
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, T, D, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    w = torch.randn(D, W, device="cuda", generator=g) * W ** -0.5
    b = torch.randn(D, device="cuda", generator=g)
    dy = torch.randn(B, T, D, device="cuda", generator=g).to(torch.bfloat16)
    y = causal_conv1d_silu(x, w, b)
    y.backward(dy)
    lo = T - n - (W - 1)                          # the window's outputs from W - 1 on see their whole history
    xr = x.detach()[-1:, lo:].double().requires_grad_()
    yr = causal_conv1d_silu_ref(xr, w.double(), b.double())
    yr.backward(dy[-1:, lo:].double())
    assert_ratio("y, last steps", y.detach()[-1:, -n:].double(), yr.detach()[:, -n:], BF16_TOL)
    assert_ratio("dx, last steps", x.grad[-1:, -n:].double(), xr.grad[:, -n:], BF16_TOL)


@pytest.mark.gpu
def test_gpu_compiled_mamba2_layer_takes_triton_conv_without_graph_break(conv_calls):
    """A compiled Mamba-2 layer under bf16 autocast takes the Triton conv (fullgraph: no graph break) and agrees
    with the same layer on the PyTorch conv, compiled too."""
    torch.manual_seed(0)
    layer = models.Mamba2(512, d_state=64, headdim=64).cuda()
    u = torch.randn(4, 256, 512, device="cuda")
    assert layer.conv_path(u.new_empty(1, 1, layer.conv_dim).bfloat16(), compiled=True) == "triton"
    res = {}
    for impl in ("auto", "torch"):
        layer.conv_impl = impl
        layer.zero_grad(set_to_none=True)
        torch._dynamo.reset()
        f = torch.compile(layer, fullgraph=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = f(u)
        y.float().square().mean().backward()
        res[impl] = (y.float(), layer.conv1d.weight.grad.clone(), layer.in_proj.weight.grad.clone())
        assert len(conv_calls) >= 1, f"conv_impl {impl!r}: the compiled layer never reached the Triton conv"
    for name, a, r in zip(["y", "grad conv weight", "grad in_proj"], res["auto"], res["torch"]):
        assert_ratio(f"compiled Mamba2, triton vs torch conv: {name}", a, r, 2e-2)


def test_bench_refuses_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("has CUDA: the GPU test below runs the bench")
    from gt_pipeline.engine import conv_bench
    with pytest.raises(SystemExit, match="gt_pipeline.engine.conv_bench: needs a CUDA GPU"):
        conv_bench.main([])


@pytest.mark.gpu
def test_gpu_bench_prints_every_contender(capsys):
    import json

    from gt_pipeline.engine import conv_bench
    conv_bench.main(["--B", "2", "--T", "64", "--d-model", "64", "--d-state", "32", "--reps", "3"])
    out = json.loads(capsys.readouterr().out)
    assert out["shape"]["conv_dim"] == 2 * 64 + 2 * 32
    assert {"triton", "triton_compiled", "torch_compiled"} <= set(out["timings"])
    for t in out["timings"].values():
        assert t["forward"]["median_ms"] > 0 and t["forward_backward"]["median_ms"] > 0
        assert 0 < t["forward"]["gpu_ms"] < t["forward_backward"]["gpu_ms"]
    assert out["kernel_stats"]["backward"]["registers"] > 0 and out["kernel_stats"]["forward"]["registers"] > 0


@pytest.mark.gpu
def test_gpu_bench_sweep_restores_the_shipped_configuration(capsys):
    import json

    from gt_pipeline.engine import conv_bench
    shipped = kconv._BWD_BT, kconv._BWD_TILES, kconv._BWD_WARPS
    conv_bench.main(["--B", "2", "--T", "300", "--d-model", "64", "--d-state", "32", "--reps", "3", "--sweep"])
    rows = json.loads(capsys.readouterr().out)["sweep"]
    assert [(r["tile"][0], r["tiles_per_program"], r["num_warps"]) for r in rows] == conv_bench.SWEEP
    for r in rows:
        assert r["gpu_ms"] > 0 and r["backward"]["registers"] > 0
        assert r["max_abs_diff"] < 1e-2       # the same gradients: bf16 dx may round the other way, sums reorder
    assert (kconv._BWD_BT, kconv._BWD_TILES, kconv._BWD_WARPS) == shipped
