"""The server's state store: one SQLite file (WAL mode) per server, no pickle anywhere.

Tables (every row carries its job id, so one file can hold several jobs):

    jobs          job, JobConfig as JSON, method, created, finished
    rounds        job, round, status open|closed, plan (encoded protocol RoundPlan), deadline,
                  opened_at, closed_at, n_accepted, delta (its tensors as raw array bytes + JSON
                  metadata with each tensor's name and wire dtype), metrics JSON
    updates       job, round, device, msg_id, received_at, raw message bytes, status/reason of
                  the Ack that was sent, accepted/late flags, nbytes + sha256 of the message;
                  UNIQUE(job, device, msg_id). Accepted rows always keep `raw` (replay needs it);
                  late / duplicate rows may keep only nbytes + sha256 (raw = empty; the engine's
                  storage quotas, docs/server.md "Resource limits")
    method_state  job, round, scalars JSON, arrays as raw little-endian bytes + JSON metadata
                  (name, dtype, shape, offset); the state at the START of `round`
    devices       job, device, first_seen, last_seen, last status (state, round, text, JSON),
                  device_class

Durability: a transaction opened with durable=True runs with `PRAGMA synchronous=FULL`, so
the update rows and the round aggregation it contains survive a power cut before the engine
publishes any Ack; status-only batches use NORMAL (safe against a process crash).
Aggregating a round is ONE transaction (`commit_round`): new state + delta + round closed +
next round opened.

Plans and updates are stored as protocol messages, so a job belongs to the protocol version
that wrote it: resuming a job stored by another version (its plans' header) is refused
(`IncompatibleJob`); finish it with the edgefed that started it, or start a new job.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from edgefed.methods import JobConfig, MethodState
from edgefed.protocol import HEADER, MAGIC, PROTOCOL_VERSION, TENSOR_DTYPES, RoundDelta, Tensor

__all__ = ["Store", "StoreError", "IncompatibleJob", "ResumeInfo", "pack_arrays", "unpack_arrays",
           "encode_delta", "decode_delta", "u64_to_i64", "i64_to_u64"]

DELTA_FORMAT = 2  # delta_meta layout: named tensors with their wire dtype (protocol v2)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    job TEXT PRIMARY KEY, config TEXT NOT NULL, method TEXT NOT NULL,
    created REAL NOT NULL, finished REAL);
CREATE TABLE IF NOT EXISTS rounds (
    job TEXT NOT NULL, round INTEGER NOT NULL, status TEXT NOT NULL CHECK (status IN ('open', 'closed')),
    plan BLOB, deadline REAL, opened_at REAL, closed_at REAL, n_accepted INTEGER NOT NULL DEFAULT 0,
    delta_meta TEXT, delta BLOB, metrics TEXT,
    PRIMARY KEY (job, round));
CREATE TABLE IF NOT EXISTS updates (
    id INTEGER PRIMARY KEY AUTOINCREMENT, job TEXT NOT NULL, round INTEGER NOT NULL,
    device TEXT NOT NULL, msg_id INTEGER NOT NULL, received_at REAL NOT NULL, raw BLOB NOT NULL,
    status INTEGER NOT NULL, reason TEXT NOT NULL DEFAULT '',
    accepted INTEGER NOT NULL DEFAULT 0, late INTEGER NOT NULL DEFAULT 0,
    UNIQUE (job, device, msg_id));
CREATE INDEX IF NOT EXISTS updates_round ON updates (job, round, accepted);
CREATE TABLE IF NOT EXISTS method_state (
    job TEXT NOT NULL, round INTEGER NOT NULL, scalars TEXT NOT NULL, arrays_meta TEXT NOT NULL,
    arrays BLOB NOT NULL, saved_at REAL NOT NULL,
    PRIMARY KEY (job, round));
CREATE TABLE IF NOT EXISTS devices (
    job TEXT NOT NULL, device TEXT NOT NULL, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
    last_state TEXT NOT NULL DEFAULT '', last_round INTEGER NOT NULL DEFAULT -1,
    last_status TEXT NOT NULL DEFAULT '{}', device_class TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (job, device));
"""


class StoreError(RuntimeError):
    """The store is inconsistent or was asked for something it does not hold."""


class IncompatibleJob(StoreError):
    """The job was stored by another protocol version; this server cannot resume it."""

    def __init__(self, job: str, path: str, version: object):
        super().__init__(
            f"job {job!r} in {path} was stored by EdgeFed protocol v{version}; this server speaks protocol "
            f"v{PROTOCOL_VERSION}, whose plans, updates and deltas differ, so it cannot resume the job. Finish "
            f"the job with the edgefed version that started it (devices of that version too), or start a new "
            f"job (another --job id, or a new --db file) with this version.")
        self.job, self.version = job, version


# --------------------------------------------------------------------------- codecs (no pickle)

_U64 = 1 << 64


def u64_to_i64(v: int) -> int:
    """SQLite INTEGER is signed 64-bit; msg ids are u64: store them two's-complement."""
    v = int(v)
    return v - _U64 if v >= (1 << 63) else v


def i64_to_u64(v: int) -> int:
    v = int(v)
    return v + _U64 if v < 0 else v


def pack_arrays(arrays: Dict[str, np.ndarray]) -> Tuple[str, bytes]:
    """Named numeric arrays -> (JSON metadata, one blob of raw little-endian bytes)."""
    meta, parts, off = [], [], 0
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.kind not in "biuf":
            raise StoreError(f"array {name!r} has dtype {a.dtype}; only bool/int/float arrays "
                             f"are stored (no objects, no pickle)")
        dt = a.dtype.newbyteorder("<") if a.dtype.itemsize > 1 else a.dtype
        b = np.ascontiguousarray(a, dtype=dt).tobytes()
        meta.append({"name": name, "dtype": np.dtype(dt).str, "shape": list(a.shape),
                     "offset": off, "nbytes": len(b)})
        parts.append(b)
        off += len(b)
    return json.dumps(meta), b"".join(parts)


def unpack_arrays(meta_json: str, blob: bytes) -> Dict[str, np.ndarray]:
    out: Dict[str, np.ndarray] = {}
    blob = bytes(blob or b"")
    for m in json.loads(meta_json or "[]"):
        dt = np.dtype(m["dtype"])
        if dt.kind not in "biuf":
            raise StoreError(f"stored array {m['name']!r} has dtype {dt}")
        shape = tuple(int(s) for s in m["shape"])
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if count * dt.itemsize != m["nbytes"] or m["offset"] + m["nbytes"] > len(blob):
            raise StoreError(f"stored array {m['name']!r}: metadata does not match the blob")
        a = np.frombuffer(blob, dtype=dt, count=count, offset=m["offset"]).reshape(shape)
        out[m["name"]] = a.astype(dt.newbyteorder("="), copy=True)
    return out


def encode_delta(delta: RoundDelta) -> Tuple[str, bytes]:
    """A RoundDelta as (JSON metadata, raw bytes): its tensors, each with its name and wire dtype
    (f32, u32 seed indices, bf16 bit patterns, ...), bit for bit."""
    arrays: Dict[str, np.ndarray] = {}
    tensors = []
    for i, t in enumerate(delta.tensors or []):
        arrays[f"tensor{i}"] = np.asarray(t.data, TENSOR_DTYPES[t.dtype][1])
        tensors.append([t.name, t.dtype])
    meta, blob = pack_arrays(arrays)
    return json.dumps({"format": DELTA_FORMAT, "round": int(delta.round), "arrays": json.loads(meta),
                       "tensors": tensors}), blob


def decode_delta(meta_json: str, blob: bytes) -> RoundDelta:
    meta = json.loads(meta_json)
    if meta.get("format") != DELTA_FORMAT:
        raise StoreError(f"the stored delta of round {meta.get('round')} was written by EdgeFed protocol v1 "
                         f"(seeds / coeffs arrays); this edgefed reads protocol v{PROTOCOL_VERSION} deltas: finish "
                         f"that job with the edgefed version that started it, or start a new job")
    arrays = unpack_arrays(json.dumps(meta["arrays"]), blob)
    tensors = [Tensor(name, arrays[f"tensor{i}"], dtype) for i, (name, dtype) in enumerate(meta["tensors"])]
    return RoundDelta(round=int(meta["round"]), tensors=tensors)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def dumps(obj: Any) -> str:
    return json.dumps(obj, default=_json_default, allow_nan=False)


# --------------------------------------------------------------------------- resume bundle

@dataclass
class ResumeInfo:
    """Everything the engine needs to continue a job after a restart."""
    config: JobConfig
    created: float
    finished: Optional[float]
    round: int                      # the open round (== config.rounds when finished)
    state: MethodState              # the global state at the start of `round`
    plan: Optional[bytes]           # encoded RoundPlan of the open round (None when finished)
    deadline: float
    opened_at: float
    accepted: List[Tuple[str, int, bytes]] = field(default_factory=list)  # (device, msg_id, raw), arrival order
    devices: List[dict] = field(default_factory=list)
    history: List[dict] = field(default_factory=list)  # metrics of closed rounds, in order


# --------------------------------------------------------------------------- the store

class Store:
    """SQLite store of one server. Thread-safe (one connection behind a lock)."""

    def __init__(self, path: str | Path, *, timeout: float = 30.0, keep_states: int = 4):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.keep_states = max(1, int(keep_states))  # method states kept besides round 0
        self._lock = threading.RLock()
        self._depth = 0
        self._conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None,
                                     check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        with self.transaction():
            for stmt in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                self._conn.execute(stmt)
            row = self._conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                self._conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise StoreError(f"{self.path} has store schema {row[0]}, this server writes "
                                 f"{SCHEMA_VERSION}; use a new --db file or a matching edgefed")
            # additive columns (older files gain them; older code ignores them)
            cols = {r[1] for r in self._conn.execute("PRAGMA table_info(updates)").fetchall()}
            if "nbytes" not in cols:
                self._conn.execute("ALTER TABLE updates ADD COLUMN nbytes INTEGER")
            if "sha256" not in cols:
                self._conn.execute("ALTER TABLE updates ADD COLUMN sha256 TEXT NOT NULL DEFAULT ''")

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None  # type: ignore[assignment]

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE .. COMMIT (ROLLBACK on error). Reentrant: inner blocks join the
        outer transaction as a SAVEPOINT (rolled back alone if the inner block raises).
        durable=False (synchronous=NORMAL) only for batches that precede no Ack."""
        with self._lock:
            if self._conn is None:
                raise StoreError("store is closed")
            if self._depth:  # nested: a savepoint, so a failing inner block leaves no trace
                name = f"sp{self._depth}"
                self._conn.execute(f"SAVEPOINT {name}")
                self._depth += 1
                try:
                    yield self._conn
                except BaseException:
                    self._depth -= 1
                    self._conn.execute(f"ROLLBACK TO {name}")
                    self._conn.execute(f"RELEASE {name}")
                    raise
                self._depth -= 1
                self._conn.execute(f"RELEASE {name}")
                return
            self._conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self._conn
            except BaseException:
                self._depth = 0
                self._conn.execute("ROLLBACK")
                raise
            self._depth = 0
            try:
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def _q(self, sql: str, args: Sequence = ()) -> List[tuple]:
        with self._lock:
            if self._conn is None:
                raise StoreError("store is closed")
            return self._conn.execute(sql, args).fetchall()

    def _x(self, sql: str, args: Sequence = ()) -> sqlite3.Cursor:
        with self.transaction():
            return self._conn.execute(sql, args)

    # ------------------------------------------------------------------ jobs
    def create_job(self, cfg: JobConfig, created: float) -> None:
        self._x("INSERT INTO jobs (job, config, method, created) VALUES (?, ?, ?, ?)",
                (cfg.job, dumps(cfg.to_dict()), cfg.method, float(created)))

    def has_job(self, job: str) -> bool:
        return bool(self._q("SELECT 1 FROM jobs WHERE job=?", (job,)))

    def load_job(self, job: str) -> Optional[JobConfig]:
        rows = self._q("SELECT config FROM jobs WHERE job=?", (job,))
        return JobConfig.from_dict(json.loads(rows[0][0])) if rows else None

    def job_ids(self) -> List[str]:
        return [r[0] for r in self._q("SELECT job FROM jobs ORDER BY created")]

    def job_info(self, job: str) -> Optional[dict]:
        rows = self._q("SELECT created, finished FROM jobs WHERE job=?", (job,))
        return {"created": rows[0][0], "finished": rows[0][1]} if rows else None

    def set_finished(self, job: str, t: Optional[float]) -> None:
        self._x("UPDATE jobs SET finished=? WHERE job=?", (t, job))

    # ------------------------------------------------------------------ rounds
    def open_round(self, job: str, rnd: int, plan: bytes, deadline: float, opened_at: float) -> None:
        self._x("INSERT INTO rounds (job, round, status, plan, deadline, opened_at) "
                "VALUES (?, ?, 'open', ?, ?, ?)", (job, int(rnd), plan, float(deadline), float(opened_at)))

    def update_plan(self, job: str, rnd: int, plan: bytes, deadline: float) -> None:
        """Re-published plan of an open round (deadline extended)."""
        cur = self._x("UPDATE rounds SET plan=?, deadline=? WHERE job=? AND round=? AND status='open'",
                      (plan, float(deadline), job, int(rnd)))
        if cur.rowcount != 1:
            raise StoreError(f"round {rnd} of job {job!r} is not open")

    def open_round_row(self, job: str) -> Optional[dict]:
        rows = self._q("SELECT round, plan, deadline, opened_at FROM rounds WHERE job=? AND status='open' "
                       "ORDER BY round", (job,))
        if len(rows) > 1:
            raise StoreError(f"job {job!r} has {len(rows)} open rounds; the store is inconsistent")
        if not rows:
            return None
        r = rows[0]
        return {"round": r[0], "plan": bytes(r[1]), "deadline": r[2], "opened_at": r[3]}

    def round_plan(self, job: str, rnd: int) -> Optional[bytes]:
        rows = self._q("SELECT plan FROM rounds WHERE job=? AND round=?", (job, int(rnd)))
        return bytes(rows[0][0]) if rows and rows[0][0] is not None else None

    def closed_rounds(self, job: str) -> List[int]:
        return [r[0] for r in self._q("SELECT round FROM rounds WHERE job=? AND status='closed' "
                                      "ORDER BY round", (job,))]

    def round_metrics(self, job: str) -> List[dict]:
        out = []
        for rnd, n, closed, metrics in self._q(
                "SELECT round, n_accepted, closed_at, metrics FROM rounds WHERE job=? AND status='closed' "
                "ORDER BY round", (job,)):
            m = json.loads(metrics) if metrics else {}
            m.setdefault("round", rnd)
            m.setdefault("n_updates", n)
            m.setdefault("closed_at", closed)
            out.append(m)
        return out

    def load_delta(self, job: str, rnd: int) -> Optional[RoundDelta]:
        """The delta produced by aggregating round `rnd` (labelled rnd, as the strategy made it)."""
        rows = self._q("SELECT delta_meta, delta FROM rounds WHERE job=? AND round=? AND status='closed'",
                       (job, int(rnd)))
        if not rows or rows[0][0] is None:
            return None
        return decode_delta(rows[0][0], rows[0][1])

    def load_deltas(self, job: str, first: int, last: int) -> List[RoundDelta]:
        """Deltas of aggregated rounds first..last inclusive, in order; StoreError if one is missing."""
        if last < first:
            return []
        rows = self._q("SELECT round, delta_meta, delta FROM rounds WHERE job=? AND status='closed' "
                       "AND round BETWEEN ? AND ? ORDER BY round", (job, int(first), int(last)))
        if [r[0] for r in rows] != list(range(first, last + 1)):
            raise StoreError(f"deltas of rounds {first}..{last} of job {job!r} are not all stored")
        return [decode_delta(r[1], r[2]) for r in rows]

    # ------------------------------------------------------------------ method state
    def save_state(self, job: str, rnd: int, state: MethodState, saved_at: Optional[float] = None) -> None:
        meta, blob = pack_arrays(state.arrays)
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO method_state VALUES (?, ?, ?, ?, ?, ?)",
                      (job, int(rnd), dumps(state.scalars), meta, blob,
                       time.time() if saved_at is None else float(saved_at)))
            # keep round 0 (the start, for replays) and the last keep_states states
            c.execute("DELETE FROM method_state WHERE job=? AND round > 0 AND round <= ?",
                      (job, int(rnd) - self.keep_states))

    def load_state(self, job: str, rnd: Optional[int] = None) -> Optional[Tuple[int, MethodState]]:
        """(round, state at the start of that round): the given round, or the latest one."""
        if rnd is None:
            rows = self._q("SELECT round, scalars, arrays_meta, arrays FROM method_state WHERE job=? "
                           "ORDER BY round DESC LIMIT 1", (job,))
        else:
            rows = self._q("SELECT round, scalars, arrays_meta, arrays FROM method_state WHERE job=? "
                           "AND round=?", (job, int(rnd)))
        if not rows:
            return None
        r = rows[0]
        return r[0], MethodState(scalars=json.loads(r[1]), arrays=unpack_arrays(r[2], r[3]))

    # ------------------------------------------------------------------ updates
    def find_update(self, job: str, device: str, msg_id: int) -> Optional[dict]:
        rows = self._q("SELECT round, status, reason, accepted, late FROM updates "
                       "WHERE job=? AND device=? AND msg_id=?", (job, device, u64_to_i64(msg_id)))
        if not rows:
            return None
        r = rows[0]
        return {"round": r[0], "status": r[1], "reason": r[2], "accepted": bool(r[3]), "late": bool(r[4])}

    def insert_update(self, job: str, rnd: int, device: str, msg_id: int, received_at: float,
                      raw: bytes, status: int, reason: str = "", accepted: bool = False,
                      late: bool = False, keep_raw: bool = True) -> None:
        """One update row. keep_raw=False stores only the message's size and sha256 (a late or
        duplicate update past its quota); accepted rows must keep it (replay_log reads it)."""
        raw = bytes(raw)
        if accepted and not keep_raw:
            raise StoreError("an accepted update must be stored with its raw bytes")
        self._x("INSERT INTO updates (job, round, device, msg_id, received_at, raw, status, reason, "
                "accepted, late, nbytes, sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job, int(rnd), device, u64_to_i64(msg_id), float(received_at),
                 raw if keep_raw else b"", int(status), reason, int(bool(accepted)), int(bool(late)),
                 len(raw), hashlib.sha256(raw).hexdigest()))

    def withdraw_accepted(self, job: str, rnd: int, reason: str) -> int:
        """The accepted updates of an open round no longer count (a failed secure-aggregation
        attempt: their masks can never be removed). Kept as rows, with the reason."""
        cur = self._x("UPDATE updates SET accepted=0, reason=? WHERE job=? AND round=? AND accepted=1",
                      (reason, job, int(rnd)))
        return cur.rowcount

    def accepted_devices(self, job: str) -> List[str]:
        """Devices with at least one accepted update in the job (they count toward targets)."""
        return [r[0] for r in self._q("SELECT DISTINCT device FROM updates WHERE job=? AND accepted=1",
                                      (job,))]

    def count_raw_late(self, job: str, device: str) -> int:
        """Late rows of a device that still hold their raw bytes (the per-device quota)."""
        return int(self._q("SELECT COUNT(*) FROM updates WHERE job=? AND device=? AND late=1 "
                           "AND length(raw) > 0", (job, device))[0][0])

    def accepted_updates(self, job: str, rnd: int) -> List[Tuple[str, int, bytes]]:
        """(device, msg_id, raw bytes) of the accepted updates of a round in arrival order (the
        row id): the order the engine fed them to the round's accumulator, so a resume or a
        replay feeds a streaming strategy the same sequence."""
        return [(d, i64_to_u64(m), bytes(raw)) for d, m, raw in self._q(
            "SELECT device, msg_id, raw FROM updates WHERE job=? AND round=? AND accepted=1 "
            "ORDER BY id", (job, int(rnd)))]

    def update_log(self, job: str) -> List[dict]:
        """Every stored update row (accepted, late, duplicate-of-round), in arrival order."""
        return [{"round": r, "device": d, "msg_id": i64_to_u64(m), "received_at": t, "status": s,
                 "reason": why, "accepted": bool(a), "late": bool(late), "nbytes": n,
                 "raw_bytes": rb, "raw_kept": rb > 0 or n == 0, "sha256": h}
                for r, d, m, t, s, why, a, late, n, rb, h in self._q(
                    "SELECT round, device, msg_id, received_at, status, reason, accepted, late, "
                    "COALESCE(nbytes, length(raw)), length(raw), sha256 FROM updates WHERE job=? "
                    "ORDER BY id", (job,))]

    def update_counts(self, job: str) -> dict:
        r = self._q("SELECT COALESCE(SUM(accepted), 0), COALESCE(SUM(late), 0), COUNT(*) "
                    "FROM updates WHERE job=?", (job,))[0]
        return {"accepted": r[0], "late": r[1], "stored": r[2]}

    # ------------------------------------------------------------------ devices
    def upsert_device(self, job: str, device: str, seen_at: float, state: str, rnd: int,
                      device_class: str, status: dict) -> None:
        self._x("INSERT INTO devices (job, device, first_seen, last_seen, last_state, last_round, "
                "last_status, device_class) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (job, device) DO UPDATE SET last_seen=excluded.last_seen, "
                "last_state=excluded.last_state, last_round=excluded.last_round, "
                "last_status=excluded.last_status, device_class=excluded.device_class",
                (job, device, float(seen_at), float(seen_at), state, int(rnd), dumps(status), device_class))

    def devices(self, job: str) -> List[dict]:
        return [{"device": d, "first_seen": f, "last_seen": ls, "state": st, "round": r,
                 "status": json.loads(js), "device_class": dc}
                for d, f, ls, st, r, js, dc in self._q(
                    "SELECT device, first_seen, last_seen, last_state, last_round, last_status, "
                    "device_class FROM devices WHERE job=? ORDER BY device", (job,))]

    # ------------------------------------------------------------------ the round commit
    def start_job(self, cfg: JobConfig, state: MethodState, plan: bytes, deadline: float,
                  now: float) -> None:
        """Create the job, its initial state and round 0, in one transaction."""
        with self.transaction():
            self.create_job(cfg, now)
            self.save_state(cfg.job, 0, state, now)
            self.open_round(cfg.job, 0, plan, deadline, now)

    def commit_round(self, job: str, rnd: int, new_state: MethodState, delta: RoundDelta,
                     closed_at: float, n_accepted: int, metrics: dict,
                     next_plan: Optional[bytes], next_deadline: float = 0.0,
                     finished: bool = False) -> None:
        """ONE transaction: the new state (start of rnd+1), the delta, round rnd closed, and
        round rnd+1 opened with its plan (or the job marked finished)."""
        dmeta, dblob = encode_delta(delta)
        with self.transaction() as c:
            cur = c.execute("UPDATE rounds SET status='closed', closed_at=?, n_accepted=?, delta_meta=?, "
                            "delta=?, metrics=? WHERE job=? AND round=? AND status='open'",
                            (float(closed_at), int(n_accepted), dmeta, dblob, dumps(metrics), job, int(rnd)))
            if cur.rowcount != 1:
                raise StoreError(f"round {rnd} of job {job!r} is not open; cannot close it")
            self.save_state(job, rnd + 1, new_state, closed_at)
            if next_plan is not None:
                self.open_round(job, rnd + 1, next_plan, next_deadline, closed_at)
            if finished:
                c.execute("UPDATE jobs SET finished=? WHERE job=?", (float(closed_at), job))

    # ------------------------------------------------------------------ resume
    def stored_protocol(self, job: str) -> Optional[int]:
        """The protocol version of the job's stored plans (the header of its first one), or None."""
        rows = self._q("SELECT plan FROM rounds WHERE job=? AND plan IS NOT NULL ORDER BY round LIMIT 1", (job,))
        if not rows:
            return None
        head = bytes(rows[0][0])[:HEADER.size]
        if len(head) < HEADER.size or head[:4] != MAGIC:
            return None  # not a message at all: decoding it fails later with its own error
        return int(HEADER.unpack(head)[1])

    def check_protocol(self, job: str) -> None:
        """Refuse (IncompatibleJob) a job whose stored messages are of another protocol version."""
        version = self.stored_protocol(job)
        if version is not None and version != PROTOCOL_VERSION:
            raise IncompatibleJob(job, self.path, version)

    def load_resume(self, job: str) -> Optional[ResumeInfo]:
        cfg = self.load_job(job)
        if cfg is None:
            return None
        self.check_protocol(job)
        info = self.job_info(job) or {}
        latest = self.load_state(job)
        if latest is None:
            raise StoreError(f"job {job!r} has no stored method state")
        state_round, state = latest
        row = self.open_round_row(job)
        closed = self.closed_rounds(job)
        if row is None:
            if not closed or state_round != closed[-1] + 1:
                raise StoreError(f"job {job!r} has no open round and its state (round {state_round}) "
                                 f"does not follow the last closed round")
            rnd, plan, deadline, opened_at = state_round, None, 0.0, 0.0
        else:
            rnd, plan, deadline, opened_at = row["round"], row["plan"], row["deadline"], row["opened_at"]
            if state_round != rnd:
                raise StoreError(f"job {job!r}: open round {rnd} but the latest state is for round "
                                 f"{state_round}")
        return ResumeInfo(config=cfg, created=info.get("created", 0.0), finished=info.get("finished"),
                          round=rnd, state=state, plan=plan, deadline=deadline or 0.0,
                          opened_at=opened_at or 0.0,
                          accepted=self.accepted_updates(job, rnd) if plan is not None else [],
                          devices=self.devices(job), history=self.round_metrics(job))
