"""Small, dependency-free statistics for benchmark samples: quantiles, IQR, a bootstrap
confidence interval of the median. Deterministic (the bootstrap is seeded), so the same
samples always give the same summary.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence, Tuple


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation between order statistics
    (the "type 7" rule of R and NumPy's default)."""
    if not values:
        raise ValueError("quantile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be within 0..1, not {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return quantile(values, 0.5)


def bootstrap_ci(values: Sequence[float], level: float = 0.95, resamples: int = 2000,
                 seed: int = 12345) -> Tuple[float, float]:
    """A percentile-bootstrap confidence interval of the median."""
    if not values:
        raise ValueError("bootstrap of no values")
    if len(values) == 1:
        return values[0], values[0]
    rng = random.Random(seed)
    n = len(values)
    meds = sorted(median([values[rng.randrange(n)] for _ in range(n)]) for _ in range(resamples))
    alpha = (1.0 - level) / 2.0
    return quantile(meds, alpha), quantile(meds, 1.0 - alpha)


@dataclass(frozen=True)
class Summary:
    """Median with spread of one subject's samples (all in the samples' unit)."""

    n: int
    median: float
    q1: float
    q3: float
    iqr: float
    ci_low: float
    ci_high: float
    min: float
    max: float
    mean: float

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)


def summarize(values: Sequence[float], level: float = 0.95) -> Optional[Summary]:
    """The summary of ``values``, or None when there are none."""
    vals = [float(v) for v in values]
    if not vals:
        return None
    q1, q3 = quantile(vals, 0.25), quantile(vals, 0.75)
    lo, hi = bootstrap_ci(vals, level)
    return Summary(n=len(vals), median=median(vals), q1=q1, q3=q3, iqr=q3 - q1, ci_low=lo,
                   ci_high=hi, min=min(vals), max=max(vals), mean=sum(vals) / len(vals))
