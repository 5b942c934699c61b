"""Validation gates G1-G4 and G3.5: the single source of truth for every threshold (DESIGN.md section 6).

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


# G2: mean next-token entropy of the initialised model over ln(vocab): a fresh model should be near uniform.
G2_ENTROPY_RATIO = Band(
    "g2_entropy_ratio", "mean next-token entropy at init / ln(vocab)",
    passing=Interval(0.90, math.inf), warning=(Interval(0.75, 0.90, hi_closed=False),),
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

BANDS = {b.name: b for b in (G2_ENTROPY_RATIO, G3_GRAD_NORM, G35_STATE_COSINE, G35_EFFECTIVE_RANK, G35_SATURATION, G4_GRAD_RATIO)}


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
S1_STATE_NORM = Band("s1_state_norm", "norm of each layer's state after 32 real tokens",
                     passing=Interval(1e-3, 1e3, lo_closed=False, hi_closed=False))
S2_STATE_CHANGE = Band("s2_state_change", "relative state change between two different real inputs",
                       passing=Interval(0.01, math.inf, lo_closed=False))
S3_DETERMINISM = Band("s3_determinism", "max abs state difference for the same input twice",
                      passing=Interval(-math.inf, 1e-5, hi_closed=False))
S4_STATE_BALANCE = Band("s4_state_balance", "RWKV/Mamba state variance ratio, max(r, 1/r)",
                        passing=Interval(-math.inf, 3.0), warning=(Interval(3.0, 10.0, lo_closed=False, hi_closed=False),))
OVERFIT_TARGET_LOSS = 0.5  # graduation: overfit 10 samples below this within OVERFIT_MAX_STEPS
OVERFIT_MAX_STEPS = 500
ROUNDTRIP_MAX_ABS = 1e-5  # checkpoint save -> load: max abs logit difference
