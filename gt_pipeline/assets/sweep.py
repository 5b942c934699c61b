"""The research sweep: every variant x several seeds with one recipe, and the comparison over seeds.

`sweep_run` is partitioned by variant x seed (a MultiPartitionsDefinition; keys are `<seed>|<variant>`, e.g. `0|gf_mh`), so the
whole grid, or any subset, is launched as a backfill, from the UI (Materialize -> select partitions) or
by one command (README "Research sweep"). Each partition trains with the same `TrainingConfig` (the seed
comes from the partition) through the training assets' own body (`train_variant`), then measures its
validation loss on one fixed set of windows spread over the whole split (the same windows for every
run, so runs compare window for window) with a CI over windows.

Several trainings share one GPU: every partition is its own run (one process), and the `sweep_gpu` pool
caps how many run at once: `dagster instance concurrency set sweep_gpu K` on a persistent instance
(`$DAGSTER_HOME`); README gives the K measured best.

`fusion_comparison_report` reads every published sweep run from the store, keeps the config-matched
ones (gt_pipeline/engine/compare.py; the others are named with the reason) and reports per variant
mean and 95% CI over seeds, paired differences against GF-MH and GPT, parameters, throughput, a bar
chart with error bars and the runs' validation curves.
"""


import csv
import json
import math
import time
from pathlib import Path
from typing import Any

import dagster as dg
import torch
from pydantic import Field

import data
import models
from gt_pipeline.assets.common import OWNER, artifact_output, md_table
from gt_pipeline.assets.training import VARIANTS, TrainingConfig, load_trained, train_variant
from gt_pipeline.engine import compare, evaluate, stats
from gt_pipeline.engine.train import TrainConfig
from gt_pipeline.resources import ProfileResource, StoreResource
from gt_pipeline.store import Artifact, ArtifactStore, fingerprint, write_json_atomic
from gt_pipeline.versions import code_version

GROUP = "sweep"
SWEEP_ASSET = "sweep_run"
SWEEP_VERSION = code_version("sweep")  # the sweep module, evaluation, comparison, training
SEEDS = tuple(str(s) for s in range(5))  # the partitions offered; a backfill picks the seeds it runs
POOL = "sweep_gpu"
EVAL_SEED = 0

sweep_partitions = dg.MultiPartitionsDefinition({
    "variant": dg.StaticPartitionsDefinition(list(VARIANTS)),
    "seed": dg.StaticPartitionsDefinition(list(SEEDS)),
})


class SweepConfig(TrainingConfig):
    """TrainingConfig (one recipe for every partition; `seed` is ignored: the partition sets it) plus the
    held-out evaluation every run is compared on."""

    eval_windows: int = Field(default=64, description="Validation windows (of seq_len tokens, spread over the whole "
                              "split, the same for every run) for the compared loss and its CI")


def held_out_eval(d: Path, cfg: TrainConfig, shards: Path, n_windows: int) -> dict[str, Any]:
    """Loss of the model published in `d` on `n_windows` fixed spread windows of cfg.seq_len tokens (CI
    over windows); for a hybrid also the loss increase with each branch zero- and mean-ablated in all layers, paired by
    window (branch means from the test split)."""
    sh = data.TokenShards(shards, verify=False)
    val = sh.split("validation")
    n = min(n_windows, len(val) // (cfg.seq_len + 1))
    x, y = evaluate.spread_windows(val, n, cfg.seq_len, seed=EVAL_SEED)
    model, _ = load_trained(Artifact(SWEEP_ASSET, "building", d), str(cfg.resolved_device()))
    batch = min(cfg.batch_size, 16)
    base = evaluate.window_losses(model, x, y, batch=batch)
    ci = stats.mean_ci(base, seed=EVAL_SEED)
    out: dict[str, Any] = {"seed": cfg.seed, "eval_val_loss": ci.mean, "eval_val_loss_lo": ci.lo,
                           "eval_val_loss_hi": ci.hi, "eval_windows": ci.n, "eval_tokens": ci.n * cfg.seq_len}
    if all(("rwkv" in b.branches and "mamba" in b.branches) for b in model.blocks):
        test = evaluate.held_out_split(sh)
        held, _ = evaluate.spread_windows(test, min(n, len(test) // (cfg.seq_len + 1)), cfg.seq_len, seed=EVAL_SEED)
        means = evaluate.branch_means(model, held, batch=batch)
        for branch in ("rwkv", "mamba"):
            for kind in ("zero", "mean"):
                cm = (models.ablate(model, branch) if kind == "zero"
                      else models.mean_ablate(model, branch, means[branch]))
                with cm:
                    dci = stats.paired_mean_diff(evaluate.window_losses(model, x, y, batch=batch), base,
                                                      seed=EVAL_SEED)
                out[f"ablate_{kind}_{branch}"] = dci.mean
                out[f"ablate_{kind}_{branch}_lo"], out[f"ablate_{kind}_{branch}_hi"] = dci.lo, dci.hi
    return out


@dg.asset(
    name=SWEEP_ASSET,
    group_name=GROUP,
    partitions_def=sweep_partitions,
    kinds={"pytorch"},
    owners=[OWNER],
    tags={"stage": "sweep"},
    code_version=SWEEP_VERSION,
    pool=POOL,
)
def sweep_run(context: dg.AssetExecutionContext, config: SweepConfig, profile: ProfileResource, store: StoreResource,
              token_shards: Artifact, wkv6_kernel: Artifact) -> dg.Output[Artifact]:
    """One (variant, seed) of the sweep: trained with the sweep's recipe, then evaluated on the fixed
    held-out windows every sweep run shares."""
    key = context.partition_key.keys_by_dimension
    variant, seed = key["variant"], int(key["seed"])
    if variant not in VARIANTS:
        raise ValueError(f"sweep_run partition variant {variant!r} is not one of {list(VARIANTS)}")
    if config.eval_windows < 2:
        raise ValueError(f"SweepConfig.eval_windows must be >= 2 for a CI, got {config.eval_windows}")
    train_cfg = TrainingConfig(**config.model_dump(exclude={"eval_windows"}))
    return train_variant(
        context, SWEEP_ASSET, variant, train_cfg, profile, store, token_shards, wkv6_kernel, seed=seed,
        key_extra={"sweep_version": SWEEP_VERSION, "eval_windows": config.eval_windows},
        after=lambda d, cfg: held_out_eval(d, cfg, token_shards.path, config.eval_windows),
    )


# ------------------------------------------------------------------------------------------ report
def published_runs(store: ArtifactStore) -> list[Artifact]:
    """Every verified sweep_run artifact in the store (corrupt or half-written directories are skipped)."""
    root = store.asset_dir(SWEEP_ASSET)
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        if d.is_dir() and not d.name.startswith(".") and not d.name.endswith(".work"):
            art = store.get(SWEEP_ASSET, d.name)
            if art is not None:
                out.append(art)
    return out


def to_run(art: Artifact) -> compare.Run:
    m = art.metadata
    tps_field = "steady_tokens_per_s" if "steady_tokens_per_s" in m else "tokens_per_s"
    curve = []
    with open(art.file("train_log.csv")) as f:
        for row in csv.DictReader(f):
            v = float(row["val_loss"]) if row.get("val_loss") not in (None, "", "nan") else math.nan
            if math.isfinite(v):
                curve.append((int(row["step"]), v))
    return compare.Run(
        name=f"{SWEEP_ASSET}/{art.fingerprint}", model=m["model"], seed=int(art.inputs["config"]["seed"]),
        # the recipe as trained and scored: the TrainConfig, the world size (global batch) and the sweep's key extras
        config={**art.inputs["config"], "world_size": int(art.inputs.get("world_size", 1)),
                **art.inputs.get("key_extra", {})},
        data=art.inputs["token_shards"], val_loss=float(m["eval_val_loss"]),
        n_params=int(m["n_params"]), tokens_per_s=float(m[tps_field]), tokens_per_s_field=tps_field, curve=curve,
        created=art.path.stat().st_mtime,  # when the store renamed it into place
        ablation={k.removeprefix("ablate_"): float(v) for k, v in m.items()
                  if k.startswith("ablate_") and not k.endswith(("_lo", "_hi"))},
    )


def comparison_markdown(result: dict[str, Any], excluded: list[dict[str, Any]], ref: dict[str, Any], png: bytes) -> str:
    import base64

    lvl = f"{result['level']:.0%}"
    lines = [f"Config-matched runs only (same data fingerprint and recipe); {lvl} CIs: Student t over seeds "
             "for each variant, paired by seed for the differences. A difference whose CI contains 0 is "
             "**inside the noise**: the sweep cannot tell those two apart.", ""]
    unknown = [d for d in result["differences"] if d["verdict"] == "no common seed"]
    noise = [d for d in result["differences"]
             if not d["verdict"].startswith(("lower", "higher")) and d["verdict"] != "no common seed"]
    for d in result["differences"]:
        if d["verdict"].startswith(("lower", "higher")):
            lines.append(f"- {d['model']} vs {d['vs']}: {d['diff']:+.4f} nats [{d['diff_lo']:+.4f}, {d['diff_hi']:+.4f}]"
                         f" - {d['verdict'].split(' (')[0]} than {d['vs']}, outside the noise.")
    if noise:
        lines.append("- Inside the noise (or unknown with one seed): "
                     + ", ".join(f"{d['model']} vs {d['vs']}" for d in noise) + ".")
    if unknown:
        lines.append("- Not compared (no seed trained by both): "
                     + ", ".join(f"{d['model']} vs {d['vs']}" for d in unknown) + ".")
    lines += ["", f"![comparison](data:image/png;base64,{base64.b64encode(png).decode()})", "",
              "**Per variant**", "", md_table(result["variants"]), "",
              "(steady_tokens_per_s: each run's steady training rate while the sweep's other runs shared the "
              "device, a cost of this sweep rather than the model's own speed; `engine.bench` measures that.)", "",
              "**Paired differences of val loss** (model - reference)",
              "", md_table(result["differences"]) or "(no reference model among the runs)", ""]
    if result["ablation"]:
        lines += ["**Branch ablation per hybrid** (val loss increase when a branch's output is replaced by 0 or by its "
                  f"held-out mean in all layers; mean and {lvl} t-CI over seeds; a CI containing 0 = that branch's "
                  "removal is inside the noise)", "", md_table(result["ablation"]), ""]
    recipe = {k: v for k, v in ref.items() if k in ("data", "size", "steps", "vocab_size", "batch_size", "seq_len", "lr")}
    lines += ["**Recipe of the compared runs**: " + ", ".join(f"{k}={v}" for k, v in recipe.items()), ""]
    if excluded:
        lines += ["**Excluded runs**", "", md_table(excluded)]
    else:
        lines += ["No run was excluded."]
    return "\n".join(lines)


@dg.asset(group_name="reports", kinds={"pandas"}, owners=[OWNER], tags={"stage": "reports"}, code_version=SWEEP_VERSION,
          deps=[SWEEP_ASSET])
def fusion_comparison_report(context: dg.AssetExecutionContext, profile: ProfileResource,
                             store: StoreResource) -> dg.Output[Artifact]:
    """Every variant over seeds from the sweep: mean and 95% CI of validation loss and perplexity, paired
    differences against GF-MH and GPT, parameters, throughput; config-mismatched runs excluded and named."""
    st = store.get()
    arts = published_runs(st)
    if not arts:
        raise ValueError("no published sweep_run in the store: launch the sweep first (README, 'Research sweep')")
    runs = [to_run(a) for a in arts]
    matched, excluded, ref = compare.match_runs(runs)
    for e in excluded:
        context.log.warning(f"excluded {e['run']} ({e['model']} seed {e['seed']}): {e['reason']}")
    fp = fingerprint("fusion_comparison_report", SWEEP_VERSION, {}, {a.fingerprint: a.fingerprint for a in arts})

    def build(d: Path) -> dict[str, Any]:
        result = compare.compare(matched)
        png = compare.chart_png(result, matched)
        (d / "comparison.png").write_bytes(png)
        for name, rows in (("variants", result["variants"]), ("differences", result["differences"]),
                           ("ablation", result["ablation"]), ("excluded", excluded)):
            if rows:
                with open(d / f"{name}.csv", "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
                    w.writeheader()
                    w.writerows(rows)
        write_json_atomic(d / "report.json", {"result": result, "excluded": excluded, "recipe": ref,
                                              "runs": [r.name for r in matched],
                                              "computed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                              "torch": torch.__version__})
        (d / "report.md").write_text(comparison_markdown(result, excluded, ref, png))
        return {"runs_compared": len(matched), "runs_excluded": len(excluded), "variants": len(result["variants"]),
                "excluded": [e["run"] for e in excluded]}

    result = st.build("fusion_comparison_report", fp, build, inputs={"runs": sorted(a.fingerprint for a in arts)},
                      on_event=context.log.warning)
    m = result.artifact.metadata
    return artifact_output(context, result, profile=profile.name, headline={"runs_compared": m["runs_compared"],
                                                      "runs_excluded": m["runs_excluded"],
                                                      "excluded_runs": json.dumps(m["excluded"])},
                           preview_md=result.artifact.file("report.md").read_text())


sweep_job = dg.define_asset_job(
    "sweep", selection=dg.AssetSelection.assets(SWEEP_ASSET),
    description="Train every variant x seed of the sweep (one run per partition; the sweep_gpu pool caps how "
                "many train at once). Its upstream data and kernel come from the store.",
)
