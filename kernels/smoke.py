"""`smoke_test(backend)`: the compiled extension vs the fp64 sequential reference on one small case.

Checks the output, the final state and the gradients of r, k, v, w, u and the initial state, and
reports per tensor the max abs error and the max abs error relative to the reference's max abs
value. On CUDA it runs every implementation training can pick: the sequential kernels in fp32 and in
bf16 (r, k, v bf16, w fp32, as under autocast) and the chunked tensor-core kernels in bf16; the
reference then runs on the same bf16-rounded inputs. The `wkv6_kernel` asset records this dict;
`passed` is False if any tensor of any case is out of tolerance (the caller decides what a failed smoke
test means; nothing is downgraded here).
"""
from __future__ import annotations

import functools

import torch

from .build import resolve_backend
from .reference import wkv6_ref
from .wkv6 import wkv6

# Relative tolerances (max abs error / max abs reference value). CPU runs in float64, so anything
# above ~1e-12 is a bug. CUDA runs float32 inputs with float32 state: T = 33 steps of O(1) values
# leave ~1e-6 relative error; gw is a difference of running sums, allow 3x more.
TOLERANCE = {
    "cpu": {"y": 1e-10, "state": 1e-10, "r": 1e-10, "k": 1e-10, "v": 1e-10, "w": 1e-10, "u": 1e-10, "h0": 1e-10},
    "cuda": {"y": 1e-4, "state": 1e-4, "r": 1e-4, "k": 1e-4, "v": 1e-4, "w": 3e-4, "u": 1e-4, "h0": 1e-4},
    # bf16 r, k, v (fp32 w): y and the r, k, v gradients are rounded to bf16 on output (2^-8 relative spacing);
    # the state, gw (fp32 w), gu and gh0 stay fp32.
    "cuda_bf16": {"y": 1e-2, "state": 1e-4, "r": 1e-2, "k": 1e-2, "v": 1e-2, "w": 3e-4, "u": 1e-4, "h0": 1e-4},
}
# (name, impl, r/k/v dtype) of every CUDA case: each implementation training can pick.
CUDA_CASES = (("sequential_fp32", "sequential", torch.float32), ("sequential_bf16", "sequential", torch.bfloat16),
              ("chunked_bf16", "chunked", torch.bfloat16))


def _case(B=2, T=33, H=2, K=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=g)
    return {
        "r": torch.randn(B, T, H, K, **f64),
        "k": torch.randn(B, T, H, K, **f64),
        "v": torch.randn(B, T, H, K, **f64),
        "w": torch.rand(B, T, H, K, **f64) * 4 - 3,  # decays from exp(-e^1)=0.07 to exp(-e^-3)=0.95
        "u": torch.randn(H, K, **f64),
        "h0": torch.randn(B, H, K, K, **f64),
        "gy": torch.randn(B, T, H, K, **f64),
        "gs": torch.randn(B, H, K, K, **f64),
    }


def _run(fn, c, device, dtype):
    """Outputs and gradients of `fn` on case `c`: r, k, v in `dtype`, w fp32 beside bf16 (else `dtype`), u and h0
    in the state dtype; returned as fp64 CPU tensors."""
    names = ("r", "k", "v", "w", "u", "h0")
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    dt = {"r": dtype, "k": dtype, "v": dtype, "w": state_dtype if dtype == torch.bfloat16 else dtype,
          "u": state_dtype, "h0": state_dtype}
    x = {n: c[n].to(device=device, dtype=dt[n]).requires_grad_(True) for n in names}
    y, s = fn(x["r"], x["k"], x["v"], x["w"], x["u"], x["h0"], True)
    grads = torch.autograd.grad(
        (y, s), [x[n] for n in names], (c["gy"].to(device=device, dtype=y.dtype), c["gs"].to(device=device, dtype=s.dtype))
    )
    out = {"y": y, "state": s, **dict(zip(names, grads))}
    return {n: t.detach().to("cpu", torch.float64) for n, t in out.items()}


def _rounded(c, dtype):
    """The case as a `dtype` kernel sees it (r, k, v and the output cotangent rounded), in fp64."""
    if dtype != torch.bfloat16:
        return c
    return {n: (t.to(dtype).double() if n in ("r", "k", "v", "gy") else t) for n, t in c.items()}


def _compare(got, ref, tol) -> dict:
    max_abs = {n: (got[n] - ref[n]).abs().max().item() for n in ref}
    max_rel = {n: max_abs[n] / max(ref[n].abs().max().item(), 1e-30) for n in ref}
    return {"max_abs_err": max_abs, "max_rel_err": max_rel, "tolerance": tol,
            "passed": all(max_rel[n] <= tol[n] for n in ref)}


def smoke_test(backend: str = "auto") -> dict:
    """Compare the `backend` extension ('cpu', 'cuda' or 'auto') with `wkv6_ref` in float64.

    Case: B=2, T=33, H=2, K=V=64, random initial state, random output and state cotangents.
    Returns {backend, dtype, shape, max_abs_err, max_rel_err, tolerance, passed, cases}: `cases` maps each
    implementation run (CPU: "sequential_fp64"; CUDA: CUDA_CASES) to its errors and verdict; the top-level
    errors are the worst case's (per tensor, relative to its tolerance), `passed` is True if every case passed.
    """
    backend = resolve_backend(backend)
    c = _case()
    runs = ((("sequential_fp64", "sequential", torch.float64),) if backend == "cpu" else CUDA_CASES)
    cases = {}
    for name, impl, dtype in runs:
        ref = _run(wkv6_ref, _rounded(c, dtype), "cpu", torch.float64)
        got = _run(functools.partial(wkv6, impl=impl), c, backend, dtype)
        tol = TOLERANCE["cpu" if backend == "cpu" else ("cuda_bf16" if dtype == torch.bfloat16 else "cuda")]
        cases[name] = {"impl": impl, "dtype": str(dtype).replace("torch.", ""), **_compare(got, ref, tol)}
    worst = max(cases.values(), key=lambda r: max(r["max_rel_err"][n] / r["tolerance"][n] for n in r["tolerance"]))
    return {
        "backend": backend,
        "dtype": worst["dtype"],
        "shape": {"B": 2, "T": 33, "H": 2, "K": 64, "V": 64},
        "max_abs_err": worst["max_abs_err"],
        "max_rel_err": worst["max_rel_err"],
        "tolerance": worst["tolerance"],
        "passed": all(r["passed"] for r in cases.values()),
        "cases": cases,
    }
