"""Differential privacy for the federated methods: DP-ZO clipping + Gaussian noise, and the
privacy accountant (docs/security.md, "Differential privacy").

Job params (`--param key=value`), checked at job creation:

- ``dp_mode``: ``off`` (default) | ``local`` | ``central``.
- ``dp_clip`` C (> 0). local fedkseed: each probe's projected scalar g is clipped to [-C, C];
  local fedmezo: the device's round delta is clipped to L2 norm C; central (both): the server
  clips each device's update vector (fedkseed: its per-seed scalars; fedmezo: its delta) to L2
  norm C.
- ``dp_noise_multiplier`` sigma (>= 0): Gaussian noise of standard deviation sigma x C is added
  to every clipped quantity (local: on the device, per probe / per delta coordinate; central:
  once per round to every coordinate of the sum of the clipped updates).
- ``dp_delta`` (default 1e-5): the delta at which the summary reports epsilon.
- ``dp_population`` N: the number of devices of the job, for the device sampling rate
  q = devices_per_round / N of the central accountant (0 / unset, or devices_per_round = 0:
  q = 1, no amplification).

Device side (`device_rng`, `clip_scalar`, `privatize_vector`): numpy only, no torch. The
accountant (`epsilon`) imports `dp_accounting` (Google's library) lazily: only the server needs it.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..job_params import number as _number

__all__ = ["DP_MODES", "DPConfig", "device_rng", "central_rng", "clip_scalar", "privatize_vector",
           "epsilon", "dp_event", "ACCOUNTANT_ORDERS", "SECRET_ENV"]

DP_MODES = ("off", "local", "central")
DEFAULT_DELTA = 1e-5
# Server-side secret mixed into the central noise seed (see central_rng).
SECRET_ENV = "EDGEFED_DP_SECRET"
# RDP orders: integers only (dp_accounting's fractional orders below 2 fail to converge for some
# (q, sigma) and are skipped with a warning; integers give a deterministic, warning-free bound).
ACCOUNTANT_ORDERS = tuple(float(a) for a in list(range(2, 129)) + [160, 192, 256, 384, 512, 1024])


@dataclass(frozen=True)
class DPConfig:
    mode: str = "off"
    clip: float = 0.0                 # C
    noise_multiplier: float = 0.0     # sigma; noise std = sigma x C
    delta: float = DEFAULT_DELTA
    population: int = 0               # N (devices of the job), for q

    @property
    def on(self) -> bool:
        return self.mode != "off"

    @property
    def local(self) -> bool:
        return self.mode == "local"

    @property
    def central(self) -> bool:
        return self.mode == "central"

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.clip

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "DPConfig":
        mode = str(params.get("dp_mode", "off")).strip().lower() or "off"
        if mode not in DP_MODES:
            raise ValueError(f"dp_mode={mode!r} unknown; use one of {', '.join(DP_MODES)}")
        clip = _number(params, "dp_clip", 0.0)
        sigma = _number(params, "dp_noise_multiplier", 0.0)
        delta = _number(params, "dp_delta", DEFAULT_DELTA)
        pop = _number(params, "dp_population", 0)
        if mode == "off":
            return cls()
        if clip <= 0:
            raise ValueError(f"dp_mode={mode} needs dp_clip > 0 (got {clip})")
        if sigma < 0:
            raise ValueError(f"dp_noise_multiplier={sigma} must be >= 0")
        if not 0 < delta < 1:
            raise ValueError(f"dp_delta={delta} must be in (0, 1)")
        if pop < 0 or pop != int(pop):
            raise ValueError(f"dp_population={pop} must be a whole number >= 0 (0: q = 1)")
        return cls(mode, clip, sigma, delta, int(pop))

    def plan_params(self) -> dict:
        """What a round plan carries to devices (nothing when DP is off: plans stay as before)."""
        if not self.on:
            return {}
        return {"dp_mode": self.mode, "dp_clip": float(self.clip),
                "dp_noise_multiplier": float(self.noise_multiplier)}

    def sampling_rate(self, devices_per_round: int) -> float:
        if devices_per_round <= 0 or self.population <= 0:
            return 1.0
        if devices_per_round > self.population:
            raise ValueError(f"devices_per_round={devices_per_round} exceeds dp_population={self.population}")
        return devices_per_round / self.population


# --------------------------------------------------------------------------- noise
def device_rng(seed: int | None = None) -> np.random.Generator:
    """The device's noise generator: seeded from os.urandom (256 bits) unless a seed is given
    (tests only). It must NOT be derivable by the server (or anyone else): whoever can
    regenerate the noise subtracts it from the reported scalars / delta and gets the clipped,
    noiseless values back, and local DP is gone. So unlike the batch order (derived from the job
    seed, device and round, for reproducibility) local DP runs are not reproducible."""
    if seed is None:
        seed = int.from_bytes(os.urandom(32), "little")
    return np.random.default_rng(seed)


def central_rng(job_seed: int, round_id: int, secret: int | None = None) -> np.random.Generator:
    """The server's noise generator for a round: a pure function of (job seed, round, server
    secret), so replaying the accepted-update log adds the same noise bit for bit. The secret is
    read from the environment variable EDGEFED_DP_SECRET (an integer, decimal or 0x-hex) of the
    server process when not given; without it anyone who knows the job seed (every device gets
    it as run_seed in the plan; /status shows the job) can regenerate the noise and subtract it."""
    if secret is None:
        secret = central_secret()
    words = [int(job_seed) & (2 ** 64 - 1), int(round_id), 0x44505F4E4F495345, int(secret or 0)]
    return np.random.default_rng(np.random.SeedSequence(words))


def central_secret() -> int:
    raw = os.environ.get(SECRET_ENV, "").strip()
    if not raw:
        return 0
    try:
        v = int(raw, 0)
    except ValueError:
        raise ValueError(f"{SECRET_ENV} must be an integer (decimal or 0x-hex), not {raw!r}") from None
    if v < 0:
        raise ValueError(f"{SECRET_ENV} must be >= 0")
    return v


def clip_scalar(g: float, clip: float) -> float:
    return float(min(max(g, -clip), clip))


def privatize_vector(x: np.ndarray, clip: float, noise_multiplier: float,
                     gen: np.random.Generator) -> np.ndarray:
    """x (any float) clipped to L2 norm <= clip, plus N(0, (noise_multiplier x clip)^2) per
    coordinate; float64."""
    x = np.asarray(x, np.float64).reshape(-1)
    norm = float(np.sqrt(np.dot(x, x)))
    if norm > clip:
        x = x * (clip / norm)
    if noise_multiplier > 0:
        x = x + gen.normal(0.0, noise_multiplier * clip, x.size)
    return x


# --------------------------------------------------------------------------- accounting
def dp_event(mode: str, noise_multiplier: float, rounds: int, *, q: float = 1.0,
             probes_per_round: int = 1):
    """The dp_accounting event of `rounds` rounds (user-level DP: the unit is one device's data).

    central: each round is the Gaussian mechanism on the sum of the clipped updates (L2
    sensitivity C under adding / removing one device, noise sigma x C) over a Poisson sample of
    the devices with rate q (DP-FedAvg, McMahan et al. 2018).
    local: what one device sends, against everyone including the server: per round
    `probes_per_round` releases (fedkseed: local_steps x n_perturb scalars; fedmezo: 1 delta),
    each a clipped value plus N(0, (sigma C)^2). Local DP replaces the device's data by any other,
    so the sensitivity is 2C: a Gaussian of noise multiplier sigma / 2. No amplification (the
    server knows who took part); the count assumes the device took part in every round."""
    import dp_accounting as dpa
    if mode == "central":
        one = dpa.GaussianDpEvent(noise_multiplier)
        if q < 1.0:
            one = dpa.PoissonSampledDpEvent(q, one)
        return dpa.SelfComposedDpEvent(one, int(rounds))
    if mode == "local":
        return dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(noise_multiplier / 2.0),
                                       int(rounds) * int(probes_per_round))
    raise ValueError(f"no accounting for dp_mode={mode!r}")


@functools.lru_cache(maxsize=256)
def epsilon(mode: str, noise_multiplier: float, rounds: int, delta: float, *, q: float = 1.0,
            probes_per_round: int = 1) -> float:
    """epsilon at `delta` after `rounds` rounds (RDP accountant of dp_accounting, integer orders).
    A pure function of its arguments: the strategies derive it from the round count, so a
    replay or a resume reports the same epsilon. 0 rounds: 0; sigma = 0: inf."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from dp_accounting import rdp
    acc = rdp.RdpAccountant(orders=list(ACCOUNTANT_ORDERS))
    acc.compose(dp_event(mode, noise_multiplier, rounds, q=q, probes_per_round=probes_per_round))
    return float(acc.get_epsilon(delta))


def state_scalars(cfg: DPConfig, devices_per_round: int, probes_per_round: int) -> dict:
    """What a strategy keeps in its MethodState so that summary(state) can report epsilon."""
    if not cfg.on:
        return {}
    return {"dp_mode": cfg.mode, "dp_noise_multiplier": float(cfg.noise_multiplier),
            "dp_clip": float(cfg.clip), "dp_delta": float(cfg.delta),
            "dp_q": float(cfg.sampling_rate(devices_per_round)),
            "dp_probes_per_round": int(probes_per_round)}


def summary(scalars: Mapping[str, Any]) -> dict:
    """The DP part of a strategy's summary: mode, sigma, q, delta and epsilon after the rounds
    aggregated so far (empty when DP is off)."""
    mode = scalars.get("dp_mode")
    if not mode:
        return {}
    rounds = int(scalars.get("rounds_aggregated", 0))
    sigma = float(scalars["dp_noise_multiplier"])
    q = float(scalars["dp_q"])
    delta = float(scalars["dp_delta"])
    eps = epsilon(str(mode), sigma, rounds, delta, q=q, probes_per_round=int(scalars["dp_probes_per_round"]))
    return {"dp_mode": mode, "dp_noise_multiplier": sigma, "dp_clip": float(scalars["dp_clip"]),
            "dp_q": q, "dp_delta": delta, "dp_epsilon": eps}
