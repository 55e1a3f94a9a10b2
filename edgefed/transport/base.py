"""Transport interface shared by the MQTT and in-process implementations.

Payloads are opaque bytes (edgefed.protocol messages). Callbacks run on one dispatcher
thread per transport, never on the network thread, so a callback may itself publish and wait
for the acknowledgement without deadlocking the client.
"""
from __future__ import annotations

import logging
import queue
import threading
from abc import ABC, abstractmethod
from typing import Callable, Optional

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
    match topics starting with '$'."""
    if topic.startswith("$") and flt[:1] in ("+", "#"):
        return False
    f, t = flt.split("/"), topic.split("/")
    for i, lv in enumerate(f):
        if lv == "#":
            return True  # also matches the parent level itself ("a/#" matches "a")
        if i >= len(t):
            return False
        if lv != "+" and lv != t[i]:
            return False
    return len(f) == len(t)


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


class Dispatcher:
    """Runs subscriber callbacks in order on one daemon thread; errors are logged, not fatal."""

    _STOP = object()

    def __init__(self, name: str):
        self._q: "queue.Queue" = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callback, topic: str, payload: bytes) -> None:
        self._q.put((fn, topic, payload))

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is self._STOP:
                return
            fn, topic, payload = item
            try:
                fn(topic, payload)
            except Exception:  # one bad callback must not kill delivery for the others
                log.exception("subscriber callback failed for topic %s", topic)
            finally:
                self._q.task_done()

    def stop(self, timeout: float = 5.0) -> None:
        self._q.put(self._STOP)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def idle(self) -> bool:
        """Nothing queued and no callback running."""
        return self._q.unfinished_tasks == 0


class Transport(ABC):
    """Publish/subscribe of bytes. Use as a context manager: `with make_transport(url) as t:`."""

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
