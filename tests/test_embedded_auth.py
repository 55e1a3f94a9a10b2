"""The embedded amqtt broker with `auth=DIR` enforces what the generated Mosquitto setup does:
TLS with the `edgefed certs` files, passwords from DIR/passwd, no anonymous clients, DIR/acl on
publish, subscribe and delivery, and the client id bound to the user name. Loopback only."""
import logging
import time
from pathlib import Path

import pytest

from edgefed import protocol as P
from edgefed.security import broker_auth as BA
from edgefed.transport import BrokerUnreachable, TransportError, start_broker
from edgefed.transport import mqtt as M
from edgefed.transport.mqtt import BrokerRefused
from helpers import Inbox, broker_auth_files, broker_identity, mqtt_clients, wait_for

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
    h = start_broker(prefer="embedded", auth=str(sec["dir"]))
    yield h
    h.stop()


@pytest.fixture
def clients():
    yield from mqtt_clients(FAST, timeout=1)


ident = broker_identity  # MqttTransport keyword arguments for identity `name`


def other_server(sec):
    return dict(username=BA.server_username(OTHER), password=sec["other_password"], ca=str(sec["ca"]),
                cert=str(sec["certs"]["server"][0]), key=str(sec["certs"]["server"][1]))


# ------------------------------------------------------------------ rules (no broker)

def test_acl_rules_come_from_the_generated_acl_file():
    t = P.Topics(JOB)
    rules = BA.parse_acl(BA.acl_text(JOB, ["d1", "d2"]))
    d1, srv = BA.device_username(JOB, "d1"), BA.server_username(JOB)
    assert set(rules) == {srv, d1, BA.device_username(JOB, "d2")}
    assert {f"topic {a} {x}" for a, x in rules[d1]} == set(BA.device_acl(JOB, "d1"))
    ok = [(d1, t.update("d1"), "write"), (d1, t.plan(), "read"), (d1, t.plan(), "subscribe"),
          (d1, t.ack("d1"), "subscribe"), (srv, t.update("d2"), "write"),
          (srv, t.all_updates(), "subscribe"), (srv, t.everything(), "subscribe")]
    no = [(d1, t.update("d2"), "write"), (d1, t.plan(), "write"), (d1, t.update("d1"), "read"),
          (d1, t.ack("d2"), "read"), (d1, t.all_updates(), "subscribe"), (d1, "#", "subscribe"),
          (d1, t.everything(), "subscribe"), (srv, P.Topics(OTHER).plan(), "read"),
          (srv, "#", "subscribe"), ("nobody", t.plan(), "read"), (None, t.plan(), "read")]
    assert [x for x in ok if not BA.acl_allows(rules, *x)] == []
    assert [x for x in no if BA.acl_allows(rules, *x)] == []
    with pytest.raises(ValueError, match="not understood"):
        BA.parse_acl("pattern read x/%u\n")


def test_the_emqx_acl_grants_what_the_mosquitto_acl_grants():
    """edgefed certs writes both; an EMQX cluster gets the same per-device rules."""
    import re
    emqx = BA.emqx_acl_text(JOB, ["d1", "d2"])
    assert emqx.rstrip().endswith("{deny, all}.")
    got = set()
    for user, action, topics in re.findall(r'\{allow, \{username, "([^"]+)"\}, (\w+), \[([^\]]*)\]\}\.', emqx):
        for topic in re.findall(r'"([^"]+)"', topics):
            got.add((user, action, topic))
    want = set()
    to_emqx = {"write": "publish", "read": "subscribe", "readwrite": "all"}
    for user, rules in BA.parse_acl(BA.acl_text(JOB, ["d1", "d2"])).items():
        for access, topic in rules:
            want.add((user, to_emqx[access], topic))
    assert got == want and len(got) == 1 + 2 * 10


def test_verify_password_against_the_password_file(sec):
    users = BA.read_password_file(Path(sec["dir"]) / "passwd")
    pw = Path(sec["credentials"]["d1"]).read_text().strip()
    assert BA.verify_password(users, sec["users"]["d1"], pw)
    assert not BA.verify_password(users, sec["users"]["d1"], pw + "x")
    assert not BA.verify_password(users, sec["users"]["d2"], pw)
    assert not BA.verify_password(users, None, pw) and not BA.verify_password(users, "x@jobA", pw)


# ------------------------------------------------------------------ embedded broker

def test_embedded_auth_broker_is_tls_and_logs_no_anonymous_warning(sec, caplog):
    with caplog.at_level(logging.INFO, logger="edgefed.transport"):
        h = start_broker(prefer="embedded", auth=str(sec["dir"]))
    try:
        assert h.kind == "embedded" and h.url.startswith("mqtts://")
        assert "anonymous broker" not in caplog.text
    finally:
        h.stop()
    with pytest.raises(FileNotFoundError, match="lacks"):
        start_broker(prefer="embedded", auth=str(Path(sec["dir"]) / "nonexistent"))


def test_device_and_server_exchange_with_credentials(broker, sec, clients):
    t = P.Topics(JOB)
    srv = clients(broker.url, f"edgefed-server-{JOB}", **ident(sec, "server"))
    srv.connect(timeout=15)
    assert srv.protocol_version == "3.1.1"
    updates = Inbox()
    srv.subscribe(t.all_updates(), updates)
    srv.subscribe(t.all_statuses(), updates)
    dev = clients(broker.url, f"edgefed-{JOB}-d1", **ident(sec, "d1"))
    dev.set_will(t.status("d1"), b"offline")
    dev.connect(timeout=15)
    plans = Inbox()
    dev.subscribe(t.plan(), plans)
    dev.subscribe(t.ack("d1"), plans)
    srv.publish(t.plan(), b"plan-1", retain=True)
    srv.publish(t.ack("d1"), b"ack-1")
    dev.publish(t.update("d1"), b"update-1")
    dev.publish(t.status("d1"), b"online", retain=True)
    assert wait_for(lambda: {t.update("d1"), t.status("d1")} <= set(updates.topics()))
    assert wait_for(lambda: {t.plan(), t.ack("d1")} <= set(plans.topics()))


def test_anonymous_client_is_refused(broker, sec):
    crt, key = sec["certs"]["d1"]
    t = M.MqttTransport(broker.url, ca=str(sec["ca"]), cert=str(crt), key=str(key), **FAST)
    with pytest.raises(BrokerRefused) as ei:
        t.connect(timeout=10)
    assert ei.value.reason_code == 135  # 3.1.1 rc 5 "not authorized", as paho reports it
    assert "anonymous" in str(ei.value)
    assert isinstance(ei.value, BrokerUnreachable)


def test_wrong_password_and_unknown_user_are_refused(broker, sec, caplog):
    crt, key = sec["certs"]["d1"]
    for user in (sec["users"]["d1"], "d9@jobA"):
        t = M.MqttTransport(broker.url, username=user, password="wrong-password-xyz",
                            ca=str(sec["ca"]), cert=str(crt), key=str(key), **FAST)
        start = time.monotonic()
        with caplog.at_level(logging.DEBUG):
            with pytest.raises(BrokerRefused) as ei:
                t.connect(timeout=10)
        assert time.monotonic() - start < 8  # refused, not retried until the timeout
        assert ei.value.reason_code in (134, 135)
        assert user in str(ei.value) and "wrong-password-xyz" not in str(ei.value)
    assert "wrong-password-xyz" not in caplog.text
    assert "wrong-password-xyz" not in broker.log_tail(200)


def test_client_without_certificate_or_ca_is_refused(broker, sec):
    kw = ident(sec, "d1")
    del kw["cert"], kw["key"]
    with pytest.raises(BrokerUnreachable):
        M.MqttTransport(broker.url, **kw, **FAST).connect(timeout=8)
    kw = ident(sec, "d1")
    del kw["ca"]
    with pytest.raises(BrokerUnreachable, match="TLS handshake"):
        M.MqttTransport(broker.url, **kw, **FAST).connect(timeout=8)


def test_device_cannot_publish_as_another_device_or_into_another_job(broker, sec, clients):
    t, o = P.Topics(JOB), P.Topics(OTHER)
    srv = clients(broker.url, **ident(sec, "server"))
    srv.connect(timeout=15)
    seen = Inbox()
    srv.subscribe(t.everything(), seen)
    other = clients(broker.url, **other_server(sec))
    other.connect(timeout=15)
    other_seen = Inbox()
    other.subscribe(o.everything(), other_seen)
    dev = clients(broker.url, **ident(sec, "d1"))
    dev.connect(timeout=15)
    for topic in (t.update("d2"), t.status("d2"), t.plan(), t.ack("d1"), o.update("d1")):
        try:  # amqtt acknowledges and drops; either way nothing is delivered
            dev.publish(topic, b"forged")
        except TransportError:
            pass
    dev.publish(t.update("d1"), b"own")  # control: its own topic goes through, and after the others
    assert wait_for(lambda: t.update("d1") in seen.topics())
    time.sleep(0.3)
    assert [x for x in seen.items if x[1] == b"forged"] == []
    assert other_seen.items == []


def test_device_cannot_read_another_job_or_another_device(broker, sec, clients):
    t, o = P.Topics(JOB), P.Topics(OTHER)
    d2 = clients(broker.url, **ident(sec, "d2"))
    d2.connect(timeout=15)
    d2.publish(t.status("d2"), b"d2-retained-status", retain=True)  # must not leak on d1's connect
    srv0 = clients(broker.url, **ident(sec, "server"))
    srv0.connect(timeout=15)
    srv0.subscribe(t.all_statuses(), Inbox())  # amqtt replays retained topics of *any* filter
    dev = clients(broker.url, **ident(sec, "d1"))
    dev.connect(timeout=15)
    got = Inbox()
    for flt in (o.plan(), o.everything(), t.update("d2"), t.ack("d2"), t.all_updates(),
                t.all_statuses(), "#"):
        try:  # refused in the SUBACK; a granted one would still be filtered on delivery
            dev.subscribe(flt, got)
        except TransportError:
            pass
    dev.subscribe(t.plan(), got)
    other = clients(broker.url, **other_server(sec))
    other.connect(timeout=15)
    other.publish(o.plan(), b"other-job-plan")
    d2.publish(t.update("d2"), b"d2-update")
    d2.publish(t.status("d2"), b"d2-status")
    srv0.publish(t.ack("d2"), b"ack-for-d2")  # (one connection per user: the id is the user name)
    srv0.publish(t.plan(), b"own-plan")  # control, sent last
    assert wait_for(lambda: b"own-plan" in [p for _, p in got.items])
    time.sleep(0.3)
    assert set(got.topics()) == {t.plan()}, got.items


def test_client_id_is_bound_to_the_user_name(broker, sec, clients):
    """d2 using the server's client id neither takes over the server's connection nor its session;
    the server's persistent session is found again under another client id."""
    t = P.Topics(JOB)
    sid = f"edgefed-server-{JOB}-bound"
    srv = clients(broker.url, sid, **ident(sec, "server"))
    srv.connect(timeout=15)
    seen = Inbox()
    srv.subscribe(t.all_updates(), seen)
    intruder = clients(broker.url, sid, **ident(sec, "d2"))
    intruder.connect(timeout=15)
    time.sleep(0.5)
    assert srv.connected and srv.reconnects == 0
    intruder.publish(t.update("d2"), b"x")
    assert wait_for(lambda: (t.update("d2"), b"x") in seen.items)
    srv.close()  # the server goes away; its clean_session=False session keeps queueing
    time.sleep(0.3)
    intruder.publish(t.update("d2"), b"while-down")
    back = clients(broker.url, "another-id", **ident(sec, "server"))
    queued = Inbox()
    back.subscribe(t.all_updates(), queued)
    back.connect(timeout=15)
    assert wait_for(lambda: (t.update("d2"), b"while-down") in queued.items, timeout=10)


def test_wrong_password_with_the_servers_user_does_not_kick_the_server(broker, sec, clients):
    t = P.Topics(JOB)
    srv = clients(broker.url, **ident(sec, "server"))
    srv.connect(timeout=15)
    seen = Inbox()
    srv.subscribe(t.all_updates(), seen)
    crt, key = sec["certs"]["d1"]
    bad = M.MqttTransport(broker.url, sec["users"]["server"], username=sec["users"]["server"],
                          password="nope-nope", ca=str(sec["ca"]), cert=str(crt), key=str(key), **FAST)
    with pytest.raises(BrokerRefused):
        bad.connect(timeout=10)
    dev = clients(broker.url, **ident(sec, "d1"))
    dev.connect(timeout=15)
    dev.publish(t.update("d1"), b"after")
    assert wait_for(lambda: (t.update("d1"), b"after") in seen.items)
    assert srv.reconnects == 0


def test_will_outside_the_acl_is_refused_and_certificate_can_be_optional(broker, sec, clients):
    t = P.Topics(JOB)
    bad = M.MqttTransport(broker.url, **ident(sec, "d1"), **FAST)
    bad.set_will(t.status("d2"), b"offline")  # d1 may not write d2's status, not even as a will
    with pytest.raises(BrokerRefused):
        bad.connect(timeout=10)
    h = start_broker(prefer="embedded", auth=str(sec["dir"]), require_certificate=False)
    try:
        kw = ident(sec, "d1")
        del kw["cert"], kw["key"]
        c = clients(h.url, **kw)
        c.connect(timeout=15)  # password only, still TLS
        c.publish(t.update("d1"), b"ok")
    finally:
        h.stop()
