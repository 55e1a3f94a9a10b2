"""Replay a job's accepted-update log through a fresh strategy.

Strategies are deterministic and the engine feeds each round's accepted updates to the round's
accumulator (strategy.start_round) in arrival order, which the store keeps; replaying them the
same way must reproduce the stored state exactly. Used by the crash tests and as an audit tool:

    python -m edgefed_server.replay --db server.db --job demo
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from edgefed.methods import MethodState, ServerStrategy, get_method
from edgefed.protocol import RoundDelta, RoundPlan, Update, decode

from .store import Store, StoreError

__all__ = ["ReplayResult", "replay_log", "compare_states", "main"]


@dataclass
class ReplayResult:
    state: MethodState
    rounds: int
    deltas: List[RoundDelta] = field(default_factory=list)
    n_updates: List[int] = field(default_factory=list)


def replay_log(store: Store, job: str, strategy: Optional[ServerStrategy] = None,
               upto: Optional[int] = None) -> ReplayResult:
    """Fold the accepted updates of every closed round (in order, through the stored plans and
    each round's accumulator) into strategy.init_state(config). Returns the state at the start of the first unclosed round."""
    cfg = store.load_job(job)
    if cfg is None:
        raise StoreError(f"job {job!r} is not in {store.path}")
    store.check_protocol(job)  # a job stored by another protocol version cannot be replayed
    strat = strategy if strategy is not None else get_method(cfg.method).server()
    state = strat.init_state(cfg)
    res = ReplayResult(state=state, rounds=0)
    closed = store.closed_rounds(job)
    if closed != list(range(len(closed))):
        raise StoreError(f"job {job!r}: closed rounds {closed[:5]}... are not 0..n-1")
    for rnd in closed:
        if upto is not None and rnd >= upto:
            break
        raw_plan = store.round_plan(job, rnd)
        if raw_plan is None:
            raise StoreError(f"job {job!r}: round {rnd} has no stored plan")
        plan = decode(raw_plan, expect=RoundPlan)
        rows = store.accepted_updates(job, rnd)  # arrival order, as the engine added them
        acc = strat.start_round(cfg, state, plan)  # type: ignore[arg-type]
        for _, _, raw in rows:
            acc.add(decode(raw, expect=Update))  # type: ignore[arg-type]
        state, delta = acc.finalize()
        res.deltas.append(delta)
        res.n_updates.append(len(rows))
        res.rounds = rnd + 1
    res.state = state
    return res


def compare_states(a: MethodState, b: MethodState) -> List[str]:
    """Differences between two method states (empty list = bit-identical)."""
    diffs = []
    if a.scalars != b.scalars:
        diffs.append(f"scalars {a.scalars} != {b.scalars}")
    for name in sorted(set(a.arrays) | set(b.arrays)):
        x, y = a.arrays.get(name), b.arrays.get(name)
        if x is None or y is None:
            diffs.append(f"array {name!r} missing on one side")
        elif x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x, y):
            d = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.shape == y.shape else None
            diffs.append(f"array {name!r} differs (max abs diff {d})")
    return diffs


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgefed_server.replay",
                                 description="Replay a job's accepted-update log and compare it with the stored state")
    ap.add_argument("--db", required=True)
    ap.add_argument("--job", required=True)
    a = ap.parse_args(argv)
    store = Store(a.db)
    try:
        try:
            res = replay_log(store, a.job)
        except StoreError as e:  # e.g. a job stored by another protocol version (IncompatibleJob)
            print(f"replay: {e}", file=sys.stderr)
            return 2
        stored = store.load_state(a.job, res.rounds)
        if stored is None:
            print(f"no stored state for round {res.rounds}", file=sys.stderr)
            return 2
        diffs = compare_states(res.state, stored[1])
        print(f"replayed {res.rounds} rounds, {sum(res.n_updates)} accepted updates: "
              f"{'identical to the stored state' if not diffs else 'MISMATCH'}")
        for d in diffs:
            print("  " + d)
        return 0 if not diffs else 1
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
