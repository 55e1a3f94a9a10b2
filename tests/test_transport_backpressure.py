"""Bounded inbound queues (issue: "queues with limits and back-pressure").

A subscriber that is slower than what arrives must not grow memory without bound: the
transport's dispatcher queue is bounded in messages and bytes; QoS 0 past it is dropped at
once, QoS 1 waits a bounded time (back-pressure) and is then dropped, and the MQTT network
thread is never held long enough to miss keepalives. In-process transport first, then one
flood over a real broker (Mosquitto when installed, else the embedded one).
"""
from __future__ import annotations

import itertools
import logging
import sys
import threading
import time

import pytest

from edgefed.transport import InProcBroker, start_broker, topic_matches
from edgefed.transport.base import Dispatcher
from helpers import wait_for

MiB = 1 << 20


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class Gated:
    """A subscriber stuck in its first callback until open() (or one that sleeps per message)."""

    def __init__(self, delay: float = 0.0, stuck: bool = True):
        self.gate = threading.Event()
        if not stuck:
            self.gate.set()
        self.delay = delay
        self.got = []  # (topic, sequence number, length)
        self.lock = threading.Lock()

    def __call__(self, topic, payload):
        with self.lock:
            self.got.append((topic, int.from_bytes(payload[:4], "big"), len(payload)))
        self.gate.wait(30)
        if self.delay:
            time.sleep(self.delay)

    def seqs(self):
        with self.lock:
            return [s for _, s, _ in self.got]


def payload(seq: int, size: int) -> bytes:
    return seq.to_bytes(4, "big") + bytes(size - 4)  # a new object each time (like the network's)


# ----------------------------------------------------------------------------- in-process

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_flood_of_large_qos0_messages_stays_within_the_byte_limit(caplog):
    limit, size, n = 16 * MiB, 4 * MiB, 60  # 240 MiB sent at a subscriber that is stuck
    broker = InProcBroker()
    sub = broker.client("slow", max_inbound_bytes=limit)
    sub.connect()
    slow = Gated()
    sub.subscribe("flood/#", slow)
    attacker = broker.client("attacker")
    attacker.connect()
    topic = "flood/\x1b[31mred\nFAKE LOG LINE/" + "x" * 1000  # valid MQTT; hostile in a log
    caplog.set_level(logging.WARNING, logger="edgefed.transport")

    before, peak_queued = rss(), 0
    attacker.publish(topic, payload(0, size), qos=0)
    assert wait_for(lambda: slow.seqs() == [0])  # the callback holds #0: the rest must queue
    for i in range(1, n):
        attacker.publish(topic, payload(i, size), qos=0)
        peak_queued = max(peak_queued, sub.queued_bytes)
    growth = rss() - before

    fits = limit // (size + len(topic))  # 3 queued besides the one in the callback
    assert peak_queued <= limit and sub.queued_bytes == fits * (size + len(topic))
    assert sub.dropped == n - 1 - fits
    assert growth < 100 * MiB, f"RSS grew {growth / MiB:.0f} MiB for a {limit / MiB:.0f} MiB queue"
    lines = [r for r in caplog.records if "inbound queue full" in r.getMessage()]
    assert 1 <= len(lines) <= 2 < sub.dropped  # rate-limited: not one line per drop
    text = lines[0].getMessage()
    assert "\n" not in text and "\x1b" not in text and len(text) < 600  # repr'd and truncated
    assert "'flood/\\x1b[31mred\\nFAKE LOG LINE/xxx" in text

    slow.gate.set()  # the subscriber catches up: what was queued arrives, in order
    assert broker.wait_idle()
    assert slow.seqs() == list(range(fits + 1))
    assert sub.queued_bytes == 0 and sub._dispatcher.idle()
    attacker.publish("flood/after", payload(99, 10), qos=0)  # and it still receives
    assert broker.wait_idle() and slow.seqs()[-1] == 99
    sub.close()
    attacker.close()


def test_messages_within_the_limits_are_all_delivered_in_order():
    broker = InProcBroker()
    sub = broker.client("sub", max_inbound_messages=50, max_inbound_bytes=1 * MiB)
    sub.connect()
    slow = Gated()
    sub.subscribe("t/+", slow)
    pub = broker.client("pub")
    pub.connect()
    pub.publish("t/0", payload(0, 20_000))
    assert wait_for(lambda: slow.seqs() == [0])  # the callback holds #0
    for i in range(1, 51):  # 50 more fill the count limit exactly (50 x ~20 KB < 1 MiB)
        pub.publish(f"t/{i % 3}", payload(i, 20_000), qos=i % 2)
    assert sub.dropped == 0 and not sub._dispatcher.idle()
    pub.publish("t/0", payload(51, 10), qos=0)  # one past the count limit: the newest is dropped
    assert sub.dropped == 1
    slow.gate.set()
    assert broker.wait_idle()
    assert slow.seqs() == list(range(51))
    assert sub._dispatcher.idle() and sub.queued_bytes == 0 and sub.dropped == 1


def test_qos1_publisher_is_paced_by_a_slow_subscriber_without_loss():
    broker = InProcBroker(max_inbound_messages=4, inbound_block_timeout=5.0)
    sub = broker.client("sub")
    sub.connect()
    slow = Gated(delay=0.005, stuck=False)
    sub.subscribe("q/#", slow)
    pub = broker.client("pub")
    pub.connect()
    peak, t0 = 0, time.monotonic()
    for i in range(100):
        pub.publish("q/x", payload(i, 100), qos=1)  # waits for room instead of dropping
        peak = max(peak, sub._dispatcher.queued_messages)
    elapsed = time.monotonic() - t0
    assert broker.wait_idle()
    assert slow.seqs() == list(range(100)) and sub.dropped == 0
    assert peak <= 4
    assert elapsed >= 0.4  # the publisher ran at the subscriber's pace (~100 x 5 ms)


def test_qos1_waits_once_for_a_stuck_subscriber_then_drops_without_waiting():
    """The producer may be the MQTT network thread: it waits block_timeout once, not per message."""
    broker = InProcBroker(max_inbound_messages=2, inbound_block_timeout=0.3)
    sub = broker.client("sub")
    sub.connect()
    slow = Gated()
    sub.subscribe("q/#", slow)
    pub = broker.client("pub")
    pub.connect()
    pub.publish("q/x", payload(0, 10), qos=1)
    assert wait_for(lambda: slow.seqs() == [0])  # #0 in the callback
    for i in (1, 2):  # queued: the queue is full
        pub.publish("q/x", payload(i, 10), qos=1)
    t0 = time.monotonic()
    pub.publish("q/x", payload(3, 10), qos=1)
    first = time.monotonic() - t0
    for i in range(4, 14):
        pub.publish("q/x", payload(i, 10), qos=1)
    total = time.monotonic() - t0
    assert first >= 0.25  # it did wait for room (back-pressure) ...
    assert total < 1.5, total  # ... but not 11 x 0.3 s
    assert sub.dropped == 11
    slow.gate.set()
    assert broker.wait_idle() and slow.seqs() == [0, 1, 2]
    pub.publish("q/x", payload(20, 10), qos=1)  # progress: delivery as usual again
    assert broker.wait_idle() and slow.seqs()[-1] == 20 and sub.dropped == 11


def test_dispatcher_never_waits_where_waiting_cannot_help():
    d = Dispatcher("t-disp", max_messages=1, max_bytes=1000, block_timeout=5.0)
    gate, started, results = threading.Event(), threading.Event(), []

    def hold(topic, data):
        started.set()
        gate.wait(10)

    def noop(topic, data):
        pass

    def resubmit(topic, data):  # a callback publishing into its own full queue
        assert d.submit(noop, "fill", b"")  # the queue is full again
        t0 = time.monotonic()
        results.append((d.submit(noop, "self", b"x", qos=1), time.monotonic() - t0))

    try:
        assert d.submit(hold, "a", b"1") and started.wait(5)
        assert d.submit(resubmit, "b", b"2")  # queued: the queue is now full
        t0 = time.monotonic()
        assert not d.submit(noop, "big", b"x" * 2000, qos=1)  # over max_bytes: can never fit
        assert time.monotonic() - t0 < 1.0 and d.dropped == 1
        gate.set()
        assert wait_for(lambda: results)
        assert results[0][0] is False and results[0][1] < 1.0  # would have waited for itself
        assert wait_for(d.idle) and d.dropped == 2 and d.queued_bytes == 0
    finally:
        gate.set()
        d.stop()
    with pytest.raises(ValueError):
        Dispatcher("bad", max_messages=0)


def test_stop_releases_a_waiting_producer():
    d = Dispatcher("t-stop", max_messages=1, block_timeout=30.0)
    gate = threading.Event()
    try:
        d.submit(lambda t, p: gate.wait(10), "a", b"")
        assert wait_for(lambda: d.queued_messages == 0)  # #a runs (and hangs)
        assert d.submit(lambda t, p: None, "b", b"")  # the queue is full
        out = []
        th = threading.Thread(target=lambda: out.append(d.submit(lambda t, p: None, "c", b"", qos=1)))
        th.start()
        time.sleep(0.2)
        assert th.is_alive()  # waiting for room
        d.stop(timeout=0)
        th.join(5)
        assert out == [False] and not th.is_alive()  # it did not wait out its 30 s
        assert not d.submit(lambda t, p: None, "late", b"")  # after stop nothing is queued
    finally:
        gate.set()


def test_limits_are_settable_where_transports_are_made():
    from edgefed.transport import make_transport
    from edgefed.transport.mqtt import MqttTransport
    t = make_transport("inproc://bp-limits", "c1", max_inbound_messages=3, max_inbound_bytes=1000)
    assert t.inbound_limits == (3, 1000, 0.5)
    t.connect()
    assert (t._dispatcher.max_messages, t._dispatcher.max_bytes) == (3, 1000)
    t.close()
    with pytest.raises(ValueError, match="already exists"):  # not silently ignored
        make_transport("inproc://bp-limits", "c2", max_inbound_bytes=2000)
    assert InProcBroker().client("x", inbound_block_timeout=0).inbound_limits == (10_000, 64 << 20, 0.0)
    m = make_transport("mqtt://127.0.0.1:1", "m", max_inbound_messages=7, inbound_block_timeout=0.1)
    assert isinstance(m, MqttTransport) and m.inbound_limits == (7, 64 << 20, 0.1)
    for bad in (dict(max_inbound_bytes=0), dict(max_inbound_messages=0),
                dict(inbound_block_timeout=-1.0)):
        with pytest.raises(ValueError):
            MqttTransport("mqtt://127.0.0.1:1", **bad)
        with pytest.raises(ValueError):
            InProcBroker(**bad)


# ----------------------------------------------------------------------------- topic matching

def test_topic_matches_follows_mqtt_including_dollar_topics():
    from paho.mqtt.client import topic_matches_sub
    cases = [("a/#", "a", True), ("a/#", "a/b/c", True), ("a/b/#", "a", False),
             ("#", "$SYS/broker/load", False), ("+/broker/load", "$SYS/broker/load", False),
             ("$SYS/#", "$SYS/broker/load", True), ("$SYS/+/load", "$SYS/broker/load", True),
             ("a/+", "a/", True), ("a/+", "a", False), ("+", "a/b", False), ("a/b", "a/b/", False),
             ("edgefed/j/update/+", "edgefed/j/update/pi-1", True)]
    for flt, topic, want in cases:
        assert topic_matches(flt, topic) is want, (flt, topic)
    levels = ["a", "b", "+", "#", "", "$x"]
    filters = ["/".join(p) for n in (1, 2, 3) for p in itertools.product(levels, repeat=n)
               if "#" not in p[:-1] and not ("$x" in p and p[0] != "$x")]
    topics = ["/".join(p) for n in (1, 2, 3) for p in itertools.product(["a", "b", "", "$x"], repeat=n)]
    for flt in filters:
        for topic in topics:
            assert topic_matches(flt, topic) == topic_matches_sub(flt, topic), (flt, topic)


# ----------------------------------------------------------------------------- real broker

@pytest.fixture(scope="module")
def broker():
    pytest.importorskip("paho.mqtt")
    h = start_broker(prefer="auto")  # Mosquitto when installed (CI), else the embedded broker
    yield h
    h.stop()


def test_qos0_flood_over_mqtt_keeps_the_bound_and_the_connection(broker):
    from edgefed.transport.mqtt import MqttTransport
    limit, size, n = 4 * MiB, 1 * MiB, 60
    fast = dict(reconnect_min_delay=0.1, reconnect_max_delay=1.0, publish_timeout=15.0)
    sub = MqttTransport(broker.url, "bp-slow", keepalive=3, max_inbound_bytes=limit, **fast)
    pub = MqttTransport(broker.url, "bp-flood", **fast)
    slow = Gated()
    peak, sampling = [0], threading.Event()

    def sample():
        while not sampling.is_set():
            peak[0] = max(peak[0], sub.queued_bytes)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        sub.connect()
        sub.subscribe("bp/#", slow, qos=1)
        pub.connect()
        sampler.start()
        pub.publish("bp/flood", payload(0, size), qos=0)
        assert wait_for(lambda: slow.seqs() == [0])
        for i in range(1, n):
            pub.publish("bp/flood", payload(i, size), qos=0)
        fits = limit // (size + len("bp/flood"))  # 3
        assert wait_for(lambda: sub.dropped == n - 1 - fits, timeout=30), sub.dropped
        assert peak[0] <= limit

        # still stuck: QoS-1 messages (too big for the room left) hold paho's network thread
        # once (0.5 s), then are dropped at once
        t0 = time.monotonic()
        for i in range(100, 110):
            pub.publish("bp/q1", payload(i, size), qos=1)
        assert wait_for(lambda: sub.dropped == n - 1 - fits + 10, timeout=10), sub.dropped
        assert time.monotonic() - t0 < 4.0  # not 10 x 0.5 s
        time.sleep(5.0)  # stuck past 1.5 x keepalive: keepalives must still flow
        assert sub.connected and sub.reconnects == 0
        assert peak[0] <= limit

        slow.gate.set()
        assert wait_for(lambda: len(slow.seqs()) == fits + 1)
        pub.publish("bp/after", payload(200, 10), qos=1)
        assert wait_for(lambda: slow.seqs()[-1:] == [200])
        assert slow.seqs() == list(range(fits + 1)) + [200]
        assert sub.connected and sub.reconnects == 0 and sub.queued_bytes == 0
    finally:
        slow.gate.set()
        sampling.set()
        sub.close()
        pub.close()
