"""edgefed.exactsum and the exact round accumulators: order independence, any split into
partial sums merged gives the same bits, agreement with an exact (Fraction) reference."""
from fractions import Fraction

import numpy as np
import pytest

from edgefed.exactsum import ExactSum
from edgefed.methods import JobConfig, get_method
from edgefed.methods.fedkseed import SCALARS, SEEDS
from edgefed.protocol import RoundPlan, Tensor, Update


def _terms(rng, k, n=40):
    terms = []
    for i in range(n):
        w = int(rng.integers(1, 2 ** 32 - 1)) if i % 5 == 0 else int(rng.integers(1, 200))
        idx = rng.integers(0, k, size=int(rng.integers(1, 30)))
        x = rng.standard_normal(idx.size) * 10.0 ** rng.integers(-40, 38, size=idx.size)
        x = x.astype(np.float32).astype(np.float64) if i % 2 else x  # float32 and float64 values
        terms.append((idx, x, w))
    terms.append((np.arange(4), np.array([1e300, -1e-300, 5e-324, -0.0]), 7))   # extremes, subnormal
    terms.append((np.zeros(3, np.int64), np.array([1.5, 1.5, -3.0]), 2 ** 32 - 1))  # index repeated
    return terms


def _sum(terms, k, order, parts):
    partial = [ExactSum(k) for _ in range(parts)]
    for j, t in enumerate(order):
        idx, x, w = terms[t]
        partial[j % parts].add(x, w, idx)
    total = ExactSum(k)
    for p in partial[::-1]:
        total.merge(p)
    return total.to_float()


def test_order_and_split_independent_and_close_to_exact():
    rng = np.random.default_rng(1)
    k = 37
    terms = _terms(rng, k)
    ref = _sum(terms, k, range(len(terms)), 1)
    for trial in range(12):  # random permutations and partitions: the same bits
        got = _sum(terms, k, rng.permutation(len(terms)), 1 + trial % 5)
        assert got.tobytes() == ref.tobytes()
    exact = [Fraction(0)] * k
    for idx, x, w in terms:
        for i, v in zip(idx, x):
            exact[int(i)] += Fraction(float(v)) * w
    want = np.array([float(e) for e in exact])
    scale = np.maximum(np.abs(want), 1e-300)
    assert np.all(np.abs(ref - want) <= 4 * np.spacing(scale))  # within a few ulps of the exact sum
    naive = np.zeros(k)
    for idx, x, w in terms:
        np.add.at(naive, idx, w * x)
    assert np.allclose(ref, naive, rtol=1e-9, atol=1e-290)  # and of the float64 running sum


def test_wire_roundtrip_and_subtraction():
    rng = np.random.default_rng(2)
    k = 50
    s = ExactSum(k)
    for idx, x, w in _terms(rng, k, 10):
        s.add(x, w, idx)
    back = ExactSum.from_tensors(k, s.to_tensors("g"), "g")
    assert back.to_float().tobytes() == s.to_float().tobytes()
    back.merge(s, negate=True)
    assert not back.to_float().any()
    with pytest.raises(ValueError):
        ExactSum.from_tensors(k + 1, [t for t in s.to_tensors("g") if not t.name.endswith("base")], "g")
    with pytest.raises(ValueError):
        s.add(np.array([np.inf]), 1, np.array([0]))
    with pytest.raises(ValueError):
        s.add(np.array([1.0]), 2 ** 32, np.array([0]))


def test_dense_many_terms_no_overflow():
    s = ExactSum(3)
    for _ in range(3000):
        s.add(np.array([3.4e38, -3.4e38, 1e-45], np.float32), 2 ** 32 - 1)
    want = np.array([3.4e38, -3.4e38, 1e-45], np.float32).astype(np.float64) * (2 ** 32 - 1) * 3000
    assert np.allclose(s.to_float(), want, rtol=1e-15)


def _fedkseed_updates(rng, n, k=64, steps=8):
    ups = []
    for i in range(n):
        m = int(rng.integers(1, steps + 1))
        ups.append(Update(job="j", round=0, device=f"d{i:02d}", method="fedkseed", msg_id=i + 1,
                          num_samples=int(rng.integers(1, steps * 4 + 1)),
                          tensors=[Tensor(SEEDS, rng.integers(0, k, m).astype(np.uint32)),
                                   Tensor(SCALARS, rng.standard_normal(m).astype(np.float32))]))
    return ups


@pytest.mark.parametrize("pro", [0, 1])
def test_fedkseed_partials_merge_to_the_same_bits(pro):
    rng = np.random.default_rng(3)
    job = JobConfig(job="j", method="fedkseed", k=64, local_steps=8, batch_size=4, params={"pro": pro})
    strat = get_method("fedkseed").server()
    assert strat.partials_unsupported(job) is None
    state = strat.init_state(job)
    plan = RoundPlan(job="j", round=0, method="fedkseed", lr=1e-3, local_steps=8, batch_size=4,
                     params=strat.plan_round(job, state, 0).params)
    ups = _fedkseed_updates(rng, 12)
    one = strat.start_round(job, state, plan)
    for u in ups:
        one.add(u)
    s1, d1 = one.finalize()
    b1 = [t.data.tobytes() for t in d1.tensors]
    via_aggregate = strat.aggregate(job, state, plan, ups[::-1])
    assert [t.data.tobytes() for t in via_aggregate[1].tensors] == b1
    for trial in range(4):  # split among 3 "workers" + the coordinator, merged in any order
        perm = rng.permutation(len(ups))
        accs = [strat.start_round(job, state, plan) for _ in range(4)]
        for j, i in enumerate(perm):
            accs[j % 4].add(ups[i])
        coord = accs[0]
        extra = strat.start_round(job, state, plan)  # a wrongly included update, subtracted again
        extra.add(ups[0])
        accs[1].add(ups[0])
        coord.merge(extra.partial(), negate=True)
        for a in accs[1:]:
            coord.merge(a.partial())
        assert coord.count == len(ups)
        s2, d2 = coord.finalize()
        assert [t.data.tobytes() for t in d2.tensors] == b1
        for name in s1.arrays:
            assert s1.arrays[name].tobytes() == s2.arrays[name].tobytes()


def test_dense_methods_merge_and_refusals():
    rng = np.random.default_rng(4)
    job = JobConfig(job="j", method="fedmezo", local_steps=4, batch_size=4, params={"exact_sum": 1})
    strat = get_method("fedmezo").server()
    state = strat.init_state(job)
    plan = RoundPlan(job="j", round=0, method="fedmezo", lr=1e-3, local_steps=4, batch_size=4,
                     params=strat.plan_round(job, state, 0).params)
    ups = [Update(job="j", round=0, device=f"d{i}", method="fedmezo", msg_id=1, num_samples=int(rng.integers(1, 16)),
                  tensors=[Tensor("delta", (rng.standard_normal(33) * 1e-3).astype(np.float32))]) for i in range(7)]
    a, b, c = (strat.start_round(job, state, plan) for _ in range(3))
    for i, u in enumerate(ups):
        (a if i < 3 else b).add(u)
        c.add(u)
    a.merge(b.partial())
    assert a.finalize()[1].tensors[0].data.tobytes() == c.finalize()[1].tensors[0].data.tobytes()
    for method, params in (("fedkseed", {"aggregator": "median"}), ("fedmezo", {"aggregator": "trimmed_mean"}),
                           ("fedkseed", {"dp_mode": "central", "dp_clip": 1.0}), ("hetlora", {}),
                           ("flora", {}), ("fedavg", {"aggregator": "krum"})):
        why = get_method(method).server().partials_unsupported(JobConfig(job="j", method=method, params=params))
        assert why, (method, params)
    assert "exact_sum=1" in get_method("fedavg").server().partials_unsupported(JobConfig(job="j", method="fedavg"))
    assert get_method("fedavg").server().partials_unsupported(
        JobConfig(job="j", method="fedavg", params={"exact_sum": 1})) is None
    # without exact_sum a dense job keeps a float64 running sum: one float64 per trainable
    plain = strat.start_round(JobConfig(job="j", method="fedmezo", local_steps=4, batch_size=4), state, plan)
    for u in ups:
        plain.add(u)
    assert plain.total.dtype == np.float64 and plain.total.shape == (33,)
    np.testing.assert_allclose(plain.finalize()[1].tensors[0].data, c.finalize()[1].tensors[0].data, rtol=1e-6)
