"""Bounds on what one device can send, and robust aggregation (edgefed.security.robust)."""
from __future__ import annotations

import time

import numpy as np
import pytest

from edgefed.agent import DeviceAgent
from edgefed.data import iid_split, load_rotten_tomatoes, train_heldout_split
from edgefed.federation import run_federation
from edgefed.methods import JobConfig, get_method
from edgefed.methods.fedkseed import SCALARS, FedKSeedServer, seed_tensors
from edgefed.methods.fedmezo import FedMeZOServer, delta_norm_bound
from edgefed.protocol import AckStatus, InvalidField, RoundPlan, Tensor, Update, validate_update
from edgefed.runtime import DeviceModel
from edgefed.simulate import thread_devices
from edgefed.security.robust import (RobustConfig, aggregate_dense, aggregate_sparse, krum, krum_scores,
                                     median, min_voters, multi_krum, trim_count, trimmed_mean)


def corrupt(x: np.ndarray, attack: str, rng: np.random.Generator) -> np.ndarray:
    g = x.astype(np.float64)
    if attack == "scale":
        g = g * 1e3
    elif attack == "flip":
        g = -g
    else:
        g = rng.normal(0.0, 100.0 * (float(np.abs(g).mean()) or 1.0), g.size)
    return g.astype(np.float32)


class ByzantineAgent(DeviceAgent):
    """A device that trains honestly and applies every delta honestly (so it stays on the global
    model), but reports a corrupted result: FedKSeed scalars / FedMeZO deltas scaled x1e3
    ('scale'), sign-flipped ('flip') or replaced by noise 100x their mean size ('random')."""
    attack = "scale"

    def _serve(self, plan):
        if not getattr(self._client, "byzantine", False):
            client = get_method(plan.method).client()  # the agent keeps a client of the exact class
            honest = client.local_train
            rng = np.random.default_rng(1234)

            def local_train(model, examples, plan, seed, progress=False):
                res = honest(model, examples, plan, seed, progress)
                # the values, not the indices: FedKSeed's u32 "seeds" stay, its "scalars" are corrupted
                res.tensors = [t if t.dtype == "u32" else Tensor(t.name, corrupt(t.data, self.attack, rng))
                               for t in res.tensors]
                return res
            client.local_train = local_train
            client.byzantine = True
            self._client = client
        super()._serve(plan)


def byzantine_devices(base, job: str, shards, attackers=(), attack="scale"):
    """edgefed.simulate.thread_devices with ByzantineAgent (running `attack`) at the indices in
    `attackers` and honest DeviceAgents elsewhere."""
    attacker = type(f"Byzantine_{attack}", (ByzantineAgent,), {"attack": attack})
    return thread_devices(base, job, shards,
                          agent_cls=[attacker if i in attackers else DeviceAgent for i in range(len(shards))])


# ----------------------------------------------------------------------------- aggregators

def test_dense_aggregators_by_hand():
    ups = [np.array([1.0, 10.0, -1.0]), np.array([2.0, 20.0, -2.0]), np.array([3.0, 30.0, -3.0]),
           np.array([4.0, 40.0, -4.0]), np.array([1000.0, -1000.0, 1000.0])]
    np.testing.assert_array_equal(median(ups), [3.0, 20.0, -2.0])
    np.testing.assert_array_equal(median(ups[:4]), [2.5, 25.0, -2.5])  # even: mean of the middle two
    # trim 0.2 of 5: one dropped at each end -> the middle three
    np.testing.assert_allclose(trimmed_mean(ups, 0.2), [3.0, 20.0, -2.0])
    np.testing.assert_allclose(trimmed_mean(ups, 0.4), median(ups))       # two at each end: the median
    np.testing.assert_allclose(trimmed_mean(ups, 0.0), np.mean(ups, axis=0))
    assert trim_count(5, 0.2) == 1 and trim_count(4, 0.2) == 0 and trim_count(10, 0.49) == 4
    # Krum, f=1: n - f - 2 = 2 nearest neighbours. Points on a line 0,1,2,3 and an outlier at 100.
    pts = [np.array([float(x), 0.0]) for x in (0, 1, 2, 3, 100)]
    # scores: 0 -> 1+4, 1 -> 1+1, 2 -> 1+1, 3 -> 1+4, 100 -> 97^2+98^2
    np.testing.assert_array_equal(krum_scores(pts, 1), [5.0, 2.0, 2.0, 5.0, 97.0 ** 2 + 98.0 ** 2])
    np.testing.assert_array_equal(krum(pts, 1), [1.0, 0.0])               # tie -> first in order
    np.testing.assert_array_equal(multi_krum(pts, 1), [1.5, 0.0])         # m = n - f = 4: 0,1,2,3
    np.testing.assert_array_equal(multi_krum(pts, 1, m=2), [1.5, 0.0])    # 1 and 2
    # order independence (the engine's device order is fixed anyway)
    rev = ups[::-1]
    assert np.array_equal(median(rev), median(ups)) and np.array_equal(trimmed_mean(rev), trimmed_mean(ups))
    # the mean is today's sample-weighted mean, bit for bit
    cfg = RobustConfig.from_params({}, dense=True)
    w = [3, 1, 1, 1, 2]
    ref = None
    for u, n in zip(ups, w):
        d = u.astype(np.float64) * (n / 8.0)
        ref = d if ref is None else ref + d
    assert np.array_equal(aggregate_dense(ups, w, cfg), ref)
    # norm clipping before aggregation
    c = RobustConfig.from_params({"aggregator": "mean", "norm_clip": 5.0}, dense=True)
    np.testing.assert_allclose(aggregate_dense([np.array([3.0, 4.0]), np.array([30.0, 40.0])], [1, 1], c),
                               [3.0, 4.0])
    # krum with too few updates for its guarantee (n < 2f + 3) falls back to the median
    k = RobustConfig.from_params({"aggregator": "krum", "byzantine": 1}, dense=True)
    np.testing.assert_array_equal(aggregate_dense(ups[:4], [1] * 4, k), median(ups[:4]))


def test_sparse_per_seed_aggregation_by_hand():
    med = RobustConfig.from_params({"aggregator": "median"}, dense=False)
    seeds = [np.array([1, 2, 3], np.uint32), np.array([1, 2], np.uint32), np.array([5, 1, 2], np.uint32)]
    vals = [np.array([1.0, 2.0, 3.0]), np.array([3.0, 4.0]), np.array([7.0, 100.0, 2.0])]
    a = aggregate_sparse(8, seeds, vals, med)
    # seed 1: median(1, 3, 100) = 3, 3 of 3 devices; seed 2: median(2, 4, 2) = 2.
    # seeds 3 and 5 have one device each (< 3): clipped to 3 x median|all values| = 3 x 3 = 9, / n=3
    np.testing.assert_allclose(a.value, [0, 3.0, 2.0, 1.0, 0, 7.0 / 3, 0, 0])
    np.testing.assert_array_equal(a.voters, [0, 3, 3, 1, 0, 1, 0, 0])
    # an outlier alone on its seed: |values| 1 2 2 3 4 7 100 300 -> median 3.5 -> clip at 10.5
    a = aggregate_sparse(8, seeds, [np.array([1.0, 2.0, 300.0])] + vals[1:], med)
    assert a.value[3] == 10.5 / 3 and a.value[1] == 3.0
    drop = RobustConfig.from_params({"aggregator": "median", "sparse_clip": 0}, dense=False)
    a = aggregate_sparse(8, seeds, vals, drop)
    np.testing.assert_allclose(a.value, [0, 3.0, 2.0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(a.voters, [0, 3, 3, 0, 0, 0, 0, 0])
    # trimmed mean, trim 0.2: a seed needs 5 devices to drop one at each end
    tm = RobustConfig.from_params({"aggregator": "trimmed_mean", "trim": 0.2}, dense=False)
    assert min_voters(tm) == 5 and min_voters(med) == 3
    s5 = [np.array([0, 1], np.uint32)] * 5
    v5 = [np.array([x, 1.0]) for x in (1.0, 2.0, 3.0, 4.0, -500.0)]
    a = aggregate_sparse(2, s5, v5, tm)
    assert a.value[0] == (1.0 + 2.0 + 3.0) / 3 and a.value[1] == 1.0
    # a seed listed twice by one device is one vote, with the sum (as the mean adds them)
    a = aggregate_sparse(4, [np.array([2, 2, 1]), np.array([2]), np.array([2])],
                         [np.array([1.0, 1.0, 5.0]), np.array([2.0]), np.array([9.0])], med)
    assert a.value[2] == 2.0 and a.voters[2] == 3
    # independent of the device order
    b1 = aggregate_sparse(8, seeds, vals, med)
    b2 = aggregate_sparse(8, seeds[::-1], vals[::-1], med)
    assert np.array_equal(b1.value, b2.value)


def test_aggregator_params_are_checked():
    for bad in ({"aggregator": "krum"}, {"aggregator": "bogus"}, {"aggregator": "median", "trim": 0.6},
                {"aggregator": "trimmed_mean", "trim": -0.1}, {"norm_clip": -1}, {"sparse_clip": "x"}):
        with pytest.raises(ValueError):
            RobustConfig.from_params(bad, dense=False)
    with pytest.raises(ValueError, match="dense"):
        FedKSeedServer().init_state(JobConfig(job="j", method="fedkseed", k=8, params={"aggregator": "krum"}))
    with pytest.raises(ValueError, match="scalar_bound"):
        FedKSeedServer().init_state(JobConfig(job="j", method="fedkseed", k=8, params={"clip": 1e5}))
    FedMeZOServer().init_state(JobConfig(job="j", method="fedmezo", params={"aggregator": "multi_krum",
                                                                           "byzantine": 2}))


# ----------------------------------------------------------------------------- bounds

def _plan(strategy, job, rnd=0):
    state = strategy.init_state(job)
    pf = strategy.plan_round(job, state, rnd)
    return state, RoundPlan(job=job.job, round=rnd, method=job.method, lr=pf.lr, local_steps=pf.local_steps,
                            batch_size=pf.batch_size, params=pf.params, tensors=pf.tensors)


def _ks_update(plan, seeds, scalars, n=8, device="evil"):
    return Update(job=plan.job, round=plan.round, device=device, method=plan.method, msg_id=1,
                  num_samples=n, tensors=seed_tensors(seeds, scalars, SCALARS))


def test_issue_9_update_is_rejected_with_its_reason():
    """The measured attack: one update, num_samples = 2^32-1, a finite scalar of 3.4e38."""
    job = JobConfig(job="j", method="fedkseed", k=64, local_steps=10, batch_size=8)
    srv = FedKSeedServer()
    state, plan = _plan(srv, job)
    evil = _ks_update(plan, [3], [3.4e38], n=2 ** 32 - 1)
    assert len(evil.encode()) < 120  # the ~103-byte message of the issue
    validate_update(evil, plan)  # the protocol alone lets it through: finite, in range
    with pytest.raises(InvalidField, match=r"num_samples=4294967295.*local_steps 10 x batch_size 8 = 80"):
        srv.validate_update(job, state, plan, evil)
    evil.num_samples = 80
    with pytest.raises(InvalidField, match=r"scalar 3\.4e\+38 for seed index 3 is out of bounds.*scalar_bound 10000"):
        srv.validate_update(job, state, plan, evil)
    # the per-probe budget: 10 probes of |g| <= 1e4 over 2 seeds -> one seed sums at most 9
    srv.validate_update(job, state, plan, _ks_update(plan, [1, 2], [9e4, -1e4]))
    with pytest.raises(InvalidField, match="out of bounds"):
        srv.validate_update(job, state, plan, _ks_update(plan, [1, 2], [9.1e4, 1.0]))
    with pytest.raises(InvalidField, match=r"sum of \|scalars\| 110000 is out of bounds.* at most 100000"):
        srv.validate_update(job, state, plan, _ks_update(plan, [1, 2, 3], [5e4, 4e4, 2e4]))
    # with a device-side clip the server enforces it too
    clipped = JobConfig(job="j", method="fedkseed", k=64, local_steps=10, batch_size=8, params={"clip": 5.0})
    state, plan = _plan(srv, clipped)
    srv.validate_update(clipped, state, plan, _ks_update(plan, list(range(10)), [5.0] * 10))
    with pytest.raises(InvalidField, match=r"\|g\| <= clip 5"):
        srv.validate_update(clipped, state, plan, _ks_update(plan, list(range(10)), [5.0] * 9 + [5.1]))
    # NaN / inf never get that far: the protocol refuses them (any float tensor, naming it and the index)
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(InvalidField, match=r"\(scalars\) flat index \[0\] is .* \(must be finite\)"):
            validate_update(_ks_update(plan, [1], [bad]), plan)


def test_fedmezo_bounds():
    job = JobConfig(job="j", method="fedmezo", lr=1e-3, local_steps=4, batch_size=8)
    srv = FedMeZOServer()
    state, plan = _plan(srv, job)

    def upd(delta, n=8):
        return Update(job="j", round=0, device="d", method="fedmezo", msg_id=1, num_samples=n,
                      tensors=[Tensor("delta", np.asarray(delta, np.float32))])
    n = 100
    bound = delta_norm_bound(job, plan, n)
    assert bound == pytest.approx(1e-3 * 1e4 * 4 * (10 + 10) * 1.001, rel=1e-3)
    srv.validate_update(job, state, plan, upd(np.full(n, 0.01)))
    with pytest.raises(InvalidField, match="num_samples=4294967295"):
        srv.validate_update(job, state, plan, upd(np.full(n, 0.01), n=2 ** 32 - 1))
    with pytest.raises(InvalidField, match="delta L2 norm .* exceeds the bound"):
        srv.validate_update(job, state, plan, upd(np.full(n, 3.4e38)))
    with pytest.raises(InvalidField, match="non-finite"):
        srv.validate_update(job, state, plan, upd(np.r_[np.zeros(n - 1), np.nan]))
    tight = JobConfig(job="j", method="fedmezo", lr=1e-3, local_steps=4, params={"update_norm_bound": 0.5})
    with pytest.raises(InvalidField, match=r"update_norm_bound"):
        srv.validate_update(tight, state, plan, upd(np.full(n, 0.1)))  # norm 1.0


def test_engine_rejects_the_issue_9_update(tmp_path):
    """End to end through the engine: a rejected Ack carrying the bound as its reason."""
    from edgefed.protocol import Status, Topics, decode
    from edgefed.transport import InProcBroker
    from edgefed_server.engine import Server
    from edgefed_server.store import Store

    broker = InProcBroker()
    job = JobConfig(job="j9", method="fedkseed", rounds=2, k=64, local_steps=10, batch_size=8,
                    min_devices=1, round_timeout=30.0)
    topics = Topics("j9")
    dev = broker.client("evil")
    dev.connect()
    acks = []
    dev.subscribe(topics.base + "/ack/+", lambda t, p: acks.append(decode(p)))
    dev.publish(topics.status("evil"), Status(job="j9", device="evil", state="online",
                                              timestamp=time.time()).encode(), retain=True)
    store = Store(tmp_path / "s.db")
    srv = Server(broker.client("server"), store, job, settle=0.02).start()
    try:
        evil = Update(job="j9", round=0, device="evil", method="fedkseed", msg_id=1, num_samples=2 ** 32 - 1,
                      tensors=seed_tensors([3], [3.4e38], SCALARS))
        dev.publish(topics.update("evil"), evil.encode())
        end = time.monotonic() + 5
        while not acks and time.monotonic() < end:
            time.sleep(0.01)
        assert acks and acks[0].status == AckStatus.REJECTED
        assert "num_samples=4294967295" in acks[0].reason and srv.round == 0
    finally:
        srv.stop()
        store.close()


# ----------------------------------------------------------------------------- Byzantine job

@pytest.fixture(scope="module")
def data():
    train, held = train_heldout_split(load_rotten_tomatoes(), heldout=30, seed=0)
    return train[:400], held


def _run(tiny_artifacts, data, tmp_path, name, method, aggregator, *, attackers=(), attack="scale", k=4,
         extra=None):
    """5 devices (iid shards), 4 rounds of 12 local steps; device 2 Byzantine when attacked."""
    train, held = data
    art = tiny_artifacts["lora"]
    job = JobConfig(job=name, method=method, artifact=str(art), rounds=4, devices_per_round=5, min_devices=5,
                    round_timeout=60.0, lr=1e-2, eps=1e-3, local_steps=12, batch_size=8, k=k, seed_pool_id=7,
                    params={"aggregator": aggregator, **(extra or {})})
    base = DeviceModel(art, threads=1, batch_size=8, seq_len=32, check_memory=False)
    starter = byzantine_devices(base, name, iid_split(train, 5), attackers, attack)
    res = run_federation(job, art, held, broker_url=f"inproc://{name}", start_devices=starter,
                         out_dir=tmp_path / name, eval_n=len(held), eval_every=100, progress=False)
    assert res.rounds_completed == 4
    for agent in starter.agents:  # attacked or not, every device holds the server's global model
        assert agent.final_round == 4
        assert np.array_equal(agent.model.params, res.final_params)
    return res, base.params


# Measured on the 2-core dev machine (this test, deterministic): distance of the final parameters
# to the clean run's, in units of the clean run's own movement ||clean - start||; attacker x1e3:
#   fedkseed K=4 (every seed drawn by all 5 devices): mean 114, median 0.30, trimmed_mean 0.26
#   fedkseed K=256 (most seeds drawn by one device: the clipped fallback): mean 425, median 0.65
#   fedmezo: mean 90, krum 0.66, multi_krum 0.17, median 0.36
# Held-out loss does not tell them apart on the tiny random model (all within 0.70 +- 0.01: it
# stays near ln 2 however far the parameters move), so it is only checked not to get worse.
ATTACKED_MEAN_MIN = 50.0
ROBUST_MAX = {"fedkseed": 0.5, "fedkseed-sparse": 1.2, "fedmezo": 1.0}


@pytest.mark.parametrize("method,k,aggregators", [
    ("fedkseed", 4, ["median", "trimmed_mean"]),
    ("fedkseed-sparse", 256, ["median"]),
    ("fedmezo", 4, ["krum", "multi_krum", "median"]),
])
def test_one_byzantine_device_in_five(tiny_artifacts, data, tmp_path, method, k, aggregators):
    m = method.split("-")[0]
    clean, start = _run(tiny_artifacts, data, tmp_path, f"clean-{method}", m, "mean", k=k)
    moved = float(np.linalg.norm(clean.final_params - start))
    assert moved > 0
    attacked, _ = _run(tiny_artifacts, data, tmp_path, f"mean-{method}", m, "mean", attackers=(2,), k=k)
    dist = {"mean": float(np.linalg.norm(attacked.final_params - clean.final_params)) / moved}
    loss = {"clean": clean.after["loss"], "mean": attacked.after["loss"]}
    for agg in aggregators:
        r, _ = _run(tiny_artifacts, data, tmp_path, f"{agg}-{method}", m, agg, attackers=(2,), k=k)
        dist[agg] = float(np.linalg.norm(r.final_params - clean.final_params)) / moved
        loss[agg] = r.after["loss"]
    print(f"{method}: distance to the clean run / clean movement {dist}; held-out loss {loss}")
    assert dist["mean"] > ATTACKED_MEAN_MIN, dist
    for agg in aggregators:
        assert dist[agg] < ROBUST_MAX[method], (agg, dist)
        assert abs(loss[agg] - loss["clean"]) < 0.05, (agg, loss)
