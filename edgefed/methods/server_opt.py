"""Server optimisers for white-box methods: what the server does with the round's averaged client
delta before it is added to the global parameters.

- fedavg: x += eta * Delta                                     (McMahan et al. 2017)
- avgm:   m = beta1 m + Delta;               x += eta * m      (FedAvgM, Hsu et al. 2019)
- adagrad / adam / yogi: FedAdagrad, FedAdam, FedYogi          (Reddi et al. 2021, Algorithm 2)
    m = beta1 m + (1 - beta1) Delta
    v = v + Delta^2                                  (adagrad)
    v = beta2 v + (1 - beta2) Delta^2                (adam)
    v = v - (1 - beta2) Delta^2 sign(v - Delta^2)    (yogi)
    x += eta * m / (sqrt(v) + tau)
  with m_{-1} = 0, v_{-1} = tau^2 and no bias correction, as in the paper.

Delta is the (weighted) average of client deltas (client params after - before), so the
server "pseudo-gradient" is -Delta and every rule above moves x along +Delta.

Why pure numpy, float32, elementwise: the server may be replayed (audit, crash recovery) and
must produce the same bytes every time. IEEE add, multiply, divide and sqrt are correctly
rounded, numpy does not fuse them, and no reduction is involved, so the result is a function
of the input bytes only. The hyperparameters are rounded to float32 once (`_Coeffs`), so a
Python float never silently promotes the arithmetic to float64.

State is a plain dict of named float32 arrays ("opt_m", "opt_v"), so a strategy can keep it
in `MethodState.arrays` and the store can persist it as raw bytes, without pickle.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np

from ..job_params import number

__all__ = ["SERVER_OPTS", "ADAPTIVE", "STATE_M", "STATE_V", "ServerOptConfig", "init_state",
           "state_keys", "server_step", "describe"]

SERVER_OPTS = ("fedavg", "avgm", "adagrad", "adam", "yogi")
ADAPTIVE = ("adagrad", "adam", "yogi")
_ALIASES = {"none": "fedavg"}
STATE_M = "opt_m"
STATE_V = "opt_v"

_DEFAULT_LR_PLAIN = 1.0      # fedavg / avgm: eta = 1 is plain (momentum) averaging
_DEFAULT_LR_ADAPTIVE = 0.01  # adaptive: the step is ~eta per coordinate, so eta is an absolute size


def _num(params: Mapping[str, Any], key: str, default: float) -> float:
    """A job param as a finite float (None: the default); the message names the param."""
    return float(default) if params.get(key) is None else number(params, key, default)


def _opt_name(value: Any) -> str:
    """Normalise `server_opt` ("none" and empty mean fedavg) or say which names are valid."""
    name = str(value if value is not None else "").strip().lower() or "fedavg"
    name = _ALIASES.get(name, name)
    if name not in SERVER_OPTS:
        raise ValueError(f"server_opt={value!r} unknown; use one of {', '.join(SERVER_OPTS)} "
                         f"(or 'none' = fedavg)")
    return name


@dataclass(frozen=True)
class ServerOptConfig:
    """Which server optimiser and its hyperparameters (validated on construction).

    lr=None picks the optimiser's default: 1.0 for fedavg/avgm, 0.01 for the adaptive ones
    (their step is about lr per coordinate whatever the delta's scale). beta2 and tau are
    validated even where unused, so a typo in a job is caught when the job is created."""
    opt: str = "fedavg"
    lr: Optional[float] = None   # eta
    beta1: float = 0.9           # server_momentum
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        object.__setattr__(self, "opt", _opt_name(self.opt))
        if self.lr is None:
            object.__setattr__(self, "lr", _DEFAULT_LR_ADAPTIVE if self.adaptive else _DEFAULT_LR_PLAIN)
        for key, x in (("server_lr", self.lr), ("server_momentum", self.beta1),
                       ("server_beta2", self.beta2), ("server_tau", self.tau)):
            if not isinstance(x, numbers.Real) or isinstance(x, bool) or not math.isfinite(x):
                raise ValueError(f"{key}={x!r} must be a finite number")
        if self.lr <= 0:
            raise ValueError(f"server_lr={self.lr} must be > 0 (it scales the server step)")
        if not 0 <= self.beta1 < 1:
            raise ValueError(f"server_momentum={self.beta1} must be in [0, 1) "
                             f"(1 or more never forgets and diverges)")
        if not 0 <= self.beta2 < 1:
            raise ValueError(f"server_beta2={self.beta2} must be in [0, 1)")
        if self.tau <= 0:
            raise ValueError(f"server_tau={self.tau} must be > 0 (it keeps m / (sqrt(v) + tau) finite)")
        if self.tau < np.finfo(np.float32).tiny:
            raise ValueError(f"server_tau={self.tau} is below float32's smallest normal number "
                             f"(~1.2e-38) and would round to 0; use a value such as 1e-3")

    @property
    def adaptive(self) -> bool:
        return self.opt in ADAPTIVE

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "ServerOptConfig":
        """From job params: server_opt, server_lr, server_momentum, server_beta2, server_tau."""
        opt = _opt_name(params.get("server_opt", "fedavg"))
        default_lr = _DEFAULT_LR_ADAPTIVE if opt in ADAPTIVE else _DEFAULT_LR_PLAIN
        return cls(opt=opt,
                   lr=_num(params, "server_lr", default_lr),
                   beta1=_num(params, "server_momentum", 0.9),
                   beta2=_num(params, "server_beta2", 0.99),
                   tau=_num(params, "server_tau", 1e-3))


def describe(cfg: ServerOptConfig) -> str:
    """One line for logs: the optimiser and only the hyperparameters it uses."""
    parts = [f"server_opt={cfg.opt}", f"lr={cfg.lr:g}"]
    if cfg.opt != "fedavg":
        parts.append(f"beta1={cfg.beta1:g}")
    if cfg.opt in ("adam", "yogi"):
        parts.append(f"beta2={cfg.beta2:g}")
    if cfg.adaptive:
        parts.append(f"tau={cfg.tau:g}")
    return " ".join(parts)


def state_keys(cfg: ServerOptConfig) -> tuple[str, ...]:
    """The state arrays this optimiser keeps: none (fedavg), m (avgm), m and v (adaptive)."""
    if cfg.opt == "fedavg":
        return ()
    if cfg.opt == "avgm":
        return (STATE_M,)
    return (STATE_M, STATE_V)


def init_state(cfg: ServerOptConfig, size: int) -> dict[str, np.ndarray]:
    """The state before round 0: m = 0 and, for the adaptive ones, v = tau^2 (Reddi et al.
    initialise v_{-1} >= tau^2; with v = 0 the first step would be ~eta * (1 - beta1) * sign)."""
    if size < 0 or int(size) != size:
        raise ValueError(f"state size {size!r} must be a whole number >= 0")
    state = {}
    if STATE_M in state_keys(cfg):
        state[STATE_M] = np.zeros(int(size), np.float32)
    if STATE_V in state_keys(cfg):
        state[STATE_V] = np.full(int(size), np.float32(cfg.tau) ** 2, np.float32)
    return state


@dataclass(frozen=True)
class _Coeffs:
    """The hyperparameters as float32 scalars, rounded once (1 - beta is computed in float64,
    then rounded), so that the update arithmetic stays float32 and reproducible."""
    lr: np.float32
    beta1: np.float32
    one_minus_beta1: np.float32
    beta2: np.float32
    one_minus_beta2: np.float32
    tau: np.float32

    @classmethod
    def of(cls, cfg: ServerOptConfig) -> "_Coeffs":
        f = np.float32
        return cls(f(cfg.lr), f(cfg.beta1), f(1.0 - cfg.beta1), f(cfg.beta2), f(1.0 - cfg.beta2),
                   f(cfg.tau))


def _check_delta(delta: np.ndarray) -> np.ndarray:
    """The round's delta as a float32 1-D array (a copy is not made when it already is one)."""
    d = np.asarray(delta)
    if d.dtype.kind not in "fiu":
        raise ValueError(f"delta dtype {d.dtype} is not a real number type; pass float32")
    if d.ndim != 1:
        raise ValueError(f"delta has shape {d.shape}; pass the flat parameter vector (1-D), "
                         f"e.g. delta.reshape(-1)")
    with np.errstate(over="ignore"):  # a float64 beyond float32 range becomes inf: refused below
        d = d.astype(np.float32, copy=False)
    if not np.all(np.isfinite(d)):
        bad = int(np.size(d) - np.count_nonzero(np.isfinite(d)))
        raise ValueError(f"delta has {bad} non-finite value(s) (NaN/inf, or beyond float32 range); "
                         f"refusing to fold it into the global model")
    return d


def _check_state(cfg: ServerOptConfig, state: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """The optimiser's arrays from `state` (other keys are ignored): all missing = first round;
    otherwise each must be float32, 1-D of the delta's length, finite (v also >= 0)."""
    keys = state_keys(cfg)
    present = [k for k in keys if k in state]
    if not present:
        return init_state(cfg, size)
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"server optimiser state for {cfg.opt} has {present} but lacks {missing}: "
                         f"was it written by another server_opt? Start from an empty state instead")
    out = {}
    for k in keys:
        a = np.asarray(state[k])
        if a.dtype != np.float32:
            raise ValueError(f"state[{k!r}] has dtype {a.dtype}; the server optimiser keeps float32")
        if a.shape != (size,):
            raise ValueError(f"state[{k!r}] has shape {a.shape} but the delta has {size} values: "
                             f"the trainables changed size; start from an empty state")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"state[{k!r}] has non-finite values; it is corrupt")
        if k == STATE_V and np.any(a < 0):
            raise ValueError(f"state[{k!r}] has negative values; v is a second moment (>= 0), "
                             f"the state is corrupt")
        out[k] = a
    return out


def _second_moment(opt: str, c: _Coeffs, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
    """The new v from the old one and Delta^2 (the only place adagrad, adam and yogi differ)."""
    if opt == "adagrad":
        return v + d2
    if opt == "adam":
        return c.beta2 * v + c.one_minus_beta2 * d2
    if opt == "yogi":  # moves v towards Delta^2 by an additive (1 - beta2) Delta^2, not a fraction of v
        return v - c.one_minus_beta2 * d2 * np.sign(v - d2)
    raise AssertionError(opt)


def _step(cfg: ServerOptConfig, c: _Coeffs, st: dict[str, np.ndarray],
          d: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The update rules (module docstring). Every expression allocates a new array, so the
    returned delta and state never alias the caller's inputs."""
    if cfg.opt == "fedavg":
        return c.lr * d, {}
    if cfg.opt == "avgm":
        m = c.beta1 * st[STATE_M] + d
        return c.lr * m, {STATE_M: m}
    m = c.beta1 * st[STATE_M] + c.one_minus_beta1 * d
    v = _second_moment(cfg.opt, c, st[STATE_V], d * d)
    return c.lr * m / (np.sqrt(v) + c.tau), {STATE_M: m, STATE_V: v}


def server_step(cfg: ServerOptConfig, state: Mapping[str, np.ndarray],
                delta: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One server round: (server delta to ADD to the global parameters, new state).

    `delta` is the round's (weighted) average client delta, 1-D; non-float32 real input is cast
    to float32. `state` is the previous return value, or {} before the first round; keys other
    than "opt_m"/"opt_v" are ignored, and the new state holds only this optimiser's keys
    (none for fedavg). Neither input is modified; same input bytes -> same output bytes.
    Raises ValueError for a non-finite or wrongly shaped delta, for a state that does not fit
    it, and when the step itself overflows float32 (the state would be poisoned for good)."""
    d = _check_delta(delta)
    st = _check_state(cfg, state, d.size)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked (and explained) below
        out, new = _step(cfg, _Coeffs.of(cfg), st, d)
    out = np.asarray(out, np.float32)
    for name, a in [("server delta", out), *new.items()]:
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} overflowed float32 (|delta| up to {float(np.max(np.abs(d))):g}); "
                             f"the round's delta is far too large: lower the client lr or clip updates")
    return out, new
