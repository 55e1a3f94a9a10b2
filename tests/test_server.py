"""Aggregation server (edgefed_server): fast tests over the in-process transport with the real
fedkseed / fedmezo strategies and scripted devices that publish real encoded protocol messages."""
from __future__ import annotations

import json
import struct
import threading
import time
import urllib.request
import zlib
from collections import defaultdict

import numpy as np
import pytest

from edgefed.methods import JobConfig, MethodState
from edgefed.methods.fedkseed import COEFFS, SCALARS, seed_pairs, seed_tensors
from edgefed.protocol import (AckStatus, MessageIds, RoundDelta, Status, SyncRequest, Tensor,
                              Topics, Update, decode)
from edgefed.transport import InProcBroker
from edgefed_server.engine import Server, reason_class
from edgefed_server.http_status import render_metrics
from edgefed_server.replay import compare_states, replay_log
from edgefed_server.store import (Store, decode_delta, encode_delta, i64_to_u64, pack_arrays,
                                  u64_to_i64, unpack_arrays)
from helpers import wait_until as wait_for


# ----------------------------------------------------------------------------- helpers

class FakeClock:
    def __init__(self, t=1_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


class Fleet:
    """Scripted devices sharing one in-process client; publishes real protocol messages."""

    def __init__(self, broker, job, names, *, auto=True, k=64, steps=4, method="fedkseed"):
        self.job, self.names, self.k, self.steps, self.method = job, list(names), k, steps, method
        self.topics = Topics(job)
        self.t = broker.client("fleet")
        self.t.connect()
        self.ids = MessageIds()
        self.lock = threading.Lock()
        self.acks = defaultdict(list)
        self.replies = defaultdict(list)
        self.plans = []
        self.states = []
        self.sent = {}  # (device, msg_id) -> Update
        self.auto = set(self.names) if auto else set()
        self.t.subscribe(self.topics.base + "/ack/+", self._on_ack)
        self.t.subscribe(self.topics.base + "/sync/reply/+", self._on_reply)
        self.t.subscribe(self.topics.state(), lambda t, p: self.states.append(decode(p)))
        self.t.subscribe(self.topics.plan(), self._on_plan)

    def _on_ack(self, topic, payload):
        a = decode(payload)
        with self.lock:
            self.acks[a.device].append(a)

    def _on_reply(self, topic, payload):
        r = decode(payload)
        with self.lock:
            self.replies[r.device].append(r)

    def _on_plan(self, topic, payload):
        plan = decode(payload)
        with self.lock:
            seen = any(p.round == plan.round for p in self.plans)
            self.plans.append(plan)
        if not seen:
            for name in sorted(self.auto):
                self.update(name, plan.round)

    def announce(self, *names, state="online"):
        for n in names or self.names:
            self.t.publish(self.topics.status(n), Status(job=self.job, device=n, state=state,
                                                         device_class="x86-sim", round=-1,
                                                         timestamp=time.time()).encode(), retain=True)

    def make_update(self, name, rnd, msg_id=None, n=None):
        rng = np.random.default_rng([rnd, self.names.index(name) if name in self.names else 99])
        if self.method == "fedkseed":
            return Update(job=self.job, round=rnd, device=name, method="fedkseed",
                          msg_id=msg_id or self.ids.next(), num_samples=n or int(rng.integers(4, 20)),
                          tensors=seed_tensors(rng.integers(0, self.k, self.steps),
                                               rng.normal(size=self.steps), SCALARS),
                          train_loss=float(rng.uniform(0.5, 1.0)))
        return Update(job=self.job, round=rnd, device=name, method=self.method,
                      msg_id=msg_id or self.ids.next(), num_samples=n or int(rng.integers(4, 20)),
                      tensors=[Tensor("delta", rng.normal(size=10).astype(np.float32))],
                      train_loss=float(rng.uniform(0.5, 1.0)))

    def update(self, name, rnd, msg_id=None, upd=None):
        u = upd or self.make_update(name, rnd, msg_id)
        with self.lock:
            self.sent[(u.device, u.msg_id)] = u
        self.t.publish(self.topics.update(name), u.encode())
        return u

    def raw(self, name, payload, kind="update"):
        topic = self.topics.update(name) if kind == "update" else self.topics.base + f"/{kind}/{name}"
        self.t.publish(topic, payload)

    def acks_of(self, name):
        with self.lock:
            return list(self.acks[name])

    def accepted(self):
        with self.lock:
            return [self.sent[(d, a.msg_id)] for d, lst in self.acks.items() for a in lst
                    if a.status == AckStatus.ACCEPTED and (d, a.msg_id) in self.sent]


@pytest.fixture
def env(tmp_path):
    made = []

    def make(job="j", method="fedkseed", names=("a", "b", "c"), auto=True, clock=None, store=None,
             settle=0.02, start=True, announce=True, server_kwargs=None, **cfg):
        broker = InProcBroker()
        cfg = {"rounds": 3, "k": 64, "local_steps": 4, "min_devices": 1, "round_timeout": 30.0, **cfg}
        jc = JobConfig(job=job, method=method, **cfg)
        st = store or Store(tmp_path / f"{job}.db")
        fleet = Fleet(broker, job, names, auto=auto, k=jc.k, steps=jc.local_steps, method=method)
        if announce:
            fleet.announce()
        kw = dict(settle=settle)
        if clock is not None:
            kw["clock"] = clock
        kw.update(server_kwargs or {})
        srv = Server(broker.client("server"), st, jc, **kw)
        made.append((srv, st))
        if start:
            srv.start()
        return srv, fleet, st, broker

    yield make
    for srv, st in made:
        srv.stop()
        try:
            st.close()
        except Exception:
            pass


def fedkseed_reference(job: JobConfig, rounds_updates):
    """Independent recomputation: per round, sample-weighted per-seed mean, coeff -lr*G."""
    cum = np.zeros(job.k, np.float64)
    deltas = []
    for ups in rounds_updates:
        total = sum(u.num_samples for u in ups)
        G = np.zeros(job.k, np.float64)
        for u in sorted(ups, key=lambda u: u.device):
            seeds, scalars = seed_pairs(u.tensors, SCALARS, "update")
            for s, g in zip(seeds.astype(np.int64), scalars.astype(np.float64)):
                G[s] += u.num_samples / total * g
        coeff = -job.lr * G
        nz = np.flatnonzero(coeff)
        deltas.append((nz, coeff[nz].astype(np.float32)))
        cum[nz] += coeff[nz].astype(np.float32).astype(np.float64)
    return cum, deltas


# ----------------------------------------------------------------------------- rounds

def test_rounds_advance_and_state_equals_recomputation(env):
    summaries = []
    srv, fleet, store, _ = env(rounds=4, start=False)
    srv.add_round_listener(summaries.append)
    srv.start()
    out = srv.run(timeout=10)
    assert out["done"] and out["rounds_completed"] == 4 and out["updates_accepted"] == 12
    # listener summaries: one per round, with the documented keys
    assert [s["round"] for s in summaries] == [0, 1, 2, 3]
    for s in summaries:
        assert s["n_updates"] == 3 and s["devices"] == ["a", "b", "c"]
        assert s["bytes_in"] > 0 and s["bytes_out"] > 0 and s["duration_s"] >= 0
        assert "coeff_norm" in s["strategy"]
    wait_for(lambda: len(fleet.accepted()) == 12, what="all acks")
    by_round = defaultdict(list)
    for u in fleet.accepted():
        by_round[u.round].append(u)
    ups = [by_round[r] for r in range(4)]
    for r, s in enumerate(summaries):
        w = np.array([u.num_samples for u in ups[r]], float)
        loss = np.array([np.float32(u.train_loss) for u in ups[r]], float)
        assert s["train_loss"] == pytest.approx(float((w * loss).sum() / w.sum()), rel=1e-6)
    cum, deltas = fedkseed_reference(srv.job, ups)
    rnd, state = store.load_state("j")
    assert rnd == 4
    np.testing.assert_allclose(state.arrays["cum_coeffs"], cum, rtol=1e-6, atol=1e-12)
    # each plan r+1 carries the delta of round r
    plans = {p.round: p for p in fleet.plans}
    assert sorted(plans) == [0, 1, 2, 3] and plans[0].delta_tensors == []
    for r in range(3):
        seeds, coeffs = seed_pairs(plans[r + 1].delta_tensors, COEFFS, "delta")
        np.testing.assert_array_equal(seeds, deltas[r][0])
        np.testing.assert_allclose(coeffs, deltas[r][1], rtol=1e-6)
    # final JobState announces the end
    wait_for(lambda: fleet.states and fleet.states[-1].params.get("done") == 1, what="final JobState")
    assert fleet.states[-1].round == 4 and fleet.states[-1].digest == srv.digest
    # the log replays to the same state, bit for bit
    rep = replay_log(store, "j")
    assert rep.rounds == 4 and compare_states(rep.state, state) == []


def test_fedmezo_tensor_rounds(env):
    srv, fleet, store, _ = env(method="fedmezo", names=("a", "b"), rounds=2, k=16)
    assert srv.run(timeout=10)["done"]
    wait_for(lambda: len(fleet.accepted()) == 4, what="all acks")
    by_round = defaultdict(list)
    for u in fleet.accepted():
        by_round[u.round].append(u)
    cum = np.zeros(10, np.float32)
    for r in range(2):
        ups = sorted(by_round[r], key=lambda u: u.device)
        tot = sum(u.num_samples for u in ups)
        avg = sum(u.tensors[0].data.astype(np.float64) * (u.num_samples / tot) for u in ups)
        cum = cum + avg.astype(np.float32)
    state = store.load_state("j")[1]
    np.testing.assert_allclose(state.arrays["cum_delta"], cum, rtol=1e-6)
    assert compare_states(replay_log(store, "j").state, state) == []


def test_devices_per_round_closes_at_target(env):
    srv, fleet, store, _ = env(names=("a", "b", "c", "d"), rounds=2, devices_per_round=2)
    assert srv.run(timeout=10)["done"]
    assert all(h["n_updates"] == 2 for h in srv.history)
    assert srv.history[0]["devices"] == ["a", "b"]  # fleet answers in device order
    # the others got LATE acks (their round closed) and were stored, not aggregated
    wait_for(lambda: any(a.status == AckStatus.LATE for a in fleet.acks_of("d")), what="late ack")
    assert store.update_counts("j")["late"] >= 2


# ----------------------------------------------------------------------------- quorum / deadline

def test_quorum_deadline_and_extension(env):
    clock = FakeClock()
    srv, fleet, store, _ = env(auto=False, clock=clock, rounds=1, min_devices=2, round_timeout=10.0)
    assert srv.target() == 3  # three devices were online when the plan went out
    wait_for(lambda: fleet.plans, what="plan")
    plan0 = fleet.plans[-1]
    assert plan0.round == 0 and plan0.deadline == pytest.approx(clock.t + 10.0)
    fleet.update("a", 0)
    wait_for(lambda: fleet.acks_of("a"), what="ack a")
    # deadline with 1 < min_devices=2: extended, same round re-published
    clock.t += 11
    srv.poke()
    wait_for(lambda: len(fleet.plans) >= 2, what="re-published plan")
    p = fleet.plans[-1]
    assert p.round == 0 and p.deadline == pytest.approx(clock.t + 10.0)
    assert srv.status()["phase"] == "extended" and srv.round == 0
    fleet.update("b", 0)
    wait_for(lambda: fleet.acks_of("b"), what="ack b")
    time.sleep(0.05)
    assert srv.round == 0  # 2 < target 3 before the deadline
    clock.t += 11
    srv.poke()
    wait_for(lambda: srv.done, what="close at deadline with quorum")
    h = srv.history[0]
    assert h["n_updates"] == 2 and h["devices"] == ["a", "b"] and h["extensions"] == 1
    assert srv.metrics["extensions"] == 1


def test_offline_device_lowers_target(env):
    srv, fleet, store, _ = env(auto=False, rounds=1)
    wait_for(lambda: fleet.plans, what="plan")
    assert srv.target() == 3
    fleet.update("a", 0)
    fleet.update("b", 0)
    wait_for(lambda: len(fleet.acks_of("b")) == 1, what="ack b")
    assert not srv.done
    fleet.announce("c", state="offline")  # c's last will
    wait_for(lambda: srv.done, what="round closes without c")
    assert srv.history[0]["n_updates"] == 2


# ----------------------------------------------------------------------------- idempotency

def test_duplicates_are_idempotent(env):
    srv, fleet, store, _ = env(auto=False, rounds=2, names=("a", "b"))
    wait_for(lambda: fleet.plans, what="plan")
    u = fleet.make_update("a", 0)
    fleet.update("a", 0, upd=u)
    fleet.update("a", 0, upd=u)  # QoS-1 redelivery: same msg_id
    wait_for(lambda: len(fleet.acks_of("a")) == 2, what="two acks")
    a1, a2 = fleet.acks_of("a")
    assert a1.encode() == a2.encode() and a1.status == AckStatus.ACCEPTED
    # a second, different update for the same round: not aggregated
    u2 = fleet.update("a", 0)
    wait_for(lambda: len(fleet.acks_of("a")) == 3, what="third ack")
    assert fleet.acks_of("a")[2].status == AckStatus.DUPLICATE and fleet.acks_of("a")[2].msg_id == u2.msg_id
    fleet.update("b", 0)
    wait_for(lambda: srv.round == 1, what="round 0 closed")
    assert srv.history[0]["n_updates"] == 2
    # after the round closed, the original msg_id still gets its original ACCEPTED ack
    fleet.update("a", 0, upd=u)
    wait_for(lambda: len(fleet.acks_of("a")) == 4, what="fourth ack")
    assert fleet.acks_of("a")[3].encode() == a1.encode()
    rows = [r for r in store.update_log("j") if r["device"] == "a" and r["msg_id"] == u.msg_id]
    assert len(rows) == 1 and rows[0]["accepted"]
    cum, _ = fedkseed_reference(srv.job, [[u, fleet.sent[("b", fleet.acks_of("b")[0].msg_id)]]])
    np.testing.assert_allclose(store.load_state("j", 1)[1].arrays["cum_coeffs"], cum, rtol=1e-6)


def test_late_updates_acked_late_not_aggregated(env):
    srv, fleet, store, _ = env(auto=True, rounds=3, names=("a", "b"))
    wait_for(lambda: srv.round >= 1, what="round 0 closed")
    late = fleet.make_update("a", 0)  # a fresh msg_id for the closed round 0
    srv.run(until_round=2, timeout=5)
    fleet.update("a", 0, upd=late)
    wait_for(lambda: any(x.msg_id == late.msg_id for x in fleet.acks_of("a")), what="late ack")
    ack = [x for x in fleet.acks_of("a") if x.msg_id == late.msg_id][0]
    assert ack.status == AckStatus.LATE and "closed" in ack.reason
    assert srv.run(timeout=10)["done"]
    rows = [r for r in store.update_log("j") if r["msg_id"] == late.msg_id]
    assert len(rows) == 1 and rows[0]["late"] and not rows[0]["accepted"]
    # the state is the recomputation without the late update
    wait_for(lambda: len(fleet.accepted()) == 6, what="all acks")
    by_round = defaultdict(list)
    for u in fleet.accepted():
        by_round[u.round].append(u)
    cum, _ = fedkseed_reference(srv.job, [by_round[r] for r in range(3)])
    np.testing.assert_allclose(store.load_state("j")[1].arrays["cum_coeffs"], cum, rtol=1e-6)
    assert srv.metrics["late"] >= 1


# ----------------------------------------------------------------------------- rejections

def _patched(update: Update, offset_from_end_of_scalars: int, value: float) -> bytes:
    """Encode, overwrite one float32 scalar, and fix the CRC so only the value check fires."""
    b = bytearray(update.encode())
    n = update.tensor(SCALARS).data.size
    # layout tail: scalars tensor's values (n*4, the last tensor) | train_loss f32 (4) | crc (4)
    start = len(b) - 4 - 4 - n * 4
    struct.pack_into("<f", b, start + 4 * offset_from_end_of_scalars, value)
    struct.pack_into("<I", b, len(b) - 4, zlib.crc32(bytes(b[:-4])))
    return bytes(b)


def test_bad_input_rejected_with_reason_and_server_keeps_going(env, caplog):
    caplog.set_level("WARNING", logger="edgefed.server")
    srv, fleet, store, _ = env(auto=False, rounds=1, names=("a", "b"))
    wait_for(lambda: fleet.plans, what="plan")
    good = fleet.make_update("a", 0)
    fleet.raw("a", b"\x00garbage\xff" * 3)
    fleet.raw("a", b"EDGF" + bytes(5 * 1024 * 1024))  # oversize
    fleet.raw("a", _patched(good, 1, float("nan")))
    v1 = bytearray(good.encode())
    v1[4] = 1  # a device of the protocol v1 edgefed
    fleet.raw("a", bytes(v1))
    fleet.update("ghost", 0)  # never announced itself
    fleet.raw("a", fleet.make_update("b", 0).encode())  # b's update on a's topic
    fleet.t.publish(fleet.topics.status("a"), b"not a status")
    wait_for(lambda: len(fleet.acks_of("a")) == 5 and len(fleet.acks_of("ghost")) == 1, what="rejected acks")
    wait_for(lambda: srv.metrics["rejected"].get("status_truncated") == 1, what="status rejected")
    assert all(a.status == AckStatus.REJECTED for a in fleet.acks_of("a") + fleet.acks_of("ghost"))
    rej = srv.metrics["rejected"]
    for label in ("bad_magic", "too_large", "invalid_field", "version", "unknown_device", "topic",
                  "status_truncated"):
        assert rej.get(label) == 1, (label, rej)
    text = caplog.text
    assert "rejected edgefed/v1/j/update/a: not an EdgeFed message" in text
    assert "rejected edgefed/v1/j/update/ghost: unknown device 'ghost'" in text
    assert "protocol version 1 not supported (this build speaks 2)" in text
    assert "is nan" in text.lower()
    # the job still runs: valid updates close the round
    fleet.update("a", 0, upd=good)
    fleet.update("b", 0)
    assert srv.run(timeout=5)["done"]
    assert reason_class(ValueError()) == "internal"


def test_unknown_devices_allowed_when_configured(env):
    srv, fleet, store, _ = env(auto=False, rounds=1, names=("a",), announce=False,
                               server_kwargs={"allow_unknown_devices": True})
    wait_for(lambda: fleet.plans, what="plan")
    fleet.update("a", 0)
    assert srv.run(timeout=5)["done"]
    wait_for(lambda: fleet.acks_of("a"), what="ack")
    assert fleet.acks_of("a")[0].status == AckStatus.ACCEPTED


def test_strategy_validation_rejects(env):
    srv, fleet, store, _ = env(auto=False, rounds=1, names=("a",))
    wait_for(lambda: fleet.plans, what="plan")
    u = fleet.make_update("a", 0)
    too_many = Update(job="j", round=0, device="a", method="fedkseed", msg_id=fleet.ids.next(), num_samples=4,
                      tensors=seed_tensors(np.arange(9), np.ones(9), SCALARS))
    wrong_method = Update(job="j", round=0, device="a", method="fedmezo", msg_id=fleet.ids.next(),
                          num_samples=4, tensors=u.tensors)
    # protocol v2: the seed range is FedKSeed's own check (v1: the wire layer's, label invalid_field)
    out_of_pool = Update(job="j", round=0, device="a", method="fedkseed", msg_id=fleet.ids.next(),
                         num_samples=4, tensors=seed_tensors([64], [1.0], SCALARS))
    # a tensor FedKSeed does not expect (v1: the admission's "u32 only in secure rounds" rule)
    masked = Update(job="j", round=0, device="a", method="fedkseed", msg_id=fleet.ids.next(), num_samples=4,
                    tensors=[*u.tensors, Tensor("masked", np.arange(3, dtype=np.uint32))])
    future = fleet.make_update("a", 5)
    for x in (too_many, wrong_method, out_of_pool, masked, future):
        fleet.update("a", 0, upd=x)
    wait_for(lambda: len(fleet.acks_of("a")) == 5, what="acks")
    assert [a.status for a in fleet.acks_of("a")] == [AckStatus.REJECTED] * 5
    assert srv.metrics["rejected"] == {"strategy": 3, "invalid_field": 1, "future_round": 1}
    assert "out of range for a pool of K=64" in fleet.acks_of("a")[2].reason
    assert "unexpected: ['masked']" in fleet.acks_of("a")[3].reason
    fleet.update("a", 0, upd=u)  # rejected ones are not remembered: a valid one still works
    assert srv.run(timeout=5)["done"]


# ----------------------------------------------------------------------------- sync

def test_sync_replies_delta_and_full(env):
    srv, fleet, store, _ = env(rounds=4, server_kwargs={"history": 2})
    assert srv.run(timeout=10)["done"]
    cum = store.load_state("j")[1].arrays["cum_coeffs"]

    def ask(frm, full=False, rid=1):
        n = len(fleet.replies["a"])
        fleet.t.publish(fleet.topics.sync_request("a"), SyncRequest(job="j", device="a", from_round=frm,
                                                                    full=full, request_id=rid).encode())
        wait_for(lambda: len(fleet.replies["a"]) > n, what="sync reply")
        return fleet.replies["a"][-1]

    r = ask(2, rid=7)  # history_from = 4 - 2 = 2: deltas of rounds 2 and 3
    assert not r.full and r.request_id == 7 and (r.from_round, r.to_round) == (2, 4)
    assert [d.round for d in r.rounds] == [3, 4]  # labelled by the round each delta leads to
    d3 = store.load_delta("j", 3)
    for got, want in zip(r.rounds[1].tensors, d3.tensors):
        assert (got.name, got.dtype) == (want.name, want.dtype) and np.array_equal(got.data, want.data)
    r = ask(4)
    assert not r.full and r.rounds == [] and r.to_round == 4
    r = ask(1)  # older than history_from
    assert r.full and r.to_round == 4
    np.testing.assert_allclose(r.state[0].data, cum.astype(np.float32))
    r = ask(3, full=True)
    assert r.full and r.state[0].name == "cum_coeffs"
    r = ask(9)  # ahead of the server
    assert r.full
    # a device replaying all deltas from 0 reaches the full state
    srv.history_limit = None
    r = ask(0)
    assert [d.round for d in r.rounds] == [1, 2, 3, 4]
    acc = np.zeros_like(cum)
    for d in r.rounds:
        seeds, coeffs = seed_pairs(d.tensors, COEFFS, "delta")
        acc[seeds.astype(np.int64)] += coeffs.astype(np.float64)
    np.testing.assert_allclose(acc, cum, rtol=1e-6, atol=1e-12)
    wait_for(lambda: fleet.states and fleet.states[-1].params.get("done") == 1, what="final JobState")
    assert fleet.states[-1].history_from == 2


# ----------------------------------------------------------------------------- store

def test_store_codecs_round_trip(tmp_path):
    arrays = {"f64": np.linspace(-1, 1, 7), "i64": np.arange(5, dtype=np.int64) - 2,
              "u32": np.array([0, 2 ** 32 - 1], np.uint32), "m": np.ones((2, 3), np.float32),
              "b": np.array([True, False]), "big": np.arange(3, dtype=">f4")}
    meta, blob = pack_arrays(arrays)
    back = unpack_arrays(meta, blob)
    for k, v in arrays.items():
        assert back[k].shape == v.shape and np.array_equal(back[k], v)
    with pytest.raises(Exception):
        pack_arrays({"o": np.array([object()])})
    d = RoundDelta(round=3, tensors=[*seed_tensors([1, 5], [0.5, -1], COEFFS), Tensor("lora.A", np.ones((2, 2))),
                                     Tensor.bf16("h", np.array([1.5, -2.25], np.float32))])
    d2 = decode_delta(*encode_delta(d))
    assert d2.round == 3 and [t.name for t in d2.tensors] == ["seeds", "coeffs", "lora.A", "h"]
    for a, b in zip(d.tensors, d2.tensors):  # every tensor with its wire dtype, bit for bit
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.data, b.data)
    for v in (0, 1, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1):
        assert i64_to_u64(u64_to_i64(v)) == v and -(2 ** 63) <= u64_to_i64(v) < 2 ** 63
    s = Store(tmp_path / "x.db")
    cfg = JobConfig(job="x", method="fedkseed", k=8, params={"pro": 1})
    st = MethodState({"rounds_aggregated": 0}, {"cum_coeffs": np.zeros(8)})
    s.start_job(cfg, st, b"plan0", 10.0, 1.0)
    assert s.load_job("x") == cfg
    s.insert_update("x", 0, "dev", 2 ** 64 - 5, 1.5, b"raw", AckStatus.ACCEPTED, accepted=True)
    assert s.find_update("x", "dev", 2 ** 64 - 5)["accepted"]
    with pytest.raises(Exception):  # UNIQUE(job, device, msg_id)
        s.insert_update("x", 0, "dev", 2 ** 64 - 5, 1.5, b"raw", AckStatus.ACCEPTED, accepted=True)
    assert s.accepted_updates("x", 0) == [("dev", 2 ** 64 - 5, b"raw")]
    st1 = MethodState({"rounds_aggregated": 1}, {"cum_coeffs": np.arange(8.0)})
    s.commit_round("x", 0, st1, d, 2.0, 1, {"loss": 0.5}, b"plan1", 20.0)
    with pytest.raises(Exception):  # closing a closed round is refused, and leaves no trace
        s.commit_round("x", 0, st1, d, 2.0, 1, {}, b"plan1", 20.0)
    info = s.load_resume("x")
    assert info.round == 1 and info.plan == b"plan1" and info.deadline == 20.0
    assert compare_states(info.state, st1) == [] and info.history[0]["loss"] == 0.5
    s.close()
    s2 = Store(tmp_path / "x.db")  # reopen: everything is on disk
    assert s2.load_resume("x").round == 1 and s2.load_delta("x", 0).round == 3
    s2.close()


def _v1_store(path, job="old"):
    """A store as protocol v1 left it: plans with header version 1, a delta with seeds / coeffs arrays."""
    from edgefed.protocol import RoundPlan
    s = Store(path)
    cfg = JobConfig(job=job, method="fedkseed", rounds=3, k=8)
    plan = bytearray(RoundPlan(job, 0, "fedkseed").encode())
    plan[4] = 1
    struct.pack_into("<I", plan, len(plan) - 4, zlib.crc32(bytes(plan[:-4])))
    st = MethodState({"rounds_aggregated": 0}, {"cum_coeffs": np.zeros(8)})
    s.start_job(cfg, st, bytes(plan), 10.0, 1.0)
    meta, blob = pack_arrays({"seeds": np.array([1], np.uint32), "coeffs": np.array([0.5], np.float32)})
    with s.transaction() as c:
        c.execute("UPDATE rounds SET status='closed', delta_meta=?, delta=? WHERE job=? AND round=0",
                  (json.dumps({"round": 0, "arrays": json.loads(meta), "tensors": []}), blob, job))
        s.save_state(job, 1, st, 2.0)
        s.open_round(job, 1, bytes(plan), 20.0, 2.0)
    return s, cfg


def test_a_store_written_by_protocol_v1_is_not_resumed(tmp_path, capsys):
    from edgefed_server.cli import main as server_main
    from edgefed_server.store import IncompatibleJob, StoreError
    store, cfg = _v1_store(tmp_path / "v1.db")
    assert store.stored_protocol("old") == 1
    with pytest.raises(IncompatibleJob, match="stored by EdgeFed protocol v1; this server speaks protocol v2") as e:
        store.load_resume("old")
    assert "Finish the job with the edgefed version that started it" in str(e.value)
    assert "start a new job" in str(e.value)
    with pytest.raises(StoreError, match="written by EdgeFed protocol v1"):
        store.load_delta("old", 0)
    with pytest.raises(IncompatibleJob):
        replay_log(store, "old")
    with pytest.raises(IncompatibleJob):  # the engine refuses it too, before publishing anything
        Server(InProcBroker().client("server"), store, cfg, settle=0.0).start()
    store.close()
    # the CLI says what to do, without a traceback
    rc = server_main(["--job", "old", "--db", str(tmp_path / "v1.db"), "--resume", "--broker", "mqtt://127.0.0.1:1"])
    err = capsys.readouterr().err
    assert rc == 2 and "stored by EdgeFed protocol v1" in err and "start a new job" in err


def test_resume_mid_round_no_double_count(env, tmp_path):
    srv, fleet, store, broker = env(auto=False, rounds=2, names=("a", "b", "c"))
    wait_for(lambda: fleet.plans, what="plan")
    ua = fleet.update("a", 0)
    wait_for(lambda: fleet.acks_of("a"), what="ack a")
    srv.stop()  # "crash" after a's update was acked
    srv2 = Server(broker.client("server2"), store, srv.job, settle=0.02).start()
    try:
        assert srv2.round == 0 and set(srv2.accepted) == {"a"}
        fleet.update("a", 0, upd=ua)  # the retry of an acked update: same ack, not counted twice
        fleet.update("b", 0)
        fleet.update("c", 0)
        wait_for(lambda: srv2.round == 1, what="round 0 closed after resume")
        assert srv2.history[-1]["n_updates"] == 3
        fleet.auto = {"a", "b", "c"}
        fleet.update("a", 1), fleet.update("b", 1), fleet.update("c", 1)
        assert srv2.run(timeout=5)["done"]
        rep = replay_log(store, "j")
        assert rep.n_updates == [3, 3]
        assert compare_states(rep.state, store.load_state("j")[1]) == []
    finally:
        srv2.stop()
    # a finished job resumes as finished
    srv3 = Server(broker.client("server3"), store, srv.job, settle=0.0).start()
    assert srv3.done and srv3.run(timeout=1)["done"]
    srv3.stop()


def test_listener_and_synchronous_inproc(tmp_path):
    """The engine also runs on the synchronous in-process broker (callbacks only enqueue)."""
    broker = InProcBroker(synchronous=True)
    store = Store(tmp_path / "s.db")
    job = JobConfig(job="s", method="fedkseed", rounds=3, k=32, local_steps=2, batch_size=10)  # fake devices claim up to 19 samples
    fleet = Fleet(broker, "s", ["a", "b"], k=32, steps=2)
    fleet.announce()
    srv = Server(broker.client("server"), store, job, settle=0.0)
    seen = []
    srv.add_round_listener(lambda s: seen.append(s["round"]))
    out = srv.run(timeout=10)
    srv.stop()
    store.close()
    assert out["done"] and seen == [0, 1, 2]


# ----------------------------------------------------------------------------- HTTP

def test_http_status_metrics_and_page(env):
    srv, fleet, store, _ = env(rounds=2, server_kwargs={"http_port": 0})
    assert srv.run(timeout=10)["done"]
    fleet.raw("a", b"junk")
    wait_for(lambda: srv.metrics["rejected"].get("truncated") == 1, what="junk rejected")
    base = f"http://127.0.0.1:{srv.http_port}"
    st = json.loads(urllib.request.urlopen(base + "/status", timeout=5).read())
    assert st["job"]["job"] == "j" and st["round"] == 2 and st["phase"] == "done"
    assert len(st["history"]) == 2 and st["history"][0]["n_updates"] == 3
    assert {d["device"] for d in st["devices"]} == {"a", "b", "c"} and st["devices"][0]["state"] == "online"
    for key in ("deadline", "devices_online", "strategy", "metrics"):
        assert key in st
    resp = urllib.request.urlopen(base + "/metrics", timeout=5)
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = resp.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert line.startswith("# HELP ") or line.startswith("# TYPE ")
            continue
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    assert samples['edgefed_round{job="j"}'] == 2
    assert samples['edgefed_updates_accepted_total{job="j"}'] == 6
    assert samples['edgefed_updates_rejected_total{job="j",reason="truncated"}'] == 1
    assert samples['edgefed_devices_online{job="j"}'] == 3
    assert samples['edgefed_bytes_received_total{job="j"}'] > 0
    assert samples['edgefed_round_duration_seconds_count{job="j"}'] == 2
    assert 0 < samples['edgefed_train_loss{job="j"}'] < 1
    assert "# TYPE edgefed_updates_rejected_total counter" in text
    page = urllib.request.urlopen(base + "/", timeout=5).read().decode()
    assert page.startswith("<!doctype html>") and "<canvas" in page and "fetch(\"status\"" in page
    assert "http" not in page.split("<script>")[1].split("fetch")[0]  # no CDN, inline only
    assert "NaN" in render_metrics({"job": "x", "train_loss": float("nan")})


def test_resume_after_deadline_closes_with_quorum_else_extends(env):
    clock = FakeClock()
    srv, fleet, store, broker = env(auto=False, clock=clock, rounds=3, min_devices=1, round_timeout=10.0)
    wait_for(lambda: fleet.plans, what="plan")
    fleet.update("a", 0)
    wait_for(lambda: fleet.acks_of("a"), what="ack a")
    srv.stop()
    clock.t += 60  # the server was down past the deadline; a's update gives quorum
    srv2 = Server(broker.client("server2"), store, srv.job, clock=clock, settle=0.0).start()
    try:
        assert srv2.round == 1 and srv2.history[-1]["devices"] == ["a"]
    finally:
        srv2.stop()
    clock.t += 60  # round 1 has nothing: below quorum, so it is extended, not closed
    srv3 = Server(broker.client("server3"), store, srv.job, clock=clock, settle=0.0).start()
    try:
        assert srv3.round == 1 and srv3.deadline == pytest.approx(clock.t + 10.0)
        assert srv3.extensions == 1
    finally:
        srv3.stop()
