"""`smoke_test(backend)`: the compiled extension vs the fp64 sequential reference on one small case.

Checks the output, the final state and the gradients of r, k, v, w, u and the initial state, and
reports per tensor the max abs error and the max abs error relative to the reference's max abs
value. The lead's `wkv6_kernel` asset records this dict; `passed` is False if any tensor is out of
tolerance (the caller decides what a failed smoke test means; nothing is downgraded here).
"""
from __future__ import annotations

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
}


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
    names = ("r", "k", "v", "w", "u", "h0")
    x = {n: c[n].to(device=device, dtype=dtype).requires_grad_(True) for n in names}
    y, s = fn(x["r"], x["k"], x["v"], x["w"], x["u"], x["h0"], True)
    grads = torch.autograd.grad(
        (y, s), [x[n] for n in names], (c["gy"].to(device=device, dtype=y.dtype), c["gs"].to(device=device, dtype=s.dtype))
    )
    out = {"y": y, "state": s, **dict(zip(names, grads))}
    return {n: t.detach().to("cpu", torch.float64) for n, t in out.items()}


def smoke_test(backend: str = "auto") -> dict:
    """Compare the `backend` extension ('cpu', 'cuda' or 'auto') with `wkv6_ref` in float64.

    Case: B=2, T=33, H=2, K=V=64, random initial state, random output and state cotangents.
    Returns {backend, dtype, shape, max_abs_err, max_rel_err, tolerance, passed}.
    """
    backend = resolve_backend(backend)
    dtype = torch.float64 if backend == "cpu" else torch.float32
    c = _case()
    ref = _run(wkv6_ref, c, "cpu", torch.float64)
    got = _run(wkv6, c, backend, dtype)
    max_abs = {n: (got[n] - ref[n]).abs().max().item() for n in ref}
    max_rel = {n: max_abs[n] / max(ref[n].abs().max().item(), 1e-30) for n in ref}
    tol = TOLERANCE[backend]
    return {
        "backend": backend,
        "dtype": str(dtype).replace("torch.", ""),
        "shape": {"B": 2, "T": 33, "H": 2, "K": 64, "V": 64},
        "max_abs_err": max_abs,
        "max_rel_err": max_rel,
        "tolerance": tol,
        "passed": all(max_rel[n] <= tol[n] for n in ref),
    }
