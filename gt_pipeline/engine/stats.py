"""Confidence intervals for the reports: bootstrap over windows, Student t over seeds, paired differences.

Plain numpy (no scipy, no Dagster). Every interval is two-sided at `level` (default 95%).

- `mean_ci(values)`: the CI of a mean over independent units (validation windows or documents): the
  percentile bootstrap (`bootstrap_mean_ci`, seeded, so a report recomputed on the same numbers gives the
  same interval) from BOOTSTRAP_MIN_N units on, Student t below, where the percentile bootstrap is too
  narrow (simulated coverage of a nominal 95% interval on normal data: 0.80 at n = 4, 0.88 at n = 8,
  0.92 at n = 16; t: 0.95).
- `paired_mean_diff(a, b)`: mean(a - b) over paired units (windows scored by two models), as `mean_ci`.
- `t_ci(values)`: mean +/- t_{1-a/2, n-1} * s / sqrt(n), for a handful of seeds (the bootstrap is
  unreliable at n = 2..5). n = 1 gives a NaN half-width: one seed says nothing about seed noise.
- `paired_diff(a, b)`: a - b over the keys both share (seeds), t interval of the per-key differences.
- `wilson_ci(hits, n)`: Wilson score interval of a proportion (NIAH accuracy over trials).
- `t_quantile(p, df)`: the Student t quantile from its exact CDF for integer df (Abramowitz & Stegun
  26.7.3-26.7.4) inverted by bisection.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np

DEFAULT_LEVEL = 0.95
DEFAULT_BOOT = 2000
BOOTSTRAP_MIN_N = 30  # below this many units `mean_ci` uses Student t (module docstring)


@dataclass(frozen=True)
class CI:
    """A mean with its two-sided interval [lo, hi] at `level`, from `n` units by `method`."""

    mean: float
    lo: float
    hi: float
    n: int
    level: float
    method: str

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def contains(self, value: float) -> bool:
        """True when `value` lies inside the interval; False for a NaN interval (nothing is known)."""
        return bool(self.lo <= value <= self.hi)

    def as_dict(self, prefix: str = "") -> dict[str, float | int | str]:
        return {f"{prefix}{k}": v for k, v in asdict(self).items() if k not in ("level", "method")}

    def __str__(self) -> str:
        if not math.isfinite(self.lo):
            return f"{self.mean:.4f} (n={self.n}, no CI)"
        return f"{self.mean:.4f} [{self.lo:.4f}, {self.hi:.4f}]"


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), e.g. 0.95; got {level!r}")


def _finite_1d(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError(f"{what}: no values to summarise")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{what}: {int((~np.isfinite(v)).sum())} of {v.size} values are NaN/inf")
    return v


def bootstrap_mean_ci(values: Sequence[float] | np.ndarray, *, level: float = DEFAULT_LEVEL,
                      n_boot: int = DEFAULT_BOOT, seed: int = 0) -> CI:
    """Percentile bootstrap CI of the mean of `values` (float [n], one per independent unit)."""
    _check_level(level)
    v = _finite_1d(values, "bootstrap_mean_ci")
    if n_boot < 100:
        raise ValueError(f"n_boot must be >= 100 for a stable percentile interval, got {n_boot}")
    mean = float(v.mean())
    if v.size == 1:
        return CI(mean, math.nan, math.nan, 1, level, "bootstrap")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n_boot, v.size))
    means = v[idx].mean(axis=1)
    a = (1 - level) / 2
    lo, hi = np.quantile(means, [a, 1 - a])
    return CI(mean, float(lo), float(hi), int(v.size), level, "bootstrap")


def t_cdf_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer df >= 1 (exact finite series, A&S 26.7.3/26.7.4)."""
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be a positive integer, got {df!r}")
    t = abs(float(t))
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 1:
        if df == 1:
            return 2 * theta / math.pi
        term, acc = 1.0, 1.0
        for k in range(1, (df - 3) // 2 + 1):  # 1 + 2/3 c^2 + (2*4)/(3*5) c^4 + ...
            term *= (2 * k) / (2 * k + 1) * c2
            acc += term
        return 2 / math.pi * (theta + s * math.cos(theta) * acc)
    term, acc = 1.0, 1.0
    for k in range(1, (df - 2) // 2 + 1):  # 1 + 1/2 c^2 + (1*3)/(2*4) c^4 + ...
        term *= (2 * k - 1) / (2 * k) * c2
        acc += term
    return s * acc


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p in (0.5, 1)) of Student's t with integer df: bisection on the exact CDF."""
    if not 0.5 < p < 1:
        raise ValueError(f"t_quantile needs p in (0.5, 1), got {p!r}")
    target = 2 * p - 1  # P(|T| <= q)
    lo, hi = 0.0, 1.0
    while t_cdf_two_sided(hi, df) < target:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf_two_sided(mid, df) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2


def t_ci(values: Sequence[float] | np.ndarray, *, level: float = DEFAULT_LEVEL) -> CI:
    """Student t CI of the mean of `values` (float [n], e.g. one validation loss per seed)."""
    _check_level(level)
    v = _finite_1d(values, "t_ci")
    mean = float(v.mean())
    if v.size == 1:
        return CI(mean, math.nan, math.nan, 1, level, "t")
    half = t_quantile(1 - (1 - level) / 2, v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return CI(mean, mean - half, mean + half, int(v.size), level, "t")


def paired_diff(a: Mapping, b: Mapping, *, level: float = DEFAULT_LEVEL) -> CI:
    """t CI of the mean of a[k] - b[k] over the keys (seeds) both have; ValueError if they share none."""
    keys = sorted(set(a) & set(b), key=str)
    if not keys:
        raise ValueError(f"paired_diff: no common keys (seeds) between {sorted(a, key=str)} and {sorted(b, key=str)}")
    ci = t_ci([a[k] - b[k] for k in keys], level=level)
    return CI(ci.mean, ci.lo, ci.hi, ci.n, level, "paired t")


def mean_ci(values: Sequence[float] | np.ndarray, *, level: float = DEFAULT_LEVEL, n_boot: int = DEFAULT_BOOT,
            seed: int = 0) -> CI:
    """CI of the mean of `values` (float [n], one per independent unit): bootstrap for n >= BOOTSTRAP_MIN_N,
    Student t below (the module docstring says why)."""
    v = _finite_1d(values, "mean_ci")
    return bootstrap_mean_ci(v, level=level, n_boot=n_boot, seed=seed) if v.size >= BOOTSTRAP_MIN_N else t_ci(v, level=level)


def paired_mean_diff(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *,
                     level: float = DEFAULT_LEVEL, n_boot: int = DEFAULT_BOOT, seed: int = 0) -> CI:
    """CI of mean(a - b) where a[i], b[i] are measured on the same unit i (window), as `mean_ci`."""
    a, b = _finite_1d(a, "paired_mean_diff a"), _finite_1d(b, "paired_mean_diff b")
    if a.shape != b.shape:
        raise ValueError(f"paired_mean_diff: a has {a.size} units, b has {b.size}; they must be paired")
    ci = mean_ci(a - b, level=level, n_boot=n_boot, seed=seed)
    return CI(ci.mean, ci.lo, ci.hi, ci.n, level, f"paired {ci.method}")


def wilson_ci(hits: int, n: int, *, level: float = DEFAULT_LEVEL) -> CI:
    """Wilson score interval of a proportion hits / n (NIAH accuracy): stays inside [0, 1] and is not
    degenerate at 0 or n hits, unlike the bootstrap or the normal approximation."""
    _check_level(level)
    if not (isinstance(n, int) and n >= 1 and isinstance(hits, int) and 0 <= hits <= n):
        raise ValueError(f"wilson_ci needs integers 0 <= hits <= n, n >= 1; got hits={hits!r}, n={n!r}")
    z = _normal_quantile(1 - (1 - level) / 2)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return CI(p, max(0.0, centre - half), min(1.0, centre + half), n, level, "wilson")


def _normal_quantile(p: float) -> float:
    """Standard normal p-quantile (p in (0.5, 1)) by bisection on erf."""
    lo, hi = 0.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def verdict_of_difference(ci: CI) -> str:
    """Plain words for a difference CI: 'inside the noise' when it contains 0 or is unknown."""
    if not math.isfinite(ci.lo):
        return "unknown (one seed: no interval)"
    if ci.contains(0.0):
        return "inside the noise (CI contains 0)"
    return "lower (CI below 0)" if ci.hi < 0 else "higher (CI above 0)"
