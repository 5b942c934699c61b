"""Validation gates G1-G4 and G3.5: the single source of truth for every threshold (DESIGN.md section 6).

G2, S1 and S4 differ from DESIGN.md section 6 / the seeds: G2 bands the initial loss against ln(V)
(an entropy ratio alone passed a confidently wrong init), S1 the per-element RMS of a state and S4 a
ratio of relative state changes (raw norms and variances failed one recurrence by construction); each
band's comment says why.

Each metric has a two-sided band: a pass interval, warn intervals, and everything else (NaN included)
fails. Checks, reports and tests all read the bands from here; nothing else holds a threshold.
This module knows nothing about Dagster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum


class Verdict(str, Enum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    NOT_APPLICABLE = "n/a"

    @staticmethod
    def worst(verdicts: list["Verdict"]) -> "Verdict":
        order = [Verdict.NOT_APPLICABLE, Verdict.PASS, Verdict.WARN, Verdict.FAIL]
        applicable = [v for v in verdicts if v is not Verdict.NOT_APPLICABLE]
        return max(applicable, key=order.index) if applicable else Verdict.NOT_APPLICABLE


@dataclass(frozen=True)
class Interval:
    lo: float = -math.inf
    hi: float = math.inf
    lo_closed: bool = True
    hi_closed: bool = True

    def __contains__(self, v: float) -> bool:
        above = v >= self.lo if self.lo_closed else v > self.lo
        below = v <= self.hi if self.hi_closed else v < self.hi
        return above and below

    def __str__(self) -> str:
        lo = "(" if not self.lo_closed or self.lo == -math.inf else "["
        hi = ")" if not self.hi_closed or self.hi == math.inf else "]"
        return f"{lo}{self.lo:g}, {self.hi:g}{hi}"


@dataclass(frozen=True)
class Band:
    """pass interval, warn intervals; any value in neither (or non-finite) fails."""

    name: str
    description: str
    passing: Interval
    warning: tuple[Interval, ...] = ()

    def classify(self, value: float) -> Verdict:
        if value is None or not math.isfinite(value):
            return Verdict.FAIL
        if value in self.passing:
            return Verdict.PASS
        if any(value in w for w in self.warning):
            return Verdict.WARN
        return Verdict.FAIL

    def describe(self) -> dict[str, str]:
        return {"pass": str(self.passing), "warn": " or ".join(map(str, self.warning)) or "-", "fail": "otherwise"}


# G2: cross-entropy of the freshly initialised model on real validation tokens, compared with ln(V), the
# loss of a uniform prediction: |CE_init - ln V| / ln V. A correct init (small N(0, 0.02) weights, RMSNorm,
# tied head) predicts nearly uniformly, so CE_init sits within 1% of ln V for every registered model
# (0.01-0.8% measured at V = 4096 and 16000; at most 0.6% over all 18 models at both presets, V = 4096). A
# broken init (huge or saturated logits, a mis-scaled head) is confidently wrong and its CE lands above ln V
# by about sigma^2 / 2 for logits of std sigma: a head 4x too large (sigma ~ 1) gives ~3.7% at V = 16000,
# which warns; 7x (sigma ~ 1.7) gives ~15%, which fails. Pass below 2%, warn to 5%, fail above. The seeds' band (entropy in 2.0-5.0 nats) was
# written for a 97-symbol vocabulary, and an entropy ratio alone cannot see a model that is confident
# about the right tokens for the wrong reason; the loss against real targets can.
G2_INIT_LOSS = Band(
    "g2_init_loss", "|initial CE - ln(vocab)| / ln(vocab) on real validation tokens",
    passing=Interval(-math.inf, 0.02), warning=(Interval(0.02, 0.05, lo_closed=False),),
)
# G3: median pre-clip gradient norm over the last 10% of steps (loss must also go down: see g3_verdict).
G3_GRAD_NORM = Band(
    "g3_grad_norm", "median pre-clip grad norm, last 10% of steps",
    passing=Interval(0.5, 1.5), warning=(Interval(-math.inf, 0.5, hi_closed=False), Interval(1.5, 5.0, lo_closed=False)),
)
# G3.5: state health on held-out text.
G35_STATE_COSINE = Band(
    "g3_5_state_cosine", "mean cosine between a layer's state at t and t+64",
    passing=Interval(-math.inf, 0.95, hi_closed=False), warning=(Interval(0.95, 0.99),),
)
G35_EFFECTIVE_RANK = Band(
    "g3_5_effective_rank", "effective rank of stacked states / full rank",
    passing=Interval(0.5, math.inf, lo_closed=False), warning=(Interval(0.2, 0.5),),
)
G35_SATURATION = Band(
    "g3_5_saturation", "share of branch activations with |x| > 5",
    passing=Interval(-math.inf, 0.30, hi_closed=False), warning=(Interval(0.30, 0.50),),
)
# G4: RWKV/Mamba gradient ratio (L2 over all branch parameters), median over the last 10% of steps.
G4_GRAD_RATIO = Band(
    "g4_grad_ratio", "||grad RWKV branch|| / ||grad Mamba branch||, median last 10% of steps",
    passing=Interval(0.3, 3.0),
    warning=(Interval(0.1, 0.3, hi_closed=False), Interval(3.0, 10.0, lo_closed=False)),
)

SATURATION_ABS = 5.0  # |activation| above this counts as saturated (G3.5)
STATE_LAG = 64  # G3.5 compares the state at t with the state at t + STATE_LAG
LAST_FRACTION = 0.10  # G3/G4 look at the first/last 10% of steps

BANDS = {b.name: b for b in (G2_INIT_LOSS, G3_GRAD_NORM, G35_STATE_COSINE, G35_EFFECTIVE_RANK, G35_SATURATION, G4_GRAD_RATIO)}


@dataclass(frozen=True)
class GateResult:
    gate: str
    verdict: Verdict
    value: float | None
    detail: dict

    def as_metadata(self) -> dict:
        return {"value": self.value, "verdict": self.verdict.value, **self.detail}


def g3_verdict(loss_first: float, loss_last: float, grad_norm_last: float) -> tuple[Verdict, dict]:
    """G3: the loss must go down (last 10% below first 10%) and stay finite; then the grad-norm band decides."""
    finite = all(math.isfinite(x) for x in (loss_first, loss_last, grad_norm_last))
    down = finite and loss_last < loss_first
    detail = {"loss_first_10pct": loss_first, "loss_last_10pct": loss_last, "loss_down": down,
              "grad_norm_median_last_10pct": grad_norm_last, **{f"band_{k}": v for k, v in G3_GRAD_NORM.describe().items()}}
    if not down:
        return Verdict.FAIL, detail
    return G3_GRAD_NORM.classify(grad_norm_last), detail


# ---- State tests S1-S4 and graduation (gate_report); definitions from the seeds, made two-sided.
# S1: per-element RMS of each layer's state (norm / sqrt(numel)). The raw norm grows with the state's size
# and each recurrence has its own natural scale: at init RWKV-6's wkv state has RMS ~0.4-0.9 per element
# and Mamba-2's SSM state ~0.003-0.01 (both presets), so one absolute norm band fails one of them by
# construction. Per element, both sit well inside (1e-6, 1e3); below, the state is dead; above, blown up.
S1_STATE_RMS = Band("s1_state_rms", "per-element RMS of each layer's state after real tokens",
                    passing=Interval(1e-6, 1e3, lo_closed=False, hi_closed=False))
S2_STATE_CHANGE = Band("s2_state_change", "relative state change between two different real inputs",
                       passing=Interval(0.01, math.inf, lo_closed=False))
S3_DETERMINISM = Band("s3_determinism", "max abs state difference for the same input twice",
                      passing=Interval(-math.inf, 1e-5, hi_closed=False))
# S4: balance of the two recurrences as the ratio of their RELATIVE state change between two different real
# inputs, ||s(a) - s(b)|| / ||s(a)||, averaged over layers, symmetrised as max(r, 1/r). The seeds compared raw
# state variances, whose ratio is ~1e4 at init from the scales above alone (a 71x "imbalance" was reported
# for the same reason); the relative change is unchanged by rescaling either state and asks whether both
# states respond to the input comparably.
S4_STATE_BALANCE = Band("s4_state_balance", "RWKV/Mamba relative state change ratio, max(r, 1/r)",
                        passing=Interval(-math.inf, 3.0), warning=(Interval(3.0, 10.0, lo_closed=False, hi_closed=False),))
OVERFIT_TARGET_LOSS = 0.5  # graduation: overfit 10 samples below this within OVERFIT_MAX_STEPS
OVERFIT_MAX_STEPS = 500
ROUNDTRIP_MAX_ABS = 1e-5  # checkpoint save -> load: max abs logit difference
