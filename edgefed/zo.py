"""Zeroth-order estimators and the seed pool (MeZO, FedKSeed, FedKSeed-Pro, n-SPSA).

A step probes theta +- eps*z(seed) with two forward passes, g = (L+ - L-) / (2 eps) is the
projected gradient, and the fused kernel restores theta and applies -lr*g*z in one pass.
Only (seed index, g) needs to leave the device: anyone holding the same seed pool can
regenerate z and replay the update. Device side: no torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from . import rng
from .directions import WHOLE

__all__ = ["SeedPool", "ZOConfig", "ProbeResult", "DivergedError", "two_point_step", "probe_only",
           "gradient_projection_step", "ScalarAccumulator", "pro_probabilities", "PROBES"]

# How a step estimates <grad L, z>: "zo" two forward passes (any backend); "grad" one backward
# pass and exact projections (torch hosts); "auto" the exact one where the model can backprop.
PROBES = ("auto", "zo", "grad")


class DivergedError(RuntimeError):
    """A loss came back NaN/inf; the parameters were restored before this was raised."""


class SeedPool:
    """K candidate seeds derived from a pool id (FedKSeed): everyone derives the same list.

    Seed j is the 64-bit value of Philox words (2j, 2j+1) on stream 1 keyed by the pool id,
    so the pool costs nothing to ship and can't collide with perturbation streams."""

    STREAM = 1
    MAX_K = 1 << 20

    def __init__(self, pool_id: int, k: int):
        if not 1 <= k <= self.MAX_K:
            raise ValueError(f"seed pool size K must be in [1, 2**20], got {k}")
        self.pool_id = int(pool_id)
        self.k = int(k)
        w = rng.words(self.pool_id, 2 * self.k, stream=self.STREAM).astype(np.uint64)
        self.seeds = w[0::2] | (w[1::2] << np.uint64(32))

    def seed(self, index: int) -> int:
        if not 0 <= index < self.k:
            raise IndexError(f"seed index {index} outside the pool of {self.k}")
        return int(self.seeds[index])

    def sample(self, gen: np.random.Generator, n: int, probs: np.ndarray | None = None) -> np.ndarray:
        """n seed indices, uniform or with FedKSeed-Pro probabilities (with replacement)."""
        if probs is not None:
            probs = np.asarray(probs, dtype=np.float64)
            if probs.shape != (self.k,) or not np.all(np.isfinite(probs)) or probs.min() < 0:
                raise ValueError(f"seed probabilities must be {self.k} finite non-negative numbers")
            probs = probs / probs.sum()
        return gen.choice(self.k, size=n, replace=True, p=probs).astype(np.int64)


def pro_probabilities(abs_sum: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """FedKSeed-Pro: seeds whose projected gradients have been larger are sampled more.

    psi_j = mean |g| of seed j (seeds never seen get the mean of the seen ones), min-max
    normalised to [0, 1], then a softmax."""
    abs_sum = np.asarray(abs_sum, np.float64)
    counts = np.asarray(counts, np.float64)
    seen = counts > 0
    if not seen.any():
        return np.full(abs_sum.shape, 1.0 / abs_sum.size)
    psi = np.where(seen, abs_sum / np.maximum(counts, 1), 0.0)
    psi[~seen] = psi[seen].mean()
    span = psi.max() - psi.min()
    psi = (psi - psi.min()) / span if span > 0 else np.zeros_like(psi)
    e = np.exp(psi - psi.max())
    return e / e.sum()


@dataclass
class ZOConfig:
    lr: float = 1e-3
    eps: float = 1e-3
    n_perturb: int = 1            # directions per step (n-SPSA); lr is split between them
    n_perturb_max: int = 0        # > n_perturb: variance-adaptive, up to this many probes a step
    adaptive_tol: float = 0.5     # ... stop once stderr(g) <= adaptive_tol * |mean g|
    dist: str = "normal"
    clip: float = 0.0             # clip |g| to this (0: off); guards against outlier batches
    noise_std: float = 0.0        # DP-ZO: N(0, noise_std^2) added to each clipped g (0: off)
    probe: str = "auto"           # see PROBES
    length_buckets: int = 1       # > 1: batches of rows of like length (edgefed.batching), less padding



@dataclass
class ProbeResult:
    seed_index: int
    g: float              # projected gradient after clipping
    g_raw: float
    loss_plus: float
    loss_minus: float
    coeff: float = 0.0    # what was applied to theta: -lr*g (float32-rounded in the kernel)

    @property
    def loss(self) -> float:
        return 0.5 * (self.loss_plus + self.loss_minus)


def two_point_step(loss_fn: Callable[[], float], buffers: Sequence[np.ndarray], seed: int,
                   seed_index: int, eps: float, lr: float, dist: str = "normal",
                   clip: float = 0.0, noise: float = 0.0, space=None) -> ProbeResult:
    """One SPSA probe and update, in place: +eps z, L+, -2eps z, L-, then theta += (eps - lr g) z.

    g is clipped to [-clip, clip] (clip > 0), then `noise` is added (DP-ZO: the caller draws it
    from N(0, (sigma C)^2)); the step, and what the device reports, use that privatized g.

    On a non-finite loss the parameters are put back (theta += eps z) and DivergedError
    is raised, so nothing is lost. `space` (edgefed.directions) says which vector the seed
    stands for: z itself by default, or a masked / low-rank direction."""
    space = space or WHOLE
    probe = probe_only(loss_fn, buffers, seed, seed_index, eps, dist, clip, noise, space, restore=False)
    space.zo_update(buffers, seed, eps, lr, probe.g, dist)
    probe.coeff = -lr * probe.g
    return probe


def probe_only(loss_fn: Callable[[], float], buffers: Sequence[np.ndarray], seed: int, seed_index: int,
               eps: float, dist: str = "normal", clip: float = 0.0, noise: float = 0.0, space=None,
               restore: bool = True) -> ProbeResult:
    """L(theta + eps d) and L(theta - eps d) and g, clipped and noised as in two_point_step; theta
    is put back (restore=True, a third pass) or left at theta - eps d for a fused update."""
    space = space or WHOLE
    space.perturb(buffers, seed, eps, dist)
    lp = loss_fn()
    if not math.isfinite(lp):
        space.perturb(buffers, seed, -eps, dist)
        raise DivergedError(f"loss is {lp} at theta + eps*z (seed index {seed_index}); parameters "
                            "restored. Lower lr or eps, or enable clipping.")
    space.perturb(buffers, seed, -2.0 * eps, dist)
    lm = loss_fn()
    if not math.isfinite(lm):
        space.perturb(buffers, seed, eps, dist)
        raise DivergedError(f"loss is {lm} at theta - eps*z (seed index {seed_index}); parameters "
                            "restored. Lower lr or eps, or enable clipping.")
    if restore:
        space.perturb(buffers, seed, eps, dist)
    g_raw = (lp - lm) / (2.0 * eps)
    g = float(np.clip(g_raw, -clip, clip)) if clip > 0 else g_raw
    if noise:
        g = g + float(noise)
    return ProbeResult(seed_index, g, g_raw, lp, lm)


def gradient_projection_step(grad: np.ndarray, loss: float, buffers: Sequence[np.ndarray],
                             scratch: np.ndarray, seed: int, seed_index: int, lr: float,
                             dist: str = "normal", clip: float = 0.0, noise: float = 0.0,
                             space=None) -> ProbeResult:
    """The exact directional derivative g = <grad L, z(seed)> (what two_point_step estimates as
    eps -> 0), then theta += -lr g z, in place. A host that can backprop reports the same kind of
    (seed index, g) pair as a device, from one backward pass for all of a step's seeds; `scratch`
    (float32, the size of theta) receives z."""
    space = space or WHOLE
    space.fill(scratch, seed, dist)
    g_raw = float(np.dot(grad.astype(np.float64), scratch.astype(np.float64)))
    if not math.isfinite(g_raw):
        raise DivergedError(f"gradient projection is {g_raw} (seed index {seed_index}); parameters "
                            "unchanged. Lower lr, or enable clipping.")
    g = float(np.clip(g_raw, -clip, clip)) if clip > 0 else g_raw
    if noise:
        g = g + float(noise)
    space.perturb(buffers, seed, -lr * g, dist)
    return ProbeResult(seed_index, g, g_raw, loss, loss, coeff=-lr * g)


@dataclass
class ScalarAccumulator:
    """Per-seed sums of projected gradients: what a FedKSeed device sends (a few hundred
    bytes however many steps it ran)."""
    k: int
    g_sum: dict[int, float] = field(default_factory=dict)
    count: dict[int, int] = field(default_factory=dict)
    history: list[ProbeResult] = field(default_factory=list)

    def add(self, probe: ProbeResult) -> None:
        j = probe.seed_index
        self.g_sum[j] = self.g_sum.get(j, 0.0) + probe.g
        self.count[j] = self.count.get(j, 0) + 1
        self.history.append(probe)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(seed indices uint32 ascending, summed g float32)."""
        idx = np.array(sorted(self.g_sum), dtype=np.uint32)
        return idx, np.array([self.g_sum[int(i)] for i in idx], dtype=np.float32)

    def mean_loss(self) -> float:
        return float(np.mean([p.loss for p in self.history])) if self.history else float("nan")
