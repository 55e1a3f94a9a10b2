"""Message authentication end to end (edgefed.security.signing + the protocol's signature trailer):
a real engine over the in-process transport, scripted signed/forged devices, and real agents."""
from __future__ import annotations

import logging
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

pytest.importorskip("cryptography")

from edgefed import protocol as P
from edgefed.methods import JobConfig
from edgefed.methods.fedkseed import COEFFS, SCALARS, seed_tensors
from edgefed.security.signing import (DeviceSigning, DeviceVerifier, ServerSigning, ServerVerifier,
                                      Signer, generate, load_public_key, load_registry)
from edgefed.transport import InProcBroker, make_transport
from edgefed_server.engine import Server
from edgefed_server.store import Store
from helpers import wait_until as wait_for


@pytest.fixture
def keys(tmp_path):
    paths = generate(tmp_path, ["a", "b"])
    return tmp_path / "signing", paths


class FixedSigner:
    """Re-uses a captured signature: what an attacker re-dating a message can do."""

    def __init__(self, key_id, sig):
        self.key_id, self.sig = key_id, sig

    def sign(self, data):
        return self.sig


def _update(device, rnd, msg_id, job="j"):
    rng = np.random.default_rng([rnd, ord(device[0])])
    return P.Update(job=job, round=rnd, device=device, method="fedkseed", msg_id=msg_id,
                    num_samples=8, tensors=seed_tensors(rng.integers(0, 64, 4), rng.normal(size=4), SCALARS),
                    train_loss=0.7)


# ----------------------------------------------------------------------------- keys and codec

def test_certs_writes_signing_keys_private_and_a_registry(keys):
    d, paths = keys
    assert {p.name for p in d.iterdir()} == {"server.key", "server.pub", "a.key", "b.key", "devices.json"}
    for name in ("server.key", "a.key", "b.key"):
        assert (d / name).stat().st_mode & 0o777 == 0o600
    reg = load_registry(d / "devices.json")
    assert set(reg) == {"a", "b"}
    a = Signer.from_file(d / "a.key", "a")
    assert a.public_raw() == Signer.from_file(d / "a.key").public_raw()
    # re-running keeps the keys (devices already set up keep working) and adds new devices
    before = (d / "a.key").read_bytes()
    generate(d.parent, ["a", "b", "c"])
    assert (d / "a.key").read_bytes() == before and set(load_registry(d / "devices.json")) == {"a", "b", "c"}
    load_public_key(d / "server.pub")


def _all_messages():
    return [
        P.RoundPlan(job="j", round=3, method="fedkseed", params={"x": 1, "y": 0.5, "z": "s", "k": 8},
                    tensors=[P.Tensor("seed_probs", np.full(8, 0.125, np.float32))],
                    delta_tensors=seed_tensors([1, 2], [0.1, -0.2], COEFFS)),
        _update("a", 3, 12345),
        P.Ack(job="j", round=3, device="a", msg_id=12345, status=P.AckStatus.LATE, reason="late"),
        P.Status(job="j", device="a", state="online", round=2, timestamp=1.5),
        P.SyncRequest(job="j", device="a", from_round=1, request_id=7),
        P.SyncReply(job="j", device="a", from_round=1, to_round=2, request_id=7,
                    rounds=[P.RoundDelta(2, seed_tensors([3], [0.5], COEFFS))]),
        P.JobState(job="j", round=3, history_from=0, method="fedkseed", params={"done": 1}),
    ]


@pytest.mark.parametrize("i", range(7))
def test_signatures_survive_the_codec_round_trip(keys, i):
    d, _ = keys
    server = ServerSigning.from_dir(d)
    a = DeviceSigning.from_files(d / "a.key", d / "server.pub", "a")
    msg = _all_messages()[i]
    device_side = isinstance(msg, (P.Update, P.Status, P.SyncRequest))
    signer, verifier = (a.signer, server.verifier) if device_side else (server.signer, a.verifier)
    data = msg.encode(signer=signer)
    got = P.decode(data, verifier=verifier)
    assert got == msg and got.signature.key_id == signer.key_id
    assert P.decode(data) == msg  # readable without keys (development mode)
    assert P.decode(msg.encode()).signature is None
    with pytest.raises(P.SignatureError, match="unsigned"):
        P.decode(msg.encode(), verifier=verifier)  # stripped signature: refused
    # signed by someone else (a forger's key under the right key id)
    forged = msg.encode(signer=Signer.generate(signer.key_id))
    with pytest.raises(P.SignatureError, match="bad signature"):
        P.decode(forged, verifier=verifier)


def test_device_keys_do_not_speak_for_other_devices_or_the_server(keys):
    d, _ = keys
    server = ServerSigning.from_dir(d)
    a = Signer.from_file(d / "a.key", "a")
    # a's key, b's name: the key id says a, the message says b
    with pytest.raises(P.SignatureError, match="signed with key 'a'"):
        P.decode(_update("b", 0, 1).encode(signer=a), verifier=server.verifier)
    # a's key relabelled as b's
    with pytest.raises(P.SignatureError, match="bad signature"):
        P.decode(_update("b", 0, 1).encode(signer=Signer("b", a._key)), verifier=server.verifier)
    # a device key is not the job key
    dv = DeviceVerifier(load_public_key(d / "server.pub"))
    plan = P.RoundPlan(job="j", round=0, method="fedkseed")
    with pytest.raises(P.SignatureError):
        P.decode(plan.encode(signer=Signer("server", a._key)), verifier=dv)
    with pytest.raises(P.SignatureError, match="unknown device"):
        P.decode(_update("zz", 0, 1).encode(signer=Signer.generate("zz")), verifier=server.verifier)


_FUZZ_SIGNER = Signer.generate("a")
_FUZZ_VERIFIER = ServerVerifier({"a": _FUZZ_SIGNER.public_key()})
_FUZZ_DATA = _update("a", 5, 999).encode(signer=_FUZZ_SIGNER)


@settings(max_examples=300, deadline=None)
@given(bit=st.integers(0, len(_FUZZ_DATA) * 8 - 1))
def test_a_flipped_bit_anywhere_fails_verification(bit):
    assert P.decode(_FUZZ_DATA, verifier=_FUZZ_VERIFIER).device == "a"
    b = bytearray(_FUZZ_DATA)
    b[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(P.ProtocolError):
        P.decode(bytes(b), verifier=_FUZZ_VERIFIER)


# ----------------------------------------------------------------------------- server side

@pytest.fixture
def signed_server(keys, tmp_path):
    d, _ = keys
    broker = InProcBroker()
    jc = JobConfig(job="j", method="fedkseed", rounds=3, k=64, local_steps=4, min_devices=2,
                   devices_per_round=2, round_timeout=30.0)
    store = Store(tmp_path / "j.db")
    srv = Server(broker.client("server"), store, jc, settle=0.02, signing=ServerSigning.from_dir(d))
    cli = broker.client("devices")
    cli.connect()
    topics = P.Topics("j")
    acks, plans = [], []
    dv = DeviceVerifier(load_public_key(d / "server.pub"))
    cli.subscribe(topics.base + "/ack/+", lambda t, p: acks.append(P.decode(p, verifier=dv)))
    cli.subscribe(topics.plan(), lambda t, p: plans.append(P.decode(p, verifier=dv)))
    signers = {n: Signer.from_file(d / f"{n}.key", n) for n in ("a", "b")}
    for n, s in signers.items():
        cli.publish(topics.status(n), P.Status(job="j", device=n, state="online",
                                               timestamp=time.time()).encode(signer=s), retain=True)
    srv.start()
    yield srv, cli, topics, signers, acks, plans
    srv.stop()
    store.close()


def test_forged_updates_are_rejected_and_the_real_one_accepted(signed_server, caplog):
    srv, cli, topics, signers, acks, plans = signed_server
    caplog.set_level(logging.WARNING, logger="edgefed.server")
    wait_for(lambda: plans, what="the signed plan")
    forged_key = _update("a", 0, 10).encode(signer=Signer.generate("a"))
    unsigned = _update("a", 0, 11).encode()
    as_b_with_a_key = _update("a", 0, 12).encode(signer=signers["b"])
    for data in (forged_key, unsigned, as_b_with_a_key):
        cli.publish(topics.update("a"), data)
    real = _update("a", 0, 20)
    cli.publish(topics.update("a"), real.encode(signer=signers["a"]))
    wait_for(lambda: srv.metrics["accepted"] == 1 and srv.metrics["rejected"].get("signature", 0) == 3,
             what="3 rejections and 1 acceptance")
    assert srv.wait_idle()
    with srv._lock:
        assert srv.accepted["a"][0].msg_id == 20 and set(srv.accepted) == {"a"}
    wait_for(lambda: any(a.msg_id == 20 for a in acks), what="the real ack")
    assert [a.status for a in acks if a.msg_id == 20] == [P.AckStatus.ACCEPTED]
    assert not any(a.msg_id in (10, 11, 12) and a.status == P.AckStatus.ACCEPTED for a in acks)
    text = caplog.text
    assert "bad signature" in text and "unsigned Update" in text and "signed with key 'b'" in text


def test_a_captured_update_re_dated_or_re_numbered_is_rejected(signed_server):
    srv, cli, topics, signers, acks, plans = signed_server
    wait_for(lambda: plans, what="the signed plan")
    captured = _update("a", 0, 100).encode(signer=signers["a"])
    cli.publish(topics.update("a"), captured)
    cli.publish(topics.update("b"), _update("b", 0, 200).encode(signer=signers["b"]))
    wait_for(lambda: srv.round == 1, what="round 1")
    sig = P.decode(captured).signature.signature
    redated = _update("a", 1, 100).encode(signer=FixedSigner("a", sig))
    renumbered = _update("a", 0, 101).encode(signer=FixedSigner("a", sig))
    for data in (redated, renumbered):
        cli.publish(topics.update("a"), data)
    wait_for(lambda: srv.metrics["rejected"].get("signature", 0) == 2, what="2 signature rejections")
    # the exact re-send is a duplicate: answered again, never aggregated twice
    cli.publish(topics.update("a"), captured)
    wait_for(lambda: srv.metrics["duplicates"] == 1, what="the duplicate")
    assert srv.wait_idle()
    with srv._lock:
        assert srv.round == 1 and not srv.accepted and srv.metrics["accepted"] == 2


def test_forged_statuses_and_sync_requests_are_refused(signed_server):
    srv, cli, topics, signers, acks, plans = signed_server
    wait_for(lambda: plans, what="the signed plan")
    cli.publish(topics.status("a"), P.Status(job="j", device="a", state="offline").encode(), retain=True)
    cli.publish(topics.status("zz"), P.Status(job="j", device="zz", state="online")
                .encode(signer=Signer.generate("zz")), retain=True)
    cli.publish(topics.sync_request("a"), P.SyncRequest(job="j", device="a", from_round=0).encode())
    wait_for(lambda: srv.metrics["rejected"].get("status_signature", 0) == 2
             and srv.metrics["rejected"].get("sync_signature", 0) == 1, what="refusals")
    with srv._lock:
        assert srv.devices["a"]["online"] and "zz" not in srv.devices
    assert srv.metrics["sync_replies"] == 0


# ----------------------------------------------------------------------------- real agents

def test_signed_job_completes_bit_identical_and_ignores_forged_server_messages(
        tiny_artifacts, tmp_path, caplog):
    from edgefed.data import iid_split, load_rotten_tomatoes, train_heldout_split
    from edgefed.federation import run_federation
    from edgefed.runtime import DeviceModel
    from edgefed.simulate import thread_devices

    caplog.set_level(logging.WARNING, logger="edgefed.agent")
    train, held = train_heldout_split(load_rotten_tomatoes(), heldout=30, seed=0)
    names = ["sim-000", "sim-001", "sim-002"]
    generate(tmp_path / "keys", names)
    sdir = tmp_path / "keys" / "signing"
    art = tiny_artifacts["lora"]
    job = JobConfig(job="signed", method="fedkseed", artifact=str(art), rounds=3, devices_per_round=3,
                    min_devices=3, round_timeout=60.0, lr=1e-2, eps=1e-3, local_steps=4, batch_size=8,
                    k=1024, seed_pool_id=7)
    base = DeviceModel(art, threads=1, batch_size=8, seq_len=32, check_memory=False)
    inner = thread_devices(base, job.job, iid_split(train[:300], 3), signing_dir=sdir)
    topics = P.Topics(job.job)
    impostor = Signer.generate("server")

    def starter(url):
        t = make_transport(url, client_id="attacker")
        t.connect()
        done = {"done": 1}
        fake_state = P.JobState(job=job.job, round=9, history_from=0, method="fedkseed", params=done)
        # a retained "job finished" waiting for the devices: wrongly signed
        t.publish(topics.state(), fake_state.encode(signer=impostor), retain=True, wait=True)
        halt = inner(url)
        wait_for(lambda: all(a.stats.bytes_received > 0 for a in inner.agents), what="devices joined")
        bad_plan = P.RoundPlan(job=job.job, round=1, method="fedkseed", lr=1.0, local_steps=4, batch_size=8,
                               params={"k": 1024, "seed_pool_id": 7, "eps": 1e-3},
                               delta_tensors=seed_tensors([1, 2, 3], [5.0, -5.0, 5.0], COEFFS))
        for data in (fake_state.encode(), bad_plan.encode(), bad_plan.encode(signer=impostor)):
            topic = topics.state() if isinstance(P.decode(data), P.JobState) else topics.plan()
            t.publish(topic, data, retain=False, wait=True)
        return halt

    starter.agents = inner.agents
    res = run_federation(job, art, held, broker_url=f"inproc://{job.job}", start_devices=starter,
                         out_dir=tmp_path / "run", eval_n=10, progress=False,
                         server_options={"signing": ServerSigning.from_dir(sdir)})
    assert res.rounds_completed == 3
    for agent in inner.agents:
        assert agent.stats.rounds_trained == 3 and agent.final_round == 3
        np.testing.assert_array_equal(agent.model.params, res.final_params)
    text = caplog.text
    assert "unsigned JobState" in text and "unsigned RoundPlan" in text and "bad signature" in text
