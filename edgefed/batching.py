"""Which rows each local step trains on: uniform draws, optionally grouped by length.

A batch is padded to its longest row, and a forward pass costs about its padded token count
(SmolLM2-135M, batch 8, one ONNX Runtime thread: 0.45 s at 36 tokens, 0.59 s at 48, 0.76 s at
60). Random batches of 8 sentiment rows pad to 54 tokens on average while the rows hold 38
(61 and 47 with the instruction template): benchmarks/length_buckets.py.

With `buckets` = M > 1 a device draws M batches' rows at once (uniformly, without replacement),
sorts them by token length and cuts them into M batches, run in random order. Every row is as
likely to be drawn as before and each of the M steps still sees `batch_size` distinct rows; the
batches are only grouped so that rows of like length share one, which pads less. M = 1 draws
exactly as the trainer always did, so jobs without the setting replay bit for bit.

M = 8 made ZO steps 1.30-1.35x faster on the sentiment rows. It is a job param, not a default:
per forward pass it learned no better there, and two demos with it ended lower in the same time
(docs/results.md "Length buckets").
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

__all__ = ["row_batches", "check_buckets"]


def check_buckets(value) -> int:
    """The `length_buckets` job param as an int >= 1, or a ValueError saying what to pass."""
    try:
        m = int(value)
        ok = m == float(value)
    except (TypeError, ValueError):
        ok = False
    if not ok or m < 1:
        raise ValueError(f"length_buckets={value!r} must be a whole number >= 1 (1: off; 8 groups 8 batches' "
                         "rows by length, which cut padding by a fifth to a quarter on the sentiment rows)")
    return m


def row_batches(gen: np.random.Generator, n_rows: int, batch_size: int, buckets: int = 1,
                length_of: Callable[[int], int] | None = None) -> Iterator[np.ndarray]:
    """Endless row-index batches of `batch_size` out of `n_rows` rows, drawn from `gen`.

    buckets = 1: each batch is `gen.choice(n_rows, batch_size, replace=False)`, nothing else drawn.
    buckets = M > 1: M * batch_size rows (at most every row) drawn at once, sorted by
    `length_of(row)` (ties keep draw order), cut into batches, yielded in a random order. Each
    row's length is asked for once (a length means tokenising the row)."""
    buckets = check_buckets(buckets)
    if batch_size < 1 or n_rows < batch_size:
        raise ValueError(f"batch_size {batch_size} needs at least that many rows, got {n_rows}")
    if buckets > 1 and length_of is None:
        raise ValueError("length buckets need length_of(row)")
    m = min(buckets, n_rows // batch_size)
    lengths: dict[int, int] = {}
    while True:
        if m == 1:
            yield gen.choice(n_rows, size=batch_size, replace=False)
            continue
        pick = gen.choice(n_rows, size=m * batch_size, replace=False)
        rows = pick.tolist()
        for i in rows:
            if i not in lengths:
                lengths[i] = int(length_of(i))
        order = np.argsort(np.array([lengths[i] for i in rows], dtype=np.int64), kind="stable")
        groups = pick[order].reshape(m, batch_size)
        for g in gen.permutation(m):
            yield groups[g]
