"""Evaluation engine behind the reports: stateful long-context loss, ablations, NIAH, state tests.

Plain PyTorch (no Dagster). Everything runs on held-out validation tokens of a trained model.
Long sequences are processed in chunks with the carried recurrent state, so memory stays flat in
the sequence length; `stateful_token_losses` equals a full-sequence forward (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

import models


def _at_least_f32(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits up to fp32 for the softmax; fp64 stays fp64 (exactness tests)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


Progress = Callable[[int, int], None]  # progress(done, total): gt_pipeline.engine.progress.Progress or any callable


@torch.no_grad()
def stateful_token_losses(model, x: torch.Tensor, y: torch.Tensor, chunk: int = 512,
                          progress: Progress | None = None) -> torch.Tensor:
    """Per-token cross-entropy (B, T) of `model` on x -> y, fed `chunk` tokens at a time with the state
    carried between chunks. Non-recurrent models (GPT) get the whole sequence in one call.
    `progress(tokens_done, tokens_total)` after each chunk."""
    model.eval()
    if not model.is_recurrent:
        logits = _at_least_f32(model(x).logits)
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none")
    out, state = [], None
    for s in range(0, x.shape[1], chunk):
        o = model(x[:, s : s + chunk], state=state)
        state = o.state
        out.append(F.cross_entropy(_at_least_f32(o.logits).transpose(1, 2), y[:, s : s + chunk], reduction="none"))
        if progress is not None:
            progress(x.shape[0] * min(s + chunk, x.shape[1]), x.numel())
    return torch.cat(out, dim=1)


def windows(tokens: np.ndarray, n: int, length: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n non-overlapping windows of `length`+1 tokens from the start of `tokens` (deterministic)."""
    need = offset + n * (length + 1)
    if len(tokens) < need:
        raise ValueError(f"need {need} validation tokens for {n} windows of {length}, have {len(tokens)}")
    w = np.asarray(tokens[offset:need], dtype=np.int64).reshape(n, length + 1)
    t = torch.from_numpy(w)
    return t[:, :-1], t[:, 1:]


# ------------------------------------------------------------------------------------------ ablation
@dataclass
class Ablation:
    label: str
    layers: str
    loss: float
    delta: float


@torch.no_grad()
def branch_balance(model, x: torch.Tensor) -> list[dict[str, float]]:
    """Per layer: activation variance of each branch (before fusion), their ratio, state norms, gate mean."""
    out = model(x, return_states=True, return_activations=True)
    rows = []
    for i, (acts, st) in enumerate(zip(out.activations, out.layer_states)):
        row: dict[str, float] = {"layer": i}
        if "rwkv" in acts and "mamba" in acts:
            vr, vm = float(acts["rwkv"].float().var()), float(acts["mamba"].float().var())
            row.update(rwkv_act_var=vr, mamba_act_var=vm, act_var_ratio=vr / vm if vm > 0 else math.inf)
        if "rwkv_state" in st and "mamba_ssm_state" in st:
            nr, nm = float(st["rwkv_state"].float().norm()), float(st["mamba_ssm_state"].float().norm())
            row.update(rwkv_state_norm=nr, mamba_state_norm=nm, state_norm_ratio=nr / nm if nm > 0 else math.inf)
        if "gate" in st and torch.is_tensor(st["gate"]):
            row["gate_mean"] = float(st["gate"].float().mean())
        rows.append(row)
    return rows


def ablation_study(model, x: torch.Tensor, y: torch.Tensor, chunk: int = 512,
                   progress: Progress | None = None) -> dict[str, Any]:
    """Validation loss with each branch zeroed (all layers and layer by layer) and, for gated
    variants, with the gate forced to 1 (RWKV path only) and 0 (Mamba path only).
    `progress(evaluations_done, evaluations_at_most)` after each evaluation (those that do not apply to
    the model are skipped, so the count may end below the total)."""
    n_layer = len(model.blocks)
    at_most, done = 1 + 2 * (1 + n_layer) + 2, 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, at_most)

    base = float(stateful_token_losses(model, x, y, chunk).mean())
    tick()
    runs: list[Ablation] = []
    for branch in ("rwkv", "mamba"):
        try:
            with models.ablate(model, branch):
                loss = float(stateful_token_losses(model, x, y, chunk).mean())
        except ValueError:
            continue  # the model has no such branch
        runs.append(Ablation(f"zero {branch}", "all", loss, loss - base))
        tick()
        for layer in range(n_layer):
            with models.ablate(model, branch, layers=[layer]):
                loss = float(stateful_token_losses(model, x, y, chunk).mean())
            runs.append(Ablation(f"zero {branch}", str(layer), loss, loss - base))
            tick()
    for value, label in ((1.0, "gate=1 (RWKV path only)"), (0.0, "gate=0 (Mamba path only)")):
        try:
            with models.force_gate(model, value):
                loss = float(stateful_token_losses(model, x, y, chunk).mean())
        except ValueError:
            break  # not a gated variant
        runs.append(Ablation(label, "all", loss, loss - base))
        tick()
    overall = {r.label: r.delta for r in runs if r.layers == "all"}
    dr, dm = max(overall.get("zero rwkv", 0.0), 0.0), max(overall.get("zero mamba", 0.0), 0.0)
    shares = {"rwkv_share": dr / (dr + dm), "mamba_share": dm / (dr + dm)} if dr + dm > 0 else {}
    return {"baseline_loss": base, "runs": runs, **shares, "balance": branch_balance(model, x[: min(4, len(x))])}


# -------------------------------------------------------------------------------------- long context
def long_context_curve(model, tokens: np.ndarray, lengths: Iterable[int], n_seq: int, chunk: int = 512,
                       device: str | torch.device = "cpu", progress: Progress | None = None) -> dict[str, Any]:
    """Loss vs context: for the longest length L that fits, run n_seq windows of L tokens statefully and
    report (a) mean loss per position bucket [2^k, 2^(k+1)), (b) for each length l the mean loss of
    windows of l tokens (the first l positions), (c) degradation ratio ppl(512)/ppl(64) as in the seeds."""
    lengths = sorted(lengths)
    longest = lengths[-1]
    x, y = windows(tokens, n_seq, longest)
    losses = stateful_token_losses(model, x.to(device), y.to(device), chunk, progress).cpu()  # (n_seq, L)
    per_pos = losses.mean(0)
    buckets = []
    lo = 1
    while lo <= longest:
        hi = min(2 * lo, longest + 1)
        buckets.append({"positions": f"[{lo - 1}, {hi - 1})", "loss": float(per_pos[lo - 1 : hi - 1].mean())})
        lo *= 2
    by_length = [{"context": n, "loss": float(losses[:, :n].mean()), "ppl": float(math.exp(losses[:, :n].mean()))}
                 for n in lengths]
    ppl = {r["context"]: r["ppl"] for r in by_length}
    ratio = ppl[512] / ppl[64] if 512 in ppl and 64 in ppl else math.nan
    return {"by_length": by_length, "buckets": buckets, "degradation_ppl_512_over_64": ratio}


# ---------------------------------------------------------------------------------------------- NIAH
@torch.no_grad()
def continuation_logprobs(model, prefix_ids: list[int], conts: list[list[int]], device, chunk: int = 512) -> list[float]:
    """log p(cont | prefix) for each continuation. Recurrent models read the prefix once and continue
    every choice from the carried state; GPT scores each full sequence."""
    model.eval()
    if not model.is_recurrent:
        out = []
        for cont in conts:
            ids = torch.tensor([prefix_ids + cont], dtype=torch.int64, device=device)
            losses = stateful_token_losses(model, ids[:, :-1], ids[:, 1:], chunk)
            out.append(-float(losses[0, len(prefix_ids) - 1 :].sum()))
        return out
    ids = torch.tensor([prefix_ids], dtype=torch.int64, device=device)
    state, last = None, None
    for s in range(0, ids.shape[1], chunk):
        o = model(ids[:, s : s + chunk], state=state)
        state, last = o.state, o.logits[:, -1]
    out = []
    for cont in conts:
        c = torch.tensor([cont], dtype=torch.int64, device=device)
        logits = torch.cat([last[:, None], model(c[:, :-1], state=state).logits], 1) if len(cont) > 1 else last[:, None]
        logp = torch.log_softmax(_at_least_f32(logits), -1).gather(-1, c[..., None])
        out.append(float(logp.sum()))
    return out


def niah_trial(model, tok, haystack_ids: list[int], needle: str, prompt: str, answer: str,
               distractors: list[str], depth: float, device, eot_id: int) -> dict[str, Any]:
    """Insert `needle` at `depth` of the haystack, append `prompt`, rank `answer` among `distractors` by
    log-probability. rank 1 = the model retrieved the needle's answer."""
    needle_ids = tok.encode(" " + needle + " ").ids
    cut = int(round(depth * len(haystack_ids)))
    prefix = [eot_id] + haystack_ids[:cut] + needle_ids + haystack_ids[cut:] + tok.encode(" " + prompt).ids
    choices = [answer, *distractors]
    logps = continuation_logprobs(model, prefix, [tok.encode(" " + c).ids for c in choices], device)
    scores = dict(zip(choices, logps))
    rank = 1 + sum(s > scores[answer] for c, s in scores.items() if c != answer)
    return {"rank": rank, "correct": rank == 1, "n_choices": len(scores), "scores": scores}


def niah_grid(model, tok, tokens: np.ndarray, facts, lengths: list[int], depths: list[float], trials: int,
              device, eot_id: int, progress: Progress | None = None) -> list[dict[str, Any]]:
    """Accuracy (answer ranked first) and mean rank per (haystack length, depth).

    Needles are counterfactual: each states a distractor as the answer ("The capital of X is <wrong>"),
    and the true corpus answer joins the distractors. A model that answers from memory ranks the
    corpus answer first and scores 0; only retrieval from the context scores.
    `progress(trials_done, trials_total)` after each trial."""
    rows, done, total = [], 0, len(lengths) * len(depths) * trials
    for length in lengths:
        for depth in depths:
            results = []
            for t in range(trials):
                f = facts[(t * 7 + int(depth * 100) + length) % len(facts)]
                fake = f.distractors[t % len(f.distractors)]
                others = [f.answer] + [d for d in f.distractors if d != fake]
                start = (t * 9973 + length) % max(1, len(tokens) - length - 1)
                hay = [int(v) for v in tokens[start : start + length]]
                needle = f"{f.prompt} {fake} ."
                results.append(niah_trial(model, tok, hay, needle, f.prompt, fake, others, depth, device, eot_id))
                done += 1
                if progress is not None:
                    progress(done, total)
            rows.append({"haystack_tokens": length, "depth": depth,
                         "accuracy": float(np.mean([r["correct"] for r in results])),
                         "mean_rank": float(np.mean([r["rank"] for r in results])),
                         "chance": 1.0 / results[0]["n_choices"], "trials": trials})
    return rows


# ------------------------------------------------------------------------------ state tests S0-S4
@torch.no_grad()
def state_tests(model, x_a: torch.Tensor, x_b: torch.Tensor) -> dict[str, Any]:
    """S0-S4 on real tokens: x_a, x_b are two different (B, T) validation batches."""
    from gt_pipeline import gates

    model.eval()
    sa = model(x_a, return_states=True).layer_states
    sa2 = model(x_a, return_states=True).layer_states
    sb = model(x_b, return_states=True).layer_states
    keys = [k for k in ("rwkv_state", "mamba_ssm_state") if k in sa[0]]
    shapes = {f"{k}[{i}]": list(st[k].shape) for i, st in enumerate(sa) for k in keys}
    s0 = bool(keys) and all(len(s) == 4 for s in shapes.values())
    norms = [float(st[k].float().norm()) for st in sa for k in keys]
    change = [float((a[k] - b[k]).float().norm() / a[k].float().norm().clamp_min(1e-12)) for a, b in zip(sa, sb) for k in keys]
    determinism = max(float((a[k] - b[k]).abs().max()) for a, b in zip(sa, sa2) for k in keys)
    out = {
        "S0": {"verdict": "pass" if s0 else "fail", "value": shapes},
        "S1": {"verdict": _worst_verdict(gates.S1_STATE_NORM, norms), "value": [min(norms), max(norms)]},
        "S2": {"verdict": _worst_verdict(gates.S2_STATE_CHANGE, change), "value": min(change)},
        "S3": {"verdict": gates.S3_DETERMINISM.classify(determinism).value, "value": determinism},
    }
    if len(keys) == 2:
        vr = float(torch.stack([st["rwkv_state"].float().var() for st in sa]).mean())
        vm = float(torch.stack([st["mamba_ssm_state"].float().var() for st in sa]).mean())
        ratio = vr / vm if vm > 0 else math.inf
        sym = max(ratio, 1 / ratio) if ratio > 0 else math.inf
        out["S4"] = {"verdict": gates.S4_STATE_BALANCE.classify(sym).value, "value": ratio}
    else:
        out["S4"] = {"verdict": "n/a", "value": None}
    return out


def _worst_verdict(band, values: list[float]) -> str:
    from gt_pipeline.gates import Verdict

    return Verdict.worst([band.classify(v) for v in values]).value if values else "fail"


def overfit_test(model_factory, x: torch.Tensor, y: torch.Tensor, max_steps: int, target: float,
                 lr: float = 1e-3, progress: Progress | None = None) -> dict[str, Any]:
    """Graduation: a fresh model must fit a handful of real sequences below `target` loss.
    `progress(steps_done, max_steps)` after each step (it stops early once the target is reached)."""
    torch.manual_seed(0)
    model = model_factory().train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    first = loss_v = math.nan
    for step in range(1, max_steps + 1):
        logits = model(x).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_v = float(loss.detach())
        if progress is not None:
            progress(step, max_steps)
        if step == 1:
            first = loss_v
        if loss_v < target:
            return {"verdict": "pass", "value": loss_v, "steps": step, "initial_loss": first}
    verdict = "warn" if loss_v < 0.5 * first else "fail"
    return {"verdict": verdict, "value": loss_v, "steps": max_steps, "initial_loss": first}


@torch.no_grad()
def roundtrip_test(model, model_factory, path, x: torch.Tensor, max_abs: float) -> dict[str, Any]:
    """Graduation: save to safetensors, load into a fresh model, same logits."""
    from gt_pipeline.engine.checkpoint import load_model_weights, save_model

    save_model(model, path)
    twin = model_factory()
    load_model_weights(twin, path)
    twin.to(x.device).eval()
    diff = float((model.eval()(x).logits - twin(x).logits).abs().max())
    return {"verdict": "pass" if diff < max_abs else "fail", "value": diff}
