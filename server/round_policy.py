"""The round policy, as pure functions of numbers: when a round closes, waits, or is extended,
and which devices the target counts. No clock (the caller passes `now`), threads, transport
or store, so it is tested with plain numbers (tests/test_round_policy.py); the engine
(server/engine.py) feeds it its counts and carries out what it decides.

    target  = devices_per_round if > 0, else the expected devices; never below the quorum
    quorum  = min_devices (at least 1)
    after each message: close as soon as accepted >= target
    at each tick (no message needed): before the deadline wait for it; at the deadline close
        with accepted >= quorum, else retry the round: same plan, deadline += round_timeout

docs/server.md "Round policy" has the same in prose.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Optional

__all__ = ["Action", "Decision", "RoundView", "quorum", "target", "on_message", "on_tick",
           "countable", "ExpectedChange", "expected_change", "due_at", "wait_time", "phase",
           "MAX_WAIT"]

MAX_WAIT = 0.2  # the engine looks at the clock at least this often (fake clocks in tests move)


class Action(enum.Enum):
    WAIT = "wait"          # nothing to do before `until`
    CLOSE = "close"        # aggregate the round now
    EXTEND = "extend"      # below quorum at the deadline: same plan, new deadline `until`
    IDLE = "idle"          # no open round (the job is finished or has no plan yet)


@dataclass(frozen=True)
class Decision:
    action: Action
    until: float = math.inf  # WAIT: the deadline; EXTEND: the new deadline
    reason: str = ""


@dataclass(frozen=True)
class RoundView:
    """What the policy looks at: the open round's counts and times (engine's clock units)."""
    now: float
    deadline: float
    accepted: int              # accepted updates this round
    expected: int              # devices that count toward the target (online, countable)
    min_devices: int
    devices_per_round: int
    round_timeout: float
    open: bool = True          # False: finished job or no plan yet


def quorum(min_devices: int) -> int:
    """Fewest accepted updates that may close a round at its deadline."""
    return max(1, int(min_devices))


def target(min_devices: int, devices_per_round: int, expected: int) -> int:
    """Accepted updates that close a round before its deadline: devices_per_round when set,
    else every expected device; never fewer than the quorum."""
    q = quorum(min_devices)
    if int(devices_per_round) > 0:
        return max(int(devices_per_round), q)
    return max(int(expected), q)


def on_message(v: RoundView) -> Decision:
    """After a message (an update, or a status that changed the expected devices): close once
    the target is reached. The deadline is the tick's business: a batch's messages all count
    before a deadline closes or extends the round."""
    if not v.open:
        return Decision(Action.IDLE)
    t = target(v.min_devices, v.devices_per_round, v.expected)
    if v.accepted >= t:
        return Decision(Action.CLOSE, reason=f"target reached ({v.accepted}/{t} updates)")
    return Decision(Action.WAIT, v.deadline)


def on_tick(v: RoundView) -> Decision:
    """After a batch or a timeout: the deadline policy. It does not close on the target (that
    happens per message), so a round whose aggregation failed waits for its deadline."""
    if not v.open:
        return Decision(Action.IDLE)
    if v.now < v.deadline:
        return Decision(Action.WAIT, v.deadline)
    if v.accepted >= quorum(v.min_devices):
        return Decision(Action.CLOSE, reason=f"deadline reached with {v.accepted}/"
                        f"{target(v.min_devices, v.devices_per_round, v.expected)} updates")
    return Decision(Action.EXTEND, v.now + float(v.round_timeout),
                    reason=f"only {v.accepted} of min_devices={v.min_devices} accepted updates "
                           f"at the deadline")


def countable(round_id: int, proven: bool) -> bool:
    """Whether an online device counts toward the target: in round 0 every registered device
    (nobody has been accepted yet), later only devices with an accepted update in the job
    (`proven`), so a device that never delivers does not hold every round to its deadline."""
    return round_id == 0 or bool(proven)


class ExpectedChange(enum.Enum):
    ADD = "add"
    SKIPS = "skips"        # the device reported an error: it sits this round out
    OFFLINE = "offline"    # it went offline before contributing


def expected_change(state: str, online: bool, countable_now: bool, accepted: bool,
                    expected: bool) -> Optional[ExpectedChange]:
    """How a device's Status changes the expected set (None: no change). A device that
    already contributed stays counted whatever it reports."""
    if state == "error":
        return ExpectedChange.SKIPS if not accepted and expected else None
    if online:
        return ExpectedChange.ADD if countable_now and not expected else None
    return ExpectedChange.OFFLINE if not accepted and expected else None


def due_at(deadline: float, secure_stage: Optional[str] = None, secure_until: float = math.inf) -> float:
    """When the engine must act without a message: the round's deadline, or a secure stage's
    window (during unmasking only the window: the round has already closed)."""
    if secure_stage is None:
        return deadline
    if secure_stage == "unmask":
        return secure_until
    return min(deadline, secure_until)


def wait_time(now: float, due: float, open_round: bool) -> float:
    """How long the engine blocks on its queue before it looks at the clock again."""
    if not open_round:
        return MAX_WAIT
    return min(MAX_WAIT, max(0.001, due - now))


def phase(done: bool, stopped: bool, has_plan: bool, extensions: int) -> str:
    """The round's phase for /status."""
    return ("done" if done else "stopped" if stopped else "starting" if not has_plan else
            "extended" if extensions else "collecting")
