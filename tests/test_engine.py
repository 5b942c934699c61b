"""Training and evaluation engines (no Dagster): resume, divergence, schedule, metrics, NIAH scoring."""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import models
from gt_pipeline.engine import evaluate, metrics
from gt_pipeline.engine.checkpoint import list_checkpoints
from gt_pipeline.engine.train import TrainConfig, TrainingDiverged, build_optimizer, lr_at, train


@pytest.fixture(scope="module")
def shards(demo_shards) -> Path:
    return demo_shards


def small(**kw) -> TrainConfig:
    base = dict(model="GF-MH", size="demo", vocab_size=512, steps=12, batch_size=2, seq_len=32, lr=3e-3,
                min_lr=3e-4, eval_every=6, eval_batches=2, checkpoint_every=4)
    return TrainConfig(**{**base, **kw})


class Stop(Exception):
    pass


def test_resumed_run_equals_uninterrupted_run_bit_for_bit(shards, tmp_path):
    whole = train(small(), shards, tmp_path / "a")

    def crash_after_6(step, model):
        if step == 6:
            raise Stop

    with pytest.raises(Stop):
        train(small(), shards, tmp_path / "b", on_step_end=crash_after_6)
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step_0000004"]
    resumed = train(small(), shards, tmp_path / "b")
    assert resumed.resumed_from_step == 4 and whole.resumed_from_step == 0
    for (name, a), (_, b) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs after resume"
    assert [r["train_loss"] for r in whole.log] == [r["train_loss"] for r in resumed.log]


def test_resume_refuses_a_checkpoint_of_another_config(shards, tmp_path):
    with pytest.raises(Stop):
        train(small(), shards, tmp_path, on_step_end=lambda s, m: (_ for _ in ()).throw(Stop) if s == 5 else None)
    with pytest.raises(ValueError, match="another config"):
        train(small(lr=1e-3), shards, tmp_path)


def test_nan_loss_stops_at_once_naming_the_step_and_keeps_the_last_checkpoint(shards, tmp_path):
    def poison(step, model):
        if step == 5:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match=r"at step 6 .*step_0000004"):
        train(small(), shards, tmp_path, on_step_end=poison)
    (ckpt,) = list_checkpoints(tmp_path / "checkpoints")
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "model.safetensors")).values())


@pytest.mark.parametrize("field, value, match", [
    ("batch_size", 0, "batch_size"), ("steps", -1, "steps"), ("lr", 0.0, "lr"), ("model", "GF-XYZ", "GF-XYZ"),
    ("lr_mult", {"attention": 2.0}, "lr_mult"), ("min_lr", 1.0, "min_lr"), ("device", "tpu", "device"),
    ("compile", "fastest", "compile"), ("model_overrides", {"mamba_backend": "cuda"}, "mamba_backend"),
    ("model_overrides", {"d_statez": 3}, "model_overrides"),
    ("compile", "reduce-overhead", "grad_accum")])
def test_bad_config_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        small(**{field: value}, **({"grad_accum": 2} if value == "reduce-overhead" else {}))


def test_seq_len_beyond_the_shards_fails_before_compute(shards, tmp_path):
    with pytest.raises(ValueError, match="seq_len"):
        train(small(seq_len=10**8), shards, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    cfg = small(steps=100, warmup_frac=0.1, lr=1e-3, min_lr=1e-4)
    assert lr_at(cfg, 0) == pytest.approx(1e-4)
    assert lr_at(cfg, 9) == pytest.approx(1e-3)
    assert lr_at(cfg, 10) == pytest.approx(1e-3)
    assert lr_at(cfg, 100) == pytest.approx(1e-4)
    assert all(lr_at(cfg, s) >= lr_at(cfg, s + 1) for s in range(10, 99))


def test_optimizer_groups_apply_mamba_lr_mult_and_exempt_mamba_scalars_from_decay():
    model = models.get_model("GF-MH", 512, size="demo")
    opt = build_optimizer(model, small())
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    a_log = next(p for n, p in named.items() if n.endswith("A_log"))
    in_proj = next(p for n, p in named.items() if "mamba" in n and n.endswith("in_proj.weight"))
    receptance = next(p for n, p in named.items() if n.endswith("receptance.weight"))
    assert by_param[id(a_log)]["weight_decay"] == 0.0 and by_param[id(a_log)]["lr_mult"] == 0.5
    assert by_param[id(in_proj)]["weight_decay"] == 0.1 and by_param[id(in_proj)]["lr_mult"] == 0.5
    assert by_param[id(receptance)]["lr_mult"] == 1.0


def test_training_health_reads_first_and_last_tenth():
    log = [{"train_loss": 10 - i / 10, "grad_norm": 1.0 + (i >= 90), "grad_norm_rwkv": 1.0, "grad_norm_mamba": 4.0}
           for i in range(100)]
    h = metrics.training_health(log)
    assert h["loss_first_10pct"] == pytest.approx(np.mean([10 - i / 10 for i in range(10)]))
    assert h["loss_last_10pct"] == pytest.approx(np.mean([10 - i / 10 for i in range(90, 100)]))
    assert h["grad_norm_median_last_10pct"] == 2.0 and h["grad_ratio_median_last_10pct"] == 0.25


def test_effective_rank_of_known_matrices():
    assert metrics.effective_rank(torch.eye(8)) == pytest.approx(8.0)
    assert metrics.effective_rank(torch.ones(8, 8)) == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["GF-MH", "RWKV6", "MAMBA2", "GPT"])
def test_stateful_chunked_evaluation_equals_full_sequence(name):
    torch.manual_seed(0)
    model = models.get_model(name, 512, size="demo").double().eval()
    x = torch.randint(0, 512, (2, 70))
    y = torch.randint(0, 512, (2, 70))
    full = evaluate.stateful_token_losses(model, x, y, chunk=70)
    chunked = evaluate.stateful_token_losses(model, x, y, chunk=16)
    err = (full - chunked).abs().max().item()
    assert err < 1e-9, f"max abs err {err}"


class CopyModel(torch.nn.Module):
    """Predicts, at every position, the token that followed the previous occurrence of the current token
    in the context (an induction head by construction): a known-answer model for NIAH scoring."""

    is_recurrent = False

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, idx, state=None):
        B, T = idx.shape
        logits = torch.zeros(B, T, self.vocab, dtype=torch.float64)
        for b in range(B):
            last_next = {}
            for t in range(T):
                tok = int(idx[b, t])
                if tok in last_next:
                    logits[b, t, last_next[tok]] = 20.0
                if t + 1 < T:
                    last_next[tok] = int(idx[b, t + 1])
        return type("Out", (), {"logits": logits})


@dataclass
class _Fact:
    prompt: str
    answer: str
    distractors: tuple


def test_niah_scoring_ranks_the_needle_answer_first_for_a_retrieving_model(shards):
    tok = data.load_tokenizer(shards.parent / "tok.json")
    vocab = tok.get_vocab_size()
    hay = [int(t) for t in data.TokenShards(shards).split("validation")[:200]]
    eot = tok.token_to_id(data.EOT_TOKEN)
    model = CopyModel(vocab)
    res = evaluate.niah_trial(model, tok, hay, "The capital of Veltria is Drask .", "The capital of Veltria is",
                              "Drask", ["Orsk", "Pelln", "Vamo"], 0.5, "cpu", eot)
    assert res["rank"] == 1 and res["correct"] and res["n_choices"] == 4
    # A needle stating another answer moves the ranking with it: the scorer follows the context.
    other = evaluate.niah_trial(model, tok, hay, "The capital of Veltria is Orsk .", "The capital of Veltria is",
                                "Drask", ["Orsk", "Pelln", "Vamo"], 0.5, "cpu", eot)
    assert other["rank"] > 1 and max(other["scores"], key=other["scores"].get) == "Orsk"


def test_state_health_on_a_real_model_is_in_range(shards):
    torch.manual_seed(0)
    model = models.get_model("GF-MH", 512, size="demo")
    h = metrics.state_health(model, data.TokenShards(shards).split("validation"), batch=2, chunks=4)
    assert -1 <= h["state_cosine"] <= 1 and 0 < h["effective_rank_ratio"] <= 1 and 0 <= h["saturation"] <= 1
    assert h["layers_measured"] == 2 * model.config.n_layer
    gpt = models.get_model("GPT", 512, size="demo")
    g = metrics.state_health(gpt, data.TokenShards(shards).split("validation"), batch=2, chunks=4)
    assert math.isnan(g["state_cosine"]) and math.isnan(g["effective_rank_ratio"]) and g["layers_measured"] == 0


@pytest.mark.parametrize("name", ["GF-MH", "GPT"])
def test_continuation_logprobs_from_carried_state_equal_full_sequences(name):
    torch.manual_seed(0)
    model = models.get_model(name, 512, size="demo").double().eval()
    prefix = torch.randint(0, 512, (40,)).tolist()
    conts = [[5], [7, 9, 11], [300, 2]]
    got = evaluate.continuation_logprobs(model, prefix, conts, "cpu", chunk=16)
    for cont, g in zip(conts, got):
        ids = torch.tensor([prefix + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits, -1)[0, len(prefix) - 1 : -1]
        want = float(logp.gather(-1, torch.tensor(cont)[:, None]).sum())
        assert abs(g - want) < 1e-9, f"{name} {cont}: {g} vs {want}"


def test_compiled_step_function_matches_eager_loss_and_gradients():
    """torch.compile of TokenLoss (the whole step's forward: model and loss in one graph, wkv6 and the
    wkv6-backed Mamba-2 scan as custom ops) gives the eager loss and gradients."""
    from numerics import eager_and_compiled_step

    torch.manual_seed(0)
    model = models.get_model("GF-MH", 97, size="demo", n_layer=1, mamba_backend="wkv6")
    x = torch.randint(0, 97, (2, 24))
    (want_loss, want), (got_loss, got) = eager_and_compiled_step(model, x, torch.roll(x, -1, 1))
    assert abs(got_loss - want_loss) < 1e-5, (got_loss, want_loss)
    assert want.keys() == got.keys()
    for n in want:
        assert got[n].shape == want[n].shape, n
        scale = max(float(want[n].abs().max()), 1e-6)
        assert float((got[n] - want[n]).abs().max()) <= 1e-4 * scale + 1e-7, n


def test_cuda_graph_compile_is_refused_under_ddp_before_anything_is_read(tmp_path):
    """compile='reduce-overhead' is not validated with DDP: a multi-rank run stops at once, naming it."""
    from gt_pipeline.engine import distributed
    from gt_pipeline.engine.train import _train

    ctx = distributed.DistContext(rank=0, world_size=2)
    with pytest.raises(ValueError, match="reduce-overhead.*DDP"):
        _train(small(compile="reduce-overhead"), tmp_path / "no_shards", tmp_path, torch.device("cpu"), ctx,
               on_log=None, on_step_end=None, log_every_s=0, progress=False, verify_shards=False)
    assert not (tmp_path / "checkpoints").exists()
