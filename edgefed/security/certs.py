"""`edgefed certs`: a job's CA, broker certificate, client certificates, passwords, ACL, config.

    edgefed certs --out secrets/ --job demo --devices pi1,pi2 --server-host broker.lan

writes (keys and passwords 0600):

    DIR/ca.crt, ca.key                  the job's CA (EC P-256)
    DIR/broker.crt, broker.key          the broker's TLS certificate (SANs: --server-host)
    DIR/certs/<name>.crt, <name>.key    one client certificate per device and one for the server
    DIR/credentials/<name>.password     one random MQTT password each (<name>: server or device id)
    DIR/passwd, DIR/acl                 Mosquitto password file ($7$ PBKDF2-SHA512) and ACL
    DIR/mosquitto.conf                  TLS listener, allow_anonymous false, passwd, acl
    DIR/signing/server.key, server.pub  the job's Ed25519 message-signing key (server --signing-dir)
    DIR/signing/<device>.key            one Ed25519 signing key per device (device --signing-key)
    DIR/signing/devices.json            the registry of device public keys (security/signing.py)

Running it again on the same DIR keeps the CA, the existing client certificates and passwords
(devices already set up keep working) and rewrites the broker certificate, passwd, acl and
mosquitto.conf for exactly the devices given: a device left out loses broker access.
EC P-256 rather than Ed25519: every OpenSSL that Mosquitto and Python link accepts it for TLS.
"""
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import shlex
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from . import broker_auth as BA

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
CA_DAYS = 3650


def _x509():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as e:  # pragma: no cover - cryptography is a host-side dependency
        raise SystemExit(f"edgefed certs needs the 'cryptography' package (pip install cryptography): {e}")
    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def _write_key(path: Path, key) -> None:
    _, _, serialization, _, _, _ = _x509()
    BA.write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()).decode())


def _write_cert(path: Path, cert) -> None:
    _, _, serialization, _, _, _ = _x509()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _load(cert_path: Path, key_path: Path):
    x509, _, serialization, _, _, _ = _x509()
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    return cert, key


def _san(host: str):
    x509 = _x509()[0]
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _issue(subject_cn: str, issuer_cert, issuer_key, *, days: int, ca: bool = False,
           server_hosts: Sequence[str] = (), client: bool = False, job: str = ""):
    x509, hashes, _, ec, EKU, NameOID = _x509()
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"EdgeFed job {job}"),
                      x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    issuer_name = name if issuer_cert is None else issuer_cert.subject
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False,
                                          encipher_only=False, decipher_only=False), critical=True)
    else:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_agreement=True, key_cert_sign=False,
                                          crl_sign=False, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, encipher_only=False,
                                          decipher_only=False), critical=True)
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                            critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage([EKU.CLIENT_AUTH] if client else [EKU.SERVER_AUTH]),
                            critical=False)
    if server_hosts:
        b = b.add_extension(x509.SubjectAlternativeName([_san(h) for h in server_hosts]), critical=False)
    cert = b.sign(key if issuer_key is None else issuer_key, hashes.SHA256())
    return cert, key


def generate(out: str, job: str, devices: Sequence[str], *, server_hosts: Sequence[str] = DEFAULT_HOSTS,
             port: int = 8883, days: int = 825, require_certificate: bool = True,
             bind: Optional[str] = None, workers: Sequence[str] = ()) -> Dict[str, object]:
    """Write everything for `job` under `out`; returns the paths and user names (no passwords).
    `workers`: aggregation workers (docs/server.md "Scale-out"), each an identity of its own."""
    BA.check_id(job, "job")
    devices = list(dict.fromkeys(devices))
    workers = list(dict.fromkeys(workers))
    if not devices:
        raise ValueError("give at least one device id (--devices dev1,dev2)")
    both = sorted(set(devices) & set(workers))
    if both:
        raise ValueError(f"ids used both for a device and a worker: {', '.join(both)}")
    users = {BA.SERVER_NAME: BA.server_username(job)}
    users.update({d: BA.device_username(job, d) for d in devices})  # checks ids, refuses 'server'
    users.update({w: BA.device_username(job, w) for w in workers})
    hosts = list(dict.fromkeys(server_hosts)) or list(DEFAULT_HOSTS)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    ca_crt, ca_key = root / "ca.crt", root / "ca.key"
    if ca_crt.exists() and ca_key.exists():
        ca_cert, ca_priv = _load(ca_crt, ca_key)
    else:
        ca_cert, ca_priv = _issue(f"EdgeFed CA {job}", None, None, days=CA_DAYS, ca=True, job=job)
        _write_key(ca_key, ca_priv)
        _write_cert(ca_crt, ca_cert)
    broker_cert, broker_key = _issue(hosts[0], ca_cert, ca_priv, days=days, server_hosts=hosts, job=job)
    _write_key(root / "broker.key", broker_key)
    _write_cert(root / "broker.crt", broker_cert)
    certs: Dict[str, Tuple[Path, Path]] = {}
    for name, user in users.items():
        crt, key = root / "certs" / f"{name}.crt", root / "certs" / f"{name}.key"
        if not (crt.exists() and key.exists()):
            c, k = _issue(user, ca_cert, ca_priv, days=days, client=True, job=job)
            _write_key(key, k)
            _write_cert(crt, c)
        certs[name] = (crt, key)
    cred_dir = root / "credentials"
    known = BA.read_passwords(cred_dir)
    passwords: Dict[str, str] = {}
    for name in users:
        passwords[name] = known.get(name) or BA.new_password()
        BA.write_private(cred_dir / f"{name}.password", passwords[name] + "\n")
    BA.write_private(root / "passwd", BA.password_file_text({users[n]: passwords[n] for n in users}))
    (root / "acl").write_text(BA.acl_text(job, devices, workers))
    (root / "emqx-acl.conf").write_text(BA.emqx_acl_text(job, devices, workers))  # docs/brokers.md
    (root / "data").mkdir(exist_ok=True)
    conf = root / "mosquitto.conf"
    conf.write_text(BA.mosquitto_conf(port=port, bind=bind, ca=ca_crt, certfile=root / "broker.crt",
                                      keyfile=root / "broker.key", password_file=root / "passwd",
                                      acl_file=root / "acl", require_certificate=require_certificate,
                                      persistence_dir=root / "data"))
    from .signing import generate as generate_signing
    signing = generate_signing(root, devices, workers)
    return {"dir": root, "signing": signing, "ca": ca_crt, "broker_cert": root / "broker.crt", "broker_key": root / "broker.key",
            "certs": certs, "users": users, "workers": workers, "credentials": {n: cred_dir / f"{n}.password" for n in users},
            "passwd": root / "passwd", "acl": root / "acl", "conf": conf, "hosts": hosts, "port": port}


def broker_url(info: Dict[str, object], name: str, host: Optional[str] = None) -> str:
    """The mqtts:// URL for identity `name` (server or a device id), credentials by file reference."""
    from urllib.parse import quote
    users, certs = info["users"], info["certs"]
    crt, key = certs[name]  # type: ignore[index]
    h = host or info["hosts"][0]  # type: ignore[index]
    user = quote(users[name], safe="")  # type: ignore[index]
    q = (f"ca={Path(info['ca']).resolve()}&cert={crt.resolve()}&key={key.resolve()}"  # type: ignore[arg-type]
         f"&password_file={Path(info['credentials'][name]).resolve()}")  # type: ignore[index]
    return f"mqtts://{user}@{h}:{info['port']}?{q}"


def add_certs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="directory for the CA, certificates, passwords and "
                   "Mosquitto files (created 0700; keep it private)")
    p.add_argument("--job", required=True, help="job id (the ACL covers edgefed/v1/<job>/...)")
    p.add_argument("--devices", required=True, help="comma-separated device ids, e.g. pi1,pi2")
    p.add_argument("--workers", default="", help="comma-separated aggregation worker ids (docs/server.md "
                   "'Scale-out'), e.g. agg1,agg2: each gets credentials, a signing key and ACL lines")
    p.add_argument("--server-host", action="append", default=None, metavar="HOST",
                   help="host name or IP devices use to reach the broker (repeatable; goes into the "
                        "broker certificate; default: localhost and 127.0.0.1)")
    p.add_argument("--port", type=int, default=8883, help="TLS listener port in mosquitto.conf")
    p.add_argument("--bind", default=None, help="address the listener binds to (default: all)")
    p.add_argument("--days", type=int, default=825, help="validity of broker and client certificates")
    p.add_argument("--no-require-certificate", dest="require_certificate", action="store_false",
                   help="let clients connect with a password but without a client certificate")


def run_certs(args: argparse.Namespace) -> int:
    import sys
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    try:
        info = generate(args.out, args.job, devices, server_hosts=args.server_host or DEFAULT_HOSTS,
                        port=args.port, days=args.days, require_certificate=args.require_certificate,
                        bind=args.bind, workers=[w.strip() for w in args.workers.split(",") if w.strip()])
    except (ValueError, OSError) as e:
        print(f"edgefed certs: {e}", file=sys.stderr)
        return 2
    root: Path = info["dir"]  # type: ignore[assignment]
    users: Dict[str, str] = info["users"]  # type: ignore[assignment]
    print(f"wrote {root}/ for job {args.job!r}:")
    print("  ca.crt (give to every device and the server), ca.key (keep offline)")
    print(f"  broker.crt, broker.key (SANs: {', '.join(info['hosts'])})")  # type: ignore[arg-type]
    for name, user in users.items():
        print(f"  certs/{name}.crt, certs/{name}.key, credentials/{name}.password  (MQTT user {user})")
    print(f"  passwd, acl, mosquitto.conf (TLS on port {info['port']}, allow_anonymous false)")
    print("  signing/server.key (job key: server only), signing/server.pub (give to every device), "
          "signing/<id>.key (one per device), signing/devices.json (device public keys, server)")
    print("\nbroker:")
    print(f"  mosquitto -c {shlex.quote(str(Path(info['conf']).resolve()))}")  # type: ignore[arg-type]
    print("\naggregation server:")
    print(f"  edgefed server --job {args.job} --broker {shlex.quote(broker_url(info, BA.SERVER_NAME))} "
          f"--signing-dir {shlex.quote(str((root / 'signing').resolve()))} ...")
    for w in info["workers"]:  # type: ignore[union-attr]
        print(f"\naggregation worker {w} (docs/server.md 'Scale-out'):")
        print(f"  edgefed worker --job {args.job} --worker-id {w} --broker {shlex.quote(broker_url(info, w))} "
              f"--signing-dir {shlex.quote(str((root / 'signing').resolve()))}")
    print("\ndevices (copy ca.crt, certs/<id>.crt, certs/<id>.key, credentials/<id>.password to each; "
          "adjust the paths):")
    for d in devices:
        print(f"  edgefed device --job {args.job} --device-id {d} --broker {shlex.quote(broker_url(info, d))} "
              f"--signing-key signing/{d}.key --server-key signing/server.pub ...")
    print("\nor with the environment instead of the URL: EDGEFED_MQTT_USERNAME, EDGEFED_MQTT_PASSWORD_FILE, "
          "EDGEFED_MQTT_CA, EDGEFED_MQTT_CERT, EDGEFED_MQTT_KEY (docs/security.md)")
    return 0
