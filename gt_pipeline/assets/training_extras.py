"""What every `trained_*` materialization adds around the training itself: the experiment-tracking run
(MLflow, `gt_pipeline.engine.tracking`) and the samples shown in its markdown metadata
(`gt_pipeline.engine.generate`). The training asset calls these; they hold no training logic.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import dagster as dg
import torch

import data
from gt_pipeline.engine import generate as gen
from gt_pipeline.engine.tracking import RunTracker, gate_means, tracking_uri
from gt_pipeline.store import Artifact, ArtifactStore

SAMPLE_PROMPTS = 3
SAMPLE_PROMPT_TOKENS = 12
SAMPLE_NEW_TOKENS = 32
SAMPLE_TOP_K = 20
SAMPLE_SEED = 0


class TrainingTracking:
    """One MLflow run for one training build. `on_log` / `on_step_end` feed it while training runs
    in-process; `built` logs every step of the finished log (train_log.csv, also written by the
    torchrun worker), `finish` records the published checkpoint path; `failed` closes a broken run."""

    def __init__(self, context: dg.AssetExecutionContext, store_root: Path, experiment: str, run_name: str,
                 params: dict[str, Any], tags: dict[str, str], probe: torch.Tensor, eval_every: int, steps: int):
        uri = tracking_uri(store_root)
        self.context, self.probe, self.eval_every, self.steps = context, probe, eval_every, steps
        self.run = RunTracker.start(uri, experiment, run_name, params=params, tags=tags)
        context.log.info(f"tracking: MLflow experiment {experiment!r}, run {run_name!r} at {self.run.url}")

    def on_log(self, row: dict[str, Any]) -> None:
        self.run.log_row(row)

    def on_step_end(self, step: int, model: torch.nn.Module) -> None:
        """Gate means on the fixed probe batch at the evaluation steps (in-process training only)."""
        if step % self.eval_every == 0 or step == self.steps:
            g = gate_means(model, self.probe.to(next(model.parameters()).device))
            if g:
                self.run.log_metrics(g, step)

    def built(self, artifact_dir: Path) -> None:
        with open(artifact_dir / "train_log.csv", newline="") as f:
            self.run.log_rows(list(csv.DictReader(f)))

    def finish(self, checkpoint: Path) -> None:
        self.run.finish(checkpoint=checkpoint)

    def failed(self) -> None:
        self.run.finish(failed=True)


def probe_batch(shards: Artifact, seq_len: int, n: int = 4) -> torch.Tensor:
    """(n, L) int64 validation tokens from the start of the split, L = seq_len (the whole split when shorter: a
    seq_len the shards cannot hold is the engine's error to report, not the probe's): the gate-mean probe."""
    val = data.TokenShards(shards.path, verify=False).split("validation")
    length = min(seq_len, len(val))
    n = max(1, min(n, len(val) // length))
    return torch.from_numpy(val[: n * length].astype("int64")).view(n, length)


def sample_device(trained_on: str) -> str:
    """Where the samples are generated: "cuda" for a model trained on a GPU (`trained_on`: a device type, or
    the training metadata's "device", which names the GPU) when this process has one, else "cpu". One-token
    steps of a small model take milliseconds on the GPU; on the CPU they contend with every other process on
    the machine (on the H200, 8 sweep trainings at once spent 566 s each on CPU samples, 3 min training)."""
    return "cuda" if trained_on != "cpu" and torch.cuda.is_available() else "cpu"


def samples_markdown(store: ArtifactStore, trained: Artifact, shards: Artifact, device: str = "cpu") -> str:
    """A few continuations of held-out prompts by the trained model on `device` (fixed seed, top-k; the
    sampler's generator is on the CPU, so the draws do not depend on the device)."""
    tok_fp = shards.inputs.get("bpe_tokenizer")
    tok_art = store.get("bpe_tokenizer", tok_fp) if tok_fp else None
    if tok_art is None:
        return f"**Samples**: the bpe_tokenizer {tok_fp} of these token_shards is not in the store; none generated."
    tok = data.load_tokenizer(tok_art.file("tokenizer.json"))
    model, _ = gen.load_checkpoint(trained.path, device)
    prompts = gen.held_out_prompts(shards.path, tok, SAMPLE_PROMPTS, SAMPLE_PROMPT_TOKENS)
    rows = gen.samples(model, tok, prompts, SAMPLE_NEW_TOKENS, top_k=SAMPLE_TOP_K, seed=SAMPLE_SEED)
    return gen.samples_markdown(rows, top_k=SAMPLE_TOP_K, temperature=1.0, seed=SAMPLE_SEED, stateful=True)
