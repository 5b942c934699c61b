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
from gt_pipeline.engine import stats


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
    """n contiguous windows of `length`+1 tokens from `offset` on (deterministic): inputs and targets
    int64 (n, length). For tests that need two disjoint small batches (state tests, overfit); every loss
    a report states comes from `spread_windows`."""
    need = offset + n * (length + 1)
    if len(tokens) < need:
        raise ValueError(f"need {need} validation tokens for {n} windows of {length}, have {len(tokens)}")
    w = np.asarray(tokens[offset:need], dtype=np.int64).reshape(n, length + 1)
    t = torch.from_numpy(w)
    return t[:, :-1], t[:, 1:]


def spread_windows(tokens: np.ndarray, n: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n disjoint windows of `length`+1 tokens spread over the WHOLE split: the split is cut into n equal
    strata and each window starts at a seeded random offset inside its own stratum (stratified sampling).
    The same (tokens, n, length, seed) always give the same windows. Returns inputs, targets int64 (n, length)."""
    if n < 1 or length < 1:
        raise ValueError(f"spread_windows: n and length must be >= 1, got n={n}, length={length}")
    stratum = len(tokens) // n
    if stratum < length + 1:
        raise ValueError(f"spread_windows: {n} disjoint windows of {length}+1 tokens need {n * (length + 1)} "
                         f"validation tokens, the split has {len(tokens)}: ask for fewer or shorter windows")
    rng = np.random.default_rng(seed)
    starts = np.arange(n, dtype=np.int64) * stratum + rng.integers(0, stratum - length, size=n)
    w = np.stack([np.asarray(tokens[s : s + length + 1], dtype=np.int64) for s in starts])
    t = torch.from_numpy(w)
    return t[:, :-1], t[:, 1:]


@torch.no_grad()
def held_out_split(shards) -> np.ndarray:
    """The text for branch means and gate statistics, apart from the evaluation windows (which are spread over the
    validation split): the test split. ValueError without one: means taken from the evaluation windows themselves
    would not be held out."""
    if "test" not in shards.splits:
        raise ValueError(f"token_shards at {shards.path} have no test split (splits: {sorted(shards.splits)}): the "
                         "branch means and gate statistics need text apart from the validation windows; rebuild "
                         "token_shards with a test split")
    return shards.split("test")


def window_losses(model, x: torch.Tensor, y: torch.Tensor, *, batch: int = 8, chunk: int = 512,
                  device: str | torch.device | None = None) -> np.ndarray:
    """Mean token cross-entropy of each window: x, y int64 (n, T) -> float64 (n,). Windows are the units
    every CI is over (tokens inside a window are correlated, windows far apart nearly are not)."""
    dev = device if device is not None else next(model.parameters()).device
    out = [stateful_token_losses(model, x[i : i + batch].to(dev), y[i : i + batch].to(dev), chunk).double().mean(1).cpu()
           for i in range(0, len(x), batch)]
    return torch.cat(out).numpy()


def loss_ci(per_window: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Mean loss with its CI over windows (stats.mean_ci), and the perplexity at the mean and the CI ends."""
    ci = stats.mean_ci(per_window, seed=seed)
    return {"loss": ci.mean, "loss_lo": ci.lo, "loss_hi": ci.hi, "ppl": math.exp(ci.mean), "windows": ci.n}


# ------------------------------------------------------------------------------------------ ablation
@dataclass
class Ablation:
    """One ablated evaluation: `kind` zero | mean | gate, `branch`, `layers` ('all' or a layer index);
    loss and the paired (per-window) increase over the baseline with its CI over windows (stats.mean_ci)."""

    label: str
    kind: str
    branch: str
    layers: str
    loss: float
    delta: float
    delta_lo: float
    delta_hi: float


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


@torch.no_grad()
def branch_means(model, x: torch.Tensor, *, batch: int = 8) -> dict[str, list[torch.Tensor]]:
    """Mean output of each branch per layer over held-out windows x int64 (n, T): {branch: [fp32 (C,)] * n_layer}.
    What mean-ablation puts in place of a branch (`models.mean_ablate`)."""
    model.eval()
    dev = next(model.parameters()).device
    sums: dict[str, list[torch.Tensor]] = {}
    count = 0
    for i in range(0, len(x), batch):
        acts = model(x[i : i + batch].to(dev), return_activations=True).activations
        for li, a in enumerate(acts):
            for br in ("rwkv", "mamba"):
                if br in a:
                    s = a[br].double().sum(dim=(0, 1))  # (C,)
                    lst = sums.setdefault(br, [torch.zeros_like(s) for _ in acts])
                    lst[li] += s
        count += x[i : i + batch].numel()
    return {br: [(s / count).float() for s in lst] for br, lst in sums.items()}


@torch.no_grad()
def gate_statistics(model, x: torch.Tensor, *, batch: int = 8) -> list[dict[str, Any]]:
    """Per layer, the fusion gate on held-out windows x (n, T): mean, std and percentiles (5, 25, 50, 75, 95).

    What the gate is depends on the fusion: GF / GF-MH / GF-RH the per-token g (share of the RWKV
    branch), WS the scalar alpha, HY the per-channel RWKV gain g_r. RF / CP have no gate (empty list)."""
    model.eval()
    dev = next(model.parameters()).device
    per_layer: dict[int, list[torch.Tensor]] = {}
    for i in range(0, len(x), batch):
        for li, st in enumerate(model(x[i : i + batch].to(dev), return_states=True).layer_states):
            g = st.get("gate")
            if torch.is_tensor(g):
                per_layer.setdefault(li, []).append(g.detach().float().reshape(-1).cpu())
    kind = {"GF": "g per token", "GF-MH": "g per token", "GF-RH": "g per token", "WS": "alpha (scalar)",
            "HY": "g_r per channel"}.get(getattr(getattr(model, "config", None), "name", ""), "gate")
    rows = []
    for li, parts in sorted(per_layer.items()):
        g = torch.cat(parts) if kind != "alpha (scalar)" and kind != "g_r per channel" else parts[0]
        q = torch.quantile(g.double(), torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64))
        rows.append({"layer": li, "gate": kind, "mean": float(g.double().mean()),
                     "std": float(g.double().std()) if g.numel() > 1 else 0.0,
                     "p5": float(q[0]), "p25": float(q[1]), "p50": float(q[2]), "p75": float(q[3]), "p95": float(q[4]),
                     "values": int(g.numel())})
    return rows


def ablation_study(model, x: torch.Tensor, y: torch.Tensor, held_out: torch.Tensor, *, chunk: int = 512,
                   batch: int = 8, seed: int = 0, progress: Progress | None = None) -> dict[str, Any]:
    """Validation loss with each branch zero-ablated and mean-ablated (all layers and layer by layer) and,
    for gated variants, with the gate forced to 1 (RWKV path only) and 0 (Mamba path only).

    x, y int64 (n, T): the evaluation windows; held_out int64 (m, T'): OTHER windows, on which the branch
    means for mean-ablation and nothing else are measured. Every delta is paired by window (same windows
    with and without the ablation) with a CI over windows (stats.mean_ci) (seeded).
    `progress(evaluations_done, evaluations_at_most)` after each evaluation (those that do not apply to the
    model are skipped, so the count may end below the total)."""
    n_layer = len(model.blocks)
    at_most, done = 1 + 4 * (1 + n_layer) + 2, 0

    def losses() -> np.ndarray:
        nonlocal done
        out = window_losses(model, x, y, batch=batch, chunk=chunk)
        done += 1
        if progress is not None:
            progress(done, at_most)
        return out

    base_w = losses()
    base = loss_ci(base_w, seed)
    runs: list[Ablation] = []

    def record(label: str, kind: str, branch: str, layers: str, w: np.ndarray) -> None:
        d = stats.paired_mean_diff(w, base_w, seed=seed)
        runs.append(Ablation(label, kind, branch, layers, float(w.mean()), d.mean, d.lo, d.hi))

    means = branch_means(model, held_out, batch=batch)
    for branch in ("rwkv", "mamba"):
        if branch not in means:
            continue  # the model has no such branch
        for kind in ("zero", "mean"):
            def ctx(layers=None, kind=kind, branch=branch):
                if kind == "zero":
                    return models.ablate(model, branch, layers=layers)
                return models.mean_ablate(model, branch, means[branch], layers=layers)

            with ctx():
                record(f"{kind} {branch}", kind, branch, "all", losses())
            for layer in range(n_layer):
                with ctx([layer]):
                    record(f"{kind} {branch}", kind, branch, str(layer), losses())
    for value, label, branch in ((1.0, "gate=1 (RWKV path only)", "mamba"), (0.0, "gate=0 (Mamba path only)", "rwkv")):
        try:
            cm = models.force_gate(model, value)
        except ValueError:
            break  # not a gated variant
        with cm:
            record(label, "gate", branch, "all", losses())
    shares = contribution_shares(runs)
    return {"baseline": base, "baseline_loss": base["loss"], "runs": runs, **shares,
            "gates": gate_statistics(model, held_out, batch=batch),
            "balance": branch_balance(model, x[: min(4, len(x))].to(next(model.parameters()).device))}


def contribution_shares(runs: list[Ablation]) -> dict[str, float]:
    """Per ablation kind (zero, mean): each branch's share of the summed loss increase when it is removed in
    all layers, increases below 0 counted as 0. A kind where neither removal costs anything has no shares."""
    shares: dict[str, float] = {}
    for kind in ("zero", "mean"):
        overall = {r.branch: r.delta for r in runs if r.kind == kind and r.layers == "all"}
        dr, dm = max(overall.get("rwkv", 0.0), 0.0), max(overall.get("mamba", 0.0), 0.0)
        if dr + dm > 0:
            shares[f"rwkv_share_{kind}"], shares[f"mamba_share_{kind}"] = dr / (dr + dm), dm / (dr + dm)
    return shares


# -------------------------------------------------------------------------------------- long context
def position_buckets(length: int) -> list[tuple[int, int]]:
    """[0, 1), [1, 3), [3, 7), ...: positions p with 2^k <= p + 1 < 2^(k+1), the last one cut at `length`."""
    out, lo = [], 1
    while lo <= length:
        out.append((lo - 1, min(2 * lo, length + 1) - 1))
        lo *= 2
    return out


def long_context_curve(model, tokens: np.ndarray, lengths: Iterable[int], n_seq: int, chunk: int = 512,
                       device: str | torch.device = "cpu", seed: int = 0,
                       progress: Progress | None = None) -> dict[str, Any]:
    """Loss vs context on n_seq windows of the longest length L, spread over the whole split, run statefully:
    (a) loss per position bucket [2^k - 1, 2^(k+1) - 1) - the loss AT those positions, not a running mean -
    with a CI over windows (stats.mean_ci); (b) for each length l, the mean loss over the first l positions (CI too);
    (c) the seeds' degradation ratio ppl(512)/ppl(64) (of the cumulative means).
    `progress(tokens_done, tokens_total)` as the windows are read."""
    lengths = sorted(lengths)
    longest = lengths[-1]
    x, y = spread_windows(tokens, n_seq, longest, seed=seed)
    rows = []
    for i in range(n_seq):
        step = None if progress is None else (lambda d, t, i=i: progress(i * longest + d, n_seq * longest))
        rows.append(stateful_token_losses(model, x[i : i + 1].to(device), y[i : i + 1].to(device), chunk, step).cpu())
    losses = torch.cat(rows).double().numpy()  # (n_seq, L)
    buckets = []
    for lo, hi in position_buckets(longest):
        ci = stats.mean_ci(losses[:, lo:hi].mean(1), seed=seed)
        buckets.append({"positions": f"[{lo}, {hi})", "start": lo, "end": hi, "loss": ci.mean, "loss_lo": ci.lo,
                        "loss_hi": ci.hi, "windows": ci.n})
    by_length = []
    for n in lengths:
        ci = stats.mean_ci(losses[:, :n].mean(1), seed=seed)
        by_length.append({"context": n, "loss": ci.mean, "loss_lo": ci.lo, "loss_hi": ci.hi, "ppl": math.exp(ci.mean)})
    ppl = {r["context"]: r["ppl"] for r in by_length}
    ratio = ppl[512] / ppl[64] if 512 in ppl and 64 in ppl else math.nan
    return {"by_length": by_length, "buckets": buckets, "degradation_ppl_512_over_64": ratio, "windows": n_seq}


# ---------------------------------------------------------------------------------------------- NIAH
@torch.no_grad()
def continuation_logprobs(model, prefix_ids: list[int], conts: list[list[int]], device, chunk: int = 512,
                          per_token: bool = False) -> list[float]:
    """log p(cont | prefix) for each continuation (summed over its tokens, or their mean with `per_token`).
    Recurrent models read the prefix once and continue every choice from the carried state; GPT scores
    each full sequence."""
    model.eval()
    if not model.is_recurrent:
        out = []
        for cont in conts:
            ids = torch.tensor([prefix_ids + cont], dtype=torch.int64, device=device)
            losses = stateful_token_losses(model, ids[:, :-1], ids[:, 1:], chunk)
            out.append(-float(losses[0, len(prefix_ids) - 1 :].sum()) / (len(cont) if per_token else 1))
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
        out.append(float(logp.sum()) / (len(cont) if per_token else 1))
    return out


@dataclass(frozen=True)
class Needle:
    """A synthetic key-value fact: "The secret code of <key> is <answer> ." The answer is a number drawn
    at random, so no training text can hold it: only the needle in the context can. `distractors` are
    other numbers with the same token count as the answer."""

    key: str
    answer: str
    distractors: tuple[str, ...]

    @property
    def sentence(self) -> str:
        return f"The secret code of {self.key} is {self.answer} ."

    @property
    def prompt(self) -> str:
        return f"The secret code of {self.key} is"


_SYLLABLES = ("ka", "lo", "mer", "tan", "vi", "dor", "sul", "ren", "bra", "quin", "zel", "fo", "ith", "mar", "no",
              "pel", "rus", "te", "gan", "wy")


def synthetic_needles(tok, n: int, n_distractors: int = 9, seed: int = 0) -> list[Needle]:
    """n needles for tokenizer `tok` (a `tokenizers.Tokenizer`): invented two-word names as keys, numbers
    10..999 as answers. Works on any text (WikiText, the demo corpus, anything else): nothing is taken
    from the corpus. Answers and distractors all come from the largest group of numbers whose " <number>"
    encodes to the same number of tokens (one token when the vocabulary has enough such numbers), so
    choices are compared at equal length; the scorer normalises per token anyway."""
    if n < 1 or n_distractors < 1:
        raise ValueError(f"synthetic_needles: n and n_distractors must be >= 1, got {n}, {n_distractors}")
    by_len: dict[int, list[str]] = {}
    for v in range(10, 1000):
        by_len.setdefault(len(tok.encode(f" {v}").ids), []).append(str(v))
    enough = {k: v for k, v in by_len.items() if len(v) > n_distractors}
    if not enough:
        raise ValueError(f"synthetic_needles: no token length has {n_distractors + 1} numbers in 10..999 "
                         f"for this tokenizer; lower n_distractors")
    pool = enough[min(enough, key=lambda k: (k, -len(enough[k])))]  # the shortest answers with enough choices
    rng = np.random.default_rng(seed)
    needles, keys = [], set()
    while len(needles) < n:
        key = " ".join("".join(rng.choice(_SYLLABLES, size=int(rng.integers(2, 4)))).capitalize() for _ in range(2))
        if key in keys:
            continue
        keys.add(key)
        picks = rng.choice(len(pool), size=n_distractors + 1, replace=False)
        needles.append(Needle(key, pool[picks[0]], tuple(pool[i] for i in picks[1:])))
    return needles


def niah_trial(model, tok, haystack_ids: list[int], needle: Needle | None, probe: Needle, depth: float | None,
               device, eot_id: int) -> dict[str, Any]:
    """Insert `needle` at `depth` of the haystack (None: no needle, the control), append `probe.prompt`, and
    score `probe.answer` against `probe.distractors` by mean log-probability per answer token.
    A hit needs the answer STRICTLY above every distractor: a tie is a miss."""
    cut = int(round((depth or 0.0) * len(haystack_ids)))
    needle_ids = tok.encode(" " + needle.sentence + " ").ids if needle is not None else []
    prefix = [eot_id] + haystack_ids[:cut] + needle_ids + haystack_ids[cut:] + tok.encode(" " + probe.prompt).ids
    choices = [probe.answer, *probe.distractors]
    logps = continuation_logprobs(model, prefix, [tok.encode(" " + c).ids for c in choices], device, per_token=True)
    ans, others = logps[0], logps[1:]
    rank = 1 + sum(s >= ans for s in others)  # ties count against the answer
    return {"rank": rank, "correct": ans > max(others), "n_choices": len(choices),
            "answer_tokens": len(tok.encode(" " + probe.answer).ids), "scores": dict(zip(choices, logps))}


def niah_grid(model, tok, tokens: np.ndarray, lengths: list[int], depths: list[float], trials: int,
              device, eot_id: int, *, n_distractors: int = 9, seed: int = 0,
              progress: Progress | None = None) -> list[dict[str, Any]]:
    """Accuracy (answer strictly first) with a Wilson 95% CI and mean rank per (haystack length, depth), plus
    one control row per length with no needle in the context (expected at chance, 1 / n_choices).

    Per length, trial t uses the same haystack (spread over the split, seeded) and the same needle at every
    depth and in the control, so cells differ only in where (or whether) the needle sits.
    `progress(trials_done, trials_total)` after each trial (the control counts as one)."""
    if trials < 1:
        raise ValueError(f"niah_grid: trials must be >= 1, got {trials}")
    needles = synthetic_needles(tok, trials * len(lengths), n_distractors, seed)
    rows, done, total = [], 0, len(lengths) * trials * (len(depths) + 1)
    for li, length in enumerate(lengths):
        hay_x, _ = spread_windows(tokens, trials, length, seed=seed + li + 1)
        cells: dict[Any, list[dict[str, Any]]] = {d: [] for d in [*depths, None]}
        for t in range(trials):
            hay = hay_x[t].tolist()
            nd = needles[li * trials + t]
            for d in depths:
                cells[d].append(niah_trial(model, tok, hay, nd, nd, d, device, eot_id))
            cells[None].append(niah_trial(model, tok, hay, None, nd, None, device, eot_id))
            done += len(depths) + 1
            if progress is not None:
                progress(done, total)
        for d, results in cells.items():
            hits = sum(r["correct"] for r in results)
            ci = stats.wilson_ci(hits, len(results))
            rows.append({"haystack_tokens": length, "depth": "no needle" if d is None else d,
                         "accuracy": ci.mean, "acc_lo": ci.lo, "acc_hi": ci.hi,
                         "mean_rank": float(np.mean([r["rank"] for r in results])),
                         "chance": 1.0 / results[0]["n_choices"], "answer_tokens": results[0]["answer_tokens"],
                         "trials": len(results)})
    return rows


# ------------------------------------------------------------------------------ state tests S0-S4
@torch.no_grad()
def state_tests(model, x_a: torch.Tensor, x_b: torch.Tensor) -> dict[str, Any]:
    """S0-S4 on real tokens: x_a, x_b are two different (B, T) validation batches.

    S1 and S4 use scale-free quantities (gates.py says why): S1 the per-element RMS of each layer's state,
    S4 the ratio of the two recurrences' relative state change between the two inputs,
    ||s(x_a) - s(x_b)|| / ||s(x_a)||, which a constant rescaling of either state leaves unchanged."""
    from gt_pipeline import gates

    model.eval()
    sa = model(x_a, return_states=True).layer_states
    sa2 = model(x_a, return_states=True).layer_states
    sb = model(x_b, return_states=True).layer_states
    keys = [k for k in ("rwkv_state", "mamba_ssm_state") if k in sa[0]]
    shapes = {f"{k}[{i}]": list(st[k].shape) for i, st in enumerate(sa) for k in keys}
    s0 = bool(keys) and all(len(s) == 4 for s in shapes.values())
    rms = [float(st[k].double().pow(2).mean().sqrt()) for st in sa for k in keys]
    change = {k: [float((a[k] - b[k]).double().norm() / a[k].double().norm().clamp_min(1e-30)) for a, b in zip(sa, sb)]
              for k in keys}
    determinism = max(float((a[k] - b[k]).abs().max()) for a, b in zip(sa, sa2) for k in keys) if keys else math.nan
    all_change = [c for k in keys for c in change[k]]
    out = {
        "S0": {"verdict": "pass" if s0 else "fail", "value": shapes},
        "S1": {"verdict": _worst_verdict(gates.S1_STATE_RMS, rms), "value": [min(rms), max(rms)] if rms else None},
        "S2": {"verdict": _worst_verdict(gates.S2_STATE_CHANGE, all_change), "value": min(all_change) if all_change else None},
        "S3": {"verdict": gates.S3_DETERMINISM.classify(determinism).value, "value": determinism},
    }
    if len(keys) == 2:
        cr, cm = float(np.mean(change["rwkv_state"])), float(np.mean(change["mamba_ssm_state"]))
        ratio = cr / cm if cm > 0 else math.inf
        sym = max(ratio, 1 / ratio) if ratio > 0 else math.inf
        out["S4"] = {"verdict": gates.S4_STATE_BALANCE.classify(sym).value, "value": ratio,
                     "rwkv_rel_change": cr, "mamba_rel_change": cm}
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
