"""The issue-17 models and options: GF-XM / GF-XR, the HGF family, the arbiter fusions (GRU, MINGRU, LINREC)
against their sequential definitions, the Mamba residual path and rwkv_drop_prob. Carried-state equality,
gradients reaching both branches and parameter counts run for them in test_models_lm.py (they are in
models.list_models())."""
import math

import pytest
import torch
import torch.nn.functional as F

import models
import numerics
from models.arbiter import GRUArbiter, LinearRecurrenceArbiter, MinGRUArbiter, gru_arbiter_ref, log_g, mingru_ref, \
    mingru_scan
from numerics import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")

V = 97
TINY = dict(size="demo", n_layer=2)
NEW = ["GF-XM", "GF-XR", "HGF", "HGF-MH", "HGF-RH", "GRU", "MINGRU", "LINREC"]
ARBITERS = ["GRU", "MINGRU", "LINREC"]


def perturbed(name, dtype=torch.float64, seed=0, **kw):
    return numerics.perturbed(name, V, dtype, seed, **{**TINY, **kw})


def grads(loss, params):
    return torch.autograd.grad(loss, params)


# ---------------------------------------------------------------------------------------- arbiters vs loops
@pytest.mark.parametrize("with_h0", [False, True], ids=["h0-zero", "h0-carried"])
def test_gru_arbiter_fast_path_equals_grucell_loop_fp64(with_h0):
    torch.manual_seed(1)
    C, B, T = 8, 3, 13
    arb = GRUArbiter(C).double()
    with torch.no_grad():
        arb.head.weight.normal_(0, 0.5)      # off the zero init, so the weights and their gradients vary
        arb.head.bias.normal_(0, 0.5)
    a = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    m = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, C, dtype=torch.float64, requires_grad=True) if with_h0 else None
    fused, w_a, st = arb(a, m, None if h0 is None else {"arbiter_h": h0})
    ref_f, ref_w, ref_h = gru_arbiter_ref(arb, a, m, h0)
    assert_close("GRU fused", fused, ref_f, 1e-12, 1e-10)
    assert_close("GRU w_a", w_a, ref_w, 1e-12, 1e-10)
    assert_close("GRU final h", st["arbiter_h"], ref_h, 1e-12, 1e-10)
    probe = torch.randn_like(fused)
    params = [a, m, *arb.parameters()] + ([h0] if h0 is not None else [])
    names = ["a", "m"] + [n for n, _ in arb.named_parameters()] + (["h0"] if h0 is not None else [])
    g_fast = grads((fused * probe).sum() + st["arbiter_h"].sum(), params)
    g_ref = grads((ref_f * probe).sum() + ref_h.sum(), params)
    for n, gf, gr in zip(names, g_fast, g_ref):
        assert_close(f"GRU grad {n}", gf, gr, 1e-11, 1e-9)


def test_mingru_scan_equals_sequential_loop_fp64():
    torch.manual_seed(2)
    B, T, D = 2, 37, 5
    z = torch.randn(B, T, D, dtype=torch.float64) * 3
    u = torch.randn(B, T, D, dtype=torch.float64) * 2
    log_coef = (-F.softplus(z)).requires_grad_()
    log_val = (-F.softplus(-z) + log_g(u)).requires_grad_()
    for h0 in (torch.zeros(B, D, dtype=torch.float64), torch.rand(B, D, dtype=torch.float64) * 2):
        h0 = h0.requires_grad_()
        got, want = mingru_scan(log_coef, log_val, h0), mingru_ref(log_coef, log_val, h0)
        assert_close("minGRU scan", got, want, 1e-12, 1e-10)
        probe = torch.randn_like(got)
        for n, gg, gw in zip(("log_coef", "log_val", "h0"), grads((got * probe).sum(), [log_coef, log_val, h0]),
                             grads((want * probe).sum(), [log_coef, log_val, h0])):
            assert_close(f"minGRU scan grad {n}", gg, gw, 1e-11, 1e-9)


def test_mingru_scan_keeps_fp32_accuracy_over_long_sequences():
    """fp32 inputs, T = 8192, sharp gates: |cumsum(log_coef)| reaches thousands, and a scan done in fp32 loses
    ~1e-7 x that in relative accuracy (3.6e-3 at T = 16384). The scan runs in fp64 inside, so the result is as
    accurate as fp32 can hold."""
    torch.manual_seed(5)
    B, T, D = 1, 8192, 4
    z = torch.randn(B, T, D) * 4
    u = torch.randn(B, T, D) * 2
    log_coef, log_val = -F.softplus(z), -F.softplus(-z) + log_g(u)
    h0 = torch.rand(B, D)
    got = mingru_scan(log_coef, log_val, h0)
    want = mingru_ref(log_coef.double(), log_val.double(), h0.double())
    assert got.dtype == torch.float32
    rel = ((got.double() - want).abs() / want.abs()).max().item()
    assert rel < 1e-6, f"minGRU scan relative error {rel:.2e} vs the fp64 loop"


def test_log_g_is_the_log_of_g():
    u = torch.linspace(-6, 6, 101, dtype=torch.float64)
    g = torch.where(u >= 0, u + 0.5, torch.sigmoid(u))
    assert_close("log g", log_g(u), g.log(), 1e-14)


def test_mingru_arbiter_equals_its_definition_step_by_step():
    torch.manual_seed(3)
    C, B, T = 6, 2, 11
    arb = MinGRUArbiter(C).double()
    with torch.no_grad():
        arb.head.weight.normal_(0, 0.5)
    a, m = torch.randn(B, T, C, dtype=torch.float64), torch.randn(B, T, C, dtype=torch.float64)
    h0 = torch.rand(B, arb.inner, dtype=torch.float64)
    fused, w_a, st = arb(a, m, {"arbiter_h": h0})
    # the definition, one step at a time: RMSNorm both inputs, project, z = sigmoid, h = (1-z) h + z g(u)
    x = torch.cat([arb.norm_a(a), arb.norm_m(m)], -1) @ arb.proj.weight.T
    u, zl = x.chunk(2, -1)
    z, gu = torch.sigmoid(zl), torch.where(u >= 0, u + 0.5, torch.sigmoid(u))
    h, outs, ws = h0, [], []
    for t in range(T):
        h = (1 - z[:, t]) * h + z[:, t] * gu[:, t]
        w = torch.softmax(h @ arb.head.weight.T, -1)
        outs.append(w[:, :1] * a[:, t] + w[:, 1:] * m[:, t])
        ws.append(w[:, :1])
    assert_close("minGRU fused", fused, torch.stack(outs, 1), 1e-12, 1e-10)
    assert_close("minGRU w_a", w_a, torch.stack(ws, 1), 1e-12, 1e-10)
    assert_close("minGRU final h", st["arbiter_h"], h, 1e-12, 1e-10)


def test_linear_recurrence_arbiter_equals_its_definition():
    torch.manual_seed(4)
    C, B, T = 6, 2, 9
    arb = LinearRecurrenceArbiter(C).double()
    with torch.no_grad():
        arb.head.weight.normal_(0, 0.5)
        arb.head.bias.normal_(0, 0.5)
    a, m = torch.randn(B, T, C, dtype=torch.float64), torch.randn(B, T, C, dtype=torch.float64)
    s0, g0 = torch.randn(B, 2 * C, dtype=torch.float64), torch.rand(B, 1, dtype=torch.float64)
    fused, w_a, st = arb(a, m, {"arbiter_sum": s0, "arbiter_norm": g0})
    s, g, outs = s0, g0, []
    for t in range(T):
        x = torch.cat([a[:, t], m[:, t]], -1)
        q = torch.sigmoid(arb.gate(x))
        s, g = s + q * x, g + q
        w = torch.softmax(arb.head(s / (g + 1e-6)), -1)
        outs.append(w[:, :1] * a[:, t] + w[:, 1:] * m[:, t])
    assert_close("LINREC fused", fused, torch.stack(outs, 1), 1e-12, 1e-10)
    assert_close("LINREC sum", st["arbiter_sum"], s, 1e-12, 1e-10)
    assert_close("LINREC norm", st["arbiter_norm"], g, 1e-12, 1e-10)


# ------------------------------------------------------------------------------------------------- inits
def test_hgf_variants_differ_at_init_as_designed():
    idx = torch.randint(0, V, (2, 16))
    means = {}
    for name, g0 in (("HGF", 0.5), ("HGF-MH", 0.3), ("HGF-RH", 0.7)):
        torch.manual_seed(0)
        m = models.get_model(name, V, **TINY)
        for blk in m.blocks:
            assert blk.fusion.gate.weight.shape == (64, 128)
            assert blk.fusion.gate.weight.abs().max() < 0.02, "HGF W must start small (xavier gain 0.1)"
            assert_close(f"{name} bias", blk.fusion.gate.bias, torch.full((64,), math.log(g0 / (1 - g0))), 1e-7)
        gates = torch.stack([ls["gate"] for ls in m(idx, return_states=True).layer_states])    # (L, B, T, C)
        assert gates.shape[-1] == 64 and gates.std() > 0, f"{name}: the gate must vary per token and channel"
        means[name] = gates.mean().item()
        assert abs(means[name] - g0) < 0.01, f"{name}: mean gate {means[name]:.4f} at init, designed {g0}"
    assert means["HGF-MH"] < means["HGF"] - 0.15 < means["HGF-RH"] - 0.3, means


def test_gf_xm_xr_start_at_their_extreme_gates_exactly():
    idx = torch.randint(0, V, (2, 6))
    for name, g0 in (("GF-XM", 0.03), ("GF-XR", 0.97)):
        m = models.get_model(name, V, **TINY)
        assert all((b.fusion.gate.weight == 0).all() for b in m.blocks)
        gates = torch.cat([ls["gate"] for ls in m(idx, return_states=True).layer_states])
        assert_close(f"{name} initial gate", gates, torch.full_like(gates, g0), 1e-6)


@pytest.mark.parametrize("name", ARBITERS)
def test_arbiters_start_at_exactly_one_half(name):
    m = models.get_model(name, V, **TINY)
    gates = torch.cat([ls["gate"] for ls in m(torch.randint(0, V, (2, 7)), return_states=True).layer_states])
    assert (gates == 0.5).all(), f"{name}: zero head must give w_a = 0.5 exactly"


def test_gate_init_override_reaches_hgf():
    m = models.get_model("HGF", V, gate_init=0.2, **TINY)
    assert_close("HGF gate_init bias", m.blocks[0].fusion.gate.bias, torch.full((64,), math.log(0.25)), 1e-7)


# ------------------------------------------------------------------------------- ablation and gate forcing
@pytest.mark.parametrize("name", ["HGF-RH", *ARBITERS])
def test_force_gate_one_removes_mamba_and_zero_removes_rwkv(name):
    m = perturbed(name)
    idx = torch.randint(0, V, (2, 9))
    for g, branch, proj in ((1.0, "mamba", "out_proj"), (0.0, "rwkv", "output")):
        with models.force_gate(m, g):
            states = m(idx, return_states=True).layer_states
            assert all((ls["gate"] == g).all() for ls in states)
            before = m(idx).logits
            saved = [getattr(getattr(b, branch), proj).weight.detach().clone() for b in m.blocks]
            with torch.no_grad():
                for blk in m.blocks:
                    getattr(getattr(blk, branch), proj).weight.mul_(3.0)
            assert_close(f"{name} g = {g}: {branch} output has no effect", m(idx).logits, before, 1e-12)
            with torch.no_grad():
                for blk, w in zip(m.blocks, saved):
                    getattr(getattr(blk, branch), proj).weight.copy_(w)
    assert m(idx, return_states=True).layer_states[0]["gate"].std() > 0      # restored on exit


@pytest.mark.parametrize("name", ["HGF", "GRU"])
def test_ablate_equals_zeroing_the_branch_output_projection(name):
    m = perturbed(name)
    idx = torch.randint(0, V, (2, 9))
    for branch, proj in (("rwkv", "output"), ("mamba", "out_proj")):
        with models.ablate(m, branch, layers=[1]):
            ablated = m(idx).logits
        ref = perturbed(name)
        with torch.no_grad():
            getattr(getattr(ref.blocks[1], branch), proj).weight.zero_()
        assert_close(f"{name} ablate {branch} layer 1", ablated, ref(idx).logits, 1e-12)


# ------------------------------------------------------------------------ Mamba residual and RWKV dropping
@pytest.mark.parametrize("name", ["GF-MH", "GRU"])
def test_mamba_residual_adds_the_mamba_output_beside_the_fusion(name):
    m = perturbed(name, mamba_residual=True)
    blk = m.blocks[0]
    x = torch.randn(2, 7, 64, dtype=torch.float64)
    got, _, _, act = blk(x, None)
    h = blk.norm1(x)
    a, mo = blk.rwkv(h), blk.mamba(h)
    fused = blk.fusion(a, mo, None)[0] if blk.stateful_fusion else blk.fusion(a, mo)[0]
    mid = x + fused + mo
    assert_close(f"{name} block with the Mamba residual", got, mid + blk.ffn(blk.norm2(mid)), 1e-12)
    plain = perturbed(name)
    assert (plain(torch.randint(0, V, (1, 5))).logits - m(torch.randint(0, V, (1, 5))).logits).abs().max() > 0


@pytest.mark.parametrize("name", ["GF-MH", "HY", "LINREC"])
def test_rwkv_drop_zeroes_whole_layers_by_torch_rng_in_training_only(name):
    p = 0.5
    m = perturbed(name, rwkv_drop_prob=p)
    ref = perturbed(name)                         # same weights, no dropping
    idx = torch.randint(0, V, (2, 9))
    m.eval()
    assert_close(f"{name} eval ignores rwkv_drop_prob", m(idx).logits, ref(idx).logits, 0.0)
    m.train()
    seen = set()
    for seed in range(6):
        torch.manual_seed(seed)
        dropped = [i for i in range(len(m.blocks)) if torch.rand(()).item() < p]   # the draws, layer by layer
        torch.manual_seed(seed)
        got = m(idx).logits
        with models.ablate(ref, "rwkv", layers=dropped) if dropped else _null():
            want = ref(idx).logits
        assert_close(f"{name} seed {seed} drops layers {dropped}", got, want, 1e-12)
        seen.add(tuple(dropped))
    assert len(seen) > 1, "the draws never differed: the test would not see a wrong layer choice"


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def test_new_options_reject_bad_values():
    with pytest.raises(ValueError, match="rwkv_drop_prob"):
        models.get_model("GF", V, rwkv_drop_prob=1.0, **TINY)
    with pytest.raises(ValueError, match="rwkv_drop_prob.*only hybrids"):
        models.get_model("RWKV6", V, size="demo", rwkv_drop_prob=0.1, n_layer=1)
    with pytest.raises(ValueError, match="mamba_residual.*only hybrids"):
        models.get_model("MAMBA2", V, size="demo", mamba_residual=True, n_layer=1)
    with pytest.raises(ValueError, match="gate_init"):
        models.get_model("GRU", V, gate_init=0.3, **TINY)
    with pytest.raises(ValueError, match="no fusion gate"):
        with models.force_gate(models.get_model("CP", V, **TINY), 0.5):
            pass


# ------------------------------------------------------------------------------------------------ GPU paths
@pytest.mark.gpu
@pytest.mark.parametrize("with_h0", [False, True], ids=["zero_h0", "carried_h0"])
def test_gru_arbiter_cudnn_and_triton_paths_equal_grucell_loop_on_cuda(no_tf32, with_h0):
    torch.manual_seed(5)
    arb = GRUArbiter(32).cuda()
    with torch.no_grad():
        arb.head.weight.normal_(0, 0.5)
    a, m = torch.randn(4, 50, 32, device="cuda"), torch.randn(4, 50, 32, device="cuda")
    h0 = torch.randn(4, 32, device="cuda") if with_h0 else None
    assert arb.path(a) == "cudnn"
    fused, w_a, st = arb(a, m, None if h0 is None else {"arbiter_h": h0})
    ref_f, ref_w, ref_h = gru_arbiter_ref(arb, a, m, h0)
    assert_close("cuDNN GRU fused", fused, ref_f, 1e-4, 1e-4)
    assert_close("cuDNN GRU final h", st["arbiter_h"], ref_h, 1e-4, 1e-4)
    # under bf16 autocast the Triton recurrence runs (bf16 products, the carried h fp32), the mix in bf16
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert arb.path(a) == "triton"
        fused_bf, _, st_bf = arb(a.bfloat16(), m.bfloat16(), None if h0 is None else {"arbiter_h": h0})
    assert st_bf["arbiter_h"].dtype == torch.float32
    assert_close("Triton GRU final h under autocast", st_bf["arbiter_h"], ref_h, 2e-2, 2e-2)
    assert_close("Triton GRU fused under autocast", fused_bf.float(), ref_f, 3e-2, 3e-2)


@pytest.mark.gpu
def test_gru_arbiter_triton_path_gradients_match_cudnn_fp32_at_the_training_shape(no_tf32):
    """B 64, T 512, C 128 (the 5m preset): the Triton path under autocast against cuDNN in fp32, loss and every
    gradient of the arbiter's parameters and inputs within bf16 tolerance."""
    torch.manual_seed(1)
    arb = GRUArbiter(128).cuda()
    with torch.no_grad():
        arb.head.weight.normal_(0, 0.1)
    a = torch.randn(64, 512, 128, device="cuda", requires_grad=True)
    m = torch.randn(64, 512, 128, device="cuda", requires_grad=True)
    target = torch.randn(64, 512, 128, device="cuda")

    def grads(autocast: bool):
        arb.zero_grad(set_to_none=True)
        a.grad = m.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            assert arb.path(a) == ("triton" if autocast else "cudnn")
            fused, _, st = arb(a, m)
            loss = ((fused.float() - target) ** 2).mean() + st["arbiter_h"].square().mean()
        loss.backward()
        return loss.item(), {"a": a.grad.clone(), "m": m.grad.clone(),
                             **{n: p.grad.clone() for n, p in arb.named_parameters()}}

    want_loss, want = grads(False)
    got_loss, got = grads(True)
    assert abs(got_loss - want_loss) <= 1e-2 * abs(want_loss), (got_loss, want_loss)
    for n in want:
        scale = float(want[n].abs().max())
        err = float((got[n] - want[n]).abs().max())
        assert err <= 3e-2 * scale + 1e-6, f"grad {n}: max abs err {err:.3e} vs scale {scale:.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("name", NEW)
def test_new_models_train_under_bf16_autocast_on_cuda_and_match_fp32(name, no_tf32):
    torch.manual_seed(0)
    m = models.get_model(name, V, **TINY).cuda()
    idx = torch.randint(0, V, (2, 64), device="cuda")
    ref = m(idx).logits
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = m(idx)
        loss = F.cross_entropy(out.logits.float().reshape(-1, V)[:-1], idx.reshape(-1)[1:])
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert (out.logits.float() - ref).abs().max() < 0.1, "bf16 autocast logits far from fp32"


@pytest.mark.parametrize("name", ["GRU", "MINGRU"])
def test_compiled_step_matches_eager_for_the_arbiters(name):
    """torch.compile of the training step (model + loss) gives the eager loss and gradients: the minGRU scan
    compiles, the fused GRU call is left to eager by Dynamo (a graph break), both stay exact."""
    from numerics import eager_and_compiled_step

    torch.manual_seed(0)
    model = models.get_model(name, V, size="demo", n_layer=1, mamba_backend="wkv6")
    x = torch.randint(0, V, (2, 24))
    (want_loss, want), (got_loss, got) = eager_and_compiled_step(model, x, torch.roll(x, -1, 1))
    assert abs(got_loss - want_loss) < 1e-5, (got_loss, want_loss)
    assert want.keys() == got.keys()
    for n in want:
        scale = max(float(want[n].abs().max()), 1e-6)
        assert float((got[n] - want[n]).abs().max()) <= 1e-4 * scale + 1e-7, f"{name} grad {n}"
