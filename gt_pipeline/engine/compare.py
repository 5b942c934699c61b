"""Compare trained variants over seeds: config matching, per-variant CIs, paired differences (no Dagster).

`fusion_comparison_report` (gt_pipeline/assets/sweep.py) feeds it one `Run` per published sweep run.

Config matching: only runs trained on the same data (token_shards fingerprint) with the same recipe are
compared. The recipe is every TrainConfig field except those that name the run (model, seed) or only
choose how the same computation executes (device, compile, and in model_overrides the kernel choices
IMPLEMENTATION_OVERRIDES) or when it is observed (eval_every, eval_batches, checkpoint_every). Every other
model override (mamba_residual, rwkv_drop_prob, a width or depth) changes the model and is part of the
recipe, as are the world size (the global batch) and the evaluation the run was scored with (the
sweep's eval_windows and version), which the sweep adds to `Run.config`. The
reference group is the largest set of runs sharing one key (ties: the one holding GF-MH, then the
first); every other run is excluded and named with the fields in which it differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gt_pipeline.engine import stats

NOT_RECIPE = frozenset({"model", "seed", "device", "compile", "eval_every", "eval_batches", "checkpoint_every"})
# model_overrides that pick how the same math runs (kernels, backends), not what is computed
IMPLEMENTATION_OVERRIDES = frozenset({"mamba_backend", "mamba_conv", "wkv6_impl", "mamba_chunk_size"})
REFERENCES = ("GF-MH", "GPT")  # paired differences are reported against these


@dataclass
class Run:
    """One trained (variant, seed): `config` the resolved TrainConfig dict, `data` the token_shards
    fingerprint, `val_loss` the held-out loss every run is compared on, `curve` [(step, val_loss)]."""

    name: str  # where it lives, e.g. "sweep_run/3f2a..."
    model: str
    seed: int
    config: dict[str, Any]
    data: str
    val_loss: float
    n_params: int
    tokens_per_s: float
    tokens_per_s_field: str = "tokens_per_s"
    curve: list[tuple[int, float]] = field(default_factory=list)
    created: float = 0.0
    ablation: dict[str, float] = field(default_factory=dict)  # e.g. {"zero_mamba": loss increase}, hybrids only

    def key(self) -> dict[str, Any]:
        key = {"data": self.data, **{k: v for k, v in sorted(self.config.items()) if k not in NOT_RECIPE}}
        overrides = {k: v for k, v in sorted((key.pop("model_overrides", None) or {}).items())
                     if k not in IMPLEMENTATION_OVERRIDES}
        key.update({f"model_overrides.{k}": v for k, v in overrides.items()})
        return key


def _key_str(key: dict[str, Any]) -> str:
    return repr(sorted(key.items()))


def match_runs(runs: list[Run]) -> tuple[list[Run], list[dict[str, Any]], dict[str, Any]]:
    """(matched, excluded, reference key). Excluded rows: {"run", "model", "seed", "reason"}; a run that
    matches but repeats a (model, seed) of a newer matched run is excluded as superseded."""
    if not runs:
        return [], [], {}
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(_key_str(r.key()), []).append(r)
    best = max(groups.values(), key=lambda g: (len(g), any(r.model == "GF-MH" for r in g)))
    ref = best[0].key()
    matched, excluded = [], []
    for r in runs:
        k = r.key()
        if _key_str(k) != _key_str(ref):
            diff = [f"{f}={k.get(f)!r} (compared runs: {ref.get(f)!r})" for f in sorted(set(k) | set(ref))
                    if k.get(f) != ref.get(f)]
            excluded.append({"run": r.name, "model": r.model, "seed": r.seed, "reason": "config differs: " + "; ".join(diff)})
            continue
        matched.append(r)
    newest: dict[tuple[str, int], Run] = {}
    for r in matched:
        old = newest.get((r.model, r.seed))
        if old is None or r.created > old.created:
            newest[(r.model, r.seed)] = r
    kept = [r for r in matched if newest[(r.model, r.seed)] is r]
    for r in matched:
        if newest[(r.model, r.seed)] is not r:
            excluded.append({"run": r.name, "model": r.model, "seed": r.seed,
                             "reason": f"superseded by the newer run {newest[(r.model, r.seed)].name} of the same seed"})
    return sorted(kept, key=lambda r: (r.model, r.seed)), excluded, ref


def compare(runs: list[Run], level: float = stats.DEFAULT_LEVEL) -> dict[str, Any]:
    """Per model: seeds, mean and t CI over seeds of val loss, perplexity at the mean and CI ends, parameters,
    mean tokens/s; paired (by seed) differences of val loss against each reference model present; for
    hybrids, each branch ablation's loss increase, mean and t CI over seeds.
    Everything below comes from the matched runs only (call match_runs first)."""
    by_model: dict[str, dict[int, Run]] = {}
    for r in runs:
        by_model.setdefault(r.model, {})[r.seed] = r
    rows = []
    for model, seeds in sorted(by_model.items(), key=lambda kv: float(np.mean([r.val_loss for r in kv[1].values()]))):
        ci = stats.t_ci([r.val_loss for r in seeds.values()], level=level)
        one = next(iter(seeds.values()))
        rows.append({"model": model, "seeds": len(seeds), "val_loss": ci.mean, "val_loss_lo": ci.lo,
                     "val_loss_hi": ci.hi, "ppl": math.exp(ci.mean), "ppl_lo": math.exp(ci.lo) if math.isfinite(ci.lo) else math.nan,
                     "ppl_hi": math.exp(ci.hi) if math.isfinite(ci.hi) else math.nan, "params": one.n_params,
                     one.tokens_per_s_field: float(np.mean([r.tokens_per_s for r in seeds.values()]))})
    diffs = []
    for ref in REFERENCES:
        if ref not in by_model:
            continue
        base = {s: r.val_loss for s, r in by_model[ref].items()}
        for model, seeds in sorted(by_model.items()):
            if model == ref:
                continue
            vals = {s: r.val_loss for s, r in seeds.items()}
            if not set(vals) & set(base):
                diffs.append({"model": model, "vs": ref, "seeds_paired": 0, "diff": math.nan, "diff_lo": math.nan,
                              "diff_hi": math.nan, "verdict": "no common seed"})
                continue
            d = stats.paired_diff(vals, base, level=level)
            diffs.append({"model": model, "vs": ref, "seeds_paired": d.n, "diff": d.mean, "diff_lo": d.lo,
                          "diff_hi": d.hi, "verdict": stats.verdict_of_difference(d)})
    ablation = []
    for model, seeds in sorted(by_model.items()):
        keys = sorted(set().union(*(r.ablation for r in seeds.values())))
        for k in keys:
            vals = [r.ablation[k] for r in seeds.values() if k in r.ablation]
            ci = stats.t_ci(vals, level=level)
            kind, branch = k.split("_", 1)
            ablation.append({"model": model, "ablation": kind, "branch": branch, "seeds": ci.n, "delta_loss": ci.mean,
                             "delta_lo": ci.lo, "delta_hi": ci.hi,
                             "verdict": stats.verdict_of_difference(ci).replace("lower", "loss lower without it")
                             .replace("higher", "loss higher without it")})
    return {"variants": rows, "differences": diffs, "ablation": ablation, "level": level}


def chart_png(result: dict[str, Any], runs: list[Run]) -> bytes:
    """Bar chart of mean val loss per model with its CI as error bars, beside every run's val-loss curve (its
    axes span the second half of training, where the models separate; the legend, outside the axes, follows the
    bars' order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["variants"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(11.0, 5.0 + 0.6 * len(rows)), 4.5), dpi=80,
                                   gridspec_kw={"width_ratios": [1.2, 1]})
    means = [r["val_loss"] for r in rows]
    err = [[r["val_loss"] - r["val_loss_lo"] if math.isfinite(r["val_loss_lo"]) else 0 for r in rows],
           [r["val_loss_hi"] - r["val_loss"] if math.isfinite(r["val_loss_hi"]) else 0 for r in rows]]
    ax1.bar([r["model"] for r in rows], means, yerr=err, capsize=4, color="tab:blue", alpha=0.8)
    lo = min(r["val_loss_lo"] if math.isfinite(r["val_loss_lo"]) else r["val_loss"] for r in rows) if rows else 0
    hi = max(r["val_loss_hi"] if math.isfinite(r["val_loss_hi"]) else r["val_loss"] for r in rows) if rows else 1
    pad = max(0.05, 0.2 * (hi - lo))
    ax1.set_ylim(lo - pad, hi + pad)
    ax1.set_ylabel(f"val loss (mean over seeds, {result['level']:.0%} CI)")
    plt.setp(ax1.get_xticklabels(), rotation=60, ha="right", rotation_mode="anchor")
    cmap = plt.cm.tab10 if len(rows) <= 10 else plt.cm.tab20
    colors = {m: cmap(i % cmap.N) for i, m in enumerate(r["model"] for r in rows)}
    curves = [r for r in runs if r.curve]
    for r in curves:
        ax2.plot(*zip(*r.curve), lw=1, color=colors.get(r.model, "k"), alpha=0.8,
                 label=r.model if r.seed == min(x.seed for x in runs if x.model == r.model) else None)
    ax2.set_xlabel("step")
    ax2.set_ylabel("val loss")
    if curves:
        last = max(step for r in curves for step, _ in r.curve)
        late = [v for r in curves for step, v in r.curve if step >= last / 2 and math.isfinite(v)]
        if late and len({step for r in curves for step, _ in r.curve}) >= 4:
            span = max(late) - min(late)
            ax2.set_xlim(last / 2 - 0.02 * last, last + 0.02 * last)
            ax2.set_ylim(min(late) - 0.1 * span - 1e-3, max(late) + 0.1 * span + 1e-3)
            ax2.set_ylabel("val loss (second half of training)")
        order = {m: i for i, m in enumerate(colors)}                       # the legend in the bar chart's order
        handles, labels = ax2.get_legend_handles_labels()
        pairs = sorted(zip(handles, labels), key=lambda hl: order.get(hl[1], len(order)))
        ax2.legend([h for h, _ in pairs], [lab for _, lab in pairs], fontsize=7, loc="upper left",
                   bbox_to_anchor=(1.01, 1.0), ncol=1 if len(rows) <= 12 else 2, frameon=False)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
