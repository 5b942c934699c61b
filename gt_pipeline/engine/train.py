"""The training engine: plain PyTorch, no Dagster (the `trained_*` assets call `train()`).

AdamW with per-component learning-rate multipliers (the seeds' `mamba_lr_mult`), linear warmup then
cosine to `min_lr`, pre-clip gradient norms per component (for G3/G4), gradient clipping and
accumulation, bf16 autocast on CUDA (fp32 on CPU), optional torch.compile, periodic validation on
fixed windows, atomic checkpoints every `checkpoint_every` steps and exact resume: on CPU a resumed
run ends bit for bit where an uninterrupted one does.

Data parallel (DDP) under torchrun: `batch_size` is the PER-RANK micro-batch, so one optimizer step sees
batch_size x grad_accum x world_size sequences; the learning rate is NOT rescaled with the world size
(the config is the user's). Every step draws the GLOBAL micro-batch of world_size x batch_size windows
from the one seeded generator, identical on every rank, and rank r keeps rows [r*B, (r+1)*B): the ranks
read disjoint windows, a W-rank run sees exactly the windows of a 1-rank run with batch W*B (equal up to
all-reduce rounding), and the generator state, hence resume, is the same on every rank. Rank 0 alone
writes checkpoints and calls `on_log`; every rank loads the latest checkpoint on resume.

Run standalone:  python -m gt_pipeline.engine.train --shards .gt/token_shards/<fp> --model GF-MH --size demo --steps 50
On N devices:    torchrun --standalone --nproc-per-node N -m gt_pipeline.engine.train --shards ... (same flags)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import math
import time
import traceback
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

import data
import models
from gt_pipeline.engine import distributed, metrics
from gt_pipeline.engine.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint

_log = logging.getLogger(__name__)

COMPONENTS = ("rwkv", "mamba", "fusion", "other")
# torch.compile modes a step can use. "reduce-overhead" adds CUDA graphs: the fastest measured GPU step
# (BENCHMARKS.md, issue 7), at the price of graph memory; the others as torch documents them.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes that replay CUDA graphs


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


# Objectives of gt_pipeline/engine/objectives.py that TrainConfig validates (kept here: importing that module
# loads torch._dynamo, ~2 s that a cached or CPU run need not pay).
# models whose fusion gives a per-token probability of the RWKV branch (what arbiter_ce trains)
DEBATE_GATED = ("GF", "GF-MH", "GF-RH", "GF-XM", "GF-XR", "HGF", "HGF-MH", "HGF-RH", "GRU", "MINGRU", "LINREC")


# the TrainConfig fields of this module and their "off" values
OBJECTIVE_DEFAULTS = {"lambda_div": 0.0, "lambda_arb": 0.0, "stateful": False}


def without_default_objectives(config: dict) -> dict:
    """A TrainConfig dict without the objective fields that are off: records (checkpoint configs, training
    fingerprints) of runs that use none of them stay what they were before these fields existed."""
    return {k: v for k, v in config.items() if not (k in OBJECTIVE_DEFAULTS and v == OBJECTIVE_DEFAULTS[k])}


def check_objectives(cfg: "TrainConfig") -> None:
    """ValueError naming the TrainConfig field when an objective does not fit the model."""
    name = models.canonical_name(cfg.model)
    for field in ("lambda_div", "lambda_arb"):
        v = getattr(cfg, field)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
            raise ValueError(f"TrainConfig.{field} must be a finite number >= 0 (0 = off), got {v!r}")
    if cfg.lambda_div > 0 and name not in models.HYBRID_NAMES:
        raise ValueError(f"TrainConfig.lambda_div={cfg.lambda_div}: the diversity term compares the RWKV and Mamba "
                         f"branches of a hybrid; {name} is not one ({', '.join(models.HYBRID_NAMES)})")
    if cfg.lambda_arb > 0 and name not in DEBATE_GATED:
        raise ValueError(f"TrainConfig.lambda_arb={cfg.lambda_arb}: the arbiter CE trains a per-token RWKV weight, "
                         f"which {name} has not (HY, RF, CP have no gate; WS's alpha is an unconstrained scalar); "
                         f"use one of {', '.join(DEBATE_GATED)} or set lambda_arb=0")
    if not isinstance(cfg.stateful, bool):
        raise ValueError(f"TrainConfig.stateful must be a bool, got {cfg.stateful!r}")
    if cfg.stateful and name == "GPT":
        raise ValueError("TrainConfig.stateful=True: GPT has no recurrent state to carry; use a recurrent model "
                         "or stateful=False")


@dataclass
class TrainConfig:
    model: str = "GF-MH"
    size: str = "5m"
    vocab_size: int = 16000
    steps: int = 5000
    batch_size: int = 64
    seq_len: int = 512
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_frac: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    lr_mult: dict[str, float] = field(default_factory=lambda: {"mamba": 0.5})  # seeds' mamba_lr_mult 0.5
    eval_every: int = 100
    eval_batches: int = 20
    checkpoint_every: int = 500
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU (fp32)
    compile: bool | str = "auto"  # "auto" (resolve_compile: CUDA graphs on CUDA, off on CPU), a bool, or a mode
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # issue-17 objectives (gt_pipeline/engine/objectives.py); all off by default = plain CE on random windows
    lambda_div: float = 0.0  # twin-debate diversity weight
    lambda_arb: float = 0.0  # twin-debate arbiter-CE weight (models with a per-token RWKV weight)
    stateful: bool = False  # B parallel tracks of the stream, ModelState carried across batches (not GPT)

    def __post_init__(self) -> None:
        positive = ("vocab_size", "steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches", "checkpoint_every")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {v!r}")
        for name in ("lr", "min_lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.min_lr > self.lr:
            raise ValueError(f"TrainConfig.min_lr={self.min_lr} exceeds lr={self.lr}")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError(f"TrainConfig.warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if not 0 <= self.weight_decay < 1:
            raise ValueError(f"TrainConfig.weight_decay must be in [0, 1), got {self.weight_decay}")
        bad = set(self.lr_mult) - set(COMPONENTS)
        if bad:
            raise ValueError(f"TrainConfig.lr_mult has unknown components {sorted(bad)}; valid: {list(COMPONENTS)}")
        if self.compile != "auto":
            compile_mode(self.compile, "TrainConfig.compile")
        if self.compile in CUDA_GRAPH_MODES and self.grad_accum > 1:
            # CUDA-graph trees hand the first micro-batch's gradient buffer to .grad and overwrite it on the
            # next replay, so accumulated gradients come out wrong or the run stops (pytorch#96693, #169545).
            raise ValueError(f"TrainConfig.compile={self.compile!r} replays CUDA graphs, which break gradient "
                             f"accumulation (grad_accum={self.grad_accum}): use compile=True or "
                             f"'max-autotune-no-cudagraphs', or grad_accum=1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"TrainConfig.device must be auto, cpu or cuda, got {self.device!r}")
        if self.model.upper().replace("_", "-") not in {m.upper().replace("_", "-") for m in models.list_models()}:
            raise ValueError(f"TrainConfig.model={self.model!r} is not a registered model; choose one of {models.list_models()}")
        check_objectives(self)
        if self.model_overrides:  # e.g. {"mamba_backend": "wkv6"}: build the config now, so a bad one fails before compute
            try:
                models.make_config(self.model, self.vocab_size, self.size, **self.model_overrides)
            except (TypeError, ValueError) as e:
                raise ValueError(f"TrainConfig.model_overrides={self.model_overrides!r}: {e}") from e

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device, "TrainConfig.device")


def resolve_compile(compile: bool | str, device: torch.device, grad_accum: int = 1, world_size: int = 1,
                    carries_state: bool = False) -> bool | str:
    """The compile setting a run uses. "auto": on CUDA "reduce-overhead" (torch.compile with CUDA graphs, the fastest
    measured step, BENCHMARKS.md), or the default mode where CUDA graphs are not allowed (grad_accum > 1, DDP)
    or not validated (a recurrent state carried from step to step, `stateful`); on CPU no compile (a compile
    costs more than the short CPU runs gain). Anything else passes through."""
    if compile != "auto":
        return compile
    if device.type != "cuda":
        return False
    return "reduce-overhead" if grad_accum == 1 and world_size == 1 and not carries_state else True


def compile_label(compile: bool | str) -> str:
    """How metadata names a resolved compile setting: "off", "default" or the mode."""
    return "off" if compile is False else ("default" if compile is True else str(compile))


def optional_packages() -> dict[str, str | None]:
    """Versions of the optional CUDA packages a model may run on (None: not importable)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("mamba-ssm", "causal-conv1d"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def run_paths(cfg: "TrainConfig", world_size: int = 1) -> dict[str, str]:
    """What a run of `cfg` executes on this machine: the resolved compile setting and the kernels each layer takes
    (models.describe_paths on a one-layer twin of the model; layers resolve per device and dtype)."""
    device = cfg.resolved_device()
    probe = models.get_model(cfg.model, cfg.vocab_size, size=cfg.size, **{**cfg.model_overrides, "n_layer": 1})
    compile = resolve_compile(cfg.compile, device, cfg.grad_accum, world_size, carries_state=cfg.stateful)
    paths = models.describe_paths(probe, device, amp=cfg.amp and device.type == "cuda", compiled=compile is not False)
    return {"compile": compile_label(compile), **paths}


def path_fallbacks(paths: dict[str, str], device: torch.device) -> list[str]:
    """The slower paths a CUDA run takes instead of the fastest measured ones, each as a sentence (empty on CPU,
    where the PyTorch paths are the defaults)."""
    if device.type != "cuda":
        return []
    notes = []
    if paths.get("mamba_conv") == "torch" and paths.get("compile") == "off":
        notes.append("Mamba-2 depthwise conv in PyTorch, not causal_conv1d (not importable: pip install -e '.[cuda]')")
    if paths.get("mamba_ssd") not in ("wkv6", "n/a"):
        notes.append(f"Mamba-2 SSD on the {paths['mamba_ssd']} path, not wkv6 (d_state != headdim or not a CUDA head size)")
    for key in ("rwkv_wkv6", "mamba_wkv6"):
        if paths.get(key) == "sequential":
            notes.append(f"{key}: sequential wkv6 kernels (the chunked ones need bf16 autocast and head size 64)")
    if paths.get("compile") == "off":
        notes.append("training step not compiled (compile off)")
    return notes


def resolve_device(name: str, field: str) -> torch.device:
    """`auto` -> CUDA if available else CPU; `cuda` without a GPU is an error naming `field`."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"{field} must be auto, cpu or cuda, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{field}='cuda' but torch.cuda.is_available() is False")
    return torch.device(name)


@dataclass
class TrainResult:
    model: torch.nn.Module
    log: list[dict[str, Any]]
    resumed_from_step: int
    seconds: float
    tokens_per_s: float
    peak_memory_mb: float
    device: str
    n_params: int
    init_entropy_ratio: float
    world_size: int = 1  # data-parallel ranks; tokens_per_s counts all of them
    rank: int = 0
    steady_tokens_per_s: float = math.nan  # steps after the warm-up (compile, CUDA-graph capture), without evaluation
    warmup_steps: int = 0  # steps of this run left out of steady_tokens_per_s
    compile: str = "off"  # the resolved compile setting (compile_label)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over warmup_frac of the steps, then cosine from lr down to min_lr."""
    warmup = int(cfg.warmup_frac * cfg.steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Fused AdamW (CPU and CUDA) with one group per (component, decay?) so each component has its own LR
    multiplier. Fused, `train_step` queues the update without waiting for the device (`skips_on_device`)."""
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (models.component_of(name), not models.no_weight_decay(name, p))
        groups.setdefault(key, []).append(p)
    param_groups = [
        {
            "params": ps,
            "name": f"{comp}{'' if decay else '_nodecay'}",
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "lr_mult": cfg.lr_mult.get(comp, 1.0),
        }
        for (comp, decay), ps in sorted(groups.items())
    ]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


class TokenLoss(torch.nn.Module):
    """The LM plus its next-token loss as one module: `TokenLoss(lm)(x, y)` is the mean cross-entropy of
    `lm(x).logits` (in fp32) against y. `train_step` calls this, so `torch.compile` of it (and DDP around it)
    covers the loss too: the compiled graph reads the bf16 logits once instead of materialising fp32 copies."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.lm(x).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))


def inductor_options(mode: str | None = None) -> dict:
    """torch.compile options: `mode`'s presets, with Inductor's mix-order reductions turned off where the
    option exists. On torch 2.11 (H100, hidden 512) they returned a (C,) gradient for the (1, 1, C)
    time_maa_* parameters ("invalid gradient ... expected shape compatible with [1, 1, 512]", pytorch#178080),
    and pytorch#193061 reports silently wrong gradients from them in norm backwards; a compiled step must
    compute the same gradients as the eager one."""
    import torch._inductor as inductor
    import torch._inductor.config as inductor_config

    opts = dict(inductor.list_mode_options(mode)) if mode else {}
    if "triton.mix_order_reduction" in inductor_config._config:
        opts["triton.mix_order_reduction"] = False
    return opts


def compile_mode(compile: bool | str, field: str = "compile") -> str | None:
    """The torch.compile mode a `compile` setting asks for: None for False, True and "default" (the default
    mode), else the mode itself; anything but a bool or a mode of COMPILE_MODES is an error naming `field`."""
    if not isinstance(compile, bool) and compile not in COMPILE_MODES:
        raise ValueError(f"{field} must be a bool or a torch.compile mode ({', '.join(COMPILE_MODES)}), "
                         f"got {compile!r}")
    return None if isinstance(compile, bool) or compile == "default" else compile


def compiled(module: torch.nn.Module, compile: bool | str) -> torch.nn.Module:
    """`module` under torch.compile with `compile`'s mode and `inductor_options`, or `module` itself when False."""
    mode = compile_mode(compile)
    return torch.compile(module, options=inductor_options(mode)) if compile else module


def step_function(model: torch.nn.Module, compile: bool | str = False) -> torch.nn.Module:
    """What `train_step` calls as `fwd(x, y) -> loss`: `TokenLoss(model)`, compiled when asked (True or
    "default": the default mode; another string: that mode of COMPILE_MODES, e.g. "reduce-overhead")."""
    return compiled(TokenLoss(model), compile)


def component_grad_sq(model: torch.nn.Module) -> torch.Tensor:
    """Squared pre-clip L2 norm of all gradients of each component (COMPONENTS order), on the device: no sync."""
    grads: dict[str, list[torch.Tensor]] = {c: [] for c in COMPONENTS}
    for name, p in model.named_parameters():
        if p.grad is not None:
            grads[models.component_of(name)].append(p.grad.detach())
    zero = torch.zeros((), device=next(model.parameters()).device)
    return torch.stack([torch.stack(torch._foreach_norm(g)).float().pow(2).sum() if g else zero
                        for g in grads.values()])


def _norms_from_sq(vals: list[float]) -> dict[str, float]:
    out = {f"grad_norm_{c}": math.sqrt(v) for c, v in zip(COMPONENTS, vals)}
    out["grad_norm"] = math.sqrt(sum(vals))
    return out


class BatchFeed:
    """The training loop's batches: `draw()` makes one step's host batches (tuples of fwd's arguments), and
    they go to the device from pinned memory with an asynchronous copy on CUDA. `prefetch` (train_step's
    `before_sync`) draws the next step's batches while the device still runs this step, so the host work
    and the copy never leave the GPU idle.

    `generator_state()` is the data generator's state before the batches not yet handed out: what a
    checkpoint stores, so a resume draws exactly the batches the uninterrupted run would."""

    def __init__(self, draw: Callable[[], list[tuple]], device: torch.device, generator: torch.Generator | None = None):
        self.draw, self.device, self.generator = draw, device, generator
        self._next: list[tuple] | None = None
        self._state_before_next = None

    def to_device(self, batches: list[tuple]) -> list[tuple]:
        cuda = self.device.type == "cuda"
        return [tuple((t.pin_memory().to(self.device, non_blocking=True) if cuda else t.to(self.device))
                      if isinstance(t, torch.Tensor) else t for t in b) for b in batches]

    def prefetch(self) -> None:
        if self._next is None:
            self._state_before_next = self.generator.get_state() if self.generator is not None else None
            self._next = self.to_device(self.draw())

    def next(self) -> list[tuple]:
        out, self._next = (self._next if self._next is not None else self.to_device(self.draw())), None
        return out

    def generator_state(self) -> torch.Tensor:
        return self._state_before_next if self._next is not None else self.generator.get_state()


def train_step(model, fwd, optimizer, batches, grad_clip: float, autocast, *, no_sync=None,
               dist_ctx: distributed.DistContext | None = None,
               before_sync: Callable[[], None] | None = None) -> tuple[float, dict[str, float] | None]:
    """Forward/backward over the micro-batches, then clip and step. Returns (loss, grad norms and the loss
    terms of a StepLoss); if the loss is not finite it returns (loss, None) WITHOUT stepping, so the weights
    stay the last good ones.

    Each batch is a tuple of `fwd`'s arguments ((x, y), or objectives.StepLoss's (x, y, reset, carrier)).
    `fwd(*batch)` returns the loss or (loss, {term: detached 0-dim}); plain `fwd(x, y)` returns the mean
    token loss of `model` (`step_function(model)`, maybe compiled). Under
    DDP `fwd` is the DDP wrapper of that, `no_sync` its `no_sync` (gradients are all-reduced on the last
    micro-batch only) and `model` the unwrapped LM, so the component norms read real parameter names
    and, taken after backward, the all-reduced gradients. The returned loss is the mean over all ranks:
    every rank sees the same value, so a NaN stops every rank at the same step.

    The step waits for the device once: the loss, the loss terms and the component norms are read back
    together. With a fused optimizer (`build_optimizer`'s) that wait comes after the update is queued: the clip
    coefficient is formed on the device and the optimizer gets a `found_inf` flag (the protocol torch's
    GradScaler uses with fused optimizers), so a non-finite loss skips the update on the device, leaving the
    weights, the moments and the step count as they were. The device then never sits idle while the host
    launches the optimizer. Other optimizers (no `found_inf`) are stepped after the wait, on the same clipped
    gradients, only when the loss is finite. `before_sync` runs just before the wait, while the device works through
    the queued step (the training loop draws the next batch there)."""
    loss_sum, parts_sum = None, {}
    torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA-graph replays ("reduce-overhead"); else a no-op
    for i, batch in enumerate(batches):
        sync = no_sync is None or i == len(batches) - 1
        with contextlib.nullcontext() if sync else no_sync():
            with autocast():
                loss, parts = _split_loss(fwd(*batch))
                loss = loss / len(batches)
            loss.backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0) + v / len(batches)
    if dist_ctx is not None and dist_ctx.enabled:
        loss_sum = distributed.all_reduce_sum(loss_sum.clone(), dist_ctx) / dist_ctx.world_size
        if parts_sum:
            reduced = distributed.all_reduce_sum(torch.stack(list(parts_sum.values())).float(), dist_ctx) / dist_ctx.world_size
            parts_sum = dict(zip(parts_sum, reduced))
    sq = component_grad_sq(model)
    read = torch.cat([loss_sum.float().reshape(1), sq, *(v.float().reshape(1) for v in parts_sum.values())])
    _clip_grads(model, sq, grad_clip)
    on_device = skips_on_device(optimizer)
    if on_device:
        optimizer.found_inf = (~torch.isfinite(read[0])).float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        optimizer.zero_grad(set_to_none=True)
    else:
        _note_host_step(optimizer)
    if before_sync is not None:
        before_sync()
    vals = read.tolist()
    loss_v = vals[0]  # the step's one sync
    if not on_device:
        if math.isfinite(loss_v):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if not math.isfinite(loss_v):
        return loss_v, None
    norms = _norms_from_sq(vals[1 : 1 + len(COMPONENTS)])
    norms.update(zip(parts_sum, vals[1 + len(COMPONENTS):]))  # the objective's terms (loss_ce, loss_div, ...)
    return loss_v, norms


def _clip_grads(model: torch.nn.Module, sq: torch.Tensor, grad_clip: float) -> None:
    """clip_grad_norm_ on the device, no sync: gradients times grad_clip / (norm + 1e-6) clamped at 1 (a product
    by exactly 1 below it), `sq` the components' squared norms. The coefficient goes to each gradient's dtype: a
    0-dim tensor of another dtype sends _foreach_mul_ to its per-tensor path on CUDA, one kernel per parameter."""
    coef = (grad_clip / (sq.double().sum().sqrt() + 1e-6)).clamp(max=1.0)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in model.parameters():
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for dtype, grads in by_dtype.items():
        torch._foreach_mul_(grads, coef.to(dtype))


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` takes torch's `found_inf` flag (fused Adam/AdamW/SGD): every group fused. A
    checkpoint's param groups replace the optimizer's on load, so an optimizer state saved unfused stays so."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        g.get("fused") for g in optimizer.param_groups)


_host_step_noted: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()


def _note_host_step(optimizer: torch.optim.Optimizer) -> None:
    if optimizer not in _host_step_noted:
        _host_step_noted.add(optimizer)
        _log.info("%s is not fused: each step's update waits for the read-back of the loss (the device idles while "
                  "the host launches the optimizer)", type(optimizer).__name__)


def _split_loss(out) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A step module's output as (loss, terms): TokenLoss gives a tensor, objectives.StepLoss (loss, terms)."""
    return out if isinstance(out, tuple) else (out, {})


def eval_windows(tokens: np.ndarray, n_windows: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed, evenly spaced validation windows: the same every eval, every run."""
    span = len(tokens) - seq_len - 1
    if span < 0:
        raise ValueError(f"validation split has {len(tokens)} tokens, fewer than seq_len+1={seq_len + 1}")
    starts = np.linspace(0, span, n_windows).astype(np.int64)
    win = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    t = torch.from_numpy(win)
    return t[:, :-1], t[:, 1:]


@torch.no_grad()
def evaluate(model, x_all, y_all, batch_size, device, autocast, dist_ctx: distributed.DistContext | None = None) -> float:
    """Mean token loss over the fixed windows. Under DDP rank r evaluates batches r, r+W, ...; the
    per-batch sums are gathered and added in batch order, as one process would add them."""
    ctx = dist_ctx or distributed.DistContext()
    model.eval()
    starts = list(range(0, len(x_all), batch_size))
    sums = torch.zeros(len(starts), dtype=torch.float64)
    for j in range(ctx.rank, len(starts), ctx.world_size):
        i = starts[j]
        x, y = x_all[i : i + batch_size].to(device), y_all[i : i + batch_size].to(device)
        with autocast():
            logits = model(x).logits
        sums[j] = float(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"))
    if ctx.enabled:  # every entry is filled by exactly one rank, so the sum over ranks is exact
        sums = distributed.all_reduce_sum(sums.to(device), ctx).cpu()
    model.train()
    total = 0.0
    for v in sums.tolist():
        total += v
    return total / y_all.numel()


def warmup_steps(steps: int) -> int:
    """Steps left out of the steady-state throughput: the first 5% (at least 3, at most 50), which hold torch.compile,
    CUDA-graph capture and allocator growth."""
    return min(50, max(3, steps // 20))


def steady_tokens_per_s(log: list[dict[str, Any]], skip: int) -> float:
    """Tokens per second over the log rows after the first `skip` of them: total tokens over total step time, where
    a row's step time excludes evaluation and checkpointing (see `_train`). NaN when no row is left."""
    rows = [r for r in log[skip:] if r.get("step_seconds", 0) > 0]
    secs = sum(r["step_seconds"] for r in rows)
    return sum(r["tokens_per_s"] * r["step_seconds"] for r in rows) / secs if secs > 0 else math.nan


def train(
    cfg: TrainConfig,
    shards_dir: Path,
    work_dir: Path,
    *,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    on_step_end: Callable[[int, torch.nn.Module], None] | None = None,
    on_event: Callable[[str], None] | None = None,
    log_every_s: float = 5.0,
    progress: bool = False,
    verify_shards: bool = True,
) -> TrainResult:
    """Train `cfg.model` on `shards_dir`; checkpoints go to `work_dir/checkpoints`, resumed if present.

    Under torchrun (WORLD_SIZE > 1) this is one rank of a data-parallel run (module docstring); every rank
    returns the same trained weights, and only rank 0 calls `on_log` and `on_event` (a line for the run's log,
    e.g. the resume, when it happens), shows progress and writes checkpoints. `on_step_end` runs on every rank."""
    dist_ctx, device = distributed.setup(cfg.resolved_device())
    try:
        return _train(cfg, shards_dir, work_dir, device, dist_ctx, on_log=on_log, on_step_end=on_step_end,
                      on_event=on_event, log_every_s=log_every_s, progress=progress, verify_shards=verify_shards)
    except BaseException as exc:
        if dist_ctx.enabled:
            # The failed run's DDP wrapper (its reducer holds the process group) lives on in the traceback's frames;
            # free it now, while the group is up, not at interpreter exit after teardown destroyed the group.
            traceback.clear_frames(exc.__traceback__)
            gc.collect()
        raise
    finally:
        distributed.teardown(dist_ctx)


def _train(cfg, shards_dir, work_dir, device, dist_ctx, *, on_log, on_step_end, on_event, log_every_s, progress,
           verify_shards) -> TrainResult:
    from gt_pipeline.engine import objectives  # loads torch._dynamo (torch.compiler.disable): only when training

    W, rank, main = dist_ctx.world_size, dist_ctx.rank, dist_ctx.is_main
    compile = resolve_compile(cfg.compile, device, cfg.grad_accum, W, carries_state=cfg.stateful)
    if dist_ctx.enabled and compile in CUDA_GRAPH_MODES:
        raise ValueError(f"TrainConfig.compile={cfg.compile!r} (CUDA graphs) has not been validated under DDP "
                         f"({W} ranks); use compile=True or 'max-autotune-no-cudagraphs' for data-parallel runs")
    if dist_ctx.enabled and cfg.stateful:
        # each rank carries its own rows' state, and rank 0 alone writes checkpoints: a resume could not restore them
        raise ValueError(f"TrainConfig.stateful=True runs on one process only ({W} ranks here): use "
                         f"nproc_per_node=1 and nnodes=1, or stateful=False for data-parallel runs")
    shards = data.TokenShards(shards_dir, verify=verify_shards)
    if shards.manifest["vocab_size"] > cfg.vocab_size:
        raise ValueError(f"TrainConfig.vocab_size={cfg.vocab_size} is smaller than the tokenizer's {shards.manifest['vocab_size']}")
    train_tokens, val_tokens = shards.split("train"), shards.split("validation")
    for split, toks in (("train", train_tokens), ("validation", val_tokens)):
        if len(toks) < cfg.seq_len + 2:
            raise ValueError(f"TrainConfig.seq_len={cfg.seq_len} is beyond the {split} shard ({len(toks)} tokens)")

    torch.manual_seed(cfg.seed)
    model = models.get_model(cfg.model, cfg.vocab_size, size=cfg.size, **cfg.model_overrides).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, cfg)
    use_amp = cfg.amp and device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    fwd = compiled(objectives.step_module(model, cfg), compile)
    x_val, y_val = eval_windows(val_tokens, cfg.eval_batches * cfg.batch_size, cfg.seq_len)
    # G2 looks at the freshly initialised model (init is deterministic, so this holds on resume too).
    init_entropy_ratio = metrics.entropy_ratio(model, x_val[: cfg.batch_size].to(device), cfg.vocab_size)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # data order, independent of init
    tracks, carrier = None, None
    if cfg.stateful:  # B*W parallel tracks of the train split; this rank keeps its rows and their carried state
        tracks, carrier = stateful_batches(shards, W * cfg.batch_size, cfg.seq_len), objectives.StateCarrier()

    ckpt_root = work_dir / "checkpoints"
    log: list[dict[str, Any]] = []
    start = 0
    existing = list_checkpoints(ckpt_root)
    distributed.check_same(dist_ctx, int(existing[-1].name.split("_")[1]) if existing else 0, device,
                           f"the latest checkpoint in {ckpt_root}",
                           "Every node must see the same work directory: put it on a shared filesystem.")
    if existing:  # every rank loads it: weights, optimizer moments and the data generator stay identical
        state, rng = load_checkpoint(existing[-1], model, optimizer)
        if state["config"] != _jsonable(cfg):
            raise ValueError(f"checkpoint {existing[-1]} was written with another config; remove {ckpt_root} to start over")
        if state.get("world_size", 1) != W:
            raise ValueError(f"checkpoint {existing[-1]} was written by a {state.get('world_size', 1)}-rank run, this one "
                             f"has {W} ranks (another effective batch): run with that many ranks or remove {ckpt_root}")
        start, log = state["step"], state["log"]
        gen.set_state(rng["data_generator"])
        torch.set_rng_state(rng["torch_cpu"])
        if device.type == "cuda" and "torch_cuda" in rng:  # rwkv_drop_prob draws on the device's generator
            torch.cuda.set_rng_state(rng["torch_cuda"], device)
        if tracks is not None:
            tracks.load_state_dict(state["tracks"])
            carrier.state = objectives.carried_state_from_tensors(rng, device)
        if main and on_event is not None:
            on_event(f"resumed from the checkpoint at step {start} ({existing[-1]}): {cfg.steps - start} steps to go")
    ddp = None
    if dist_ctx.enabled:
        # After the resume load: DDP broadcasts rank 0's weights at wrap time (all ranks hold the same anyway).
        ddp = torch.nn.parallel.DistributedDataParallel(objectives.step_module(model, cfg),
                                                        device_ids=[device.index] if device.type == "cuda" else None)
        fwd = compiled(ddp, compile)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = _progress_bar(cfg.steps, start) if progress and main else None
    B = cfg.batch_size

    def draw() -> list[tuple]:
        batches = []
        for _ in range(cfg.grad_accum):
            if tracks is not None:  # consecutive windows of every track; the carrier holds the state between them
                x, y, new_doc = next(tracks)  # (W*B, T), (W*B, T), (W*B,)
                rows = slice(rank * B, (rank + 1) * B)
                batches.append((x[rows], y[rows], new_doc[rows], carrier))
                continue
            # The global micro-batch (W*B windows, same on every rank); this rank keeps its own B rows.
            x, y = data.random_windows(train_tokens, W * B, cfg.seq_len, gen)  # (W*B, T)
            batches.append((x[rank * B : (rank + 1) * B], y[rank * B : (rank + 1) * B]))  # (B, T)
        return batches

    # The stateful tracks are drawn in step order (their position is checkpointed): no prefetch there.
    feed = BatchFeed(draw, device, gen)
    prefetch = feed.prefetch if tracks is None else None
    skip = warmup_steps(cfg.steps - start)  # this process's own warm-up, also after a resume
    t_start, t_last_log, tokens_done = time.perf_counter(), 0.0, 0
    model.train()
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        lr = lr_at(cfg, step)
        for g in optimizer.param_groups:
            g["lr"] = lr * g["lr_mult"]
        loss_sum, norms = train_step(model, fwd, optimizer, feed.next(), cfg.grad_clip, autocast,
                                     no_sync=ddp.no_sync if ddp is not None else None, dist_ctx=dist_ctx,
                                     before_sync=prefetch if step + 1 < cfg.steps else None)
        if norms is None:
            last = list_checkpoints(ckpt_root)
            raise TrainingDiverged(
                f"loss is {loss_sum} at step {step + 1} (lr {lr:.3g}); training stopped. "
                f"Last good checkpoint: {last[-1] if last else 'none (diverged before the first checkpoint)'}"
            )
        # train_step's one read waits for this whole step, the update included; the host work before it (the next
        # batch, the optimizer launches) overlapped the device's. Evaluation and checkpoints come after dt.
        dt = time.perf_counter() - t0
        n_tok = cfg.batch_size * cfg.seq_len * cfg.grad_accum * W  # all ranks
        tokens_done += n_tok
        row = {"step": step + 1, "train_loss": loss_sum, "val_loss": math.nan, "lr": lr, **norms,
               "tokens_per_s": n_tok / dt, "step_seconds": dt}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            row["val_loss"] = evaluate(model, x_val, y_val, cfg.batch_size, device, autocast, dist_ctx)
        log.append(row)
        if on_step_end is not None:
            on_step_end(step + 1, model)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        now = time.perf_counter()
        if main and on_log is not None and (now - t_last_log >= log_every_s or step + 1 == cfg.steps
                                            or not math.isnan(row["val_loss"])):
            on_log({**row, "steady_tokens_per_s": steady_tokens_per_s(log[start:], skip)})
            t_last_log = now
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            if main:  # the state is identical on every rank; one writer
                rng = {"data_generator": feed.generator_state(), "torch_cpu": torch.get_rng_state()}
                if device.type == "cuda":
                    rng["torch_cuda"] = torch.cuda.get_rng_state(device)
                extra = {"config": _jsonable(cfg), "log": log, "world_size": W}
                if tracks is not None:  # the tracks' position and the carried state: resume continues exactly
                    rng.update(objectives.carried_state_tensors(carrier))
                    extra["tracks"] = tracks.state_dict()
                save_checkpoint(ckpt_root, step + 1, model, optimizer, rng, extra)
            distributed.barrier(dist_ctx, device)  # no rank runs past a checkpoint that is not on disk yet
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t_start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _rss_mb()
    return TrainResult(
        model=model, log=log, resumed_from_step=start, seconds=seconds,
        tokens_per_s=tokens_done / seconds if seconds > 0 else 0.0, peak_memory_mb=peak,
        device=str(device) if device.type == "cpu" else torch.cuda.get_device_name(device), n_params=n_params,
        init_entropy_ratio=init_entropy_ratio, world_size=W, rank=rank,
        steady_tokens_per_s=steady_tokens_per_s(log[start:], skip), warmup_steps=skip,
        compile=compile_label(compile),
    )


def stateful_batches(shards: data.TokenShards, n_rows: int, seq_len: int) -> data.StatefulTracks:
    """The train split as `n_rows` parallel tracks (data.StatefulTracks, endless) for `TrainConfig.stateful`."""
    return data.StatefulTracks(shards.split("train"), shards.doc_starts("train"), batch_size=n_rows, seq_len=seq_len)


def format_log_row(row: dict[str, Any], steps: int) -> str:
    """The progress line of one log row (the asset's run log, in-process or from the torchrun worker)."""
    val = "" if math.isnan(row["val_loss"]) else f" val {row['val_loss']:.4f}"
    steady = row.get("steady_tokens_per_s", math.nan)
    steady = "" if not math.isfinite(steady) else f" (steady {steady:,.0f})"
    return (f"step {row['step']}/{steps} loss {row['train_loss']:.4f}{val} lr {row['lr']:.2e} "
            f"|g| {row['grad_norm']:.3f} {row['tokens_per_s']:,.0f} tok/s{steady}")


def _jsonable(cfg: TrainConfig) -> dict[str, Any]:
    import json

    return json.loads(json.dumps(without_default_objectives(dataclasses.asdict(cfg))))


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _progress_bar(total: int, initial: int):
    from tqdm import tqdm

    # disable=None: a bar on a terminal (the CLI), nothing when stderr is a pipe or a log file.
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, disable=None, mininterval=1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=Path, required=True)
    ap.add_argument("--work-dir", type=Path, default=Path("train_work"))
    scalar_types = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(TrainConfig):
        if f.type in scalar_types:
            ap.add_argument(f"--{f.name.replace('_', '-')}", type=scalar_types[f.type], default=None)
    args = ap.parse_args()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name, None) is not None}
    cfg = TrainConfig(**overrides)
    res = train(cfg, args.shards, args.work_dir, progress=True)
    last = res.log[-1]
    if res.rank == 0:
        print({"train_loss": last["train_loss"], "val_loss": last["val_loss"], "tokens_per_s": res.tokens_per_s,
               "world_size": res.world_size})


if __name__ == "__main__":
    main()
