"""wkv6 on the CPU: references against each other and a brute force, the C++ backend against the
float64 sequential reference (outputs, final state, every gradient), gradcheck, state chaining,
input validation, build caching and import cost. All shapes are small (2-core CI machine)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import kernels
from kernels import wkv6, wkv6_chunked_ref, wkv6_ref
from wkv6_cases import GRAD_NAMES, assert_close, assert_matches_reference, make_inputs, run_with_grads




def brute_force(r, k, v, w, u, h0):
    """O(T^2) closed form: y_t = r_t (diag(u) k_t^T v_t + sum_{s<t} diag(prod_{s<tau<t} d_tau) k_s^T v_s
    + diag(prod_{tau<t} d_tau) h0). Independent of the recurrence code in kernels/reference.py."""
    B, T, H, K = r.shape
    d = torch.exp(-torch.exp(w))
    y = torch.zeros(B, T, H, v.shape[-1], dtype=r.dtype)
    for t in range(T):
        acc = u[None, :, :, None] * k[:, t, :, :, None] * v[:, t, :, None, :]
        for s in range(t):
            dec = torch.prod(d[:, s + 1 : t], dim=1) if t > s + 1 else torch.ones_like(d[:, 0])
            acc = acc + dec[..., None] * k[:, s, :, :, None] * v[:, s, :, None, :]
        dec0 = torch.prod(d[:, :t], dim=1) if t > 0 else torch.ones_like(d[:, 0])
        acc = acc + dec0[..., None] * h0
        y[:, t] = torch.einsum("bhk,bhkv->bhv", r[:, t], acc)
    return y


# ---- references ------------------------------------------------------------------------------


def test_sequential_reference_matches_brute_force():
    x, _ = make_inputs(2, 7, 2, 4, 5)
    y, _ = wkv6_ref(x["r"], x["k"], x["v"], x["w"], x["u"], x["h0"])
    assert_close("y", y, brute_force(x["r"], x["k"], x["v"], x["w"], x["u"], x["h0"]), 1e-12)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64], ids=lambda c: f"chunk{c}")
def test_chunked_reference_matches_sequential(chunk_size):
    # T = 37 is not a multiple of any chunk size but 1; strong decays (w up to 3) stress the exponents.
    x, cot = make_inputs(2, 37, 2, 8, 6, w_range=(-6.0, 3.0), seed=1)
    ref = run_with_grads(wkv6_ref, x, cot)
    got = run_with_grads(lambda *a: wkv6_chunked_ref(*a, chunk_size=chunk_size), x, cot)
    for name in ("y", "state") + GRAD_NAMES:
        assert_close(name, got[name], ref[name], 1e-11)


# ---- the C++ backend vs the float64 sequential reference -------------------------------------

# (B, T, H, K, V, dtype). fp64 must agree to rounding (1e-10). fp32 runs with fp32 state and
# accumulation: over T <= 65 steps and K = 64-term dot products the relative error stays ~1e-6,
# so 2e-5 is a 10x margin; gw is a difference of running sums (its running sum is fp64, but a_t and
# b_t are fp32 products), so it gets 5x more.
CASES = [
    (1, 1, 1, 8, 8, torch.float64),      # T = 1
    (2, 17, 3, 16, 16, torch.float64),   # B, H > 1, odd T
    (2, 65, 2, 64, 64, torch.float64),   # head size 64, odd T
    (1, 33, 2, 16, 32, torch.float64),   # K != V
    (3, 31, 2, 64, 64, torch.float32),
    (1, 2, 4, 32, 32, torch.float32),
]
TOL = {torch.float64: dict.fromkeys(("y", "state") + GRAD_NAMES, 1e-10),
       torch.float32: {**dict.fromkeys(("y", "state") + GRAD_NAMES, 2e-5), "w": 1e-4}}


def case_id(c):
    B, T, H, K, V, dt = c
    return f"B{B}-T{T}-H{H}-K{K}-V{V}-{str(dt).replace('torch.', '')}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("use_h0", [True, False], ids=["h0", "no_h0"])
def test_cpu_matches_reference(case, use_h0):
    B, T, H, K, V, dtype = case
    x, cot = make_inputs(B, T, H, K, V, dtype=dtype, seed=T)
    ref = run_with_grads(wkv6_ref, {n: t.double() for n, t in x.items()}, cot, use_h0)
    got = run_with_grads(wkv6, x, cot, use_h0)
    tol = TOL[dtype]
    assert got["y"].shape == (B, T, H, V)
    assert_matches_reference(got, ref, tol, use_h0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("w_range", [(3.0, 5.0), (-12.0, -8.0)], ids=["strong_decay", "weak_decay"])
def test_cpu_extreme_decays(w_range, dtype):
    # strong: d = exp(-e^3..e^5) underflows towards 0, so gw is tiny (~1e-6) while the terms it is
    # built from are O(10): a kernel that forms gw as a difference of undecayed running sums is off
    # by ~5e-3 here in float32. weak: d = exp(-e^-12..e^-8) ~ 1 - 6e-6 (states grow ~linearly).
    x, cot = make_inputs(2, 40, 2, 16, 16, dtype=dtype, seed=3, w_range=w_range)
    ref = run_with_grads(wkv6_ref, {n: t.double() for n, t in x.items()}, cot)
    got = run_with_grads(wkv6, x, cot)
    for name in ("y", "state") + GRAD_NAMES:
        assert_close(name, got[name], ref[name], TOL[dtype][name])


@pytest.mark.parametrize("T", [1, 2, 7], ids=lambda t: f"T{t}")
def test_cpu_gradcheck(T):
    x, _ = make_inputs(2, T, 2, 3, 2, seed=T)
    leaves = [x[n].clone().requires_grad_(True) for n in GRAD_NAMES]

    def fn(r, k, v, w, u, h0):
        return wkv6(r, k, v, w, u, h0, output_final_state=True)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5, rtol=1e-3)


def test_cpu_state_chaining_equals_one_pass():
    """Running [0, 20) then [20, 45) with the state passed on equals one run over [0, 45), gradients
    included (truncated-BPTT style use, which the official kernel cannot do)."""
    x, cot = make_inputs(2, 45, 2, 16, 16, seed=5)
    one = run_with_grads(wkv6, x, cot)

    def chained(r, k, v, w, u, h0, _out):
        y1, s1 = wkv6(r[:, :20], k[:, :20], v[:, :20], w[:, :20], u, h0, True)
        y2, s2 = wkv6(r[:, 20:], k[:, 20:], v[:, 20:], w[:, 20:], u, s1, True)
        return torch.cat([y1, y2], dim=1), s2

    two = run_with_grads(chained, x, cot)
    for name in ("y", "state") + GRAD_NAMES:
        assert_close(name, two[name], one[name], 1e-12)


def test_cpu_output_final_state_flag_and_dtypes():
    x, _ = make_inputs(1, 5, 1, 8, 8, dtype=torch.float32)
    y, s = wkv6(x["r"], x["k"], x["v"], x["w"], x["u"])
    assert s is None and y.dtype == torch.float32 and y.shape == (1, 5, 1, 8)
    _, s = wkv6(x["r"], x["k"], x["v"], x["w"], x["u"], output_final_state=True)
    assert s.dtype == torch.float32 and s.shape == (1, 1, 8, 8)


def test_cpu_non_contiguous_inputs():
    x, cot = make_inputs(2, 9, 3, 8, 8, seed=2)
    # [B, H, T, K] storage viewed as [B, T, H, K]: non-contiguous, same values
    nc = {n: (t.transpose(1, 2).contiguous().transpose(1, 2) if t.dim() == 4 and n != "h0" else t)
          for n, t in x.items()}
    assert not nc["r"].is_contiguous()
    ref = run_with_grads(wkv6_ref, x, cot)
    got = run_with_grads(wkv6, nc, cot)
    for name in ("y", "state") + GRAD_NAMES:
        assert_close(name, got[name], ref[name], 1e-10)


def test_cpu_head_decay_equals_the_expanded_decay():
    """w [B, T, H, 1] (one decay per head) runs as w expanded over K: same outputs, and its gradient is the
    expanded gradient summed over the channels."""
    x, cot = make_inputs(2, 23, 3, 8, 4, seed=5)
    x["w"] = x["w"][..., :1].contiguous()
    head = run_with_grads(wkv6, x, cot)
    x_full = {**x, "w": x["w"].expand(2, 23, 3, 8).contiguous()}
    full = run_with_grads(wkv6, x_full, cot)
    assert head["w"].shape == (2, 23, 3, 1)
    for name in ("y", "state", "r", "k", "v", "u", "h0"):
        torch.testing.assert_close(head[name], full[name], rtol=0, atol=0)
    torch.testing.assert_close(head["w"], full["w"].sum(-1, keepdim=True), rtol=1e-12, atol=1e-12)
    assert head["w"].abs().max() > 0.1


# ---- input validation --------------------------------------------------------------------------


def _good(dtype=torch.float32):
    x, _ = make_inputs(2, 5, 3, 8, 4, dtype=dtype)
    return x


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda x: x.update(r=x["r"][0]), "r must be \\[B, T, H, K\\]"),
        (lambda x: x.update(k=x["k"][:, :4]), "k must have r's shape"),
        (lambda x: x.update(w=x["w"][..., :7]), "w must be \\[B, T, H, K\\] = \\(2, 5, 3, 8\\) .* or \\[B, T, H, 1\\]"),
        (lambda x: x.update(w=x["w"][..., :2]), "one per head\\), got \\(2, 5, 3, 2\\)"),
        (lambda x: x.update(v=x["v"][:1]), "v must be \\[B, T, H, V\\]"),
        (lambda x: x.update(v=x["v"][:, :, :2]), "v must be \\[B, T, H, V\\]"),
        (lambda x: x.update(u=x["u"][:2]), "u must be \\[H, K\\]"),
        (lambda x: x.update(h0=x["h0"][..., :3]), "initial_state must be \\[B, H, K, V\\]"),
        (lambda x: x.update(k=x["k"].double()), "k must have r's dtype"),
        (lambda x: x.update(w=x["w"].double()), "w must have r's dtype"),
        (lambda x: x.update(v=x["v"].to(torch.int32)), "v must be a floating-point tensor"),
        (lambda x: x.update(**{n: x[n].bfloat16() for n in "rkvw"}), "CPU backend supports float32 and float64"),
        (lambda x: x.update(u=x["u"].to("meta")), "all inputs must be on one device"),
        (lambda x: x.update(r=x["r"][:, :0], k=x["k"][:, :0], w=x["w"][:, :0], v=x["v"][:, :0]), ">= 1"),
        (lambda x: x.update(u=x["u"].tolist()), "u must be a torch.Tensor"),
    ],
    ids=["r_rank", "k_T", "w_K", "w_K2", "v_B", "v_H", "u_H", "h0_V", "k_dtype", "w_dtype", "v_int", "cpu_bf16",
         "device_mismatch", "T0", "u_list"],
)
def test_bad_input_raises_value_error(mutate, match):
    x = _good()
    mutate(x)
    with pytest.raises(ValueError, match=match):
        wkv6(x["r"], x["k"], x["v"], x["w"], x["u"], x["h0"], True)


def test_cuda_support_rules_without_a_gpu():
    """The CUDA backend's dtype/head-size rules, checked without a GPU."""
    from kernels.wkv6 import check_backend_support

    bf16, f32, f64 = torch.bfloat16, torch.float32, torch.float64
    check_backend_support("cuda", bf16, bf16, bf16, f32, 64, 64)  # fp32 w with bf16 r is allowed
    with pytest.raises(ValueError, match="head sizes K = V in"):
        check_backend_support("cuda", bf16, bf16, bf16, bf16, 48, 48)
    with pytest.raises(ValueError, match="head sizes K = V in"):
        check_backend_support("cuda", f32, f32, f32, f32, 64, 32)
    with pytest.raises(ValueError, match="CUDA backend supports float32 and bfloat16"):
        check_backend_support("cuda", f64, f64, f64, f64, 64, 64)
    with pytest.raises(ValueError, match="w must have r's dtype"):
        check_backend_support("cuda", f32, f32, f32, bf16, 64, 64)


# ---- build, smoke test, import cost -----------------------------------------------------------


def test_build_extension_cpu_reports_toolchain_and_caches():
    info = kernels.build_extension("cpu")
    assert info["backend"] == "cpu"
    for key in ("arch", "compiler", "torch_version", "cuda_version", "build_dir", "build_seconds", "cache_hit"):
        assert key in info, key
    assert info["torch_version"] == torch.__version__
    again = kernels.build_extension("cpu")
    assert again["cache_hit"] is True and again["build_dir"] == info["build_dir"]
    fp = kernels.toolchain_fingerprint("cpu")
    assert set(fp) >= {"torch_version", "cuda_version", "arch", "source_hash"}
    assert fp["source_hash"] == info["source_hash"]


def test_build_failure_raises_with_compiler_message(tmp_path, monkeypatch):
    import kernels.build as kb

    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "wkv6_cpu.cpp").write_text("this_is_not_cpp_gt_marker;\n")
    monkeypatch.setattr(kb, "CSRC", csrc)
    monkeypatch.setattr(kb, "_LOADED", {})
    monkeypatch.setenv("GT_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="this_is_not_cpp_gt_marker"):
        kb.build_extension("cpu")


def test_smoke_test_cpu_passes():
    res = kernels.smoke_test("cpu")
    assert res["passed"], res
    assert set(res["max_abs_err"]) == {"y", "state", "r", "k", "v", "w", "u", "h0"}


def test_import_is_cheap_and_dagster_free():
    code = textwrap.dedent(
        """
        import sys, kernels, kernels.build as kb
        assert "dagster" not in sys.modules, "kernels imported dagster"
        assert "torch.utils.cpp_extension" not in sys.modules, "import triggered a build"
        assert kb._LOADED == {}
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_toolchain_fingerprint_is_unchanged_by_building():
    """cpp_extension.load appends to the flag lists it is handed; a mutated module constant changed the
    source hash (and so every downstream cache key) after the first build in a process."""
    before = kernels.toolchain_fingerprint("cpu")
    kernels.build_extension("cpu")
    assert kernels.toolchain_fingerprint("cpu") == before


def test_impl_choice_errors_name_the_problem():
    x, _ = make_inputs(1, 4, 1, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="impl must be one of"):
        wkv6(x["r"], x["k"], x["v"], x["w"], x["u"], impl="fast")
    with pytest.raises(ValueError, match="impl='chunked' needs CUDA bfloat16"):
        wkv6(x["r"], x["k"], x["v"], x["w"], x["u"], impl="chunked")
    with pytest.raises(ValueError, match="set_auto_impl takes 'chunked' or 'sequential'"):
        kernels.set_auto_impl("auto")


def test_torch_compile_traces_wkv6_without_graph_breaks():
    """wkv6 goes through registered custom ops, so a compiled caller is one graph (fullgraph=True
    raises on any break) and gives the eager results and gradients."""
    x, cot = make_inputs(2, 9, 2, 8, dtype=torch.float32, seed=5)

    def f(r, k, v, w, u, h0):
        y, s = wkv6(r, k, v, w, u, h0, True)
        return (y * cot["gy"].float()).sum() + (s * cot["gs"].float()).sum()

    eager_in = [x[n].clone().requires_grad_(True) for n in ("r", "k", "v", "w", "u", "h0")]
    comp_in = [x[n].clone().requires_grad_(True) for n in ("r", "k", "v", "w", "u", "h0")]
    want = torch.autograd.grad(f(*eager_in), eager_in)
    got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(*comp_in), comp_in)
    for name, g, w in zip("rkvwu", got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"grad {name}: {m}")
    torch.testing.assert_close(got[5], want[5], rtol=1e-5, atol=1e-5)


def test_pick_impl_takes_chunked_only_where_it_applies():
    """A layer configured for "chunked" gets the sequential kernels where the chunked ones do not apply (here:
    CPU fp32); "auto" and "sequential" pass through; anything else is refused with the choices."""
    x, _ = make_inputs(1, 4, 1, 8, dtype=torch.float32)
    assert kernels.pick_impl("chunked", x["r"]) == "sequential"
    assert kernels.pick_impl("auto", x["r"]) == "auto"
    assert kernels.pick_impl("sequential", x["r"]) == "sequential"
    with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'chunked', 'sequential'\), got 'fast'"):
        kernels.pick_impl("fast", x["r"])
