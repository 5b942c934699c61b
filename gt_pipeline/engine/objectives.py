"""Training objectives beyond plain next-token CE (plain PyTorch, no Dagster): the twin-debate loss and stateful
training on parallel token tracks with the recurrent state carried across batches (the seeds' last phase and
their "stateful dataset"). `engine.train` uses `step_module(model, cfg)`; with every option off it is the plain
`TokenLoss`, so a default run is unchanged bit for bit.

Twin-debate loss (`TrainConfig.lambda_div`, `lambda_arb`; 0 = off):
    loss = CE + lambda_div * diversity + lambda_arb * arbiter_ce
* diversity = mean over the hybrid layers and tokens of (1 + cos(a_t, m_t)) / 2, a and m the RWKV-6 and Mamba-2
  branch outputs entering the fusion (fp32; 0 when they point apart, 1 when they agree): it pushes the
  branches to disagree.
* arbiter_ce: "arbiter CE towards the better branch", defined per token. From the same input and starting
  state, the whole model runs twice without gradient in eval mode (no RWKV dropping): once with every fusion
  forced to the RWKV branch alone (models.force_gate 1: g = 1, s = 1, w_a = 1, and with `mamba_residual` the
  Mamba output added beside the fusion switched off too) and once to the Mamba branch alone (force_gate 0). Their next-token CEs at position t are ce_r[b, t], ce_m[b, t]; the target is
  tau = 1 where ce_r < ce_m (RWKV alone predicts y_t better), 0 where ce_r > ce_m, 0.5 on ties. arbiter_ce is
  the mean over layers, tokens and the gate's channels of the binary cross-entropy
  -(tau log w + (1 - tau) log(1 - w)) of each layer's RWKV weight w at t (g of GF*, s of HGF* per channel,
  w_a of the arbiters GRU / MINGRU / LINREC), in fp32 with the logs clamped at log(1e-8). It costs two extra
  forwards per micro-batch. Models without such a weight (HY, RF, CP; WS, whose alpha is an unconstrained
  scalar, not a probability) are refused.
  Caveats a user should weigh: (1) the model was not trained with a branch forced off, so each single-branch
  forward is off its training distribution, and the branch the model already leans on tends to win the
  comparison: the term can reinforce the imbalance it is meant to arbitrate; (2) under bf16 autocast the
  gates are bf16, so 1 - w rounds to multiples of 2^-8 near 1 and to 0 past ~0.998, where the clamped log
  is constant and the term has no gradient; (3) a layer whose RWKV output was dropped (`rwkv_drop_prob`)
  still counts in both terms.
Each term is logged per step: `loss_ce`, `loss_div`, `loss_arb` (train_loss is their weighted sum).

Stateful training (`TrainConfig.stateful`): the train split is read as `data.StatefulTracks` (B contiguous
tracks, batch i+1 continues batch i row by row) and the ModelState of each micro-batch, detached, starts the
next one (truncated backprop through time at the window edge). A row whose window starts a document (or its
track) begins from a zero state: `ModelState.reset_rows(is_new_doc)`. The carried state and the tracks'
position are checkpointed, so a resumed run continues exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import models
from gt_pipeline.engine.train import DEBATE_GATED, OBJECTIVE_DEFAULTS, check_objectives, without_default_objectives

__all__ = ["DEBATE_GATED", "OBJECTIVE_DEFAULTS", "without_default_objectives", "StateCarrier", "StepLoss", "better_branch_target", "diversity", "arbiter_ce",
           "step_module", "check_objectives", "carried_state_tensors", "carried_state_from_tensors"]

# ------------------------------------------------------------------------------------------ carried state
class StateCarrier:
    """Holds the detached ModelState between micro-batches of a stateful run (None before the first)."""

    def __init__(self):
        self.state: models.ModelState | None = None

    @torch.compiler.disable
    def take(self, reset: torch.Tensor) -> models.ModelState | None:
        """The carried state with the rows where reset (B,) bool is True zeroed (a document starts there)."""
        if self.state is None:
            return None
        return self.state.reset_rows(reset.to(torch.bool))

    @torch.compiler.disable
    def keep(self, state: models.ModelState) -> None:
        self.state = state.detach()


def carried_state_tensors(carrier: StateCarrier) -> dict[str, torch.Tensor]:
    """Flat {"carried.<layer>.<key>": tensor} of the carried state, for the checkpoint's tensor file."""
    if carrier.state is None:
        return {}
    return {f"carried.{i}.{k}": v for i, d in enumerate(carrier.state.layers) for k, v in d.items()}


def carried_state_from_tensors(tensors: dict[str, torch.Tensor], device) -> models.ModelState | None:
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for name, v in tensors.items():
        if name.startswith("carried."):
            _, i, k = name.split(".", 2)
            layers.setdefault(int(i), {})[k] = v.to(device)
    return models.ModelState([layers[i] for i in sorted(layers)]) if layers else None


# ------------------------------------------------------------------------------------------ debate terms
def diversity(activations: list[dict]) -> torch.Tensor:
    """Mean over layers and tokens of (1 + cos(a_t, m_t)) / 2; activations[i] = {"rwkv": (B,T,C), "mamba": (B,T,C)}."""
    terms = [(1 + F.cosine_similarity(act["rwkv"].float(), act["mamba"].float(), dim=-1, eps=1e-8)).mean() / 2
             for act in activations]
    return torch.stack(terms).mean()


def arbiter_ce(gates: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Mean binary CE of each layer's RWKV weight w (B, T, 1 or C) against target tau (B, T) in {0, 0.5, 1}."""
    tau = target.float()[..., None]                                                       # (B, T, 1)
    terms = []
    for w in gates:
        w = w.float()
        ce = -(tau * torch.log(w.clamp_min(1e-8)) + (1 - tau) * torch.log((1 - w).clamp_min(1e-8)))
        terms.append(ce.mean())
    return torch.stack(terms).mean()


@torch.compiler.disable
@torch.no_grad()
def better_branch_target(lm, x: torch.Tensor, y: torch.Tensor, state=None) -> torch.Tensor:
    """tau (B, T) float: 1 where the model with every fusion forced to RWKV alone has the lower next-token CE at
    t, 0 where Mamba alone has, 0.5 on ties (module doc). Eval mode, no gradient; the training mode is restored."""
    was_training = lm.training
    residual = [(b, b.mamba_residual) for b in lm.blocks if getattr(b, "mamba_residual", False)]
    lm.eval()
    try:
        ce = []
        for g in (1.0, 0.0):
            for b, _ in residual:  # RWKV alone: no Mamba output beside the fusion either
                b.mamba_residual = g == 0.0
            with models.force_gate(lm, g):
                logits = lm(x, state=state).logits                                        # (B, T, V)
            ce.append(F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none"))  # (B, T)
    finally:
        lm.train(was_training)
        for b, on in residual:
            b.mamba_residual = on
    return 0.5 * (1 + torch.sign(ce[1] - ce[0]))


class StepLoss(torch.nn.Module):
    """The step's loss with the issue-17 options. forward(x (B,T) int64, y (B,T) int64, reset (B,) bool or None,
    carrier StateCarrier or None) -> (loss 0-dim fp32, {"loss_ce", ["loss_div"], ["loss_arb"]}: detached 0-dim).
    With a carrier the forward starts from its state (rows in `reset` zeroed) and leaves its new state there."""

    def __init__(self, lm, lambda_div: float = 0.0, lambda_arb: float = 0.0):
        super().__init__()
        self.lm, self.lambda_div, self.lambda_arb = lm, float(lambda_div), float(lambda_arb)

    def forward(self, x, y, reset=None, carrier: StateCarrier | None = None):
        state = carrier.take(reset) if carrier is not None else None
        out = self.lm(x, state=state, return_states=self.lambda_arb > 0, return_activations=self.lambda_div > 0)
        if carrier is not None:
            carrier.keep(out.state)
        ce = F.cross_entropy(out.logits.float().reshape(-1, out.logits.size(-1)), y.reshape(-1))
        loss, parts = ce, {"loss_ce": ce.detach()}
        if self.lambda_div > 0:
            div = diversity(out.activations)
            loss = loss + self.lambda_div * div
            parts["loss_div"] = div.detach()
        if self.lambda_arb > 0:
            tau = better_branch_target(self.lm, x, y, state)
            arb = arbiter_ce([ls["gate"] for ls in out.layer_states], tau)
            loss = loss + self.lambda_arb * arb
            parts["loss_arb"] = arb.detach()
        return loss, parts


def step_module(model, cfg) -> torch.nn.Module:
    """What a training step calls: `TokenLoss(model)` when no objective option is on, else `StepLoss`."""
    from gt_pipeline.engine.train import TokenLoss

    if cfg.lambda_div == 0 and cfg.lambda_arb == 0 and not cfg.stateful:
        return TokenLoss(model)
    return StepLoss(model, cfg.lambda_div, cfg.lambda_arb)
