"""Start an MQTT broker for a job: a given URL, Mosquitto when installed, else embedded amqtt.

    handle = start_broker()          # mqtt://127.0.0.1:<free port>
    ... handle.url ...
    handle.restart()                 # same port (tests of broker restarts)
    handle.stop()

Mosquitto gets a generated config tuned for many small QoS-1 messages: `set_tcp_nodelay true`
(with Nagle on, small PUBACKs stall: 56 vs 3,500 msg/s measured) and raised queue/inflight
limits so a busy subscriber loses nothing. The embedded broker runs in a subprocess
(`python -m edgefed.transport.broker --embedded --port N`) so it is isolated from the
caller's event loop and can be killed cleanly. amqtt speaks MQTT 3.1.1 only.

Without `auth` the broker is anonymous (development mode, logged as a WARNING): anyone who
reaches it can join, read and poison jobs. `start_broker(auth=DIR)` runs Mosquitto with the
files `edgefed certs --out DIR` wrote: a TLS listener (mqtts://), allow_anonymous false, the
password file and the per-device ACL (docs/security.md). `start_broker(prefer="embedded",
auth=DIR)` enforces the same files in the embedded amqtt broker: TLS listener with DIR's certs,
anonymous clients refused, passwords checked against DIR/passwd, the client id replaced by the
user name, and DIR/acl applied to publish, subscribe and every delivery (EdgeFed's own amqtt
plugins below, using edgefed.security.broker_auth).
"""
from __future__ import annotations

import argparse
import atexit
import getpass
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from ..children import die_with_parent_preexec
from .base import log

_PKG_ROOT = str(Path(__file__).resolve().parents[2])  # directory holding the edgefed package


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS picks it; a race is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def find_mosquitto() -> Optional[str]:
    """The mosquitto binary; Debian installs it in /usr/sbin, which is not on every PATH."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)),
        None)


@dataclass
class BrokerHandle:
    url: str
    kind: str  # "mosquitto" | "embedded" | "external"
    host: str = "127.0.0.1"
    port: int = 0
    workdir: Optional[str] = None
    log_path: Optional[str] = None
    _argv: List[str] = field(default_factory=list, repr=False)
    _env: Optional[dict] = field(default=None, repr=False)
    _proc: Optional[subprocess.Popen] = field(default=None, repr=False)
    _own_workdir: bool = field(default=False, repr=False)
    _die_with_parent: bool = field(default=False, repr=False)

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _spawn(self, timeout: float) -> None:
        assert self.log_path is not None
        logf = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen(self._argv, stdout=logf, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=self._env,
                                          start_new_session=True,  # our signals only, not the caller's
                                          preexec_fn=die_with_parent_preexec() if self._die_with_parent else None)
        finally:
            logf.close()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.kind} broker exited with code {self._proc.returncode} "
                                   f"before listening on {self.host}:{self.port}:\n{self.log_tail()}")
            if port_open(self.host, self.port):
                return
            time.sleep(0.05)
        self._terminate()
        raise RuntimeError(f"{self.kind} broker did not listen on {self.host}:{self.port} within "
                           f"{timeout} s:\n{self.log_tail()}")

    def _terminate(self, timeout: float = 5.0) -> None:
        p, self._proc = self._proc, None
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout)

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(Path(self.log_path or "").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def halt(self, timeout: float = 5.0) -> None:
        """Stop the process but keep config and data, so start() can bring it back."""
        self._terminate(timeout)

    def start(self, timeout: float = 10.0) -> None:
        """(Re)start on the same host:port after halt()."""
        if self.kind == "external":
            raise RuntimeError("cannot start an external broker")
        if self.alive():
            return
        self._spawn(timeout)

    def restart(self, timeout: float = 10.0) -> None:
        """Stop and start again on the same port (clients see a broker restart)."""
        self.halt()
        self.start(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop for good and remove the temp directory we created."""
        self._terminate(timeout)
        if self._own_workdir and self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> "BrokerHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _mosquitto_conf(host: str, port: int, workdir: str, persistence: bool) -> str:
    lines = [
        f"listener {port} {host}",
        "allow_anonymous true",
        "set_tcp_nodelay true",  # else Nagle delays small acks: ~60x slower QoS 1
        "max_queued_messages 100000",  # per client, so a slow subscriber does not drop messages
        "max_inflight_messages 1000",
        f"persistence {'true' if persistence else 'false'}",
        f"persistence_location {workdir}/",
        f"log_dest file {workdir}/mosquitto.log",
        "log_type error", "log_type warning", "log_type notice", "log_type information",
        # as root, mosquitto 2 would switch to user 'mosquitto', who cannot write our temp dir
        f"user {getpass.getuser()}",
    ]
    if persistence:
        lines.append("autosave_interval 1")
    return "\n".join(lines) + "\n"


_AUTH_FILES = ("ca.crt", "broker.crt", "broker.key", "passwd", "acl")


class AuthDirError(FileNotFoundError, ValueError):
    """start_broker(auth=DIR) with a DIR that lacks the files `edgefed certs` writes."""


def _check_auth_dir(auth: str, embedded: bool = False) -> Path:
    d = Path(auth)
    missing = [n for n in _AUTH_FILES if not (d / n).is_file()]
    if missing:
        what = "the embedded broker cannot enforce auth: " if embedded else ""
        raise AuthDirError(f"{what}{auth} lacks {', '.join(missing)}: create it with "
                           f"`edgefed certs --out {auth} --job JOB --devices dev1,dev2`")
    return d


def _secure_mosquitto_conf(auth: str, host: str, port: int, workdir: str, persistence: bool,
                           require_certificate: bool) -> str:
    from ..security.broker_auth import mosquitto_conf
    d = _check_auth_dir(auth)
    conf = mosquitto_conf(port=port, bind=host, ca=d / "ca.crt", certfile=d / "broker.crt",
                          keyfile=d / "broker.key", password_file=d / "passwd", acl_file=d / "acl",
                          require_certificate=require_certificate,
                          persistence_dir=workdir if persistence else None,
                          log_file=Path(workdir) / "mosquitto.log")
    if persistence:
        conf += "autosave_interval 1\n"
    return conf


def start_broker(url: Optional[str] = None, prefer: str = "auto", port: int = 0, *,
                 host: str = "127.0.0.1", persistence: bool = False,
                 workdir: Optional[str] = None, timeout: float = 15.0,
                 die_with_parent: bool = False, auth: Optional[str] = None,
                 require_certificate: bool = True) -> BrokerHandle:
    """Use `url` if given; else start Mosquitto (if installed and prefer allows) or embedded amqtt.

    auth: a directory written by `edgefed certs`; Mosquitto then runs with TLS, passwords and
    the ACL, and the handle's url is mqtts://host:port (clients still need their credentials).
    Without it the broker is anonymous, for development, and a WARNING says so.
    die_with_parent: the broker gets SIGTERM if this process dies, even by SIGKILL (Linux). The
    calling thread must live as long as the broker (the kernel watches the thread that forked).
    """
    if url:
        from .mqtt import parse_url
        _, h, p = parse_url(url)
        return BrokerHandle(url=url, kind="external", host=h, port=p)
    if prefer not in ("auto", "mosquitto", "embedded"):
        raise ValueError("prefer must be 'auto', 'mosquitto' or 'embedded'")
    if auth is not None and prefer == "embedded":
        _check_auth_dir(auth, embedded=True)
    binary = find_mosquitto() if prefer in ("auto", "mosquitto") else None
    if (prefer == "mosquitto" or (auth is not None and prefer == "auto")) and binary is None:
        raise FileNotFoundError("mosquitto not found on PATH or in /usr/sbin; install it "
                                "(apt-get install mosquitto) or use prefer='embedded'")
    kind = "mosquitto" if binary else "embedded"
    own = workdir is None
    wd = workdir or tempfile.mkdtemp(prefix=f"edgefed-{kind}-")
    attempts = 3 if port == 0 else 1  # a picked free port can be taken before we bind it
    last_error: Optional[Exception] = None
    for _ in range(attempts):
        p = port or free_port(host)
        h = BrokerHandle(url=f"{'mqtts' if auth else 'mqtt'}://{host}:{p}", kind=kind, host=host,
                         port=p, workdir=wd, _own_workdir=own, _die_with_parent=die_with_parent)
        if binary:
            conf = Path(wd) / "mosquitto.conf"
            conf.write_text(_secure_mosquitto_conf(auth, host, p, wd, persistence, require_certificate)
                            if auth else _mosquitto_conf(host, p, wd, persistence))
            h.log_path = str(Path(wd) / "mosquitto.log")
            h._argv = [binary, "-c", str(conf)]
        else:
            h.log_path = str(Path(wd) / "amqtt.log")
            h._argv = [sys.executable, "-m", "edgefed.transport.broker", "--embedded",
                       "--host", host, "--port", str(p)]
            if auth:
                h._argv += ["--auth", str(Path(auth).resolve())]
                if not require_certificate:
                    h._argv.append("--no-require-certificate")
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PKG_ROOT, env.get("PYTHONPATH")]))
            h._env = env
        try:
            h._spawn(timeout)
            atexit.register(h.stop)  # a crashed caller should not leave a broker behind
            if auth:
                log.info("%s broker at %s with TLS, passwords and ACL from %s", kind, h.url, auth)
            else:
                warn_anonymous(h.url, kind)
            return h
        except RuntimeError as e:
            last_error = e
    if own:
        shutil.rmtree(wd, ignore_errors=True)
    raise RuntimeError(f"could not start a {kind} broker: {last_error}")


def warn_anonymous(url: str, kind: str = "mosquitto") -> None:
    log.warning("anonymous broker: anyone who reaches %s can join, read and poison jobs; use "
                "`edgefed certs --out DIR --job JOB --devices ...` and run Mosquitto with its "
                "mosquitto.conf (or start_broker(auth=DIR))%s", url,
                "; the embedded amqtt broker is for local development only" if kind == "embedded" else "")


# ---------------------------------------------------------------------- embedded amqtt broker

def run_embedded(host: str, port: int, auth: Optional[str] = None,
                 require_certificate: bool = True) -> None:
    """Run an amqtt 0.12 broker until SIGTERM/SIGINT (blocking; used by the subprocess).

    auth: an `edgefed certs` directory: TLS with its certificates, its password file and ACL
    (EdgeFedAuthPlugin, EdgeFedAclPlugin), the client id replaced by the user name.
    """
    import asyncio
    import logging
    import ssl

    from amqtt.broker import Broker

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    mod = __name__.replace('__main__', 'edgefed.transport.broker')
    listener = {"type": "tcp", "bind": f"{host}:{port}"}
    if auth is None:
        # only auth: the default logging and $SYS plugins cost throughput and add nothing here
        plugins: dict = {f"{mod}.OpenAuthPlugin": {}}
        rules = None
    else:
        d = _check_auth_dir(auth, embedded=True)
        listener.update(ssl=True, cafile=str(d / "ca.crt"), certfile=str(d / "broker.crt"),
                        keyfile=str(d / "broker.key"))
        files = {"password_file": str(d / "passwd"), "acl_file": str(d / "acl")}
        rules = _embedded_rules(files["password_file"], files["acl_file"])  # fail now, not per client
        plugins = {f"{mod}.EdgeFedAuthPlugin": dict(files), f"{mod}.EdgeFedAclPlugin": dict(files)}
    config = {"listeners": {"default": listener}, "plugins": plugins}

    class _TakeoverSafeBroker(Broker):
        """amqtt 0.12 with session take-over done in order.

        When a client reconnects before amqtt noticed its old connection died (a Wi-Fi drop, a
        killed process), amqtt attaches the new connection to the shared persistent Session and
        only then lets the old connection's loop finish, which marks that Session disconnected:
        SUBACKs still come back but no message is delivered to the live client again. Here the
        old connection is closed and its loop allowed to finish (will included, as MQTT 3.1.1
        3.1.4 asks) before the new connection is attached.
        """

        @staticmethod
        def _create_ssl_context(listener):  # amqtt asks for a client certificate but does not require it
            ctx = Broker._create_ssl_context(listener)
            if require_certificate:
                ctx.verify_mode = ssl.CERT_REQUIRED
            return ctx

        async def _initialize_client_session(self, reader, writer, remote_address, remote_port):
            if rules is None:
                handler, session = await super()._initialize_client_session(
                    reader, writer, remote_address, remote_port)
            else:
                handler, session = await self._authenticated_client_session(reader, writer)
            old = self._sessions.get(session.client_id)
            if old is not None and old[0] is session and session.transitions.is_connected():
                await self._close_old_connection(old)
            return handler, session

        async def _close_old_connection(self, old) -> None:
            session = old[0]
            # warning: the broker process logs at WARNING, and broker.log is what a post-mortem reads
            logging.getLogger("edgefed.broker").warning("take-over of %s: closing its old connection",
                                                        session.client_id)
            await old[1].handle_connection_closed()
            for _ in range(500):  # the old loop runs _handle_disconnect on this event loop
                if not session.transitions.is_connected():
                    break
                await asyncio.sleep(0.01)

        async def _authenticated_client_session(self, reader, writer):
            """amqtt's _initialize_client_session with the password checked *before* any session is
            looked up, deleted or taken over (amqtt checks it after), and the client id replaced by
            the user name (Mosquitto's use_username_as_clientid)."""
            from amqtt.errors import MQTTError
            from amqtt.mqtt.connack import BAD_USERNAME_PASSWORD, NOT_AUTHORIZED, ConnackPacket
            from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

            handler, new = await BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager)
            refusal = rules.refusal(new)
            if refusal is not None:
                code = NOT_AUTHORIZED if new.username is None or refusal == "will" else BAD_USERNAME_PASSWORD
                logging.getLogger("edgefed.broker").warning(
                    "refused CONNECT of user %r (client id %r): %s", new.username, new.client_id,
                    {"anonymous": "no user name", "password": "unknown user or wrong password",
                     "will": "will topic not allowed by the ACL"}[refusal])
                try:
                    await ConnackPacket.build(0, code).to_stream(writer)
                finally:
                    await writer.close()
                raise MQTTError(f"refused: {refusal}")
            new.client_id = new.username  # the session belongs to whoever holds the password
            old = self._sessions.get(new.client_id)
            # the user's earlier session may be a clean one (amqtt would reuse it, clean flag and all,
            # and never queue for it): persistent sessions are reused only if they were persistent
            if new.clean_session or (old is not None and old[0].clean_session):
                if old is not None and old[0].transitions.is_connected():
                    await self._close_old_connection(old)
                await self._delete_session(new.client_id)
                new.parent = 0
                session = new
            elif old is not None:
                session = old[0]
                for attr in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain",
                             "keep_alive", "username", "password"):
                    setattr(session, attr, getattr(new, attr))
                session.parent = 1
            else:
                new.parent = 0
                session = new
            delay = self.config.get("timeout-disconnect-delay", 0)
            if session.keep_alive > 0 and isinstance(delay, int):
                session.keep_alive += delay
            return handler, session

        async def _publish_retained_messages_for_subscription(self, subscription, session):
            # amqtt 0.12 calls this on CONNECT for *every* filter anyone subscribed to; without the
            # ACL check a device would get other devices' retained topics
            if rules is None:
                return await super()._publish_retained_messages_for_subscription(subscription, session)
            topic_filter, qos = subscription
            handler = self._get_handler(session)
            if handler is None or not any(s is session for s, _ in self._subscriptions.get(topic_filter, ())):
                return
            tasks = [asyncio.ensure_future(handler.mqtt_publish(r.topic, r.data, min(qos, r.qos or qos),
                                                                retain=True))
                     for t, r in list(self._retained_messages.items())
                     if self._matches(t, topic_filter) and rules.allows(session.username, t, "read")]
            if tasks:
                await asyncio.wait(tasks)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        broker = _TakeoverSafeBroker(config)
        await broker.start()
        print(f"amqtt broker listening on {host}:{port}", flush=True)
        await stop.wait()
        try:
            await asyncio.wait_for(broker.shutdown(), 5)
        except Exception as e:  # exiting anyway; the process ends the sockets
            print(f"amqtt shutdown: {e!r}", flush=True)

    asyncio.run(main())


class _EmbeddedRules:
    """DIR/passwd and DIR/acl of an `edgefed certs` directory, as the embedded broker applies them
    (edgefed.security.broker_auth parses and matches them the way Mosquitto does)."""

    def __init__(self, password_file: str, acl_file: str):
        from ..security import broker_auth as BA
        self._ba = BA
        self.users = BA.read_password_file(password_file)
        self.acl = BA.parse_acl(Path(acl_file).read_text(encoding="utf-8"))

    def refusal(self, session) -> Optional[str]:
        """None if the CONNECT may go on, else 'anonymous', 'password' or 'will'."""
        if session.username is None:
            return "anonymous"
        if not self._ba.verify_password(self.users, session.username, session.password):
            return "password"
        if session.will_flag and not self.allows(session.username, session.will_topic or "", "write"):
            return "will"  # Mosquitto 2 checks the will against the ACL at CONNECT too
        return None

    def allows(self, user: Optional[str], topic: str, access: str) -> bool:
        return self._ba.acl_allows(self.acl, user, topic, access)


_rules_cache: dict = {}


def _embedded_rules(password_file: str, acl_file: str) -> _EmbeddedRules:
    key = (password_file, acl_file)  # one parse per broker process, shared by both plugins
    if key not in _rules_cache:
        _rules_cache[key] = _EmbeddedRules(password_file, acl_file)
    return _rules_cache[key]


_open_auth = None
_edgefed_plugins: dict = {}


def _make_edgefed_plugins() -> dict:
    from amqtt.contexts import Action
    from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

    @dataclass
    class _Files:
        password_file: str = ""
        acl_file: str = ""

    class EdgeFedAuthPlugin(BaseAuthPlugin):
        """Password file check (also done before the session lookup, in run_embedded)."""
        Config = _Files

        async def authenticate(self, *, session) -> bool:  # type: ignore[override]
            return _embedded_rules(self.config.password_file, self.config.acl_file).refusal(session) is None

    class EdgeFedAclPlugin(BaseTopicPlugin):
        """Mosquitto acl_file semantics: publish needs write, subscribe a filter within a readable
        pattern, and each delivered message read; anything not listed is denied."""
        Config = _Files

        async def topic_filtering(self, *, session=None, topic=None, action=None) -> bool:  # type: ignore[override]
            if session is None or not topic:
                return False
            access = {Action.PUBLISH: "write", Action.SUBSCRIBE: "subscribe",
                      Action.RECEIVE: "read"}.get(action)
            rules = _embedded_rules(self.config.password_file, self.config.acl_file)
            return access is not None and rules.allows(session.username, topic, access)

    return {"EdgeFedAuthPlugin": EdgeFedAuthPlugin, "EdgeFedAclPlugin": EdgeFedAclPlugin}


def __getattr__(name: str):
    # amqtt loads plugins by dotted path; building the class lazily keeps amqtt out of the
    # imports of device code that only wants start_broker().
    global _open_auth
    if name in ("EdgeFedAuthPlugin", "EdgeFedAclPlugin"):
        if not _edgefed_plugins:
            _edgefed_plugins.update(_make_edgefed_plugins())
        return _edgefed_plugins[name]
    if name != "OpenAuthPlugin":
        raise AttributeError(name)
    if _open_auth is None:
        from amqtt.plugins.base import BaseAuthPlugin

        class OpenAuthPlugin(BaseAuthPlugin):
            """Let every client in, as a named (not anonymous) session.

            amqtt's AnonymousAuthPlugin marks sessions anonymous, and amqtt then neither keeps
            their clean_session=False sessions nor queues QoS-1 messages for them while offline.
            The embedded broker listens on loopback only, like the Mosquitto we configure.
            """

            @dataclass
            class Config:
                pass

            async def authenticate(self, *, session) -> bool:  # type: ignore[override]
                return True

        _open_auth = OpenAuthPlugin
    return _open_auth


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="EdgeFed broker launcher")
    ap.add_argument("--embedded", action="store_true", help="run the embedded amqtt broker here")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--prefer", default="auto", choices=["auto", "mosquitto", "embedded"])
    ap.add_argument("--auth", default=None, metavar="DIR",
                    help="TLS, passwords and ACL from `edgefed certs --out DIR` (Mosquitto or embedded)")
    ap.add_argument("--no-require-certificate", action="store_true",
                    help="with --auth: clients need no certificate of the job's CA (password only)")
    a = ap.parse_args(argv)
    if a.embedded:
        run_embedded(a.host, a.port, a.auth, require_certificate=not a.no_require_certificate)
        return 0
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    h = start_broker(prefer=a.prefer, port=a.port, host=a.host, auth=a.auth)
    print(f"{h.kind} broker at {h.url} (pid {h.pid}); Ctrl-C stops it", flush=True)
    try:
        while h.alive():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        h.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
