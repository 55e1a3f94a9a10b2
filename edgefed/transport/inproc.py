"""In-process broker and transport for simulation (many virtual devices in one process).

Same semantics as MQTT where the engine can tell: topic filters with + and #, retained
messages (an empty retained payload clears), last will on an abnormal disconnect (crash()),
the same payload bytes. Delivery is reliable while subscribers keep up.

Two delivery modes:
- threaded (default): each client has a dispatcher thread, like MqttTransport, with the same
  bounded queue (max_inbound_messages, max_inbound_bytes, inbound_block_timeout: per client,
  defaults per broker). When a subscriber's queue is full, a QoS-0 message to it is dropped and
  a QoS-1/2 publish waits (outside the broker lock) up to inbound_block_timeout s for room,
  then drops that copy (base.Dispatcher). Messages of one publisher keep their order.
- synchronous: no threads; the publishing thread runs the callbacks from a broker-wide FIFO.
  A callback that publishes does not recurse: its message is queued and delivered after it
  returns, so a long simulation never grows the stack. Callbacks must not block waiting for
  another thread's publish in this mode.

Chunking works as over MQTT (base.Chunker): each client has its own max_payload_bytes
(default 4 MiB) and publishes larger payloads as chunks, each one a separate broker message;
a chunk goes to each subscribed client once (not once per matching subscription), through its
queue, and the client's dispatcher (or, synchronous, the draining thread) reassembles it and
runs every matching callback with the whole message.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from typing import Any, Dict, List, Optional, Tuple

from edgefed.chunking import Reassembler, is_chunk

from .base import (DEFAULT_INBOUND_BLOCK_TIMEOUT, DEFAULT_MAX_INBOUND_BYTES,
                   DEFAULT_MAX_INBOUND_MESSAGES, DEFAULT_MAX_PAYLOAD_BYTES, Callback, Chunker,
                   ChunkedPublishHandle, Dispatcher, NotConnected, PublishHandle, Transport,
                   TransportError, check_inbound_limits, check_topic_filter, check_topic_name, log,
                   topic_matches)

_Pending = List[Tuple[Dispatcher, Callback, str, bytes, int]]  # waits for room, outside the lock
_LIMIT_NAMES = ("max_inbound_messages", "max_inbound_bytes", "inbound_block_timeout")


class InProcBroker:
    _named: Dict[str, "InProcBroker"] = {}
    _named_lock = threading.Lock()

    def __init__(self, synchronous: bool = False, *,
                 max_inbound_messages: int = DEFAULT_MAX_INBOUND_MESSAGES,
                 max_inbound_bytes: int = DEFAULT_MAX_INBOUND_BYTES,
                 inbound_block_timeout: float = DEFAULT_INBOUND_BLOCK_TIMEOUT):
        self.synchronous = synchronous
        # defaults for the clients' inbound queues (threaded mode), see base.Dispatcher
        self.inbound_limits = check_inbound_limits(max_inbound_messages, max_inbound_bytes,
                                                   inbound_block_timeout)
        self._lock = threading.RLock()
        self._clients: Dict[str, "InProcTransport"] = {}
        self._retained: Dict[str, bytes] = {}
        self._share_next: Dict[str, int] = {}  # shared subscription group -> next member
        self._sync_q: deque = deque()
        self._drain_lock = threading.Lock()
        self._tls = threading.local()
        self._ids = itertools.count(1)
        self.published = 0  # messages accepted (for tests and simulation stats)

    @classmethod
    def named(cls, name: str, synchronous: bool = False, **inbound_limits: float) -> "InProcBroker":
        """A process-wide broker by name, so `inproc://name` URLs meet the same broker.
        `inbound_limits` (max_inbound_messages=, ...) set its clients' queue limits when it is
        created; asking an existing broker for other limits is an error, not silently ignored."""
        with cls._named_lock:
            if name not in cls._named:
                cls._named[name] = cls(synchronous=synchronous, **inbound_limits)  # type: ignore[arg-type]
            elif inbound_limits:
                b = cls._named[name]
                want = check_inbound_limits(**{**dict(zip(_LIMIT_NAMES, b.inbound_limits)),
                                               **inbound_limits})
                if want != b.inbound_limits:
                    raise ValueError(f"in-process broker {name!r} already exists with inbound "
                                     f"limits {b.inbound_limits}, not {want}")
            return cls._named[name]

    def client(self, client_id: Optional[str] = None, **options: Any) -> "InProcTransport":
        """A transport on this broker; options: InProcTransport's (inbound limits, chunking)."""
        return InProcTransport(self, client_id, **options)

    def retained(self, topic: str) -> Optional[bytes]:
        with self._lock:
            return self._retained.get(topic)

    # ------------------------------------------------------------------ internals
    def _attach(self, t: "InProcTransport") -> None:
        with self._lock:
            old = self._clients.get(t.client_id)
            if old is not None and old is not t:  # MQTT session takeover: the old one is dropped
                old._detached()
            self._clients[t.client_id] = t

    def _detach(self, t: "InProcTransport", abnormal: bool) -> None:
        with self._lock:
            if self._clients.get(t.client_id) is t:
                del self._clients[t.client_id]
            will = t._will if abnormal else None
        if will is not None:
            topic, payload, qos, retain = will
            self._publish(topic, payload, retain, qos)

    def _publish(self, topic: str, payload: bytes, retain: bool, qos: int = 1) -> None:
        pending: _Pending = []
        with self._lock:
            self.published += 1
            if retain:
                if payload:
                    self._retained[topic] = payload
                else:
                    self._retained.pop(topic, None)
            chunk = is_chunk(payload)
            shared: dict = {}  # $share/<group>/...: one member of each group gets it (round robin)
            for c in self._clients.values():
                if chunk:  # once per client: it reassembles, then runs every matching callback
                    if any(topic_matches(flt, topic) for flt in c._subs):
                        self._enqueue(c, c._deliver_chunk, topic, payload, qos, pending)
                    continue
                for flt, cb in c._subs.items():
                    if topic_matches(flt, topic):
                        if flt.startswith("$share/"):
                            shared.setdefault(flt.split("/", 2)[1], []).append((c, cb))
                        else:
                            self._enqueue(c, cb, topic, payload, qos, pending)
            for group, members in sorted(shared.items()):
                n = self._share_next.get(group, 0)
                self._share_next[group] = n + 1
                c, cb = members[n % len(members)]
                self._enqueue(c, cb, topic, payload, qos, pending)
        self._wait_for_room(pending)
        self._drain()

    def _deliver_retained(self, c: "InProcTransport", flt: str, cb: Callback) -> None:
        pending: _Pending = []
        with self._lock:
            if flt.startswith("$share/"):  # MQTT 5: no retained messages for shared subscriptions
                return
            for topic, payload in self._retained.items():
                if topic_matches(flt, topic):
                    self._enqueue(c, cb, topic, payload, 1, pending)
        self._wait_for_room(pending)
        self._drain()

    def _enqueue(self, c: "InProcTransport", cb: Callback, topic: str, payload: bytes, qos: int,
                 pending: _Pending) -> None:
        d = c._dispatcher
        if self.synchronous:
            self._sync_q.append((cb, topic, payload))
        elif d is None:
            return
        elif qos == 0:
            d.submit(cb, topic, payload, qos=0)  # queued, or dropped when full: never waits
        elif not d.try_submit(cb, topic, payload):
            pending.append((d, cb, topic, payload, qos))  # full: wait, but not holding the lock

    @staticmethod
    def _wait_for_room(pending: _Pending) -> None:
        for d, cb, topic, payload, qos in pending:
            d.submit(cb, topic, payload, qos=qos)

    def _drain(self) -> None:
        if not self.synchronous or getattr(self._tls, "draining", False):
            return  # threaded mode, or an outer frame of this thread is already draining
        with self._drain_lock:
            self._tls.draining = True
            try:
                while True:
                    with self._lock:
                        if not self._sync_q:
                            return
                        cb, topic, payload = self._sync_q.popleft()
                    try:
                        cb(topic, payload)
                    except Exception:
                        log.exception("subscriber callback failed for topic %s", topic)
            finally:
                self._tls.draining = False

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Threaded mode: wait until every client's callbacks have caught up."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                busy = [c for c in self._clients.values()
                        if c._dispatcher is not None and not c._dispatcher.idle()]
            if not busy and not self._sync_q:
                return True
            time.sleep(0.002)
        return False


class InProcTransport(Transport):
    def __init__(self, broker: InProcBroker, client_id: Optional[str] = None, *,
                 max_inbound_messages: Optional[int] = None, max_inbound_bytes: Optional[int] = None,
                 inbound_block_timeout: Optional[float] = None,
                 max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
                 reassembler: Optional[Reassembler] = None, **reassembly: Any):
        self.broker = broker
        self.client_id = client_id or f"inproc-{next(broker._ids)}"
        self._chunker = Chunker(f"edgefed-inproc-{self.client_id}", max_payload_bytes, reassembler,
                                **reassembly)
        given = (max_inbound_messages, max_inbound_bytes, inbound_block_timeout)
        self.inbound_limits = check_inbound_limits(*(b if v is None else v
                                                     for v, b in zip(given, broker.inbound_limits)))
        self._subs: Dict[str, Callback] = {}
        self._will: Optional[Tuple[str, bytes, int, bool]] = None
        self._dispatcher: Optional[Dispatcher] = None
        self._connected = False

    @property
    def connected(self) -> bool:
        return self._connected

    def connect(self, timeout: float = 10.0) -> None:
        if self._connected:
            return
        if not self.broker.synchronous:
            self._dispatcher = Dispatcher(f"edgefed-inproc-{self.client_id}", *self.inbound_limits)
        self._connected = True
        self.broker._attach(self)
        with self.broker._lock:
            subs = list(self._subs.items())
        for flt, cb in subs:  # like MQTT, where subscriptions made before connect go out now
            self.broker._deliver_retained(self, flt, cb)

    def set_will(self, topic: str, payload: bytes, qos: int = 1, retain: bool = True) -> None:
        if self._connected:
            raise TransportError("set_will() must be called before connect()")
        check_topic_name(topic)
        self.chunker.check_will(topic, payload)
        self._will = (topic, bytes(payload), qos, retain)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                wait: bool = True, timeout: Optional[float] = None) -> PublishHandle:
        check_topic_name(topic)
        if not self._connected:
            raise NotConnected(f"{self.client_id}: publish() before connect()")
        chunks = self.chunker.split(topic, payload, retain)
        if chunks is None:
            self.broker._publish(topic, bytes(payload), retain, qos)
            h = PublishHandle()
            h._complete()
            return h
        whole = ChunkedPublishHandle(len(chunks))
        for i, chunk in enumerate(chunks):  # in order, each one a broker message
            chunks[i] = b""  # do not hold the chunks already handed over
            self.broker._publish(topic, chunk, False, qos)
            whole.part(i)._complete()
        self.chunker.sent(len(chunks))
        return whole

    def _callbacks_for(self, topic: str) -> List[Callback]:
        with self.broker._lock:
            return [cb for flt, cb in self._subs.items() if topic_matches(flt, topic)]

    def subscribe(self, topic_filter: str, callback: Callback, qos: int = 1) -> None:
        check_topic_filter(topic_filter)
        with self.broker._lock:
            self._subs[topic_filter] = callback
        if self._connected:
            self.broker._deliver_retained(self, topic_filter, callback)

    def unsubscribe(self, topic_filter: str) -> None:
        with self.broker._lock:
            self._subs.pop(topic_filter, None)

    def close(self) -> None:
        self._disconnect(abnormal=False)

    def crash(self) -> None:
        """Vanish without a DISCONNECT: the broker publishes the will (as on a killed device)."""
        self._disconnect(abnormal=True)

    def _disconnect(self, abnormal: bool) -> None:
        if not self._connected:
            return
        self._connected = False
        self.broker._detach(self, abnormal)
        self._detached()

    def _detached(self) -> None:
        self._connected = False
        if self._dispatcher is not None:
            self._dispatcher.stop()
            self._dispatcher = None

