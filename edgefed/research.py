"""A transport-free federated loop for method studies: the strategy and the clients in one
process, no broker, no store, no threads.

It runs exactly what the full path runs (the same plan fields, the same batch seeds as the
device agent, updates through the wire codec and both validations, the method's accumulator,
the same apply_delta on every replica), only without the I/O, so a method can be studied in
seconds and the result carried over. Every device trains every round (the full path's
devices_per_round is a target of first arrivals, which has no meaning without time), and
updates are added in device order, as the default accumulator orders them.

    from edgefed.research import run_inline
    res = run_inline(job, [model.fork() for _ in shards], shards)
    res.params        # the global trainables after the job (every replica holds these bits)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from . import protocol as P
from .agent import batch_seed
from .assign import SELECT_KEY, device_rules, plan_for
from .methods import JobConfig, MethodState, get_method
from .methods.base import PlanFields

__all__ = ["run_inline", "InlineResult", "build_plan"]


def build_plan(job: JobConfig, rnd: int, pf: PlanFields, delta: Optional[P.RoundDelta],
               deadline: float = 0.0) -> P.RoundPlan:
    """The RoundPlan the aggregation server publishes for round `rnd` (without the server's
    checks such as state_digest, which change nothing in training)."""
    pf.params = {**pf.params, **device_rules(job)}
    return P.RoundPlan(
        job=job.job, round=rnd, method=job.method, lr=pf.lr, local_steps=pf.local_steps,
        batch_size=pf.batch_size, deadline=deadline, min_devices=max(1, int(job.min_devices)),
        params=dict(pf.params), tensors=list(pf.tensors),
        delta_tensors=list(delta.tensors) if delta is not None else [])


@dataclass
class InlineResult:
    params: np.ndarray
    state: MethodState
    history: list[dict] = field(default_factory=list)  # per round: train_loss, bytes up/down, deltas


def _advance(clients, models, delta: P.RoundDelta, pparams: dict, on_round, metrics: dict) -> None:
    """Every replica applies a round's delta; on_round then sees the global model of that round
    (models[0]: every replica holds the same bits)."""
    for client, model in zip(clients, models):
        client.apply_delta(model, delta, pparams)
    if on_round is not None:
        on_round(int(metrics["round"]), models[0].params.copy(), metrics)


def run_inline(job: JobConfig, models: Sequence, shards: Sequence[Sequence], *,
               device_ids: Sequence[str] | None = None, device_classes: Sequence[str] | None = None,
               on_round: Callable[[int, np.ndarray, dict], None] | None = None,
               limits: P.Limits = P.DEFAULT_LIMITS) -> InlineResult:
    """Run `job` with one model (its own trainables) and one shard per device. on_round(round,
    global params, metrics) is called after each round (e.g. to evaluate). device_classes: what each
    device announces (per-device rules in edgefed.assign pick settings by class)."""
    if len(models) != len(shards) or not models:
        raise ValueError(f"one model per shard: {len(models)} models, {len(shards)} shards")
    if len({id(getattr(m, "params", None)) for m in models}) != len(models):
        raise ValueError("every device needs its own trainables: pass model.fork() per device")
    if int(job.params.get("secure_aggregation", 0) or 0):
        raise ValueError("secure aggregation needs the full path (edgefed simulate); the inline loop "
                         "has no key exchange")
    method = get_method(job.method)
    strategy = method.server()
    clients = [method.client() for _ in models]
    ids = list(device_ids or [f"sim-{i:03d}" for i in range(len(models))])
    classes = list(device_classes or ["x86-sim"] * len(models))
    state = strategy.init_state(job)
    delta: Optional[P.RoundDelta] = None
    history = []
    ids_gen = P.MessageIds()
    for rnd in range(int(job.rounds)):
        plan = build_plan(job, rnd, strategy.plan_round(job, state, rnd), delta)
        plan_bytes = len(plan.encode(limits))
        plan = P.decode(plan.encode(limits), limits=limits, expect=P.RoundPlan)  # as devices read it
        pparams = dict(plan.params)
        if delta is not None:  # the last round's delta, as devices apply it from this plan
            _advance(clients, models, delta, pparams, on_round, history[-1])
        updates, up_bytes = [], []
        for client, model, shard, dev, cls in zip(clients, models, shards, ids, classes):
            mine = plan_for(plan, dev, cls)
            if mine is None:  # not selected this round
                continue
            res = client.local_train(model, shard, mine, batch_seed(job.job, dev, mine))
            upd = P.Update(job=job.job, round=rnd, device=dev, method=job.method, msg_id=ids_gen.next(),
                           num_samples=res.num_samples, tensors=res.tensors, train_loss=res.train_loss)
            raw = upd.encode(limits)
            upd = P.decode(raw, limits=limits, expect=P.Update)
            P.validate_update(upd, mine)
            strategy.validate_update(job, state, mine, upd)
            updates.append(upd)
            up_bytes.append(len(raw))
        if not updates:
            raise ValueError(f"round {rnd}: no device was selected ({SELECT_KEY}="
                             f"{plan.params.get(SELECT_KEY)}); raise it or add devices")
        acc = strategy.start_round(job, state, plan)
        for upd in sorted(updates, key=lambda u: u.device):
            acc.add(upd)
        state, delta = acc.finalize()
        delta = P.RoundDelta(round=rnd, tensors=list(delta.tensors))
        w = np.array([u.num_samples for u in updates], np.float64)
        metrics = {"round": rnd, "train_loss": float((w * [u.train_loss for u in updates]).sum() / w.sum()),
                   "bytes_up": float(np.mean(up_bytes)), "bytes_down": plan_bytes, "n_updates": len(updates)}
        history.append(metrics)
    _advance(clients, models, delta, dict(plan.params), on_round, history[-1])  # the final global model
    final = models[0].params.copy()
    for m in models[1:]:
        if not np.array_equal(m.params, final):
            raise AssertionError("replicas diverged in the inline loop: a method's apply_delta is not "
                                 "deterministic")
    return InlineResult(params=final, state=state, history=history)
