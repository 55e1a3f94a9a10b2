"""Streaming aggregation: the engine feeds each accepted update to the round's accumulator
(ServerStrategy.start_round) once, in arrival order, keeps only metadata itself, and a resume
or a replay feeds a fresh accumulator the same sequence (the store keeps arrival order)."""
from __future__ import annotations

import gc
import threading
import weakref

import numpy as np

from edgefed.methods import JobConfig, MethodState
from edgefed.methods.base import RoundAccumulator
from edgefed.methods.fedkseed import SCALARS, FedKSeedServer, seed_pairs
from edgefed.protocol import AckStatus, Update
from edgefed.transport import InProcBroker
from edgefed_server.engine import Server
from edgefed_server.replay import compare_states, replay_log
from edgefed_server.store import Store
from test_server import Fleet, wait_for


class StreamingAcc(RoundAccumulator):
    """FedKSeed's sample-weighted mean as running sums: holds no Update, only a weak reference
    to each (so the test can tell whether anyone else still holds it). The arrival order goes
    into the state, so replaying in any other order would give a different state."""

    def __init__(self, strategy: "StreamingKSeed", job, state: MethodState, plan):
        self.strategy, self.job, self.state, self.plan = strategy, job, state.copy(), plan
        self.sums = np.zeros(int(job.k), np.float64)
        self.total = 0
        self.order: list = []
        self.finalized = 0

    def add(self, update: Update) -> None:
        seeds, scalars = seed_pairs(update.tensors, SCALARS, "update")
        idx = seeds.astype(np.int64)
        g = scalars.astype(np.float64)
        np.add.at(self.sums, idx, update.num_samples * g)
        np.add.at(self.state.arrays["abs_sum"], idx, np.abs(g))
        np.add.at(self.state.arrays["counts"], idx, 1)
        self.total += int(update.num_samples)
        self.order.append(update.device)
        with self.strategy.lock:
            self.strategy.seen.append((self.plan.round, update.device, int(update.msg_id)))
            self.strategy.refs.append(weakref.ref(update))

    def finalize(self):
        self.finalized += 1
        with self.strategy.lock:
            self.strategy.finalized.append(self.plan.round)
        state = self.state.copy()
        state.scalars["order"] = ",".join(self.order)
        return self.strategy._apply(self.job, state, self.plan, self.sums / self.total)


class StreamingKSeed(FedKSeedServer):
    def __init__(self):
        self.lock = threading.Lock()
        self.seen: list = []       # (round, device, msg_id) per add()
        self.refs: list = []       # weak references to every Update added
        self.finalized: list = []  # round per finalize()

    def start_round(self, job, state, plan):
        return StreamingAcc(self, job, state, plan)


def _job(**kw):
    cfg = {"rounds": 2, "k": 64, "local_steps": 4, "min_devices": 1, "round_timeout": 30.0, **kw}
    return JobConfig(job="j", method="fedkseed", **cfg)


def _send_in_order(fleet, names, rnd):
    """One update per device, each acked before the next goes out (a fixed arrival order)."""
    for n in names:
        before = len(fleet.acks_of(n))
        fleet.update(n, rnd)
        wait_for(lambda: len(fleet.acks_of(n)) > before, what=f"ack of {n}")


def test_accumulator_sees_each_accepted_update_once_in_arrival_order(tmp_path):
    broker = InProcBroker()
    store = Store(tmp_path / "s.db")
    fleet = Fleet(broker, "j", ["a", "b", "c"], auto=False)
    fleet.announce()
    strat = StreamingKSeed()
    srv = Server(broker.client("server"), store, _job(), strategy=strat, settle=0.02).start()
    try:
        wait_for(lambda: fleet.plans, what="plan 0")
        _send_in_order(fleet, ["c", "a"], 0)
        ua = fleet.sent[("a", fleet.acks_of("a")[-1].msg_id)]
        fleet.update("a", 0, upd=ua)        # a redelivery: acked again, not added again
        fleet.update("a", 0)                # a second update in the round: DUPLICATE, not added
        wait_for(lambda: len(fleet.acks_of("a")) == 3, what="acks of a's extra updates")
        assert [a.status for a in fleet.acks_of("a")] == [AckStatus.ACCEPTED, AckStatus.ACCEPTED,
                                                          AckStatus.DUPLICATE]
        assert srv.wait_idle()
        with srv._lock:
            assert set(srv.accepted) == {"c", "a"} and srv.round == 0
            # the engine keeps metadata, not the Update
            assert not any(isinstance(v, Update) for entry in srv.accepted.values() for v in entry)
            assert srv.accepted["a"][0].msg_id == ua.msg_id
        gc.collect()
        # nobody but the accumulator ever held the decoded Updates, and it holds none
        assert len(strat.refs) == 2 and all(r() is None for r in strat.refs)
        _send_in_order(fleet, ["b"], 0)
        wait_for(lambda: srv.round == 1, what="round 0 closed")
        assert strat.finalized == [0]
        assert [(r, d) for r, d, _ in strat.seen] == [(0, "c"), (0, "a"), (0, "b")]
        _send_in_order(fleet, ["b", "c", "a"], 1)
        assert srv.run(timeout=10)["done"]
        assert strat.finalized == [0, 1]
        assert [(r, d) for r, d, _ in strat.seen][3:] == [(1, "b"), (1, "c"), (1, "a")]
        assert len({(d, m) for _, d, m in strat.seen}) == 6  # each accepted update once
        _, state = store.load_state("j")
        assert state.scalars["order"] == "b,c,a"
        assert srv.history[0]["devices"] == ["a", "b", "c"] and srv.history[0]["n_updates"] == 3
        # the replay feeds the stored log in arrival order: the same state, bit for bit
        rep = replay_log(store, "j", strategy=StreamingKSeed())
        assert rep.n_updates == [3, 3] and compare_states(rep.state, state) == []
    finally:
        srv.stop()
        store.close()


def test_resume_re_adds_the_open_rounds_updates_in_arrival_order(tmp_path):
    broker = InProcBroker()
    store = Store(tmp_path / "s.db")
    fleet = Fleet(broker, "j", ["a", "b", "c"], auto=False)
    fleet.announce()
    srv = Server(broker.client("server"), store, _job(rounds=1), strategy=StreamingKSeed(),
                 settle=0.02).start()
    wait_for(lambda: fleet.plans, what="plan 0")
    _send_in_order(fleet, ["c", "a"], 0)
    srv.stop()  # "crash" with two accepted updates in the open round
    strat = StreamingKSeed()
    srv2 = Server(broker.client("server2"), store, srv.job, strategy=strat, settle=0.02).start()
    try:
        assert [d for _, d, _ in strat.seen] == ["c", "a"]  # re-added from the store, in order
        _send_in_order(fleet, ["b"], 0)
        assert srv2.run(timeout=10)["done"]
        assert [d for _, d, _ in strat.seen] == ["c", "a", "b"] and strat.finalized == [0]
        _, state = store.load_state("j")
        assert state.scalars["order"] == "c,a,b"
        assert compare_states(replay_log(store, "j", strategy=StreamingKSeed()).state, state) == []
    finally:
        srv2.stop()
        store.close()


class FailingOnce(StreamingKSeed):
    """add() raises once for device `bad` after touching its sums; finalize() raises once."""

    def __init__(self, bad="b"):
        super().__init__()
        self.bad, self.add_failed, self.finalize_failed = bad, False, False

    def start_round(self, job, state, plan):
        acc = super().start_round(job, state, plan)
        add, fin = acc.add, acc.finalize

        def failing_add(u):
            add(u)
            if u.device == self.bad and not self.add_failed:
                self.add_failed = True
                raise ValueError("boom")

        def failing_finalize():
            if not self.finalize_failed:
                self.finalize_failed = True
                raise ValueError("finalize boom")
            return fin()

        acc.add, acc.finalize = failing_add, failing_finalize
        return acc


def test_a_failing_add_or_finalize_leaves_no_partial_sums(tmp_path):
    from test_server import FakeClock
    broker = InProcBroker()
    store = Store(tmp_path / "s.db")
    fleet = Fleet(broker, "j", ["a", "b"], auto=False)
    fleet.announce()
    strat = FailingOnce()
    clock = FakeClock()
    srv = Server(broker.client("server"), store, _job(rounds=1), strategy=strat, settle=0.02,
                 clock=clock).start()
    try:
        wait_for(lambda: fleet.plans, what="plan 0")
        _send_in_order(fleet, ["a", "b"], 0)
        assert fleet.acks_of("b")[-1].status == AckStatus.REJECTED  # the add() raised
        assert srv.wait_idle()
        with srv._lock:
            assert set(srv.accepted) == {"a"} and srv.round == 0
        assert [u["device"] for u in store.update_log("j") if u["accepted"]] == ["a"]
        # the deadline with quorum (1): finalize() raises once, the round stays open, and the
        # next deadline check closes it with a fresh accumulator rebuilt from the store
        clock.t += 31
        srv.poke()
        assert srv.run(timeout=10)["done"]
        assert strat.finalize_failed and "aggregation of round 0 failed" in (srv.error or "")
        assert strat.finalized == [0] and [d for _, d, _ in strat.seen] == ["a", "b", "a", "a"]
        _, state = store.load_state("j")
        assert state.scalars["order"] == "a"  # b's partial add was dropped with its row
        assert compare_states(replay_log(store, "j", strategy=StreamingKSeed()).state, state) == []
    finally:
        srv.stop()
        store.close()
