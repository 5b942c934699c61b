"""Raw numbers behind the gates (G1-G4, G3.5); `gt_pipeline.gates` turns them into verdicts.

All of them are measured on real tokens (held-out validation text), never on random ids: that was
the seeds' main diagnostic flaw.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gt_pipeline import gates

STATE_KEYS = ("rwkv_state", "mamba_ssm_state")


@torch.no_grad()
def g1_forward(model: torch.nn.Module, x: torch.Tensor, vocab_size: int) -> dict[str, Any]:
    """A forward pass on a real batch: finite logits of shape [B, T, vocab]."""
    model.eval()
    logits = model(x).logits
    expected = (x.shape[0], x.shape[1], vocab_size)
    finite = bool(torch.isfinite(logits).all())
    return {"finite": finite, "shape_ok": tuple(logits.shape) == expected,
            "logits_shape": list(logits.shape), "expected_shape": list(expected),
            "passed": finite and tuple(logits.shape) == expected}


@torch.no_grad()
def entropy_ratio(model: torch.nn.Module, x: torch.Tensor, vocab_size: int) -> float:
    """G2: mean next-token entropy (nats) over ln(vocab); 1.0 = uniform predictions."""
    was_training = model.training
    model.eval()
    logp = F.log_softmax(model(x).logits.float(), dim=-1)
    ent = -(logp.exp() * logp).sum(-1).mean()
    model.train(was_training)
    return float(ent) / math.log(vocab_size)


@torch.no_grad()
def init_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """G2 on a freshly initialised model: cross-entropy on real tokens x -> y (int64 (B, T)) against ln(V).

    Returns init_loss (nats), ln_vocab, deviation = |init_loss - ln V| / ln V (the banded value) and the
    entropy ratio (mean next-token entropy / ln V) for the report."""
    was_training = model.training
    model.eval()
    logp = F.log_softmax(model(x).logits.float(), dim=-1)  # (B, T, V)
    ce = float(F.nll_loss(logp.transpose(1, 2), y))
    ent = float(-(logp.exp() * logp).sum(-1).mean())
    model.train(was_training)
    ln_v = math.log(vocab_size)
    return {"init_loss": ce, "ln_vocab": ln_v, "deviation": abs(ce - ln_v) / ln_v, "entropy_ratio": ent / ln_v}


def training_health(log: list[dict[str, Any]]) -> dict[str, float]:
    """G3 and G4 inputs from the training log: first/last 10% loss, median grad norm and branch ratio."""
    n = len(log)
    k = max(1, int(round(gates.LAST_FRACTION * n)))
    first, last = log[:k], log[-k:]
    out = {
        "loss_first_10pct": float(np.mean([r["train_loss"] for r in first])),
        "loss_last_10pct": float(np.mean([r["train_loss"] for r in last])),
        "grad_norm_median_last_10pct": float(np.median([r["grad_norm"] for r in last])),
        "steps": n,
    }
    ratios = [r["grad_norm_rwkv"] / r["grad_norm_mamba"] for r in last
              if r.get("grad_norm_mamba", 0) > 0 and r.get("grad_norm_rwkv", 0) > 0]
    out["grad_ratio_median_last_10pct"] = float(np.median(ratios)) if ratios else math.nan
    return out


def effective_rank(mat: torch.Tensor) -> float:
    """Roy & Vetterli effective rank: exp of the entropy of the normalised singular values."""
    s = torch.linalg.svdvals(mat.double())
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def state_health(model: torch.nn.Module, tokens: np.ndarray, *, batch: int = 4, chunks: int = 8,
                 device: torch.device | str = "cpu") -> dict[str, Any]:
    """G3.5 on held-out text: run `chunks` windows of STATE_LAG tokens statefully and look at the states.

    - cosine: mean over layers of cos(state after chunk i, state after chunk i+1), i.e. t vs t+64;
    - effective rank of the stacked states (rows: batch x chunks samples) over min(rows, state dim);
    - saturation: share of branch activations (before fusion) with |x| > SATURATION_ABS.
    Models without recurrent state or branches report NaN for what does not apply.
    """
    lag = gates.STATE_LAG
    need = batch * chunks * lag + 1
    if len(tokens) < need:
        raise ValueError(f"state health needs {need} held-out tokens, the split has {len(tokens)}")
    x = torch.from_numpy(np.asarray(tokens[: batch * chunks * lag], dtype=np.int64)).view(batch, chunks * lag).to(device)
    model.eval()
    state = None
    per_layer: dict[tuple[int, str], list[torch.Tensor]] = {}
    sat_hits, sat_total = 0, 0
    for c in range(chunks):
        out = model(x[:, c * lag : (c + 1) * lag], state=state, return_states=True, return_activations=True)
        state = out.state
        for li, ls in enumerate(out.layer_states or []):
            for key in STATE_KEYS:
                if key in ls and ls[key] is not None:
                    per_layer.setdefault((li, key), []).append(ls[key].float().reshape(batch, -1).cpu())
        for acts in out.activations or []:
            for a in acts.values():
                sat_hits += int((a.float().abs() > gates.SATURATION_ABS).sum())
                sat_total += a.numel()
    cosines, ranks = [], []
    for (li, key), seq in per_layer.items():
        st = torch.stack(seq, 1)  # (B, chunks, D)
        cos = F.cosine_similarity(st[:, :-1], st[:, 1:], dim=-1)
        cosines.append(float(cos.mean()))
        flat = st.reshape(-1, st.shape[-1])
        ranks.append(effective_rank(flat) / min(flat.shape))
    return {
        "state_cosine": float(np.mean(cosines)) if cosines else math.nan,
        "effective_rank_ratio": float(np.mean(ranks)) if ranks else math.nan,
        "saturation": sat_hits / sat_total if sat_total else math.nan,
        "layers_measured": len(per_layer),
    }
