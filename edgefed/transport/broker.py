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
password file and the per-device ACL (docs/security.md). The embedded amqtt broker cannot
enforce these and is for local development only.
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


def _secure_mosquitto_conf(auth: str, host: str, port: int, workdir: str, persistence: bool,
                           require_certificate: bool) -> str:
    from ..security.broker_auth import mosquitto_conf
    d = Path(auth)
    missing = [n for n in ("ca.crt", "broker.crt", "broker.key", "passwd", "acl") if not (d / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{auth} lacks {', '.join(missing)}: create it with "
                                f"`edgefed certs --out {auth} --job JOB --devices dev1,dev2`")
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
        raise ValueError("the embedded amqtt broker cannot enforce `edgefed certs` credentials and "
                         "ACLs; use Mosquitto (prefer='mosquitto') for auth=")
    binary = find_mosquitto() if prefer in ("auto", "mosquitto") else None
    if (prefer == "mosquitto" or auth is not None) and binary is None:
        raise FileNotFoundError("mosquitto not found on PATH or in /usr/sbin; install it "
                                "(apt-get install mosquitto)" + ("" if auth else " or use prefer='embedded'"))
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

def run_embedded(host: str, port: int) -> None:
    """Run an amqtt 0.12 broker until SIGTERM/SIGINT (blocking; used by the subprocess)."""
    import asyncio
    import logging

    from amqtt.broker import Broker

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        # only auth: the default logging and $SYS plugins cost throughput and add nothing here
        "plugins": {f"{__name__.replace('__main__', 'edgefed.transport.broker')}.OpenAuthPlugin": {}},
    }

    class _TakeoverSafeBroker(Broker):
        """amqtt 0.12 with session take-over done in order.

        When a client reconnects before amqtt noticed its old connection died (a Wi-Fi drop, a
        killed process), amqtt attaches the new connection to the shared persistent Session and
        only then lets the old connection's loop finish, which marks that Session disconnected:
        SUBACKs still come back but no message is delivered to the live client again. Here the
        old connection is closed and its loop allowed to finish (will included, as MQTT 3.1.1
        3.1.4 asks) before the new connection is attached.
        """

        async def _initialize_client_session(self, reader, writer, remote_address, remote_port):
            handler, session = await super()._initialize_client_session(
                reader, writer, remote_address, remote_port)
            old = self._sessions.get(session.client_id)
            if old is not None and old[0] is session and session.transitions.is_connected():
                # warning: the broker process logs at WARNING, and broker.log is what a post-mortem reads
                logging.getLogger("edgefed.broker").warning("take-over of %s: closing its old connection",
                                                            session.client_id)
                await old[1].handle_connection_closed()
                for _ in range(500):  # the old loop runs _handle_disconnect on this event loop
                    if not session.transitions.is_connected():
                        break
                    await asyncio.sleep(0.01)
            return handler, session

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


_open_auth = None


def __getattr__(name: str):
    # amqtt loads plugins by dotted path; building the class lazily keeps amqtt out of the
    # imports of device code that only wants start_broker().
    global _open_auth
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
                    help="run Mosquitto with TLS, passwords and ACL from `edgefed certs --out DIR`")
    a = ap.parse_args(argv)
    if a.embedded:
        run_embedded(a.host, a.port)
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
