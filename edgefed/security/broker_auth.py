"""Mosquitto authentication and authorisation files for one job (used by `edgefed certs`).

- password file in Mosquitto 2's own format, `user:$7$<iterations>$<b64 salt>$<b64 hash>`
  (PBKDF2-HMAC-SHA512, 12-byte salt, 64-byte hash, 101 iterations by default: what
  `mosquitto_passwd` writes; see mosquitto's src/password_mosq.c). The passwords are random
  (secrets.token_urlsafe), so the low iteration count costs nothing in guessing resistance.
- ACL file: a device may publish only its own update/status/sync-request topics and read only
  its job's plan and state and its own ack/sync-reply topics; the aggregation server may read
  and write everything of its job. Topic names come from edgefed.protocol.Topics.
- mosquitto.conf: TLS listener, allow_anonymous false, password_file, acl_file, and
  use_username_as_clientid so a session belongs to a user name (docs/security.md).

Standard library only (no cryptography, no torch): broker.py imports this on devices' hosts too.
"""
from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

from ..protocol import Topics, check_id

PBKDF2_ITERATIONS = 101  # mosquitto_passwd's default (PW_DEFAULT_ITERATIONS)
SALT_LEN = 12  # mosquitto's SALT_LEN
SERVER_NAME = "server"  # file name of the aggregation server's identity; not a valid device id here

PathLike = Union[str, "os.PathLike[str]"]


# ------------------------------------------------------------------ identities

def server_username(job: str) -> str:
    """MQTT user name of a job's aggregation server: 'server@<job>' ('@' is not in any id)."""
    return f"{SERVER_NAME}@{check_id(job, 'job')}"


def device_username(job: str, device: str) -> str:
    """MQTT user name of a device in a job: '<device>@<job>'."""
    if check_id(device, "device") == SERVER_NAME:
        raise ValueError(f"device id {SERVER_NAME!r} is reserved for the aggregation server's files")
    return f"{device}@{check_id(job, 'job')}"


def new_password() -> str:
    return secrets.token_urlsafe(24)  # 192 bits, [A-Za-z0-9_-]: no quoting trouble anywhere


# ------------------------------------------------------------------ password file

def mosquitto_hash(password: str, *, salt: Optional[bytes] = None,
                   iterations: int = PBKDF2_ITERATIONS) -> str:
    """Mosquitto 2 `$7$` hash of `password` (the part after 'user:' in a password file)."""
    salt = secrets.token_bytes(SALT_LEN) if salt is None else salt
    dk = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(dk).decode()}"


def check_mosquitto_hash(password: str, hashed: str) -> bool:
    """True if `hashed` ($7$ or $6$ format) is the hash of `password`."""
    parts = hashed.split("$")
    try:
        if len(parts) == 5 and parts[1] == "7":
            it, salt, want = int(parts[2]), base64.b64decode(parts[3]), base64.b64decode(parts[4])
            got = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, it)
        elif len(parts) == 4 and parts[1] == "6":  # mosquitto 1.x: sha512(password + salt)
            salt, want = base64.b64decode(parts[2]), base64.b64decode(parts[3])
            got = hashlib.sha512(password.encode("utf-8") + salt).digest()
        else:
            return False
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


def password_file_text(users: Mapping[str, str]) -> str:
    """user -> clear password, as a Mosquitto password file (one `user:$7$...` line each)."""
    lines = []
    for user, pw in users.items():
        if not user or any(c in user for c in ":\n\r") or user != user.strip():
            raise ValueError(f"user name {user!r} cannot go into a Mosquitto password file")
        lines.append(f"{user}:{mosquitto_hash(pw)}")
    return "\n".join(lines) + "\n"


def write_private(path: PathLike, text: str) -> Path:
    """Write `text` to `path` readable by its owner only (0600), also when it already existed."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)
    return p


# ------------------------------------------------------------------ ACL

def device_acl(job: str, device: str) -> List[str]:
    """`topic ...` lines of one device: publish its own topics, read the job's shared ones."""
    t = Topics(job)
    return ([f"topic write {x}" for x in (t.update(device), t.status(device), t.sync_request(device),
                                         t.secagg(device))]
            + [f"topic read {x}" for x in (t.plan(), t.state(), t.ack(device), t.sync_reply(device),
                                        t.secagg_to(device), t.secagg_all())])


def server_acl(job: str) -> List[str]:
    return [f"topic readwrite {Topics(job).everything()}"]


def worker_topics(job: str, worker: str) -> Tuple[List[str], List[str]]:
    """(write, read) topics of an aggregation worker (docs/server.md "Scale-out"): it reports on
    its own report/status topics and reads every device's update (through the shared
    subscription $share/<group>/edgefed/v1/<job>/update/+, which Mosquitto and EMQX check against
    the topic filter without the $share/<group>/ prefix), the plan, the devices' statuses (their
    classes) and the coordinator's control messages. It cannot ack, plan or write any device's
    topic; devices cannot read updates or write reports."""
    t = Topics(job)
    return ([t.worker_report(worker), t.worker_status(worker)],
            [t.all_updates(), t.plan(), t.state(), t.all_statuses(), t.worker_control()])


def worker_acl(job: str, worker: str) -> List[str]:
    write, read = worker_topics(job, worker)
    return [f"topic write {x}" for x in write] + [f"topic read {x}" for x in read]


def acl_text(job: str, devices: Iterable[str], workers: Iterable[str] = ()) -> str:
    """A Mosquitto acl_file for one job; anything not listed is denied (no `pattern` lines)."""
    out = [f"# EdgeFed job {job}: generated by `edgefed certs`; anything not listed is denied",
           "", f"user {server_username(job)}", *server_acl(job)]
    for d in devices:
        out += ["", f"user {device_username(job, d)}", *device_acl(job, d)]
    for w in workers:
        out += ["", f"user {device_username(job, w)}", *worker_acl(job, w)]
    return "\n".join(out) + "\n"


def emqx_acl_text(job: str, devices: Iterable[str], workers: Iterable[str] = ()) -> str:
    """The same rules for an EMQX 5 cluster's file authorizer (etc/acl.conf, Erlang terms):
    publish = Mosquitto's write, subscribe = read; `{deny, all}.` closes the list."""
    def q(topics: Iterable[str]) -> str:
        return "[" + ", ".join(f'"{x}"' for x in topics) + "]"
    t = Topics(job)
    out = [f"%% EdgeFed job {job}: generated by `edgefed certs`; anything not listed is denied",
           f'{{allow, {{username, "{server_username(job)}"}}, all, {q([t.everything()])}}}.']
    for d in devices:
        u = device_username(job, d)
        out.append(f'{{allow, {{username, "{u}"}}, publish, '
                   f'{q([t.update(d), t.status(d), t.sync_request(d), t.secagg(d)])}}}.')
        out.append(f'{{allow, {{username, "{u}"}}, subscribe, '
                   f'{q([t.plan(), t.state(), t.ack(d), t.sync_reply(d), t.secagg_to(d), t.secagg_all()])}}}.')
    for w in workers:
        u = device_username(job, w)
        write, read = worker_topics(job, w)
        out.append(f'{{allow, {{username, "{u}"}}, publish, {q(write)}}}.')
        out.append(f'{{allow, {{username, "{u}"}}, subscribe, {q(read)}}}.')
    out.append("{deny, all}.")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------ mosquitto.conf

def mosquitto_conf(*, port: int, ca: PathLike, certfile: PathLike, keyfile: PathLike,
                   password_file: PathLike, acl_file: PathLike, bind: Optional[str] = None,
                   require_certificate: bool = True, persistence_dir: Optional[PathLike] = None,
                   log_file: Optional[PathLike] = None, run_as: Optional[str] = None) -> str:
    """A Mosquitto 2 config with one TLS listener, no anonymous access, passwords and the ACL.

    use_username_as_clientid: the broker replaces every client id by the user name, so a
    session (and its queued messages) belongs to whoever holds that user's password, and a
    stable id needs no guarding; see docs/security.md.
    """
    a = lambda p: str(Path(p).resolve())  # noqa: E731 - mosquitto resolves relative paths from its cwd
    lines = [
        "# generated by `edgefed certs`: TLS, passwords and per-device ACL (docs/security.md)",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {a(password_file)}",
        f"acl_file {a(acl_file)}",
        "",
        f"listener {port}" + (f" {bind}" if bind else ""),
        f"cafile {a(ca)}",
        f"certfile {a(certfile)}",
        f"keyfile {a(keyfile)}",
        f"require_certificate {'true' if require_certificate else 'false'}",
        "use_username_as_clientid true",
        "",
        "set_tcp_nodelay true",  # else Nagle delays small acks: ~60x slower QoS 1
        "max_queued_messages 100000",
        "max_inflight_messages 1000",
    ]
    if persistence_dir is not None:
        lines += ["persistence true", f"persistence_location {a(persistence_dir)}/", "autosave_interval 60"]
    if log_file is not None:
        lines += [f"log_dest file {a(log_file)}", "log_type error", "log_type warning",
                  "log_type notice", "log_type information"]
    # as root, mosquitto 2 switches to user 'mosquitto', who cannot read our 0600 keys
    lines.append(f"user {run_as or getpass.getuser()}")
    return "\n".join(lines) + "\n"


def read_passwords(cred_dir: PathLike) -> Dict[str, str]:
    """name -> password of the credentials/<name>.password files already written."""
    out = {}
    d = Path(cred_dir)
    if d.is_dir():
        for f in sorted(d.glob("*.password")):
            out[f.stem] = f.read_text(encoding="utf-8").strip()
    return out


# ------------------------------------------------------------------ enforcement (embedded broker)
# The embedded amqtt broker (edgefed/transport/broker.py) enforces the same files Mosquitto
# reads: it parses the password file and the ACL file `edgefed certs` wrote (acl_text() above,
# from device_acl()/server_acl()), so both brokers apply one set of rules.

ACL_ACCESS = ("read", "write", "readwrite")


def read_password_file(path: PathLike) -> Dict[str, str]:
    """user -> hash of a Mosquitto password file (blank lines and # comments skipped)."""
    out: Dict[str, str] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep:
            raise ValueError(f"{path}: line without 'user:hash'")
        out[user] = hashed
    return out


def verify_password(users: Mapping[str, str], username: Optional[str], password: Optional[str]) -> bool:
    """True if `username` is in `users` (read_password_file) and `password` matches its hash."""
    if not username or password is None or username not in users:
        return False
    if isinstance(password, bytes):
        password = password.decode("utf-8", "replace")
    return check_mosquitto_hash(password, users[username])


def parse_acl(text: str) -> Dict[str, List[Tuple[str, str]]]:
    """user -> [(access, topic pattern)] of a Mosquitto acl_file as acl_text() writes it.

    `topic` lines before any `user` line apply to anonymous clients in Mosquitto; anonymous
    clients are refused here, so they are ignored. Other directives (`pattern`, ...) are not
    generated by `edgefed certs` and are refused rather than half-understood.
    """
    rules: Dict[str, List[Tuple[str, str]]] = {}
    user: Optional[str] = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        rest = rest.strip()
        if word == "user" and rest:
            user = rest
            rules.setdefault(user, [])
        elif word == "topic" and rest:
            access, _, topic = rest.partition(" ")
            topic = topic.strip()
            if access not in ACL_ACCESS or not topic:  # `topic T` alone means readwrite
                access, topic = "readwrite", rest
            if user is not None:
                rules[user].append((access, topic))
        else:
            raise ValueError(f"ACL line {n}: {line!r} is not understood by the embedded broker "
                             f"(only `user NAME` and `topic [read|write|readwrite] TOPIC`)")
    return rules


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT matching of a concrete `topic` against a filter/ACL `pattern` (+ and #)."""
    if topic.startswith("$") and pattern[:1] in ("+", "#"):
        return False  # [MQTT-4.7.2-1]
    p, t = pattern.split("/"), topic.split("/")
    for i, level in enumerate(p):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(p) == len(t)


def filter_within(pattern: str, sub: str) -> bool:
    """True if every topic that subscription filter `sub` matches also matches ACL `pattern`."""
    p, s = pattern.split("/"), sub.split("/")
    for i, level in enumerate(p):
        if level == "#":
            return True
        if i >= len(s):
            return False
        if level == "+":
            if s[i] == "#":
                return False
        elif s[i] != level:  # a literal ACL level covers only that literal
            return False
    return len(p) == len(s)


def acl_allows(rules: Mapping[str, List[Tuple[str, str]]], user: Optional[str], topic: str,
               access: str) -> bool:
    """May `user` `access` ('read', 'write' or 'subscribe') `topic` under `rules` (parse_acl)?

    'subscribe' takes a filter and needs it to lie within one readable pattern (Mosquitto 2's
    check); 'read' is checked again on every delivered message. Anything not listed is denied.
    """
    if not user or user not in rules:
        return False
    for acc, pattern in rules[user]:
        if access == "subscribe":
            if acc in ("read", "readwrite") and filter_within(pattern, topic):
                return True
        elif access in acc and topic_matches(pattern, topic):
            return True
    return False
