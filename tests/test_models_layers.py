"""Layer tests: RWKV-6 time-mix / channel-mix and Mamba-2 against independent sequential references.

The references below are written from the published definitions (RWKV-LM RWKV_Tmix_x060 / RWKV_CMix_x060,
mamba_ssm Mamba2 + its decode `step`), one token at a time, in float64, reading the layer's weights by
state_dict name only. They share no code with `models/`. Weights are randomised first so that the zero inits
(time_maa_w1, output, ...) cannot hide a wrong index or a missing term.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import models
from models.ssd import ssd_chunked, ssd_ref
from numerics import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")

F64_TOL = 1e-10   # fp64 end to end: the chunked/kernel forms differ from the loops only by summation order


def randomize_(module, seed):
    """Every parameter random (fixed seed), with ranges that keep the recurrences interesting."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("time_decay"):
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) * 5 - 4)    # decays 0.37 .. 0.98
            elif "time_maa" in name and not name.endswith(("_w1", "_w2")):
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype))
            elif p.dim() >= 2 and name.endswith(".weight"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / math.sqrt(p.shape[-1]))
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return module


# ---------------------------------------------------------------------------------------------- RWKV-6 refs
def rwkv6_tmix_sequential(sd, x, head_size, shift=None, S=None, gn_eps=64e-5):
    """RWKV_Tmix_x060, token by token. Returns out (B,T,C), final wkv state (B,H,N,N), last x (B,C)."""
    p = {k: v.double() for k, v in sd.items()}
    B, T, C = x.shape
    N, H = head_size, C // head_size
    D_mix = p["time_maa_w1"].shape[1] // 5
    prev = torch.zeros(B, C, dtype=torch.float64) if shift is None else shift.double().clone()
    S = torch.zeros(B, H, N, N, dtype=torch.float64) if S is None else S.double().clone()
    u = p["time_faaaa"]                                                                  # (H, N)
    outs = []
    for t in range(T):
        xt = x[:, t].double()
        xx = prev - xt
        lora = torch.tanh((xt + xx * p["time_maa_x"][0, 0]) @ p["time_maa_w1"])           # (B, 5*D)
        # column blocks of w1 / rows of w2 feed, in order: w, k, v, r, g
        mix = [lora[:, i * D_mix:(i + 1) * D_mix] @ p["time_maa_w2"][i] for i in range(5)]
        xw = xt + xx * (p["time_maa_w"][0, 0] + mix[0])
        xk = xt + xx * (p["time_maa_k"][0, 0] + mix[1])
        xv = xt + xx * (p["time_maa_v"][0, 0] + mix[2])
        xr = xt + xx * (p["time_maa_r"][0, 0] + mix[3])
        xg = xt + xx * (p["time_maa_g"][0, 0] + mix[4])
        r = (xr @ p["receptance.weight"].T).view(B, H, N)
        k = (xk @ p["key.weight"].T).view(B, H, N)
        v = (xv @ p["value.weight"].T).view(B, H, N)
        g = F.silu(xg @ p["gate.weight"].T)
        w = p["time_decay"][0, 0] + torch.tanh(xw @ p["time_decay_w1"]) @ p["time_decay_w2"]
        decay = torch.exp(-torch.exp(w)).view(B, H, N)
        y = torch.zeros(B, H, N, dtype=torch.float64)
        for i in range(N):          # key index i: bonus u and decay act here; j (value index) is the output
            y += r[:, :, i, None] * (u[None, :, i, None] * k[:, :, i, None] * v + S[:, :, i, :])
        S = decay[..., None] * S + k[..., :, None] * v[..., None, :]
        mean = y.mean(-1, keepdim=True)
        var = ((y - mean) ** 2).mean(-1, keepdim=True)
        yn = ((y - mean) / torch.sqrt(var + gn_eps)).reshape(B, C) * p["ln_x.weight"] + p["ln_x.bias"]
        outs.append((yn * g) @ p["output.weight"].T)
        prev = xt
    return torch.stack(outs, 1), S, prev


def rwkv6_cmix_sequential(sd, x, shift=None):
    p = {k: v.double() for k, v in sd.items()}
    B, T, C = x.shape
    prev = torch.zeros(B, C, dtype=torch.float64) if shift is None else shift.double()
    outs = []
    for t in range(T):
        xt = x[:, t].double()
        xk = xt * (1 - p["time_maa_k"][0, 0]) + prev * p["time_maa_k"][0, 0]      # lerp toward the previous token
        xr = xt * (1 - p["time_maa_r"][0, 0]) + prev * p["time_maa_r"][0, 0]
        kk = torch.relu(xk @ p["key.weight"].T) ** 2
        outs.append(torch.sigmoid(xr @ p["receptance.weight"].T) * (kk @ p["value.weight"].T))
        prev = xt
    return torch.stack(outs, 1), prev


@pytest.mark.parametrize("C,N,layer_id,n_layer", [(64, 32, 1, 3), (64, 64, 0, 1)], ids=["C64-N32-l1of3", "C64-N64-l0of1"])
def test_rwkv6_timemix_matches_sequential_reference(C, N, layer_id, n_layer):
    torch.manual_seed(0)
    layer = randomize_(models.RWKV6TimeMix(C, head_size=N, layer_id=layer_id, n_layer=n_layer), seed=1).double()
    sd = layer.state_dict()
    x = torch.randn(2, 13, C, dtype=torch.float64)
    shift0 = torch.randn(2, C, dtype=torch.float64)
    S0 = torch.randn(2, C // N, N, N, dtype=torch.float64) * 0.3
    want, S_want, shift_want = rwkv6_tmix_sequential(sd, x, N, shift=shift0, S=S0)
    got, st = layer(x, state={"rwkv_state": S0, "rwkv_shift": shift0}, return_state=True)
    assert_close("time-mix output", got, want, F64_TOL)
    assert_close("wkv final state", st["rwkv_state"], S_want, F64_TOL)
    assert_close("shift state", st["rwkv_shift"], shift_want, 0.0)
    # fresh start == zero state
    want0, _, _ = rwkv6_tmix_sequential(sd, x, N)
    assert_close("time-mix output, zero state", layer(x), want0, F64_TOL)


def test_rwkv6_channelmix_matches_sequential_reference():
    layer = randomize_(models.RWKV6ChannelMix(64, layer_id=1, n_layer=2), seed=2).double()
    assert layer.dim_ffn == 224                                   # floor(3.5 * 64 / 32) * 32
    x = torch.randn(2, 11, 64, dtype=torch.float64)
    shift0 = torch.randn(2, 64, dtype=torch.float64)
    want, last = rwkv6_cmix_sequential(layer.state_dict(), x, shift0)
    got, st = layer(x, state={"cmix_shift": shift0}, return_state=True)
    assert_close("channel-mix output", got, want, F64_TOL)
    assert_close("channel-mix shift", st["cmix_shift"], last, 0.0)


def test_rwkv6_init_follows_rwkv_lm():
    """Layer-dependent init of RWKV-LM x060 (constructor + generate_init_weight), checked at two layers."""
    C, N = 64, 32
    # layer 2 of 4: ratio_0_to_1 = 2/3, ratio_1_to_almost0 = 1/2
    m = models.RWKV6TimeMix(C, head_size=N, layer_id=2, n_layer=4)
    i, n = torch.arange(C, dtype=torch.float64), torch.arange(C, dtype=torch.float64)
    ddd = i / C
    assert_close("time_maa_x", m.time_maa_x.view(-1), 1 - ddd ** 0.5, 1e-6)
    assert_close("time_maa_v", m.time_maa_v.view(-1), 1 - (ddd ** 0.5 + 0.3 * 2 / 3), 1e-6)
    assert_close("time_maa_r", m.time_maa_r.view(-1), 1 - ddd ** 0.25, 1e-6)
    assert_close("time_decay", m.time_decay.view(-1), -6 + 5 * (n / (C - 1)) ** (0.7 + 1.3 * 2 / 3), 1e-5)
    zigzag = ((n + 1) % 3 - 1) * 0.1
    assert_close("time_faaaa", m.time_faaaa.view(-1), 2 / 3 * (1 - n / (C - 1)) + zigzag, 1e-6)
    assert m.time_faaaa.shape == (2, 32) and m.time_maa_w1.shape == (C, 160) and m.time_maa_w2.shape == (5, 32, C)
    assert m.time_decay_w1.shape == (C, 64) and m.time_decay_w2.shape == (64, C)
    assert (m.time_maa_w1 == 0).all() and (m.time_decay_w1 == 0).all()
    assert m.time_maa_w2.abs().max() <= 0.01 and m.time_decay_w2.abs().max() <= 0.01
    assert (m.output.weight == 0).all(), "att.output starts at zero (RWKV-LM generate_init_weight)"
    eye = torch.eye(C)
    assert_close("receptance orthogonal gain 1", m.receptance.weight @ m.receptance.weight.T, eye, 1e-5)
    assert_close("value orthogonal gain 1", m.value.weight @ m.value.weight.T, eye, 1e-5)
    assert_close("key orthogonal gain 0.1", m.key.weight @ m.key.weight.T, 0.01 * eye, 1e-6)
    assert_close("gate orthogonal gain 0.1", m.gate.weight @ m.gate.weight.T, 0.01 * eye, 1e-6)
    assert_close("ln_x.weight", m.ln_x.weight, torch.full((C,), (3 / 4) ** 0.7), 1e-6)
    assert m.ln_x.eps == pytest.approx(64e-5) and m.ln_x.num_groups == 2
    # 1-layer model: RWKV-LM's layer_id / (n_layer - 1) would divide by zero; we take ratio_0_to_1 = 0
    one = models.RWKV6TimeMix(C, head_size=N, layer_id=0, n_layer=1)
    assert_close("1-layer time_decay", one.time_decay.view(-1), -6 + 5 * (n / (C - 1)) ** 0.7, 1e-5)
    assert_close("1-layer time_faaaa", one.time_faaaa.view(-1), zigzag, 1e-7)
    cm = models.RWKV6ChannelMix(C, layer_id=1, n_layer=2)          # r1 = 1/2 -> exponent r1**3 = 1/8
    assert_close("cmix time_maa_k", cm.time_maa_k.view(-1), 1 - ddd ** 0.125, 1e-6)
    assert (cm.receptance.weight == 0).all() and (cm.value.weight == 0).all()


# ---------------------------------------------------------------------------------------------- Mamba-2 refs
def mamba2_sequential(sd, u, headdim, d_state, ngroups, conv_state=None, ssm_state=None):
    """mamba_ssm Mamba2 semantics, one token at a time (its decode `step`): returns out, conv window, h."""
    p = {k: v.double() for k, v in sd.items()}
    B, T, _ = u.shape
    d_inner = p["out_proj.weight"].shape[1]
    H, P, N, G = d_inner // headdim, headdim, d_state, ngroups
    conv_w = p["conv1d.weight"][:, 0, :]                                                # (conv_dim, d_conv)
    conv_dim, d_conv = conv_w.shape
    A = -torch.exp(p["A_log"])
    window = torch.zeros(B, conv_dim, d_conv, dtype=torch.float64) if conv_state is None else conv_state.double()
    h = torch.zeros(B, H, P, N, dtype=torch.float64) if ssm_state is None else ssm_state.double()
    outs = []
    for t in range(T):
        zxbcdt = u[:, t].double() @ p["in_proj.weight"].T
        z, xBC, dt = zxbcdt.split([d_inner, conv_dim, H], dim=-1)
        window = torch.cat([window[:, :, 1:], xBC[:, :, None]], dim=-1)                  # last d_conv inputs
        xBC = F.silu((window * conv_w).sum(-1) + p["conv1d.bias"])
        x, Bt, Ct = xBC.split([d_inner, G * N, G * N], dim=-1)
        x = x.view(B, H, P)
        head_group = torch.arange(H) // (H // G)
        Bh, Ch = Bt.view(B, G, N)[:, head_group], Ct.view(B, G, N)[:, head_group]       # (B, H, N)
        dt = F.softplus(dt + p["dt_bias"])                                               # (B, H)
        h = torch.exp(dt * A)[..., None, None] * h + (dt[..., None] * x)[..., None] * Bh[:, :, None, :]
        y = (h * Ch[:, :, None, :]).sum(-1) + p["D"][:, None] * x                        # (B, H, P)
        y = y.reshape(B, d_inner) * F.silu(z)
        yg = y.view(B, G, d_inner // G)
        y = (yg / torch.sqrt(yg.pow(2).mean(-1, keepdim=True) + 1e-5)).reshape(B, d_inner) * p["norm.weight"]
        outs.append(y @ p["out_proj.weight"].T)
    return torch.stack(outs, 1), window, h


@pytest.mark.parametrize("T,chunk,ngroups", [(37, 8, 1), (130, 256, 1), (21, 4, 2)],
                         ids=["T37-chunk8", "T130-chunk64", "T21-chunk4-2groups"])
def test_mamba2_matches_sequential_reference(T, chunk, ngroups):
    layer = models.Mamba2(32, d_state=16, d_conv=4, expand=2, headdim=16, ngroups=ngroups, chunk_size=chunk)
    randomize_(layer, seed=3)
    with torch.no_grad():                       # keep dt and A in mamba's init ranges: realistic decays
        layer.dt_bias.copy_(torch.log(torch.expm1(torch.linspace(0.01, 0.5, layer.nheads))))
        layer.A_log.copy_(torch.log(torch.linspace(1, 16, layer.nheads)))
    layer.double()
    u = torch.randn(2, T, 32, dtype=torch.float64)
    want, window, h = mamba2_sequential(layer.state_dict(), u, 16, 16, ngroups)
    got, st = layer(u, return_state=True)
    assert_close("Mamba2 output", got, want, F64_TOL, 1e-9)
    assert_close("Mamba2 ssm state", st["mamba_ssm_state"], h, F64_TOL, 1e-9)
    assert_close("Mamba2 conv state", st["mamba_conv_state"], window, F64_TOL)


def test_mamba2_state_continues_exactly():
    layer = randomize_(models.Mamba2(32, d_state=16, headdim=16, chunk_size=8), seed=4).double()
    u = torch.randn(2, 29, 32, dtype=torch.float64)
    whole, st_whole = layer(u, return_state=True)
    parts, st = [], None
    for a, b in [(0, 2), (2, 3), (3, 17), (17, 29)]:     # includes chunks shorter than d_conv - 1
        y, st = layer(u[:, a:b], state=st, return_state=True)
        parts.append(y)
    assert_close("chunked-with-state output", torch.cat(parts, 1), whole, F64_TOL, 1e-9)
    assert_close("ssm state", st["mamba_ssm_state"], st_whole["mamba_ssm_state"], F64_TOL, 1e-9)
    assert_close("conv state", st["mamba_conv_state"], st_whole["mamba_conv_state"], F64_TOL)
    # and the state continues the sequential reference too
    _, window, h = mamba2_sequential(layer.state_dict(), u[:, :17], 16, 16, 1)
    want, _, _ = mamba2_sequential(layer.state_dict(), u[:, 17:], 16, 16, 1, conv_state=window, ssm_state=h)
    assert_close("continuation vs reference", parts[-1], want, F64_TOL, 1e-9)


def test_mamba2_parameters_match_mamba_ssm_layout_and_init():
    m = models.Mamba2(128, d_state=64, d_conv=4, expand=2, headdim=64)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "in_proj.weight": (2 * 256 + 2 * 64 + 4, 128),    # [z | x | B | C | dt]
        "conv1d.weight": (384, 1, 4), "conv1d.bias": (384,),
        "dt_bias": (4,), "A_log": (4,), "D": (4,),
        "norm.weight": (256,), "out_proj.weight": (128, 256),
    }
    assert sum(p.numel() for p in m.parameters()) == 117_388      # the seeds' recorded Mamba-2 size at hidden 128
    A = torch.exp(m.A_log)
    assert ((A >= 1) & (A <= 16)).all(), A
    dt = F.softplus(m.dt_bias)
    assert ((dt >= 1e-3 - 1e-7) & (dt <= 0.1 + 1e-7)).all(), dt
    assert (m.D == 1).all() and (m.norm.weight == 1).all()
    for name in ("A_log", "D", "dt_bias"):
        assert getattr(m, name)._no_weight_decay is True


# ------------------------------------------------------------------------------------------------ SSD ops
def _ssd_inputs(seed, Bsz=2, T=45, H=4, P=8, G=2, N=6, strong=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)          # noqa: E731
    dt = F.softplus(r(Bsz, T, H) + (4.0 if strong else -1.0))
    A = -torch.exp(r(H) + (2.0 if strong else 0.0))
    return r(Bsz, T, H, P), dt, A, r(Bsz, T, G, N), r(Bsz, T, G, N), r(H), r(Bsz, H, P, N)


@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
@pytest.mark.parametrize("strong", [False, True], ids=["mild-decay", "strong-decay"])
def test_ssd_chunked_matches_sequential(chunk, strong):
    x, dt, A, B, C, D, h0 = _ssd_inputs(5, strong=strong)
    y, hT = ssd_chunked(x, dt, A, B, C, D, h0, chunk_size=chunk)
    y_ref, hT_ref = ssd_ref(x, dt, A, B, C, D, h0)
    assert_close("ssd y", y, y_ref, 1e-11, 1e-10)
    assert_close("ssd final state", hT, hT_ref, 1e-11, 1e-10)


def test_ssd_chunked_gradients_match_sequential():
    inputs = [t.requires_grad_() for t in _ssd_inputs(6, T=23)]
    names = ["x", "dt", "A", "B", "C", "D", "initial_state"]
    gy = torch.randn(2, 23, 4, 8, dtype=torch.float64)
    gs = torch.randn(2, 4, 8, 6, dtype=torch.float64)

    def grads(fn, **kw):
        y, h = fn(*inputs, **kw)
        return torch.autograd.grad((y * gy).sum() + (h * gs).sum(), inputs)

    for name, a, b in zip(names, grads(ssd_chunked, chunk_size=8), grads(ssd_ref)):
        assert_close(f"d{name}", a, b, 1e-10, 1e-9)


def test_layer_argument_errors_are_clear():
    with pytest.raises(ValueError, match="head_size"):
        models.RWKV6TimeMix(100, head_size=64)
    with pytest.raises(ValueError, match="layer_id"):
        models.RWKV6TimeMix(64, head_size=32, layer_id=3, n_layer=2)
    with pytest.raises(ValueError, match="headdim"):
        models.Mamba2(48, d_state=16, headdim=64)
    with pytest.raises(ValueError, match="ngroups"):
        models.Mamba2(64, d_state=16, headdim=64, ngroups=3)
    with pytest.raises(ValueError, match="backend"):
        models.Mamba2(64, backend="cuda")
