"""wkv6 CUDA backend against the float64 sequential reference (run on the GPU in float64):
fp32 and bf16 inputs, outputs, final state and every gradient; long sequences; extreme decays;
CPU/CUDA parity; determinism. Marked `gpu`: tests/conftest.py skips them without CUDA."""
from __future__ import annotations

import functools
import importlib

import pytest
import torch

import kernels
import wkv6_cases
from kernels import wkv6, wkv6_ref
from wkv6_cases import assert_close, assert_matches_reference, run_with_grads

pytestmark = pytest.mark.gpu
wkv6_mod = importlib.import_module("kernels.wkv6")  # the module (the package exports the function under its name)

NAMES = ("y", "state", "r", "k", "v", "w", "u", "h0")
F32, BF16 = torch.float32, torch.bfloat16

# Tolerance on max|err| / max(max|ref|, 1), the reference being float64 on the *same rounded inputs*.
# fp32: fp32 state and accumulation; sums of <= T*K O(1) terms carry ~1e-6 relative error at the
# lengths used here, so 1e-4 leaves margin; gw (difference of running sums of fp32 products) 3e-4.
# bf16 I/O: y, gr, gk, gv, gw are *rounded to bf16* on output (relative spacing 2^-8 = 3.9e-3, so
# rounding alone reaches 2e-3 of an element); 1e-2 of the tensor's max allows that plus fp32
# accumulation. The final state, gu and gh0 stay fp32 (the bf16 path changes only the I/O).
TOL = {
    "fp32": {**dict.fromkeys(NAMES, 1e-4), "w": 3e-4},
    "bf16": {**dict.fromkeys(("y", "r", "k", "v", "w"), 1e-2), "state": 1e-4, "u": 1e-4, "h0": 1e-4},
}


make_inputs = functools.partial(wkv6_cases.make_inputs, device="cuda")


def cast(x, io_dtype, w_dtype=None):
    """Inputs for the kernel: r, k, v (and w unless w_dtype) in io_dtype; u, h0 fp32."""
    out = {n: x[n].to(io_dtype) for n in "rkv"}
    out["w"] = x["w"].to(w_dtype or io_dtype)
    out["u"], out["h0"] = x["u"].float(), x["h0"].float()
    return out


def with_impl(impl):
    return functools.partial(wkv6, impl=impl)


def check_against_reference(x_kernel, cot, tol, use_h0=True, impl="auto"):
    # the cotangents too are rounded as the kernel will see them (gy in the I/O dtype, gs fp32)
    cot = {"gy": cot["gy"].to(x_kernel["v"].dtype).double(), "gs": cot["gs"].float().double()}
    ref = run_with_grads(wkv6_ref, {n: t.double() for n, t in x_kernel.items()}, cot, use_h0)
    got = run_with_grads(with_impl(impl), x_kernel, cot, use_h0)
    assert_matches_reference(got, ref, tol, use_h0)


# (B, T, H, N): T = 1; odd T not a multiple of any staging chunk; every supported head size.
SHAPES = [(1, 1, 1, 64), (2, 67, 3, 64), (3, 33, 2, 32), (1, 45, 2, 128), (2, 200, 2, 64)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-H{}-N{}".format(*s))
@pytest.mark.parametrize("io", ["fp32", "bf16", "bf16_w32"])
@pytest.mark.parametrize("use_h0", [True, False], ids=["h0", "no_h0"])
def test_cuda_matches_reference(shape, io, use_h0):
    x, cot = make_inputs(*shape, seed=sum(shape))
    if io == "fp32":
        xk, tol = cast(x, F32), TOL["fp32"]
    elif io == "bf16":
        xk, tol = cast(x, BF16), TOL["bf16"]
    else:  # bf16 r, k, v with fp32 w (the precise-decay mode)
        xk, tol = cast(x, BF16, F32), {**TOL["bf16"], "w": 3e-4}
    check_against_reference(xk, cot, tol, use_h0, impl="sequential")


# ---- the chunked tensor-core kernels (bf16 r, k, v, K = V = 64): same reference, same tolerances.
# T around the chunk length 16 (1, 15, 16, 17), several chunks with a ragged tail, and long runs.
CHUNK_SHAPES = [(1, 1, 1, 64), (2, 15, 2, 64), (2, 16, 1, 64), (3, 17, 2, 64), (2, 67, 3, 64), (1, 200, 2, 64)]


@pytest.mark.parametrize("shape", CHUNK_SHAPES, ids=lambda s: "B{}-T{}-H{}-N{}".format(*s))
@pytest.mark.parametrize("io", ["bf16", "bf16_w32"])
@pytest.mark.parametrize("use_h0", [True, False], ids=["h0", "no_h0"])
def test_chunked_matches_reference(shape, io, use_h0):
    x, cot = make_inputs(*shape, seed=sum(shape) + 1)
    xk, tol = (cast(x, BF16), TOL["bf16"]) if io == "bf16" else (cast(x, BF16, F32), {**TOL["bf16"], "w": 3e-4})
    check_against_reference(xk, cot, tol, use_h0, impl="chunked")


@pytest.mark.parametrize("w_range", [(3.0, 5.0), (-12.0, -8.0), (-8.0, 5.0), (8.0, 12.0)],
                         ids=["strong", "weak", "mixed", "vanishing"])
def test_chunked_extreme_decays(w_range):
    """Log-decays from -6e-6 to -1.6e5 (decay 0 in fp32): every exponent stays <= 0, nothing overflows."""
    x, cot = make_inputs(2, 150, 2, 64, seed=7, w_range=w_range)
    check_against_reference(cast(x, BF16, F32), cot, {**TOL["bf16"], "w": 3e-4}, impl="chunked")


def test_chunked_long_sequence():
    """T = 16384, slow and fast decays, bf16 r, k, v with fp32 w, against the float64 reference."""
    x, cot = make_inputs(1, 16384, 2, 64, seed=11, w_range=(-9.0, 1.0))
    check_against_reference(cast(x, BF16, F32), cot, {**TOL["bf16"], "w": 1e-3}, impl="chunked")


@pytest.mark.parametrize("shape", [(4, 300, 4), (48, 40, 8)], ids=["B4-T300-H4", "B48-T40-H8"])
def test_chunked_matches_sequential_kernel(shape):
    """The two CUDA implementations on identical bf16 inputs (the sequential one is the reference backend). The
    second shape launches more backward blocks (2 B H = 768) than an H200 holds at once, so sweeps of one (b, h)
    run apart in time as well as side by side."""
    x, cot = make_inputs(*shape, 64, seed=13, w_range=(-6.0, 1.0))
    xk = cast(x, BF16)
    a = run_with_grads(with_impl("chunked"), xk, cot)
    b = run_with_grads(with_impl("sequential"), xk, cot)
    for name in NAMES:
        assert_close(name, a[name], b[name], TOL["bf16"][name])


def test_chunked_state_chaining_equals_one_pass():
    x, cot = make_inputs(1, 90, 2, 64, seed=6)
    xk = cast(x, BF16, F32)
    one = run_with_grads(with_impl("chunked"), xk, cot)

    def chained(r, k, v, w, u, h0, _out):
        y1, s1 = wkv6(r[:, :37], k[:, :37], v[:, :37], w[:, :37], u, h0, True, impl="chunked")
        y2, s2 = wkv6(r[:, 37:], k[:, 37:], v[:, 37:], w[:, 37:], u, s1, True, impl="chunked")
        return torch.cat([y1, y2], dim=1), s2

    two = run_with_grads(chained, xk, cot)
    for name in NAMES:
        assert_close(name, two[name], one[name], {**TOL["bf16"], "w": 3e-4}[name])


# ---- one decay per head (w [B, T, H, 1], Mamba-2's scalar decay): the chunked kernels read it as is.
def head_decay(x):
    return {**x, "w": x["w"][..., :1].contiguous()}


@pytest.mark.parametrize("shape", [(2, 67, 3, 64), (3, 17, 2, 64), (1, 200, 2, 64)],
                         ids=lambda s: "B{}-T{}-H{}-N{}".format(*s))
@pytest.mark.parametrize("io", ["bf16", "bf16_w32"])
def test_chunked_head_decay_matches_reference(shape, io):
    x, cot = make_inputs(*shape, seed=sum(shape) + 2)
    xk = head_decay(cast(x, BF16) if io == "bf16" else cast(x, BF16, F32))
    tol = TOL["bf16"] if io == "bf16" else {**TOL["bf16"], "w": 3e-4}
    check_against_reference(xk, cot, tol, impl="chunked")


@pytest.mark.parametrize("w_range", [(3.0, 5.0), (-12.0, -8.0), (8.0, 12.0)], ids=["strong", "weak", "vanishing"])
def test_chunked_head_decay_extreme_decays(w_range):
    x, cot = make_inputs(2, 150, 2, 64, seed=8, w_range=w_range)
    check_against_reference(head_decay(cast(x, BF16, F32)), cot, {**TOL["bf16"], "w": 3e-4}, impl="chunked")


def test_chunked_head_decay_long_sequence():
    x, cot = make_inputs(1, 16384, 2, 64, seed=12, w_range=(-9.0, 1.0))
    check_against_reference(head_decay(cast(x, BF16, F32)), cot, {**TOL["bf16"], "w": 1e-3}, impl="chunked")


@pytest.mark.parametrize("shape", [(2, 67, 3, 64), (4, 1030, 4, 64)], ids=["B2-T67-H3", "B4-T1030-H4"])
def test_chunked_head_decay_equals_the_expanded_decay(shape):
    """Against the per-channel kernels on w expanded over K. The head kernels form the intra-chunk sums as
    matrix products and the per-channel ones elementwise, so the two differ by fp32 summation order only:
    the bf16 outputs by at most one rounding step (2^-7 relative), the fp32 ones (state, gu, gh0) to 1e-5 of
    their scale. gw is the expanded gw summed over the channels, to 1e-4 of its scale (the fp64 reference
    allows 3e-4); a term missing or counted twice would miss these by orders of magnitude."""
    x, cot = make_inputs(*shape, seed=21, w_range=(-6.0, 2.0))
    xk = head_decay(cast(x, BF16, F32))
    head = run_with_grads(with_impl("chunked"), xk, cot)
    full = run_with_grads(with_impl("chunked"), {**xk, "w": xk["w"].expand(*shape).contiguous()}, cot)
    for name in NAMES:
        if name == "w":
            continue
        got, want = head[name].double(), full[name].double()
        scale = want.abs().max().item()
        if name in ("y", "r", "k", "v"):
            bound = 2.0 ** -7 * want.abs() + 1e-5 * scale
        else:
            bound = torch.full_like(want, 1e-5 * scale)
        assert ((got - want).abs() <= bound).all(), (name, ((got - want).abs() / bound).max().item())
    want = full["w"].double().sum(-1, keepdim=True)
    err = (head["w"].double() - want).abs().max().item()
    assert want.abs().max() > 1.0
    assert err <= 1e-4 * want.abs().max().item(), (err, want.abs().max().item())


def test_chunked_kernels_fit_two_blocks_per_sm():
    """The chunked kernels are built for two resident blocks per SM (the backward runs both sweeps of a sequence
    side by side): shared memory or registers grown past that would halve what the GPU overlaps."""
    occ = kernels.build.get_extension("cuda").chunk_occupancy()
    assert {k: occ[k] for k in ("forward", "backward", "forward_head", "backward_head")} == dict.fromkeys(
        ("forward", "backward", "forward_head", "backward_head"), 2), occ


def test_chunked_rejects_what_it_cannot_run():
    x, _ = make_inputs(1, 5, 2, 32)
    xk = cast(x, BF16)
    with pytest.raises(ValueError, match="impl='chunked' needs CUDA bfloat16"):
        wkv6(xk["r"], xk["k"], xk["v"], xk["w"], xk["u"], impl="chunked")
    x, _ = make_inputs(1, 5, 2, 64)
    xk = cast(x, F32)
    with pytest.raises(ValueError, match="impl='chunked' needs CUDA bfloat16"):
        wkv6(xk["r"], xk["k"], xk["v"], xk["w"], xk["u"], impl="chunked")


def chunk_scores_fp64(x):
    """Each chunk's intra-chunk scores [B, H, chunks, 16, 16] in float64 from the kernel's (rounded) r, k, w, u:
    A_ts = sum_i r_t[i] k_s[i] exp(sum_{s<m<t} lw_m[i]) for s < t, A_tt = sum_i r_t[i] u[i] k_t[i], zero above the
    diagonal; lw = max(-exp(w), -1e4), steps past T zero with lw = 0."""
    r, k, u = x["r"].double(), x["k"].double(), x["u"].double()
    B, T, H, K = r.shape
    lw = (-torch.exp(x["w"].double())).clamp_min(-1e4).expand(B, T, H, K)
    n = -(-T // 16)
    pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, 0, 0, 16 * n - T)).view(B, n, 16, H, K)
    r, k, lw = pad(r), pad(k), pad(lw)
    incl = lw.cumsum(2)                                          # sum_{m<=s} lw_m within the chunk
    gap = (incl - lw).unsqueeze(3) - incl.unsqueeze(2)           # [B, n, t, s, H, K]: sum_{s<m<t} lw_m for s < t
    below = torch.ones(16, 16, dtype=torch.bool, device=r.device).tril(-1).view(1, 1, 16, 16, 1, 1)
    f = torch.where(below, gap.clamp_max(0.0).exp(), torch.zeros((), dtype=r.dtype, device=r.device))
    A = torch.einsum("bntshi,bnthi,bnshi->bhnts", f, r, k)
    diag = torch.einsum("bnthi,hi,bnthi->bhnt", r, u, k)
    return A + torch.diag_embed(diag)


@pytest.mark.parametrize("decay", ["channel", "head"])
@pytest.mark.parametrize("w_range", [(-3.0, 1.0), (-8.0, 5.0)], ids=["default", "mixed"])
def test_chunked_forward_saves_the_chunks_scores(decay, w_range):
    """The scores the chunked forward hands to the backward (chunk_scores_kernel with one decay per channel, the
    forward itself with one per head), as the bf16 pair hi + lo, against float64; a ragged last chunk included."""
    x, _ = make_inputs(2, 37, 3, 64, seed=21, w_range=w_range)
    xk = cast(x, BF16, F32)
    if decay == "head":
        xk = head_decay(xk)
    y, _, scores = wkv6_mod._wkv6_fwd(xk["r"], xk["k"], xk["v"], xk["w"], xk["u"], None, True, True)
    assert scores.dtype == BF16 and scores.numel() == wkv6_mod.chunk_scores_numel(2, 37, 3) == 2 * 3 * 3 * 512
    got = scores.view(2, 3, 3, 2, 16, 16).double().sum(3)
    want = chunk_scores_fp64(xk)
    err = (got - want).abs().max().item()
    assert err <= 1e-5 * want.abs().max().item(), (err, want.abs().max().item())  # hi + lo: 2^-18 relative
    # without a backward to come, the per-head forward keeps nothing and the output is the same
    y2, _, none = wkv6_mod._wkv6_fwd(xk["r"], xk["k"], xk["v"], xk["w"], xk["u"], None, True, False)
    assert none.numel() == 0 and torch.equal(y, y2)
    # through wkv6: kept for the backward only when one can follow
    leaf = {n: t.clone().requires_grad_(n == "v") for n, t in xk.items()}
    y3, _ = wkv6(leaf["r"], leaf["k"], leaf["v"], leaf["w"], leaf["u"], impl="chunked")
    assert torch.equal(y3, y) and torch.equal(y3.grad_fn.saved_tensors[-1], scores)
    with torch.no_grad():
        assert torch.equal(wkv6(leaf["r"], leaf["k"], leaf["v"], leaf["w"], leaf["u"], impl="chunked")[0], y)


def test_chunked_backward_needs_its_forwards_scores():
    x, cot = make_inputs(1, 20, 2, 64, seed=22)
    xk = cast(x, BF16)
    gy, gs = cot["gy"].to(BF16), cot["gs"].float()
    args = (xk["r"], xk["k"], xk["v"], xk["w"], xk["u"], None, gy, gs, True)
    for bad in (torch.empty(0, dtype=BF16, device="cuda"), torch.zeros(1024, dtype=BF16, device="cuda"),
                torch.zeros(2 * 2 * 1024, dtype=F32, device="cuda"), torch.zeros(2 * 2 * 512, dtype=BF16)):
        with pytest.raises(ValueError, match=r"needs the scores its forward saved .*bfloat16 \[2048\] on cuda"):
            wkv6_mod._wkv6_bwd(*args, bad)
    # the forward's own scores pass the check, and the gradients match the autograd path's
    _, _, scores = wkv6_mod._wkv6_fwd(xk["r"], xk["k"], xk["v"], xk["w"], xk["u"], None, True, True)
    direct = wkv6_mod._wkv6_bwd(*args, scores)
    via = run_with_grads(with_impl("chunked"), xk, cot, use_h0=False)
    for name, g in zip("rkvwu", direct):
        assert torch.equal(g.double(), via[name]), name


@pytest.mark.parametrize("w_range", [(3.0, 5.0), (-12.0, -8.0), (-8.0, 5.0)], ids=["strong", "weak", "mixed"])
def test_cuda_extreme_decays(w_range):
    x, cot = make_inputs(2, 150, 2, 64, seed=7, w_range=w_range)
    check_against_reference(cast(x, F32), cot, TOL["fp32"])


def test_cuda_long_sequence_fp32():
    """T = 16384 with slow decays (state magnitudes grow ~1/(1-d)) and fast ones: no overflow,
    still within fp32 tolerance of the float64 reference (which runs on the GPU)."""
    x, cot = make_inputs(1, 16384, 2, 64, seed=11, w_range=(-9.0, 1.0))
    check_against_reference(cast(x, F32), cot, {**TOL["fp32"], "w": 1e-3})


def test_cuda_long_sequence_bf16_finite():
    x, cot = make_inputs(2, 16384, 4, 64, seed=12, w_range=(-9.0, 1.0))
    xk = cast(x, BF16)
    got = run_with_grads(wkv6, xk, cot)
    for name in NAMES:
        assert torch.isfinite(got[name]).all(), f"{name}: non-finite at T=16384"


def test_cuda_matches_cpu_backend():
    x, cot = make_inputs(2, 50, 2, 64, seed=3)
    xk = cast(x, F32)
    gpu = run_with_grads(wkv6, xk, cot)
    cpu = run_with_grads(wkv6, {n: t.cpu() for n, t in xk.items()}, {n: t.cpu() for n, t in cot.items()})
    for name in NAMES:
        assert_close(name, gpu[name], cpu[name].to(gpu[name].device), 1e-4)


def test_cuda_deterministic():
    x, cot = make_inputs(2, 100, 2, 64, seed=4)
    xk = cast(x, BF16)
    a, b = run_with_grads(wkv6, xk, cot), run_with_grads(wkv6, xk, cot)
    for name in NAMES:
        assert torch.equal(a[name], b[name]), f"{name}: two runs differ"


def test_cuda_state_chaining_equals_one_pass():
    x, cot = make_inputs(1, 90, 2, 64, seed=6)
    xk = cast(x, F32)
    one = run_with_grads(wkv6, xk, cot)

    def chained(r, k, v, w, u, h0, _out):
        y1, s1 = wkv6(r[:, :37], k[:, :37], v[:, :37], w[:, :37], u, h0, True)
        y2, s2 = wkv6(r[:, 37:], k[:, 37:], v[:, 37:], w[:, 37:], u, s1, True)
        return torch.cat([y1, y2], dim=1), s2

    two = run_with_grads(chained, xk, cot)
    for name in NAMES:
        assert_close(name, two[name], one[name], 1e-5)


@pytest.mark.parametrize(
    "kind, match",
    [("head48", "head sizes K = V in"), ("fp64", "CUDA backend supports float32 and bfloat16"),
     ("mixed_device", "all inputs must be on one device")],
)
def test_cuda_bad_input(kind, match):
    N = 48 if kind == "head48" else 64
    x, _ = make_inputs(1, 5, 2, N)
    xk = {n: t.double() for n, t in x.items()} if kind == "fp64" else cast(x, F32)
    if kind == "mixed_device":
        xk["u"] = xk["u"].cpu()
    with pytest.raises(ValueError, match=match):
        wkv6(xk["r"], xk["k"], xk["v"], xk["w"], xk["u"], xk["h0"])


def test_cuda_build_and_smoke_test():
    info = kernels.build_extension("cuda")
    assert info["backend"] == "cuda" and info["arch"].startswith("sm_")
    assert kernels.build_extension("cuda")["cache_hit"] is True
    res = kernels.smoke_test("cuda")
    assert res["passed"], res
