"""Chunking inside the transports: oversized payloads go out as EDGC chunks on the same topic
and reach the callbacks whole, once; retained oversize publishes are refused; bad, interleaved
and lost chunks are handled and counted. In-process broker and real brokers (embedded amqtt;
Mosquitto when installed)."""
import logging
import threading
import time

import numpy as np
import pytest

from edgefed import chunking as C
from edgefed.transport import DEFAULT_MAX_PAYLOAD_BYTES, ChunkedPublishHandle, InProcBroker, make_transport
from edgefed.transport import mqtt as M
from edgefed.transport.broker import find_mosquitto
from helpers import Inbox, mqtt_clients, started_broker, wait_for

MiB = 1 << 20
HAVE_MOSQUITTO = find_mosquitto() is not None
KINDS = [pytest.param("mosquitto", marks=[pytest.mark.mosquitto, pytest.mark.skipif(
    not HAVE_MOSQUITTO, reason="mosquitto binary not found (apt-get install mosquitto)")]),
    "embedded"]
FAST = dict(reconnect_min_delay=0.1, reconnect_max_delay=1.0, publish_timeout=30.0)


def blob(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


class FakeClock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


# ----------------------------------------------------------------------------- in-process

@pytest.mark.parametrize("synchronous", [False, True])
def test_inproc_large_payload_is_chunked_and_arrives_once_whole(synchronous):
    b = InProcBroker(synchronous=synchronous)
    pub = b.client("pub", max_payload_bytes=MiB)
    sub = b.client("sub")
    a, both = Inbox(), Inbox()
    with pub, sub:
        sub.subscribe("job/update/+", a)
        sub.subscribe("job/#", both)  # two matching subscriptions: each gets the message once
        big = blob(10 * MiB)
        before = b.published
        h = pub.publish("job/update/dev1", big)
        assert isinstance(h, ChunkedPublishHandle) and h.done and h.error is None
        assert b.published - before == 11  # ten full chunks of 1 MiB - 80 bytes, and the rest
        assert b.wait_idle()
        assert a.payloads() == [big] and both.payloads() == [big]
        assert [t for t, _ in a.items] == ["job/update/dev1"]
        assert pub.chunk_stats()["chunks_sent"] == 11
        assert pub.chunk_stats()["messages_chunked"] == 1
        s = sub.chunk_stats()
        assert (s["chunks_received"], s["messages_reassembled"], s["chunk_errors"],
                s["streams_in_flight"], s["bytes_in_flight"]) == (11, 1, 0, 0, 0)


def test_inproc_small_payloads_are_not_chunked():
    b = InProcBroker()
    pub = b.client("pub", max_payload_bytes=MiB)
    sub = b.client("sub")
    inbox = Inbox()
    with pub, sub:
        sub.subscribe("t/#", inbox)
        exact = blob(MiB, 1)  # exactly the limit: still one message
        before = b.published
        for p in (b"", b"x", exact):
            h = pub.publish("t/a", p)
            assert not isinstance(h, ChunkedPublishHandle)
        assert b.published - before == 3
        assert b.wait_idle() and inbox.payloads() == [b"", b"x", exact]
        assert pub.chunk_stats()["chunks_sent"] == 0 and sub.chunk_stats()["chunks_received"] == 0


def test_default_limit_keeps_todays_messages_whole():
    from edgefed.protocol import Limits
    assert DEFAULT_MAX_PAYLOAD_BYTES == Limits().max_message_bytes == 4 * MiB
    b = InProcBroker()
    pub, sub = b.client("pub"), b.client("sub")
    raw = []
    with pub, sub:
        sub.subscribe("t", lambda t, p: raw.append(p))
        msg = blob(4 * MiB, 2)  # the largest message the default codec limit allows
        pub.publish("t", msg)
        assert b.wait_idle() and raw == [msg] and not C.is_chunk(raw[0])
        assert pub.max_payload_bytes == 4 * MiB


def test_retained_or_will_payload_over_the_limit_is_refused():
    b = InProcBroker()
    pub = b.client("pub", max_payload_bytes=1000)
    with pytest.raises(ValueError, match="max_payload_bytes"):
        pub.set_will("t/will", b"w" * 1001)
    pub.set_will("t/will", b"w" * 1000)
    with pub:
        before = b.published
        with pytest.raises(ValueError, match="retained messages cannot be chunked"):
            pub.publish("t/plan", b"p" * 1001, retain=True)
        assert b.published == before and b.retained("t/plan") is None  # nothing went out
        pub.publish("t/plan", b"p" * 1000, retain=True)  # at the limit: fine
        assert b.retained("t/plan") == b"p" * 1000
        pub.publish("t/other", b"q" * 1001)  # not retained: chunked
        assert b.published - before == 1 + 2


def test_max_payload_bytes_is_checked_and_settable_where_transports_are_made():
    for bad in (0, C.CHUNK_OVERHEAD, 1.5, True, None):
        with pytest.raises(ValueError, match="max_payload_bytes"):
            InProcBroker().client("x", max_payload_bytes=bad)
        with pytest.raises(ValueError, match="max_payload_bytes"):
            M.MqttTransport("mqtt://127.0.0.1:1", "m", max_payload_bytes=bad)
    t = make_transport("inproc://chunk-opts", "c1", max_payload_bytes=2 * MiB,
                       reassembly_ttl_s=7.0, reassembly_max_message_bytes=64 * MiB,
                       max_inbound_bytes=32 * MiB)
    assert t.max_payload_bytes == 2 * MiB and t.inbound_limits[1] == 32 * MiB
    assert t.chunker.reassembler.ttl_s == 7.0
    assert t.chunker.reassembler.max_message_bytes == 64 * MiB
    m = make_transport("mqtt://127.0.0.1:1", "m", max_payload_bytes=256 << 10,
                       reassembly_max_streams_per_sender=3)
    assert isinstance(m, M.MqttTransport) and m.max_payload_bytes == 256 << 10
    assert m.chunker.reassembler.max_streams_per_sender == 3
    assert M.MqttTransport("mqtt://127.0.0.1:1").max_payload_bytes == DEFAULT_MAX_PAYLOAD_BYTES
    with pytest.raises(ValueError, match="not both"):
        InProcBroker().client("x", reassembler=C.Reassembler(), reassembly_ttl_s=1.0)


def test_inproc_interleaved_chunked_messages_on_two_topics_both_reassemble():
    b = InProcBroker()
    raw_pub = b.client("raw")  # publishes ready-made chunks (each under its limit: sent as is)
    sub = b.client("sub")
    inbox = Inbox()
    with raw_pub, sub:
        sub.subscribe("job/update/+", inbox)
        m1, m2 = blob(300_000, 3), blob(250_000, 4)
        c1 = C.split(m1, 42, 64 << 10)  # the same stream id on both topics: keyed by topic
        c2 = C.split(m2, 42, 64 << 10)
        for i in range(max(len(c1), len(c2))):
            for topic, cs in (("job/update/a", c1), ("job/update/b", c2)):
                if i < len(cs):
                    raw_pub.publish(topic, cs[i])
        assert b.wait_idle()
        assert inbox.payloads("job/update/a") == [m1] and inbox.payloads("job/update/b") == [m2]
        assert sub.chunk_stats()["messages_reassembled"] == 2


def test_inproc_concurrent_publishers_on_two_topics():
    b = InProcBroker()
    pubs = [b.client(f"p{i}", max_payload_bytes=100_000) for i in range(2)]
    sub = b.client("sub")
    inbox = Inbox()
    msgs = {f"job/update/d{i}": [blob(1_000_000 + 7 * j, 10 * i + j) for j in range(3)]
            for i in range(2)}
    with pubs[0], pubs[1], sub:
        sub.subscribe("job/update/+", inbox)
        ths = [threading.Thread(target=lambda p=p, t=t: [p.publish(t, m) for m in msgs[t]])
               for p, t in zip(pubs, msgs)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        assert b.wait_idle()
        for t, ms in msgs.items():
            assert inbox.payloads(t) == ms  # whole, once, in order per publisher


def test_inproc_corrupt_chunks_are_counted_and_the_real_message_still_arrives(caplog):
    b = InProcBroker()
    raw_pub = b.client("raw")
    sub = b.client("sub")
    inbox = Inbox()
    topic = "job/update/dev\x1b[31m"  # a control sequence: logged escaped
    with raw_pub, sub:
        sub.subscribe("job/update/+", inbox)
        msg = blob(200_000, 5)
        chunks = C.split(msg, 7, 50_000)
        bad = bytearray(chunks[1])
        bad[100] ^= 0xFF  # CRC mismatch
        with caplog.at_level(logging.WARNING, logger="edgefed.transport"):
            raw_pub.publish(topic, chunks[0])
            raw_pub.publish(topic, bytes(bad))
            raw_pub.publish(topic, b"EDGC" + b"\0" * 10)  # truncated
            for c in chunks[1:]:
                raw_pub.publish(topic, c)
            assert b.wait_idle()
        assert inbox.payloads() == [msg]
        s = sub.chunk_stats()
        assert s["chunk_errors"] == 2 and s["chunk_errors_by_reason"] == {"crc": 1, "truncated": 1}
        assert s["messages_reassembled"] == 1 and s["streams_in_flight"] == 0
    warnings = [r.getMessage() for r in caplog.records if "bad chunk" in r.getMessage()]
    assert len(warnings) == 1  # rate-limited: the second error within 5 s is only counted
    assert "crc" in warnings[0] and "\x1b" not in warnings[0] and "\\x1b" in warnings[0]


def test_inproc_stream_whose_last_chunk_never_comes_is_expired_and_counted(caplog):
    clock = FakeClock()
    b = InProcBroker()
    raw_pub = b.client("raw")
    sub = b.client("sub", reassembler=C.Reassembler(ttl_s=30.0, clock=clock))
    inbox = Inbox()
    with raw_pub, sub:
        sub.subscribe("job/update/+", inbox)
        msg = blob(100_000, 6)
        chunks = C.split(msg, 9, 30_000)
        for c in chunks[:-1]:
            raw_pub.publish("job/update/lost", c)
        assert b.wait_idle()
        s = sub.chunk_stats()
        assert (s["streams_in_flight"], s["streams_lost"]) == (1, 0) and s["bytes_in_flight"] > 0
        clock.t += 31.0
        with caplog.at_level(logging.WARNING, logger="edgefed.transport"):
            s = sub.chunk_stats()  # polling the stats expires stale streams
        assert (s["streams_in_flight"], s["streams_lost"], s["bytes_in_flight"]) == (1 - 1, 1, 0)
        assert any("lost" in r.getMessage() and "job/update/lost" in r.getMessage()
                   for r in caplog.records)
        # a later chunk expires stale streams too, and a complete message still goes through
        for c in chunks[:-1]:
            raw_pub.publish("job/update/lost2", c)
        assert b.wait_idle()
        clock.t += 31.0
        raw_pub.publish("job/update/other", C.split(b"hello", 1, 1000)[0])
        assert b.wait_idle()
        s = sub.chunk_stats()
        assert s["streams_lost"] == 2 and s["streams_in_flight"] == 0
        assert inbox.payloads() == [b"hello"]


def test_inproc_inbound_byte_budget_counts_chunks():
    """A 10 MiB message reaches a subscriber whose inbound queue holds only 3 MiB: chunks, not
    the whole message, pass through the queue (QoS 1 waits for room)."""
    b = InProcBroker(inbound_block_timeout=5.0)
    pub = b.client("pub", max_payload_bytes=MiB)
    sub = b.client("sub", max_inbound_bytes=3 * MiB)
    got = Inbox()
    peak = [0]

    def slow(topic, payload):
        got(topic, payload)

    with pub, sub:
        sub.subscribe("t", slow)
        orig = sub._deliver_chunk

        def watched(topic, payload):
            peak[0] = max(peak[0], sub.queued_bytes)
            time.sleep(0.01)
            orig(topic, payload)

        sub._deliver_chunk = watched
        big = blob(10 * MiB, 8)
        pub.publish("t", big)
        assert b.wait_idle()
        assert got.payloads() == [big] and sub.dropped == 0
        assert 0 < peak[0] <= 3 * MiB


# ----------------------------------------------------------------------------- real brokers

@pytest.fixture(scope="module", params=KINDS)
def broker(request):
    yield from started_broker(request.param)


@pytest.fixture
def clients():
    yield from mqtt_clients(FAST)


class RawSubscriber:
    """A plain paho client: sees the MQTT messages on the wire, chunks not reassembled."""

    def __init__(self, broker, topic):
        import paho.mqtt.client as mqtt
        self.items, self.lock, ready = [], threading.Lock(), threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"raw-{id(self)}",
                             protocol=mqtt.MQTTv311)
        self.c.on_message = lambda cl, u, m: self._add(m.payload)
        self.c.on_subscribe = lambda *a: ready.set()
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        self.c.subscribe(topic, 1)
        assert ready.wait(10)

    def _add(self, p):
        with self.lock:
            self.items.append(bytes(p))

    def payloads(self):
        with self.lock:
            return list(self.items)

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def test_mqtt_large_payload_is_chunked_and_arrives_once_whole(broker, clients):
    topic = "chunk/update/dev1"
    sub = clients(broker.url, "chunk-sub")
    sub.connect()
    inbox, wild = Inbox(), Inbox()
    sub.subscribe("chunk/update/+", inbox)
    sub.subscribe("chunk/#", wild)
    raw = RawSubscriber(broker, "chunk/#")
    pub = clients(broker.url, "chunk-pub", max_payload_bytes=MiB)
    pub.connect()
    try:
        big = blob(10 * MiB, 11)
        h = pub.publish(topic, big, timeout=60)  # waits for every chunk's PUBACK
        assert isinstance(h, ChunkedPublishHandle) and h.done and h.error is None
        assert h.count == 11 and len(h.mids) == 11 and h.acknowledged == 11
        assert wait_for(lambda: inbox.payloads() and wild.payloads(), timeout=60)
        time.sleep(0.3)  # nothing more comes
        assert inbox.payloads() == [big] and wild.payloads() == [big]
        assert wait_for(lambda: len(raw.payloads()) == 11)
        wire = raw.payloads()
        assert all(C.is_chunk(p) and len(p) <= MiB for p in wire)  # each within the limit
        assert [C.parse(p).index for p in wire] == list(range(11))  # in order
        s = sub.chunk_stats()
        # a broker may deliver a message once per overlapping subscription (Mosquitto does):
        # the copies are duplicate chunks, ignored by the reassembler
        assert s["chunks_received"] - s["duplicate_chunks"] == 11
        assert (s["messages_reassembled"], s["chunk_errors"]) == (1, 0)
        assert pub.chunk_stats()["chunks_sent"] == 11

        # QoS 0 chunked publishes go out too (no PUBACKs: the handle completes at once)
        small_big = blob(3 * MiB, 12)
        h0 = pub.publish(topic, small_big, qos=0)
        assert h0.done
        assert wait_for(lambda: len(inbox.payloads()) == 2, timeout=30)
        assert inbox.payloads()[1] == small_big
    finally:
        raw.close()


def test_mqtt_small_payload_is_one_identical_message(broker, clients):
    sub = clients(broker.url, "small-sub")
    sub.connect()
    inbox = Inbox()
    sub.subscribe("small/#", inbox)
    raw = RawSubscriber(broker, "small/#")
    pub = clients(broker.url, "small-pub", max_payload_bytes=MiB)
    pub.connect()
    try:
        msg = blob(MiB, 13)  # exactly at the limit
        h = pub.publish("small/x", msg)
        assert not isinstance(h, ChunkedPublishHandle)
        assert wait_for(lambda: inbox.payloads() and raw.payloads())
        time.sleep(0.3)
        assert raw.payloads() == [msg] and inbox.payloads() == [msg]  # one MQTT message, as is
        assert pub.chunk_stats()["chunks_sent"] == 0 and sub.chunk_stats()["chunks_received"] == 0
    finally:
        raw.close()


def test_mqtt_retained_oversize_is_refused(broker, clients):
    pub = clients(broker.url, "ret-pub", max_payload_bytes=10_000)
    with pytest.raises(ValueError, match="max_payload_bytes"):
        pub.set_will("ret/will", b"w" * 10_001)
    pub.connect()
    with pytest.raises(ValueError, match="retained messages cannot be chunked"):
        pub.publish("ret/plan", b"p" * 10_001, retain=True)
    assert pub.chunk_stats()["chunks_sent"] == 0


def test_mqtt_interleaved_publishers_on_two_topics(broker, clients):
    sub = clients(broker.url, "il-sub")
    sub.connect()
    inbox = Inbox()
    sub.subscribe("il/update/+", inbox)
    pubs = [clients(broker.url, f"il-pub{i}", max_payload_bytes=256 << 10) for i in range(2)]
    msgs = {f"il/update/d{i}": [blob(2 * MiB + j, 20 + 10 * i + j) for j in range(2)]
            for i in range(2)}
    for p in pubs:
        p.connect()
    ths = [threading.Thread(target=lambda p=p, t=t: [p.publish(t, m, timeout=60) for m in msgs[t]])
           for p, t in zip(pubs, msgs)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    assert wait_for(lambda: len(inbox.payloads()) == 4, timeout=60)
    for t, ms in msgs.items():
        assert inbox.payloads(t) == ms
    # and chunks interleaved on the wire by hand, with one corrupt chunk injected
    raw_pub = clients(broker.url, "il-raw")
    raw_pub.connect()
    m1, m2 = blob(300_000, 30), blob(200_000, 31)
    c1, c2 = C.split(m1, 5, 64 << 10), C.split(m2, 5, 64 << 10)
    bad = bytearray(c1[0])
    bad[-1] ^= 1
    raw_pub.publish("il/update/a", bytes(bad))
    for i in range(len(c1)):
        raw_pub.publish("il/update/a", c1[i])
        if i < len(c2):
            raw_pub.publish("il/update/b", c2[i])
    assert wait_for(lambda: len(inbox.payloads()) == 6, timeout=30)
    assert inbox.payloads("il/update/a")[-1] == m1 and inbox.payloads("il/update/b")[-1] == m2
    s = sub.chunk_stats()
    assert s["chunk_errors"] == 1 and s["chunk_errors_by_reason"] == {"crc": 1}
    assert s["messages_reassembled"] == 6 and s["streams_in_flight"] == 0


def test_mqtt_lost_last_chunk_expires(broker, clients):
    clock = FakeClock()
    sub = clients(broker.url, "lost-sub", reassembler=C.Reassembler(ttl_s=5.0, clock=clock))
    sub.connect()
    inbox = Inbox()
    sub.subscribe("lost/+", inbox)
    raw_pub = clients(broker.url, "lost-raw")
    raw_pub.connect()
    chunks = C.split(blob(100_000, 40), 77, 40_000)
    for c in chunks[:-1]:
        raw_pub.publish("lost/a", c)
    assert wait_for(lambda: sub.chunk_stats()["chunks_received"] == len(chunks) - 1)
    assert sub.chunk_stats()["streams_in_flight"] == 1
    clock.t += 6.0
    s = sub.chunk_stats()
    assert (s["streams_lost"], s["streams_in_flight"], s["bytes_in_flight"]) == (1, 0, 0)
    assert inbox.payloads() == []


def test_chunked_publish_handle_completes_after_every_chunk_or_the_first_error():
    from edgefed.transport import PublishTimeout, TransportError
    h = ChunkedPublishHandle(3)
    parts = [h.part(mid) for mid in (5, 6, 7)]
    assert h.mid == 5 and h.mids == [5, 6, 7]
    parts[2]._complete()
    parts[0]._complete()
    assert not h.done and h.acknowledged == 2
    with pytest.raises(PublishTimeout, match="2 of 3 chunks acknowledged"):
        h.wait(0.01)
    parts[1]._complete()
    assert h.done and h.wait(0) is h
    h = ChunkedPublishHandle(3)
    parts = [h.part(mid) for mid in (1, 2, 3)]
    parts[0]._complete()
    parts[1]._complete(TransportError("refused"))
    parts[2]._complete(TransportError("later"))
    with pytest.raises(TransportError, match="refused"):
        h.wait(0)
