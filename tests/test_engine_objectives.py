"""The twin-debate loss and stateful training (gt_pipeline/engine/objectives.py): each term against an
independent computation, the refusals, carried state == one long forward, and stateful resume."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import models
from gt_pipeline.engine import objectives
from gt_pipeline.engine.checkpoint import list_checkpoints
from gt_pipeline.engine.objectives import StateCarrier, StepLoss
from gt_pipeline.engine.train import TokenLoss, TrainConfig, train
from numerics import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")
V = 97


def perturbed(name, seed=0, **kw):
    torch.manual_seed(seed)
    m = models.get_model(name, V, size="demo", n_layer=2, **kw).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


# ------------------------------------------------------------------------------------------- debate loss
def test_step_loss_with_everything_off_is_token_loss_bit_for_bit():
    m = perturbed("GF-MH")
    x, y = torch.randint(0, V, (2, 11)), torch.randint(0, V, (2, 11))
    loss, parts = StepLoss(m)(x, y)
    assert torch.equal(loss, TokenLoss(m)(x, y)) and set(parts) == {"loss_ce"}
    assert type(objectives.step_module(m, TrainConfig(model="GF-MH", size="demo"))) is TokenLoss


@pytest.mark.parametrize("name", ["GF-MH", "HGF-RH", "GRU"])
def test_debate_loss_equals_its_terms_computed_independently(name):
    m = perturbed(name)
    x, y = torch.randint(0, V, (2, 13)), torch.randint(0, V, (2, 13))
    loss, parts = StepLoss(m, lambda_div=0.3, lambda_arb=0.2)(x, y)
    out = m(x, return_states=True, return_activations=True)
    ce = F.cross_entropy(out.logits.reshape(-1, V), y.reshape(-1))
    # diversity from the cosine's definition
    divs = []
    for act in out.activations:
        a, b = act["rwkv"], act["mamba"]
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        divs.append(((1 + cos) / 2).mean())
    div = torch.stack(divs).mean()
    # the better branch from copies whose fusion weight is pinned by their own parameters, not force_gate
    ce_alone = []
    for w in (1.0, 0.0):
        ref = perturbed(name)
        with torch.no_grad():
            for blk in ref.blocks:
                head = blk.fusion.head if name == "GRU" else blk.fusion.gate
                head.weight.zero_()
                if name == "GRU":          # softmax([50, -50]) or its mirror: w_a = 1 or 0 to fp64 precision
                    head.bias.copy_(torch.tensor([50.0, -50.0]) * (1 if w else -1))
                else:
                    head.bias.fill_(50.0 if w else -50.0)
        logits = ref(x).logits
        ce_alone.append(F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), reduction="none").view(2, 13))
    tau = torch.where(ce_alone[0] < ce_alone[1], 1.0, torch.where(ce_alone[0] > ce_alone[1], 0.0, 0.5))
    arbs = []
    for ls in out.layer_states:
        g = ls["gate"]
        arbs.append((-(tau[..., None] * g.log() + (1 - tau[..., None]) * (1 - g).log())).mean())
    arb = torch.stack(arbs).mean()
    assert 0 < tau.mean() < 1, "both branches must win somewhere, or the target test is trivial"
    assert_close(f"{name} loss_ce", parts["loss_ce"], ce, 1e-5)           # CE of the logits in fp32, as TokenLoss
    assert_close(f"{name} loss_div", parts["loss_div"], div, 1e-6)       # the loss computes the cosine in fp32
    assert_close(f"{name} loss_arb", parts["loss_arb"], arb, 1e-5)
    assert_close(f"{name} total", loss, ce + 0.3 * div + 0.2 * arb, 1e-5)
    assert m.training, "the target forwards must restore training mode"


def test_debate_terms_send_gradients_to_the_gate_and_both_branches():
    m = perturbed("GF-RH")
    x, y = torch.randint(0, V, (2, 9)), torch.randint(0, V, (2, 9))
    _, parts = StepLoss(m, lambda_div=1.0, lambda_arb=1.0)(x, y)
    out = m(x, return_states=True, return_activations=True)
    div = objectives.diversity(out.activations)
    div.backward()
    assert m.blocks[0].rwkv.output.weight.grad.abs().sum() > 0 and m.blocks[0].mamba.out_proj.weight.grad.abs().sum() > 0
    m.zero_grad()
    tau = objectives.better_branch_target(m, x, y)
    objectives.arbiter_ce([ls["gate"] for ls in m(x, return_states=True).layer_states], tau).backward()
    assert m.blocks[1].fusion.gate.weight.grad.abs().sum() > 0


def test_better_branch_target_with_mamba_residual_compares_rwkv_without_any_mamba_output():
    """With mamba_residual the Mamba output is also added beside the fusion: 'RWKV alone' must drop it too,
    so the target equals the comparison of the model with Mamba zero-ablated vs the Mamba-only model."""
    torch.manual_seed(3)
    m = models.get_model("GF-MH", V, size="demo", mamba_residual=True)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, y = torch.randint(0, V, (2, 11)), torch.randint(0, V, (2, 11))
    tau = objectives.better_branch_target(m, x, y)
    m.eval()

    def ce(logits):
        return F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")

    with torch.no_grad(), models.force_gate(m, 1.0):
        for b in m.blocks:
            b.ablated.add("mamba")  # RWKV alone: m = 0 inside the fusion and beside it
        ce_r = ce(m(x).logits)
        for b in m.blocks:
            b.ablated.clear()
    with torch.no_grad(), models.force_gate(m, 0.0):
        ce_m = ce(m(x).logits)
    assert torch.equal(tau, 0.5 * (1 + torch.sign(ce_m - ce_r)))
    assert all(b.mamba_residual for b in m.blocks), "the residual setting is restored"


@pytest.mark.parametrize("kw,match", [
    (dict(model="HY", lambda_arb=0.1), "lambda_arb.*HY"),
    (dict(model="WS", lambda_arb=0.1), "lambda_arb.*unconstrained"),
    (dict(model="CP", lambda_arb=0.1), "lambda_arb"),
    (dict(model="RWKV6", lambda_div=0.1), "lambda_div.*RWKV6"),
    (dict(model="GF", lambda_div=-1.0), "lambda_div"),
    (dict(model="GPT", stateful=True), "stateful.*GPT"),
])
def test_objectives_that_do_not_fit_the_model_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(size="demo", **kw)


# ----------------------------------------------------------------------------------------- carried state
@pytest.mark.parametrize("name", ["GF-MH", "GRU", "MINGRU", "LINREC"])
def test_consecutive_windows_with_carried_state_equal_one_long_forward(name):
    m = perturbed(name)
    T, k = 7, 3
    stream = torch.randint(0, V, (2, k * T + 1))
    whole = m(stream[:, :-1]).logits                                                     # (B, kT, V)
    step, carrier = StepLoss(m), StateCarrier()
    no_reset = torch.zeros(2, dtype=torch.bool)
    for w in range(k):
        x, y = stream[:, w * T:(w + 1) * T], stream[:, w * T + 1:(w + 1) * T + 1]
        loss, parts = step(x, y, torch.ones(2, dtype=torch.bool) if w == 0 else no_reset, carrier)
        want = F.cross_entropy(whole[:, w * T:(w + 1) * T].float().reshape(-1, V), y.reshape(-1))
        # the loss takes the CE of fp32 logits (as TokenLoss): 1e-6 is its rounding; a lost or wrongly
        # reset state moves these fp64 models' losses by ~1e-2
        assert_close(f"{name} window {w} loss with carried state", loss, want, 1e-6)
    assert all(t.grad_fn is None for d in carrier.state.layers for t in d.values()), "the carried state is detached"


def test_a_document_start_resets_only_its_row():
    m = perturbed("GRU")
    a, b = torch.randint(0, V, (2, 6)), torch.randint(0, V, (2, 6))
    ya, yb = torch.randint(0, V, (2, 6)), torch.randint(0, V, (2, 6))
    step, carrier = StepLoss(m), StateCarrier()
    step(a, ya, torch.ones(2, dtype=torch.bool), carrier)
    loss, _ = step(b, yb, torch.tensor([False, True]), carrier)
    cont = m(torch.cat([a[:1], b[:1]], 1)).logits[:, 6:]                # row 0 continues a
    fresh = m(b[1:]).logits                                             # row 1 starts a new document
    want = F.cross_entropy(torch.cat([cont, fresh]).float().reshape(-1, V), yb.reshape(-1))
    assert_close("row 0 continues, row 1 restarts", loss, want, 1e-6)
    wrong = F.cross_entropy(m(b).logits.float().reshape(-1, V), yb.reshape(-1))            # both rows fresh
    assert (loss - wrong).abs() > 1e-4, "resetting row 0 too would pass: the test cannot see the difference"


def small(**kw) -> TrainConfig:
    base = dict(model="GRU", size="demo", vocab_size=512, steps=8, batch_size=2, seq_len=16, lr=3e-3,
                min_lr=3e-4, eval_every=4, eval_batches=2, checkpoint_every=4)
    return TrainConfig(**{**base, **kw})


class Stop(Exception):
    pass


def test_stateful_debate_run_logs_its_terms_and_resumes_bit_for_bit(demo_shards, tmp_path):
    cfg = small(stateful=True, lambda_div=0.1, lambda_arb=0.1)
    whole = train(cfg, demo_shards, tmp_path / "a")
    row = whole.log[-1]
    assert {"loss_ce", "loss_div", "loss_arb"} <= set(row)
    assert math.isclose(row["train_loss"], row["loss_ce"] + 0.1 * row["loss_div"] + 0.1 * row["loss_arb"],
                        rel_tol=1e-5)

    def crash_after_6(step, model):
        if step == 6:
            raise Stop

    with pytest.raises(Stop):
        train(cfg, demo_shards, tmp_path / "b", on_step_end=crash_after_6)
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step_0000004"]
    resumed = train(cfg, demo_shards, tmp_path / "b")
    assert resumed.resumed_from_step == 4
    for (n, a), (_, b) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), f"{n} differs after a stateful resume"
    assert [r["train_loss"] for r in whole.log] == [r["train_loss"] for r in resumed.log]
