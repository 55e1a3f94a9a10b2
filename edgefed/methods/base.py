"""One federated method = a client algorithm + a server strategy, registered under one name.

The round engine (edgefed_server), the device agent, the transports and the CLI only ever
talk to these interfaces; none of them knows any method by name.

State that a strategy keeps between rounds is a `MethodState`: JSON-able scalars plus named
numpy arrays, so the store can persist it without pickle (arrays as raw little-endian bytes
with dtype and shape).
"""
from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from ..protocol import InvalidField, RoundDelta, RoundPlan, Tensor, Update

__all__ = ["JobConfig", "MethodState", "PlanFields", "ClientResult", "ServerStrategy",
           "ClientAlgorithm", "Method", "check_num_samples", "SecureSpec", "parse_param",
           "RoundAccumulator", "BufferedAccumulator", "expect_tensors"]


@dataclass
class JobConfig:
    """What a federated job is: set when it is created, stored with it, never changed."""
    job: str
    method: str
    artifact: str = ""              # artifact directory (devices and server must hold the same one)
    rounds: int = 10
    devices_per_round: int = 0      # 0: every device that is online
    min_devices: int = 1            # quorum: fewer accepted updates at the deadline = round retried
    round_timeout: float = 300.0    # seconds from plan to deadline
    lr: float = 1e-3
    eps: float = 1e-3
    local_steps: int = 10
    batch_size: int = 8
    k: int = 4096                   # seed pool size (ZO methods)
    seed_pool_id: int = 0
    seed: int = 0                   # job-level randomness (device selection, ...)
    params: dict[str, Any] = field(default_factory=dict)  # method-specific knobs

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> "JobConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown job settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def parse_param(text: str) -> tuple:
    """'key=value' -> (key, int | float | str); true/false become 1/0."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--param {text!r}: use key=value")
    k, v = text.split("=", 1)
    k = k.strip()
    if not k:
        raise argparse.ArgumentTypeError(f"--param {text!r}: empty key")
    v = v.strip()
    low = v.lower()
    if low in ("true", "yes", "on"):
        return k, 1
    if low in ("false", "no", "off"):
        return k, 0
    for conv in (int, float):
        try:
            return k, conv(v)
        except ValueError:
            pass
    return k, v


@dataclass
class MethodState:
    """A strategy's state between rounds (persisted by the store after every round)."""
    scalars: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def copy(self) -> "MethodState":
        return MethodState(dict(self.scalars), {k: v.copy() for k, v in self.arrays.items()})


@dataclass
class PlanFields:
    """The strategy's part of a RoundPlan: the generic training settings, the method's own
    settings (`params`, e.g. a ZO method's eps, k, seed_pool_id) and tensors (e.g. seed_probs).
    The engine adds job, round, method, deadline, min_devices and the previous round's delta."""
    lr: float = 0.0
    local_steps: int = 1
    batch_size: int = 1
    params: dict[str, Any] = field(default_factory=dict)
    tensors: list[Tensor] = field(default_factory=list)


@dataclass
class ClientResult:
    """The method-specific part of an Update: its named tensors."""
    num_samples: int
    tensors: list[Tensor] = field(default_factory=list)
    train_loss: float = 0.0


def expect_tensors(tensors: Sequence[Tensor], spec: dict, what: str,
                   optional: Sequence[str] = ()) -> dict[str, Tensor]:
    """A strategy's check of the tensors it is sent: exactly the names of `spec` (those in
    `optional` may be missing), each with one of its dtypes and, where given, its ndim.
    spec: name -> (dtypes, ndim or None). Returns the tensors by name; raises InvalidField
    naming what is unexpected (a u32 tensor in a method that takes floats, an unknown name...)."""
    by_name: dict[str, Tensor] = {}
    for t in tensors:
        if t.name in by_name:
            raise InvalidField(f"{what}: tensor {t.name!r} appears twice")
        by_name[t.name] = t
    unknown = sorted(set(by_name) - set(spec))
    missing = sorted(set(spec) - set(by_name) - set(optional))
    if unknown or missing:
        raise InvalidField(f"{what} must carry the tensors {sorted(spec)}"
                           + (f"; unexpected: {unknown}" if unknown else "")
                           + (f"; missing: {missing}" if missing else ""))
    for name, t in by_name.items():
        dtypes, ndim = spec[name]
        if t.dtype not in dtypes:
            raise InvalidField(f"{what}: tensor {name!r} has dtype {t.dtype}; expected "
                               f"{' or '.join(dtypes)}")
        if ndim is not None and t.data.ndim != ndim:
            raise InvalidField(f"{what}: tensor {name!r} has shape {t.shape}; expected {ndim} dimension(s)")
    return by_name


@dataclass(frozen=True)
class SecureSpec:
    """The vector a device contributes to a secure-aggregation round: `length` float elements,
    each within +-`bound` (devices clip to it; the server cannot check one device's input)."""
    length: int
    bound: float


def check_num_samples(plan: RoundPlan, update: Update) -> None:
    """num_samples <= local_steps x batch_size of the plan: what the device could have trained on
    this round (a device reports local_steps x min(batch_size, its rows)). It is the device's
    weight in a sample-weighted mean, so this bounds any one device's share of the aggregate."""
    cap = int(plan.local_steps) * int(plan.batch_size)
    if int(update.num_samples) > cap:
        raise InvalidField(f"update from {update.device} claims num_samples={update.num_samples}, but "
                           f"round {plan.round} allows at most local_steps {plan.local_steps} x "
                           f"batch_size {plan.batch_size} = {cap}")


class RoundAccumulator(ABC):
    """One round's aggregation as updates stream in: the engine calls add() for each accepted
    update in arrival order (the store keeps that order, so a replay adds them the same way) and
    finalize() once at the deadline. A streaming accumulator keeps running sums only, so server
    memory does not grow with the number of devices; the engine keeps no Update after add()."""

    @abstractmethod
    def add(self, update: Update) -> None: ...

    @abstractmethod
    def finalize(self) -> tuple[MethodState, RoundDelta]:
        """The new state and the delta devices apply (called once, with >= 1 update added)."""

    # -- partial sums (aggregation workers, docs/server.md "Scale-out"): only accumulators whose
    # sums are exact (edgefed.exactsum) implement these, so that merging partials in any grouping
    # gives the bits of one accumulator that was given every update.
    def partial(self) -> list[Tensor]:
        """What was added so far, as named tensors (a worker's partial sum on the wire)."""
        raise NotImplementedError(f"{type(self).__name__} has no exact partial sums")

    def merge(self, tensors: Sequence[Tensor], negate: bool = False) -> None:
        """Add another accumulator's partial() (or subtract it, with negate: exact, so a partial
        that holds an update it should not can be corrected). Raises ValueError if malformed."""
        raise NotImplementedError(f"{type(self).__name__} has no exact partial sums")

    @property
    def count(self) -> int:
        """Updates added (merged partials count theirs; negated ones subtract)."""
        return 0


class BufferedAccumulator(RoundAccumulator):
    """The default: hold the round's updates and call strategy.aggregate() with them ordered by
    device id (what robust statistics such as a coordinate-wise median need anyway)."""

    def __init__(self, strategy: "ServerStrategy", job: JobConfig, state: MethodState, plan: RoundPlan):
        self.strategy, self.job, self.state, self.plan = strategy, job, state, plan
        self.updates: list[Update] = []

    def add(self, update: Update) -> None:
        self.updates.append(update)

    def finalize(self) -> tuple[MethodState, RoundDelta]:
        ordered = sorted(self.updates, key=lambda u: u.device)
        return self.strategy.aggregate(self.job, self.state, self.plan, ordered)


class ServerStrategy(ABC):
    """Server side of a method: pure numpy, deterministic (a replay of the accepted-update
    log through aggregate() must give the same state)."""

    @abstractmethod
    def init_state(self, job: JobConfig) -> MethodState: ...

    @abstractmethod
    def plan_round(self, job: JobConfig, state: MethodState, round_id: int) -> PlanFields: ...

    def validate_update(self, job: JobConfig, state: MethodState, plan: RoundPlan,
                        update: Update) -> None:
        """What the update means (raise protocol.InvalidField): the wire layer checked only its
        structure, so a strategy checks the names and dtypes of its tensors (expect_tensors: an
        unexpected name or dtype, e.g. a u32 tensor where floats belong, is refused) and their
        values (bounds, ranges). Not called in secure rounds (the masked vector is checked there)."""

    @abstractmethod
    def aggregate(self, job: JobConfig, state: MethodState, plan: RoundPlan,
                  updates: Sequence[Update]) -> tuple[MethodState, RoundDelta]:
        """Fold the round's accepted updates (in a fixed order: by device id) into the state;
        return the new state and the delta devices apply to reach it."""

    def start_round(self, job: JobConfig, state: MethodState, plan: RoundPlan) -> RoundAccumulator:
        """The accumulator for one round; override to aggregate as updates stream in."""
        return BufferedAccumulator(self, job, state, plan)

    def partials_unsupported(self, job: JobConfig) -> Optional[str]:
        """None when this job's round accumulator sums exactly and implements partial() / merge()
        (aggregation workers can then split a round); else why not, for the error message."""
        return (f"method {job.method!r} has no exact partial sums (its aggregation cannot be split "
                f"between workers and merged bit for bit)")

    def full_state(self, job: JobConfig, state: MethodState) -> list[Tensor]:
        """Everything a device far behind needs to rebuild the global state from the artifact."""
        return []

    # -- secure aggregation (edgefed.security.secagg): the server sees only the sum of the
    # devices' vectors, so a method that supports it folds that sum instead of the updates.
    def secure_spec(self, job: JobConfig, plan: RoundPlan) -> Optional[SecureSpec]:
        """What each device's vector holds this round; None: the method has no secure mode."""
        return None

    def aggregate_secure(self, job: JobConfig, state: MethodState, plan: RoundPlan, total: np.ndarray,
                         updates: Sequence[Update]) -> tuple[MethodState, RoundDelta]:
        """Like aggregate(), from `total` = the sum of the survivors' secure_vector()s (updates:
        their Updates, which carry num_samples and train_loss but no readable result)."""
        raise NotImplementedError(f"{type(self).__name__} has no secure aggregation")

    def summary(self, state: MethodState) -> dict:
        """A few numbers for /status and logs."""
        return {}


class ClientAlgorithm(ABC):
    """Device side of a method: runs on the device with no torch."""

    # The global state is the trainables (every method but those that change frozen weights,
    # e.g. FLoRA's merges): a full-state sync may then send the trainables themselves.
    state_is_trainables: bool = True

    @abstractmethod
    def local_train(self, model, examples: Sequence, plan: RoundPlan, seed: int,
                    progress: bool = False) -> ClientResult:
        """Train locally from the current global parameters, then put the parameters BACK to the
        global state they started from (the device applies the aggregated delta later)."""

    @abstractmethod
    def apply_delta(self, model, delta: RoundDelta, plan_params: dict) -> None:
        """Move the model's parameters from global state r to r+1."""

    def apply_full_state(self, model, tensors: Sequence[Tensor], plan_params: dict) -> None:
        """Rebuild the global state from the artifact's initial parameters."""
        raise NotImplementedError(f"{type(self).__name__} has no full-state sync")

    def secure_vector(self, result: ClientResult, plan: RoundPlan) -> np.ndarray:
        """This device's contribution to a secure-aggregation round (float64, the plan's
        secagg_len elements, clipped to +-secagg_bound by the caller)."""
        raise NotImplementedError(f"{type(self).__name__} has no secure aggregation")


@dataclass(frozen=True)
class Method:
    name: str
    client: type[ClientAlgorithm]
    server: type[ServerStrategy]
    summary: str = ""


def cum_delta_state(state: MethodState) -> list[Tensor]:
    """full_state() of methods that keep the sum of their deltas as `cum_delta`."""
    cum = state.arrays.get("cum_delta")
    return [] if cum is None else [Tensor("cum_delta", cum)]


def cum_delta_summary(state: MethodState) -> dict:
    cum = state.arrays.get("cum_delta")
    return {"delta_norm": float(np.linalg.norm(cum)) if cum is not None else 0.0,
            "rounds_aggregated": int(state.scalars.get("rounds_aggregated", 0))}
