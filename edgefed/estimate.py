"""How long a simulated job will take on this machine, and how to fit its evaluation in a budget.

A demo or simulation runs D device processes and the server's evaluation on C cores. Forward
passes of device batches are timed on the loaded model (one thread, as a device runs it); training
then costs rounds x local steps x forwards per step x D forwards spread over min(D, C) cores, and
each evaluation of n held-out rows ceil(n / 32) batches of 32 (about 32 / batch forwards each).
The estimate is printed before the job starts, so a user on a slower machine knows at once.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["JobEstimate", "time_forward", "estimate_job", "usable_cores", "duration", "forwards_per_step"]

EVAL_BATCH = 32


def usable_cores() -> int:
    """Cores this process may run on (cgroup / taskset aware where the OS says)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def forwards_per_step(params) -> float:
    """Forward passes one ZO step runs under a job's params: two per probe, n_perturb probes; with
    variance-adaptive probes between max(2, n_perturb) and n_perturb_max (sized for the midpoint)."""
    q = max(1, int(params.get("n_perturb", 1)))
    q_max = int(params.get("n_perturb_max", 0) or 0)
    return 2 * ((max(2, q) + q_max) / 2 if q_max > q else q)


def time_forward(model, rows: Sequence, batch_size: int, repeats: int = 6, seed: int = 0,
                 length_buckets: int = 1) -> float:
    """Seconds of one forward pass (the loss) of `batch_size` rows on `model`: the mean over
    `repeats` batches drawn as the job's devices draw them (edgefed.batching, with the job's
    `length_buckets`), after a warm-up (the first pass pays for ONNX Runtime's allocations).
    Batches are padded to their longest row, so one batch says little: on the sentiment rows the
    first 8 took 0.80 s and random batches of 8 0.92 s on average."""
    from .batching import row_batches

    rows = list(rows)
    model.loss(model.encode(rows[:batch_size]))
    size = min(batch_size, len(rows))
    draws = row_batches(np.random.default_rng(seed), len(rows), size, length_buckets,
                        lambda i: model.row_length(rows[i]))
    total = 0.0
    for _ in range(repeats):
        batch = model.encode([rows[i] for i in next(draws)])
        t = time.perf_counter()
        model.loss(batch)
        total += time.perf_counter() - t
    return total / repeats


@dataclass
class JobEstimate:
    forward_s: float          # one device batch, one thread
    train_s: float            # every round's local training, devices sharing the cores
    eval_round_s: float       # one per-round evaluation of eval_n rows
    eval_every: int           # rounds between per-round evaluations
    n_evals: int              # per-round evaluations in the job
    eval_final_s: float       # before + after on the whole held-out set
    cores: int

    @property
    def total_s(self) -> float:
        return self.train_s + self.eval_final_s + self.eval_round_s * self.n_evals

    def describe(self) -> str:
        return (f"~{duration(self.total_s)} on {self.cores} cores (training {duration(self.train_s)} at "
                f"{self.forward_s:.2f} s a forward pass, evaluation {duration(self.total_s - self.train_s)})")


def duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min"


def estimate_job(forward_s: float, *, rounds: int, local_steps: int, forwards_per_step: float, devices: int,
                 batch_size: int, eval_n: int, heldout_n: int, eval_threads: int = 1,
                 eval_budget: float = 0.1, cores: int | None = None, eval_every: int | None = None) -> JobEstimate:
    """Training and evaluation time, and (eval_every=None) the per-round evaluation interval that
    keeps evaluation within `eval_budget` of the training time: evaluation runs in the server
    process while devices train, so on a small machine it takes their cores."""
    cores = cores or usable_cores()
    parallel = max(1, min(devices, cores))
    round_s = local_steps * forwards_per_step * devices * forward_s / parallel
    per_row_batch = forward_s * EVAL_BATCH / max(1, batch_size) / max(1, min(eval_threads, cores))

    def eval_s(n: int) -> float:
        return math.ceil(n / EVAL_BATCH) * per_row_batch

    e_round = eval_s(eval_n)
    if eval_every is None:
        eval_every = max(1, math.ceil(e_round / max(1e-9, eval_budget * round_s)))
    return JobEstimate(forward_s=forward_s, train_s=rounds * round_s, eval_round_s=e_round, eval_every=eval_every,
                       n_evals=math.ceil(rounds / eval_every), eval_final_s=2 * eval_s(heldout_n), cores=cores)
