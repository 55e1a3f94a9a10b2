"""Reading a job's numeric params (`--param KEY=VALUE`) with errors that name the param, so
the job's owner knows what to fix (numpy-free, device side too)."""
from __future__ import annotations

import math
from typing import Any, Mapping

__all__ = ["number"]


def number(params: Mapping[str, Any], key: str, default: float) -> float:
    """params[key] (or default) as a finite float; ValueError names the param otherwise."""
    v = params.get(key, default)
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"job param {key}={v!r} must be a number") from None
    if not math.isfinite(x):
        raise ValueError(f"job param {key}={v!r} must be finite")
    return x
