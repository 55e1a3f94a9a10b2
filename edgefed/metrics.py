"""Evaluation statistics shared by the demo, the simulator and the learning check."""
from __future__ import annotations

import math

import numpy as np

__all__ = ["paired_gain", "wilson_interval"]


def paired_gain(before_correct, after_correct, z: float = 1.96) -> dict:
    """Accuracy gain on the SAME examples with a 95% interval from the paired differences
    (tighter and more honest than comparing two independent intervals)."""
    b = np.asarray(before_correct, dtype=np.float64)
    a = np.asarray(after_correct, dtype=np.float64)
    if b.shape != a.shape or b.size == 0:
        raise ValueError("paired_gain needs two equal-length, non-empty correctness vectors")
    d = a - b
    n = d.size
    se = d.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
    return {"n": int(n), "before": float(b.mean()), "after": float(a.mean()), "gain": float(d.mean()),
            "ci_low": float(d.mean() - z * se), "ci_high": float(d.mean() + z * se),
            "fixed": int(((b == 0) & (a == 1)).sum()), "broken": int(((b == 1) & (a == 0)).sum())}


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy k/n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (mid - half, mid + half)
