"""The demo's time plan (edgefed.estimate): training spread over the cores, evaluation fitted in
its budget, and the estimate's arithmetic."""
import argparse
import time

import numpy as np
import pytest

from edgefed.demo import add_demo_args, plan_time
from edgefed.estimate import estimate_job, time_forward


def _demo_args(*argv):
    """The demo's parsed command line, one ONNX Runtime thread a device, plus argv."""
    p = argparse.ArgumentParser()
    add_demo_args(p)
    return p.parse_args(["--device-threads", "1", *argv])


def test_training_time_spreads_devices_over_the_cores():
    kw = dict(rounds=20, local_steps=16, forwards_per_step=2, batch_size=8, eval_n=128, heldout_n=500)
    two = estimate_job(0.5, devices=4, cores=2, **kw)
    four = estimate_job(0.5, devices=4, cores=4, **kw)
    assert two.train_s == pytest.approx(20 * 16 * 2 * 4 * 0.5 / 2)
    assert four.train_s == pytest.approx(two.train_s / 2)
    assert estimate_job(0.5, devices=1, cores=16, **kw).train_s == pytest.approx(20 * 16 * 2 * 0.5)


def test_evaluation_is_spaced_to_fit_its_budget():
    kw = dict(rounds=20, local_steps=16, forwards_per_step=2, devices=4, batch_size=8, heldout_n=500, cores=2)
    est = estimate_job(0.5, eval_n=128, eval_budget=0.1, **kw)
    round_s = est.train_s / 20
    assert est.eval_round_s / est.eval_every <= 0.1 * round_s + 1e-9
    assert est.eval_every == 1 or est.eval_round_s / (est.eval_every - 1) > 0.1 * round_s, "not spaced more than needed"
    assert estimate_job(0.5, eval_n=128, eval_budget=10.0, **kw).eval_every == 1
    fixed = estimate_job(0.5, eval_n=128, eval_every=3, **kw)
    assert fixed.eval_every == 3 and fixed.n_evals == 7
    assert fixed.total_s == pytest.approx(fixed.train_s + fixed.eval_final_s + 7 * fixed.eval_round_s)
    assert "min on 2 cores" in fixed.describe()


class _Timed:
    def __init__(self):
        self.calls = 0

    def encode(self, rows):
        return rows

    def loss(self, batch):
        self.calls += 1
        return 0.0


def test_a_forward_is_timed_after_a_warm_up():
    m = _Timed()
    assert time_forward(m, list(range(20)), 8, repeats=3) >= 0.0
    assert m.calls == 4


class _Padded(_Timed):
    """A batch costs its longest row (padding), as the graph's forward does."""
    def loss(self, batch):
        time.sleep(0.002 * max(batch))
        return 0.0


def test_a_forward_is_timed_on_representative_batches_not_the_first():
    # the first rows are short, most are long: the first batch alone would say 2 ms
    rows = [1] * 8 + [5] * 92
    t = time_forward(_Padded(), rows, 8, repeats=6)
    assert t > 0.008, t


class _Lengths(_Timed):
    """Records what each timed batch pads to; a row is its own length."""
    def __init__(self):
        super().__init__()
        self.padded = []

    def row_length(self, row):
        return row

    def loss(self, batch):
        self.padded.append(max(batch))
        return 0.0


def test_a_bucketed_job_is_timed_on_bucketed_batches():
    """With length_buckets the devices pad less, and the estimate must time what they will run."""
    rows = [int(x) for x in np.random.default_rng(0).integers(5, 64, size=400)]
    plain, bucketed = _Lengths(), _Lengths()
    time_forward(plain, rows, 8, repeats=16)
    time_forward(bucketed, rows, 8, repeats=16, length_buckets=8)
    assert np.mean(bucketed.padded[1:]) < 0.85 * np.mean(plain.padded[1:])


class _Slow(_Timed):
    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def loss(self, batch):
        time.sleep(self.seconds)
        return 0.0


def test_the_demo_runs_fewer_rounds_on_a_machine_too_slow_for_its_budget(capsys):
    shards, held = [list(range(100))] * 4, list(range(500))
    a = _demo_args("--time-budget", "1")
    plan_time(a, _Slow(0.05), shards, held)
    assert a.rounds < 20 and a.estimate_s <= 60 + 1e-6
    assert "running" in capsys.readouterr().err
    b = _demo_args("--time-budget", "0")
    plan_time(b, _Slow(0.05), shards, held)
    assert b.rounds == 20, "--time-budget 0 keeps every round"


def test_the_demo_times_the_batches_its_devices_will_draw():
    """--param length_buckets=8: the estimate times bucketed batches, which pad less."""
    rows = [int(x) for x in np.random.default_rng(0).integers(5, 64, size=400)]
    plain, bucketed = _Lengths(), _Lengths()
    plan_time(_demo_args(), plain, [rows] * 4, rows)
    plan_time(_demo_args("--param", "length_buckets=8"), bucketed, [rows] * 4, rows)
    assert len(bucketed.padded) > 8, "two whole draws of 8 bucketed batches"
    assert np.mean(bucketed.padded[1:]) < 0.85 * np.mean(plain.padded[1:])


def test_time_already_spent_counts_against_the_budget(capsys):
    """Model preparation before the estimate (an export on a fresh machine) is part of the demo's
    time: with most of the budget spent, fewer rounds fit, and the estimate includes it."""
    shards, held = [list(range(100))] * 4, list(range(500))
    fresh = _demo_args("--time-budget", "2")
    plan_time(fresh, _Slow(0.05), shards, held)
    late = _demo_args("--time-budget", "2")
    plan_time(late, _Slow(0.05), shards, held, started=time.time() - 60.0)
    assert fresh.rounds == 20 and late.rounds < fresh.rounds
    assert late.estimate_s >= 60.0 and late.estimate_s <= 120 + 1e-6
    assert "of preparation" in capsys.readouterr().err
