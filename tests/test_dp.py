"""Differential privacy (edgefed.security.dp): DP-ZO clipping + noise on the device, central noise
in the strategies (deterministic: replay and devices stay bit-identical), and the accountant."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from edgefed.data import iid_split, load_rotten_tomatoes, train_heldout_split
from edgefed.federation import run_federation
from edgefed.methods import JobConfig
from edgefed.methods.fedkseed import (COEFFS, SCALARS, FedKSeedClient, FedKSeedServer, seed_pairs, seed_tensors,
                                      zo_plan_params)
from edgefed.methods.fedmezo import FedMeZOClient, FedMeZOServer, delta_norm_bound
from edgefed.protocol import InvalidField, RoundPlan, Tensor, Update
from edgefed.security import dp
from edgefed.simulate import thread_devices
from edgefed.trainer import LocalTrainer
from edgefed.zo import SeedPool, ZOConfig

dp_accounting = pytest.importorskip("dp_accounting")


class StubModel:
    """Numpy-only stand-in for DeviceModel: L+ = 1, L- = 0 on every probe, so the raw projected
    scalar is 1 / (2 eps) = 500 (eps 1e-3), far above any clip used here."""

    def __init__(self, n: int = 16):
        self.params = np.zeros(n, np.float32)
        self.buffers = [self.params]
        self.batch_size = 4
        self.calls = 0

    def encode(self, rows):
        return rows

    def loss(self, batch):
        self.calls += 1
        return 1.0 if self.calls % 2 == 1 else 0.0


def _plan(method="fedkseed", *, steps=10, k=64, params=None, lr=1e-3, rnd=0):
    return RoundPlan(job="j", round=rnd, method=method, lr=lr, local_steps=steps, batch_size=4,
                     params={**(params or {}), "seed_pool_id": 3, "k": k, "eps": 1e-3})


def _scalars(res):
    return seed_pairs(res.tensors, SCALARS, "result")[1]


def _delta(d):
    return seed_pairs(d.tensors, COEFFS, "delta")


def _job(method="fedkseed", **params):
    return JobConfig(job="j", method=method, rounds=3, devices_per_round=3, min_devices=1, lr=1e-3,
                     eps=1e-3, local_steps=10, batch_size=4, k=64, seed_pool_id=3, params=params)


# ----------------------------------------------------------------------------- device noise

def test_device_clips_and_adds_noise_of_the_configured_scale():
    C, sigma, n = 0.5, 2.0, 4000
    model = StubModel()
    pool = SeedPool(3, 64)
    cfg = ZOConfig(lr=1e-6, eps=1e-3, clip=C, noise_std=sigma * C)
    acc = LocalTrainer(model, pool, cfg, progress=False).train(
        list(range(8)), n, batch_size=4, seed=1, noise_gen=np.random.default_rng(2024))
    raw = np.array([p.g_raw for p in acc.history])
    g = np.array([p.g for p in acc.history])
    assert np.allclose(raw, 500.0)                       # the raw scalar, before clipping
    noise = g - C                                        # clipped to C, then noised
    se = sigma * C / math.sqrt(n)
    assert abs(noise.mean()) < 4 * se
    assert abs(noise.std(ddof=1) / (sigma * C) - 1) < 0.05   # sd of the sample sd ~ 1/sqrt(2n) = 1.1%
    # Gaussian: ~68.3% within one sd, ~95.4% within two
    assert abs(np.mean(np.abs(noise) < sigma * C) - 0.6827) < 0.03
    assert abs(np.mean(np.abs(noise) < 2 * sigma * C) - 0.9545) < 0.015
    # and the step applied to theta used the privatized g
    assert all(p.coeff == pytest.approx(-1e-6 * p.g) for p in acc.history[:10])


def test_fedkseed_client_takes_dp_from_the_plan():
    C, sigma, steps = 1.0, 1.5, 400
    job = _job(dp_mode="local", dp_clip=C, dp_noise_multiplier=sigma)
    params = zo_plan_params(job)
    assert params["dp_mode"] == "local" and params["dp_clip"] == C and params["dp_noise_multiplier"] == sigma
    assert "dp_mode" not in zo_plan_params(_job())  # DP off: plans are what they were
    plan = _plan(steps=steps, k=1, params=params)        # K = 1: one scalar, the sum of every probe's g
    model = StubModel()
    res = FedKSeedClient(noise_seed=7).local_train(model, list(range(8)), plan, seed=0)
    assert np.array_equal(model.params, np.zeros_like(model.params))  # back to the global state
    z = (float(_scalars(res)[0]) - steps * C) / (sigma * C * math.sqrt(steps))
    assert abs(z) < 5
    again = FedKSeedClient(noise_seed=7).local_train(StubModel(), list(range(8)), plan, seed=0)
    assert np.array_equal(_scalars(res), _scalars(again))
    # default: os.urandom-seeded, so two runs differ (and the server cannot regenerate the noise)
    a = FedKSeedClient().local_train(StubModel(), list(range(8)), plan, seed=0)
    b = FedKSeedClient().local_train(StubModel(), list(range(8)), plan, seed=0)
    assert _scalars(a)[0] != _scalars(b)[0]
    # without DP: the raw sum
    plain = FedKSeedClient().local_train(StubModel(), list(range(8)), _plan(steps=steps, k=1), seed=0)
    assert float(_scalars(plain)[0]) == pytest.approx(500.0 * steps, rel=1e-6)


def test_fedmezo_client_clips_the_delta_and_adds_noise():
    C, sigma, n = 0.01, 0.5, 20000
    job = _job("fedmezo", dp_mode="local", dp_clip=C, dp_noise_multiplier=sigma)
    plan = _plan("fedmezo", steps=3, params=zo_plan_params(job), lr=1e-2)
    res = FedMeZOClient(noise_seed=3).local_train(StubModel(n), list(range(8)), plan, seed=0)
    d = res.tensors[0].data.astype(np.float64)
    # the raw delta (norm ~ 3 x 1e-2 x 500 x sqrt(n)) dwarfs C: what is left is clip + noise
    assert abs(d.std() / (sigma * C) - 1) < 0.03
    # the server's check: honest noisy delta passes the DP bound, an unclipped one does not
    srv = FedMeZOServer()
    state = srv.init_state(job)
    srv.validate_update(job, state, plan, Update(job="j", round=0, device="d", method="fedmezo", msg_id=1,
                                                 num_samples=12, tensors=[Tensor("delta", res.tensors[0].data)]))
    assert delta_norm_bound(job, plan, n) < 2 * sigma * C * math.sqrt(n)
    big = np.full(n, 1.0, np.float32)
    with pytest.raises(InvalidField, match="exceeds the bound"):
        srv.validate_update(job, state, plan, Update(job="j", round=0, device="d", method="fedmezo", msg_id=2,
                                                     num_samples=12, tensors=[Tensor("delta", big)]))


# ----------------------------------------------------------------------------- config

def test_dp_settings_are_checked_at_job_creation():
    with pytest.raises(ValueError, match="dp_mode"):
        FedKSeedServer().init_state(_job(dp_mode="global", dp_clip=1.0))
    with pytest.raises(ValueError, match="dp_clip"):
        FedKSeedServer().init_state(_job(dp_mode="local", dp_noise_multiplier=1.0))
    with pytest.raises(ValueError, match="aggregator=mean"):
        FedMeZOServer().init_state(_job("fedmezo", dp_mode="central", dp_clip=1.0, aggregator="median"))
    with pytest.raises(ValueError, match="scalar_bound"):  # noise would push honest scalars out of bounds
        FedKSeedServer().init_state(_job(dp_mode="local", dp_clip=100.0, dp_noise_multiplier=20.0))
    with pytest.raises(ValueError, match="dp_population"):
        FedKSeedServer().init_state(_job(dp_mode="central", dp_clip=1.0, dp_population=2))
    # local DP with the job's `clip`: noisy scalars are only held to scalar_bound
    job = _job(dp_mode="local", dp_clip=1.0, dp_noise_multiplier=1.0, clip=1.0)
    srv = FedKSeedServer()
    state = srv.init_state(job)
    upd = Update(job="j", round=0, device="d", method="fedkseed", msg_id=1, num_samples=40,
                 tensors=seed_tensors([1, 2], [9.5, -2.0], SCALARS))  # > clip x (10 - 2 + 1)
    srv.validate_update(job, state, _plan(params=zo_plan_params(job)), upd)
    with pytest.raises(InvalidField):
        srv.validate_update(_job(clip=1.0), srv.init_state(_job(clip=1.0)), _plan(), upd)


# ----------------------------------------------------------------------------- accountant

def test_epsilon_grows_with_rounds_shrinks_with_noise_and_matches_the_library():
    e = [dp.epsilon("central", 1.0, r, 1e-5, q=0.1) for r in (1, 10, 100)]
    assert 0 < e[0] < e[1] < e[2]
    s = [dp.epsilon("central", sigma, 50, 1e-5, q=0.1) for sigma in (0.7, 1.0, 2.0, 4.0)]
    assert s == sorted(s, reverse=True) and s[-1] < s[0]
    assert dp.epsilon("central", 1.0, 50, 1e-5, q=0.1) < dp.epsilon("central", 1.0, 50, 1e-5, q=1.0)
    assert dp.epsilon("local", 1.0, 5, 1e-5, probes_per_round=10) > dp.epsilon("local", 1.0, 5, 1e-5)
    assert dp.epsilon("central", 1.0, 0, 1e-5) == 0.0 and dp.epsilon("central", 0.0, 3, 1e-5) == math.inf
    # the library called directly: the same RDP computation ...
    from dp_accounting import pld, rdp
    ev = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 50)
    acc = rdp.RdpAccountant(orders=list(dp.ACCOUNTANT_ORDERS))
    acc.compose(ev)
    ours = dp.epsilon("central", 1.0, 50, 1e-5, q=0.1)
    assert ours == acc.get_epsilon(1e-5)
    # ... its default orders (within 5%), and the (tighter) PLD accountant below it
    acc_default = rdp.RdpAccountant()
    acc_default.compose(ev)
    assert ours == pytest.approx(acc_default.get_epsilon(1e-5), rel=0.05)
    acc_pld = pld.PLDAccountant()
    acc_pld.compose(ev)
    assert 0.5 * ours < acc_pld.get_epsilon(1e-5) <= ours
    # local: sensitivity 2C, no amplification, rounds x probes Gaussians of multiplier sigma / 2
    acc = rdp.RdpAccountant(orders=list(dp.ACCOUNTANT_ORDERS))
    acc.compose(dp_accounting.GaussianDpEvent(2.0 / 2), 3 * 10)
    assert dp.epsilon("local", 2.0, 3, 1e-5, probes_per_round=10) == acc.get_epsilon(1e-5)


def test_summary_reports_epsilon_from_the_round_count():
    job = _job(dp_mode="central", dp_clip=1.0, dp_noise_multiplier=1.1, dp_population=30, dp_delta=1e-6)
    srv = FedKSeedServer()
    state = srv.init_state(job)
    assert srv.summary(state)["dp_epsilon"] == 0.0
    ups = [Update(job="j", round=0, device=f"d{i}", method="fedkseed", msg_id=1, num_samples=40,
                  tensors=seed_tensors([i, 5], [3.0, -4.0], SCALARS)) for i in range(3)]
    eps = []
    for r in range(3):
        state, delta = srv.aggregate(job, state, _plan(params=zo_plan_params(job), rnd=r), ups)
        assert _delta(delta)[0].size == job.k  # central noise on every seed of the pool
        s = srv.summary(state)
        assert s["dp_mode"] == "central" and s["dp_q"] == pytest.approx(0.1) and s["dp_delta"] == 1e-6
        assert s["dp_epsilon"] == dp.epsilon("central", 1.1, r + 1, 1e-6, q=0.1)
        eps.append(s["dp_epsilon"])
    assert eps == sorted(eps) and eps[0] < eps[-1]
    # the noise is a function of (job seed, round): the same round twice gives the same bits,
    # the next round other noise
    s0 = srv.init_state(job)
    a = srv.aggregate(job, s0, _plan(params=zo_plan_params(job), rnd=0), ups)[1]
    b = srv.aggregate(job, s0, _plan(params=zo_plan_params(job), rnd=0), ups)[1]
    c = srv.aggregate(job, s0, _plan(params=zo_plan_params(job), rnd=1), ups)[1]
    assert np.array_equal(_delta(a)[1], _delta(b)[1]) and not np.array_equal(_delta(a)[1], _delta(c)[1])
    # clipping: a device's vector of norm 5 counts as norm 1 (sigma 0 to see it)
    job0 = dataclasses.replace(job, params={**job.params, "dp_noise_multiplier": 0.0})
    st, d = srv.aggregate(job0, srv.init_state(job0), _plan(params=zo_plan_params(job0)), ups[:1])
    G = np.zeros(job.k)
    G[[0, 5]] = np.array([3.0, -4.0]) / 5.0 / 3   # clipped to norm 1, over devices_per_round 3
    got = np.zeros(job.k)
    got[_delta(d)[0].astype(np.int64)] = _delta(d)[1]
    np.testing.assert_allclose(got, -1e-3 * G, rtol=1e-6)
    assert srv.summary(st)["dp_epsilon"] == math.inf
    assert "dp_epsilon" not in srv.summary(srv.init_state(_job()))


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def data():
    train, held = train_heldout_split(load_rotten_tomatoes(), heldout=30, seed=0)
    return train[:300], held


@pytest.mark.parametrize("method,mode", [("fedkseed", "central"), ("fedmezo", "central"),
                                         ("fedkseed", "local"), ("fedmezo", "local")])
def test_dp_job_replays_bit_identically_and_devices_match_the_server(tiny_artifacts, data, tmp_path,
                                                                    method, mode, monkeypatch):
    from edgefed.runtime import DeviceModel
    from edgefed_server.replay import compare_states, replay_log
    from edgefed_server.store import Store
    monkeypatch.setenv(dp.SECRET_ENV, "0x5eed")
    train, held = data
    art = tiny_artifacts["lora"]
    clip = 1.0 if method == "fedkseed" else 0.05
    job = JobConfig(job=f"dp-{method}-{mode}", method=method, artifact=str(art), rounds=2, devices_per_round=3,
                    min_devices=3, round_timeout=60.0, lr=1e-2, eps=1e-3, local_steps=4, batch_size=8,
                    k=128 if mode == "central" else 1024, seed_pool_id=7,
                    params={"dp_mode": mode, "dp_clip": clip, "dp_noise_multiplier": 0.5, "dp_population": 30})
    base = DeviceModel(art, threads=1, batch_size=8, seq_len=32, check_memory=False)
    finals = []
    runs = 2 if mode == "central" else 1
    for i in range(runs):
        j = dataclasses.replace(job, job=f"{job.job}-{i}")
        starter = thread_devices(base, j.job, iid_split(train, 3))
        res = run_federation(j, art, held, broker_url=f"inproc://{j.job}", start_devices=starter,
                             out_dir=tmp_path / str(i), eval_n=10, progress=False)
        assert res.rounds_completed == 2
        assert not np.array_equal(res.final_params, base.params)
        for agent in starter.agents:  # every replica bit-identical to the server's global model
            np.testing.assert_array_equal(agent.model.params, res.final_params)
        s = res.server_summary["strategy"]
        assert s["dp_mode"] == mode and s["dp_epsilon"] == pytest.approx(
            dp.epsilon(mode, 0.5, 2, 1e-5, q=0.1 if mode == "central" else 1.0,
                       probes_per_round=4 if (method, mode) == ("fedkseed", "local") else 1))
        store = Store(tmp_path / str(i) / "server.sqlite")
        try:
            rep = replay_log(store, j.job)
            assert rep.rounds == 2 and compare_states(rep.state, store.load_state(j.job)[1]) == []
        finally:
            store.close()
        finals.append(res.final_params)
    if runs == 2:  # central noise comes from (job seed, round, server secret): the same job, the same bits
        np.testing.assert_array_equal(finals[0], finals[1])


def test_epsilon_is_on_the_metrics_page(tmp_path):
    """/metrics carries the privacy spent so far at the job's delta, next to /status."""
    from edgefed.transport import make_transport
    from edgefed_server.engine import Server
    from edgefed_server.http_status import render_metrics
    from edgefed_server.store import Store
    job = JobConfig(job="dp-metrics", method="fedkseed", artifact="", rounds=3, devices_per_round=3, min_devices=3,
                    round_timeout=60.0, k=64, params={"dp_mode": "central", "dp_clip": 1.0,
                                                      "dp_noise_multiplier": 1.0, "dp_population": 30})
    with Store(tmp_path / "s.sqlite") as st:
        srv = Server(make_transport("inproc://dp-metrics"), st, job, settle=0)
        srv.start()
        try:
            text = render_metrics(srv.metrics_snapshot())
        finally:
            srv.stop()
    line = [x for x in text.splitlines() if x.startswith("edgefed_dp_epsilon{")]
    assert line == ['edgefed_dp_epsilon{delta="1e-05",job="dp-metrics",mode="central"} 0.0']
    assert "edgefed_dp_epsilon" not in render_metrics({"job": "x"})  # a job without DP
