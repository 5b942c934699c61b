"""Mamba2's call into causal_conv1d, checked on the CPU through a stand-in that enforces the real kernel's input
rules (causal-conv1d 1.7.0, csrc/causal_conv1d.cpp `causal_conv1d_fwd`): x (batch, dim, seqlen) with stride(2) == 1
(channel-first) or stride(1) == 1 (channel-last); channel-last also needs dim, x.stride(0) and x.stride(2) to be
multiples of 8; width 2..4; x and weight fp32/fp16/bf16 (they may differ), bias in the weight's dtype. The
stand-in computes the conv with F.conv1d, so every preset's Mamba2 is compared against the PyTorch conv path.
On a GPU, tests/test_models_gpu.py runs the same comparison with the real package.
"""
import pytest
import torch
import torch.nn.functional as F

import models
from models import mamba2 as m2
from numerics import assert_ratio

OK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class StandInCausalConv1d:
    """causal_conv1d_fn(x, weight, bias, activation) with the real kernel's checks; counts its calls and layouts."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, weight, bias=None, activation=None, **kw):
        if activation not in (None, "silu", "swish"):
            raise NotImplementedError("activation must be None, silu, or swish")
        if x.dtype not in OK_DTYPES or weight.dtype not in OK_DTYPES:
            raise RuntimeError(f"causal_conv1d: input {x.dtype} / weight {weight.dtype} not supported")
        batch, dim, seqlen = x.shape
        width = weight.shape[-1]
        if tuple(weight.shape) != (dim, width):
            raise RuntimeError(f"weight must have shape (dim, width) = ({dim}, {width}), got {tuple(weight.shape)}")
        if not (x.stride(2) == 1 or x.stride(1) == 1):
            raise RuntimeError("causal_conv1d: x.stride(2) == 1 || x.stride(1) == 1 failed")
        channel_last = x.stride(1) == 1 and x.stride(2) > 1
        if channel_last:
            if dim % 8:
                raise RuntimeError("causal_conv1d only supports channel dimension divisible by 8 for now")
            if x.stride(2) % 8 or x.stride(0) % 8:
                raise RuntimeError("causal_conv1d with channel last layout requires strides (x.stride(0) and "
                                   "x.stride(2)) to be multiples of 8")
        if not 2 <= width <= 4:
            raise RuntimeError("causal_conv1d only supports width between 2 and 4")
        if bias is not None and bias.dtype != weight.dtype:
            raise RuntimeError(f"bias dtype {bias.dtype} != weight dtype {weight.dtype}")
        self.calls.append("channel_last" if channel_last else "channel_first")
        out = F.conv1d(x.float(), weight.float()[:, None], None if bias is None else bias.float(),
                       padding=width - 1, groups=dim)[..., :seqlen]
        if activation is not None:
            out = F.silu(out)
        return out.to(x.dtype)


@pytest.fixture
def standin(monkeypatch):
    fn = StandInCausalConv1d()
    monkeypatch.setattr(m2, "_OPS", (None, fn))
    monkeypatch.setattr(m2, "CAUSAL_CONV1D_DEVICES", ("cuda", "cpu"))
    return fn


def _mamba_of(cfg: models.ModelConfig, **kw) -> models.Mamba2:
    return models.Mamba2(cfg.hidden_size, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand,
                         headdim=cfg.mamba_headdim, ngroups=cfg.ngroups, **kw)


# every size preset (conv_dim 192, 384, 384, 512) and a width whose conv_dim (98) is not a multiple of 8
CASES = {size: models.make_config("GF-MH", 97, size=size) for size in models.list_sizes()}
CASES["odd"] = models.ModelConfig(name="GF-MH", size="demo", vocab_size=97, hidden_size=36, head_size=12,
                                  d_state=13, mamba_headdim=12)


@pytest.mark.parametrize("shape", [(2, 37), (1, 1), (2, 1), (1, 5)], ids=lambda s: f"B{s[0]}xT{s[1]}")
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_every_width_reaches_causal_conv1d_and_matches_torch_conv(case, shape, standin):
    """Every preset's width, and one-token / one-row inputs (size-1 dims keep odd strides through
    contiguous(), which the kernel reads)."""
    cfg = CASES[case]
    torch.manual_seed(0)
    layer = _mamba_of(cfg)
    u = torch.randn(*shape, cfg.hidden_size, requires_grad=True)
    assert layer.conv_path(u.new_empty(1, 1, layer.conv_dim)) == "causal_conv1d"
    y, st = layer(u, return_state=True)
    assert standin.calls == ["channel_first" if layer.conv_dim % 8 else "channel_last"]
    (gu,) = torch.autograd.grad(y.square().sum(), u)
    layer.conv_impl = "torch"
    y_ref, st_ref = layer(u, return_state=True)
    (gu_ref,) = torch.autograd.grad(y_ref.square().sum(), u)
    assert len(standin.calls) == 1, "conv_impl='torch' must not call causal_conv1d"
    assert_ratio(f"{case}: output, causal_conv1d vs torch conv", y, y_ref, 1e-5)
    assert_ratio(f"{case}: grad u", gu, gu_ref, 1e-5)
    assert torch.equal(st["mamba_conv_state"], st_ref["mamba_conv_state"])


def test_bf16_input_with_fp32_weights_under_autocast(standin):
    """Under autocast in_proj gives bf16 xBC while conv1d.weight / bias stay fp32: a pair the kernel accepts."""
    torch.manual_seed(1)
    layer = _mamba_of(CASES["5m"])
    u = torch.randn(2, 33, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(u)
        layer.conv_impl = "torch"
        y_ref = layer(u)
    assert standin.calls == ["channel_last"]
    assert_ratio("bf16 autocast: causal_conv1d vs torch conv", y.float(), y_ref.float(), 2e-2)


def test_the_plain_transposed_view_is_what_the_kernel_refuses(standin):
    """The stand-in is strict: the in_proj column slice passed as a view (the old call) fails at the 5m width."""
    layer = _mamba_of(CASES["5m"])
    zxbcdt = layer.in_proj(torch.randn(2, 16, 128))
    _, xBC, _ = torch.split(zxbcdt, [layer.d_inner, layer.conv_dim, layer.nheads], dim=-1)
    with pytest.raises(RuntimeError, match="multiples of 8"):
        standin(xBC.transpose(1, 2), layer.conv1d.weight.squeeze(1), layer.conv1d.bias, activation="silu")
    standin(m2.causal_conv1d_layout(xBC), layer.conv1d.weight.squeeze(1), layer.conv1d.bias, activation="silu")


def test_torch_conv_where_causal_conv1d_does_not_apply(standin):
    layer = _mamba_of(CASES["demo"]).double()
    u = torch.randn(1, 9, 64, dtype=torch.float64)
    assert layer.conv_path(u.new_empty(1, 1, layer.conv_dim)) == "torch"              # fp64: not a kernel dtype
    _, st = layer(u, return_state=True)
    layer.float()
    assert layer.conv_path(u.float().new_empty(1, 1, layer.conv_dim), st["mamba_conv_state"]) == "torch"  # carried state
    assert standin.calls == []


def test_compiled_calls_off_cuda_take_the_torch_conv(standin):
    """Under compile 'auto' takes the Triton conv on CUDA only (tests/test_conv_kernel.py); a CPU call, here with
    the causal_conv1d stand-in allowed on CPU, stays on the PyTorch conv."""
    layer = _mamba_of(CASES["5m"])
    xbc = torch.empty(1, 1, layer.conv_dim)
    assert layer.conv_path(xbc) == "causal_conv1d" and layer.conv_path(xbc, compiled=True) == "torch"


def test_conv_falls_back_to_torch_when_package_missing(monkeypatch, caplog):
    monkeypatch.setattr(m2, "_OPS", (None, None))
    monkeypatch.setattr(m2, "CAUSAL_CONV1D_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(m2, "_LOGGED", set())
    layer = _mamba_of(CASES["demo"])
    with caplog.at_level("WARNING", logger="models.mamba2"):
        assert layer.conv_path(torch.empty(1, 1, layer.conv_dim)) == "torch"
    assert "causal_conv1d is not importable" in caplog.text


def test_conv_impl_validated():
    with pytest.raises(ValueError, match="Mamba2: conv_impl must be one of 'auto', 'triton', 'torch', got 'cuda'"):
        models.Mamba2(64, d_state=32, headdim=32, conv_impl="cuda")
    with pytest.raises(ValueError, match="ModelConfig.mamba_conv: must be one of"):
        models.make_config("GF-MH", 97, size="demo", mamba_conv="fast")


def test_describe_paths_on_cpu():
    model = models.get_model("GF-MH", 97, size="demo")
    assert models.describe_paths(model, "cpu") == {"rwkv_wkv6": "sequential", "mamba_ssd": "torch",
                                                   "mamba_wkv6": "n/a", "mamba_conv": "torch"}
    gpt = models.get_model("GPT", 97, size="demo")
    assert set(models.describe_paths(gpt, "cpu").values()) == {"n/a"}
    wk = models.get_model("MAMBA2", 97, size="demo", mamba_backend="wkv6")
    assert models.describe_paths(wk, "cpu")["mamba_wkv6"] == "sequential"
