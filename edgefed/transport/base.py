"""Transport interface shared by the MQTT and in-process implementations.

Payloads are opaque bytes (edgefed.protocol messages). Callbacks run on one dispatcher
thread per transport, never on the network thread, so a callback may itself publish and wait
for the acknowledgement without deadlocking the client. The dispatcher's queue is bounded in
messages and bytes (Dispatcher: what is dropped when full, and why).
"""
from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from typing import Callable, Optional, Tuple

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
    agrees with the MQTT spec on all of these)."""
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


class Transport(ABC):
    """Publish/subscribe of bytes. Use as a context manager: `with make_transport(url) as t:`."""

    _dispatcher: Optional[Dispatcher] = None  # set by implementations once they deliver messages

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
