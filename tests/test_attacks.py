"""Issue 9 "Proof": the attacks of the threat model, performed against one real federated job on a
real Mosquitto (TLS + passwords + ACL from `edgefed certs`) with message signing on.

One job, three honest devices (each with its own broker identity and signing key), and attacker
identities that all connect with valid certificates from the job's CA:

* ``mallory``   a registered device of the job (valid broker credentials and signing key) that
                never trains: attacks (b), (d), (e), (f)
* ``thief``     sim-000's broker permissions (a stolen broker password) but not its signing key: (c)
* ``rogue``     may write the job's state topic (a loosened ACL / leaked broker rights): (d) shows
                that the devices themselves ignore a forged retained ``done=1``
* anonymous     (a)
* ``server@other`` the server of another job on the same broker (traffic mallory must not see)

The job must complete with every replica bit-identical to the server's model, and each attack
must be refused (by the broker, with an error, or by the server, with a signed REJECTED ack
and a sanitised log line)."""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest

pytest.importorskip("cryptography")
pytest.importorskip("paho.mqtt")

from edgefed import protocol as P
from edgefed.methods.fedkseed import SCALARS, seed_tensors, zo_plan
from edgefed.security import broker_auth as BA
from edgefed.transport import BrokerUnreachable, TransportError, start_broker
from edgefed.transport import mqtt as M
from edgefed.transport.broker import find_mosquitto
from helpers import wait_for as _wait_for

pytestmark = [pytest.mark.mosquitto, pytest.mark.skipif(
    find_mosquitto() is None, reason="mosquitto binary not found (apt-get install mosquitto)")]

JOB, OTHER = "atk", "otherjob"
DEVICES = ["sim-000", "sim-001", "sim-002"]
FAST = dict(reconnect_min_delay=0.1, reconnect_max_delay=1.0, publish_timeout=10.0)
ENV_VARS = (M.ENV_USERNAME, M.ENV_PASSWORD, M.ENV_PASSWORD_FILE, M.ENV_CA, M.ENV_CERT, M.ENV_KEY)


def wait_for(cond, timeout=20.0, step=0.02):
    return _wait_for(cond, timeout, step)


class FixedSigner:
    """Re-uses a captured signature: all an attacker without the device key can do."""

    def __init__(self, key_id, sig):
        self.key_id, self.sig = key_id, sig

    def sign(self, data):
        return self.sig


class Inbox:
    def __init__(self, verifier=None):
        self.items, self.lock, self.verifier = [], threading.Lock(), verifier

    def __call__(self, topic, payload):
        msg = None
        if self.verifier is not None and payload:
            try:
                msg = P.decode(payload, verifier=self.verifier)
            except P.ProtocolError:
                msg = None
        with self.lock:
            self.items.append((topic, bytes(payload), msg))

    def snapshot(self):
        with self.lock:
            return list(self.items)

    def msgs(self, cls):
        return [m for _, _, m in self.snapshot() if isinstance(m, cls)]


@pytest.fixture
def world(tmp_path, monkeypatch):
    """`edgefed certs` for JOB (3 devices + mallory), extra attacker users, a running broker."""
    from edgefed.security.certs import generate
    for v in ENV_VARS:
        monkeypatch.delenv(v, raising=False)
    info = generate(str(tmp_path / "secrets"), JOB, [*DEVICES, "mallory"])
    root = Path(info["dir"])
    extra = {"thief@" + JOB: BA.new_password(), "rogue@" + JOB: BA.new_password(),
             BA.server_username(OTHER): BA.new_password()}
    with open(root / "passwd", "a") as f:
        f.write(BA.password_file_text(extra))
    t = P.Topics(JOB)
    with open(root / "acl", "a") as f:
        f.write("\n".join(["", f"user thief@{JOB}", *BA.device_acl(JOB, "sim-000"),
                           "", f"user rogue@{JOB}", f"topic write {t.state()}", f"topic write {t.plan()}",
                           "", f"user {BA.server_username(OTHER)}", *BA.server_acl(OTHER)]) + "\n")
    h = start_broker(prefer="mosquitto", auth=str(root))
    info["extra"] = extra
    try:
        yield info, h
    finally:
        h.stop()


def ident(info, name, user=None, password=None):
    """MqttTransport keywords for an identity; attackers borrow mallory's CA-issued certificate."""
    crt, key = info["certs"].get(name, info["certs"]["mallory"])
    kw = dict(ca=str(info["ca"]), cert=str(crt), key=str(key))
    if password is not None:
        kw.update(username=user, password=password)
    else:
        kw.update(username=info["users"][name], password_file=str(info["credentials"][name]))
    return kw


def url_for(info, h, name):
    """mqtts:// URL carrying the identity (password by file reference), as `edgefed certs` prints."""
    crt, key = info["certs"][name]
    q = (f"ca={Path(info['ca']).resolve()}&cert={Path(crt).resolve()}&key={Path(key).resolve()}"
         f"&password_file={Path(info['credentials'][name]).resolve()}")
    return f"mqtts://{quote(info['users'][name], safe='')}@127.0.0.1:{h.port}?{q}"


def test_attacks_are_refused_and_the_job_completes_bit_identical(tiny_artifacts, world, tmp_path, caplog):
    from edgefed.agent import DeviceAgent
    from edgefed.data import iid_split, load_rotten_tomatoes, train_heldout_split
    from edgefed.federation import run_federation
    from edgefed.methods import JobConfig
    from edgefed.runtime import DeviceModel
    from edgefed.security.signing import DeviceSigning, DeviceVerifier, ServerSigning, Signer, load_public_key
    from edgefed.simulate import _run_agent
    from edgefed.transport import make_transport

    info, h = world
    caplog.set_level(logging.INFO, logger="edgefed.server")
    caplog.set_level(logging.WARNING, logger="edgefed.agent")
    sdir = Path(info["dir"]) / "signing"
    server_pub = load_public_key(sdir / "server.pub")
    dv = DeviceVerifier(server_pub)
    mallory_key = Signer.from_file(sdir / "mallory.key", "mallory")
    t, o = P.Topics(JOB), P.Topics(OTHER)

    train, held = train_heldout_split(load_rotten_tomatoes(), heldout=30, seed=0)
    art = tiny_artifacts["lora"]
    job = JobConfig(job=JOB, method="fedkseed", artifact=str(art), rounds=3, devices_per_round=3,
                    min_devices=3, round_timeout=60.0, lr=1e-2, eps=1e-3, local_steps=4, batch_size=8,
                    k=1024, seed_pool_id=7)
    base = DeviceModel(art, threads=1, batch_size=8, seq_len=32, check_memory=False)
    shards = iid_split(train[:300], 3)

    res: dict = {}            # what each attack observed (asserted after the job)
    errors: list = []         # agent / attacker thread failures
    captured: list = []       # sim-000's encoded updates, as a network tap would see them
    agents: list = []
    conns: list = []

    def conn(**kw):
        c = M.MqttTransport(h.url, **{**FAST, **kw})
        conns.append(c)
        return c

    def attacker(stop_agents: threading.Event, workers: list):
        try:
            # (f) mallory subscribes to everything it can name before anything else happens
            mal = conn(**ident(info, "mallory"))
            mal.connect(timeout=10)
            seen = Inbox(dv)
            res["sub_errors"] = []
            for flt in ("#", o.everything(), t.all_updates(), t.ack("sim-000"), t.sync_reply("sim-001")):
                try:
                    mal.subscribe(flt, seen)
                except TransportError as e:  # a refused SUBACK is also "reads nothing"
                    res["sub_errors"].append((flt, str(e)))
            mal_acks = Inbox(dv)
            mal.subscribe(t.ack("mallory"), mal_acks)
            plans = Inbox(dv)
            mal.subscribe(t.plan(), plans)
            res["seen"], res["mal_acks"], res["plans"] = seen, mal_acks, plans
            assert wait_for(lambda: any(p.round == 0 for p in plans.msgs(P.RoundPlan))), "no signed plan 0"
            plan0 = [p for p in plans.msgs(P.RoundPlan) if p.round == 0][0]
            probs = zo_plan(plan0).probs
            seed = int(np.flatnonzero(probs > 0)[0]) if probs is not None else 0

            # (a) anonymous client, even with a CA-issued certificate: refused at CONNECT
            anon = conn(**{k: v for k, v in ident(info, "mallory").items()
                           if k not in ("username", "password_file")})
            try:
                anon.connect(timeout=8)
                res["anon"] = "connected"
            except M.BrokerRefused as e:
                res["anon"] = e
            # ... and without any certificate or password
            bare = conn(ca=str(info["ca"]))
            try:
                bare.connect(timeout=8)
                res["bare"] = "connected"
            except BrokerUnreachable as e:
                res["bare"] = e

            # mallory registers as a device of the job (a signed Status) so its updates reach the bounds
            mal.publish(t.status("mallory"), P.Status(job=JOB, device="mallory", state="online",
                                                      timestamp=time.time()).encode(signer=mallory_key),
                        retain=True)

            # (b1) mallory's credentials publishing on another device's topic: the broker's ACL
            upd = P.Update(job=JOB, round=0, device="sim-001", method="fedkseed", msg_id=10**6,
                           num_samples=8, tensors=seed_tensors([seed], [0.5], SCALARS), train_loss=0.5)
            try:
                mal.publish(t.update("sim-001"), upd.encode(signer=mallory_key))
                res["b_acl"] = "published"
            except TransportError as e:
                res["b_acl"] = e
            # (b2) on its own topic, an update that names sim-001 (signed with mallory's key)
            mal.publish(t.update("mallory"), upd.encode(signer=mallory_key))
            # (b3) ... or with sim-001's key id but mallory's key (a forged signature)
            mal.publish(t.update("mallory"), upd.encode(signer=Signer("sim-001", mallory_key._key)))

            # (d) mallory cannot write the retained job state (ACL) ...
            forged_done = P.JobState(job=JOB, round=9, history_from=0, method="fedkseed", params={"done": 1})
            try:
                mal.publish(t.state(), forged_done.encode(signer=Signer("server", mallory_key._key)),
                            retain=True)
                res["d_acl"] = "published"
            except TransportError as e:
                res["d_acl"] = e
            # ... and where the broker lets someone write it, devices ignore the forgery
            rogue = conn(**ident(info, "rogue", "rogue@" + JOB, info["extra"]["rogue@" + JOB]))
            rogue.connect(timeout=10)
            rogue.publish(t.state(), forged_done.encode(signer=Signer.generate("server")), retain=True)

            # (e) valid credentials and key, absurd values, for the current round
            big_n = P.Update(job=JOB, round=0, device="mallory", method="fedkseed", msg_id=1,
                             num_samples=2**32 - 1, tensors=seed_tensors([seed], [0.5], SCALARS), train_loss=0.5)
            big_g = P.Update(job=JOB, round=0, device="mallory", method="fedkseed", msg_id=2,
                             num_samples=8, tensors=seed_tensors([seed], [3.4e38], SCALARS), train_loss=0.5)
            for m in (big_n, big_g):
                mal.publish(t.update("mallory"), m.encode(signer=mallory_key))
            wait_for(lambda: {a.msg_id for a in mal_acks.msgs(P.Ack)} >= {1, 2}, timeout=15)

            # the other job's server talks on its own job (mallory must not see it)
            other = conn(**ident(info, "server", BA.server_username(OTHER),
                                 info["extra"][BA.server_username(OTHER)]))
            other.connect(timeout=10)
            other.publish(o.plan(), b"other-job-plan", retain=True)

            # now the honest devices join (the forged done=1 is retained on the state topic)
            for a in agents:
                th = threading.Thread(target=_run_agent, args=(a, stop_agents, errors), name=a.device,
                                      daemon=True)
                th.start()
                workers.append(th)

            # (c) sim-000's captured round-0 update, re-dated and re-numbered, sent with stolen
            # broker rights to sim-000's own topic
            assert wait_for(lambda: captured and any(p.round >= 1 for p in plans.msgs(P.RoundPlan)),
                            timeout=120), "no captured update / round 1"
            cap = P.decode(captured[0])
            sig = cap.signature.signature
            thief = conn(**ident(info, "sim-000", "thief@" + JOB, info["extra"]["thief@" + JOB]))
            thief.connect(timeout=10)
            thief_acks = Inbox(dv)
            thief.subscribe(t.ack("sim-000"), thief_acks)
            res["thief_acks"] = thief_acks
            redated = P.Update(job=JOB, round=cap.round + 1, device="sim-000", method=cap.method,
                               msg_id=cap.msg_id + 1000, num_samples=cap.num_samples, tensors=cap.tensors,
                               train_loss=cap.train_loss)
            thief.publish(t.update("sim-000"), redated.encode(signer=FixedSigner("sim-000", sig)))
            res["c_sent"] = True
            wait_for(lambda: any(a.status == P.AckStatus.REJECTED for a in thief_acks.msgs(P.Ack)), timeout=15)
            other.publish(o.update("x"), b"other-job-update")
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(f"attacker: {type(e).__name__}: {e}")
            raise

    def starter(server_url):
        for i, dev in enumerate(DEVICES):
            tr = make_transport(url_for(info, h, dev), client_id=f"edgefed-{JOB}-{dev}", **FAST)
            if dev == "sim-000":
                real = tr.publish

                def tap(topic, payload, *a, _real=real, **kw):
                    if topic == t.update("sim-000"):
                        captured.append(bytes(payload))
                    return _real(topic, payload, *a, **kw)
                tr.publish = tap
            agents.append(DeviceAgent(tr, dev, JOB, base.fork(), shards[i], device_class="x86-sim",
                                      signing=DeviceSigning.from_files(sdir / f"{dev}.key",
                                                                       sdir / "server.pub", dev)))
        stop = threading.Event()
        workers: list = []
        att = threading.Thread(target=attacker, args=(stop, workers), name="attacker", daemon=True)
        att.start()

        def halt():
            att.join(timeout=60)
            end = time.time() + 30
            for th in list(workers):
                th.join(timeout=max(0.1, end - time.time()))
            stop.set()
            for th in list(workers):
                th.join(timeout=10)
        halt.failure = lambda: errors[0] if errors else None
        return halt

    try:
        result = run_federation(job, art, held, broker_url=url_for(info, h, "server"), start_devices=starter,
                                out_dir=tmp_path / "run", eval_n=10, progress=False, timeout=240,
                                server_options={"signing": ServerSigning.from_dir(sdir)})
    finally:
        for c in conns:
            c.close(timeout=1)
    assert not errors, errors

    # the job: completed, every replica bit-identical to the server's model
    assert result.rounds_completed == 3
    for a in agents:
        assert a.stats.rounds_trained == 3 and a.final_round == 3, a.device
        np.testing.assert_array_equal(a.model.params, result.final_params)

    # (a) anonymous: refused by the broker (135 not authorized / 134 bad user name or password)
    assert isinstance(res["anon"], M.BrokerRefused) and res["anon"].reason_code in (134, 135), res["anon"]
    assert isinstance(res["bare"], BrokerUnreachable), res["bare"]

    # (b) publishing as another device: dropped by the ACL; naming it on one's own topic: signature
    assert isinstance(res["b_acl"], TransportError) and "authori" in str(res["b_acl"]).lower(), res["b_acl"]
    mal_acks = res["mal_acks"].msgs(P.Ack)
    sig_rejects = [a for a in mal_acks if a.status == P.AckStatus.REJECTED and "sign" in a.reason]
    assert len(sig_rejects) >= 2, [(a.msg_id, a.reason) for a in mal_acks]
    assert all(a.status != P.AckStatus.ACCEPTED for a in mal_acks)

    # (c) the re-dated, re-numbered capture: signature reject (acked REJECTED to sim-000's topic)
    assert res.get("c_sent")
    c_acks = [a for a in res["thief_acks"].msgs(P.Ack) if a.status == P.AckStatus.REJECTED]
    assert c_acks and "bad signature" in c_acks[0].reason, [a.reason for a in c_acks]

    # (d) the ACL refused mallory's retained state; the rogue's forgery was ignored by the devices
    assert isinstance(res["d_acl"], TransportError), res["d_acl"]
    agent_text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("edgefed.agent"))
    assert "bad signature" in agent_text or "ignored" in agent_text

    # (e) bounds, with the reason, in the REJECTED ack and the server log
    by_id = {a.msg_id: a for a in mal_acks}
    assert by_id[1].status == P.AckStatus.REJECTED and "num_samples=4294967295" in by_id[1].reason
    assert by_id[2].status == P.AckStatus.REJECTED and "out of bounds" in by_id[2].reason

    # (f) mallory's '#' read only its own job's shared topics and its own acks
    allowed = {t.plan(), t.state(), t.ack("mallory"), t.sync_reply("mallory"), t.secagg_all(),
               t.secagg_to("mallory")}
    topics = {tp for tp, _, _ in res["seen"].snapshot()}
    assert topics, "mallory's subscriptions received nothing at all (not even the plan)"
    assert topics <= allowed, topics - allowed
    assert not any(tp.startswith(o.base) for tp in topics)

    # the server logged each refusal on one sanitised line
    srv = [r.getMessage() for r in caplog.records if r.name.startswith("edgefed.server")]
    rejected = [m for m in srv if m.startswith("rejected ")]
    assert any("bad signature" in m for m in rejected), rejected
    assert any("signed with key 'mallory'" in m for m in rejected), rejected
    assert any("num_samples=4294967295" in m for m in rejected), rejected
    assert any("out of bounds" in m for m in rejected), rejected
    for m in srv:
        assert not any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in m), repr(m)
    # and no credential shows up in any log line
    text = caplog.text
    for name in [*DEVICES, "mallory", "server"]:
        assert Path(info["credentials"][name]).read_text().strip() not in text
    for pw in info["extra"].values():
        assert pw not in text
