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
