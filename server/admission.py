"""Admission of an inbound update: what happens to it, decided in the documented order
(docs/server.md "Update handling"), without writing anything. The engine decodes the message,
looks up its (device, msg_id) row, asks `Admission.decide`, then performs the store writes,
the metrics, the log line and the Ack that the decision names.

    1. the same (device, msg_id) is stored       -> REPEAT its original Ack
    2. unknown device / past max_devices         -> REJECT unknown_device / device_cap
    3. round closed or job finished              -> LATE (stored within quotas, never aggregated)
    4. round not started                         -> REJECT future_round
    5. a second update of the device this round  -> DUPLICATE (stored within quotas)
    6. protocol.validate_update (job, round, method) -> REJECT by reason class
    7. secure round: the masked vector; else strategy.validate_update (the method's tensor
       names, dtypes and values: each strategy refuses tensors it does not expect)
                                                 -> REJECT secagg / strategy
    8. otherwise                                 -> ACCEPT

`ExtraRowQuota` decides how a late or duplicate update is kept (docs/server.md "Resource
limits"): not at all past the per-device / per-round row quotas, with its raw bytes while the
late-raw quotas allow, else as size + sha256.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional

from edgefed.methods import JobConfig, MethodState, ServerStrategy
from edgefed.assign import plan_for
from edgefed.protocol import (AckStatus, BadMagic, ChecksumMismatch, InvalidField, MessageTooLarge,
                              ProtocolError, RoundMismatch, RoundPlan, SignatureError, Topics,
                              TruncatedMessage, UnsupportedVersion, Update, validate_update)

from .limits import ResourceLimits

__all__ = ["Verdict", "Decision", "Admission", "AcceptedMeta", "Keep", "ExtraRowQuota", "reason_class",
           "reject"]


@dataclass(frozen=True)
class AcceptedMeta:
    """What the engine keeps of an accepted update once the accumulator has it: enough for the
    round's metrics and a secure round's aggregate_secure, never the payload (so a streaming
    strategy's server memory does not grow with the devices)."""
    device: str
    round: int
    msg_id: int
    num_samples: int
    train_loss: float

    @classmethod
    def of(cls, u: Update) -> "AcceptedMeta":
        return cls(u.device, int(u.round), int(u.msg_id), int(u.num_samples), float(u.train_loss))

    def stub(self, job: str, method: str) -> Update:
        """An Update with the metadata only (aggregate_secure reads num_samples / train_loss)."""
        return Update(job=job, round=self.round, device=self.device, method=method,
                      msg_id=self.msg_id, num_samples=self.num_samples, train_loss=self.train_loss)


def reason_class(exc: BaseException) -> str:
    """Label of a rejection for metrics (edgefed_updates_rejected_total{reason=...})."""
    for cls, name in ((MessageTooLarge, "too_large"), (TruncatedMessage, "truncated"),
                      (BadMagic, "bad_magic"), (UnsupportedVersion, "version"),
                      (ChecksumMismatch, "checksum"), (SignatureError, "signature"),
                      (RoundMismatch, "round"),
                      (InvalidField, "invalid_field"), (ProtocolError, "protocol")):
        if isinstance(exc, cls):
            return name
    return "internal"


class Verdict(enum.Enum):
    ACCEPT = "accept"        # store as accepted, add to the round, ack ACCEPTED
    REPEAT = "repeat"        # a redelivery: the stored Ack again, nothing stored
    LATE = "late"            # store as late (quotas), ack LATE
    DUPLICATE = "duplicate"  # store as a duplicate of the round (quotas), ack DUPLICATE
    REJECT = "reject"        # nothing stored, ack REJECTED


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    status: AckStatus
    ack_round: int           # the round the Ack names
    reason: str = ""
    label: str = ""          # REJECT: the metrics label (reason class)
    device_refused: bool = False  # REJECT by the device cap (counted as devices_refused)


def reject(label: str, reason: str, ack_round: int, **kw: Any) -> Decision:
    return Decision(Verdict.REJECT, AckStatus.REJECTED, ack_round, reason, label, **kw)


class Admission:
    """The admission rules of one job's server (stateless between calls but for the secure
    round's check, which records the masked vector it accepts)."""

    def __init__(self, topics: Topics, *, allow_unknown_devices: bool, max_devices: int):
        self.topics = topics
        self.allow_unknown_devices = allow_unknown_devices
        self.max_devices = int(max_devices)

    def registry_full(self, device: str, devices: Mapping[str, Any]) -> bool:
        """Whether `device` would be one registered device too many (max_devices): a Status or,
        with allow_unknown_devices, an update from a new device is refused past it."""
        return device not in devices and len(devices) >= self.max_devices

    def decide(self, msg: Update, prev: Optional[dict], *, job: JobConfig, strategy: ServerStrategy,
               state: Optional[MethodState], plan: Optional[RoundPlan], round_id: int, done: bool,
               accepted: Mapping[str, Any], devices: Mapping[str, Any], secure: Any = None,
               validated: bool = False) -> Decision:
        """prev: the stored row of (msg.device, msg.msg_id) (Store.find_update), or None.
        accepted: device -> (AcceptedMeta, size) of the open round. secure: its SecureRound.
        validated: an aggregation worker already checked steps 6-7 (the device's plan, the
        protocol and the method's validation; server/worker.py): only the job's state is judged."""
        device = msg.device
        if prev is not None:  # QoS-1 redelivery or a device retry: the same answer again
            return Decision(Verdict.REPEAT, AckStatus(prev["status"]), prev["round"], prev["reason"])
        if device not in devices:
            if not self.allow_unknown_devices:
                return reject("unknown_device", f"unknown device {device!r}: it must publish its Status "
                              f"on {self.topics.status(device)} before sending updates", msg.round)
            if self.registry_full(device, devices):
                return reject("device_cap", f"device {device!r} refused: the job has "
                              f"{len(devices)} registered devices (max_devices "
                              f"{self.max_devices})", msg.round, device_refused=True)
        if done or msg.round < round_id:
            reason = (f"round {msg.round} is closed (the job is finished)" if done else
                      f"round {msg.round} is closed; the current round is {round_id}: sync and "
                      f"train on the current plan")
            return Decision(Verdict.LATE, AckStatus.LATE, msg.round, reason)
        if msg.round > round_id:
            return reject("future_round", f"update from {device} is for round {msg.round}, which has "
                          f"not started (current round {round_id})", msg.round)
        if device in accepted:
            first = accepted[device][0]
            reason = (f"an update from {device} for round {msg.round} was already accepted "
                      f"(msg_id {first.msg_id}); one update per device and round")
            return Decision(Verdict.DUPLICATE, AckStatus.DUPLICATE, msg.round, reason)
        assert plan is not None and state is not None
        if validated:
            return Decision(Verdict.ACCEPT, AckStatus.ACCEPTED, msg.round)
        try:  # this device's part of the plan (edgefed.assign): selected, with its class's settings
            mine = plan_for(plan, device, str((devices.get(device) or {}).get("device_class", "")))
        except ValueError as e:
            return reject("plan", f"the plan's per-device rules cannot be read: {e}", msg.round)
        if mine is None:
            return reject("not_selected", f"{device} is not selected for round {msg.round} (select_fraction="
                          f"{plan.params.get('select_fraction')}): it sits this round out", msg.round)
        plan = mine
        try:
            validate_update(msg, plan)
        except ProtocolError as e:
            return reject(reason_class(e), str(e), msg.round)
        if secure is not None:  # the masked vector; its meaning is known only as a sum
            from edgefed.methods.base import check_num_samples
            from edgefed.security.secagg import SecAggError
            try:
                check_num_samples(plan, msg)
                secure.check_update(msg)
            except (ProtocolError, SecAggError) as e:
                return reject("secagg", str(e), msg.round)
        else:
            try:
                strategy.validate_update(job, state, plan, msg)
            except ProtocolError as e:
                return reject("strategy", str(e), msg.round)
            except Exception as e:
                return reject("strategy", f"{job.method} refused the update: {e!r}", msg.round)
        return Decision(Verdict.ACCEPT, AckStatus.ACCEPTED, msg.round)


class Keep(enum.Enum):
    NONE = "not stored (quota)"  # acked the same, no row
    RAW = "stored"               # a row with the raw bytes
    DIGEST = "stored as digest"  # a row with size + sha256 only


class ExtraRowQuota:
    """Rows for late and duplicate updates: at most extra_rows_per_device per device and
    extra_rows_per_round in all per arrival round (the server's round when they arrived); raw
    bytes only for late updates, while the device has fewer than late_raw_per_device (whole job)
    and the arrival round fewer than late_raw_per_round raw late rows. Duplicates are never
    kept raw (they are a copy of nothing the server needs)."""

    def __init__(self, limits: ResourceLimits, count_raw_late: Callable[[str], int]):
        self.limits = limits
        self.count_raw_late = count_raw_late  # the device's raw late rows in the store (first use)
        self.rows: Dict[str, int] = {}        # late/duplicate rows per device, this arrival round
        self.rows_round = 0
        self.raw_late: Dict[str, int] = {}    # raw late rows per device (whole job)
        self.raw_late_round = 0

    def place(self, device: str, late: bool) -> Keep:
        rl = self.limits
        if self.rows.get(device, 0) >= rl.extra_rows_per_device or self.rows_round >= rl.extra_rows_per_round:
            return Keep.NONE
        if late and self.raw_late_round < rl.late_raw_per_round:
            if device not in self.raw_late:
                self.raw_late[device] = self.count_raw_late(device)
            if self.raw_late[device] < rl.late_raw_per_device:
                return Keep.RAW
        return Keep.DIGEST

    def charge(self, device: str, keep: Keep) -> None:
        """After the row of a place()d update was written."""
        if keep is Keep.NONE:
            return
        self.rows[device] = self.rows.get(device, 0) + 1
        self.rows_round += 1
        if keep is Keep.RAW:
            self.raw_late[device] += 1
            self.raw_late_round += 1

    def new_round(self) -> None:
        """The arrival round moved on: per-round quotas start again (raw counts per device stay)."""
        self.rows, self.rows_round, self.raw_late_round = {}, 0, 0

    def forget_raw_counts(self) -> None:
        """After a reload: the per-device raw counts are read from the store again."""
        self.raw_late.clear()
