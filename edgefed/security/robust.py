"""Robust aggregation and update bounds for the server strategies (pure numpy, deterministic).

Every function here is a pure function of its arguments: given the same values in the same
order (the engine orders a round's updates by device id) it returns the same bits, so a replay
of the accepted-update log reproduces the global state exactly. Median, trimmed mean and Krum
are also independent of the order of the devices up to ties (Krum breaks a tie in its score
by the position, i.e. the device order).

Aggregators (`params["aggregator"]`, see `RobustConfig.from_params`):

- ``mean``: the sample-weighted mean (FedAvg); the default and what the methods always did.
- ``median``: coordinate-wise median (Yin et al., 2018), one vote per device.
- ``trimmed_mean``: coordinate-wise mean after dropping the ``floor(trim * n)`` smallest and
  largest values of each coordinate (Yin et al., 2018), one vote per device.
- ``krum`` / ``multi_krum`` (dense updates only): the update(s) closest to their ``n - f - 2``
  nearest neighbours (Blanchard et al., 2017); multi-Krum averages the ``m`` best
  (``krum_m``, default ``n - f``).

`aggregate_sparse` is the FedKSeed form: each device reports values for a few seed indices
only, and the statistic of a seed is taken over the devices that used it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..job_params import number as _number

__all__ = ["AGGREGATORS", "DENSE_ONLY", "RobustConfig", "trim_count", "min_voters", "median",
           "trimmed_mean", "krum_scores", "krum", "multi_krum", "aggregate_dense",
           "aggregate_sparse", "clip_to_norm"]

AGGREGATORS = ("mean", "median", "trimmed_mean", "krum", "multi_krum")
DENSE_ONLY = ("krum", "multi_krum")

DEFAULT_TRIM = 0.2
DEFAULT_BYZANTINE = 1
DEFAULT_SPARSE_CLIP = 3.0


@dataclass(frozen=True)
class RobustConfig:
    """The job's aggregation settings, read from JobConfig.params (with defaults)."""
    aggregator: str = "mean"
    trim: float = DEFAULT_TRIM            # trimmed_mean: fraction dropped at EACH end
    byzantine: int = DEFAULT_BYZANTINE    # krum / multi_krum: f, the attackers tolerated
    krum_m: int = 0                       # multi_krum: updates averaged (0: n - f)
    norm_clip: float = 0.0                # > 0: scale each device's vector to L2 norm <= this
    sparse_clip: float = DEFAULT_SPARSE_CLIP  # sparse fallback: clip to this x the round's median |g|

    @classmethod
    def from_params(cls, params: Mapping[str, Any], *, dense: bool) -> "RobustConfig":
        agg = str(params.get("aggregator", "mean")).strip().lower()
        allowed = AGGREGATORS if dense else tuple(a for a in AGGREGATORS if a not in DENSE_ONLY)
        if agg not in allowed:
            extra = (" (krum and multi_krum need dense updates: they compare whole update vectors, "
                     "which FedKSeed's per-seed scalars are not)" if agg in DENSE_ONLY else "")
            raise ValueError(f"aggregator {agg!r} unknown for this method; use one of "
                             f"{', '.join(allowed)}{extra}")
        trim = _number(params, "trim", DEFAULT_TRIM)
        if not 0.0 <= trim < 0.5:
            raise ValueError(f"trim={trim} must be in [0, 0.5): the fraction dropped at each end")
        f = _number(params, "byzantine", DEFAULT_BYZANTINE)
        if f < 0 or f != int(f):
            raise ValueError(f"byzantine={f} must be a whole number >= 0")
        m = _number(params, "krum_m", 0)
        if m < 0 or m != int(m):
            raise ValueError(f"krum_m={m} must be a whole number >= 0 (0: n - byzantine)")
        norm_clip = _number(params, "norm_clip", 0.0)
        if norm_clip < 0:
            raise ValueError(f"norm_clip={norm_clip} must be >= 0 (0: off)")
        sparse_clip = _number(params, "sparse_clip", DEFAULT_SPARSE_CLIP)
        if sparse_clip < 0:
            raise ValueError(f"sparse_clip={sparse_clip} must be >= 0 (0: drop seeds with too few devices)")
        return cls(agg, trim, int(f), int(m), norm_clip, sparse_clip)


# --------------------------------------------------------------------------- helpers
def trim_count(n: int, trim: float) -> int:
    """Values dropped at each end of n by a trimmed mean (never all of them)."""
    t = int(math.floor(trim * n))
    return min(t, (n - 1) // 2)


def min_voters(cfg: RobustConfig) -> int:
    """Fewest values a per-coordinate robust statistic needs to be able to outvote one outlier:
    3 for the median; for the trimmed mean the smallest n >= 3 with trim_count(n) >= 1; 1 for the
    mean (and a trimmed mean with trim 0)."""
    if cfg.aggregator == "median":
        return 3
    if cfg.aggregator == "trimmed_mean":
        if cfg.trim <= 0:
            return 1
        n = 3
        while trim_count(n, cfg.trim) < 1:
            n += 1
        return n
    return 1


def clip_to_norm(x: np.ndarray, bound: float) -> np.ndarray:
    """x (float64) scaled down to L2 norm <= bound (unchanged if already within, or bound <= 0)."""
    x = np.asarray(x, np.float64)
    if bound <= 0:
        return x
    norm = float(np.sqrt(np.dot(x, x)))
    return x * (bound / norm) if norm > bound else x


def _stack(updates: Sequence[np.ndarray]) -> np.ndarray:
    if not len(updates):
        raise ValueError("no updates to aggregate")
    x = np.stack([np.asarray(u, np.float64).reshape(-1) for u in updates])
    return x


# --------------------------------------------------------------------------- dense
def median(updates: Sequence[np.ndarray]) -> np.ndarray:
    """Coordinate-wise median (mean of the two middle values for an even count)."""
    x = np.sort(_stack(updates), axis=0)
    n = x.shape[0]
    return 0.5 * (x[(n - 1) // 2] + x[n // 2])


def trimmed_mean(updates: Sequence[np.ndarray], trim: float = DEFAULT_TRIM) -> np.ndarray:
    """Coordinate-wise mean of the values left after dropping trim_count(n, trim) at each end."""
    x = np.sort(_stack(updates), axis=0)
    n = x.shape[0]
    t = trim_count(n, trim)
    kept = x[t:n - t]
    out = kept[0].copy()
    for row in kept[1:]:  # an explicit order: bits do not depend on numpy's summation strategy
        out += row
    return out / kept.shape[0]


def krum_scores(updates: Sequence[np.ndarray], f: int) -> np.ndarray:
    """Krum score of each update: the sum of squared L2 distances to its n - f - 2 nearest others."""
    x = _stack(updates)
    n = x.shape[0]
    nb = n - f - 2
    if nb < 1:
        raise ValueError(f"krum needs n >= 2f + 3 updates (n={n}, f={f})")
    d = np.zeros((n, n), np.float64)
    for i in range(n):
        for j in range(i + 1, n):
            diff = x[i] - x[j]
            d[i, j] = d[j, i] = float(np.dot(diff, diff))
    scores = np.empty(n, np.float64)
    for i in range(n):
        others = np.sort(np.delete(d[i], i))
        scores[i] = float(np.sum(others[:nb]))
    return scores


def krum(updates: Sequence[np.ndarray], f: int) -> np.ndarray:
    """The update with the lowest Krum score (ties: the first in the given order)."""
    return _stack(updates)[int(np.argmin(krum_scores(updates, f)))].copy()


def multi_krum(updates: Sequence[np.ndarray], f: int, m: int = 0) -> np.ndarray:
    """Mean of the m updates with the lowest Krum scores (m = 0: n - f), summed in the given order."""
    x = _stack(updates)
    n = x.shape[0]
    m = m or n - f
    m = max(1, min(m, n))
    keep = np.sort(np.argsort(krum_scores(updates, f), kind="stable")[:m])
    out = x[keep[0]].copy()
    for i in keep[1:]:
        out += x[i]
    return out / m


def aggregate_dense(updates: Sequence[np.ndarray], weights: Sequence[float], cfg: RobustConfig
                    ) -> np.ndarray:
    """One aggregate (float64) of n equally shaped update vectors under the job's aggregator.

    mean: weighted by `weights` (num_samples). The robust ones give each device one vote. Krum
    needs n >= 2f + 3; with fewer updates it falls back to the coordinate-wise median."""
    vecs = [clip_to_norm(u, cfg.norm_clip) for u in updates]
    if cfg.aggregator == "mean":
        total = float(sum(weights))
        out = None
        for v, w in zip(vecs, weights):
            d = v * (w / total)
            out = d if out is None else out + d
        return out
    if cfg.aggregator == "median":
        return median(vecs)
    if cfg.aggregator == "trimmed_mean":
        return trimmed_mean(vecs, cfg.trim)
    if len(vecs) < 2 * cfg.byzantine + 3:
        return median(vecs)
    if cfg.aggregator == "krum":
        return krum(vecs, cfg.byzantine)
    if cfg.aggregator == "multi_krum":
        return multi_krum(vecs, cfg.byzantine, cfg.krum_m)
    raise ValueError(f"unknown aggregator {cfg.aggregator!r}")


# --------------------------------------------------------------------------- sparse (FedKSeed)
@dataclass
class SparseAggregate:
    """Per seed index j (length K): `value[j]` the aggregate, `voters[j]` the devices whose value
    for j went into it (0 for a dropped seed),
    `abs_value[j]` |the per-device value the aggregate stands for| x voters (for FedKSeed-Pro)."""
    value: np.ndarray
    voters: np.ndarray
    abs_value: np.ndarray


def aggregate_sparse(k: int, seeds: Sequence[np.ndarray], values: Sequence[np.ndarray],
                     cfg: RobustConfig) -> SparseAggregate:
    """Robust per-seed aggregation of n devices' (seed index, value) lists (median or trimmed_mean).

    The aggregate of seed j is (n_j / n) * stat_j, where n_j devices used j and stat_j is the
    median / trimmed mean of their values: with every device voting on every seed this is the
    plain statistic, and with the mean as stat it is the unweighted FedKSeed average (a device
    that did not use j contributes 0). A seed used by fewer than min_voters(cfg) devices cannot
    outvote an outlier: each of its values is clipped to sparse_clip x the median |value| of the
    whole round (all devices, all seeds) and they are summed / n; with sparse_clip = 0 such seeds
    are dropped. A seed listed twice by one device counts once, with the sum of its values."""
    if cfg.aggregator not in ("median", "trimmed_mean"):
        raise ValueError(f"aggregate_sparse does {cfg.aggregator!r} not: median or trimmed_mean only")
    n = len(seeds)
    if n == 0:
        raise ValueError("no updates to aggregate")
    s_parts, v_parts = [], []
    for idx, val in zip(seeds, values):
        idx = np.asarray(idx, np.int64).reshape(-1)
        val = clip_to_norm(np.asarray(val, np.float64).reshape(-1), cfg.norm_clip)
        if idx.size != val.size:
            raise ValueError(f"{idx.size} seed indices but {val.size} values")
        u, inv = np.unique(idx, return_inverse=True)
        if u.size != idx.size:  # a seed listed twice by one device: one vote, the sum (as the mean adds)
            val = np.bincount(inv.reshape(-1), weights=val, minlength=u.size)
        s_parts.append(u)
        v_parts.append(val[np.argsort(idx, kind="stable")] if u.size == idx.size else val)
    s = np.concatenate(s_parts)
    v = np.concatenate(v_parts)
    value = np.zeros(k, np.float64)
    voters = np.zeros(k, np.int64)
    abs_value = np.zeros(k, np.float64)
    if s.size == 0:
        return SparseAggregate(value, voters, abs_value)
    order = np.lexsort((v, s))  # by seed, then value; stable
    s, v = s[order], v[order]
    uniq, start, count = np.unique(s, return_index=True, return_counts=True)
    voters[uniq] = count
    group = np.repeat(np.arange(uniq.size), count)
    rank = np.arange(s.size) - start[group]           # position inside its seed's sorted values
    need = min_voters(cfg)
    robust = count >= need
    stat = np.zeros(uniq.size, np.float64)
    if cfg.aggregator == "median":
        lo, hi = start + (count - 1) // 2, start + count // 2
        stat = 0.5 * (v[lo] + v[hi])
    else:
        t = np.array([trim_count(int(c), cfg.trim) for c in count], np.int64)
        keep = (rank >= t[group]) & (rank < (count - t)[group])
        sums = np.bincount(group[keep], weights=v[keep], minlength=uniq.size)
        stat = sums / (count - 2 * t)
    agg = np.where(robust, stat * (count / n), 0.0)
    absval = np.where(robust, np.abs(stat) * count, 0.0)
    if not robust.all() and cfg.sparse_clip <= 0:
        voters[uniq[~robust]] = 0
    elif not robust.all():
        tau = cfg.sparse_clip * float(np.median(np.abs(v)))
        few = ~robust[group]
        clipped = np.clip(v[few], -tau, tau)
        sums = np.bincount(group[few], weights=clipped, minlength=uniq.size)
        abss = np.bincount(group[few], weights=np.abs(clipped), minlength=uniq.size)
        agg = np.where(robust, agg, sums / n)
        absval = np.where(robust, absval, abss)
    value[uniq] = agg
    abs_value[uniq] = absval
    return SparseAggregate(value, voters, abs_value)
