"""Plots written to files (benchmarks, the demo's rounds, data reports): matplotlib on the Agg
backend, since hosts and devices have no display; matplotlib is a host extra, so `pyplot()`
answers None where it is not installed and the caller skips its plot."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

__all__ = ["pyplot", "save"]


def pyplot() -> Optional[Any]:
    """matplotlib.pyplot on the Agg backend, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save(fig, path: str | Path, dpi: int = 110, tight: str = "layout") -> Path:
    """Write fig to path (its folder made) and free it. tight="bbox" keeps an outside legend."""
    import matplotlib.pyplot as plt

    path = Path(path)
    if tight == "layout":
        fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, **({"bbox_inches": "tight"} if tight == "bbox" else {}))
    plt.close(fig)
    return path
