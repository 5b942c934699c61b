"""Stateful decoding: GPT's KV cache against the full forward, prefill + steps against full recompute, the
decode step (uncaptured on CPU; captured in a CUDA graph, marker gpu) against plain stepping, and the
decode benchmark's JSON, memory numbers, skip logic and input errors.

Tolerances: fp32 on CPU. The cached and the full forward differ only in summation order (attention over a
prefix of the keys, other SDPA kernels), a few ulp of the logits (|logits| < 1 here): atol 2e-6. The
decode step runs exactly the ops of plain stepping, so its logits and states must agree bit for bit on the
CPU; a captured CUDA graph replays the eager kernels (GRAPH_ATOL below).
"""
import json

import pytest
import torch

import models
from gt_pipeline.engine import decode_bench
from gt_pipeline.engine.decode import DecodeStep, prefill
from numerics import assert_close

V = 97
FP32_ATOL = 2e-6


def _model(name, seed=0):
    torch.manual_seed(seed)
    return models.get_model(name, V, size="demo").eval()


def _tokens(B, T, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- KV cache
@torch.no_grad()
def test_kv_cache_token_by_token_equals_full_forward(one_thread):
    m, idx = _model("GPT"), _tokens(2, 23)                     # (B, T) = (2, 23)
    full = m(idx).logits                                       # (2, 23, V)
    cache, steps = m.kv_cache(2, 23), []
    for t in range(idx.shape[1]):
        out = m(idx[:, t:t + 1], state=cache)
        cache = out.state
        steps.append(out.logits)
    assert_close("token-by-token logits vs full forward", torch.cat(steps, 1), full, FP32_ATOL)
    assert cache.length == 23 and cache.capacity == 23


@torch.no_grad()
def test_kv_cache_prefill_then_steps_equals_full_recompute(one_thread):
    m, prompt = _model("GPT"), _tokens(2, 17)
    # chunks of 5: 5, 5, 5, 2 queries against 5, 10, 15, 17 keys (the mask aligned to the end of the keys)
    state, last = prefill(m, prompt, chunk=5, state=m.kv_cache(2, 17 + 6))
    text = prompt
    for i in range(6):
        want = m(text).logits[:, -1]                            # the whole text again, no cache
        assert_close(f"logits after prompt + {i} tokens", last, want, FP32_ATOL)
        nxt = last.argmax(-1, keepdim=True)                     # (2, 1)
        text = torch.cat([text, nxt], 1)
        out = m(nxt, state=state)
        state, last = out.state, out.logits[:, -1]
    assert state.length == 23


def test_kv_cache_refuses_what_it_cannot_do(one_thread):
    gpt, hybrid = _model("GPT"), _model("GF-MH")
    idx = _tokens(2, 4)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"KVCache full: 0 cached \+ 4 new positions > capacity 3"):
            gpt(idx, state=gpt.kv_cache(2, 3))
        with pytest.raises(ValueError, match="KVCache batch size 1 != idx batch size 2"):
            gpt(idx, state=gpt.kv_cache(1, 8))
        with pytest.raises(ValueError, match="GPT has no recurrent state"):
            gpt(idx, state=models.ModelState([{}] * len(gpt.blocks)))
    with pytest.raises(ValueError, match="autograd cannot differentiate"):
        gpt(idx, state=gpt.kv_cache(2, 8))
    with pytest.raises(ValueError, match="kv_cache: GF-MH is recurrent"):
        hybrid.kv_cache(2, 8)
    with pytest.raises(ValueError, match="kv_cache: capacity must be a positive int, got 0"):
        gpt.kv_cache(2, 0)
    with pytest.raises(ValueError, match="prefill: GPT decodes with a KV cache"):
        prefill(gpt, idx)


def test_kv_cache_attention_leaves_cudnn_out(one_thread, monkeypatch):
    # A cached call's key length changes every step; cuDNN's SDPA builds a plan per shape, so the cache path
    # must run with cuDNN disabled, and the training path (fixed shapes) with the global setting untouched.
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    gpt, idx = _model("GPT"), _tokens(2, 6)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with torch.no_grad():
        state, _ = prefill(gpt, idx, chunk=4, state=gpt.kv_cache(2, 8))     # chunks of 4 and 2 queries
        gpt(idx[:, :1], state=state)                                          # one decoding step
    n_cached = len(seen)
    assert n_cached == 3 * len(gpt.blocks) and not any(seen), f"cuDNN enabled in cached calls: {seen}"
    gpt(idx)                                                                  # training path: no cache
    assert all(seen[n_cached:]) and len(seen) == n_cached + len(gpt.blocks)
    assert torch.backends.cuda.cudnn_sdp_enabled(), "the cache path left cuDNN SDPA disabled globally"


# -------------------------------------------------------------------------------------------- decode step
# Both sides are fed the same tokens (not each its own argmax), so a near-tie cannot make them diverge.
@torch.no_grad()
def _plain_steps(model, state, toks):
    """toks (B, n): the logits (B, n, V) of `model(tok, state=state)` one token at a time, and the final state."""
    logits = []
    for t in range(toks.shape[1]):
        out = model(toks[:, t:t + 1], state=state)
        state = out.state
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1), state


def _stepped(step, toks):
    """The same through a DecodeStep (its output buffer is overwritten per call, hence the clone)."""
    return torch.stack([step(toks[:, t:t + 1]).clone() for t in range(toks.shape[1])], 1)


@torch.no_grad()
def test_prefill_equals_one_forward_for_the_hybrid(one_thread):
    m, prompt = _model("GF-MH"), _tokens(2, 19)
    state, last = prefill(m, prompt, chunk=6)                  # 6, 6, 6, 1 tokens, state carried
    whole = m(prompt)
    assert_close("last logits", last, whole.logits[:, -1], FP32_ATOL)
    for i, (got, want) in enumerate(zip(state.layers, whole.state.layers)):
        for k in want:
            assert_close(f"layer {i} {k}", got[k], want[k], FP32_ATOL)


def test_decode_step_uncaptured_equals_plain_stepping(one_thread):
    m, prompt, toks = _model("GF-MH"), _tokens(2, 9), _tokens(2, 5, seed=2)
    state, _ = prefill(m, prompt)
    before = [{k: v.clone() for k, v in d.items()} for d in state.layers]
    want_logits, want_state = _plain_steps(m, state, toks)
    step = DecodeStep(m, state)                                 # CPU: graph off, the same _run each call
    assert step.graph is None
    got_logits = _stepped(step, toks)
    assert torch.equal(got_logits, want_logits), "decode step logits differ from plain stepping"
    for i, (got, want) in enumerate(zip(step.state.layers, want_state.layers)):
        for k in want:
            assert torch.equal(got[k], want[k]), f"layer {i} {k}: decode step state differs from plain stepping"
    for i, (now, was) in enumerate(zip(state.layers, before)):   # the step advanced its own copy only
        for k in was:
            assert torch.equal(now[k], was[k]), f"layer {i} {k}: DecodeStep modified the caller's state"


def test_decode_step_refuses_a_graph_it_cannot_capture(one_thread):
    m = _model("GF-MH")
    state, _ = prefill(m, _tokens(1, 3))
    with pytest.raises(ValueError, match="a CUDA graph needs a recurrent model on CUDA"):
        DecodeStep(m, state, graph=True)
    with pytest.raises(ValueError, match=r"call model.eval\(\) first"):
        DecodeStep(m.train(), state)


# The replay runs the eager step's kernels, so it should agree exactly; the bound allows fp32 rounding, and for
# bf16 autocast (bf16 logits, |logits| < 1) a couple of bf16 ulps, should cuBLAS pick another GEMM algorithm
# under capture than in the eager call.
GRAPH_ATOL = {None: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16], ids=["fp32", "bf16_autocast"])
def test_decode_step_cuda_graph_replay_equals_plain_step(amp_dtype, no_tf32):
    m, prompt, toks = _model("GF-MH").cuda(), _tokens(3, 40).cuda(), _tokens(3, 8, seed=2).cuda()
    state, _ = prefill(m, prompt, chunk=16, amp_dtype=amp_dtype)
    eager = DecodeStep(m, state, graph=False, amp_dtype=amp_dtype)
    graphed = DecodeStep(m, state, graph=True, amp_dtype=amp_dtype)
    assert graphed.graph is not None
    want, got = _stepped(eager, toks), _stepped(graphed, toks)
    atol = GRAPH_ATOL[amp_dtype]
    assert_close("graph replay logits vs eager step", got, want, atol)
    for i, (g, e) in enumerate(zip(graphed.state.layers, eager.state.layers)):
        for k in e:
            assert_close(f"layer {i} {k} after 8 replays", g[k], e[k], atol)


# -------------------------------------------------------------------------------------------------- bench
def _per_layer_state_bytes(cfg):
    """GF-MH's state of one sequence per layer, by formula (fp32): RWKV state H*N*N + shift C, Mamba conv
    conv_dim*d_conv + SSM heads*P*N."""
    H, N, C = cfg.hidden_size // cfg.head_size, cfg.head_size, cfg.hidden_size
    d_inner = cfg.expand * C
    conv_dim = d_inner + 2 * cfg.ngroups * cfg.d_state
    mamba_heads = d_inner // cfg.mamba_headdim
    return 4 * (H * N * N + C + conv_dim * cfg.d_conv + mamba_heads * cfg.mamba_headdim * cfg.d_state)


def test_bench_json_numbers(one_thread, capsys, tmp_path, monkeypatch):
    written = []  # the --out file's row count at every rewrite
    real_write = decode_bench.write_partial
    monkeypatch.setattr(decode_bench, "write_partial",
                        lambda path, doc: (written.append(len(doc["results"])), real_write(path, doc)))
    decode_bench.main(["--models", "gf_mh", "--size", "demo", "--vocab", str(V), "--batch", "1,2",
                       "--contexts", "5,9", "--new-tokens", "2", "--warmup", "1", "--device", "cpu",
                       "--out", str(tmp_path / "d.json")])
    out = json.loads(capsys.readouterr().out)
    assert written == list(range(1, 9))                         # rewritten after every cell
    assert json.loads((tmp_path / "d.json").read_text()) == out
    assert out["benchmark"] == "decode_throughput" and {"machine", "torch", "date", "shapes"} <= out.keys()
    assert list(out["models"]) == ["GF-MH", "GPT"]              # the peer is added
    rows = out["results"]
    assert [(r["model"], r["batch"], r["context"]) for r in rows] == [
        (m, b, n) for m in ("GF-MH", "GPT") for b in (1, 2) for n in (5, 9)]
    assert not any(r["skipped"] for r in rows)
    hybrid, gpt = (models.make_config(n, V, size="demo") for n in ("GF-MH", "GPT"))
    per_seq = hybrid.n_layer * _per_layer_state_bytes(hybrid)
    kv_per_pos = 2 * gpt.n_layer * gpt.hidden_size * 4         # K and V, every layer, fp32
    assert out["models"]["GF-MH"]["state_bytes_per_seq_fixed"] == per_seq
    assert out["models"]["GPT"]["kv_bytes_per_seq_per_position"] == kv_per_pos
    for r in rows:
        assert set(r["decode"]) == {"eager"}                    # no CUDA graph on the CPU
        assert r["decode"]["eager"]["tokens_per_s"] > 0 and r["peak_cuda_bytes"] is None
        if r["model"] == "GF-MH":                              # constant in the context
            assert r["state_bytes_per_seq"] == per_seq and r["state_positions"] is None
            assert set(r["speedup_vs_gpt"]) == {"eager"}
        else:                                                   # grows with it: prompt + warmup + timed steps
            assert r["state_positions"] == r["context"] + 1 + 2
            assert r["state_bytes_per_seq"] == kv_per_pos * r["state_positions"]


def test_bench_skips_cells_over_the_memory_budget(one_thread):
    gpt = _model("GPT")
    per_pos = 2 * gpt.config.n_layer * gpt.config.hidden_size * 4
    # estimate = state + prefill working set B * chunk * (8 V + 256 C), by formula
    est = decode_bench.estimate_bytes(gpt, 2, 300, 8, (0, per_pos))
    assert est == {"state": 2 * 300 * per_pos, "prefill_working_set": 2 * 8 * (8 * V + 256 * 64),
                   "total": 2 * 300 * per_pos + 2 * 8 * (8 * V + 256 * 64)}
    # a budget between GPT's cells: context 4 fits, context 297 (300 positions) does not; GF-MH fits both
    budget = est["total"] - 1
    out = decode_bench.run(["GF-MH"], [2], [4, 297], size="demo", vocab=V, new_tokens=2, warmup=1,
                           prefill_tokens=16, device="cpu", memory_budget_bytes=budget)
    skipped = {(r["model"], r["context"]): r.get("reason") for r in out["results"] if r["skipped"]}
    assert list(skipped) == [("GPT", 297)]
    assert "> 0.00 GiB budget (--memory-budget-gb)" in skipped[("GPT", 297)]
    assert "speedup_vs_gpt" not in next(r for r in out["results"] if r["model"] == "GF-MH" and r["context"] == 297)


@pytest.mark.parametrize("argv, message", [
    (["--models", "GF-MH,NOPE"], "unknown model name 'NOPE'"),
    (["--batch", "1,0"], "--batch: every value must be >= 1, got 0"),
    (["--contexts", "0"], "--contexts: every value must be >= 1, got 0"),
    (["--contexts", "1k"], "--contexts: '1k' is not an integer"),
    (["--new-tokens", "0"], "--new-tokens: must be an int >= 1, got 0"),
    (["--out", "/nonexistent_dir/d.json"], "--out: the directory of '/nonexistent_dir/d.json' does not exist"),
], ids=["unknown_model", "batch_0", "context_0", "context_not_int", "no_new_tokens", "out_dir_missing"])
def test_bench_bad_input_names_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit):
        decode_bench.main(argv + ["--device", "cpu"])
    assert message in capsys.readouterr().err


def test_bench_run_validates_its_arguments():
    with pytest.raises(ValueError, match="unknown model name 'GF-MX'"):
        decode_bench.run(["GF-MX"], [1], [8])
    with pytest.raises(ValueError, match=r"--batch: every value must be an int >= 1, got \[0\]"):
        decode_bench.run(["GF-MH"], [0], [8])
    with pytest.raises(ValueError, match=r"--contexts: every value must be an int >= 1, got \[\]"):
        decode_bench.run(["GF-MH"], [1], [])


@pytest.mark.gpu
def test_bench_runs_both_modes_on_cuda():
    out = decode_bench.run(["GF-MH"], [1, 2], [64], size="demo", vocab=V, new_tokens=4, warmup=2, device="cuda")
    for r in out["results"]:
        assert not r["skipped"] and r["peak_cuda_bytes"] > 0
        assert set(r["decode"]) == ({"eager", "cuda_graph"} if r["model"] == "GF-MH" else {"eager"})
