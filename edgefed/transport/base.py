"""Transport interface shared by the MQTT and in-process implementations.

Payloads are opaque bytes (edgefed.protocol messages). Callbacks run on one dispatcher
thread per transport, never on the network thread, so a callback may itself publish and wait
for the acknowledgement without deadlocking the client. The dispatcher's queue is bounded in
messages and bytes (Dispatcher: what is dropped when full, and why).

Chunking (Chunker): every transport respects a per-message limit, `max_payload_bytes` (the
broker's; default 4 MiB). publish() splits a larger payload into EDGC chunks
(edgefed.chunking) and publishes them in order on the same topic; on the receiving side chunks
go through the dispatcher queue like any message (so its byte budget counts them) and are fed,
on the dispatcher thread, to a Reassembler keyed by topic; the subscribers' callbacks get the
whole message once its last chunk is in. Callers publish and receive whole messages only.
"""
from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from typing import Any, Callable, Dict, List, Optional, Tuple

from edgefed.chunking import CHUNK_OVERHEAD, ChunkError, Reassembler, split

log = logging.getLogger("edgefed.transport")

Callback = Callable[[str, bytes], None]


class TransportError(RuntimeError):
    """Base for transport failures (the text says what to check)."""


class BrokerUnreachable(TransportError):
    pass


class PublishTimeout(TransportError):
    pass


class NotConnected(TransportError):
    pass


def check_topic_name(topic: str) -> str:
    """A topic to publish to: non-empty, no wildcards, no NUL."""
    if not isinstance(topic, str) or not topic or "+" in topic or "#" in topic or "\0" in topic:
        raise ValueError(f"invalid topic name {topic!r}: publish topics must be non-empty and "
                         f"contain no '+', '#' or NUL")
    if len(topic.encode("utf-8")) > 65535:
        raise ValueError("topic name longer than 65535 bytes")
    return topic


def check_topic_filter(flt: str) -> str:
    """A subscription filter: '+' fills a whole level, '#' only as the whole last level."""
    if not isinstance(flt, str) or not flt or "\0" in flt:
        raise ValueError(f"invalid topic filter {flt!r}")
    levels = flt.split("/")
    for i, lv in enumerate(levels):
        if "#" in lv and (lv != "#" or i != len(levels) - 1):
            raise ValueError(f"invalid topic filter {flt!r}: '#' must be the whole last level")
        if "+" in lv and lv != "+":
            raise ValueError(f"invalid topic filter {flt!r}: '+' must fill a whole level")
    return flt


def topic_matches(flt: str, topic: str) -> bool:
    """MQTT 3.1.1/5 filter matching, incl. the rule that wildcards at the first level do not
    match topics starting with '$', and 'a/#' matching 'a' (paho's topic_matches_sub, which
    agrees with the MQTT spec on all of these). A shared subscription `$share/<group>/<filter>`
    matches what <filter> matches (which member gets a message is the broker's choice)."""
    if flt.startswith("$share/"):  # MQTT 5 shared subscription: $share/<group>/<filter>
        parts = flt.split("/", 2)
        if len(parts) < 3:
            return False
        flt = parts[2]
    if "+" not in flt and "#" not in flt:  # fast path: paho builds a trie per call (6x slower)
        return flt == topic
    global _topic_matches_sub
    if _topic_matches_sub is None:  # imported at first use: importing edgefed stays light
        from paho.mqtt.client import topic_matches_sub as _topic_matches_sub
    return _topic_matches_sub(flt, topic)


_topic_matches_sub: Optional[Callable[[str, str], bool]] = None


class PublishHandle:
    """Completion of one publish: done once the broker acknowledged it (PUBACK for QoS 1)."""

    def __init__(self, mid: int = 0):
        self.mid = mid
        self._event = threading.Event()
        self.error: Optional[BaseException] = None

    def _complete(self, error: Optional[BaseException] = None) -> None:
        self.error = error
        self._event.set()

    @property
    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: Optional[float] = None) -> "PublishHandle":
        if not self._event.wait(timeout):
            raise PublishTimeout(f"publish (mid {self.mid}) not acknowledged within {timeout} s; "
                                 f"the message stays queued and is resent after a reconnect")
        if self.error is not None:
            raise self.error
        return self


class _PartHandle(PublishHandle):
    """One chunk of a ChunkedPublishHandle: completing it reports to the whole."""

    def __init__(self, whole: "ChunkedPublishHandle", mid: int = 0):
        super().__init__(mid)
        self._whole = whole

    def _complete(self, error: Optional[BaseException] = None) -> None:
        super()._complete(error)
        self._whole._part_done(error)


class ChunkedPublishHandle(PublishHandle):
    """Completion of a publish sent as `count` chunks: done once every chunk is acknowledged,
    or failed with the first chunk's error. `mid` is the first chunk's, `mids` all of them."""

    def __init__(self, count: int):
        super().__init__(0)
        self.count = count
        self.mids: List[int] = []
        self._left = count
        self._lock = threading.Lock()

    def part(self, mid: int) -> PublishHandle:
        """A handle for the next chunk (published with message id `mid`)."""
        if not self.mids:
            self.mid = mid
        self.mids.append(mid)
        return _PartHandle(self, mid)

    def _part_done(self, error: Optional[BaseException]) -> None:
        with self._lock:
            if self._event.is_set():
                return
            if error is None:
                self._left -= 1
                if self._left > 0:
                    return
        self._complete(error)

    @property
    def acknowledged(self) -> int:
        """Chunks acknowledged so far."""
        return self.count - self._left

    def wait(self, timeout: Optional[float] = None) -> "PublishHandle":
        try:
            return super().wait(timeout)
        except PublishTimeout:
            last = self.mids[-1] if self.mids else 0
            raise PublishTimeout(
                f"chunked publish (mids {self.mid}..{last}): {self.acknowledged} of {self.count} "
                f"chunks acknowledged within {timeout} s; the rest stay queued and are resent "
                f"after a reconnect") from None


DEFAULT_MAX_INBOUND_MESSAGES = 10_000  # per transport (dispatcher)
DEFAULT_MAX_INBOUND_BYTES = 64 << 20  # payload + topic bytes queued, per transport
DEFAULT_INBOUND_BLOCK_TIMEOUT = 0.5  # s a QoS>0 producer may wait for room before the drop
_DROP_WARN_INTERVAL = 5.0  # s between two "queue full" warnings of one dispatcher


def check_inbound_limits(max_inbound_messages: int, max_inbound_bytes: int,
                         inbound_block_timeout: float) -> Tuple[int, int, float]:
    """The transports' inbound-queue settings, checked (Dispatcher's max_messages, max_bytes,
    block_timeout), so that a bad value fails at construction, before any network."""
    lim = (int(max_inbound_messages), int(max_inbound_bytes), float(inbound_block_timeout))
    if lim[0] < 1 or lim[1] < 1 or not lim[2] >= 0:
        raise ValueError(f"max_inbound_messages and max_inbound_bytes must be >= 1 and "
                         f"inbound_block_timeout >= 0 (got {max_inbound_messages!r}, "
                         f"{max_inbound_bytes!r}, {inbound_block_timeout!r})")
    return lim


def _log_topic(topic: str, limit: int = 200) -> str:
    """A remote-chosen topic made safe for one log line: repr (escapes controls), truncated."""
    r = repr(topic[:limit + 1])
    return r if len(r) <= limit else r[:limit] + "..."


class Dispatcher:
    """Runs subscriber callbacks in order on one daemon thread; errors are logged, not fatal.

    The queue is bounded, in messages (`max_messages`) and in queued bytes (`max_bytes`:
    payload plus topic length), because its producers are remote: without a bound, a flood of
    large messages (QoS 0 costs the sender nothing) grows our memory until the process dies.
    When it is full:
    - QoS 0, a message larger than `max_bytes`, or a submit from the dispatcher's own thread
      (waiting for itself would deadlock): the new message is dropped at once;
    - QoS 1/2: the producer waits up to `block_timeout` s for room, then the message is dropped.
      The MQTT producer is paho's network thread, so while it waits it reads nothing from the
      socket: TCP back-pressure on the broker, which applies its own per-client limits. It must
      not wait long (keepalives, PUBACKs of our own publishes, which a callback may be waiting
      for), so after one wait timed out, later messages are dropped without waiting until the
      callback thread takes the next message.
    Drops are counted (`dropped`, `dropped_bytes`) and logged at most once per 5 s per dispatcher.
    A dropped QoS-1 message is lost (MQTT already acknowledged it): the protocol's re-sends and
    round deadlines cover it. Messages keep their order; only the newest ones are dropped.
    """

    _STOP = object()

    def __init__(self, name: str, max_messages: int = DEFAULT_MAX_INBOUND_MESSAGES,
                 max_bytes: int = DEFAULT_MAX_INBOUND_BYTES,
                 block_timeout: float = DEFAULT_INBOUND_BLOCK_TIMEOUT):
        self.name = name
        self.max_messages, self.max_bytes, self.block_timeout = check_inbound_limits(
            max_messages, max_bytes, block_timeout)
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._q: "deque" = deque()
        self._count = 0  # messages queued (the stop marker not included)
        self._bytes = 0
        self._unfinished = 0  # queued or running
        self._stalled = False  # a wait for room timed out and the callback has not moved since
        self._stopped = False
        self.dropped = 0
        self.dropped_bytes = 0
        self._last_warn = -float("inf")
        self._unwarned = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def queued_bytes(self) -> int:
        """Payload + topic bytes waiting for the callback thread."""
        return self._bytes

    @property
    def queued_messages(self) -> int:
        return self._count

    def _fits(self, cost: int) -> bool:
        return self._count < self.max_messages and self._bytes + cost <= self.max_bytes

    def _put(self, item: tuple, cost: int) -> None:
        self._q.append(item)
        self._count += 1
        self._bytes += cost
        self._unfinished += 1
        self._not_empty.notify()

    def try_submit(self, fn: Callback, topic: str, payload: bytes) -> bool:
        """Queue the message if there is room now; False (nothing counted or logged) if not."""
        cost = len(payload) + len(topic)
        with self._lock:
            if self._stopped or not self._fits(cost):
                return False
            self._put((fn, topic, payload, cost), cost)
            return True

    def submit(self, fn: Callback, topic: str, payload: bytes, qos: int = 1,
               timeout: Optional[float] = None) -> bool:
        """Queue the message, or drop it when the queue is full (class docstring). QoS>0 waits
        up to `timeout` s for room (default `block_timeout`). True if queued."""
        cost = len(payload) + len(topic)
        wait = self.block_timeout if timeout is None else timeout
        with self._lock:
            if self._stopped:
                return False  # closing: nothing will run it
            if self._fits(cost):
                self._put((fn, topic, payload, cost), cost)
                return True
            if (qos > 0 and wait > 0 and not self._stalled and cost <= self.max_bytes
                    and threading.current_thread() is not self._thread):
                deadline = time.monotonic() + wait
                while not self._stopped and not self._fits(cost):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._not_full.wait(left)
                if self._stopped:
                    return False
                if self._fits(cost):
                    self._put((fn, topic, payload, cost), cost)
                    return True
                self._stalled = True
            self.dropped += 1
            self.dropped_bytes += len(payload)
            self._unwarned += 1
            now = time.monotonic()
            if now - self._last_warn < _DROP_WARN_INTERVAL:
                return False
            self._last_warn, n, self._unwarned = now, self._unwarned, 0
            state = (self._count, self._bytes, self.dropped)
        log.warning("%s: inbound queue full (%d messages, %d bytes queued; limits %d messages, "
                    "%d bytes): dropped a QoS-%d message of %d bytes on topic %s (%d dropped since "
                    "the last warning, %d in all)", self.name, state[0], state[1], self.max_messages,
                    self.max_bytes, qos, len(payload), _log_topic(topic), n, state[2])
        return False

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._q:
                    self._not_empty.wait()
                item = self._q.popleft()
                if item is self._STOP:
                    return
                fn, topic, payload, cost = item
                self._count -= 1
                self._bytes -= cost
                self._stalled = False  # progress: producers may wait again
                self._not_full.notify_all()
            try:
                fn(topic, payload)
            except Exception:  # one bad callback must not kill delivery for the others
                log.exception("subscriber callback failed for topic %s", _log_topic(topic))
            finally:
                del item, payload  # do not hold the last payload while waiting for the next
                with self._lock:
                    self._unfinished -= 1

    def stop(self, timeout: float = 5.0) -> None:
        """Run what is queued (up to `timeout` s), then end the thread; later submits are dropped."""
        with self._lock:
            self._stopped = True
            self._q.append(self._STOP)
            self._not_empty.notify()
            self._not_full.notify_all()  # waiting producers give up
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def idle(self) -> bool:
        """Nothing queued and no callback running."""
        return self._unfinished == 0


# = protocol.Limits.max_message_bytes' default: every message valid by default goes out unchunked
DEFAULT_MAX_PAYLOAD_BYTES = 4 << 20
_CHUNK_WARN_INTERVAL = 5.0  # s between two chunk-error (or lost-stream) warnings of one transport
REASSEMBLY_OPTIONS = ("reassembly_max_message_bytes", "reassembly_max_streams_per_sender",
                      "reassembly_max_bytes_per_sender", "reassembly_max_bytes_total",
                      "reassembly_ttl_s")


def check_max_payload_bytes(max_payload_bytes: int) -> int:
    """The broker's per-message limit a transport respects, checked: an integer above the
    chunk overhead (a chunk carries CHUNK_OVERHEAD = 80 bytes of header and CRC)."""
    v = max_payload_bytes
    if isinstance(v, bool) or not isinstance(v, int) or v <= CHUNK_OVERHEAD:
        raise ValueError(f"max_payload_bytes={v!r} must be an integer above {CHUNK_OVERHEAD} (the "
                         f"chunk header and CRC); use the broker's per-message limit, e.g. 1 MiB "
                         f"= {1 << 20}")
    return v


class _Throttle:
    """At most one log line per `interval` s; says how many were held back in between."""

    def __init__(self, interval: float = _CHUNK_WARN_INTERVAL):
        self.interval = interval
        self._last = -float("inf")
        self._held = 0
        self._lock = threading.Lock()

    def __call__(self, n: int = 1) -> int:
        """Record n events; return how many to report now (0: stay quiet)."""
        with self._lock:
            self._held += n
            now = time.monotonic()
            if now - self._last < self.interval:
                return 0
            self._last, held, self._held = now, self._held, 0
            return held


class Chunker:
    """A transport's chunking: splits outgoing payloads over `max_payload_bytes`, reassembles
    inbound chunks per topic (Reassembler, sender = topic), counts and logs.

    Stream ids are a per-transport counter starting at a random u64, so they never repeat
    within a transport and a restarted publisher does not collide with its own streams still in
    flight at the receiver. Reassembler limits: `reassembly_*` options (edgefed.chunking
    defaults), or a ready `reassembler` (e.g. one with a fake clock in tests).
    Thread-safe."""

    def __init__(self, name: str, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
                 reassembler: Optional[Reassembler] = None, *,
                 reassembly_max_message_bytes: Optional[int] = None,
                 reassembly_max_streams_per_sender: Optional[int] = None,
                 reassembly_max_bytes_per_sender: Optional[int] = None,
                 reassembly_max_bytes_total: Optional[int] = None,
                 reassembly_ttl_s: Optional[float] = None):
        self.name = name
        self.max_payload_bytes = check_max_payload_bytes(max_payload_bytes)
        opts = {k: v for k, v in (("max_message_bytes", reassembly_max_message_bytes),
                                  ("max_streams_per_sender", reassembly_max_streams_per_sender),
                                  ("max_bytes_per_sender", reassembly_max_bytes_per_sender),
                                  ("max_bytes_total", reassembly_max_bytes_total),
                                  ("ttl_s", reassembly_ttl_s)) if v is not None}
        if reassembler is not None and opts:
            raise ValueError("give either reassembler= or reassembly_* options, not both")
        self.reassembler = reassembler if reassembler is not None else Reassembler(**opts)
        self._ids = itertools.count(secrets.randbits(64))
        self._lock = threading.Lock()
        self.chunks_sent = 0
        self.messages_chunked = 0
        self.chunks_received = 0
        self.messages_reassembled = 0
        self.chunk_errors = 0
        self.streams_lost = 0
        self._errors_by_reason: Dict[str, int] = {}
        self._warn_errors = _Throttle()
        self._warn_lost = _Throttle()

    # ------------------------------------------------------------------ outbound
    def split(self, topic: str, payload: bytes, retain: bool) -> Optional[List[bytes]]:
        """The chunks to publish instead of payload, or None when it fits in one message.
        A retained payload that does not fit is refused (ValueError): retained chunks would
        overwrite each other on the topic, and a late subscriber would get only the last one."""
        n = len(payload)
        if n <= self.max_payload_bytes:
            return None
        if retain:
            raise ValueError(f"retained publish to {_log_topic(topic)} is {n} bytes, over "
                             f"max_payload_bytes={self.max_payload_bytes}: retained messages cannot "
                             f"be chunked (each chunk would replace the previous one on the topic); "
                             f"keep retained messages under the limit or raise max_payload_bytes")
        sid = next(self._ids) & 0xFFFFFFFFFFFFFFFF
        return split(payload, sid, self.max_payload_bytes)

    def check_will(self, topic: str, payload: bytes) -> None:
        """The broker publishes a will as one message: it must fit unchunked."""
        if len(payload) > self.max_payload_bytes:
            raise ValueError(f"last will for {_log_topic(topic)} is {len(payload)} bytes, over "
                             f"max_payload_bytes={self.max_payload_bytes}: a will cannot be chunked")

    def sent(self, chunks: int) -> None:
        with self._lock:
            self.messages_chunked += 1
            self.chunks_sent += chunks

    # ------------------------------------------------------------------ inbound
    def receive(self, topic: str, payload: bytes) -> Optional[bytes]:
        """Feed one chunk received on `topic`; the whole message once complete, else None.
        Never raises ChunkError: it is counted and logged (rate-limited)."""
        whole: Optional[bytes] = None
        error: Optional[ChunkError] = None
        try:
            whole = self.reassembler.add(topic, payload)
        except ChunkError as e:
            error = e
        with self._lock:  # counted once processed: whoever sees the count also sees the chunk's effect
            self.chunks_received += 1
            if error is not None:
                self.chunk_errors += 1
                self._errors_by_reason[error.reason] = self._errors_by_reason.get(error.reason, 0) + 1
            elif whole is not None:
                self.messages_reassembled += 1
        if error is not None:
            n = self._warn_errors()
            if n:
                log.warning("%s: dropped a bad chunk on topic %s (%s): %s (%d chunk errors since "
                            "the last warning, %d in all)", self.name, _log_topic(topic), error.reason,
                            str(error).replace(topic, "<topic>")[:500], n, self.chunk_errors)
        self.expire()
        return whole

    def expire(self) -> List[Tuple[str, int]]:
        """Drop streams idle for the reassembler's ttl; count and log every stream lost since
        the last call (expired, or evicted by a newer stream of the same topic)."""
        lost = self.reassembler.expire()
        if lost:
            with self._lock:
                self.streams_lost += len(lost)
            n = self._warn_lost(len(lost))
            if n:
                sender, sid = lost[-1]
                log.warning("%s: %d chunked message(s) lost (no chunk for %g s, or evicted by newer "
                            "streams of the same topic), latest stream %016x on topic %s; the "
                            "protocol's resends and round deadlines cover it (%d lost in all)",
                            self.name, n, self.reassembler.ttl_s, sid, _log_topic(sender),
                            self.streams_lost)
        return lost

    def stats(self) -> Dict[str, Any]:
        """Counters for metrics: chunks_sent, messages_chunked, chunks_received,
        messages_reassembled, chunk_errors (+ chunk_errors_by_reason), streams_lost,
        duplicate_chunks, streams_in_flight, bytes_in_flight, max_payload_bytes."""
        self.expire()
        r = self.reassembler.stats()
        with self._lock:
            return {"max_payload_bytes": self.max_payload_bytes, "chunks_sent": self.chunks_sent,
                    "messages_chunked": self.messages_chunked,
                    "chunks_received": self.chunks_received,
                    "messages_reassembled": self.messages_reassembled,
                    "chunk_errors": self.chunk_errors,
                    "chunk_errors_by_reason": dict(self._errors_by_reason),
                    "streams_lost": self.streams_lost, "duplicate_chunks": r["duplicates"],
                    "streams_in_flight": r["streams_in_flight"],
                    "bytes_in_flight": r["bytes_in_flight"]}


class Transport(ABC):
    """Publish/subscribe of bytes. Use as a context manager: `with make_transport(url) as t:`."""

    _dispatcher: Optional[Dispatcher] = None  # set by implementations once they deliver messages
    _chunker: Optional[Chunker] = None  # set by implementations (default one made at first use)

    @property
    def chunker(self) -> Chunker:
        if self._chunker is None:
            self._chunker = Chunker(type(self).__name__)
        return self._chunker

    @property
    def max_payload_bytes(self) -> int:
        """The per-message limit this transport respects: larger payloads go out as chunks."""
        return self.chunker.max_payload_bytes

    def chunk_stats(self) -> Dict[str, Any]:
        """Chunking counters for metrics (Chunker.stats); also expires stale streams."""
        return self.chunker.stats()

    def _callbacks_for(self, topic: str) -> List[Callback]:
        """The callbacks of the subscriptions matching topic (implementations override)."""
        return []

    def _deliver_chunk(self, topic: str, payload: bytes) -> None:
        """Dispatcher callback for one inbound chunk: reassemble, then hand the whole message
        to every callback subscribed to the topic (each one's errors logged, not fatal)."""
        whole = self.chunker.receive(topic, payload)
        if whole is None:
            return
        for cb in self._callbacks_for(topic):
            try:
                cb(topic, whole)
            except Exception:
                log.exception("subscriber callback failed for topic %s", _log_topic(topic))

    @property
    def dropped(self) -> int:
        """Inbound messages dropped because the callback queue was full."""
        return self._dispatcher.dropped if self._dispatcher is not None else 0

    @property
    def queued_bytes(self) -> int:
        """Inbound payload + topic bytes waiting for the callbacks."""
        return self._dispatcher.queued_bytes if self._dispatcher is not None else 0

    @abstractmethod
    def connect(self, timeout: float = 10.0) -> None:
        """Connect (blocking until the session is up or raising BrokerUnreachable)."""

    @abstractmethod
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                wait: bool = True, timeout: Optional[float] = None) -> PublishHandle:
        """Publish; with wait=True block until acknowledged (PublishTimeout after `timeout`)."""

    @abstractmethod
    def subscribe(self, topic_filter: str, callback: Callback, qos: int = 1) -> None:
        """Deliver every message matching topic_filter to callback(topic, payload)."""

    @abstractmethod
    def unsubscribe(self, topic_filter: str) -> None: ...

    @abstractmethod
    def set_will(self, topic: str, payload: bytes, qos: int = 1, retain: bool = True) -> None:
        """Message the broker publishes if this client vanishes without close(). Before connect()."""

    @abstractmethod
    def close(self) -> None:
        """Disconnect cleanly (the will is NOT published) and stop the threads."""

    @property
    @abstractmethod
    def connected(self) -> bool: ...

    def __enter__(self) -> "Transport":
        if not self.connected:
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
