"""What one client can make the server hold (`ResourceLimits`, docs/server.md "Resource
limits") and how client-chosen text reaches the log: escaped and cut (`sanitize`), at most a
burst of lines per interval and kind (`LogLimiter`); how handler threads take queued work in
batches (`take_batch`, the engine's and the workers'). Kept apart from the engine so the
admission rules (the quotas) and the tests use them without a Server."""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
import unicodedata
from typing import Any, Callable, Dict, List, Optional

__all__ = ["ResourceLimits", "DEFAULT_RESOURCE_LIMITS", "sanitize", "LogLimiter"]


@dataclasses.dataclass(frozen=True)
class ResourceLimits:
    """What one client (authenticated or not) can make the server hold (docs/server.md,
    "Resource limits"). Every limit refuses or drops the excess and counts it."""
    max_devices: int = 1000            # registered devices per job; new ones past it are refused
    inbound_bytes: int = 64 << 20      # payload bytes queued or in handling between transport and engine
    inbound_messages: int = 20000      # messages queued or in handling
    late_raw_per_device: int = 4       # late updates kept with their raw bytes, per device (whole job)
    late_raw_per_round: int = 64       # ... and per arrival round, all devices together
    extra_rows_per_device: int = 16    # late/duplicate rows (digest + metadata) per device per arrival round
    extra_rows_per_round: int = 2048   # ... and per arrival round, all devices together
    status_devices: int = 100          # devices listed by /status (counts for all of them)
    log_burst: int = 20                # lines per log_interval_s and kind of client-caused warning
    log_interval_s: float = 10.0
    log_chars: int = 200               # client-chosen text in a log line is truncated to this

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not v >= (0 if f.name.startswith(("late_", "extra_")) else 1):
                raise ValueError(f"ResourceLimits.{f.name} must be >= "
                                 f"{0 if f.name.startswith(('late_', 'extra_')) else 1} (got {v!r})")


DEFAULT_RESOURCE_LIMITS = ResourceLimits()


def sanitize(value: Any, limit: int = 200) -> str:
    """Client-chosen text made safe for one log line: backslash, control, format and line/paragraph
    separator characters (newlines included) are escaped (\\n, \\x1b, \\u2028 ...), and anything past
    `limit` characters is cut and replaced by a count."""
    s = value if isinstance(value, str) else str(value)
    out = []
    for ch in s[:limit]:
        o = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif o < 0x20 or o == 0x7F or (o >= 0x80 and unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp", "Co", "Cn")):
            out.append("\\n" if ch == "\n" else "\\r" if ch == "\r" else "\\t" if ch == "\t" else
                       f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
        else:
            out.append(ch)
    if len(s) > limit:
        out.append(f"...(+{len(s) - limit} chars)")
    return "".join(out)


class LogLimiter:
    """At most `burst` lines per `interval` seconds and key; the first line of the next window
    says how many were suppressed. Thread-safe (transport threads log drops)."""

    def __init__(self, burst: int, interval: float, clock: Callable[[], float] = time.monotonic):
        self.burst, self.interval, self.clock = int(burst), float(interval), clock
        self._lock = threading.Lock()
        self._win: Dict[str, List[float]] = {}  # key -> [window start, lines, suppressed]

    def check(self, key: str) -> Optional[int]:
        """None: suppress this line; else the number suppressed since the last line shown."""
        now = self.clock()
        with self._lock:
            w = self._win.get(key)
            if w is None or now - w[0] >= self.interval:
                suppressed = int(w[2]) if w is not None else 0
                self._win[key] = [now, 1, 0]
                return suppressed
            if w[1] < self.burst:
                w[1] += 1
                return 0
            w[2] += 1
            return None


def take_batch(q: "queue.Queue", timeout: float, max_batch: int) -> list:
    """What a handler thread works on next: one item (waiting up to `timeout`; [] if none came),
    then whatever else is already queued, up to max_batch, so work is handled in batches."""
    try:
        batch = [q.get(timeout=timeout)]
    except queue.Empty:
        return []
    while len(batch) < max_batch:
        try:
            batch.append(q.get_nowait())
        except queue.Empty:
            break
    return batch
