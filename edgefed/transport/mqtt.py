"""MQTT transport on paho-mqtt 2.x (CallbackAPIVersion.VERSION2).

- protocol="auto" tries MQTT 5 and falls back to 3.1.1 when the broker refuses it (amqtt
  speaks 3.1.1 only); the negotiated version is kept for reconnects.
- Persistent sessions by default (stable client id + clean_start/clean_session False, and a
  session expiry for MQTT 5, whose default of 0 would end the session at disconnect).
- paho's network thread reconnects with exponential backoff; subscriptions the broker no
  longer knows (session_present False) are re-sent on every connect.
- Callbacks run on our own dispatcher thread, so they may publish and wait for PUBACK. Its
  queue is bounded (max_inbound_messages, max_inbound_bytes): past it QoS-0 messages are
  dropped, QoS-1/2 ones hold paho's network thread (TCP back-pressure) for at most
  inbound_block_timeout s and are then dropped (base.Dispatcher says why).
- Chunking (base.Chunker): a payload over max_payload_bytes (default 4 MiB; set it to the
  broker's per-message limit) is published as EDGC chunks on the same topic, in order, with the
  QoS asked; the handle completes when every chunk is acknowledged. A retained or will payload
  over the limit is refused. Inbound chunks are queued like any message (the inbound byte
  budget counts them; keep max_inbound_bytes above the senders' max_payload_bytes) and
  reassembled per topic on the dispatcher thread, which then runs the callbacks with the whole
  message. Reassembler limits: reassembly_* options (edgefed.chunking defaults).
- Credentials and TLS (docs/security.md): username/password from keyword arguments, the URL
  (mqtt://user:pass@host, percent-decoded; ?password_file=...) or the environment
  (EDGEFED_MQTT_USERNAME, EDGEFED_MQTT_PASSWORD, EDGEFED_MQTT_PASSWORD_FILE), in that order of
  precedence; mqtts:// takes a CA, a client certificate and key the same three ways (ca=, cert=,
  key=; ?ca=&cert=&key=; EDGEFED_MQTT_CA, EDGEFED_MQTT_CERT, EDGEFED_MQTT_KEY), with hostname
  verification on. Passwords never reach a log line or an error: `self.url` is redacted.
"""
from __future__ import annotations

import os
import secrets
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefed.chunking import Reassembler, is_chunk

from .base import (DEFAULT_INBOUND_BLOCK_TIMEOUT, DEFAULT_MAX_INBOUND_BYTES,
                   DEFAULT_MAX_INBOUND_MESSAGES, DEFAULT_MAX_PAYLOAD_BYTES, BrokerUnreachable,
                   Callback, Chunker, ChunkedPublishHandle, Dispatcher, NotConnected, PublishHandle,
                   PublishTimeout, Transport, TransportError, check_inbound_limits,
                   check_topic_filter, check_topic_name, log, topic_matches)

_UNSUPPORTED_PROTOCOL = 132  # CONNACK reason (a 3.1.1 broker's rc 1 is mapped to this by paho)
_PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}
_PROBE_TIMEOUT = 3.0
_DROPPED = -1  # our code for "connection closed before CONNACK"
_NEGOTIATED: Dict[Tuple[str, int], str] = {}  # (host, port) -> "5" | "3.1.1", per process

ENV_USERNAME, ENV_PASSWORD, ENV_PASSWORD_FILE = ("EDGEFED_MQTT_USERNAME", "EDGEFED_MQTT_PASSWORD",
                                                 "EDGEFED_MQTT_PASSWORD_FILE")
ENV_CA, ENV_CERT, ENV_KEY = "EDGEFED_MQTT_CA", "EDGEFED_MQTT_CERT", "EDGEFED_MQTT_KEY"
_QUERY_KEYS = ("ca", "cert", "key", "password_file")
# CONNACK reasons that retrying cannot fix (paho maps MQTT 3.1.1 return codes 2, 4, 5 to 133, 134, 135)
_BAD_CREDENTIALS, _NOT_AUTHORIZED = 134, 135
_FATAL_REFUSALS = {133: "client identifier not valid", _BAD_CREDENTIALS: "bad user name or password",
                   _NOT_AUTHORIZED: "not authorized", 138: "banned", 140: "bad authentication method"}


class BrokerRefused(BrokerUnreachable):
    """The broker answered CONNECT with a refusal (CONNACK reason code `reason_code`)."""

    def __init__(self, msg: str, reason_code: int):
        super().__init__(msg)
        self.reason_code = reason_code


class MqttConfigError(BrokerUnreachable, ValueError):
    """Credentials or TLS files that cannot be used (missing file, key without certificate, ...)."""


def redact_url(url: str) -> str:
    """The URL with its password (userinfo or ?password=) replaced by ***, for logs and errors."""
    try:
        u = urlsplit(url)
    except ValueError:
        return "<unparsable broker URL>"
    netloc = u.netloc
    if "@" in netloc:
        userinfo, hostport = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{hostport}" if ":" in userinfo else f"{user}@{hostport}"
    query = "&".join(("password=***" if part.split("=", 1)[0] == "password" else part)
                     for part in u.query.split("&")) if u.query else ""
    return urlunsplit((u.scheme, netloc, u.path, query, u.fragment))


@dataclass(frozen=True)
class Credentials:
    """Where the transport's identity comes from, resolved once (see resolve_credentials)."""
    username: Optional[str] = None
    password: Optional[str] = None  # given directly (kwargs, URL or env)
    password_file: Optional[str] = None  # read at every connect, so a rotated password is picked up
    ca: Optional[str] = None
    cert: Optional[str] = None
    key: Optional[str] = None

    def read_password(self) -> Optional[str]:
        if self.password is not None:
            return self.password
        if self.password_file is None:
            return None
        try:
            with open(self.password_file, encoding="utf-8") as f:
                return f.read().rstrip("\r\n")
        except OSError as e:
            raise MqttConfigError(f"cannot read the MQTT password file {self.password_file}: "
                                  f"{e.strerror or e}") from None

    def __repr__(self) -> str:  # never show the password
        return (f"Credentials(username={self.username!r}, password={'***' if self.password else None}, "
                f"password_file={self.password_file!r}, ca={self.ca!r}, cert={self.cert!r}, key={self.key!r})")


def resolve_credentials(url: str, *, username: Optional[str] = None, password: Optional[str] = None,
                        password_file: Optional[str] = None, ca: Optional[str] = None,
                        cert: Optional[str] = None, key: Optional[str] = None,
                        env: Optional[Mapping[str, str]] = None) -> Credentials:
    """Credentials with precedence keyword arguments > URL > environment, per setting.

    The password and the password file are one setting: a password from a higher source wins
    over a file from a lower one. TLS settings are used for mqtts:// only; giving them with
    mqtt:// explicitly (arguments or URL) is an error, from the environment they are ignored.
    """
    env = os.environ if env is None else env
    u = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(u.query, keep_blank_values=False).items()}
    unknown = sorted(set(query) - set(_QUERY_KEYS) - {"password"})
    if unknown:
        raise ValueError(f"broker URL {redact_url(url)!r} has unknown option(s) {unknown}; "
                         f"known: {', '.join(_QUERY_KEYS)}")
    if "password" in query:
        raise ValueError("put the password in the URL as mqtt://user:password@host or use "
                         "?password_file=...; ?password= is not accepted")
    url_user = unquote(u.username) if u.username is not None else None
    url_pass = unquote(u.password) if u.password is not None else None

    def first(*vals: Optional[str]) -> Optional[str]:
        return next((v for v in vals if v not in (None, "")), None)

    user = first(username, url_user, env.get(ENV_USERNAME))
    if password is not None or password_file is not None:
        pw, pw_file = password, (None if password is not None else password_file)
    elif url_pass is not None or query.get("password_file"):
        pw, pw_file = url_pass, (None if url_pass is not None else query.get("password_file"))
    else:
        pw = first(env.get(ENV_PASSWORD))
        pw_file = None if pw is not None else first(env.get(ENV_PASSWORD_FILE))
    if (pw is not None or pw_file is not None) and not user:
        raise ValueError(f"a password was given for {redact_url(url)} but no user name: use "
                         f"mqtt://user:pass@host, username=, or {ENV_USERNAME}")
    tls = u.scheme == "mqtts"
    explicit = {n: first(v, query.get(n)) for n, v in (("ca", ca), ("cert", cert), ("key", key))}
    if not tls and any(explicit.values()):
        raise ValueError(f"ca/cert/key were given for {redact_url(url)}: TLS needs an mqtts:// URL")
    files = {n: first(explicit[n], env.get(e)) if tls else None
             for n, e in (("ca", ENV_CA), ("cert", ENV_CERT), ("key", ENV_KEY))}
    if files["key"] and not files["cert"]:
        raise ValueError("a client key was given without its certificate (cert= / EDGEFED_MQTT_CERT)")
    return Credentials(user, pw, pw_file, files["ca"], files["cert"], files["key"])


def tls_context(creds: Credentials, verify_hostname: bool = True) -> ssl.SSLContext:
    """Client TLS: the broker verified against `ca` (else the system CAs), our certificate if any."""
    for what, path in (("CA", creds.ca), ("client certificate", creds.cert), ("client key", creds.key)):
        if path and not os.path.isfile(path):
            raise MqttConfigError(f"MQTT TLS {what} file {path} does not exist")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=creds.ca)
        if creds.cert:
            ctx.load_cert_chain(creds.cert, creds.key)
    except (ssl.SSLError, OSError) as e:
        raise MqttConfigError(f"cannot load the MQTT TLS files (ca={creds.ca}, cert={creds.cert}, "
                              f"key={creds.key}): {e}") from None
    ctx.check_hostname = verify_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _refusal_advice(code: int, creds: Credentials) -> str:
    if code == _BAD_CREDENTIALS:
        who = f"user {creds.username!r}" if creds.username else "no user name"
        return (f"bad user name or password ({who}); check the password file from `edgefed certs` "
                f"(credentials/<name>.password) and {ENV_USERNAME} / {ENV_PASSWORD_FILE}")
    if code == _NOT_AUTHORIZED:
        if not creds.username:
            return (f"not authorized: the broker does not accept anonymous clients; give credentials "
                    f"with mqtt://user:pass@host, ?password_file=..., or {ENV_USERNAME} + "
                    f"{ENV_PASSWORD_FILE}")
        return (f"not authorized: user {creds.username!r} may not connect (wrong password, or not in "
                f"the broker's password file / ACL)")
    return _FATAL_REFUSALS.get(code, "refused")


def parse_url(url: str) -> Tuple[str, str, int]:
    """'mqtt://[user[:pass]@]host:port[?ca=..]' -> ('mqtt', host, port). mqtts:// uses TLS
    (default port 8883). Credentials and options: resolve_credentials()."""
    u = urlsplit(url)
    if u.scheme not in ("mqtt", "tcp", "mqtts"):
        raise ValueError(f"unsupported broker URL {redact_url(url)!r}: use mqtt://host:port (or mqtts://)")
    if not u.hostname:
        raise ValueError(f"broker URL {redact_url(url)!r} has no host: use mqtt://host:port")
    try:
        port = u.port
    except ValueError:
        raise ValueError(f"broker URL {redact_url(url)!r} has an invalid port") from None
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
                 publish_timeout: float = 30.0, max_inflight: int = 1000, tcp_nodelay: bool = True,
                 username: Optional[str] = None, password: Optional[str] = None,
                 password_file: Optional[str] = None, ca: Optional[str] = None,
                 cert: Optional[str] = None, key: Optional[str] = None,
                 verify_hostname: bool = True,
                 max_inbound_messages: int = DEFAULT_MAX_INBOUND_MESSAGES,
                 max_inbound_bytes: int = DEFAULT_MAX_INBOUND_BYTES,
                 inbound_block_timeout: float = DEFAULT_INBOUND_BLOCK_TIMEOUT,
                 max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
                 reassembler: Optional[Reassembler] = None, **reassembly: Any):
        if protocol not in ("auto", "5", "3.1.1"):
            raise ValueError("protocol must be 'auto', '5' or '3.1.1'")
        self.scheme, self.host, self.port = parse_url(url)
        self.url = redact_url(url)  # everything that logs or raises uses this one
        self.credentials = resolve_credentials(url, username=username, password=password,
                                               password_file=password_file, ca=ca, cert=cert, key=key)
        self.verify_hostname = verify_hostname
        self.inbound_limits = check_inbound_limits(max_inbound_messages, max_inbound_bytes,
                                                   inbound_block_timeout)
        self._tls: Optional[ssl.SSLContext] = None
        self._chunker = Chunker("edgefed-mqtt", max_payload_bytes, reassembler, **reassembly)
        self._fatal: Optional[BrokerRefused] = None  # a refusal after a reconnect: stop, explain
        # Persistent sessions need a stable id; without one a session could never be resumed.
        # The default id is random (unguessable, so nobody can take the session over); a caller
        # that passes a stable id for its persistent session gets exactly that id (docs/security.md
        # explains why the broker binds it to the user name instead).
        self.client_id = client_id or f"edgefed-{secrets.token_hex(8)}"
        self._chunker.name = f"edgefed-mqtt-{self.client_id}"
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
        check_topic_name(topic)
        self.chunker.check_will(topic, payload)
        self._will = (topic, bytes(payload), qos, retain)

    def _make_client(self, version: str) -> mqtt.Client:
        proto = _PROTOCOLS[version]
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=proto,
                        clean_session=None if proto == mqtt.MQTTv5 else self.clean_start)
        if self.scheme == "mqtts":
            c.tls_set_context(self._tls_context())
        if self.credentials.username:  # on every connect: a rotated password file is re-read
            c.username_pw_set(self.credentials.username, self.credentials.read_password())
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

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = tls_context(self.credentials, self.verify_hostname)
        return self._tls

    def connect(self, timeout: float = 10.0) -> None:
        if self._closed:
            raise TransportError("transport was closed; create a new one")
        if self._client is not None:
            return
        if self.scheme == "mqtts":
            self._tls_context()  # bad files fail here, before any network
        self.credentials.read_password()
        if self._dispatcher is None:
            self._dispatcher = Dispatcher(f"edgefed-dispatch-{self.client_id}", *self.inbound_limits)
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
            raise BrokerRefused(f"MQTT broker at {self.url} refused the connection (MQTT {version}, "
                                f"reason code {code} {reason}): {_refusal_advice(code, self.credentials)}",
                                code)

    def _open(self, version: str, deadline: float, timeout: float) -> Tuple[int, str]:
        client = self._make_client(version)
        self._connack, self._connack_event = None, threading.Event()
        self._client = client  # callbacks check identity to ignore stale clients
        self._tcp_connect(client, version, deadline)
        client.loop_start()
        if not self._connack_event.wait(max(0.0, deadline - time.monotonic())):
            self._abandon(client)
            hint = "; is it an MQTT broker, and is it overloaded?"
            if self.scheme == "mqtts":
                hint += (" With TLS the broker may also have refused our client certificate "
                         "(require_certificate true): pass cert= and key= (or EDGEFED_MQTT_CERT/_KEY)"
                         if not self.credentials.cert else
                         " With TLS the broker may also have refused our client certificate "
                         "(signed by another CA?)")
            raise BrokerUnreachable(
                f"MQTT broker at {self.url} accepted the connection but sent no CONNACK within "
                f"{timeout} s{hint}")
        code, reason = self._connack or (0, "")
        if code != 0:
            self._abandon(client)
        if code == _DROPPED:
            raise BrokerUnreachable(
                f"MQTT broker at {self.url} closed the TLS connection before answering CONNECT "
                f"({reason}): it refused our client certificate" +
                (" (none given: pass cert= and key=, ?cert=&key=, or EDGEFED_MQTT_CERT/_KEY)"
                 if not self.credentials.cert else " (not signed by the broker's CA?)") +
                "; the broker log says which")
        return code, reason

    def _probe(self, deadline: float) -> str:
        """Ask once per broker whether it speaks MQTT 5, with a throwaway clean client.

        A probe rather than trying MQTT 5 with our real session: amqtt 0.12 does not answer a
        v5 CONNECT that carries properties (it waits for bytes that never come), and a v5
        attempt without a session expiry would end our persistent session.

        The probe sends no credentials: with `use_username_as_clientid` (what `edgefed certs`
        configures) a clean-start probe under our user name would be our own session and would
        wipe it. Any MQTT 5 CONNACK, a refusal included, shows the broker speaks MQTT 5; a 3.1.1
        broker answers "unsupported protocol version" (132) or nothing.
        """
        ev, result = threading.Event(), []
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgefed-probe-{secrets.token_hex(6)}",
                        protocol=mqtt.MQTTv5)
        if self.scheme == "mqtts":
            c.tls_set_context(self._tls_context())
        c.on_connect = lambda cl, u, f, rc, p: (result.append(int(getattr(rc, "value", rc))), ev.set())
        # dropped before any CONNACK (with TLS: our client certificate refused): we learnt nothing
        c.on_disconnect = lambda cl, u, f, rc, p: (result.append(None), ev.set())
        self._tcp_connect(c, "probe", deadline)
        c.loop_start()
        try:
            ok = ev.wait(min(_PROBE_TIMEOUT, max(0.0, deadline - time.monotonic())))
        finally:
            c.disconnect()
            c.loop_stop()
        if ok and result[0] is None:
            return "3.1.1"  # not cached (a 3.1.1 attempt cannot hang on amqtt); it fails and says why
        version = "5" if ok and result[0] != _UNSUPPORTED_PROTOCOL else "3.1.1"
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
            except ssl.SSLError as e:  # certificate problems do not go away by retrying
                if client is self._client:
                    self._client = None
                what = ("the broker's certificate is not signed by the CA we trust or does not name "
                        f"{self.host!r}" if isinstance(e, ssl.SSLCertVerificationError) else "TLS failed")
                raise BrokerUnreachable(
                    f"TLS handshake with {self.url} failed: {what} ({getattr(e, 'verify_message', None) or e}); "
                    f"pass the job's CA (ca= / ?ca= / {ENV_CA}, ca.crt from `edgefed certs`) and "
                    f"connect with a host name the broker certificate lists (--server-host)") from e
            except OSError as e:  # broker not (yet) up: retry until the deadline, then explain
                if time.monotonic() + delay > deadline:
                    if client is self._client:
                        self._client = None
                    raise BrokerUnreachable(
                        f"cannot reach MQTT broker at {self.host}:{self.port} ({self.url}: {e}); is it running? "
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
            if code in _FATAL_REFUSALS and self._connack[0] == 0:  # a reconnect refused for good
                self._fatal = BrokerRefused(
                    f"MQTT broker at {self.url} refused the reconnection (reason code {code} "
                    f"{reason}): {_refusal_advice(code, self.credentials)}; not retrying", code)
                log.error("%s", self._fatal)
                client.disconnect()  # ends paho's reconnect loop
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
        if self._connack is None and self.scheme == "mqtts":  # TLS accepted, then dropped: a cert refusal
            self._connack = (_DROPPED, str(reason))
            self._connack_event.set()
            return
        if not self._closed and self._fatal is None:
            log.warning("lost connection to %s (%s); reconnecting with backoff", self.url, reason)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        with self._lock:
            targets = [cb for f, (_, cb) in self._subs.items() if topic_matches(f, topic)]
        d = self._dispatcher
        if d is None:  # closing
            return
        payload = bytes(msg.payload)  # paho 2 gives bytes already: no copy
        if targets and is_chunk(payload):  # once, not per callback: reassembled on the dispatcher
            d.submit(self._deliver_chunk, topic, payload, qos=msg.qos)
            return
        for cb in targets:  # may wait (bounded) when the queue is full: back-pressure, see Dispatcher
            d.submit(cb, topic, payload, qos=msg.qos)

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
        if self._fatal is not None:
            raise self._fatal
        client = self._client
        if client is None:
            raise NotConnected("publish() before connect(); call connect() first")
        chunks = self.chunker.split(topic, payload, retain)  # refuses an oversized retained one
        if chunks is None:
            handle = self._send(client, topic, bytes(payload), qos, retain, PublishHandle)
        else:
            handle = whole = ChunkedPublishHandle(len(chunks))
            try:
                for i, chunk in enumerate(chunks):  # in order, on the same topic
                    chunks[i] = b""  # paho keeps each one until it is sent: drop ours
                    self._send(client, topic, chunk, qos, False, whole.part)
            except TransportError as e:
                whole._part_done(e)  # chunks already queued still go out; the receiver expires them
                raise
            self.chunker.sent(len(chunks))
        if wait:
            handle.wait(self.publish_timeout if timeout is None else timeout)
        return handle

    def _send(self, client: mqtt.Client, topic: str, payload: bytes, qos: int, retain: bool,
              make_handle: Any) -> PublishHandle:
        """Hand one MQTT message to paho; its handle (make_handle(mid)) completes at the PUBACK."""
        info = client.publish(topic, payload, qos, retain)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            raise TransportError("paho's outgoing queue is full")
        handle = make_handle(info.mid)
        if qos == 0:
            self._pubacks.forget(info.mid)  # paho may have reported it already; nothing to wait for
            if info.rc == mqtt.MQTT_ERR_NO_CONN:
                raise NotConnected(f"QoS-0 publish to {topic} dropped: not connected to {self.url}")
            handle._complete()
        else:  # QoS>0 while disconnected stays queued in paho and goes out after reconnect
            self._pubacks.register(handle)
        return handle

    def _callbacks_for(self, topic: str) -> List[Callback]:
        with self._lock:
            return [cb for f, (_, cb) in self._subs.items() if topic_matches(f, topic)]

    def subscribe(self, topic_filter: str, callback: Callback, qos: int = 1,
                  timeout: float = 10.0) -> None:
        check_topic_filter(topic_filter)
        if self._fatal is not None:
            raise self._fatal
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
