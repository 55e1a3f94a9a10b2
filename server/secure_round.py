"""The server's side of one secure-aggregation round (edgefed.security.secagg), as the engine
drives it: stage windows on the engine's clock, routing of the stage messages, and the sum.

Timeline of round r (attempt a) of a job with `secure_aggregation` on:
  plan published --(devices advertise keys while they start training)--> roster when every
  expected device advertised, or `window` s after the plan with at least the threshold
  --(shares)--> forwards when every roster device shared, or `window` s later
  --(devices finish training; their Updates carry the masked vectors)--> the engine closes the
  round as usual (target or deadline) --> unmask request --> the sum when every survivor
  answered, or `window` s later with enough shares.
Any stage that ends short of the threshold fails the attempt: the engine re-opens the round
under attempt a+1 with fresh keys (devices train again; nothing of a failed attempt is used).
"""
from __future__ import annotations

import logging
from typing import Callable, List, Mapping, Optional, Set, Tuple

import numpy as np

from edgefed.methods import ServerStrategy
from edgefed.protocol import Topics, Update
from edgefed.security.secagg import UPDATE_TENSOR as MASKED_TENSOR
from edgefed.security.secagg import SecAggConfig, SecAggError, SecAggServer, Stage, decode_message, from_wire

__all__ = ["SecureRound", "SecureRoundFailed", "MASKED_TENSOR", "secure_on", "check_secure_job", "max_cohort",
           "stage_window", "secure_plan_params"]


def secure_on(job) -> bool:
    return bool(int(job.params.get("secure_aggregation", 0) or 0))


def check_secure_job(job, strategy) -> None:
    """Refuse combinations that secure aggregation cannot honour (the server sees one sum)."""
    if not secure_on(job):
        return
    p = job.params
    if str(p.get("aggregator", "mean")).strip().lower() != "mean":
        raise ValueError(f"secure_aggregation needs aggregator=mean: the server sees only the sum, so "
                         f"{p.get('aggregator')!r} (which looks at each update) cannot run")
    if str(p.get("dp_mode", "off")).strip().lower() == "central":
        raise ValueError("secure_aggregation with dp_mode=central is not supported (the server cannot clip "
                         "each update); use dp_mode=local, which adds the noise on the devices")
    if type(strategy).secure_spec is ServerStrategy.secure_spec:
        raise ValueError(f"method {job.method!r} has no secure aggregation mode")


def max_cohort(job, max_devices: int) -> int:
    """The largest cohort of a secure round: it sizes the fixed-point scale and caps the roster."""
    return int(job.params.get("secagg_max_devices", 0) or max_devices)


def stage_window(job) -> float:
    """Seconds a stage waits for stragglers once the threshold is met."""
    return float(job.params.get("secagg_window", 0) or min(30.0, job.round_timeout / 4))


def secure_plan_params(job, strategy, plan, attempt: int, max_devices: int) -> dict:
    """The plan params that open a secure round (edgefed.security.secagg.plan_params)."""
    from edgefed.security.secagg import plan_params
    spec = strategy.secure_spec(job, plan)
    p = job.params
    return plan_params(spec.length, spec.bound, max_cohort(job, max_devices),
                       int(p.get("secagg_threshold", 0) or 0), int(p.get("secagg_degree", 0) or 0), attempt)


class SecureRoundFailed(RuntimeError):
    """This attempt cannot produce a sum (the text says which stage fell short and why)."""


class SecureRound:
    def __init__(self, cfg: SecAggConfig, topics: Topics, *, clock: Callable[[], float], window: float,
                 opened_at: float, expected: Set[str], max_devices: int, signer=None,
                 device_keys: Optional[Mapping[str, object]] = None, logger: Optional[logging.Logger] = None):
        self.cfg = cfg
        self.topics = topics
        self.clock = clock
        self.window = float(window)
        self.expected = set(expected)
        self.max_devices = int(max_devices)
        self.log = logger or logging.getLogger("edgefed.server")
        self.sa = SecAggServer(cfg, signer=signer, device_keys=device_keys)
        self.stage = "advertise"
        self.stage_deadline = opened_at + self.window

    # ------------------------------------------------------------------ inbound
    def on_message(self, device: str, payload: bytes, outbox: list) -> None:
        """A stage message from `device` (its own secagg topic). Raises SecAggError to reject."""
        m = decode_message(payload, max_bytes=1 << 22)
        if m.sender != device:
            raise SecAggError(f"message from {m.sender!r} arrived on {device!r}'s topic")
        if m.stage == Stage.ADVERTISE:
            if self.stage != "advertise":
                raise SecAggError(f"advertisement from {device} after the roster was sent")
            if len(self.sa.adverts) >= self.max_devices:
                raise SecAggError(f"the round's cohort is full ({self.max_devices} devices)")
            self.sa.add_advertise(payload)
            if self.expected and self.expected <= set(self.sa.adverts):
                self._roster(outbox)
        elif m.stage == Stage.SHARES:
            if self.stage != "shares":
                raise SecAggError(f"shares from {device} outside the share stage ({self.stage})")
            self.sa.add_shares(payload)
            if set(self.sa.shares) == set(self.sa.adverts):
                self._forward(outbox)
        elif m.stage == Stage.UNMASK:
            if self.stage != "unmask":
                raise SecAggError(f"unmask shares from {device} outside the unmask stage ({self.stage})")
            self.sa.add_unmask(payload)
        else:
            raise SecAggError(f"a device does not send {Stage.NAMES[m.stage]} messages")

    def check_update(self, update: Update) -> None:
        """The masked vector of an Update of this round (its signature was checked by the codec)."""
        if self.stage != "masked":
            raise SecAggError(f"update from {update.device} before the forwards went out or after "
                              f"unmasking began ({self.stage})")
        if len(update.tensors) != 1 or update.tensors[0].name != MASKED_TENSOR \
                or update.tensors[0].data.dtype != np.uint32:
            raise SecAggError(f"a secure round's update carries exactly one uint32 tensor "
                              f"{MASKED_TENSOR!r} (the masked vector), nothing in the clear")
        self.sa.add_masked_vector(update.device, from_wire(update.tensors[0].data, self.cfg))

    def accepts_updates_from(self, device: str) -> bool:
        return device in self.sa.shares

    # ------------------------------------------------------------------ stages out
    @staticmethod
    def _publish(outbox: list, topic: str, data: bytes) -> None:
        outbox.append((topic, data, False))  # the stage's bytes are counted by SecAggServer

    def _roster(self, outbox: list) -> None:
        try:
            data = self.sa.roster()
        except SecAggError as e:
            raise SecureRoundFailed(f"key advertisement: {e}") from None
        self._publish(outbox, self.topics.secagg_all(), data)
        self.stage, self.stage_deadline = "shares", self.clock() + self.window
        self.log.info("secure round %d: roster of %d devices sent", self.cfg.round, len(self.sa.adverts))

    def _forward(self, outbox: list) -> None:
        if len(self.sa.shares) < self.cfg.survivors_needed:
            raise SecureRoundFailed(f"share stage: {len(self.sa.shares)} of {len(self.sa.adverts)} devices sent "
                                    f"their shares; {self.cfg.survivors_needed} are needed")
        for d in sorted(self.sa.shares):
            self._publish(outbox, self.topics.secagg_to(d), self.sa.forward(d))
        self.stage, self.stage_deadline = "masked", float("inf")

    def begin_unmask(self, outbox: list) -> None:
        """The engine closed the round: ask the survivors for the shares that remove the masks."""
        try:
            data = self.sa.unmask_request()
        except SecAggError as e:
            raise SecureRoundFailed(f"masked inputs: {e}") from None
        self._publish(outbox, self.topics.secagg_all(), data)
        self.stage, self.stage_deadline = "unmask", self.clock() + self.window

    # ------------------------------------------------------------------ clock
    def tick(self, now: float, outbox: list) -> None:
        """Close a stage whose window ran out (raises SecureRoundFailed when it fell short)."""
        if now < self.stage_deadline:
            return
        if self.stage == "advertise":
            self._roster(outbox)
        elif self.stage == "shares":
            self._forward(outbox)

    def result(self, now: float) -> Optional[Tuple[np.ndarray, List[str]]]:
        """(sum, survivors) once every survivor answered, or at the window's end with enough
        shares; None while waiting. Raises SecureRoundFailed past the window without enough."""
        if self.stage != "unmask":
            return None
        everyone = set(self.sa.unmasks) >= set(self.sa.survivors)
        if not everyone and now < self.stage_deadline:
            return None
        try:
            total, survivors = self.sa.result()
        except SecAggError as e:
            raise SecureRoundFailed(f"unmasking: {e}") from None
        self.stage = "done"
        return total, survivors

    def waiting_until(self) -> float:
        return self.stage_deadline

    def summary(self) -> dict:
        return {"stage": self.stage, "advertised": len(self.sa.adverts), "shared": len(self.sa.shares),
                "masked": len(self.sa.masked), "unmasked": len(self.sa.unmasks),
                "bytes_in": self.sa.bytes_in, "bytes_out": self.sa.bytes_out}
