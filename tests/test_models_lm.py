"""Whole-model tests: carried state == one long forward for every variant, parameter counts by formula,
gradients reach both branches, fusion inits, ablation / gate forcing equivalences, registry errors."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models
import numerics
from numerics import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = models.list_models()
HYBRIDS = list(models.HYBRID_NAMES)
RECURRENT = [n for n in ALL if n != "GPT"]
V = 97                                             # small vocab keeps the tests fast
TINY = dict(size="demo", n_layer=2)                # hidden 64, RWKV heads of 32, Mamba d_state 32 / headdim 32


def perturbed(name, dtype=torch.float64, seed=0, **kw):
    return numerics.perturbed(name, V, dtype, seed, **{**TINY, **kw})


# ------------------------------------------------------------------------------------------ carried state
@pytest.mark.parametrize("name", RECURRENT)
def test_split_sequence_with_state_equals_whole(name):
    m = perturbed(name)
    idx = torch.randint(0, V, (2, 31))
    whole = m(idx, return_states=True)
    pieces, state = [], None
    for a, b in [(0, 1), (1, 12), (12, 31)]:          # odd split points, a 1-token first piece
        out = m(idx[:, a:b], state=state)
        pieces.append(out.logits)
        state = out.state
    assert_close(f"{name} logits, 3 pieces vs whole", torch.cat(pieces, 1), whole.logits, 1e-10, 1e-9)
    for i, (got, want) in enumerate(zip(state.layers, whole.state.layers)):
        assert set(got) == set(want)
        for k in got:
            assert_close(f"{name} layer {i} {k}", got[k], want[k], 1e-10, 1e-9)


def test_split_sequence_fp32_gf_mh():
    m = perturbed("GF-MH", dtype=torch.float32)
    idx = torch.randint(0, V, (3, 45))
    whole = m(idx).logits
    first = m(idx[:, :17])
    second = m(idx[:, 17:], state=first.state)
    # fp32: the two runs differ only in summation order (chunk boundaries, kernel state hand-off)
    assert_close("GF-MH fp32 split logits", torch.cat([first.logits, second.logits], 1), whole, 1e-4, 1e-4)


def test_state_reset_rows_and_detach():
    m = perturbed("GF-MH")
    a, b = torch.randint(0, V, (2, 9)), torch.randint(0, V, (2, 7))
    st = m(a).state
    st2 = st.detach()
    assert all(t.grad_fn is None for d in st2.layers for t in d.values())
    st2.reset_rows(torch.tensor([False, True]))
    cont = m(b, state=st2).logits
    assert_close("row 0 keeps its state", cont[0], m(b[:1], state=ModelStateRow(st, 0)).logits[0], 1e-12)
    assert_close("row 1 starts fresh", cont[1], m(b[1:]).logits[0], 1e-12)
    # the original state object was not modified by reset_rows on the detached copy
    assert any(t[1].abs().sum() > 0 for d in st.layers for t in d.values())


def ModelStateRow(state, row):
    return models.ModelState([{k: v[row:row + 1] for k, v in d.items()} for d in state.layers])


def test_layer_states_and_activations_contract():
    m = perturbed("GF-MH")
    cfg = m.config
    idx = torch.randint(0, V, (2, 10))
    out = m(idx, return_states=True, return_activations=True)
    H, N = cfg.hidden_size // cfg.head_size, cfg.head_size
    mh, P = cfg.expand * cfg.hidden_size // cfg.mamba_headdim, cfg.mamba_headdim
    conv_dim = cfg.expand * cfg.hidden_size + 2 * cfg.d_state
    assert len(out.layer_states) == len(out.activations) == cfg.n_layer
    ls = out.layer_states[0]
    assert tuple(ls["rwkv_state"].shape) == (2, H, N, N) and ls["rwkv_state"].dtype == torch.float64
    assert tuple(ls["rwkv_shift"].shape) == (2, cfg.hidden_size)
    assert tuple(ls["mamba_ssm_state"].shape) == (2, mh, P, cfg.d_state)
    assert tuple(ls["mamba_conv_state"].shape) == (2, conv_dim, cfg.d_conv)
    assert tuple(ls["gate"].shape) == (2, 10, 1)
    # activations are the branch outputs of the same forward: recompute layer 0's from its input
    blk = m.blocks[0]
    h = blk.norm1(m.tok_emb(idx))
    assert_close("activation rwkv", out.activations[0]["rwkv"], blk.rwkv(h), 1e-12)
    assert_close("activation mamba", out.activations[0]["mamba"], blk.mamba(h), 1e-12)
    plain = m(idx)
    assert plain.layer_states is None and plain.activations is None and plain.state is not None


def test_gpt_has_no_state():
    m = models.get_model("GPT", V, size="demo")
    out = m(torch.randint(0, V, (1, 5)))
    assert out.state is None
    with pytest.raises(ValueError, match="no recurrent state"):
        m(torch.randint(0, V, (1, 5)), state=models.ModelState([{}] * len(m.blocks)))


# ------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", HYBRIDS)
def test_every_branch_parameter_gets_gradient(name):
    m = perturbed(name, dtype=torch.float32)
    idx = torch.randint(0, V, (2, 12))
    logits = m(idx[:, :-1]).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, V), idx[:, 1:].reshape(-1)).backward()
    seen = {"rwkv": 0, "mamba": 0}
    for n, p in m.named_parameters():
        comp = models.component_of(n)
        if comp in seen:
            seen[comp] += 1
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient reaches {n}"
    # per layer: RWKV6TimeMix has 19 tensors (6 maa, 2+2 LoRA, decay, faaaa, 5 Linear, ln_x w+b), Mamba2 8
    assert seen == {"rwkv": 19 * m.config.n_layer, "mamba": 8 * m.config.n_layer}, seen


def test_gradient_at_init_reaches_rwkv_output_and_all_of_mamba():
    """At the true init RWKV-LM zeroes att.output, so only that matrix of the RWKV branch gets a gradient on
    step 0 (by design, as in RWKV-LM); every Mamba-2 parameter does."""
    torch.manual_seed(0)
    m = models.get_model("GF-MH", V, **TINY)
    idx = torch.randint(0, V, (2, 12))
    torch.nn.functional.cross_entropy(m(idx[:, :-1]).logits.reshape(-1, V), idx[:, 1:].reshape(-1)).backward()
    for i, blk in enumerate(m.blocks):
        assert blk.rwkv.output.weight.grad.abs().sum() > 0, f"layer {i}: rwkv.output gets no gradient"
        for n, p in blk.mamba.named_parameters():
            assert p.grad.abs().sum() > 0, f"layer {i}: mamba.{n} gets no gradient"


# ---------------------------------------------------------------------------------------- parameter counts
# Counted by formula (C hidden, L layers, V vocab, Mamba N = d_state, P = headdim, Hm = 2C/P):
#   RWKV6TimeMix  5C^2 + 458C      (5 Linear C*C; 6 maa C; w1 C*160; w2 5*32*C; decay C; decay LoRA 2*64C;
#                                   faaaa C; ln_x 2C)
#   Mamba2        (4C + 2N + Hm) C + 5 (2C + 2N) + 3 Hm + 2C + 2C^2   (in_proj, conv w+b, dt_bias/A_log/D,
#                                   norm, out_proj)
#   FFN 8C^2; block norms 2C; fusion GF* 2C+1, HY 4C, WS 1, RF C^2, CP 2C^2, HGF* 2C^2 + C,
#   GRU arbiter 9C^2 + 6C (GRUCell 2C -> C) + 2C + 2 (head), MINGRU 2C (norms) + 4CD + 2D with D = 1.5C,
#   LINREC 2C + 1 (gate) + 4C + 2 (head)
#   RWKV-6 channel-mix 2C F + C^2 + 2C with F = floor(3.5C/32)*32;  GPT block 12C^2 + 2C
#   total = V C (tied embedding) + C (final norm) + L * block;  baselines: L' = round(L * GF-MH block / block)
# Worked: 5m GF-MH block = 140,544 + 117,388 + 131,072 + 257 + 256 = 389,517 -> 2,048,000 + 128 + 8 * 389,517.
EXPECTED_16K = {
    ("GF-MH", "demo"): 1_249_754, ("GF-MH", "tiny"): 3_606_196, ("GF-MH", "5m"): 5_164_264,
    ("GF-MH", "8m"): 12_885_924,
    ("GF-RH", "5m"): 5_164_264, ("GF", "5m"): 5_164_264, ("HY", "5m"): 5_166_304, ("WS", "5m"): 5_162_216,
    ("RF", "5m"): 5_293_280, ("CP", "5m"): 5_424_352,
    ("GF-XM", "5m"): 5_164_264, ("GF-XR", "5m"): 5_164_264,
    ("HGF", "5m"): 5_164_264 + 8 * (32_896 - 257), ("HGF-MH", "5m"): 5_425_376, ("HGF-RH", "5m"): 5_425_376,
    ("GRU", "5m"): 5_164_264 + 8 * (148_224 + 258 - 257), ("MINGRU", "5m"): 5_164_264 + 8 * (98_944 - 257),
    ("LINREC", "5m"): 5_164_264 + 8 * (771 - 257),
    ("GPT", "5m"): 5_197_952, ("RWKV6", "5m"): 5_041_536, ("MAMBA2", "5m"): 5_281_436,
}
EXPECTED_BASELINE_DEPTH_5M = {"GPT": 16, "RWKV6": 11, "MAMBA2": 13}


@pytest.mark.parametrize("name,size", sorted(EXPECTED_16K), ids=[f"{n}-{s}" for n, s in sorted(EXPECTED_16K)])
def test_parameter_counts_match_formula(name, size):
    m = models.get_model(name, 16000, size=size)
    assert m.num_params() == EXPECTED_16K[(name, size)], (name, size, m.num_params())
    if name in EXPECTED_BASELINE_DEPTH_5M and size == "5m":
        assert m.config.n_layer == EXPECTED_BASELINE_DEPTH_5M[name]


def test_parameter_count_8m_at_char_vocab():
    # 8m (192 x 12) at the seeds' vocab 97: 97*192 + 192 + 12 * (272,256 + 249,874 + 294,912 + 385 + 384)
    assert models.get_model("GF-MH", 97, size="8m").num_params() == 9_832_548


def test_tied_embedding():
    m = models.get_model("GF-MH", V, size="demo")
    assert m.head.weight is m.tok_emb.weight
    assert m.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.1)


# ------------------------------------------------------------------------------------------ fusion inits
def test_fusion_inits():
    idx = torch.randint(0, V, (2, 6))
    for name, g0 in (("GF-MH", 0.3), ("GF-RH", 0.7)):
        m = models.get_model(name, V, **TINY)
        for blk in m.blocks:
            assert (blk.fusion.gate.weight == 0).all(), f"{name}: gate weights must start at zero"
            assert blk.fusion.gate.bias.item() == pytest.approx(math.log(g0 / (1 - g0)))
        gates = torch.cat([ls["gate"] for ls in m(idx, return_states=True).layer_states])
        assert_close(f"{name} initial gate", gates, torch.full_like(gates, g0), 1e-6)
    gf = models.get_model("GF", V, **TINY)
    assert gf.blocks[0].fusion.gate.bias.item() == 0.0 and gf.blocks[0].fusion.gate.weight.abs().sum() > 0
    rf = models.get_model("RF", 16000, size="5m")
    std = rf.blocks[0].fusion.proj.weight.std().item()
    assert 0.0095 < std < 0.0105, f"RF proj std {std} (expected 0.01: the seeds overwrote it with 0.02)"
    ws = models.get_model("WS", V, **TINY)
    assert ws.blocks[0].fusion.alpha.item() == 0.5 and ws.blocks[0].fusion.alpha.dim() == 0
    hy = models.get_model("HY", V, **TINY)
    assert (hy.blocks[0].fusion.gain_r == 0.7).all() and (hy.blocks[0].fusion.gain_m == 0.3).all()
    # the block-level init never touches the layers' own inits
    assert (models.get_model("CP", V, **TINY).blocks[1].rwkv.output.weight == 0).all()


# ------------------------------------------------------------------------------ ablation and gate forcing
def test_ablate_equals_zeroing_the_branch_output_projection():
    m = perturbed("GF-MH")
    idx = torch.randint(0, V, (2, 9))
    before = m(idx).logits
    for branch, proj in (("rwkv", "output"), ("mamba", "out_proj")):
        with models.ablate(m, branch, layers=[1]):
            ablated = m(idx).logits
        ref = perturbed("GF-MH")
        with torch.no_grad():
            getattr(getattr(ref.blocks[1], branch), proj).weight.zero_()
        assert_close(f"ablate {branch} layer 1", ablated, ref(idx).logits, 1e-12)
        assert (ablated - before).abs().max() > 1e-3, f"ablating {branch} changed nothing"
    assert_close("restored after ablate", m(idx).logits, before, 0.0)


def test_force_gate_equals_a_saturated_gate():
    m = perturbed("GF-RH")
    idx = torch.randint(0, V, (2, 9))
    with models.force_gate(m, 1.0):
        forced = m(idx, return_states=True)
    ref = perturbed("GF-RH")
    with torch.no_grad():
        for blk in ref.blocks:                  # sigmoid(50) == 1.0 in float64: g = 1 exactly, from the weights
            blk.fusion.gate.weight.zero_()
            blk.fusion.gate.bias.fill_(50.0)
    assert_close("force_gate(1) vs saturated gate", forced.logits, ref(idx).logits, 1e-12)
    assert all((ls["gate"] == 1.0).all() for ls in forced.layer_states)
    with models.force_gate(m, 0.0, layers=0):
        states = m(idx, return_states=True).layer_states
    assert (states[0]["gate"] == 0).all() and states[1]["gate"].std() > 0      # layer 1 untouched
    assert m(idx, return_states=True).layer_states[0]["gate"].std() > 0        # restored on exit
    # g weighs the RWKV branch: at g = 1 the Mamba output cannot matter, at g = 0 the RWKV output cannot
    for g, branch, proj in ((1.0, "mamba", "out_proj"), (0.0, "rwkv", "output")):
        with models.force_gate(m, g):
            before = m(idx).logits
            with torch.no_grad():
                for blk in m.blocks:
                    getattr(getattr(blk, branch), proj).weight.mul_(3.0)
            assert_close(f"g = {g}: {branch} output has no effect", m(idx).logits, before, 1e-12)


def test_ablate_and_force_gate_errors():
    gpt = models.get_model("GPT", V, size="demo")
    with pytest.raises(ValueError, match="no 'rwkv' branch"):
        with models.ablate(gpt, "rwkv"):
            pass
    with pytest.raises(ValueError, match="no 'mamba' branch"):
        with models.ablate(models.get_model("RWKV6", V, size="demo"), "mamba"):
            pass
    with pytest.raises(ValueError, match="no fusion gate"):
        with models.force_gate(models.get_model("HY", V, **TINY), 0.5):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with models.ablate(models.get_model("GF", V, **TINY), "rwkv", layers=[5]):
            pass


# ---------------------------------------------------------------------------------- registry and helpers
def test_names_are_case_insensitive():
    assert models.get_model("gf_mh", V, **TINY).config.name == "GF-MH"
    assert models.get_model("Mamba2", V, size="demo").config.name == "MAMBA2"
    assert set(models.list_models()) == {"GF-MH", "GF-RH", "GF", "HY", "WS", "RF", "CP", "GF-XM", "GF-XR", "HGF",
                                         "HGF-MH", "HGF-RH", "GRU", "MINGRU", "LINREC", "GPT", "RWKV6", "MAMBA2"}
    assert models.get_model("hgf_mh", V, **TINY).config.name == "HGF-MH"
    assert set(models.list_sizes()) == {"demo", "tiny", "5m", "8m"}
    cfg = models.get_model("ws", V, size="5m").config
    assert (cfg.name, cfg.size, cfg.vocab_size, cfg.hidden_size, cfg.n_layer) == ("WS", "5m", V, 128, 8)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match=r"unknown model name 'GF-XX'.*GF-MH.*MAMBA2"):
        models.get_model("GF-XX", V)
    with pytest.raises(ValueError, match=r"head_size.*96.*64"):
        models.get_model("GF-MH", V, hidden_size=96, head_size=64)
    with pytest.raises(ValueError, match=r"unknown size '3m'.*demo"):
        models.get_model("GF", V, size="3m")
    with pytest.raises(ValueError, match=r"unknown model override 'hiden_size'.*hidden_size"):
        models.get_model("GF", V, hiden_size=64)
    with pytest.raises(ValueError, match="n_layer"):
        models.get_model("GF", V, n_layer=0)
    with pytest.raises(ValueError, match="gate_init"):
        models.get_model("HY", V, gate_init=0.3)
    with pytest.raises(ValueError, match="mamba_headdim"):
        models.get_model("MAMBA2", V, hidden_size=96, mamba_headdim=128, n_layer=2)
    with pytest.raises(ValueError, match=r"MAMBA2.*GF-MH.*n_layer"):     # depth rule needs a valid hybrid
        models.get_model("MAMBA2", V, hidden_size=96, mamba_headdim=64)
    with pytest.raises(ValueError, match="idx"):
        models.get_model("GF", V, **TINY)(torch.randn(2, 3))


def test_component_and_weight_decay_rules():
    m = models.get_model("GF-MH", V, **TINY)
    names = dict(m.named_parameters())
    comp = {n: models.component_of(n) for n in names}
    assert comp["blocks.0.rwkv.time_decay"] == "rwkv" and comp["blocks.1.mamba.A_log"] == "mamba"
    assert comp["blocks.0.fusion.gate.weight"] == "fusion" and comp["blocks.0.ffn.fc.weight"] == "other"
    assert comp["tok_emb.weight"] == "other" and comp["blocks.0.norm1.weight"] == "other"
    decayed = {n for n, p in names.items() if not models.no_weight_decay(n, p)}
    per_layer = {"rwkv.receptance.weight", "rwkv.key.weight", "rwkv.value.weight", "rwkv.output.weight",
                 "rwkv.gate.weight", "mamba.in_proj.weight", "mamba.conv1d.weight", "mamba.out_proj.weight",
                 "ffn.fc.weight", "ffn.proj.weight"}
    assert decayed == {"tok_emb.weight"} | {f"blocks.{i}.{n}" for i in range(2) for n in per_layer}
    for n in ("A_log", "D", "dt_bias"):
        assert models.no_weight_decay(f"blocks.0.mamba.{n}", names[f"blocks.0.mamba.{n}"])


def test_import_models_does_not_load_dagster():
    code = "import sys, models; assert 'dagster' not in sys.modules, sorted(m for m in sys.modules if 'dagster' in m)"
    res = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
