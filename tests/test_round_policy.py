"""The pure round policy (edgefed_server.round_policy): plain numbers and a fake clock, no
server, transport or store."""
from __future__ import annotations

import math

import pytest

from edgefed_server import round_policy as rp
from edgefed_server.round_policy import Action, ExpectedChange, RoundView


class FakeClock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def view(clock, **kw):
    base = dict(now=clock(), deadline=1030.0, accepted=0, expected=3, min_devices=1,
                devices_per_round=0, round_timeout=30.0)
    base.update(kw)
    return RoundView(**base)


def test_target_and_quorum():
    assert rp.quorum(0) == 1 and rp.quorum(-5) == 1 and rp.quorum(3) == 3
    assert rp.target(1, 0, 3) == 3          # every expected device
    assert rp.target(1, 0, 0) == 1          # never below the quorum
    assert rp.target(4, 0, 3) == 4
    assert rp.target(1, 2, 10) == 2         # devices_per_round wins over the expected count
    assert rp.target(5, 2, 10) == 5         # ... but not over the quorum


def test_closes_as_soon_as_the_target_is_reached():
    clock = FakeClock()
    assert rp.on_message(view(clock, accepted=2)).action is Action.WAIT
    d = rp.on_message(view(clock, accepted=3))
    assert d.action is Action.CLOSE and "3/3" in d.reason
    # devices_per_round: two of five expected devices are enough
    assert rp.on_message(view(clock, accepted=2, expected=5, devices_per_round=2)).action is Action.CLOSE
    assert rp.on_message(view(clock, accepted=1, expected=5, devices_per_round=2)).action is Action.WAIT


def test_waits_until_the_deadline_otherwise():
    clock = FakeClock()
    d = rp.on_message(view(clock, accepted=1))
    assert d.action is Action.WAIT and d.until == 1030.0
    d = rp.on_tick(view(clock, accepted=1))
    assert d.action is Action.WAIT and d.until == 1030.0
    clock.t = 1029.999
    assert rp.on_tick(view(clock, accepted=1)).action is Action.WAIT
    clock.t = 1030.0  # at the deadline with quorum: close
    d = rp.on_tick(view(clock, accepted=1))
    assert d.action is Action.CLOSE and "deadline" in d.reason


def test_the_tick_does_not_close_on_the_target_before_the_deadline():
    """A round whose aggregation failed with the target reached waits for its deadline (closing
    happens per message), so a failing strategy is not retried on every tick."""
    clock = FakeClock()
    assert rp.on_tick(view(clock, accepted=3)).action is Action.WAIT
    clock.t = 1031.0
    assert rp.on_tick(view(clock, accepted=3)).action is Action.CLOSE


def test_below_quorum_at_the_deadline_the_round_is_extended_again_and_again():
    clock = FakeClock()
    deadline = 1030.0
    for _ in range(3):
        clock.t = deadline + 0.5
        d = rp.on_tick(view(clock, deadline=deadline, accepted=1, min_devices=2))
        assert d.action is Action.EXTEND and d.until == clock.t + 30.0
        assert "only 1 of min_devices=2" in d.reason
        deadline = d.until
        assert rp.on_tick(view(clock, deadline=deadline, accepted=1, min_devices=2)).action is Action.WAIT
    clock.t = deadline
    # quorum met in the extension: the next deadline closes it
    assert rp.on_tick(view(clock, deadline=deadline, accepted=2, min_devices=2)).action is Action.CLOSE
    # nobody at all: extended too (min_devices 0 still needs one update)
    assert rp.on_tick(view(clock, deadline=deadline, accepted=0, min_devices=0)).action is Action.EXTEND


def test_messages_of_a_batch_count_before_the_deadline_decides():
    """on_message never extends or closes on the deadline: that is the tick's decision, taken
    after every message of the batch was counted."""
    clock = FakeClock(2000.0)
    d = rp.on_message(view(clock, accepted=0, min_devices=2))
    assert d.action is Action.WAIT


def test_device_errors_and_offline_devices_stop_being_waited_for():
    ch = rp.expected_change
    # an error before contributing: the device skips the round
    assert ch("error", True, True, accepted=False, expected=True) is ExpectedChange.SKIPS
    assert ch("error", True, True, accepted=True, expected=True) is None   # it already delivered
    assert ch("error", True, True, accepted=False, expected=False) is None
    # offline before contributing
    assert ch("offline", False, True, accepted=False, expected=True) is ExpectedChange.OFFLINE
    assert ch("offline", False, True, accepted=True, expected=True) is None
    # online: counted when countable
    assert ch("online", True, True, accepted=False, expected=False) is ExpectedChange.ADD
    assert ch("online", True, False, accepted=False, expected=False) is None
    assert ch("training", True, True, accepted=False, expected=True) is None  # already counted
    # with three expected devices, one error: the target drops to two and two updates close it
    clock = FakeClock()
    assert rp.on_message(view(clock, accepted=2, expected=3)).action is Action.WAIT
    assert rp.on_message(view(clock, accepted=2, expected=2)).action is Action.CLOSE


def test_countable_devices():
    assert rp.countable(0, proven=False)        # round 0: every registered device
    assert not rp.countable(1, proven=False)    # later: only devices that delivered once
    assert rp.countable(5, proven=True)


def test_finished_job_or_no_plan_is_idle():
    clock = FakeClock(5000.0)
    for fn in (rp.on_message, rp.on_tick):
        assert fn(view(clock, accepted=9, open=False)).action is Action.IDLE
    assert rp.wait_time(clock(), 0.0, open_round=False) == rp.MAX_WAIT
    assert rp.phase(True, False, False, 0) == "done"


def test_due_at_and_wait_time():
    assert rp.due_at(1030.0) == 1030.0
    assert rp.due_at(1030.0, "advertise", 1010.0) == 1010.0
    assert rp.due_at(1030.0, "masked", math.inf) == 1030.0
    assert rp.due_at(1030.0, "unmask", 1050.0) == 1050.0  # the round closed: only the window
    assert rp.wait_time(1000.0, 1030.0, True) == rp.MAX_WAIT
    assert rp.wait_time(1000.0, 1000.05, True) == pytest.approx(0.05)
    assert rp.wait_time(1000.0, 999.0, True) == 0.001


def test_phase():
    assert rp.phase(False, True, True, 0) == "stopped"
    assert rp.phase(False, False, False, 0) == "starting"
    assert rp.phase(False, False, True, 2) == "extended"
    assert rp.phase(False, False, True, 0) == "collecting"
