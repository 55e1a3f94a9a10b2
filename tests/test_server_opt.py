"""Server optimisers (edgefed.methods.server_opt): each rule against a float64 hand computation,
fedavg's identity, state immutability, input refusal, config validation, determinism, and
convergence on a quadratic."""
from __future__ import annotations

import math

import numpy as np
import pytest

from edgefed.methods.server_opt import (ADAPTIVE, SERVER_OPTS, STATE_M, STATE_V, ServerOptConfig,
                                        describe, init_state, server_step, state_keys)

# three rounds of a 3-element delta; no element has v == Delta^2 at any round, so yogi's sign()
# is the same in float32 and float64
DELTAS = [[0.5, -1.0, 0.25], [0.3, 0.2, -0.4], [-0.1, 0.6, 0.05]]
HYPER = dict(lr=0.1, beta1=0.8, beta2=0.95, tau=0.01)


def reference(opt: str, deltas, lr, beta1, beta2, tau) -> list[list[float]]:
    """The server deltas of Reddi et al. Algorithm 2 / FedAvgM, element by element in float64
    (written from the formulas, independently of the module)."""
    n = len(deltas[0])
    m = [0.0] * n
    v = [tau * tau] * n
    out = []
    for delta in deltas:
        step = []
        for j, d in enumerate(delta):
            if opt == "fedavg":
                step.append(lr * d)
                continue
            if opt == "avgm":
                m[j] = beta1 * m[j] + d
                step.append(lr * m[j])
                continue
            m[j] = beta1 * m[j] + (1 - beta1) * d
            if opt == "adagrad":
                v[j] = v[j] + d * d
            elif opt == "adam":
                v[j] = beta2 * v[j] + (1 - beta2) * d * d
            else:  # yogi
                s = (v[j] > d * d) - (v[j] < d * d)
                v[j] = v[j] - (1 - beta2) * d * d * s
            step.append(lr * m[j] / (math.sqrt(v[j]) + tau))
        out.append(step)
    return out


def run(cfg, deltas):
    state, steps = {}, []
    for d in deltas:
        step, state = server_step(cfg, state, np.asarray(d, np.float32))
        steps.append(step)
    return steps, state


@pytest.mark.parametrize("opt", SERVER_OPTS)
def test_matches_hand_computation_over_three_rounds(opt):
    cfg = ServerOptConfig(opt, **HYPER)
    # the reference sees the float32 inputs the module sees
    d32 = [[float(np.float32(x)) for x in d] for d in DELTAS]
    expected = reference(opt, d32, **HYPER)
    steps, _ = run(cfg, DELTAS)
    for t, (got, want) in enumerate(zip(steps, expected)):
        assert got.dtype == np.float32 and got.shape == (3,)
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-9, err_msg=f"{opt} round {t}")


def test_yogi_differs_from_adam_and_adagrad():
    """Guards the hand test against three rules that happen to coincide on its numbers."""
    last = {o: run(ServerOptConfig(o, **HYPER), DELTAS)[0][-1] for o in ADAPTIVE}
    assert not np.allclose(last["yogi"], last["adam"], rtol=1e-3)
    assert not np.allclose(last["yogi"], last["adagrad"], rtol=1e-3)
    assert not np.allclose(last["adam"], last["adagrad"], rtol=1e-3)


def test_adaptive_first_step_uses_v_init_tau_squared():
    """Round 0 by hand: m = (1 - b1) d; v = tau^2 (b2) + (1 - b2) d^2 for adam."""
    cfg = ServerOptConfig("adam", lr=1.0, beta1=0.5, beta2=0.5, tau=0.5)
    step, state = server_step(cfg, {}, np.array([2.0], np.float32))
    # m = 1.0; v = 0.5 * 0.25 + 0.5 * 4 = 2.125; step = 1 / (sqrt(2.125) + 0.5)
    np.testing.assert_allclose(step, [1.0 / (math.sqrt(2.125) + 0.5)], rtol=1e-6)
    np.testing.assert_allclose(state[STATE_M], [1.0])
    np.testing.assert_allclose(state[STATE_V], [2.125])


def test_fedavg_lr_one_returns_delta_exactly():
    rng = np.random.default_rng(0)
    d = rng.standard_normal(1000).astype(np.float32) * np.float32(1e-3)
    for cfg in (ServerOptConfig(), ServerOptConfig.from_params({}),
                ServerOptConfig.from_params({"server_opt": "none"})):
        step, state = server_step(cfg, {}, d)
        assert step.tobytes() == d.tobytes()
        assert step is not d and not np.shares_memory(step, d)
        assert state == {}


def test_avgm_beta_zero_is_fedavg():
    d = np.array([0.1, -0.2], np.float32)
    cfg = ServerOptConfig("avgm", lr=0.5, beta1=0.0)
    (s1, s2), _ = run(cfg, [d, d])
    np.testing.assert_array_equal(s2, np.float32(0.5) * d)


@pytest.mark.parametrize("opt", SERVER_OPTS)
def test_inputs_not_mutated(opt):
    cfg = ServerOptConfig(opt, **HYPER)
    d = np.asarray(DELTAS[0], np.float32)
    _, state = server_step(cfg, {}, d)
    d_before = d.copy()
    state_before = {k: v.copy() for k, v in state.items()}
    step, new = server_step(cfg, state, d)
    np.testing.assert_array_equal(d, d_before)
    assert state.keys() == state_before.keys()
    for k in state:
        assert state[k].tobytes() == state_before[k].tobytes()
        assert not np.shares_memory(new[k], state[k])
    assert not np.shares_memory(step, d)


@pytest.mark.parametrize("opt", SERVER_OPTS)
def test_state_layout(opt):
    cfg = ServerOptConfig(opt, **HYPER)
    _, state = run(cfg, DELTAS)
    assert tuple(sorted(state)) == tuple(sorted(state_keys(cfg)))
    for a in state.values():
        assert a.dtype == np.float32 and a.shape == (3,)
    # round trip through raw bytes, as the store persists it, continues identically
    raw = {k: np.frombuffer(a.tobytes(), np.float32) for k, a in state.items()}
    d = np.asarray(DELTAS[0], np.float32)
    assert server_step(cfg, raw, d)[0].tobytes() == server_step(cfg, state, d)[0].tobytes()


def test_init_state():
    cfg = ServerOptConfig("yogi", tau=0.01)
    st = init_state(cfg, 4)
    np.testing.assert_array_equal(st[STATE_M], np.zeros(4, np.float32))
    np.testing.assert_array_equal(st[STATE_V], np.full(4, np.float32(0.01) ** 2))
    assert init_state(ServerOptConfig("avgm"), 2).keys() == {STATE_M}
    assert init_state(ServerOptConfig(), 2) == {}


def test_foreign_state_keys_ignored():
    cfg = ServerOptConfig("avgm")
    d = np.ones(2, np.float32)
    step, new = server_step(cfg, {"other": np.zeros(7, np.int64)}, d)
    assert new.keys() == {STATE_M}


@pytest.mark.parametrize("opt", SERVER_OPTS)
def test_deterministic_bytes(opt):
    cfg = ServerOptConfig(opt)
    rng = np.random.default_rng(1)
    deltas = [rng.standard_normal(257).astype(np.float32) for _ in range(4)]
    (a, sa), (b, sb) = run(cfg, deltas), run(cfg, deltas)
    assert [x.tobytes() for x in a] == [x.tobytes() for x in b]
    assert {k: v.tobytes() for k, v in sa.items()} == {k: v.tobytes() for k, v in sb.items()}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("opt", SERVER_OPTS)
def test_refuses_non_finite_delta(opt, bad):
    d = np.array([0.1, bad, 0.2], np.float32)
    with pytest.raises(ValueError, match="non-finite"):
        server_step(ServerOptConfig(opt), {}, d)


def test_refuses_float64_beyond_float32_range():
    with pytest.raises(ValueError, match="non-finite"):
        server_step(ServerOptConfig(), {}, np.array([1e300]))


def test_refuses_bad_shapes_and_types():
    cfg = ServerOptConfig("adam")
    with pytest.raises(ValueError, match=r"shape \(2, 2\).*1-D"):
        server_step(cfg, {}, np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="1-D"):
        server_step(cfg, {}, np.float32(1.0))
    with pytest.raises(ValueError, match="dtype"):
        server_step(cfg, {}, np.array(["a", "b"]))
    _, state = server_step(cfg, {}, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="shape.*4 values"):
        server_step(cfg, state, np.zeros(4, np.float32))


def test_refuses_inconsistent_state():
    cfg = ServerOptConfig("adam")
    d = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="lacks.*opt_v"):
        server_step(cfg, {STATE_M: np.zeros(3, np.float32)}, d)
    with pytest.raises(ValueError, match="dtype float64"):
        server_step(cfg, {STATE_M: np.zeros(3), STATE_V: np.ones(3)}, d)
    with pytest.raises(ValueError, match="non-finite"):
        server_step(cfg, {STATE_M: np.full(3, np.nan, np.float32), STATE_V: np.ones(3, np.float32)}, d)
    with pytest.raises(ValueError, match="negative"):
        server_step(cfg, {STATE_M: np.zeros(3, np.float32), STATE_V: -np.ones(3, np.float32)}, d)


def test_refuses_overflowing_step():
    d = np.array([3e38], np.float32)
    with pytest.raises(ValueError, match="overflow"):
        server_step(ServerOptConfig("avgm", lr=2.0), {}, d)
    with pytest.raises(ValueError, match="overflow"):  # Delta^2 overflows v
        server_step(ServerOptConfig("adam"), {}, np.array([1e20], np.float32))


# --------------------------------------------------------------------------- config
def test_from_params_defaults():
    c = ServerOptConfig.from_params({})
    assert (c.opt, c.lr, c.beta1, c.beta2, c.tau) == ("fedavg", 1.0, 0.9, 0.99, 1e-3)
    assert ServerOptConfig.from_params({"server_opt": "avgm"}).lr == 1.0
    for opt in ADAPTIVE:
        assert ServerOptConfig.from_params({"server_opt": opt}).lr == 0.01
        assert ServerOptConfig(opt).lr == 0.01
    assert ServerOptConfig.from_params({"server_opt": " Adam "}).opt == "adam"
    assert ServerOptConfig.from_params({"server_opt": "none"}).opt == "fedavg"


def test_from_params_reads_every_knob():
    c = ServerOptConfig.from_params({"server_opt": "yogi", "server_lr": 0.05, "server_momentum": 0.5,
                                     "server_beta2": 0.9, "server_tau": "1e-4"})
    assert (c.opt, c.lr, c.beta1, c.beta2, c.tau) == ("yogi", 0.05, 0.5, 0.9, 1e-4)


def test_unknown_optimiser_lists_valid_names():
    with pytest.raises(ValueError) as e:
        ServerOptConfig.from_params({"server_opt": "sgdm"})
    msg = str(e.value)
    assert "'sgdm'" in msg
    for name in SERVER_OPTS:
        assert name in msg


@pytest.mark.parametrize("params, match", [
    ({"server_lr": 0}, r"server_lr=0.* > 0"),
    ({"server_lr": -1}, r"server_lr=-1.* > 0"),
    ({"server_lr": "fast"}, r"server_lr='fast' must be a number"),
    ({"server_lr": float("nan")}, r"server_lr.*finite"),
    ({"server_momentum": 1}, r"server_momentum=1.*\[0, 1\)"),
    ({"server_momentum": -0.1}, r"server_momentum=-0.1.*\[0, 1\)"),
    ({"server_beta2": 1.0}, r"server_beta2=1.0.*\[0, 1\)"),
    ({"server_tau": 0}, r"server_tau=0.* > 0"),
    ({"server_tau": 1e-45}, r"server_tau=1e-45.*float32"),
])
def test_config_validation_messages(params, match):
    with pytest.raises(ValueError, match=match):
        ServerOptConfig.from_params({"server_opt": "adam", **params})


def test_direct_construction_is_validated():
    with pytest.raises(ValueError, match="server_momentum"):
        ServerOptConfig("avgm", beta1=1.5)
    with pytest.raises(ValueError, match="unknown"):
        ServerOptConfig("lamb")


def test_describe():
    assert describe(ServerOptConfig()) == "server_opt=fedavg lr=1"
    assert describe(ServerOptConfig("avgm", lr=0.5)) == "server_opt=avgm lr=0.5 beta1=0.9"
    assert describe(ServerOptConfig("adagrad")) == "server_opt=adagrad lr=0.01 beta1=0.9 tau=0.001"
    assert describe(ServerOptConfig("yogi")) == \
        "server_opt=yogi lr=0.01 beta1=0.9 beta2=0.99 tau=0.001"
    assert "\n" not in describe(ServerOptConfig("adam"))


# --------------------------------------------------------------------------- behaviour
X_STAR = np.array([1.0, -2.0, 0.5, 3.0], np.float32)


def quadratic_distances(cfg, rounds=50):
    """f(x) = 0.5 ||x - x*||^2; 'clients' return Delta = -0.1 grad = -0.1 (x - x*)."""
    x = np.zeros_like(X_STAR)
    state, dist = {}, [float(np.linalg.norm(x - X_STAR))]
    for _ in range(rounds):
        step, state = server_step(cfg, state, np.float32(-0.1) * (x - X_STAR))
        x = x + step
        dist.append(float(np.linalg.norm(x - X_STAR)))
    return dist


@pytest.mark.parametrize("opt", SERVER_OPTS)
def test_quadratic_default_config_gets_closer(opt):
    dist = quadratic_distances(ServerOptConfig(opt))
    assert dist[-1] < dist[0]


@pytest.mark.parametrize("opt, lr", [("fedavg", 1.0), ("avgm", 1.0), ("adagrad", 0.3),
                                     ("adam", 0.1), ("yogi", 0.1)])
def test_quadratic_tuned_lr_converges(opt, lr):
    dist = quadratic_distances(ServerOptConfig(opt, lr=lr))
    assert dist[-1] < 0.25 * dist[0], dist[-1]
