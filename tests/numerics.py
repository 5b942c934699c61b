"""Closeness assertions for model tests (they fail with max abs and relative error, STYLE guideline 5), and the
eager-vs-compiled training-step harness shared by the CPU and GPU compile tests."""

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


def eager_and_compiled_step(model, x, y):
    """[(loss, {param name: grad}) eager, the same compiled]: engine.train's step function (model + loss) on one
    batch, without and with torch.compile. Zero-initialised parameters (the RWKV output projection, ...) are
    first set to small noise, so that every branch gets a gradient worth comparing."""
    from gt_pipeline.engine.train import TokenLoss, step_function

    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    out = []
    for fwd in (TokenLoss(model), step_function(model, compile=True)):
        model.zero_grad(set_to_none=True)
        loss = fwd(x, y)
        loss.backward()
        out.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}))
    return out


def perturbed(name, vocab, dtype=torch.float64, seed=0, **kw):
    """A small model (demo size, 2 layers unless kw says otherwise) with every parameter nudged off its init, so
    zero inits (RWKV output, gate weights, LoRA w1, arbiter heads) do not make state or gradient paths trivially
    zero."""
    import models

    torch.manual_seed(seed)
    m = models.get_model(name, vocab, **{"size": "demo", "n_layer": 2, **kw}).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m
