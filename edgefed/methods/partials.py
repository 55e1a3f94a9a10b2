"""Exact sample-weighted means as round accumulators that split into partial sums.

A round's mean sum_i n_i x_i / sum_i n_i is kept as exact sums (edgefed.exactsum): the result
is the same bits whatever the order of the updates and however they are split between
aggregation workers whose partials are merged (`partial()` -> tensors -> `merge()`), and equal
to one accumulator that was given every update. The division by the total weight happens once,
in finalize. Used by fedkseed (per seed), fedavg and fedmezo (dense) when their aggregator is
the plain mean.

Partial tensors: "meta" (u32 pairs of i64: updates, total weight, size), the exact sums
("<name>.rows/.limbs/.base", ExactSum.to_tensors) and, for seeds, "counts.rows" (u32) +
"counts.values" (i64 as u32 pairs).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from ..exactsum import ExactSum
from ..protocol import RoundDelta, Tensor, Update
from .base import MethodState, RoundAccumulator

__all__ = ["DenseExactMean", "DenseRunningMean", "SeedExactMean", "dense_mean", "exact_dense", "split_refusal", "DENSE_NOT_EXACT"]

META = "meta"


def _i64_tensor(name: str, values) -> Tensor:
    return Tensor(name, np.ascontiguousarray(np.asarray(values, "<i8").reshape(-1)).view("<u4"))


def _i64_of(t: Tensor) -> np.ndarray:
    if t.dtype != "u32" or t.data.size % 2:
        raise ValueError(f"partial tensor {t.name!r} must hold u32 pairs")
    return np.ascontiguousarray(t.data.reshape(-1), dtype="<u4").view("<i8")


def _by_name(tensors: Sequence[Tensor]) -> dict:
    out = {}
    for t in tensors:
        if t.name in out:
            raise ValueError(f"partial tensor {t.name!r} appears twice")
        out[t.name] = t
    return out


class _ExactBase(RoundAccumulator):
    def __init__(self) -> None:
        self.n = 0        # updates added (minus those subtracted)
        self.weight = 0   # sum of their num_samples

    @property
    def count(self) -> int:
        return self.n

    def _meta(self, size: int) -> Tensor:
        return _i64_tensor(META, [self.n, self.weight, size])

    def _read_meta(self, ts: dict) -> tuple[int, int, int]:
        if META not in ts:
            raise ValueError("partial has no 'meta' tensor")
        m = _i64_of(ts[META])
        if m.size != 3 or m[0] < 0 or m[1] < 0 or m[2] < 0:
            raise ValueError("partial meta must be [updates >= 0, weight >= 0, size >= 0]")
        return int(m[0]), int(m[1]), int(m[2])

    def _check_total(self) -> None:
        if self.n <= 0 or self.weight <= 0:
            raise ValueError("aggregate needs at least one update (the engine enforces min_devices >= 1)")


class DenseExactMean(_ExactBase):
    """sum_i n_i clip(x_i) / sum_i n_i over dense float vectors, exact. `vector(update)` gives an
    update's vector (float32 / float64, already clipped as the job says); `finish(mean float64)`
    turns the mean into (state, delta)."""

    def __init__(self, vector: Callable[[Update], np.ndarray],
                 finish: Callable[[np.ndarray], tuple[MethodState, RoundDelta]]):
        super().__init__()
        self.vector, self.finish = vector, finish
        self.sum: Optional[ExactSum] = None

    def _sum_of(self, size: int) -> ExactSum:
        if self.sum is None:
            self.sum = ExactSum(size)
        elif self.sum.size != size:
            raise ValueError(f"an update of {size} values in a round of {self.sum.size}")
        return self.sum

    def add(self, update: Update) -> None:
        d = np.asarray(self.vector(update)).reshape(-1)
        self._sum_of(d.size).add(d, int(update.num_samples))
        self.n += 1
        self.weight += int(update.num_samples)

    def finalize(self):
        self._check_total()
        assert self.sum is not None
        return self.finish(self.sum.to_float() / float(self.weight))

    def partial(self) -> list[Tensor]:
        size = 0 if self.sum is None else self.sum.size
        return [self._meta(size), *(ExactSum(0) if self.sum is None else self.sum).to_tensors("sum")]

    def merge(self, tensors: Sequence[Tensor], negate: bool = False) -> None:
        ts = _by_name(tensors)
        n, w, size = self._read_meta(ts)
        if n == 0:
            return
        other = ExactSum.from_tensors(size, tensors, "sum")
        self._sum_of(size).merge(other, negate=negate)
        sign = -1 if negate else 1
        self.n += sign * n
        self.weight += sign * w


class DenseRunningMean(RoundAccumulator):
    """sum_i n_i x_i / sum_i n_i in a float64 running sum, in arrival order (which the store keeps,
    so a replay gives the same bits): one float64 per trainable, the cost of a vector add per
    update. What dense jobs use unless they ask for exact sums (exact_dense)."""

    def __init__(self, vector: Callable[[Update], np.ndarray],
                 finish: Callable[[np.ndarray], tuple[MethodState, RoundDelta]]):
        self.vector, self.finish = vector, finish
        self.total: Optional[np.ndarray] = None
        self.weight = 0

    def add(self, update: Update) -> None:
        d = np.asarray(self.vector(update), np.float64).reshape(-1) * float(update.num_samples)
        if self.total is not None and self.total.size != d.size:
            raise ValueError(f"an update of {d.size} values in a round of {self.total.size}")
        self.total = d if self.total is None else self.total + d
        self.weight += int(update.num_samples)

    def finalize(self):
        if self.total is None:
            raise ValueError("aggregate needs at least one update (the engine enforces min_devices >= 1)")
        return self.finish(self.total / float(self.weight))


# Why dense sums are exact only on request: the exact accumulator holds ~8 int64 per trainable
# (full fine-tuning of a 135M model: ~8.6 GB on the server, against 1 GB for a float64 sum) and
# adds ~0.4 s per million values per update; seed-scalar methods (K values) pay nothing worth noting.
DENSE_NOT_EXACT = ("dense deltas are summed in float64 in arrival order unless the job sets exact_sum=1 "
                   "(exact fixed-point sums that any split between workers merges to the same bits, at ~64 B "
                   "of server memory per trainable and ~0.4 s per million values per update): create the job "
                   "with --param exact_sum=1 to use workers")


def split_refusal(params, *, dense: bool) -> Optional[str]:
    """Why a plain-mean job cannot be split between aggregation workers (None: it can): a robust
    aggregator, central DP, or (dense) sums that are not exact."""
    from ..security import dp
    from ..security.robust import RobustConfig
    cfg = RobustConfig.from_params(params, dense=dense)
    if cfg.aggregator != "mean":
        return (f"aggregator={cfg.aggregator} looks at every update together (a robust statistic has no "
                f"partial sums); use aggregator=mean with workers")
    if dense and not exact_dense(params):
        return DENSE_NOT_EXACT
    if dp.DPConfig.from_params(params).central:
        return "dp_mode=central clips and noises the whole round on one server; use dp_mode=local with workers"
    return None


def exact_dense(params) -> bool:
    """Whether a dense job sums exactly (job param exact_sum, default 0)."""
    v = params.get("exact_sum", 0)
    if str(v).lower() in ("0", "1", "true", "false", "none", ""):
        return str(v).lower() in ("1", "true")
    raise ValueError(f"exact_sum={v!r}: use 1 (exact sums, needed for aggregation workers) or 0")


def dense_mean(params, vector: Callable[[Update], np.ndarray],
               finish: Callable[[np.ndarray], tuple[MethodState, RoundDelta]]) -> RoundAccumulator:
    """The sample-weighted mean of dense vectors: exact (DenseExactMean) when the job's params ask
    for it, else a float64 running sum (DenseRunningMean)."""
    return DenseExactMean(vector, finish) if exact_dense(params) else DenseRunningMean(vector, finish)


class SeedExactMean(_ExactBase):
    """FedKSeed's mean aggregator, exact: per seed index j, G_j = sum_i n_i g_ij / sum_i n_i
    (a device that did not draw j adds 0), plus FedKSeed-Pro's per-round statistics: the exact
    sum of |g_ij| and the count of the updates that drew j. `pairs(update)` gives its (seeds,
    values float64, already clipped as the job says); `finish(G, abs_sum, counts)` -> (state,
    delta)."""

    def __init__(self, k: int, pairs: Callable[[Update], tuple[np.ndarray, np.ndarray]],
                 finish: Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[MethodState, RoundDelta]]):
        super().__init__()
        self.k, self.pairs, self.finish = int(k), pairs, finish
        self.sum = ExactSum(self.k)
        self.abs = ExactSum(self.k)
        self.counts = np.zeros(self.k, np.int64)

    def add(self, update: Update) -> None:
        seeds, g = self.pairs(update)
        idx = np.asarray(seeds, np.int64)
        g = np.asarray(g, np.float64)
        self.sum.add(g, int(update.num_samples), idx)
        self.abs.add(np.abs(g), 1, idx)
        np.add.at(self.counts, idx, 1)
        self.n += 1
        self.weight += int(update.num_samples)

    def finalize(self):
        self._check_total()
        return self.finish(self.sum.to_float() / float(self.weight), self.abs.to_float(), self.counts.copy())

    def partial(self) -> list[Tensor]:
        rows = np.flatnonzero(self.counts)
        return [self._meta(self.k), *self.sum.to_tensors("sum"), *self.abs.to_tensors("abs"),
                Tensor("counts.rows", rows.astype(np.uint32)), _i64_tensor("counts.values", self.counts[rows])]

    def merge(self, tensors: Sequence[Tensor], negate: bool = False) -> None:
        ts = _by_name(tensors)
        n, w, size = self._read_meta(ts)
        if size != self.k:
            raise ValueError(f"partial for K={size}, this round has K={self.k}")
        s = ExactSum.from_tensors(self.k, tensors, "sum")
        a = ExactSum.from_tensors(self.k, tensors, "abs")
        if "counts.rows" not in ts or "counts.values" not in ts or ts["counts.rows"].dtype != "u32":
            raise ValueError("partial needs counts.rows (u32) and counts.values")
        rows = ts["counts.rows"].data.reshape(-1).astype(np.int64)
        vals = _i64_of(ts["counts.values"])
        if rows.size != vals.size or (rows.size and int(rows.max()) >= self.k) or np.any(vals < 0):
            raise ValueError("partial counts out of range")
        sign = -1 if negate else 1
        self.sum.merge(s, negate=negate)
        self.abs.merge(a, negate=negate)
        np.add.at(self.counts, rows, sign * vals)
        self.n += sign * n
        self.weight += sign * w
