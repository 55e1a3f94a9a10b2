"""The server's bounded inbound queue: what the transport hands over, held until the engine
thread has handled it.

Transport callbacks only offer (topic, payload) here and never block: past the budget a
message is dropped (not acked; devices re-send un-acked updates, docs/protocol.md). The
transports hand messages over after their own MQTT acknowledgement, so waiting would only move
the backlog into the transport's queue; dropping is what keeps memory bounded. The budget
covers everything taken and not yet released: queued, and in the engine's current batch."""
from __future__ import annotations

import enum
import queue
import threading
from typing import Any, List, Sequence, Tuple

from edgefed.protocol import MessageTooLarge

from .limits import take_batch

__all__ = ["InboundQueue", "Offer", "ITEM_OVERHEAD"]

ITEM_OVERHEAD = 256  # bytes charged per queued message besides its payload (tuple, topic, ...)


class Offer(enum.Enum):
    QUEUED = "queued"
    TOO_LARGE = "too_large"  # queued as a marker, so it is still rejected (and acked) as too_large
    DROPPED = "dropped"      # over the budget: not queued, not acked


class TooLarge:
    """Stands in the queue for a payload over max_message_bytes (never queued itself)."""
    __slots__ = ("n",)

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return 0

    def error(self, limit: int) -> MessageTooLarge:
        """What decoding it would have raised (the engine and the workers reject with this)."""
        return MessageTooLarge(f"message is {self.n} bytes; the limit is {limit} (Limits.max_message_bytes)")


class InboundQueue:
    def __init__(self, max_message_bytes: int, budget_bytes: int, budget_messages: int):
        self.max_message_bytes = int(max_message_bytes)
        self.budget_bytes = int(budget_bytes)
        self.budget_messages = int(budget_messages)
        self._q: "queue.Queue" = queue.Queue()
        self._lock = threading.Lock()
        self._bytes = 0
        self._msgs = 0
        self._peak = 0

    def offer(self, topic: str, payload: bytes) -> Offer:
        """Queue a message if the budget allows (transport dispatcher thread; never blocks)."""
        n = len(payload)
        item: Any = payload
        if n > self.max_message_bytes:
            item, n = TooLarge(n), 0
        cost = n + ITEM_OVERHEAD + len(topic)
        with self._lock:
            if self._bytes + cost > self.budget_bytes or self._msgs + 1 > self.budget_messages:
                return Offer.DROPPED
            self._bytes += cost
            self._msgs += 1
            self._peak = max(self._peak, self._bytes)
        self._q.put((topic, item, cost))
        return Offer.TOO_LARGE if isinstance(item, TooLarge) else Offer.QUEUED

    def signal(self, token: object) -> None:
        """Queue a control token (stop, wake): outside the budget, seen in the next batch."""
        self._q.put(token)

    def take(self, timeout: float, max_batch: int) -> list:
        """The engine's next batch of raw items ([] when nothing came within timeout)."""
        return take_batch(self._q, timeout, max_batch)

    def take_now(self) -> list:
        """Everything queued now, without waiting."""
        batch = []
        while True:
            try:
                batch.append(self._q.get_nowait())
            except queue.Empty:
                return batch

    @staticmethod
    def messages(batch: Sequence[Any]) -> List[Tuple[str, Any]]:
        """The (topic, payload) messages of a batch, control tokens left out."""
        return [b[:2] for b in batch if isinstance(b, tuple)]

    def release(self, batch: Sequence[Any]) -> None:
        """Give back the budget of handled items and mark them done."""
        freed = msgs = 0
        for item in batch:
            if isinstance(item, tuple):
                freed += item[2]
                msgs += 1
        if msgs:
            with self._lock:
                self._bytes -= freed
                self._msgs -= msgs
        for _ in batch:
            self._q.task_done()

    def idle(self) -> bool:
        """Whether every item offered so far has been released."""
        return self._q.unfinished_tasks == 0

    def snapshot(self) -> dict:
        with self._lock:
            return {"bytes": self._bytes, "messages": self._msgs, "peak_bytes": self._peak,
                    "budget_bytes": self.budget_bytes, "budget_messages": self.budget_messages}
