"""Broker identity and transport security against a real Mosquitto: `edgefed certs` files (CA,
certificates, $7$ password file, ACL), MQTT credentials and TLS in MqttTransport, clear refusals,
no passwords in logs. Loopback only."""
import logging
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from edgefed import protocol as P
from edgefed.security import broker_auth as BA
from edgefed.security.certs import generate
from edgefed.transport import BrokerUnreachable, TransportError, start_broker
from edgefed.transport import mqtt as M
from edgefed.transport.broker import find_mosquitto
from helpers import Inbox, broker_auth_files, broker_identity, mqtt_clients, wait_for

HAVE_MOSQUITTO = find_mosquitto() is not None
needs_mosquitto = [pytest.mark.mosquitto, pytest.mark.skipif(
    not HAVE_MOSQUITTO, reason="mosquitto binary not found (apt-get install mosquitto); CI installs it")]
FAST = dict(reconnect_min_delay=0.1, reconnect_max_delay=1.0, publish_timeout=10.0)
JOB, OTHER = "jobA", "jobB"
ENV_VARS = (M.ENV_USERNAME, M.ENV_PASSWORD, M.ENV_PASSWORD_FILE, M.ENV_CA, M.ENV_CERT, M.ENV_KEY)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for v in ENV_VARS:
        monkeypatch.delenv(v, raising=False)


@pytest.fixture(scope="module")
def sec(tmp_path_factory):
    """`edgefed certs` output for JOB (d1, d2), plus a server user of OTHER in the same broker."""
    return broker_auth_files(tmp_path_factory.mktemp("certs"), JOB, OTHER)


@pytest.fixture(scope="module")
def broker(sec):
    if not HAVE_MOSQUITTO:
        pytest.skip("mosquitto binary not found")
    h = start_broker(prefer="mosquitto", auth=str(sec["dir"]))
    yield h
    h.stop()


@pytest.fixture
def clients():
    yield from mqtt_clients(FAST, timeout=1)


ident = broker_identity  # MqttTransport keyword arguments for identity `name`


def password(sec, name):
    return Path(sec["credentials"][name]).read_text().strip()


# ------------------------------------------------------------------ files (no broker)

def test_certs_files_modes_acl_and_conf(sec):
    root = Path(sec["dir"])
    for p in [root / "ca.key", root / "broker.key", root / "passwd",
              *[k for _, k in sec["certs"].values()], *sec["credentials"].values()]:
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
    from cryptography import x509
    broker_cert = x509.load_pem_x509_certificate((root / "broker.crt").read_bytes())
    san = broker_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    t = P.Topics(JOB)
    acl = (root / "acl").read_text()
    d1 = acl.split(f"user {BA.device_username(JOB, 'd1')}\n")[1].split("\n\n")[0].splitlines()
    assert set(d1) == {f"topic write {t.update('d1')}", f"topic write {t.status('d1')}",
                       f"topic write {t.sync_request('d1')}", f"topic read {t.plan()}",
                       f"topic read {t.state()}", f"topic read {t.ack('d1')}",
                       f"topic read {t.sync_reply('d1')}", f"topic write {t.secagg('d1')}",
                       f"topic read {t.secagg_all()}", f"topic read {t.secagg_to('d1')}"}
    assert f"user {BA.server_username(JOB)}\ntopic readwrite {t.everything()}" in acl
    conf = (root / "mosquitto.conf").read_text().splitlines()
    for line in ("allow_anonymous false", "require_certificate true", "use_username_as_clientid true",
                 f"password_file {root.resolve() / 'passwd'}", f"acl_file {root.resolve() / 'acl'}"):
        assert line in conf
    for name in ("server", "d1", "d2"):  # passwd holds a $7$ hash of each generated password
        user = sec["users"][name]
        line = next(x for x in (root / "passwd").read_text().splitlines() if x.startswith(user + ":"))
        assert line.split(":", 1)[1].startswith("$7$101$")
        assert BA.check_mosquitto_hash(password(sec, name), line.split(":", 1)[1])
        assert not BA.check_mosquitto_hash(password(sec, name) + "x", line.split(":", 1)[1])
    with pytest.raises(ValueError, match="reserved"):
        BA.device_username(JOB, "server")


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd not installed")
def test_hash_matches_mosquitto_passwd(tmp_path):
    f = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(f), "alice", "s3cret pass"], check=True,
                   capture_output=True)
    theirs = f.read_text().strip().split(":", 1)[1]
    assert theirs.startswith("$7$") and BA.check_mosquitto_hash("s3cret pass", theirs)
    # same salt and iterations -> the same string as mosquitto_passwd
    import base64
    _, _, it, salt, _ = theirs.split("$")
    assert BA.mosquitto_hash("s3cret pass", salt=base64.b64decode(salt), iterations=int(it)) == theirs


def test_rerun_keeps_ca_and_passwords_and_drops_removed_devices(tmp_path, capsys):
    from edgefed.cli import main
    out = tmp_path / "s"
    assert main(["certs", "--out", str(out), "--job", "j", "--devices", "a,b",
                 "--server-host", "broker.lan", "--server-host", "10.0.0.5"]) == 0
    printed = capsys.readouterr().out
    assert f"mosquitto -c {out.resolve() / 'mosquitto.conf'}" in printed
    assert "edgefed server --job j --broker 'mqtts://server%40j@broker.lan:8883?" in printed
    assert "edgefed device --job j --device-id a --broker 'mqtts://a%40j@broker.lan:8883?" in printed
    pw_a = (out / "credentials" / "a.password").read_text()
    assert pw_a.strip() not in printed  # passwords are referenced by file, never printed
    ca = (out / "ca.crt").read_bytes()
    assert main(["certs", "--out", str(out), "--job", "j", "--devices", "a,c"]) == 0
    assert (out / "ca.crt").read_bytes() == ca
    assert (out / "credentials" / "a.password").read_text() == pw_a
    users = [line.split(":")[0] for line in (out / "passwd").read_text().splitlines()]
    assert users == ["server@j", "a@j", "c@j"]  # b no longer has broker access
    assert "user b@j" not in (out / "acl").read_text()


def test_credential_precedence_and_redaction(tmp_path):
    env = {M.ENV_USERNAME: "envuser", M.ENV_PASSWORD: "envpw", M.ENV_CA: "/env/ca.crt"}
    c = M.resolve_credentials("mqtt://host:1883", env=env)
    assert (c.username, c.password, c.ca) == ("envuser", "envpw", None)  # TLS env ignored for mqtt://
    c = M.resolve_credentials("mqtts://u%40j:p%3Aw%2F@host?ca=/url/ca.crt", env=env)
    assert (c.username, c.password, c.ca) == ("u@j", "p:w/", "/url/ca.crt")
    c = M.resolve_credentials("mqtts://u:p@host?ca=/url/ca.crt", username="kw", password_file="/kw/pw",
                              ca="/kw/ca.crt", env=env)
    assert (c.username, c.password, c.password_file, c.ca) == ("kw", None, "/kw/pw", "/kw/ca.crt")
    pwf = tmp_path / "pw"
    pwf.write_text("from-file\n")
    c = M.resolve_credentials("mqtt://host", env={M.ENV_USERNAME: "x", M.ENV_PASSWORD_FILE: str(pwf)})
    assert c.read_password() == "from-file" and "from-file" not in repr(c)
    assert "envpw" not in repr(M.resolve_credentials("mqtt://h", env=env))
    with pytest.raises(ValueError, match="mqtts"):
        M.resolve_credentials("mqtt://host?ca=/x")
    with pytest.raises(ValueError, match="no user name"):
        M.resolve_credentials("mqtt://:pw@host", env={})
    assert M.redact_url("mqtts://u%40j:s3cret@h:8883?ca=/c") == "mqtts://u%40j:***@h:8883?ca=/c"
    assert M.redact_url("mqtt://h:1883") == "mqtt://h:1883"
    t = M.MqttTransport("mqtt://user:hunter2@127.0.0.1:1")
    assert "hunter2" not in t.url and t.credentials.password == "hunter2"


# ------------------------------------------------------------------ against Mosquitto

def mosq(fn):
    for mark in needs_mosquitto:
        fn = mark(fn)
    return fn


@mosq
def test_server_and_device_exchange_with_credentials_and_certs(broker, sec, clients):
    t = P.Topics(JOB)
    srv = clients(broker.url, f"edgefed-server-{JOB}", **ident(sec, "server"))
    srv.connect()
    assert srv.protocol_version == "5"
    updates = Inbox()
    srv.subscribe(t.all_updates(), updates)
    srv.subscribe(t.all_statuses(), updates)
    dev = clients(broker.url, f"edgefed-{JOB}-d1", **ident(sec, "d1"))
    dev.set_will(t.status("d1"), b"offline")
    dev.connect()
    plans = Inbox()
    dev.subscribe(t.plan(), plans)
    dev.subscribe(t.ack("d1"), plans)
    srv.publish(t.plan(), b"plan-1", retain=True)
    srv.publish(t.ack("d1"), b"ack-1")
    dev.publish(t.update("d1"), b"update-1")
    dev.publish(t.status("d1"), b"online", retain=True)
    assert wait_for(lambda: {t.update("d1"), t.status("d1")} <= set(updates.topics()))
    assert wait_for(lambda: {t.plan(), t.ack("d1")} <= set(plans.topics()))


@mosq
def test_anonymous_client_is_refused_with_clear_error(broker, sec):
    crt, key = sec["certs"]["d1"]
    t = M.MqttTransport(broker.url, ca=str(sec["ca"]), cert=str(crt), key=str(key), **FAST)
    with pytest.raises(M.BrokerRefused) as ei:
        t.connect(timeout=5)
    assert ei.value.reason_code == 135
    assert "anonymous" in str(ei.value) and M.ENV_USERNAME in str(ei.value)
    assert isinstance(ei.value, BrokerUnreachable)  # what `edgefed device` already catches


@mosq
def test_wrong_password_raises_clear_error_without_retrying(broker, sec, caplog):
    crt, key = sec["certs"]["d1"]
    t = M.MqttTransport(broker.url, username=sec["users"]["d1"], password="wrong-password-xyz",
                        ca=str(sec["ca"]), cert=str(crt), key=str(key), **FAST)
    start = time.monotonic()
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(M.BrokerRefused) as ei:
            t.connect(timeout=10)
    assert time.monotonic() - start < 5  # refused at once, not retried until the timeout
    assert ei.value.reason_code in (134, 135)
    assert "d1@jobA" in str(ei.value) and "password" in str(ei.value)
    assert "wrong-password-xyz" not in str(ei.value) and "wrong-password-xyz" not in caplog.text


@mosq
def test_device_cannot_publish_as_another_device_or_into_another_job(broker, sec, clients):
    t, o = P.Topics(JOB), P.Topics(OTHER)
    srv = clients(broker.url, **ident(sec, "server"))
    srv.connect()
    seen = Inbox()
    srv.subscribe(t.everything(), seen)
    other = clients(broker.url, username=BA.server_username(OTHER), password=sec["other_password"],
                    ca=str(sec["ca"]), cert=str(sec["certs"]["server"][0]), key=str(sec["certs"]["server"][1]))
    other.connect()
    other_seen = Inbox()
    other.subscribe(o.everything(), other_seen)
    dev = clients(broker.url, **ident(sec, "d1"))
    dev.connect()
    for topic in (t.update("d2"), t.status("d2"), t.plan(), o.update("d1")):
        try:  # MQTT 5 Mosquitto answers PUBACK "not authorized"; either way nothing is delivered
            dev.publish(topic, b"forged")
        except TransportError as e:
            assert "Not authorized" in str(e)
    dev.publish(t.update("d1"), b"own")  # control: its own topic goes through, and after the others
    assert wait_for(lambda: t.update("d1") in seen.topics())
    time.sleep(0.3)
    assert [x for x in seen.items if x[1] == b"forged"] == []  # (retained plan/status of other tests aside)
    assert other_seen.items == []


@mosq
def test_device_cannot_read_another_job_or_another_device(broker, sec, clients):
    t, o = P.Topics(JOB), P.Topics(OTHER)
    dev = clients(broker.url, **ident(sec, "d1"))
    dev.connect()
    got = Inbox()
    for flt in (o.plan(), o.everything(), t.update("d2"), t.ack("d2"), t.all_updates(), "#"):
        try:  # Mosquitto may grant the SUBACK and then filter every delivery by the ACL
            dev.subscribe(flt, got)
        except TransportError:
            pass
    dev.subscribe(t.plan(), got)
    other = clients(broker.url, username=BA.server_username(OTHER), password=sec["other_password"],
                    ca=str(sec["ca"]), cert=str(sec["certs"]["server"][0]), key=str(sec["certs"]["server"][1]))
    other.connect()
    other.publish(o.plan(), b"other-job-plan")
    d2 = clients(broker.url, **ident(sec, "d2"))
    d2.connect()
    d2.publish(t.update("d2"), b"d2-update")
    srv = clients(broker.url, **ident(sec, "server"))
    srv.connect()
    srv.publish(t.ack("d2"), b"ack-for-d2")
    srv.publish(t.plan(), b"own-plan")  # control, sent last
    assert wait_for(lambda: t.plan() in got.topics())
    time.sleep(0.3)
    assert set(got.topics()) == {t.plan()}
    assert b"own-plan" in [p for _, p in got.items]


@mosq
def test_stable_session_is_bound_to_the_user_name(broker, sec, clients):
    """use_username_as_clientid: d2 using the server's (predictable) client id cannot take over its
    session, and the server's persistent session survives its own restart under a new id."""
    t = P.Topics(JOB)
    srv = clients(broker.url, f"edgefed-server-{JOB}", **ident(sec, "server"))
    srv.connect()
    seen = Inbox()
    srv.subscribe(t.all_updates(), seen)
    intruder = clients(broker.url, f"edgefed-server-{JOB}", **ident(sec, "d2"))
    intruder.connect()
    time.sleep(0.3)
    assert srv.connected and srv.reconnects == 0
    intruder.publish(t.update("d2"), b"x")
    assert wait_for(lambda: seen.topics() == [t.update("d2")])
    srv.close()  # the server goes away; its session (expiry 3600 s) keeps queueing
    intruder.publish(t.update("d2"), b"while-down")
    back = clients(broker.url, "another-id", **ident(sec, "server"))
    queued = Inbox()
    back.subscribe(t.all_updates(), queued)  # before connect(): registered, sent on connect
    back.connect()
    assert wait_for(lambda: (t.update("d2"), b"while-down") in queued.items)


@mosq
def test_client_without_the_ca_fails_tls_verification(broker, sec):
    kw = ident(sec, "d1")
    del kw["ca"]
    t = M.MqttTransport(broker.url, **kw, **FAST)
    start = time.monotonic()
    with pytest.raises(BrokerUnreachable, match="TLS handshake .* failed: the broker's certificate"):
        t.connect(timeout=10)
    assert time.monotonic() - start < 5


@mosq
def test_broker_certificate_must_name_the_host(tmp_path):
    """Hostname verification is on: a broker certificate issued for another name is refused."""
    info = generate(str(tmp_path / "s"), JOB, ["d1"], server_hosts=["broker.example"])
    h = start_broker(prefer="mosquitto", auth=str(info["dir"]))
    try:
        kw = ident(info, "d1")
        with pytest.raises(BrokerUnreachable, match="does not name '127.0.0.1'"):
            M.MqttTransport(h.url, **kw, **FAST).connect(timeout=5)
        t = M.MqttTransport(h.url, verify_hostname=False, **kw, **FAST)  # explicit opt-out works
        t.connect(timeout=5)
        t.close()
    finally:
        h.stop()


@mosq
def test_client_without_certificate_is_refused(broker, sec):
    kw = ident(sec, "d1")
    del kw["cert"], kw["key"]
    with pytest.raises(BrokerUnreachable, match="client certificate"):
        M.MqttTransport(broker.url, **kw, **FAST).connect(timeout=8)


@mosq
def test_credentials_from_url_and_env_with_mqtt_311(broker, sec, clients, monkeypatch, caplog):
    crt, key = sec["certs"]["d1"]
    pw = password(sec, "d1")
    url = (f"mqtts://{quote(sec['users']['d1'], safe='')}:{quote(pw, safe='')}@127.0.0.1:{broker.port}"
           f"?ca={sec['ca']}&cert={crt}&key={key}")
    with caplog.at_level(logging.DEBUG):
        a = clients(url, protocol="3.1.1")
        a.connect()
        a.publish(P.Topics(JOB).update("d1"), b"via-url")
        monkeypatch.setenv(M.ENV_USERNAME, sec["users"]["d2"])
        monkeypatch.setenv(M.ENV_PASSWORD_FILE, str(sec["credentials"]["d2"]))
        monkeypatch.setenv(M.ENV_CA, str(sec["ca"]))
        monkeypatch.setenv(M.ENV_CERT, str(sec["certs"]["d2"][0]))
        monkeypatch.setenv(M.ENV_KEY, str(sec["certs"]["d2"][1]))
        b = clients(broker.url)
        b.connect()
        b.publish(P.Topics(JOB).update("d2"), b"via-env")
        bad = M.MqttTransport(url.replace(quote(pw, safe=""), "not-" + pw[:10]), **FAST)
        with pytest.raises(M.BrokerRefused) as ei:
            bad.connect(timeout=5)
    assert a.protocol_version == "3.1.1" and b.protocol_version == "5"
    assert pw not in caplog.text and pw not in a.url and "***" in a.url
    assert "not-" + pw[:10] not in caplog.text and "not-" + pw[:10] not in str(ei.value)
    assert password(sec, "d2") not in caplog.text
    assert f"{quote(sec['users']['d1'], safe='')}:***@" in caplog.text  # redacted, not dropped


@mosq
def test_refused_reconnect_is_fatal_not_retried_forever(sec, tmp_path, clients):
    d = tmp_path / "auth"
    shutil.copytree(sec["dir"], d)
    h = start_broker(prefer="mosquitto", auth=str(d))
    try:
        dev = clients(h.url, **ident(sec, "d1"))
        dev.connect()
        h.halt()
        lines = [x for x in (d / "passwd").read_text().splitlines() if not x.startswith("d1@")]
        (d / "passwd").write_text("\n".join(lines) + "\n")  # d1 revoked while the broker was down
        h.start()
        assert wait_for(lambda: dev._fatal is not None, timeout=10)
        with pytest.raises(M.BrokerRefused, match="not retrying"):
            dev.publish(P.Topics(JOB).update("d1"), b"x")
    finally:
        h.stop()


@mosq
def test_anonymous_broker_warns_loudly(caplog):
    with caplog.at_level(logging.WARNING, logger="edgefed.transport"):
        h = start_broker(prefer="mosquitto")
    try:
        assert f"anonymous broker: anyone who reaches {h.url} can join, read and poison jobs" in caplog.text
        assert "edgefed certs" in caplog.text
    finally:
        h.stop()


def test_embedded_dev_broker_warns_and_still_negotiates_311(caplog, clients):
    with caplog.at_level(logging.WARNING, logger="edgefed.transport"):
        h = start_broker(prefer="embedded")
    try:
        assert "anonymous broker" in caplog.text and "local development only" in caplog.text
        t = clients(h.url, f"edgefed-{JOB}-dev")
        t.connect(timeout=15)  # the credential-less probe still falls back to MQTT 3.1.1 on amqtt
        assert t.protocol_version == "3.1.1"
        with pytest.raises(ValueError, match="cannot enforce"):
            start_broker(prefer="embedded", auth="/nonexistent")
    finally:
        h.stop()
