"""Aggregation workers (docs/server.md "Scale-out"): a coordinator and two `edgefed worker`s
behind one Mosquitto's MQTT 5 shared subscription, real device agents on the tiny model, signed
messages. The global model must be bit-identical to a single server's run of the same job."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from edgefed.data import iid_split, load_rotten_tomatoes, train_heldout_split
from edgefed.methods import JobConfig
from edgefed.protocol import Status, Tensor, Topics, Update, WorkerReport
from edgefed.transport import make_transport
from edgefed.transport.broker import find_mosquitto, start_broker
from edgefed.transport.mqtt import MqttTransport
from edgefed_server.engine import Server
from edgefed_server.store import Store
from edgefed_server.worker import Worker, share_group

from helpers import wait_for

needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed (CI installs it)")
N_DEV = 4


@pytest.fixture(scope="module")
def shards():
    train, _ = train_heldout_split(load_rotten_tomatoes(), heldout=10, seed=0)
    return iid_split(train[:160], N_DEV)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from edgefed.security.signing import generate
    root = tmp_path_factory.mktemp("keys")
    generate(root, [f"sim-{i:03d}" for i in range(N_DEV)], workers=["w1", "w2"])
    return root / "signing"


def _job(name, art, **params):
    return JobConfig(job=name, method="fedkseed", artifact=str(art), rounds=3, devices_per_round=N_DEV,
                     min_devices=N_DEV, round_timeout=60.0, lr=1e-2, eps=1e-3, local_steps=3, batch_size=8,
                     k=256, seed_pool_id=7, params=params)


def _run(job, art, shards, keys, url, tmp_path, workers=()):
    from edgefed.runtime import DeviceModel
    from edgefed.security.signing import ServerSigning, WorkerSigning
    from edgefed.simulate import thread_devices

    store = Store(str(tmp_path / f"{job.job}.db"))
    st = make_transport(url, f"edgefed-server-{job.job}")
    st.connect()
    server = Server(st, store, job, signing=ServerSigning.from_dir(keys), settle=0.2,
                    share_group=share_group(job.job) if workers else None, worker_timeout=5.0)
    ws = []
    for w in workers:
        t = MqttTransport(url, f"edgefed-worker-{job.job}-{w}", protocol="5")
        ws.append(Worker(t, job.job, w, signing=WorkerSigning.from_dir(keys, w)))
    try:
        for w in ws:
            w.start()
        server.start()
        base = DeviceModel(art, threads=1, batch_size=8, seq_len=32, check_memory=False)
        halt = thread_devices(base, job.job, shards, signing_dir=keys)(url)
        extra = yield server, ws  # the caller's injections while the job runs
        summary = server.run(timeout=120)
        halt()
        assert summary["done"], summary
        deltas = store.load_deltas(job.job, 0, job.rounds - 1)
        h = hashlib.sha256()
        for d in deltas:
            for t in d.tensors:
                h.update(t.name.encode() + t.data.tobytes())
        yield {"deltas": h.hexdigest(), "digest": summary["digest"], "summary": summary,
               "status": server.status(), "workers": [dict(w.stats) for w in ws], "extra": extra}
    finally:
        server.stop()
        server.flush(2.0)
        for w in ws:
            w.stop()
            w.transport.close()
        st.close()
        store.close()


@needs_mosquitto
@pytest.mark.mosquitto
def test_two_workers_give_the_bits_of_one_server(tiny_artifacts, shards, keys, tmp_path):
    art = tiny_artifacts["lora"]
    broker = start_broker(prefer="mosquitto")
    try:
        one = _run(_job("solo", art), art, shards, keys, broker.url, tmp_path)
        next(one)
        solo = one.send(None)
        for _ in one:
            pass
        job = _job("scaled", art)
        run = _run(job, art, shards, keys, broker.url, tmp_path, workers=("w1", "w2"))
        server, ws = next(run)
        # a forged partial: unsigned, and signed by a device key, on a worker's report topic
        from edgefed.security.signing import Signer
        forger = MqttTransport(broker.url, "forger", protocol="5")
        forger.connect()
        t = Topics(job.job)
        fake = WorkerReport(job=job.job, worker="w1", session=1, round=0, seq=1, request=1,
                            tensors=[Tensor("meta", np.zeros(6, np.uint32))])
        forger.publish(t.worker_report("w1"), fake.encode())
        forger.publish(t.worker_report("w1"), fake.encode(signer=Signer.from_file(keys / "sim-000.key", "w1")))
        # updates the members must reject: unsigned, from a device outside the registry
        for i in range(6):
            bad = Update(job=job.job, round=0, device="intruder", method="fedkseed", msg_id=i + 1, num_samples=8,
                         tensors=[Tensor("seeds", np.array([1], np.uint32)), Tensor("scalars", np.ones(1, np.float32))])
            forger.publish(t.update("intruder"), bad.encode())
        forger.close()
        scaled = run.send(None)
        for _ in run:
            pass
    finally:
        broker.stop()
    assert scaled["deltas"] == solo["deltas"] and scaled["digest"] == solo["digest"]
    accepted = [w["accepted"] for w in scaled["workers"]]
    assert all(a > 0 for a in accepted), accepted  # the broker split the updates between the workers
    ws = scaled["status"]["workers"]
    assert ws["partials_merged"] >= 2 and ws["adopted"] == 0, ws
    rejected = scaled["summary"]["rejected_by_reason"]
    assert rejected.get("worker_report") == 2, rejected  # both forged partials refused
    assert rejected.get("signature") == 6, rejected      # every forged update, whoever took it
    assert sum(w["rejected"] for w in scaled["workers"]) >= 1
    assert scaled["summary"]["updates_accepted"] == job.rounds * N_DEV


# ----------------------------------------------------------------------------- fast, in-process

def _upd(job, dev, msg_id, rng, k=64):
    m = int(rng.integers(1, 5))
    return Update(job=job, round=0, device=dev, method="fedkseed", msg_id=msg_id, num_samples=int(rng.integers(1, 17)),
                  tensors=[Tensor("seeds", rng.integers(0, k, m).astype(np.uint32)),
                           Tensor("scalars", rng.standard_normal(m).astype(np.float32))])


class SilentWorker(Worker):
    """Accepts updates and reports them, but never answers a close request (a hung process)."""

    def _report(self):
        self.answered = self.request
        super()._report()


def test_silent_worker_and_resends_still_give_the_bits_of_one_server():
    from edgefed.methods import get_method
    from edgefed.protocol import RoundPlan, decode
    from edgefed.transport import InProcBroker

    broker = InProcBroker()
    job = JobConfig(job="inproc", method="fedkseed", rounds=1, devices_per_round=6, min_devices=6,
                    round_timeout=30.0, local_steps=4, batch_size=4, k=64)
    store = Store(":memory:")
    server = Server(broker.client("server"), store, job, settle=0.05, share_group="g", worker_timeout=0.5)
    w1 = Worker(broker.client("w1"), job.job, "w1", group="g")
    w2 = SilentWorker(broker.client("w2"), job.job, "w2", group="g")
    fleet = broker.client("fleet")
    fleet.connect()
    t = Topics(job.job)
    plans = []
    fleet.subscribe(t.plan(), lambda _t, p: plans.append(decode(p)) if p else None)
    for w in (w1, w2):
        w.start()
    devices = [f"d{i}" for i in range(6)]
    for d in devices:
        fleet.publish(t.status(d), Status(job=job.job, device=d, state="online").encode(), retain=True)
    server.start()
    wait_for(lambda: plans and w1.round == 0 and w2.round == 0, 5)
    rng = np.random.default_rng(5)
    ups = [_upd(job.job, d, 100 + i, rng) for i, d in enumerate(devices)]
    for u in ups[:3]:
        fleet.publish(t.update(u.device), u.encode())
        fleet.publish(t.update(u.device), u.encode())  # a re-send: another member takes it
    for u in ups[3:]:
        fleet.publish(t.update(u.device), u.encode())
    summary = server.run(timeout=20)
    assert summary["done"], summary
    stats = server.status()["workers"]
    assert w2.stats["accepted"] >= 1 and stats["adopted"] >= 1, (w2.stats, stats)
    assert stats["corrections"] >= 1, stats  # a re-send a worker summed after another member took it
    strat = get_method("fedkseed").server()
    plan = plans[0]
    assert isinstance(plan, RoundPlan)
    _, want = strat.aggregate(job, strat.init_state(job), plan, ups)
    got = store.load_deltas(job.job, 0, 0)[0]
    assert [x.data.tobytes() for x in got.tensors] == [x.data.tobytes() for x in want.tensors]
    assert summary["updates_accepted"] == 6
    for w in (w1, w2):
        w.stop()
    server.stop()


def test_a_flood_on_the_update_topic_is_dropped_past_the_workers_budget_and_counted():
    """Anyone who can publish on update/+ reaches a worker's queue: it holds at most its budget
    (as the server's, server/inbound.py), drops and counts the rest, and gives the budget back
    once the batch is handled. Too-large updates are rejected as too_large without being held."""
    from edgefed.protocol import Limits, decode
    from edgefed.transport import InProcBroker
    from edgefed_server.inbound import ITEM_OVERHEAD
    from edgefed_server.limits import ResourceLimits

    broker = InProcBroker()
    budget = 64 << 10
    w = Worker(broker.client("w1"), "flood", "w1", group="g", limits=Limits(max_message_bytes=8 << 10),
               resource_limits=ResourceLimits(inbound_bytes=budget, inbound_messages=1000))
    t = Topics("flood")
    w._on_message(t.update("d0"), b"x" * (1 << 20))  # over max_message_bytes: a marker, not the bytes
    assert w.stats["inbound_too_large"] == 1 and w.inq.snapshot()["bytes"] < 1024
    for _ in range(100):  # before start(): nothing handles them, as when the worker falls behind
        w._on_message(t.update("d0"), b"x" * 4096)
    marker, per = ITEM_OVERHEAD + len(t.update("d0")), 4096 + ITEM_OVERHEAD + len(t.update("d0"))
    kept = (budget - marker) // per  # what fits beside the marker
    assert 0 < kept < 100 and w.stats["inbound_dropped"] == 100 - kept
    assert w.inq.snapshot()["bytes"] == marker + kept * per <= budget
    coord = broker.client("coordinator")
    coord.connect()
    reports = []
    coord.subscribe(t.worker_report("w1"), lambda _t, p: reports.append(decode(p)))
    w.start()
    try:
        wait_for(lambda: w.inq.idle() and w.stats["rejected"] == kept + 1, 5)
        assert w.inq.snapshot()["bytes"] == 0, "the handled batch's budget is given back"
        wait_for(lambda: sum(len(r.labels) for r in reports) == kept + 1, 5)
        labels = [lab.decode() for r in reports for lab in r.labels]
        assert labels.count("too_large") == 1 and len(labels) == kept + 1
        w._on_message(t.update("d0"), b"x" * 4096)  # room again
        assert w.stats["inbound_dropped"] == 100 - kept
    finally:
        w.stop()


def test_jobs_that_cannot_split_a_round_refuse_workers():
    from edgefed.transport import InProcBroker
    broker = InProcBroker()
    for params in ({"aggregator": "median"}, {"secure_aggregation": 1}, {"dp_mode": "central", "dp_clip": 1.0}):
        job = JobConfig(job="refuse", method="fedkseed", k=64, params=params)
        with pytest.raises(ValueError, match="aggregation workers"):
            Server(broker.client(), Store(":memory:"), job, share_group="g")


@needs_mosquitto
@pytest.mark.mosquitto
def test_broker_acl_for_workers(tmp_path):
    """edgefed certs --workers: a worker reads updates through the shared subscription and writes
    its reports; a device can neither write a report nor read updates; the EMQX file agrees."""
    from edgefed.security import broker_auth as BA
    from edgefed.security.certs import generate
    from edgefed.transport import TransportError

    job = "aclw"
    info = generate(str(tmp_path / "c"), job, ["d1"], workers=["w1"])
    assert (tmp_path / "c" / "signing" / "workers.json").exists()
    acl = (tmp_path / "c" / "acl").read_text()
    t = Topics(job)
    assert f"user w1@{job}\ntopic write {t.worker_report('w1')}" in acl
    rules = BA.parse_acl(acl)
    assert BA.acl_allows(rules, f"w1@{job}", t.update("d1"), "read")
    assert not BA.acl_allows(rules, f"d1@{job}", t.worker_report("w1"), "write")
    assert not BA.acl_allows(rules, f"w1@{job}", t.ack("d1"), "write")
    emqx = (tmp_path / "c" / "emqx-acl.conf").read_text()
    assert f'{{allow, {{username, "w1@{job}"}}, publish, ["{t.worker_report("w1")}", "{t.worker_status("w1")}"]}}.' in emqx

    def ident(name):
        crt, key = info["certs"][name]
        return dict(username=info["users"][name], password_file=str(info["credentials"][name]),
                    ca=str(info["ca"]), cert=str(crt), key=str(key), protocol="5")

    h = start_broker(prefer="mosquitto", auth=str(info["dir"]))
    made = []
    try:
        def client(name):
            c = MqttTransport(h.url, None, **ident(name))
            c.connect()
            made.append(c)
            return c
        srv, w1, d1 = client("server"), client("w1"), client("d1")
        got_w, got_d, got_s = [], [], []
        w1.subscribe(t.shared_updates("g"), lambda tp, p: got_w.append(p))
        srv.subscribe(t.all_worker_reports(), lambda tp, p: got_s.append(p))
        for flt in (t.all_updates(), t.shared_updates("other")):  # granted, but every delivery is filtered
            try:
                d1.subscribe(flt, lambda tp, p: got_d.append(p))
            except TransportError:
                pass
        d1.publish(t.update("d1"), b"u1")
        try:
            d1.publish(t.worker_report("w1"), b"forged partial")
        except TransportError as e:
            assert "Not authorized" in str(e)
        w1.publish(t.worker_report("w1"), b"real report")
        assert wait_for(lambda: got_w and got_s, 5), (got_w, got_s)
        import time
        time.sleep(0.3)
        assert got_s == [b"real report"] and got_d == [] and got_w == [b"u1"]
    finally:
        for c in made:
            c.close()
        h.stop()
