"""Label names -> class indices of an artifact's label list (device side: numpy only)."""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from .errors import DataError
from .records import Example

__all__ = ["label_set", "label_targets"]


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


def label_set(examples: Iterable[Example]) -> list[str]:
    """Sorted unique label names (numerically when every name is an integer string)."""
    names = {e.label for e in examples}
    if names and all(_is_int(n) for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def label_targets(examples: Iterable[Example], labels: Sequence[str]) -> np.ndarray:
    """int64 indices of each example's label in `labels` (an artifact's manifest task.labels).

    A name missing from `labels` that is an integer string i with 0 <= i < len(labels) maps to
    i: Hugging Face ClassLabel data exported as plain ints uses that convention."""
    pos = {name: i for i, name in enumerate(labels)}
    out = []
    for e in examples:
        i = pos.get(e.label)
        if i is None and _is_int(e.label) and 0 <= int(e.label) < len(labels):
            i = int(e.label)
        if i is None:
            where = f"{e.origin}: " if e.origin else ""
            raise DataError(f"{where}label {e.label!r} is not one of the artifact's labels "
                            f"{list(labels)}; re-export the artifact with classify:labels=auto "
                            f"--data FILE or fix the data")
        out.append(i)
    return np.array(out, dtype=np.int64)
