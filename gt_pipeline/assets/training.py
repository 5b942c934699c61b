"""Training assets: one `trained_<variant>` per registered model, all from one factory.

Each asset trains on `token_shards` with the `wkv6_kernel` built for this machine, publishes
`model.safetensors`, `config.json`, `train_log.csv` and `train_metrics.json` through the store, and
resumes from its work directory's last checkpoint when a run with the same fingerprint was
interrupted. The gate checks live in `gt_pipeline.checks`.

With `nproc_per_node` x `nnodes` > 1 the asset trains data-parallel: it launches torchrun through
dagster-pipes (`PipesSubprocessClient`), rank 0 streams the progress lines and the final metadata back
into the run and writes the same files into the store's build directory (`gt_pipeline.engine.worker`).
"""

import base64
import dataclasses
import json
import os
import platform
import shlex
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import dagster as dg
import torch
from pydantic import Field

import data
from gt_pipeline.assets.common import OWNER, artifact_output, md_table
from gt_pipeline.assets.training_extras import TrainingTracking, probe_batch, sample_device, samples_markdown
from gt_pipeline.engine.artifact import write_training_artifact
from gt_pipeline.engine.train import (TrainConfig, eval_windows, format_log_row, optional_packages, path_fallbacks,
                                      run_paths, train, without_default_objectives)
from gt_pipeline.engine.worker import read_errors, torchrun_command
from gt_pipeline.resources import ProfileResource, StoreResource
from gt_pipeline.store import Artifact, fingerprint
from gt_pipeline.versions import code_version

GROUP = "training"
TRAIN_VERSION = code_version("trained")  # models/, the wkv6 wrapper, shard reading, the training engine

# asset suffix -> registry name. Hybrids first (the seven fusions, then the gate variants and arbiters of
# issue 17); the last three are single-mixer baselines.
VARIANTS: dict[str, str] = {
    "gf_mh": "GF-MH", "gf": "GF", "gf_rh": "GF-RH", "hy": "HY", "ws": "WS", "rf": "RF", "cp": "CP",
    "gf_xm": "GF-XM", "gf_xr": "GF-XR", "hgf": "HGF", "hgf_mh": "HGF-MH", "hgf_rh": "HGF-RH",
    "gru": "GRU", "mingru": "MINGRU", "linrec": "LINREC",
    "gpt": "GPT", "rwkv6": "RWKV6", "mamba2": "MAMBA2",
}
HYBRIDS = frozenset(["gf_mh", "gf", "gf_rh", "hy", "ws", "rf", "cp", "gf_xm", "gf_xr", "hgf", "hgf_mh", "hgf_rh",
                     "gru", "mingru", "linrec"])


class TrainingConfig(dg.Config):
    """Fields left unset take the profile's value (GT_PROFILE); see gt_pipeline/profiles.py."""

    size: str | None = Field(default=None, description="Model size preset (profile: 5m full, demo demo); see models.list_sizes()")
    steps: int | None = Field(default=None, description="Optimizer steps")
    batch_size: int | None = Field(default=None, description="Sequences per micro-batch PER RANK (global batch = "
                                   "batch_size x grad_accum x nproc_per_node x nnodes; lr is not rescaled)")
    seq_len: int | None = Field(default=None, description="Tokens per sequence (must fit the shards)")
    grad_accum: int = Field(default=1, description="Micro-batches per optimizer step")
    lr: float | None = Field(default=None, description="Peak learning rate (AdamW)")
    min_lr: float | None = Field(default=None, description="Learning rate at the end of the cosine decay")
    warmup_frac: float | None = Field(default=None, description="Fraction of steps of linear warmup")
    weight_decay: float = Field(default=0.1, description="AdamW weight decay on >=2-D weights")
    grad_clip: float = Field(default=1.0, description="Clip the global grad norm to this")
    mamba_lr_mult: float = Field(default=0.5, description="LR multiplier of the Mamba-2 branch (seeds: 0.5)")
    eval_every: int | None = Field(default=None, description="Validate every N steps")
    eval_batches: int | None = Field(default=None, description="Validation batches per evaluation (fixed windows)")
    checkpoint_every: int | None = Field(default=None, description="Checkpoint every N steps (resume point)")
    seed: int = Field(default=0, description="Seed of init and data order")
    device: str = Field(default="auto", description="auto (CUDA if present), cuda or cpu")
    compile: bool | None = Field(default=None, description="torch.compile the model and its loss; unset = the device's "
                                 "default (on for CUDA, off for CPU)")
    compile_mode: str = Field(default="auto", description="torch.compile mode: auto (reduce-overhead, i.e. CUDA graphs, "
                              "on CUDA where allowed: the fastest measured step), default, reduce-overhead, "
                              "max-autotune, max-autotune-no-cudagraphs; a mode other than auto turns compile on")
    mamba_backend: str = Field(default="auto", description="Mamba-2 SSD path: auto (the fastest that applies: wkv6 on "
                               "CUDA, torch on CPU), torch, triton (mamba_ssm), or wkv6 (through our wkv6 kernel)")
    mamba_conv: str = Field(default="auto", description="Mamba-2 depthwise conv: auto (our Triton kernels under "
                            "compile, causal_conv1d's CUDA kernel in eager CUDA runs, where they apply), triton, or torch")
    wkv6_impl: str = Field(default="auto", description="wkv6 CUDA kernels: auto (chunked tensor-core kernels where "
                           "they apply: bf16, head size 64; sequential elsewhere), sequential, or chunked")
    mamba_residual: bool = Field(default=False, description="Hybrids: add the Mamba-2 output to the residual stream "
                                 "beside the fusion (x + fuse(a, m) + m)")
    rwkv_drop_prob: float = Field(default=0.0, description="Hybrids: probability per layer and step that the RWKV-6 "
                                  "output is replaced by zeros in training (eval unaffected)")
    lambda_div: float = Field(default=0.0, description="Twin-debate diversity weight, (1 + cos(a, m)) / 2; 0 = off "
                              "(gt_pipeline/engine/objectives.py)")
    lambda_arb: float = Field(default=0.0, description="Twin-debate weight of the arbiter CE towards the better branch; "
                              "0 = off; needs a per-token gate (GF*, HGF*, GRU, MINGRU, LINREC)")
    stateful: bool = Field(default=False, description="Train on batch_size parallel tracks of the stream with the "
                           "recurrent state carried across batches, reset at document starts (one process only)")
    force: bool = Field(default=False, description="Retrain even when a verified cached checkpoint exists")
    nproc_per_node: int = Field(default=1, description="Data-parallel ranks on this machine (one GPU each; gloo "
                                "processes on CPU); above 1 the asset launches torchrun")
    nnodes: int = Field(default=1, description="Machines in the torchrun job; this one is node 0 (holds rank 0)")
    rdzv_endpoint: str | None = Field(default=None, description="host:port of this node that the other nodes join "
                                      "(nnodes > 1); not part of the fingerprint")
    # experiment tracking (MLflow; MLFLOW_TRACKING_URI or $GT_HOME/mlflow.db); not part of the fingerprint
    track: bool = Field(default=True, description="Log params, per-step metrics and the checkpoint path to MLflow")
    experiment: str = Field(default="groundthink", description="MLflow experiment: runs of one sweep share it, "
                            "so their curves overlay")
    run_name: str | None = Field(default=None, description="MLflow run name (default: <asset>-<fingerprint>)")

    def world_size(self, cfg: TrainConfig) -> int:
        """Validate the launch fields (before any compute) and return the data-parallel world size."""
        for name in ("nproc_per_node", "nnodes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainingConfig.{name} must be a positive integer, got {v!r}")
        if self.nnodes > 1:
            host, _, port = (self.rdzv_endpoint or "").rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"TrainingConfig.rdzv_endpoint must be 'host:port' of this node (node 0, reachable "
                                 f"from the others) when nnodes={self.nnodes}, got {self.rdzv_endpoint!r}")
        dev = cfg.resolved_device()
        if dev.type == "cuda" and self.nproc_per_node > torch.cuda.device_count():
            raise ValueError(f"TrainingConfig.nproc_per_node={self.nproc_per_node} but this machine has "
                             f"{torch.cuda.device_count()} GPU(s): ask for at most that many (or device=cpu for gloo)")
        return self.nproc_per_node * self.nnodes

    def compile_setting(self) -> bool | str:
        """TrainConfig.compile from (compile, compile_mode): "auto" (the device default) when both are unset."""
        if self.compile is False:
            return False
        if self.compile_mode == "auto":
            return True if self.compile else "auto"
        return True if self.compile_mode == "default" else self.compile_mode

    def resolve(self, variant: str, profile_train, vocab_size: int) -> TrainConfig:
        pick = lambda v, d: d if v is None else v  # noqa: E731
        return TrainConfig(
            model=VARIANTS[variant], size=pick(self.size, profile_train.size), vocab_size=vocab_size,
            steps=pick(self.steps, profile_train.steps), batch_size=pick(self.batch_size, profile_train.batch_size),
            seq_len=pick(self.seq_len, profile_train.seq_len), grad_accum=self.grad_accum,
            lr=pick(self.lr, profile_train.lr), min_lr=pick(self.min_lr, profile_train.min_lr),
            warmup_frac=pick(self.warmup_frac, profile_train.warmup_frac), weight_decay=self.weight_decay,
            grad_clip=self.grad_clip, lr_mult={"mamba": self.mamba_lr_mult},
            eval_every=pick(self.eval_every, profile_train.eval_every),
            eval_batches=pick(self.eval_batches, profile_train.eval_batches),
            checkpoint_every=pick(self.checkpoint_every, profile_train.checkpoint_every),
            seed=self.seed, device=self.device,
            compile=self.compile_setting(),
            # only non-default choices enter the model config; what they resolve to on a device is `run_paths`
            model_overrides={k: v for k, v, off in (("mamba_backend", self.mamba_backend, "auto"),
                                                    ("mamba_conv", self.mamba_conv, "auto"),
                                                    ("wkv6_impl", self.wkv6_impl, "auto"),
                                                    ("mamba_residual", self.mamba_residual, False),
                                                    ("rwkv_drop_prob", self.rwkv_drop_prob, 0.0))
                             if v != off},
            lambda_div=self.lambda_div, lambda_arb=self.lambda_arb, stateful=self.stateful,
        )


def train_env(cfg: TrainConfig, paths: dict[str, str]) -> dict[str, Any]:
    """What else changes a trained model's bits: the torch build, the device kind, the kernels each layer runs and
    the compile mode (`run_paths`), and the optional CUDA packages' versions."""
    dev = cfg.resolved_device()
    return {"torch": torch.__version__, "device": dev.type,
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.machine(),
            "paths": paths, "packages": optional_packages() if dev.type == "cuda" else {}}


def training_fingerprint(name: str, resolved: dict[str, Any], upstream: dict[str, str], env: dict[str, Any],
                         world_size: int) -> str:
    """The world size changes the global batch, hence the bits: it enters the key (only when > 1, so
    one-process artifacts keep their fingerprints). How the ranks meet (rdzv_endpoint) does not."""
    config = resolved if world_size == 1 else {**resolved, "world_size": world_size}
    return fingerprint(name, TRAIN_VERSION, config, upstream, env=env)


def train_with_torchrun(context: dg.AssetExecutionContext, config: TrainingConfig, cfg: TrainConfig, shards: Path,
                        work: Path, out: Path, world: int) -> dict[str, Any]:
    """Run the engine on `world` ranks via torchrun + dagster-pipes; rank 0 writes the artifact into `out`
    and sends its metadata back. A failing rank fails the materialization with its own message."""
    resolved = dataclasses.asdict(cfg)
    launch = dict(nproc_per_node=config.nproc_per_node, nnodes=config.nnodes, rdzv_endpoint=config.rdzv_endpoint)
    for k in range(1, config.nnodes):
        other = torchrun_command(resolved, shards, work, node_rank=k, **launch)
        context.log.info(f"node {k} of {config.nnodes} must join with (same paths on a shared filesystem):\n"
                         f"{shlex.join(other)}")
    repo_root = str(Path(__file__).resolve().parents[2])  # so `-m gt_pipeline.engine.worker` imports in every rank
    env = {"NCCL_NVLS_ENABLE": "0",  # these GPU hosts require NVLink multicast off
           "PYTHONPATH": os.pathsep.join(p for p in (repo_root, os.environ.get("PYTHONPATH")) if p)}
    with tempfile.TemporaryDirectory(prefix="gt_torchrun_errors_") as err_dir:
        cmd = torchrun_command(resolved, shards, work, out=out, error_dir=Path(err_dir), node_rank=0, **launch)
        context.log.info(f"launching {world} data-parallel ranks: {shlex.join(cmd[:cmd.index('--config')])} ...")
        try:
            inv = dg.PipesSubprocessClient(env=env).run(command=cmd, context=context)
        except Exception as exc:  # Pipes only says "failed with code 1": name the worker's own error
            errors = read_errors(Path(err_dir))
            if not errors:
                raise
            raise RuntimeError(f"data-parallel training on {world} ranks failed:\n{errors}\n"
                               "(torchrun's full report is in the run's stderr)") from exc
    sent = [m["metadata"] for m in inv.get_custom_messages() if isinstance(m, dict) and "metadata" in m]
    if not sent:
        raise RuntimeError("torchrun exited cleanly but rank 0 sent no metadata over dagster-pipes; "
                           "check that the worker ran as `-m gt_pipeline.engine.worker`")
    return sent[-1]


def build_trained_asset(variant: str) -> dg.AssetsDefinition:
    name = f"trained_{variant}"
    model_name = VARIANTS[variant]

    @dg.asset(
        name=name,
        group_name=GROUP,
        kinds={"pytorch"},
        owners=[OWNER],
        tags={"stage": "training", "family": "hybrid" if variant in HYBRIDS else "baseline"},
        code_version=TRAIN_VERSION,
        pool="gpu",
        description=f"{model_name} trained on token_shards: model.safetensors, config.json, train_log.csv.",
    )
    def _asset(
        context: dg.AssetExecutionContext,
        config: TrainingConfig,
        profile: ProfileResource,
        store: StoreResource,
        token_shards: Artifact,
        wkv6_kernel: Artifact,
    ) -> dg.Output[Artifact]:
        return train_variant(context, name, variant, config, profile, store, token_shards, wkv6_kernel)

    return _asset


def train_variant(context: dg.AssetExecutionContext, name: str, variant: str, config: TrainingConfig,
                  profile: ProfileResource, store: StoreResource, token_shards: Artifact, wkv6_kernel: Artifact, *,
                  seed: int | None = None, key_extra: dict[str, Any] | None = None,
                  after: Callable[[Path, TrainConfig], dict[str, Any]] | None = None) -> dg.Output[Artifact]:
    """The body of every training asset: resolve the config, train (in-process or torchrun) unless the store
    holds this fingerprint, publish under `name`. `seed` overrides config.seed (the sweep's partition);
    `key_extra` enters the fingerprint; `after(dir, cfg)` runs on the published files before the manifest is
    written and its dict joins the metadata (the sweep's held-out evaluation)."""
    model_name = VARIANTS[variant]
    vocab = int(token_shards.metadata["shards"]["vocab_size"])
    if seed is not None:
        config = config.model_copy(update={"seed": seed})
    cfg = config.resolve(variant, profile.get().train, vocab)  # validates every field before compute
    world = config.world_size(cfg)
    resolved = without_default_objectives(dataclasses.asdict(cfg))  # default runs keep the fields' old records
    upstream = {"token_shards": token_shards.fingerprint, "wkv6_kernel": wkv6_kernel.fingerprint}
    paths = run_paths(cfg, world)
    context.log.info("paths: " + ", ".join(f"{k} {v}" for k, v in paths.items() if v != "n/a"))
    for note in path_fallbacks(paths, cfg.resolved_device()):
        context.log.warning(f"slower path: {note}")
    keyed = resolved if not key_extra else {**resolved, **key_extra}
    fp = training_fingerprint(name, keyed, upstream, train_env(cfg, paths), world)
    st = store.get()

    tracking: list[TrainingTracking] = []  # opened when a build (not a cache hit) starts

    def on_log(row: dict[str, Any]) -> None:
        context.log.info(format_log_row(row, cfg.steps))
        for t in tracking:
            t.on_log(row)

    def on_step_end(step: int, model: torch.nn.Module) -> None:
        for t in tracking:
            t.on_step_end(step, model)

    def build(d: Path) -> dict[str, Any]:
        work = st.work_dir(name, fp)
        if world > 1:
            meta = train_with_torchrun(context, config, cfg, token_shards.path, work, d, world)
        else:
            context.log.info(f"training {model_name} ({cfg.size}) for {cfg.steps} steps; checkpoints in {work}")
            # The store verified token_shards' sha256 manifest when it handed us the Artifact.
            res = train(cfg, token_shards.path, work, on_log=on_log, on_step_end=on_step_end,
                        on_event=context.log.info, progress=True, verify_shards=False)
            context.log.info(f"steady-state {res.steady_tokens_per_s:,.0f} tok/s (after {res.warmup_steps} warm-up "
                             f"steps, without evaluation); run average {res.tokens_per_s:,.0f} tok/s")
            meta = write_training_artifact(d, cfg, res, token_shards.path, paths)
        # generated once, with the model: a cache hit shows them again without loading the model
        dev = sample_device(cfg.resolved_device().type)
        context.log.info(f"samples: continuing held-out prompts on {dev}" + (
            " (the first time on a machine, a model with RWKV-6 layers builds the CPU wkv6 extension here: up "
            "to a minute)" if dev == "cpu" else ""))
        t0 = time.perf_counter()
        meta["samples_md"] = samples_markdown(st, Artifact(name, fp, d), token_shards, dev)
        context.log.info(f"samples: done in {time.perf_counter() - t0:.1f} s")
        return {**meta, **(after(d, cfg) if after is not None else {})}

    def tracked_build(d: Path) -> dict[str, Any]:
        if config.track:
            tracking.append(TrainingTracking(
                context, st.root, config.experiment, config.run_name or f"{name}-{fp[:8]}",
                params={**resolved, "world_size": world, "fingerprint": fp, **upstream},
                tags={"asset": name, "fingerprint": fp, "dagster_run_id": context.run.run_id},
                probe=probe_batch(token_shards, cfg.seq_len), eval_every=cfg.eval_every, steps=cfg.steps))
        try:
            out = build(d)
            for t in tracking:
                t.built(d)
        except BaseException:
            for t in tracking:
                t.failed()
            raise
        return out

    inputs = {"config": resolved, "world_size": world, **upstream, **({"key_extra": key_extra} if key_extra else {})}
    result = st.build(name, fp, tracked_build, inputs=inputs, force=config.force, on_event=context.log.warning)
    for t in tracking:
        t.finish(result.artifact.path)
    m = result.artifact.metadata
    return artifact_output(
        context, result, profile=profile.name,
        headline={
            "final_train_loss": m["final_train_loss"], "final_val_loss": m["final_val_loss"],
            "val_perplexity": m["val_perplexity"], "tokens_per_s": m["tokens_per_s"],
            **({"steady_tokens_per_s": m["steady_tokens_per_s"]} if m.get("steady_tokens_per_s") else {}),
            **{f"path_{k}": v for k, v in m.get("paths", {}).items()},
            "peak_memory_mb": m["peak_memory_mb"], "n_params": m["n_params"], "device": m["device"],
            "steps": m["steps"], "resumed_from_step": m["resumed_from_step"] if not result.cache_hit else 0,
            "world_size": m.get("world_size", 1), "global_batch_size": m.get("global_batch_size", cfg.batch_size * cfg.grad_accum),
            **{k: m[k] for k in ("seed", "eval_val_loss", "eval_val_loss_lo", "eval_val_loss_hi") if k in m},
            "samples": dg.MetadataValue.md(m.get("samples_md") or samples_markdown(
                st, result.artifact, token_shards, sample_device(m["device"]))),
        },
        preview_md=training_markdown(result.artifact.path, m),
    )


def training_markdown(path: Path, m: dict[str, Any]) -> str:
    png = base64.b64encode((path / "loss_curve.png").read_bytes()).decode()
    rows = [{"metric": k, "value": m[k]} for k in ("final_train_loss", "final_val_loss", "val_perplexity",
                                                     "steady_tokens_per_s", "tokens_per_s", "n_params", "device",
                                                     "steps") if k in m]
    rows += [{"metric": f"path: {k}", "value": v} for k, v in m.get("paths", {}).items()]
    return f"![loss curve](data:image/png;base64,{png})\n\n" + md_table(rows)


def load_trained(art: Artifact, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a trained model from its artifact (safetensors + config.json)."""
    import models
    from gt_pipeline.engine.checkpoint import load_model_weights

    cfg = json.loads(art.file("config.json").read_text())["train"]
    model = models.get_model(cfg["model"], cfg["vocab_size"], size=cfg["size"], **cfg["model_overrides"])
    load_model_weights(model, art.file("model.safetensors"))
    return model.to(device).eval(), cfg


def validation_batch(shards: Artifact, batch: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    return eval_windows(data.TokenShards(shards.path, verify=False).split("validation"), batch, seq_len)


trained_assets = [build_trained_asset(v) for v in VARIANTS]
