"""MQTT transport on paho-mqtt 2.x (CallbackAPIVersion.VERSION2).

- protocol="auto" tries MQTT 5 and falls back to 3.1.1 when the broker refuses it (amqtt
  speaks 3.1.1 only); the negotiated version is kept for reconnects.
- Persistent sessions by default (stable client id + clean_start/clean_session False, and a
  session expiry for MQTT 5, whose default of 0 would end the session at disconnect).
- paho's network thread reconnects with exponential backoff; subscriptions the broker no
  longer knows (session_present False) are re-sent on every connect.
- Callbacks run on our own dispatcher thread, so they may publish and wait for PUBACK.
"""
from __future__ import annotations

import socket
import threading
import time
import uuid
from typing import Dict, Optional, Tuple
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .base import (BrokerUnreachable, Callback, Dispatcher, NotConnected, PublishHandle,
                   PublishTimeout, Transport, TransportError, check_topic_filter, check_topic_name, log,
                   topic_matches)

_UNSUPPORTED_PROTOCOL = 132  # CONNACK reason (a 3.1.1 broker's rc 1 is mapped to this by paho)
_PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}
_PROBE_TIMEOUT = 3.0
_NEGOTIATED: Dict[Tuple[str, int], str] = {}  # (host, port) -> "5" | "3.1.1", per process


def parse_url(url: str) -> Tuple[str, str, int]:
    """'mqtt://host:port' -> ('mqtt', host, port). mqtts:// uses TLS (default port 8883)."""
    u = urlsplit(url)
    if u.scheme not in ("mqtt", "tcp", "mqtts"):
        raise ValueError(f"unsupported broker URL {url!r}: use mqtt://host:port (or mqtts://)")
    if not u.hostname:
        raise ValueError(f"broker URL {url!r} has no host: use mqtt://host:port")
    try:
        port = u.port
    except ValueError:
        raise ValueError(f"broker URL {url!r} has an invalid port") from None
    return u.scheme, u.hostname, port or (8883 if u.scheme == "mqtts" else 1883)


class _Pending:
    """mid -> handle, tolerant of the acknowledgement arriving before the caller registered."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._waiting: Dict[int, PublishHandle] = {}
        self._early: Dict[int, Optional[BaseException]] = {}

    def wait_idle(self, timeout: float) -> bool:
        """True once every registered handle is acknowledged (False at the timeout)."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._waiting, timeout)

    def register(self, handle: PublishHandle) -> None:
        with self._lock:
            if handle.mid in self._early:
                handle._complete(self._early.pop(handle.mid))
            else:
                self._waiting[handle.mid] = handle

    def forget(self, mid: int) -> None:
        with self._lock:
            self._waiting.pop(mid, None)
            self._early.pop(mid, None)
            self._idle.notify_all()

    def complete(self, mid: int, error: Optional[BaseException] = None) -> None:
        with self._lock:
            h = self._waiting.pop(mid, None)
            if h is None:
                self._early[mid] = error
                return
            self._idle.notify_all()
        h._complete(error)


def _set_nodelay(client, userdata, sock) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError, ValueError):  # not a TCP socket (e.g. a websocket wrapper)
        pass


class MqttTransport(Transport):
    def __init__(self, url: str = "mqtt://127.0.0.1:1883", client_id: Optional[str] = None, *,
                 protocol: str = "auto", clean_start: Optional[bool] = None,
                 session_expiry: int = 3600, keepalive: int = 30,
                 reconnect_min_delay: float = 0.5, reconnect_max_delay: float = 30.0,
                 publish_timeout: float = 30.0, max_inflight: int = 1000, tcp_nodelay: bool = True):
        if protocol not in ("auto", "5", "3.1.1"):
            raise ValueError("protocol must be 'auto', '5' or '3.1.1'")
        self.url = url
        self.scheme, self.host, self.port = parse_url(url)
        # Persistent sessions need a stable id; without one a session could never be resumed.
        self.client_id = client_id or f"edgefed-{uuid.uuid4().hex[:12]}"
        self.clean_start = (client_id is None) if clean_start is None else clean_start
        self.protocol = protocol
        self.session_expiry = session_expiry
        self.keepalive = keepalive
        self.reconnect_delays = (reconnect_min_delay, reconnect_max_delay)
        self.publish_timeout = publish_timeout
        self.max_inflight = max_inflight
        # paho leaves Nagle on: a burst of small QoS-1 messages (acks, then the next plan) then
        # waits for the peer's delayed ACK, ~40 ms a round trip on Linux loopback.
        self.tcp_nodelay = tcp_nodelay
        self.protocol_version: Optional[str] = None  # "5" or "3.1.1" once connected
        self._will: Optional[Tuple[str, bytes, int, bool]] = None
        self._client: Optional[mqtt.Client] = None
        self._subs: Dict[str, Tuple[int, Callback]] = {}
        self._confirmed: set = set()  # filters the broker's current session knows
        self._resub_mids: Dict[int, str] = {}  # SUBSCRIBEs sent from _on_connect
        # subscribe() calls waiting for their filter: completed by their own SUBACK or, when the
        # connection dropped before it came, by the re-subscription _on_connect sent instead
        self._sub_waiters: Dict[str, PublishHandle] = {}
        self._lock = threading.RLock()
        self._pubacks = _Pending()
        self._subacks = _Pending()
        self._connected = threading.Event()
        self._connack: Optional[Tuple[int, str]] = None
        self._connack_event = threading.Event()
        self._dispatcher: Optional[Dispatcher] = None
        self.reconnects = 0  # successful connects after the first (for tests / monitoring)
        self._closed = False

    # -------------------------------------------------------------- setup
    def set_will(self, topic: str, payload: bytes, qos: int = 1, retain: bool = True) -> None:
        if self._client is not None:
            raise TransportError("set_will() must be called before connect()")
        self._will = (check_topic_name(topic), bytes(payload), qos, retain)

    def _make_client(self, version: str) -> mqtt.Client:
        proto = _PROTOCOLS[version]
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=proto,
                        clean_session=None if proto == mqtt.MQTTv5 else self.clean_start)
        if self.scheme == "mqtts":
            c.tls_set()
        c.reconnect_delay_set(*self.reconnect_delays)  # type: ignore[arg-type]
        c.max_inflight_messages_set(self.max_inflight)
        c.max_queued_messages_set(0)  # unbounded: QoS-1 messages wait for the broker to come back
        if self._will:
            t, p, q, r = self._will
            c.will_set(t, p, q, r)
        if self.tcp_nodelay:
            c.on_socket_open = _set_nodelay
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        return c

    def connect(self, timeout: float = 10.0) -> None:
        if self._closed:
            raise TransportError("transport was closed; create a new one")
        if self._client is not None:
            return
        if self._dispatcher is None:
            self._dispatcher = Dispatcher(f"edgefed-dispatch-{self.client_id}")
        deadline = time.monotonic() + timeout
        if self.protocol == "auto":
            first = _NEGOTIATED.get((self.host, self.port)) or self._probe(deadline)
            versions = [first] + (["3.1.1"] if first == "5" else [])
        else:
            versions = [self.protocol]
        for i, version in enumerate(versions):
            code, reason = self._open(version, deadline, timeout)
            if code == 0:
                self.protocol_version = version
                log.info("connected to %s as %s (MQTT %s)", self.url, self.client_id, version)
                return
            if code == _UNSUPPORTED_PROTOCOL and i + 1 < len(versions):
                log.info("broker at %s refused MQTT %s; falling back to %s", self.url, version,
                         versions[i + 1])
                _NEGOTIATED[(self.host, self.port)] = versions[i + 1]
                continue
            raise BrokerUnreachable(f"MQTT broker at {self.host}:{self.port} refused the connection "
                                    f"(MQTT {version}): {reason}")

    def _open(self, version: str, deadline: float, timeout: float) -> Tuple[int, str]:
        client = self._make_client(version)
        self._connack, self._connack_event = None, threading.Event()
        self._client = client  # callbacks check identity to ignore stale clients
        self._tcp_connect(client, version, deadline)
        client.loop_start()
        if not self._connack_event.wait(max(0.0, deadline - time.monotonic())):
            self._abandon(client)
            raise BrokerUnreachable(
                f"MQTT broker at {self.host}:{self.port} accepted TCP but sent no CONNACK within "
                f"{timeout} s; is it an MQTT broker, and is it overloaded?")
        code, reason = self._connack or (0, "")
        if code != 0:
            self._abandon(client)
        return code, reason

    def _probe(self, deadline: float) -> str:
        """Ask once per broker whether it speaks MQTT 5, with a throwaway clean client.

        A probe rather than trying MQTT 5 with our real session: amqtt 0.12 does not answer a
        v5 CONNECT that carries properties (it waits for bytes that never come), and a v5
        attempt without a session expiry would end our persistent session.
        """
        ev, result = threading.Event(), []
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgefed-probe-{uuid.uuid4().hex[:8]}",
                        protocol=mqtt.MQTTv5)
        if self.scheme == "mqtts":
            c.tls_set()
        c.on_connect = lambda cl, u, f, rc, p: (result.append(int(getattr(rc, "value", rc))), ev.set())
        self._tcp_connect(c, "probe", deadline)
        c.loop_start()
        try:
            ok = ev.wait(min(_PROBE_TIMEOUT, max(0.0, deadline - time.monotonic())))
        finally:
            c.disconnect()
            c.loop_stop()
        version = "5" if ok and result[0] == 0 else "3.1.1"
        _NEGOTIATED[(self.host, self.port)] = version
        return version

    def _tcp_connect(self, client: mqtt.Client, version: str, deadline: float) -> None:
        props = None
        if version == "5" and not self.clean_start:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry
        delay = 0.1
        while True:
            try:
                if version == "probe":
                    client.connect(self.host, self.port, self.keepalive, clean_start=True)
                elif version == "5":
                    client.connect(self.host, self.port, self.keepalive,
                                   clean_start=self.clean_start, properties=props)
                else:
                    client.connect(self.host, self.port, self.keepalive)
                return
            except OSError as e:  # broker not (yet) up: retry until the deadline, then explain
                if time.monotonic() + delay > deadline:
                    if client is self._client:
                        self._client = None
                    raise BrokerUnreachable(
                        f"cannot reach MQTT broker at {self.host}:{self.port} ({e}); is it running? "
                        f"Start one with edgefed.transport.start_broker() or pass the right "
                        f"mqtt://host:port") from e
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _abandon(self, client: mqtt.Client) -> None:
        self._client = None
        client.disconnect()
        client.loop_stop()

    # -------------------------------------------------------------- paho callbacks (network thread)
    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        if client is not self._client:
            return
        code = int(getattr(reason, "value", reason))
        if self._connack is None:  # first CONNACK answers connect()
            self._connack = (code, str(reason))
            self._connack_event.set()
        elif code == 0:
            self.reconnects += 1
        if code != 0:
            log.warning("broker %s refused connection: %s", self.url, reason)
            return
        self._connected.set()
        with self._lock:
            if not flags.session_present:
                self._confirmed.clear()  # broker lost our session (restart without persistence)
            todo = [(f, q) for f, (q, _) in self._subs.items() if f not in self._confirmed]
        for f, q in todo:  # cannot wait for SUBACK here (network thread): _on_subscribe confirms
            rc, mid = client.subscribe(f, q)
            if rc == mqtt.MQTT_ERR_SUCCESS:
                with self._lock:
                    self._resub_mids[mid] = f

    def _on_disconnect(self, client, userdata, flags, reason, properties) -> None:
        if client is not self._client:
            return
        self._connected.clear()
        if not self._closed:
            log.warning("lost connection to %s (%s); reconnecting with backoff", self.url, reason)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        with self._lock:
            targets = [cb for f, (_, cb) in self._subs.items() if topic_matches(f, topic)]
        d = self._dispatcher
        if d is None:  # closing
            return
        for cb in targets:
            d.submit(cb, topic, bytes(msg.payload))

    def _on_publish(self, client, userdata, mid, reason, properties) -> None:
        err = None
        if getattr(reason, "is_failure", False):
            err = TransportError(f"broker refused publish (mid {mid}): {reason}")
        self._pubacks.complete(mid, err)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        bad = [rc for rc in reason_codes if getattr(rc, "is_failure", False)]
        with self._lock:
            flt = self._resub_mids.pop(mid, None)
            if flt is not None:
                err = TransportError(f"broker refused subscription to {flt!r}: {bad}") if bad else None
                if bad:
                    log.warning("broker refused re-subscription to %s: %s", flt, bad)
                elif flt in self._subs:
                    self._confirmed.add(flt)
                waiter = self._sub_waiters.pop(flt, None)
                if waiter is not None:
                    waiter._complete(err)
                return
        self._subacks.complete(mid, TransportError(f"broker refused subscription: {bad}")
                               if bad else None)

    # -------------------------------------------------------------- API
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                wait: bool = True, timeout: Optional[float] = None) -> PublishHandle:
        check_topic_name(topic)
        client = self._client
        if client is None:
            raise NotConnected("publish() before connect(); call connect() first")
        info = client.publish(topic, bytes(payload), qos, retain)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            raise TransportError("paho's outgoing queue is full")
        handle = PublishHandle(info.mid)
        if qos == 0:
            self._pubacks.forget(info.mid)  # paho may have reported it already; nothing to wait for
            if info.rc == mqtt.MQTT_ERR_NO_CONN:
                raise NotConnected(f"QoS-0 publish to {topic} dropped: not connected to {self.url}")
            handle._complete()
        else:  # QoS>0 while disconnected stays queued in paho and goes out after reconnect
            self._pubacks.register(handle)
        if wait:
            handle.wait(self.publish_timeout if timeout is None else timeout)
        return handle

    def subscribe(self, topic_filter: str, callback: Callback, qos: int = 1,
                  timeout: float = 10.0) -> None:
        check_topic_filter(topic_filter)
        h = PublishHandle()
        with self._lock:
            self._subs[topic_filter] = (qos, callback)
            self._confirmed.discard(topic_filter)
            self._sub_waiters[topic_filter] = h
        try:
            client = self._client
            if client is None or not self.connected:
                return  # sent by _on_connect
            rc, mid = client.subscribe(topic_filter, qos)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                return  # disconnected in between: _on_connect will send it
            h.mid = mid
            self._subacks.register(h)
            try:
                h.wait(timeout)  # so that a publish after subscribe() returns is seen
            except PublishTimeout:
                if self.connected:
                    raise TransportError(f"no SUBACK for {topic_filter!r} from {self.url} within "
                                         f"{timeout} s; is the broker overloaded?") from None
                return  # connection down: _on_connect re-sends it
            with self._lock:
                if topic_filter in self._subs:
                    self._confirmed.add(topic_filter)
        finally:
            if h.mid:
                self._subacks.forget(h.mid)
            with self._lock:
                if self._sub_waiters.get(topic_filter) is h:
                    del self._sub_waiters[topic_filter]

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._subs.pop(topic_filter, None)
            self._confirmed.discard(topic_filter)
        if self._client is not None:
            self._client.unsubscribe(topic_filter)

    def close(self, timeout: float = 5.0) -> None:
        """Wait up to `timeout` s for QoS>0 publishes still in flight (wait=False ones), so a
        clean close loses nothing while the broker is reachable; then disconnect cleanly."""
        if self._client is not None and self.connected and not self._pubacks.wait_idle(timeout):
            log.warning("closing %s with QoS-1 publishes still unacknowledged after %.1f s",
                        self.url, timeout)
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()  # clean DISCONNECT: the broker discards the will
            client.loop_stop()
        self._connected.clear()
        if self._dispatcher is not None:
            self._dispatcher.stop()
            self._dispatcher = None
