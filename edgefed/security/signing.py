"""Ed25519 message signing: authentication end to end, independent of the broker.

Keys (written by `edgefed certs`, see generate()):

    DIR/signing/server.key      the job key (private, 0600): the server signs plans, job states,
                                acks and sync replies with it
    DIR/signing/server.pub      its public key: give it to every device (--server-key)
    DIR/signing/<device>.key    one private key per device (0600): the device signs its updates,
                                statuses and sync requests (--signing-key)
    DIR/signing/devices.json    the job's registry of device public keys (the server's --signing-dir)
    DIR/signing/<worker>.key    one private key per aggregation worker (`edgefed certs --workers`):
                                it signs its reports (partial sums) to the coordinator
    DIR/signing/workers.json    the registry of worker public keys (the coordinator reads it)

The wire format is protocol.py's signature trailer (flag SIGNED): the signature covers the whole
encoded message (job, type, round, device, msg_id...), so a captured message cannot be re-dated or
re-addressed without breaking it. This module only adds keys and the accept/refuse rules:

* the server accepts a device message only if it is signed with the registered key of the device
  it names (key id == device id);
* a device accepts a server message only if it is signed with the job key (key id "server");
* the coordinator accepts a worker's report or status only if signed with that worker's
  registered key (workers.json); a worker verifies device updates like the server
  (devices.json) and the plan and its control messages like a device (server.pub).

Without keys both sides run in development mode (unsigned) and log warn_unsigned() once.
Needs the `cryptography` package (imported only when signing is used). No torch.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import threading
from pathlib import Path
from typing import Dict, Iterable, Optional, Union

from .. import protocol as P

__all__ = ["SERVER_KEY_ID", "Signer", "ServerVerifier", "DeviceVerifier", "ServerSigning",
           "DeviceSigning", "generate", "load_registry", "load_public_key", "warn_unsigned",
           "UNSIGNED_WARNING", "WorkerVerifier", "WorkerSigning", "load_workers"]

SERVER_KEY_ID = "server"
REGISTRY_FORMAT = "edgefed-signing-registry-v1"
UNSIGNED_WARNING = ("unsigned messages: anyone on the broker can speak for any device or the server; "
                    "use `edgefed certs`")
DEVICE_MESSAGES = (P.Update, P.Status, P.SyncRequest)
SERVER_MESSAGES = (P.RoundPlan, P.Ack, P.SyncReply, P.JobState, P.WorkerControl)
WORKER_MESSAGES = (P.WorkerReport, P.Status)

PathLike = Union[str, os.PathLike]
_warned: set = set()
_warn_lock = threading.Lock()


def warn_unsigned(logger: logging.Logger, who: str = "") -> None:
    """Log the development-mode WARNING, once per process and side."""
    with _warn_lock:
        if who in _warned:
            return
        _warned.add(who)
    logger.warning("%s%s", f"{who}: " if who else "", UNSIGNED_WARNING)


def _ed():
    from cryptography.hazmat.primitives.asymmetric import ed25519
    return ed25519


def _ser():
    from cryptography.hazmat.primitives import serialization
    return serialization


# --------------------------------------------------------------------------- keys

class Signer:
    """Signs with one Ed25519 private key under a key id (a device id, or 'server')."""

    def __init__(self, key_id: str, private_key) -> None:
        self.key_id = P.check_id(key_id, "signing key id")
        self._key = private_key

    @classmethod
    def generate(cls, key_id: str) -> "Signer":
        return cls(key_id, _ed().Ed25519PrivateKey.generate())

    @classmethod
    def from_file(cls, path: PathLike, key_id: Optional[str] = None) -> "Signer":
        """Load a PEM (PKCS8) Ed25519 private key; key id defaults to the file's stem."""
        p = Path(path)
        try:
            key = _ser().load_pem_private_key(p.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"cannot load signing key {p}: {e}") from None
        if not isinstance(key, _ed().Ed25519PrivateKey):
            raise ValueError(f"{p} is not an Ed25519 private key (make one with `edgefed certs`)")
        return cls(key_id or p.stem, key)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(bytes(data))

    def public_key(self):
        return self._key.public_key()

    def public_raw(self) -> bytes:
        s = _ser()
        return self._key.public_key().public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)

    def private_pem(self) -> bytes:
        s = _ser()
        return self._key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())

    def public_pem(self) -> bytes:
        s = _ser()
        return self._key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(path: PathLike):
    """A PEM Ed25519 public key (server.pub)."""
    p = Path(path)
    try:
        key = _ser().load_pem_public_key(p.read_bytes())
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"cannot load public key {p}: {e}") from None
    if not isinstance(key, _ed().Ed25519PublicKey):
        raise ValueError(f"{p} is not an Ed25519 public key (server.pub from `edgefed certs`)")
    return key


def _public_from_raw(raw: bytes):
    return _ed().Ed25519PublicKey.from_public_bytes(raw)


def load_registry(path: PathLike, key: str = "devices") -> Dict[str, object]:
    """devices.json -> {device id: Ed25519PublicKey} (workers.json: key "workers")."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
        if doc.get("format") != REGISTRY_FORMAT:
            raise ValueError(f"format is {doc.get('format')!r}, expected {REGISTRY_FORMAT!r}")
        return {P.check_id(d, key[:-1]): _public_from_raw(base64.b64decode(k, validate=True))
                for d, k in doc[key].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"cannot load the device registry {p}: {e}") from None


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def load_workers(path: PathLike) -> Dict[str, object]:
    """workers.json -> {worker id: Ed25519PublicKey}; {} when the file does not exist."""
    return load_registry(path, "workers") if Path(path).exists() else {}


def generate(out: PathLike, devices: Iterable[str], workers: Iterable[str] = ()) -> Dict[str, Path]:
    """Write (or keep) DIR/signing/: server.key/.pub, <device>.key per device, devices.json, and
    <worker>.key per aggregation worker with workers.json.

    Existing keys are kept (re-running adds devices); the registries list exactly `devices` and
    `workers`."""
    root = Path(out) / "signing"
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    devices, workers = list(devices), list(workers)
    both = sorted(set(devices) & set(workers))
    if both or SERVER_KEY_ID in workers:
        raise ValueError(f"ids used for a device and a worker (or 'server'): {both or [SERVER_KEY_ID]}")
    paths: Dict[str, Path] = {}
    for key_id in [SERVER_KEY_ID, *devices, *workers]:
        if key_id != SERVER_KEY_ID:
            P.check_id(key_id, "device")
        kp = root / f"{key_id}.key"
        if kp.exists():
            signer = Signer.from_file(kp, key_id)
        else:
            signer = Signer.generate(key_id)
            _write_private(kp, signer.private_pem())
        paths[key_id] = kp
        if key_id == SERVER_KEY_ID:
            (root / "server.pub").write_bytes(signer.public_pem())
            paths["server.pub"] = root / "server.pub"
    reg = {d: base64.b64encode(Signer.from_file(paths[d], d).public_raw()).decode()
           for d in devices}
    (root / "devices.json").write_text(json.dumps({"format": REGISTRY_FORMAT, "devices": reg},
                                                  indent=1, sort_keys=True) + "\n")
    paths["devices.json"] = root / "devices.json"
    wp = root / "workers.json"
    if workers:
        wreg = {w: base64.b64encode(Signer.from_file(paths[w], w).public_raw()).decode() for w in workers}
        wp.write_text(json.dumps({"format": REGISTRY_FORMAT, "workers": wreg}, indent=1, sort_keys=True) + "\n")
        paths["workers.json"] = wp
    elif wp.exists():
        wp.unlink()
    return paths


# --------------------------------------------------------------------------- verification

def _check(pub, sig: "P.Signature", what: str) -> None:
    from cryptography.exceptions import InvalidSignature
    try:
        pub.verify(sig.signature, sig.signed)
    except InvalidSignature:
        raise P.SignatureError(f"{what}: bad signature (forged, altered or re-dated)") from None


class ServerVerifier:
    """protocol.decode(verifier=...) on the server: device messages signed by that device's
    registered key. Raises protocol.SignatureError."""

    def __init__(self, devices: Dict[str, object]):
        self.devices = dict(devices)

    def __call__(self, msg: "P.Message", sig: Optional["P.Signature"]) -> None:
        name = type(msg).__name__
        if not isinstance(msg, DEVICE_MESSAGES):
            raise P.SignatureError(f"{name} is not a device message")
        device = msg.device  # type: ignore[attr-defined]
        _check_registered(self.devices.get(device), sig, name, "device", device, "devices.json")


class DeviceVerifier:
    """protocol.decode(verifier=...) on a device: server messages signed with the job key."""

    def __init__(self, server_key):
        self.server_key = server_key

    def __call__(self, msg: "P.Message", sig: Optional["P.Signature"]) -> None:
        name = type(msg).__name__
        if not isinstance(msg, SERVER_MESSAGES):
            raise P.SignatureError(f"{name} is not a server message")
        if sig is None:
            raise P.SignatureError(f"unsigned {name}: the job's server signs everything it sends")
        if sig.key_id != SERVER_KEY_ID:
            raise P.SignatureError(f"{name} signed with key {sig.key_id!r}, not the job key")
        _check(self.server_key, sig, name)


class WorkerVerifier:
    """protocol.decode(verifier=...) on the coordinator for aggregation workers' reports and
    statuses: signed with the registered key of the worker they name (workers.json)."""

    def __init__(self, workers: Dict[str, object]):
        self.workers = dict(workers)

    def __call__(self, msg: "P.Message", sig: Optional["P.Signature"]) -> None:
        name = type(msg).__name__
        if not isinstance(msg, WORKER_MESSAGES):
            raise P.SignatureError(f"{name} is not a worker message")
        worker = getattr(msg, "worker", None) or getattr(msg, "device", "")
        _check_registered(self.workers.get(worker), sig, name, "worker", worker,
                          "workers.json; `edgefed certs --workers ...`")


def _check_registered(pub, sig, name: str, kind: str, who: str, registry: str) -> None:
    """A message claiming to come from a registered device or worker: known, signed, with its
    own key, and the signature holds."""
    if pub is None:
        raise P.SignatureError(f"{name} from unknown {kind} {who!r}: not in the signing registry ({registry})")
    if sig is None:
        raise P.SignatureError(f"unsigned {name} claiming to be from {kind} {who!r}")
    if sig.key_id != who:
        raise P.SignatureError(f"{name} for {kind} {who!r} is signed with key {sig.key_id!r}")
    _check(pub, sig, f"{name} from {kind} {who!r}")


def _signing_dir(path: PathLike) -> Path:
    d = Path(path)
    if not (d / "server.pub").exists() and (d / "signing" / "server.pub").exists():
        d = d / "signing"
    return d


class ServerSigning:
    """The server's half: job key signer + device registry verifier (+ the workers' registry)."""

    def __init__(self, signer: Signer, devices: Dict[str, object], workers: Optional[Dict[str, object]] = None):
        self.signer = signer
        self.verifier = ServerVerifier(devices)
        self.worker_verifier = WorkerVerifier(workers or {})

    @classmethod
    def from_dir(cls, path: PathLike) -> "ServerSigning":
        """DIR = the signing/ folder written by `edgefed certs` (or its parent)."""
        d = _signing_dir(path)
        return cls(Signer.from_file(d / "server.key", SERVER_KEY_ID), load_registry(d / "devices.json"),
                   load_workers(d / "workers.json"))


class WorkerSigning:
    """An aggregation worker's keys: its signer (reports), the device registry (it verifies
    updates as the server does) and the job's public key (plans and control messages)."""

    def __init__(self, signer: Signer, devices: Dict[str, object], server_key):
        self.signer = signer
        self.verifier = ServerVerifier(devices)
        self.server_verifier = DeviceVerifier(server_key)

    @classmethod
    def from_dir(cls, path: PathLike, worker: str) -> "WorkerSigning":
        """DIR = the signing/ folder (or its parent) holding <worker>.key, devices.json, server.pub."""
        d = _signing_dir(path)
        return cls(Signer.from_file(d / f"{worker}.key", worker), load_registry(d / "devices.json"),
                   load_public_key(d / "server.pub"))


class DeviceSigning:
    """A device's half: its signer + the job's public key."""

    def __init__(self, signer: Signer, server_key):
        self.signer = signer
        self.verifier = DeviceVerifier(server_key)

    @classmethod
    def from_files(cls, key: PathLike, server_pub: PathLike, device: Optional[str] = None
                   ) -> "DeviceSigning":
        return cls(Signer.from_file(key, device), load_public_key(server_pub))
