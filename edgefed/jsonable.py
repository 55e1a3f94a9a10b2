"""One JSON-safe view of results (numpy scalars and arrays, non-finite floats) for reports,
status pages and result files (numpy only: device side too)."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["plain", "without_arrays"]


def plain(o: Any) -> Any:
    """JSON-safe: numpy scalars become Python numbers, arrays lists, non-finite floats null (JSON
    has no NaN), anything else unknown its str()."""
    if isinstance(o, dict):
        return {str(k): plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple, set)):
        return [plain(v) for v in o]
    if isinstance(o, np.ndarray):
        return plain(o.tolist())
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, (str, int, float, bool)) or o is None:
        return o
    return str(o)


def without_arrays(ev: dict) -> dict:
    """An evaluation without its per-row arrays (correct, predictions, example_loss, ...)."""
    return {k: v for k, v in ev.items() if not isinstance(v, np.ndarray)}
