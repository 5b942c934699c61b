"""Shared wkv6 test inputs and the gradient harness used by the CPU and CUDA kernel tests."""

import torch

GRAD_NAMES = ("r", "k", "v", "w", "u", "h0")


def make_inputs(B, T, H, K, V=None, *, dtype=torch.float64, seed=0, w_range=(-3.0, 1.0), device="cpu"):
    """Random inputs drawn in float64 on the CPU (same numbers on every device), then moved.

    w ~ U(w_range); the default gives decays from exp(-e^1)=0.07 to exp(-e^-3)=0.95.
    Returns (inputs in `dtype` on `device`, float64 cotangents gy/gs on `device`)."""
    V = K if V is None else V
    g = torch.Generator().manual_seed(seed)
    opt = dict(dtype=torch.float64, generator=g)
    lo, hi = w_range
    x = {
        "r": torch.randn(B, T, H, K, **opt),
        "k": torch.randn(B, T, H, K, **opt),
        "v": torch.randn(B, T, H, V, **opt),
        "w": torch.rand(B, T, H, K, **opt) * (hi - lo) + lo,
        "u": torch.randn(H, K, **opt),
        "h0": torch.randn(B, H, K, V, **opt),
    }
    cot = {"gy": torch.randn(B, T, H, V, **opt), "gs": torch.randn(B, H, K, V, **opt)}
    return ({n: t.to(device=device, dtype=dtype) for n, t in x.items()},
            {n: t.to(device) for n, t in cot.items()})


def run_with_grads(fn, x, cot, use_h0=True):
    """y, final state and gradients of <y, gy> + <state, gs> w.r.t. every input, as float64."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in x.items()}
    h0 = leaves["h0"] if use_h0 else None
    y, s = fn(leaves["r"], leaves["k"], leaves["v"], leaves["w"], leaves["u"], h0, True)
    names = [n for n in GRAD_NAMES if n != "h0" or use_h0]
    grads = torch.autograd.grad((y, s), [leaves[n] for n in names], (cot["gy"].to(y.dtype), cot["gs"].to(s.dtype)))
    out = {"y": y, "state": s, **dict(zip(names, grads))}
    return {n: t.detach().double() for n, t in out.items()}


def assert_close(name, actual, expected, tol):
    """max|actual - expected| <= tol * max(max|expected|, 1): relative to the tensor's scale, absolute
    for tensors whose values are all below 1 (e.g. gw at T = 1 without a state, exactly 0)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    max_abs = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    rel = max_abs / max(scale, 1.0)
    assert rel <= tol, f"{name}: max abs err {max_abs:.3e}, rel to max|ref| {scale:.3e}: {rel:.3e} > tol {tol:.1e}"


def assert_matches_reference(got, ref, tol, use_h0=True):
    """One named assertion per tensor: output, final state and the gradient of every input."""
    assert_close("y", got["y"], ref["y"], tol["y"])
    assert_close("state", got["state"], ref["state"], tol["state"])
    assert_close("r", got["r"], ref["r"], tol["r"])
    assert_close("k", got["k"], ref["k"], tol["k"])
    assert_close("v", got["v"], ref["v"], tol["v"])
    assert_close("w", got["w"], ref["w"], tol["w"])
    assert_close("u", got["u"], ref["u"], tol["u"])
    if use_h0:
        assert_close("h0", got["h0"], ref["h0"], tol["h0"])
