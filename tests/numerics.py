"""Closeness assertion for model tests: fails with max abs and relative error (STYLE guideline 5)."""

import torch


def assert_close(name, got, want, atol, rtol=0.0):
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - want).abs()
    max_abs = err.max().item() if err.numel() else 0.0
    max_rel = (err / want.abs().clamp_min(1e-12)).max().item() if err.numel() else 0.0
    ok = bool((err <= atol + rtol * want.abs()).all())
    assert ok, f"{name}: max abs err {max_abs:.3e}, max rel err {max_rel:.3e} (atol {atol:g}, rtol {rtol:g})"


def err_ratio(a, b):
    """rms(a - b) / rms(b) (FLA's and the official harness's metric)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def assert_ratio(name, got, want, tol):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    r = err_ratio(got, want)
    max_abs = (got.double() - want.double()).abs().max().item()
    assert r <= tol, f"{name}: err_ratio {r:.3e} > {tol:g} (max abs err {max_abs:.3e})"
