"""What a trained_* artifact directory holds, written the same way in-process and by the torchrun worker.

No Dagster here: `gt_pipeline.assets.training` (one process) and `gt_pipeline.engine.worker` (rank 0 of a
torchrun job) both call `write_training_artifact`, so a model trained on N GPUs is published in exactly
the layout of a one-GPU one.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from pathlib import Path
from typing import Any

from gt_pipeline.engine import metrics
from gt_pipeline.engine.checkpoint import save_model
from gt_pipeline.engine.train import TrainConfig
from gt_pipeline.store import write_json_atomic


def write_training_artifact(d: Path, cfg: TrainConfig, res, shards_dir: Path,
                            paths: dict[str, str] | None = None) -> dict[str, Any]:
    """Everything a trained_* directory holds; returns the metadata the store keeps in the manifest."""
    global_batch = cfg.batch_size * cfg.grad_accum * res.world_size  # sequences per optimizer step
    save_model(res.model, d / "model.safetensors")
    model_cfg = getattr(res.model, "config", None)
    write_json_atomic(d / "config.json", {
        "train": dataclasses.asdict(cfg),
        "model": dataclasses.asdict(model_cfg) if dataclasses.is_dataclass(model_cfg) else {},
        "distributed": {"world_size": res.world_size, "global_batch_size": global_batch},
    })
    cols = list(dict.fromkeys(k for r in res.log for k in r))  # rows resumed from a checkpoint may lack new columns
    with open(d / "train_log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(res.log)
    (d / "loss_curve.png").write_bytes(loss_curve_png(res.log))
    vals = [r["val_loss"] for r in res.log if not math.isnan(r["val_loss"])]
    final_val = vals[-1] if vals else math.nan
    health = metrics.training_health(res.log)
    out = {
        "model": cfg.model, "size": cfg.size, "vocab_size": cfg.vocab_size, "steps": len(res.log),
        "final_train_loss": res.log[-1]["train_loss"], "final_val_loss": final_val,
        "val_perplexity": math.exp(final_val) if math.isfinite(final_val) else math.nan,
        "tokens_per_s": round(res.tokens_per_s, 1), "peak_memory_mb": round(res.peak_memory_mb, 1),
        **({"steady_tokens_per_s": round(res.steady_tokens_per_s, 1), "warmup_steps": res.warmup_steps}
           if math.isfinite(res.steady_tokens_per_s) else {}),
        "paths": {**(paths or {}), "compile": res.compile},
        "n_params": res.n_params, "device": res.device, "resumed_from_step": res.resumed_from_step,
        "train_seconds": round(res.seconds, 2), "init_entropy_ratio": res.init_entropy_ratio,
        "world_size": res.world_size, "global_batch_size": global_batch,
        **health,
    }
    write_json_atomic(d / "train_metrics.json", out)
    return out


def loss_curve_png(log: list[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=80)
    ax.plot([r["step"] for r in log], [r["train_loss"] for r in log], lw=1, label="train")
    val = [(r["step"], r["val_loss"]) for r in log if not math.isnan(r["val_loss"])]
    if val:
        ax.plot(*zip(*val), "o-", ms=3, label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
