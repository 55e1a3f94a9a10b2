"""SyncReply bytes for a device that asks to catch up (docs/server.md "Sync").

A device at round s asks for the deltas s .. cur-1 (cur = the open round: the global state is
the state at its start). They come from a small cache of recent deltas, else the store, and go
out as one delta reply when they fit Limits.max_sync_rounds and the message size limit. A
request for a full state, from before the kept history or from ahead of the server, or one
whose deltas do not fit, gets the full state: the global trainables when the server holds them
(exact), else the method's own full state.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from edgefed.methods import JobConfig, MethodState, ServerStrategy
from edgefed.protocol import Limits, MessageTooLarge, RoundDelta, SyncReply, SyncRequest, Tensor
from edgefed.replica import TRAINABLES_TENSOR, TrainablesReplica

from .store import Store, StoreError

__all__ = ["SyncBuilder", "history_from", "full_state"]


def history_from(round_id: int, history_limit: Optional[int]) -> int:
    """The oldest round a delta sync can start from (JobState.history_from); 0 keeps all."""
    return max(0, round_id - history_limit) if history_limit else 0


def full_state(replica: Optional[TrainablesReplica], round_id: int, strategy: ServerStrategy,
               job: JobConfig, state: Optional[MethodState], limits: Limits) -> List[Tensor]:
    """The global trainables themselves when the server holds them and they fit a message
    (exact by construction), else the method's own full state (FedKSeed: cumulative
    coefficients, replayed in one pass: equal up to float32 rounding)."""
    if replica is not None and replica.rounds == round_id and replica.client.state_is_trainables \
            and replica.params.nbytes + 4096 <= limits.max_message_bytes:
        return [Tensor(TRAINABLES_TENSOR, replica.params)]  # encoded at once, on the engine thread
    return strategy.full_state(job, state)


class SyncBuilder:
    """Builds replies for one job; owns the cache of recent deltas (engine thread only)."""

    def __init__(self, store: Store, job: str, limits: Limits, signer: Any = None, cache: int = 64):
        self.store, self.job, self.limits, self.signer = store, job, limits, signer
        self.keep = int(cache)
        self._deltas: Dict[int, RoundDelta] = {}  # by aggregated round

    def remember(self, delta: RoundDelta) -> None:
        """A round was aggregated: its delta is the likeliest to be asked for next."""
        self._deltas[delta.round] = delta
        self._trim()

    def clear(self) -> None:
        self._deltas.clear()

    def delta_reply(self, req: SyncRequest, round_id: int, oldest: int) -> Tuple[Optional[bytes], str]:
        """(encoded delta SyncReply, "") or (None, why the device needs the full state).
        oldest: the history's first round (history_from)."""
        cur, s = round_id, req.from_round
        why = ("asked for full" if req.full else
               f"from_round {s} is older than the history ({oldest})" if s < oldest else
               f"from_round {s} is ahead of the server (round {cur})" if s > cur else "")
        if why:
            return None, why
        try:
            rounds = [RoundDelta(round=d.round + 1, tensors=d.tensors)
                      for d in self.load_deltas(s, cur - 1)]
            if len(rounds) <= self.limits.max_sync_rounds:
                return SyncReply(job=self.job, device=req.device, from_round=s, to_round=cur,
                                 request_id=req.request_id, full=False,
                                 rounds=rounds).encode(self.limits, signer=self.signer), ""
            return None, f"{len(rounds)} rounds exceed the sync limit"
        except MessageTooLarge:
            return None, "the deltas exceed the message size limit"
        except StoreError as e:
            return None, str(e)

    def full_reply(self, req: SyncRequest, round_id: int, state: List[Tensor]) -> bytes:
        return SyncReply(job=self.job, device=req.device, from_round=min(req.from_round, round_id),
                         to_round=round_id, request_id=req.request_id, full=True,
                         state=state).encode(self.limits, signer=self.signer)

    def load_deltas(self, first: int, last: int) -> List[RoundDelta]:
        missing = [r for r in range(first, last + 1) if r not in self._deltas]
        if missing:
            for d in self.store.load_deltas(self.job, missing[0], missing[-1]):
                self._deltas[d.round] = d
            self._trim()
            if any(r not in self._deltas for r in range(first, last + 1)):
                return self.store.load_deltas(self.job, first, last)
        return [self._deltas[r] for r in range(first, last + 1)]

    def _trim(self) -> None:
        for r in sorted(self._deltas)[:-self.keep]:
            del self._deltas[r]
