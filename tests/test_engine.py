"""Training and evaluation engines (no Dagster): resume, divergence, schedule, metrics, NIAH scoring."""

import contextlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import models
from gt_pipeline.engine import evaluate, metrics, stats
from gt_pipeline.engine.checkpoint import list_checkpoints
from gt_pipeline.engine.train import (BatchFeed, TrainConfig, TrainingDiverged, build_optimizer, lr_at, skips_on_device,
                                      step_function, train, train_step)


@pytest.fixture(scope="module")
def shards(demo_shards) -> Path:
    return demo_shards


def small(**kw) -> TrainConfig:
    base = dict(model="GF-MH", size="demo", vocab_size=512, steps=12, batch_size=2, seq_len=32, lr=3e-3,
                min_lr=3e-4, eval_every=6, eval_batches=2, checkpoint_every=4)
    return TrainConfig(**{**base, **kw})


class Stop(Exception):
    pass


def crash_after_6(step, model):
    """on_step_end that stops a run after step 6 (checkpoint_every 4: the last checkpoint is step 4)."""
    if step == 6:
        raise Stop


def test_resumed_run_equals_uninterrupted_run_bit_for_bit(shards, tmp_path):
    whole = train(small(), shards, tmp_path / "a")
    with pytest.raises(Stop):
        train(small(), shards, tmp_path / "b", on_step_end=crash_after_6)
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step_0000004"]
    rows: list[dict] = []
    said: list[tuple[str, int]] = []  # (message, how many log rows had been logged when it was said)
    resumed = train(small(), shards, tmp_path / "b", on_log=rows.append,
                    on_event=lambda m: said.append((m, len(rows))))
    assert resumed.resumed_from_step == 4 and whole.resumed_from_step == 0
    # announced when it happens, before the first resumed step is logged
    assert len(said) == 1 and said[0][0].startswith("resumed from the checkpoint at step 4 (") and said[0][1] == 0
    assert said[0][0].endswith(f"{small().steps - 4} steps to go")
    for (name, a), (_, b) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs after resume"
    assert [r["train_loss"] for r in whole.log] == [r["train_loss"] for r in resumed.log]


@pytest.mark.gpu
def test_resume_on_cuda_continues_the_rwkv_drop_draws(shards, tmp_path):
    """rwkv_drop_prob draws from the CUDA generator on CUDA: the checkpoint carries its state, so a resumed run
    drops the same layers at the same steps as the uninterrupted one."""
    cfg = small(device="cuda", compile=False, model_overrides={"rwkv_drop_prob": 0.5})
    whole = train(cfg, shards, tmp_path / "a")
    with pytest.raises(Stop):
        train(cfg, shards, tmp_path / "b", on_step_end=crash_after_6)
    resumed = train(cfg, shards, tmp_path / "b")
    assert resumed.resumed_from_step == 4
    assert [r["train_loss"] for r in whole.log] == [r["train_loss"] for r in resumed.log]


def test_resume_refuses_a_checkpoint_of_another_config(shards, tmp_path):
    with pytest.raises(Stop):
        train(small(), shards, tmp_path, on_step_end=lambda s, m: (_ for _ in ()).throw(Stop) if s == 5 else None)
    with pytest.raises(ValueError, match="another config"):
        train(small(lr=1e-3), shards, tmp_path)


def _optimizer(kind: str, params):
    if kind == "sgd":  # not fused: train_step reads the norms back, then clips and steps on the host's numbers
        return torch.optim.SGD(params, lr=1.0)
    # fused (build_optimizer's): clip coefficient and the skip of a non-finite step on the device
    return torch.optim.AdamW(params, lr=1e-2, fused=kind == "adamw_fused")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("kind", ["sgd", "adamw_fused"])
@pytest.mark.parametrize("clip", [1e-3, 1e3], ids=["clipped", "unclipped"])
def test_train_step_clips_and_reads_norms_as_clip_grad_norm_does(clip, kind, device):
    """train_step's one-sync clipping equals torch's clip_grad_norm_ followed by a plain step of the same
    optimizer, over two steps, both where the coefficient comes from the norms read back (SGD) and where it
    is formed on the device before the read (fused AdamW; Adam's normalisation amplifies the last-bit
    differences between its fused and foreach arithmetic in near-zero gradients, so the reference is fused too)."""
    torch.manual_seed(0)
    x = torch.randint(0, 512, (2, 17)).to(device)
    ours = models.get_model("GF-MH", 512, size="demo").to(device)
    ref = models.get_model("GF-MH", 512, size="demo").to(device)
    ref.load_state_dict(ours.state_dict())
    opt_ours = _optimizer(kind, ours.parameters())
    opt_ref = _optimizer(kind, ref.parameters())
    assert skips_on_device(opt_ours) == (kind == "adamw_fused")
    for _ in range(2):
        loss, norms = train_step(ours, step_function(ours), opt_ours, [(x[:, :-1], x[:, 1:])], clip,
                                 lambda: torch.autocast(device, enabled=False))
        ref_loss = step_function(ref)(x[:, :-1], x[:, 1:])
        ref_loss.backward()
        total = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), clip))
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)
        assert loss == pytest.approx(float(ref_loss), rel=1e-6)
        assert norms["grad_norm"] == pytest.approx(total, rel=1e-5)
        assert norms["grad_norm_rwkv"] > 0 and norms["grad_norm_mamba"] > 0
        assert norms["grad_norm"] ** 2 == pytest.approx(sum(v ** 2 for k, v in norms.items() if k != "grad_norm"), rel=1e-5)
        for (n, a), b in zip(ours.named_parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
            assert a.grad is None
        assert not hasattr(opt_ours, "found_inf")  # a flag left behind would reach the next step, maybe unfused


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("kind", ["sgd", "adamw_fused"])
def test_train_step_with_a_non_finite_loss_leaves_weights_and_optimizer_state_alone(kind, device):
    """A NaN loss returns (nan, None) and nothing moves: with the fused optimizer the update was already queued
    and is skipped on the device, so its moments and step count must stay as they were too."""
    torch.manual_seed(0)
    x = torch.randint(0, 512, (2, 17)).to(device)
    model = models.get_model("GF-MH", 512, size="demo").to(device)
    opt = _optimizer(kind, model.parameters())
    fwd = step_function(model)
    args = ([(x[:, :-1], x[:, 1:])], 1.0, lambda: torch.autocast(device, enabled=False))
    assert math.isfinite(train_step(model, fwd, opt, *args)[0])  # one good step: the moments are non-zero
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state_before = {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}
    poisoned = next(p for n, p in model.named_parameters() if n == "norm_f.weight")
    with torch.no_grad():
        poisoned[0] = float("nan")
    before[next(n for n, p in model.named_parameters() if p is poisoned)][0] = float("nan")
    loss, norms = train_step(model, fwd, opt, *args)
    assert math.isnan(loss) and norms is None
    assert not hasattr(opt, "found_inf")
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0, equal_nan=True, msg=n)
        assert p.grad is None
    for p, st in opt.state.items():
        for k, v in st.items():
            torch.testing.assert_close(v, state_before[id(p)][k], rtol=0, atol=0, msg=k)


def test_train_step_clips_gradients_of_mixed_dtypes_with_one_coefficient():
    """The on-device clip multiplies each dtype's gradients by the coefficient in that dtype, as clip_grad_norm_
    does: the gradients the fused optimizer is handed equal clip_grad_norm_'s, bf16 ones included."""
    torch.manual_seed(0)
    # bf16 first (ParameterDict orders by key): a coefficient rounded to the first gradient's dtype would
    # miss on the fp32 one
    model = torch.nn.ParameterDict({"b": torch.nn.Parameter(torch.randn(32, dtype=torch.bfloat16)),
                                    "f": torch.nn.Parameter(torch.randn(64))})

    def fwd():
        return (model["f"] ** 2).sum() + (model["b"].float() ** 2).sum()

    ref = {k: p.detach().clone().requires_grad_() for k, p in model.items()}
    ((ref["f"] ** 2).sum() + (ref["b"].float() ** 2).sum()).backward()
    torch.nn.utils.clip_grad_norm_(list(ref.values()), 1.0)
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    assert skips_on_device(opt)
    handed = {}
    step = opt.step

    def recording_step(*args, **kwargs):
        handed.update({k: p.grad.clone() for k, p in model.items()})
        return step(*args, **kwargs)

    opt.step = recording_step
    loss, norms = train_step(model, fwd, opt, [()], 1.0, contextlib.nullcontext)
    assert norms["grad_norm"] > 10  # the clip acts (coefficient about 0.05)
    torch.testing.assert_close(handed["f"], ref["f"].grad, rtol=1e-6, atol=0)
    assert handed["b"].dtype == torch.bfloat16
    torch.testing.assert_close(handed["b"], ref["b"].grad, rtol=2 ** -7, atol=0)


def test_skips_on_device_only_when_every_group_is_fused():
    model = torch.nn.Linear(3, 2)
    fused = torch.optim.AdamW(model.parameters(), fused=True)
    assert skips_on_device(fused)
    saved_unfused = torch.optim.AdamW(model.parameters()).state_dict()
    fused.load_state_dict(saved_unfused)  # an optimizer state saved unfused brings its groups' flag along
    assert not skips_on_device(fused)


def test_batch_feed_prefetch_hands_out_the_same_batches_and_checkpoints_the_state_before_them():
    g = torch.Generator().manual_seed(3)
    feed = BatchFeed(lambda: [(torch.randint(0, 9, (2, 4), generator=g),)], torch.device("cpu"), g)
    plain_g = torch.Generator().manual_seed(3)
    plain = [torch.randint(0, 9, (2, 4), generator=plain_g) for _ in range(3)]
    first = feed.next()[0][0]
    before_second = g.get_state()
    feed.prefetch()  # the second step's batch, drawn while the first one runs
    assert torch.equal(feed.generator_state(), before_second)  # a checkpoint here resumes at the second batch
    feed.prefetch()  # a second prefetch before next() draws nothing
    assert [torch.equal(t, p) for t, p in zip([first, feed.next()[0][0], feed.next()[0][0]], plain)] == [True] * 3


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


class UniformModel(torch.nn.Module):
    """Every token equally likely everywhere: every NIAH choice gets exactly the same score (a tie)."""

    is_recurrent = False

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, idx, state=None):
        return type("Out", (), {"logits": torch.zeros(*idx.shape, self.vocab, dtype=torch.float64)})


def test_niah_scoring_ranks_the_needle_answer_first_for_a_retrieving_model(shards):
    tok = data.load_tokenizer(shards.parent / "tok.json")
    vocab = tok.get_vocab_size()
    hay = [int(t) for t in data.TokenShards(shards).split("validation")[:200]]
    eot = tok.token_to_id(data.EOT_TOKEN)
    model = CopyModel(vocab)
    (nd,) = evaluate.synthetic_needles(tok, 1, n_distractors=5, seed=1)
    res = evaluate.niah_trial(model, tok, hay, nd, nd, 1.0, "cpu", eot)
    assert res["rank"] == 1 and res["correct"] and res["n_choices"] == 6
    # A needle stating another number moves the ranking with it: the scorer follows the context.
    other = evaluate.Needle(nd.key, nd.distractors[0], (nd.answer, *nd.distractors[1:]))
    moved = evaluate.niah_trial(model, tok, hay, other, nd, 1.0, "cpu", eot)
    assert moved["rank"] > 1 and not moved["correct"] and max(moved["scores"], key=moved["scores"].get) == other.answer


def test_niah_tie_is_a_miss_and_the_control_row_sits_at_chance(shards):
    """A model that scores every choice the same never hits (a tie is not a hit), at every depth and in the
    no-needle control; the grid has one control row per length and the requested trials per cell."""
    tok = data.load_tokenizer(shards.parent / "tok.json")
    toks = data.TokenShards(shards).split("validation")
    eot = tok.token_to_id(data.EOT_TOKEN)
    (nd,) = evaluate.synthetic_needles(tok, 1, seed=2)
    hay = [int(t) for t in toks[:100]]
    res = evaluate.niah_trial(UniformModel(tok.get_vocab_size()), tok, hay, nd, nd, 0.5, "cpu", eot)
    assert not res["correct"] and res["rank"] == res["n_choices"] == 10
    rows = evaluate.niah_grid(CopyModel(tok.get_vocab_size()), tok, toks, [64, 96], [0.0, 1.0], 20, "cpu", eot)
    assert [(r["haystack_tokens"], r["depth"]) for r in rows] == [
        (64, 0.0), (64, 1.0), (64, "no needle"), (96, 0.0), (96, 1.0), (96, "no needle")]
    assert all(r["trials"] == 20 and r["chance"] == 0.1 for r in rows)
    control = [r for r in rows if r["depth"] == "no needle"]
    assert all(r["accuracy"] <= 0.2 for r in control), control  # nothing to copy: no better than chance
    assert [r["accuracy"] for r in rows if r["depth"] == 1.0] == [1.0, 1.0]  # right before the prompt: copied
    for r in rows:
        assert 0 <= r["acc_lo"] <= r["accuracy"] <= r["acc_hi"] <= 1


def test_synthetic_needles_are_deterministic_with_equal_length_choices(shards):
    tok = data.load_tokenizer(shards.parent / "tok.json")
    a = evaluate.synthetic_needles(tok, 30, n_distractors=9, seed=0)
    assert a == evaluate.synthetic_needles(tok, 30, n_distractors=9, seed=0)
    assert a != evaluate.synthetic_needles(tok, 30, n_distractors=9, seed=1)
    assert len({n.key for n in a}) == 30
    for n in a:
        lens = {len(tok.encode(" " + c).ids) for c in (n.answer, *n.distractors)}
        assert len(lens) == 1 and len({n.answer, *n.distractors}) == 10
        assert n.sentence == f"The secret code of {n.key} is {n.answer} ." and n.sentence.startswith(n.prompt)
    with pytest.raises(ValueError, match="n_distractors"):
        evaluate.synthetic_needles(tok, 1, n_distractors=5000)


def test_spread_windows_cover_the_whole_split_disjoint_and_fixed():
    toks = np.arange(10_000, dtype=np.uint16)
    x, y = evaluate.spread_windows(toks, 8, 100, seed=0)
    starts = x[:, 0].numpy()
    assert x.shape == (8, 100) and torch.equal(y, x + 1)  # targets are the next tokens
    assert all(i * 1250 <= s <= (i + 1) * 1250 - 101 for i, s in enumerate(starts))  # one per eighth of the split
    assert starts[-1] >= 7 * 1250  # the end of the split is reached, not only the first tokens
    x2, _ = evaluate.spread_windows(toks, 8, 100, seed=0)
    assert torch.equal(x, x2) and not torch.equal(x, evaluate.spread_windows(toks, 8, 100, seed=1)[0])
    with pytest.raises(ValueError, match="fewer or shorter"):
        evaluate.spread_windows(toks, 200, 100)


def test_stats_intervals_match_textbook_values():

    # Student t 97.5% quantiles (any table): df 1, 2, 4, 10, 30
    for df, q in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423)]:
        assert stats.t_quantile(0.975, df) == pytest.approx(q, abs=1e-4)
    ci = stats.t_ci([1.0, 2.0, 3.0, 4.0])  # mean 2.5, s = 1.29099, t_3 = 3.18245
    assert ci.mean == 2.5 and ci.hi - 2.5 == pytest.approx(3.182446 * 1.290994 / 2, rel=1e-5)
    assert math.isnan(stats.t_ci([1.0]).lo)  # one seed: no interval
    w = stats.wilson_ci(10, 20)  # p = 0.5, n = 20: [0.2993, 0.7007]
    assert (w.lo, w.hi) == (pytest.approx(0.29930, abs=1e-4), pytest.approx(0.70070, abs=1e-4))
    assert stats.wilson_ci(0, 20).lo == 0 and stats.wilson_ci(0, 20).hi == pytest.approx(0.16113, abs=1e-4)
    d = stats.paired_diff({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.5, 1: 1.4, 2: 2.6, 9: 7.0})  # diffs .5 .6 .4
    assert d.n == 3 and d.mean == pytest.approx(0.5) and d.lo > 0
    assert stats.verdict_of_difference(stats.paired_diff({0: 1.0, 1: 2.0}, {0: 2.0, 1: 1.0})).startswith("inside")
    rng = np.random.default_rng(0)
    v = rng.normal(3.0, 1.0, size=400)
    b = stats.bootstrap_mean_ci(v, seed=0)
    assert b == stats.bootstrap_mean_ci(v, seed=0)  # seeded
    assert b.half_width == pytest.approx(1.96 / 20, rel=0.15)  # ~ z * sd / sqrt(n)
    with pytest.raises(ValueError, match="NaN"):
        stats.bootstrap_mean_ci([1.0, math.nan])


def test_mean_ci_uses_t_for_few_windows_where_the_bootstrap_undercovers():
    """Coverage of a nominal 95% interval over 2000 simulated samples of 8 normal windows: the percentile
    bootstrap covers ~0.88, Student t ~0.95; mean_ci takes t below 30 windows and the bootstrap from 30 on."""
    rng = np.random.default_rng(1)
    samples = rng.normal(0.0, 1.0, size=(2000, 8))
    cover_t = np.mean([stats.mean_ci(x).contains(0.0) for x in samples])
    cover_boot = np.mean([stats.bootstrap_mean_ci(x, n_boot=200, seed=i).contains(0.0) for i, x in enumerate(samples)])
    assert cover_t == pytest.approx(0.95, abs=0.015) and cover_boot < 0.91
    assert stats.mean_ci(samples[0]).method == "t"
    assert stats.mean_ci(rng.normal(size=stats.BOOTSTRAP_MIN_N)).method == "bootstrap"
    d = stats.paired_mean_diff([1.0, 2.0, 3.5], [0.5, 1.4, 2.6])
    assert d.method == "paired t" and d.mean == pytest.approx(2 / 3) and d.n == 3
    with pytest.raises(ValueError, match="paired"):
        stats.paired_mean_diff([1.0, 2.0], [1.0])


def test_position_buckets_and_per_bucket_losses_equal_the_positions_losses(shards):
    assert evaluate.position_buckets(10) == [(0, 1), (1, 3), (3, 7), (7, 10)]
    torch.manual_seed(0)
    model = models.get_model("GF-MH", 512, size="demo").eval()
    toks = data.TokenShards(shards).split("validation")
    curve = evaluate.long_context_curve(model, toks, [16, 40], 3, chunk=16)
    x, y = evaluate.spread_windows(toks, 3, 40)
    per_tok = evaluate.stateful_token_losses(model, x, y, chunk=40).double()  # (3, 40) in one call
    for b, (lo, hi) in zip(curve["buckets"], evaluate.position_buckets(40)):
        assert b["loss"] == pytest.approx(float(per_tok[:, lo:hi].mean()), rel=1e-5)
        assert b["loss_lo"] <= b["loss"] <= b["loss_hi"]
    assert curve["by_length"][0]["loss"] == pytest.approx(float(per_tok[:, :16].mean()), rel=1e-5)


def test_mean_ablation_with_zero_means_equals_zero_ablation_and_restores_the_model(one_thread):
    torch.manual_seed(0)
    model = models.get_model("GF", 97, size="demo").eval()
    x = torch.randint(0, 97, (2, 12))
    C = model.config.hidden_size
    with torch.no_grad():
        base = model(x).logits
        with models.ablate(model, "mamba", layers=[1]):
            zero = model(x).logits
        with models.mean_ablate(model, "mamba", [torch.zeros(C)] * 2, layers=[1]):
            mean0 = model(x).logits
        assert torch.equal(zero, mean0) and not torch.equal(zero, base)
        assert torch.equal(model(x).logits, base)  # hooks removed
        means = evaluate.branch_means(model, x)
        acts = model(x, return_activations=True).activations
        for li in range(2):
            assert torch.allclose(means["rwkv"][li], acts[li]["rwkv"].mean((0, 1)), atol=1e-6)
        # replacing the branch by its own constant output gives the fusion exactly that constant
        seen = []
        h = model.blocks[0].fusion.register_forward_hook(lambda m, args, out: seen.append(args[1]))
        with models.mean_ablate(model, "mamba", means["mamba"]):
            model(x)
        h.remove()
        assert torch.equal(seen[0], means["mamba"][0].expand(2, 12, C))
    with pytest.raises(ValueError, match="shape"):
        with models.mean_ablate(model, "rwkv", [torch.zeros(3)] * 2):
            pass
    with pytest.raises(ValueError, match="no 'rwkv' branch"):
        with models.mean_ablate(models.get_model("MAMBA2", 97, size="demo"), "rwkv", [torch.zeros(C)] * 9):
            pass


def test_ablation_study_zero_and_mean_per_layer_with_paired_cis(shards, one_thread):
    torch.manual_seed(0)
    model = models.get_model("GF-MH", 512, size="demo").eval()
    sh = data.TokenShards(shards)
    x, y = evaluate.spread_windows(sh.split("validation"), 6, 32)
    held, _ = evaluate.spread_windows(sh.split("test"), 4, 32)
    res = evaluate.ablation_study(model, x, y, held)
    labels = {(r.kind, r.branch, r.layers) for r in res["runs"]}
    for kind in ("zero", "mean"):
        for br in ("rwkv", "mamba"):
            assert {(kind, br, "all"), (kind, br, "0"), (kind, br, "1")} <= labels
    assert ("gate", "mamba", "all") in labels and ("gate", "rwkv", "all") in labels
    base = evaluate.window_losses(model, x, y)
    with models.ablate(model, "rwkv"):
        want = float((evaluate.window_losses(model, x, y) - base).mean())
    (r,) = [r for r in res["runs"] if (r.kind, r.branch, r.layers) == ("zero", "rwkv", "all")]
    assert r.delta == pytest.approx(want, rel=1e-6, abs=1e-9) and r.delta_lo <= r.delta <= r.delta_hi
    assert {k: v for k, v in res.items() if "_share_" in k} == evaluate.contribution_shares(res["runs"])
    A = evaluate.Ablation
    shares = evaluate.contribution_shares([A("", "zero", "rwkv", "all", 0, 0.3, 0, 0), A("", "zero", "mamba", "all", 0, 0.1, 0, 0),
                                           A("", "zero", "mamba", "0", 0, 9.0, 0, 0), A("", "mean", "rwkv", "all", 0, 0.2, 0, 0),
                                           A("", "mean", "mamba", "all", 0, -0.1, 0, 0)])
    assert shares == pytest.approx({"rwkv_share_zero": 0.75, "mamba_share_zero": 0.25, "rwkv_share_mean": 1.0,
                                    "mamba_share_mean": 0.0})
    assert [g["layer"] for g in res["gates"]] == [0, 1] and all(0 < g["mean"] < 1 for g in res["gates"])
    assert res["gates"][0]["p5"] <= res["gates"][0]["p50"] <= res["gates"][0]["p95"]


def test_s4_and_s1_are_unchanged_when_one_recurrence_is_rescaled(shards):
    """The Mamba-2 state is ~100x smaller per element than RWKV-6's by construction; rescaling it by 1000
    must not move S4 (relative change ratio) or take S1 (per-element RMS) out of its band."""
    torch.manual_seed(0)
    model = models.get_model("GF-MH", 512, size="demo").eval()
    xa, _ = evaluate.windows(data.TokenShards(shards).split("validation"), 2, 32)
    xb, _ = evaluate.windows(data.TokenShards(shards).split("validation"), 2, 32, offset=66)
    plain = evaluate.state_tests(model, xa, xb)

    class Scaled(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x, **kw):
            out = self.m(x, **kw)
            for st in out.layer_states:
                st["mamba_ssm_state"] = st["mamba_ssm_state"] * 1000.0
            return out

    scaled = evaluate.state_tests(Scaled(model).eval(), xa, xb)
    assert scaled["S4"]["value"] == pytest.approx(plain["S4"]["value"], rel=1e-9)
    assert scaled["S4"]["verdict"] == plain["S4"]["verdict"] and scaled["S1"]["verdict"] == plain["S1"]["verdict"] == "pass"


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
               on_log=None, on_step_end=None, on_event=None, log_every_s=0, progress=False, verify_shards=False)
    assert not (tmp_path / "checkpoints").exists()


def test_held_out_text_is_the_test_split_and_its_absence_is_named(shards):
    sh = data.TokenShards(shards)
    assert np.array_equal(evaluate.held_out_split(sh), sh.split("test"))

    class NoTest:
        path, splits = Path("/somewhere/shards"), ("train", "validation")

    with pytest.raises(ValueError, match="no test split.*apart from the validation windows"):
        evaluate.held_out_split(NoTest())
