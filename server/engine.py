"""The aggregation server's engine: the shell that wires the round's parts to threads, the
transport and the store.

    round_policy.py  when a round closes, waits or is extended (pure: numbers in, decision out)
    admission.py     what happens to an inbound update (accept / late / duplicate / reject)
    sync.py          SyncReply bytes (deltas from a cache or the store, or the full state)
    secure_round.py  the secure-aggregation stages of a round
    inbound.py       the bounded inbound queue between transport callbacks and the engine
    devices.py       the devices of the job: their last Status, which are proven
    engine.py        this file: group commit of each batch, message dispatch, the store
                     writes and Acks the decisions call for, the round's aggregation and
                     commit, publishing, status and metrics

One engine thread owns all job state. Transport callbacks only put (topic, payload) on a
queue, so they never block the transport's dispatcher (and the in-process transport's
synchronous mode works too). The engine thread takes what is queued as one batch, handles
every message inside ONE SQLite transaction (each message in its own savepoint), commits
(synchronous=FULL) and only then publishes the Acks and plans of that batch: group commit,
so one fsync covers hundreds of updates while no Ack ever precedes its row.

Round state machine (docs/server.md has the policies in prose):

    open round r: plan published (retained), deadline = now + round_timeout
      -> collect accepted updates (one per device)
      -> each accepted update is stored, then added to the round's accumulator
         (strategy.start_round; the default buffers and aggregates ordered by device id)
      -> close when accepted >= target, or at the deadline when accepted >= min_devices;
         below quorum at the deadline: deadline += round_timeout, same plan re-published
      -> finalize, commit state+delta+close+open in one transaction, publish plan r+1
         (carrying the delta) and JobState.

The engine knows no method by name: everything method-specific goes through the strategy.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from edgefed.methods import JobConfig, MethodState, ServerStrategy, get_method
from edgefed.methods.base import RoundAccumulator
from edgefed.protocol import (DEFAULT_LIMITS, Ack, AckStatus, JobState, Limits, MessageTooLarge,
                              ProtocolError, RoundDelta, RoundPlan, Status, SyncRequest, Tensor,
                              Topics, Update, check_topic, decode, parse_topic)
from edgefed.assign import device_rules, plan_for
from edgefed.replica import TrainablesReplica, artifact_id

from . import round_policy
from .admission import AcceptedMeta, Admission, Decision, ExtraRowQuota, Keep, Verdict, reason_class, reject
from .devices import DeviceRegistry
from .inbound import InboundQueue, Offer, TooLarge
from .limits import DEFAULT_RESOURCE_LIMITS, LogLimiter, ResourceLimits, sanitize
from .round_policy import Action, ExpectedChange, RoundView
from .secure_round import (SecureRound, SecureRoundFailed, check_secure_job, max_cohort, secure_on,
                           secure_plan_params, stage_window)
from .workers import WorkerHub
from .store import ResumeInfo, Store, StoreError
from .sync import SyncBuilder, full_state, history_from

# ResourceLimits and sanitize live in limits.py, reason_class and AcceptedMeta in admission.py;
# callers import them from here as before
__all__ = ["Server", "ResourceLimits", "DEFAULT_RESOURCE_LIMITS", "reason_class", "state_digest",
           "artifact_id", "sanitize", "AcceptedMeta"]

RoundListener = Callable[[dict], None]

_STOP = object()
_WAKE = object()
_MAX_REASON = 1000  # bytes; Ack.reason is limited to Limits.max_text (1024)


def state_digest(tensors: Sequence[Tensor]) -> str:
    """sha256 over (name, shape, float32 bytes) of a strategy's full state."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.name.encode())
        h.update(repr(tuple(t.data.shape)).encode())
        h.update(np.ascontiguousarray(t.data, dtype="<f4").tobytes())
    return h.hexdigest()


def _is_status_topic(topic: str) -> bool:
    parts = topic.split("/")
    return len(parts) >= 2 and parts[-2] == "status"


def _truncate(text: str, limit: int = _MAX_REASON) -> str:
    b = text.encode("utf-8")
    return text if len(b) <= limit else b[:limit].decode("utf-8", "ignore")


def _is_store_error(e: BaseException) -> bool:
    return isinstance(e, StoreError) or type(e).__module__.startswith("sqlite3")


class Server:
    """The aggregation server of one job over a transport, persisting to a Store.

    Thread model: start() subscribes and starts the engine thread; transport callbacks only
    enqueue. status()/summary() may be called from any thread.
    """

    def __init__(self, transport, store: Store, job: JobConfig, *,
                 strategy: Optional[ServerStrategy] = None, http_port: Optional[int] = None,
                 allow_unknown_devices: bool = False,
                 clock: Callable[[], float] = time.time, logger: Optional[logging.Logger] = None,
                 history: Optional[int] = None, settle: float = 0.3, max_batch: int = 2048,
                 limits: Limits = DEFAULT_LIMITS,
                 resource_limits: ResourceLimits = DEFAULT_RESOURCE_LIMITS,
                 http_allowed_hosts: Sequence[str] = (), signing: Any = None,
                 share_group: Optional[str] = None, worker_timeout: float = 10.0):
        if int(job.rounds) < 1 or not float(job.round_timeout) > 0:
            raise ValueError(f"job {job.job!r}: rounds must be >= 1 and round_timeout > 0 "
                             f"(got {job.rounds}, {job.round_timeout})")
        self.transport = transport
        self.store = store
        self.job = job
        self._strategy_given = strategy is not None
        self.strategy = strategy if strategy is not None else get_method(job.method).server()
        self.http_port = http_port
        self.allow_unknown_devices = allow_unknown_devices
        self.clock = clock
        self.log = logger or logging.getLogger("edgefed.server")
        self.history_limit = history
        self.settle = settle
        self.max_batch = max(1, int(max_batch))
        self.limits = limits
        self.rlimits = resource_limits
        self.http_allowed_hosts = tuple(http_allowed_hosts)
        # signing: an edgefed.security.signing.ServerSigning (job key + device registry); None =
        # development mode: unsigned messages out, device messages taken without a signature.
        self.signing = signing
        self._signer = signing.signer if signing is not None else None
        self._verifier = signing.verifier if signing is not None else None
        self._worker_verifier = getattr(signing, "worker_verifier", None)
        if signing is None:
            from edgefed.security.signing import warn_unsigned
            warn_unsigned(self.log, "server")
        self._loglim = LogLimiter(resource_limits.log_burst, resource_limits.log_interval_s)
        self.topics = Topics(job.job)
        self.model_id = artifact_id(job.artifact)

        self._lock = threading.RLock()
        self.inq = InboundQueue(limits.max_message_bytes, resource_limits.inbound_bytes,
                                resource_limits.inbound_messages)
        self._progress = threading.Condition(self._lock)
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self._started = False
        self._stopped = False
        self._listeners: List[RoundListener] = []
        self._http = None
        self._subscribed: List[str] = []
        self._pending: "deque" = deque()  # publish handles not yet acknowledged (flush())
        self._pending_lock = threading.Lock()

        # job state (engine thread; read under _lock)
        self.round = 0
        self.state: Optional[MethodState] = None
        self.plan: Optional[RoundPlan] = None
        self.plan_bytes = b""
        self.deadline = 0.0
        self.opened_at = 0.0
        self.extensions = 0
        self.done = False
        self.accepted: Dict[str, Tuple[AcceptedMeta, int]] = {}  # device -> (metadata, raw size)
        self.acc: Optional[RoundAccumulator] = None  # the open round's aggregation (not secure rounds)
        self.expected: Set[str] = set()   # devices that count toward this round's target
        self.registry = DeviceRegistry(resource_limits.status_devices, resource_limits.max_devices)
        self.admission = Admission(self.topics, allow_unknown_devices=allow_unknown_devices,
                                   max_devices=resource_limits.max_devices)
        self.quota = ExtraRowQuota(resource_limits, lambda d: self.store.count_raw_late(self.job.job, d))
        self.sync = SyncBuilder(store, job.job, limits, self._signer)
        self.history: List[dict] = []
        self.digest = ""
        self.error: Optional[str] = None
        self.secure: Optional[SecureRound] = None  # this round's secure aggregation (secure jobs)
        self.replica: Optional[TrainablesReplica] = None  # the global trainables (state digest)
        check_secure_job(self.job, self.strategy)
        # aggregation workers (server/workers.py): updates through a shared subscription
        self.hub: Optional[WorkerHub] = None
        if share_group:
            self._check_worker_job()
            self.hub = WorkerHub(self, share_group, worker_timeout)
        self.metrics: Dict[str, Any] = {
            "secagg_restarts": 0, "secagg_rejected": 0, "device_errors": 0,
            "accepted": 0, "late": 0, "duplicates": 0, "rejected": {}, "bytes_received": 0,
            "messages": 0, "sync_replies": 0, "sync_full": 0, "extensions": 0,
            "round_duration_sum": 0.0, "round_duration_count": 0, "last_round_duration": 0.0,
            "train_loss": float("nan"), "store_errors": 0,
            # resource limits (docs/server.md "Resource limits")
            "late_raw_stored": 0, "late_digest_stored": 0, "late_not_stored": 0,
            "duplicates_digest_stored": 0, "duplicates_not_stored": 0,
            "devices_refused": 0, "inbound_dropped": 0, "inbound_dropped_bytes": 0,
            "inbound_too_large": 0, "log_lines_suppressed": 0}

    # ================================================================== public API
    def add_round_listener(self, fn: RoundListener) -> None:
        """fn(summary) after each aggregated round (round, n_updates, devices, train_loss,
        bytes_in, bytes_out, duration_s, strategy, ...). Called on the engine thread."""
        self._listeners.append(fn)

    def start(self) -> "Server":
        """Subscribe, resume from the store (or create the job), publish JobState and plan."""
        with self._lock:
            if self._started:
                return self
            self._started = True
        if not self.transport.connected:
            self.transport.connect()
        resume = self.store.load_resume(self.job.job)
        if resume is not None:
            self._resume(resume)
        else:
            self._open_replica(0)
        # Statuses first: retained ones tell us who is online before the plan's target is set.
        self._subscribe(self.topics.all_statuses())
        if self.settle > 0:
            time.sleep(self.settle)
        self._drain_now()  # statuses; on resume also the deadline policy (close or extend)
        now = self.clock()
        outbox: List[Tuple[str, bytes, bool]] = []
        with self._lock:
            if resume is None:
                self.state = self.strategy.init_state(self.job)
                self.round = 0
                self._set_plan(self._build_plan(0, None, now + self.job.round_timeout), now)
                self.store.start_job(self.job, self.state, self.plan_bytes, self.deadline, now)
                self._open_acc()
                self.log.info("job %s created: method %s, %d rounds, store %s", self.job.job,
                              self.job.method, self.job.rounds, self.store.path)
                self.expected = self._countable_online()
            if not self.done and self.plan is not None and self.plan.params.get("secagg_len"):
                if resume is not None:  # the open attempt's keys and shares died with the old process
                    with self.store.transaction():
                        self._restart_secure(now, [], "the server restarted")
                else:
                    self._open_secure(self.plan, now)
            self._refresh_digest()
            outbox.append((self.topics.state(), self._job_state(now).encode(self.limits, signer=self._signer), True))
            if not self.done:
                outbox.append((self.topics.plan(), self.plan_bytes, True))
            if self.hub is not None:
                outbox.append(self.hub.control())
        if self.hub is not None:
            self._subscribe(self.topics.all_worker_statuses())
            self._subscribe(self.topics.all_worker_reports())
            self._subscribe(self.topics.shared_updates(self.hub.group))
        else:
            self._subscribe(self.topics.all_updates())
        self._subscribe(self.topics.all_sync_requests())
        if self._secure_on():
            self._subscribe(self.topics.all_secagg())
        self._publish_all(outbox)
        if self.http_port is not None:
            from .http_status import StatusHTTPServer
            self._http = StatusHTTPServer(self, port=self.http_port,
                                          allowed_hosts=self.http_allowed_hosts)
            self._http.start()
            self.http_port = self._http.port
            self.log.info("status page on http://127.0.0.1:%d/", self.http_port)
        self._thread = threading.Thread(target=self._loop, name=f"edgefed-server-{self.job.job}",
                                        daemon=True)
        self._thread.start()
        self.log.info("serving job %s: round %d%s", self.job.job, self.round,
                      " (finished)" if self.done else f", target {self._target()} updates")
        return self

    def run(self, until_round: Optional[int] = None, stop_event: Optional[threading.Event] = None,
            timeout: Optional[float] = None) -> dict:
        """Block until `until_round` rounds (default job.rounds) are aggregated, stop_event is
        set, timeout seconds passed or the server stopped; return summary()."""
        if not self._started:
            self.start()
        goal = self.job.rounds if until_round is None else int(until_round)
        end = None if timeout is None else time.monotonic() + timeout
        with self._progress:
            while True:
                if self.done or self.round >= goal or self._stopped:
                    break
                if stop_event is not None and stop_event.is_set():
                    break
                if self._thread is not None and not self._thread.is_alive():
                    break
                wait = 0.1 if end is None else min(0.1, end - time.monotonic())
                if wait <= 0:
                    break
                self._progress.wait(wait)
        return self.summary()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the engine (pending messages are handled first), unsubscribe, stop HTTP.
        The transport and the store stay open: they belong to the caller."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._stopping.set()
        self.inq.signal(_STOP)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        for flt in self._subscribed:
            try:
                self.transport.unsubscribe(flt)
            except Exception:  # transport may already be closed
                pass
        if self._http is not None:
            self._http.stop()
        with self._progress:
            self._progress.notify_all()

    def poke(self) -> None:
        """Wake the engine (e.g. after advancing a fake clock in tests)."""
        self.inq.signal(_WAKE)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Until every queued message has been handled (tests, benchmarks)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.inq.idle():
                return True
            time.sleep(0.002)
        return False

    def target(self) -> int:
        with self._lock:
            return self._target()

    def status(self) -> dict:
        """A JSON-able snapshot for /status."""
        with self._lock:
            now = self.clock()
            phase = round_policy.phase(self.done, self._stopped, self.plan is not None, self.extensions)
            return {
                "job": self.job.to_dict(), "model": self.model_id, "round": self.round,
                "rounds": self.job.rounds, "phase": phase, "done": self.done,
                "deadline": self.deadline, "deadline_in_s": max(0.0, self.deadline - now) if not self.done else 0.0,
                "accepted_this_round": len(self.accepted), "target": self._target(),
                "expected": sorted(self.expected)[:self.rlimits.status_devices],
                "expected_count": len(self.expected), "extensions": self.extensions,
                "devices": self.registry.listed(),
                "devices_summary": self.registry.summary(self.metrics["devices_refused"]),
                "devices_online": self._online(),
                "inbound": self.inbound(),
                "history": list(self.history), "strategy": self._strategy_summary(),
                "digest": self.digest, "history_from": self._history_from(),
                "metrics": self._metrics_copy(), "http_port": self.http_port, "error": self.error,
                **({"workers": self.hub.summary()} if self.hub is not None else {}),
                "now": now}

    def inbound(self) -> dict:
        """The inbound queue's accounting: what is queued or being handled, its peak, the budget."""
        return self.inq.snapshot()

    @property
    def devices(self) -> Dict[str, dict]:
        """device -> what its last Status said (server/devices.py)."""
        return self.registry.devices

    def summary(self) -> dict:
        with self._lock:
            return {"job": self.job.job, "method": self.job.method, "round": self.round,
                    "rounds": self.job.rounds, "rounds_completed": self.round, "done": self.done,
                    "updates_accepted": self.metrics["accepted"],
                    "updates_late": self.metrics["late"],
                    "updates_rejected": sum(self.metrics["rejected"].values()),
                    "rejected_by_reason": dict(self.metrics["rejected"]),
                    "history": list(self.history), "strategy": self._strategy_summary(),
                    "digest": self.digest, "error": self.error}

    def metrics_snapshot(self) -> dict:
        with self._lock:
            m = self._metrics_copy()
            m.update(round=self.round, devices_online=self._online(), job=self.job.job,
                     devices_registered=len(self.devices))
            dp = {k: v for k, v in self._strategy_summary().items() if k.startswith("dp_")}
            m.update(dp)
        inb = self.inbound()
        m.update(inbound_bytes=inb["bytes"], inbound_messages=inb["messages"],
                 inbound_peak_bytes=inb["peak_bytes"], inbound_budget_bytes=inb["budget_bytes"])
        return m

    # ================================================================== internals: setup
    def _subscribe(self, flt: str) -> None:
        self.transport.subscribe(flt, self._on_message)
        self._subscribed.append(flt)

    def _on_message(self, topic: str, payload: bytes) -> None:  # transport dispatcher thread
        """Offer a message to the bounded inbound queue (server/inbound.py); never blocks. A
        dropped one is counted (inbound_dropped) and logged (rate-limited), not acked."""
        offer = self.inq.offer(topic, payload)
        if offer is Offer.TOO_LARGE:
            self.metrics["inbound_too_large"] += 1
        elif offer is Offer.DROPPED:
            self.metrics["inbound_dropped"] += 1
            self.metrics["inbound_dropped_bytes"] += len(payload)
            self._warn("inbound", "inbound queue full (%d bytes / %d messages budget): dropped a "
                       "%d-byte message on %s, not acked (%d dropped so far)", self.inq.budget_bytes,
                       self.inq.budget_messages, len(payload), self._safe(topic), self.metrics["inbound_dropped"])

    def _safe(self, value: Any) -> str:
        return sanitize(value, self.rlimits.log_chars)

    def _warn(self, key: str, fmt: str, *args: Any, level: int = logging.WARNING) -> None:
        """A rate-limited log line of a client-caused event (args must already be sanitised)."""
        suppressed = self._loglim.check(key)
        if suppressed is None:
            self.metrics["log_lines_suppressed"] += 1
            return
        if suppressed:
            fmt += " (%d similar lines suppressed)"
            args = args + (suppressed,)
        self.log.log(level, fmt, *args)

    def _resume(self, r: ResumeInfo) -> None:
        if r.config.to_dict() != self.job.to_dict():
            diff = {k: (v, self.job.to_dict().get(k)) for k, v in r.config.to_dict().items()
                    if self.job.to_dict().get(k) != v}
            self.log.warning("job %s exists in %s: continuing with the stored configuration "
                             "(stored, given): %s", r.config.job, self.store.path, diff)
        if r.config.method != self.job.method:
            if self._strategy_given:
                raise ValueError(f"job {r.config.job!r} is stored with method {r.config.method!r} "
                                 f"but a {self.job.method!r} strategy was given")
            self.strategy = get_method(r.config.method).server()
        self.job = r.config
        self.model_id = artifact_id(self.job.artifact)
        self.state = r.state
        self.round = r.round
        self._open_replica(r.round)
        self.history = list(r.history)
        self.registry.restore(r.devices, self.store.accepted_devices(self.job.job))
        if r.plan is None:
            self.done = True
            self.plan = None
            self.deadline = 0.0
            self.log.info("job %s is already finished (%d rounds)", self.job.job, self.round)
            return
        self.plan = decode(r.plan, limits=self.limits, expect=RoundPlan)  # type: ignore[assignment]
        self.plan_bytes = r.plan
        if self._signer is not None and self.plan.signature is None:
            # stored by an unsigned run: re-publish it signed, or signing devices ignore it
            self.plan_bytes = self.plan.encode(self.limits, signer=self._signer)
        self.deadline = r.deadline
        self.opened_at = r.opened_at
        self._restore_accepted(r.accepted)
        self.expected = self._countable_online() | set(self.accepted)
        self.log.info("resuming job %s at round %d with %d accepted updates (%s)", self.job.job,
                      self.round, len(self.accepted), ", ".join(sorted(self.accepted)) or "none")

    def _open_acc(self) -> None:
        """A fresh accumulator for the open round (None for a secure round: its sum comes
        from SecAgg, the updates it holds are masked)."""
        self.acc = None
        if self.done or self.plan is None or self.state is None or self.plan.params.get("secagg_len"):
            return
        self.acc = self.strategy.start_round(self.job, self.state, self.plan)

    def _restore_accepted(self, rows: Sequence[Tuple[str, int, bytes]]) -> None:
        """The open round's accepted updates from the store, in arrival order: their metadata,
        and (re-)added to a fresh accumulator in the order the engine first added them."""
        self._open_acc()
        self.accepted = {}
        if self.hub is not None:  # every stored update goes into our own sums: no partials this round
            self.hub.adopt_all()
        for device, _msg_id, raw in rows:
            upd = decode(raw, limits=self.limits, expect=Update)
            assert isinstance(upd, Update)
            if self.acc is not None:
                self.acc.add(upd)
            self.accepted[device] = (AcceptedMeta.of(upd), len(raw))

    def _rebuild_acc(self) -> None:
        """After an add() or finalize() that raised, the accumulator may hold partial sums:
        start the round's accumulator again from the stored accepted updates."""
        self._restore_accepted(self.store.accepted_updates(self.job.job, self.round))

    def _open_replica(self, rounds: int) -> None:
        """The global trainables at `rounds` aggregated rounds (artifact + stored deltas), whose
        digest every plan carries so devices can prove they hold the same bits. Off with
        --param state_check=0, or when the server cannot read the artifact."""
        self.replica = None
        if not int(self.job.params.get("state_check", 1) or 0) or not self.job.artifact:
            return
        pparams = {**self.job.params, "k": self.job.k, "seed_pool_id": self.job.seed_pool_id,
                   "dist": self.job.params.get("dist", "normal")}
        try:
            rep = TrainablesReplica(self.job.artifact, get_method(self.job.method).client(), pparams)
            rep.rebuild(self.store.load_deltas(self.job.job, 0, rounds - 1) if rounds > 0 else [])
        except (OSError, ValueError, KeyError, StoreError) as e:
            self.log.warning("no parameter digest for devices to check (%s); devices cannot detect drift", e)
            return
        self.replica = rep

    def _drain_now(self) -> None:
        """Handle what is queued on the calling thread (before the engine thread exists)."""
        batch = self.inq.take_now()
        try:
            self._process_batch(self.inq.messages(batch))
        finally:
            self.inq.release(batch)

    # ================================================================== secure aggregation
    def _secure_on(self) -> bool:
        return secure_on(self.job)

    def _check_worker_job(self) -> None:
        """Refuse a job whose aggregation cannot be split between workers and merged exactly."""
        why = self.strategy.partials_unsupported(self.job)
        if why is None and self._secure_on():
            why = "secure_aggregation: the server learns only the round's sum, which workers cannot split"
        if why is not None:
            raise ValueError(f"job {self.job.job!r} cannot use aggregation workers (--share-group): {why}")

    def _open_secure(self, plan: Optional[RoundPlan], now: float) -> None:
        """A SecureRound for the plan that was just set (None when the round is not secure)."""
        from edgefed.security.secagg import config_from_plan
        self.secure = None
        if plan is None or not plan.params.get("secagg_len"):
            return
        cfg = config_from_plan(self.job.job, plan.round, plan.params)
        keys = self._verifier.devices if self._verifier is not None else None
        self.secure = SecureRound(cfg, self.topics, clock=self.clock, window=stage_window(self.job), opened_at=now,
                                  expected=set(self.expected),
                                  max_devices=max_cohort(self.job, self.rlimits.max_devices),
                                  signer=self._signer, device_keys=keys, logger=self.log)

    def _restart_secure(self, now: float, outbox: list, reason: str) -> None:
        """Redo this round's secure aggregation under a new attempt: fresh keys, devices train
        again, the accepted (masked) updates of the failed attempt stop counting."""
        from edgefed.security.secagg import MAX_ATTEMPTS
        assert self.plan is not None
        attempt = int(self.plan.params.get("secagg_attempt", 0)) + 1
        if attempt >= MAX_ATTEMPTS:
            self.error = f"round {self.round}: {MAX_ATTEMPTS} secure-aggregation attempts failed; last: {reason}"
            self.log.error("%s", self.error)
            attempt = 0
        n = self.store.withdraw_accepted(self.job.job, self.round, f"secure aggregation attempt failed: {reason}")
        self.accepted = {}
        plan = dataclasses.replace(self.plan, deadline=now + self.job.round_timeout,
                                   params={**self.plan.params, "secagg_attempt": attempt})
        plan_bytes = plan.encode(self.limits, signer=self._signer)
        self.store.update_plan(self.job.job, self.round, plan_bytes, plan.deadline)
        self.plan, self.plan_bytes, self.deadline = plan, plan_bytes, plan.deadline
        self.metrics["secagg_restarts"] += 1
        self.log.warning("round %d: secure aggregation failed (%s); %d masked update(s) withdrawn, "
                         "attempt %d starts with fresh keys", self.round, self._safe(reason), n, attempt)
        outbox.append((self.topics.plan(), plan_bytes, True))
        self._open_secure(plan, now)

    def _on_secagg(self, topic: str, device: str, payload: bytes, outbox: list) -> None:
        from edgefed.security.secagg import SecAggError
        if self.secure is None:
            self._reject_log("secagg", topic, "no secure-aggregation stage is open")
            return
        if isinstance(payload, TooLarge):
            self._reject_log("secagg", topic, f"message of {payload.n} bytes is over the limit")
            return
        try:
            self.secure.on_message(device, bytes(payload), outbox)
        except SecAggError as e:
            self.metrics["secagg_rejected"] += 1
            self._reject_log("secagg", topic, e)
        except SecureRoundFailed as e:
            self._restart_secure(self.clock(), outbox, str(e))

    def _secure_tick(self, now: float, outbox: list) -> None:
        if self.secure is None or self.done:
            return
        try:
            self.secure.tick(now, outbox)
        except SecureRoundFailed as e:
            self._restart_secure(now, outbox, str(e))

    def _secure_sum(self, now: float, outbox: list):
        """Closing a secure round: start unmasking, or the (sum, survivors) once it is done;
        None while waiting."""
        assert self.secure is not None
        try:
            if self.secure.stage == "masked":
                self.secure.begin_unmask(outbox)
            return self.secure.result(now)
        except SecureRoundFailed as e:
            self._restart_secure(now, outbox, str(e))
            return None

    def _due_at(self) -> float:
        """When the engine must act without a message: the round deadline, or a secure stage's."""
        if self.secure is None:
            due = round_policy.due_at(self.deadline)
            return due if self.hub is None else min(due, self.hub.due())
        return round_policy.due_at(self.deadline, self.secure.stage, self.secure.waiting_until())

    # ================================================================== the engine thread
    def _loop(self) -> None:
        while True:
            batch = self.inq.take(self._wait_time(), self.max_batch)  # []: still check the deadline
            stop = any(item is _STOP for item in batch)
            try:
                self._process_batch(self.inq.messages(batch))
            except Exception as e:  # never die on one bad batch
                self.log.exception("engine batch failed: %s", self._safe(e))
            finally:
                self.inq.release(batch)
            if stop:
                return

    def _wait_time(self) -> float:
        with self._lock:
            if self.done or self.plan is None:
                return round_policy.wait_time(0.0, 0.0, open_round=False)
            return round_policy.wait_time(self.clock(), self._due_at(), open_round=True)

    def _process_batch(self, batch: List[Any]) -> None:
        if not batch and not self._deadline_due():
            return
        outbox: List[Tuple[str, bytes, bool]] = []
        events: List[dict] = []
        durable = any(not _is_status_topic(item[0]) for item in batch) or self._deadline_due()
        try:
            with self._lock, self.store.transaction(durable=durable):
                for topic, payload in batch:
                    self._handle(topic, payload, outbox, events)
                self._check_deadline(outbox, events)
        except Exception as e:  # the commit failed: nothing of this batch happened
            self.metrics["store_errors"] += 1
            self.error = f"store: {e}"
            self.log.error("store commit failed (%s); reloading the job from %s, the %d messages "
                           "of this batch stay unacknowledged and will be re-sent", e,
                           self.store.path, len(batch))
            self._reload()
            return
        self._publish_all(outbox)
        for ev in events:  # listeners first, so run() returns after the last one was called
            for fn in list(self._listeners):
                try:
                    fn(dict(ev))
                except Exception:
                    self.log.exception("round listener %r failed", fn)
        if events or batch:
            with self._progress:
                self._progress.notify_all()

    def _reload(self) -> None:
        with self._lock:
            r = self.store.load_resume(self.job.job)
            self.accepted.clear()
            self.acc = None
            self.registry.clear()
            self.quota.forget_raw_counts()
            self.sync.clear()
            self.done = False
            if r is not None:
                self._resume(r)

    def _publish_all(self, outbox: List[Tuple[str, bytes, bool]]) -> None:
        for topic, payload, retain in outbox:
            try:
                h = self.transport.publish(topic, payload, qos=1, retain=retain, wait=False)
            except Exception as e:  # a disconnected transport queues; anything else: log, go on
                self.log.error("publish to %s failed: %s", topic, e)
                continue
            with self._pending_lock:
                self._pending.append(h)
                while self._pending and self._pending[0].done:
                    self._pending.popleft()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the broker acknowledged everything published so far (before closing the
        transport, whose clean close does not wait for queued messages)."""
        end = time.monotonic() + timeout
        with self._pending_lock:
            handles = list(self._pending)
        for h in handles:
            try:
                h.wait(max(0.0, end - time.monotonic()))
            except Exception:
                return False
        return True

    # ================================================================== message handling
    def _handle(self, topic: str, payload: bytes, outbox: list, events: list) -> None:
        self.metrics["messages"] += 1
        try:
            info = parse_topic(topic)
        except ProtocolError as e:
            self._reject_log("topic", topic, e)
            return
        mark = len(outbox)
        try:
            with self.store.transaction():  # a savepoint: one message's writes, all or nothing
                if info.kind == "update":
                    self._on_update(topic, info.device, payload, outbox)
                elif info.kind == "status":
                    self._on_status(topic, payload)
                elif info.kind == "sync_request":
                    self._on_sync(topic, payload, outbox)
                elif info.kind == "secagg_from":
                    self._on_secagg(topic, info.device, payload, outbox)
                elif info.kind == "worker_report" and self.hub is not None:
                    self.hub.on_report(topic, payload, outbox)
                elif info.kind == "worker_status" and self.hub is not None:
                    self.hub.on_status(topic, payload)
                else:
                    self.log.debug("ignoring %s (not a server topic)", self._safe(topic))
        except Exception as e:
            if _is_store_error(e):
                raise  # the batch cannot be committed consistently
            del outbox[mark:]  # nothing of this message happened
            self._count_reject("internal")
            self.log.exception("rejected %s: internal error %s", self._safe(topic), self._safe(e))
            return
        self._maybe_close(self.clock(), outbox, events)

    def _count_reject(self, label: str) -> None:
        r = self.metrics["rejected"]
        r[label] = r.get(label, 0) + 1

    def _reject_log(self, label: str, topic: str, reason: Any) -> None:
        """Count a rejection and log it: one sanitised line, rate-limited per reason class."""
        self._count_reject(label)
        self._warn("rejected:" + label, "rejected %s: %s", self._safe(topic),
                   sanitize(reason, 2 * self.rlimits.log_chars))

    def _decode(self, payload: Any) -> Any:
        if isinstance(payload, TooLarge):
            raise payload.error(self.limits.max_message_bytes)
        return decode(payload, limits=self.limits, verifier=self._verifier)

    def _ack(self, outbox: list, device: str, rnd: int, msg_id: int, status: AckStatus,
             reason: str = "") -> None:
        try:
            ack = Ack(job=self.job.job, round=max(0, int(rnd)), device=device, msg_id=int(msg_id),
                      status=status, reason=_truncate(reason))
            outbox.append((self.topics.ack(device), ack.encode(self.limits, signer=self._signer), False))
        except ProtocolError as e:
            self.log.error("could not build an ack for %s: %s", self._safe(device), self._safe(e))

    # ------------------------------------------------------------------ updates
    def _on_update(self, topic: str, device: str, payload: bytes, outbox: list) -> None:
        now = self.clock()
        try:
            msg = self._decode(payload)
        except ProtocolError as e:
            self._refuse(topic, device, 0, reject(reason_class(e), str(e), self.round), outbox)
            return
        try:
            check_topic(topic, msg)
        except ProtocolError as e:
            self._refuse(topic, device, 0, reject("topic", str(e), self.round), outbox)
            return
        assert isinstance(msg, Update)
        self._on_valid_update(topic, msg, payload, now, outbox)

    def _refuse(self, topic: str, device: str, msg_id: int, d: Decision, outbox: list) -> None:
        """A rejected update: counted, logged (rate-limited), acked; nothing stored."""
        self._reject_log(d.label, topic, d.reason)
        self._ack(outbox, device, d.ack_round, msg_id, d.status, d.reason)

    def _on_valid_update(self, topic: str, msg: Update, raw: bytes, now: float, outbox: list,
                         validated: bool = False, add: bool = True) -> bool:
        """Carry out admission's decision: the store writes, metrics, log line and Ack. True if
        accepted. validated / add: an update an aggregation worker checked and added to its own
        sums (server/workers.py): only the job's state is judged, and our accumulator gets it
        only if `add` (the worker's partial is not used)."""
        job, device = self.job.job, msg.device
        d = self.admission.decide(msg, self.store.find_update(job, device, msg.msg_id), job=self.job,
                                  strategy=self.strategy, state=self.state, plan=self.plan,
                                  round_id=self.round, done=self.done, accepted=self.accepted,
                                  devices=self.devices, secure=self.secure, validated=validated)
        if d.verdict is Verdict.REPEAT:
            self.metrics["duplicates"] += 1
            self.log.debug("duplicate update %s/%d (round %d): re-sending ack %s", device,
                           msg.msg_id, d.ack_round, d.status.name)
            self._ack(outbox, device, d.ack_round, msg.msg_id, d.status, d.reason)
            return False
        if d.verdict is Verdict.REJECT:
            if d.device_refused:
                self.metrics["devices_refused"] += 1
            self._refuse(topic, device, msg.msg_id, d, outbox)
            return False
        if d.verdict is Verdict.LATE:
            self.metrics["late"] += 1
            how = self._store_extra(msg, raw, now, d, late=True)
            self._warn("late", "late update from %s for round %d (current %d): %s, not aggregated",
                       device, msg.round, self.round, how, level=logging.INFO)
            self._ack(outbox, device, d.ack_round, msg.msg_id, d.status, d.reason)
            return False
        if d.verdict is Verdict.DUPLICATE:
            self.metrics["duplicates"] += 1
            how = self._store_extra(msg, raw, now, d, late=False)
            self._warn("duplicate", "rejected %s: %s (%s)", self.topics.update(device), d.reason, how)
            self._ack(outbox, device, d.ack_round, msg.msg_id, d.status, d.reason)
            return False
        assert d.verdict is Verdict.ACCEPT
        try:
            with self.store.transaction():  # a savepoint: the row and the add() stand or fall together
                self.store.insert_update(job, msg.round, device, msg.msg_id, now, raw,
                                         AckStatus.ACCEPTED, "", accepted=True)
                if self.acc is not None and add:
                    self.acc.add(msg)
        except Exception as e:
            if _is_store_error(e):
                raise
            self._rebuild_acc()  # the failed add() may have left partial sums behind
            self._refuse(topic, device, msg.msg_id,
                         reject("strategy", f"{self.job.method} could not aggregate the update: {e!r}",
                                msg.round), outbox)
            return False
        # in memory only after the row is written (inside the batch transaction); the Update
        # itself is the accumulator's to keep or drop
        self.accepted[device] = (AcceptedMeta.of(msg), len(raw))
        self.expected.add(device)
        self.registry.prove(device, msg.round, now)
        self.metrics["accepted"] += 1
        self.metrics["bytes_received"] += len(raw)
        self._ack(outbox, device, msg.round, msg.msg_id, AckStatus.ACCEPTED)
        return True

    def _store_extra(self, msg: Update, raw: bytes, now: float, d: Decision, late: bool) -> str:
        """Store a late or duplicate update as the quota places it (raw, digest or not at all);
        says what was kept."""
        rl, device = self.rlimits, msg.device
        kind = "late" if late else "duplicates"
        keep = self.quota.place(device, late)
        if keep is Keep.NONE:
            self.metrics[f"{kind}_not_stored"] += 1
            self._warn("quota:" + kind, "storage quota reached (%d rows per device, %d per round): "
                       "%s update %s/%d acked but not stored", rl.extra_rows_per_device,
                       rl.extra_rows_per_round, "late" if late else "duplicate", device, msg.msg_id)
            return keep.value
        self.store.insert_update(self.job.job, msg.round, device, msg.msg_id, now, raw, d.status,
                                 d.reason, accepted=False, late=late, keep_raw=keep is Keep.RAW)
        self.quota.charge(device, keep)
        if keep is Keep.RAW:
            self.metrics["late_raw_stored"] += 1
        else:
            self.metrics[f"{kind}_digest_stored"] += 1
        return keep.value

    # ------------------------------------------------------------------ statuses
    def _decode_or_reject(self, topic: str, payload: bytes, label: str):
        """The message, or None after counting and logging why it was refused."""
        try:
            msg = self._decode(payload)
            check_topic(topic, msg)
            return msg
        except ProtocolError as e:
            self._reject_log(label + reason_class(e), topic, e)
            return None

    def _on_status(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained status
        msg = self._decode_or_reject(topic, payload, "status_")
        if msg is None:
            return
        assert isinstance(msg, Status)
        now = self.clock()
        if self.admission.registry_full(msg.device, self.devices):
            self.metrics["devices_refused"] += 1
            self._count_reject("status_device_cap")
            self._warn("device_cap", "refused the Status of new device %s: the job has %d registered "
                       "devices (max_devices %d); %d refused so far", self._safe(msg.device),
                       len(self.devices), self.rlimits.max_devices, self.metrics["devices_refused"])
            return
        status = {"state": msg.state, "round": msg.round, "timestamp": msg.timestamp, "text": msg.text,
                  "device_class": msg.device_class}
        self.store.upsert_device(self.job.job, msg.device, now, msg.state, msg.round,
                                 msg.device_class, status)
        info, new = self.registry.record_status(msg.device, msg.state, msg.round, msg.device_class, now, msg.text)
        if new:
            self._warn("announce", "device %s announced itself (%s, class %s)", self._safe(msg.device),
                       self._safe(msg.state), self._safe(msg.device_class or "-"), level=logging.INFO)
        if msg.state == "error":  # the device skips this round (its reason in the text) and resyncs
            self.metrics["device_errors"] += 1
            self._warn("device_error", "device %s reports an error in round %d: %s", self._safe(msg.device),
                       msg.round, self._safe(msg.text))
        if self.done or self.plan is None:
            return
        change = round_policy.expected_change(msg.state, info["online"], self._countable(msg.device),
                                              msg.device in self.accepted, msg.device in self.expected)
        if change is ExpectedChange.ADD:
            self.expected.add(msg.device)
        elif change is not None:  # a device that skips the round or left stops being waited for
            self.expected.discard(msg.device)
            self.log.info("device %s skips round %d; target now %d" if change is ExpectedChange.SKIPS else
                          "device %s went offline during round %d; target now %d",
                          self._safe(msg.device), self.round, self._target())

    # ------------------------------------------------------------------ sync
    def _on_sync(self, topic: str, payload: bytes, outbox: list) -> None:
        msg = self._decode_or_reject(topic, payload, "sync_")
        if msg is None:
            return
        assert isinstance(msg, SyncRequest) and self.state is not None
        reply, why = self.sync.delta_reply(msg, self.round, self._history_from())
        if reply is None:
            self.metrics["sync_full"] += 1
            lossy = not get_method(self.job.method).client.state_is_trainables
            self._warn("sync_full", "full-state sync for %s (%s)%s", self._safe(msg.device), self._safe(why),
                       "; this method's global model is not its trainables, so the device cannot follow: raise "
                       "--max-message-mb on the server and every device" if lossy else "",
                       level=logging.ERROR if lossy else logging.INFO)
            reply = self.sync.full_reply(msg, self.round, self._full_state())
        outbox.append((self.topics.sync_reply(msg.device), reply, False))
        self.metrics["sync_replies"] += 1

    def _full_state(self) -> List[Tensor]:
        return full_state(self.replica, self.round, self.strategy, self.job, self.state, self.limits)

    # ------------------------------------------------------------------ rounds
    def _online(self) -> int:
        return len(self.registry.online())

    def _countable(self, device: str) -> bool:
        return round_policy.countable(self.round, device in self.registry.proven) and self._in_round(device)

    def _countable_online(self) -> Set[str]:
        return {d for d in self.registry.online() if self._countable(d)}

    def _in_round(self, device: str) -> bool:
        """Whether the plan's per-device rules (edgefed.assign) select `device` this round."""
        if self.plan is None:
            return True
        try:
            return plan_for(self.plan, device, self.registry.device_class(device)) is not None
        except ValueError:
            return True

    def _target(self) -> int:
        return round_policy.target(self.job.min_devices, self.job.devices_per_round, len(self.expected))

    def _round_view(self, now: float) -> RoundView:
        return RoundView(now=now, deadline=self.deadline, accepted=len(self.accepted),
                         expected=len(self.expected), min_devices=int(self.job.min_devices),
                         devices_per_round=int(self.job.devices_per_round),
                         round_timeout=float(self.job.round_timeout),
                         open=not self.done and self.plan is not None)

    def _history_from(self) -> int:
        return history_from(self.round, self.history_limit)

    def _deadline_due(self) -> bool:
        with self._lock:
            return not self.done and self.plan is not None and self.clock() >= self._due_at()

    def _maybe_close(self, now: float, outbox: list, events: list) -> None:
        if round_policy.on_message(self._round_view(now)).action is Action.CLOSE:
            self._close_round(now, outbox, events)

    def _close_round(self, now: float, outbox: list, events: list) -> None:
        """Aggregate in a savepoint; a failing strategy leaves the round open (logged)."""
        secure_sum = None
        if self.secure is not None:
            secure_sum = self._secure_sum(now, outbox)
            if secure_sum is None:
                return  # unmasking (or a new attempt) under way
        elif self.hub is not None and not self.hub.prepare_close(now, outbox):
            return  # waiting for the workers' partials
        mark = len(outbox)
        try:
            self._aggregate_round(now, outbox, events, secure_sum)
        except Exception as e:
            if _is_store_error(e):
                raise
            del outbox[mark:]
            if self.replica is not None and self.replica.rounds != self.round:
                self._open_replica(self.round)
            if self.secure is None:
                self._rebuild_acc()  # finalize() is called once per accumulator
            self.error = f"aggregation of round {self.round} failed: {e!r}"
            self.log.exception("aggregation of round %d failed; the round stays open", self.round)

    def _check_deadline(self, outbox: list, events: list) -> None:
        if self.done or self.plan is None:
            return
        now = self.clock()
        self._secure_tick(now, outbox)
        if self.secure is not None and self.secure.stage == "unmask":
            self._close_round(now, outbox, events)  # the unmask window may have ended
            return
        if self.hub is not None and self.hub.request and now >= self.hub.due():
            self._close_round(now, outbox, events)  # workers that did not answer are adopted
            return
        d = round_policy.on_tick(self._round_view(now))
        if d.action is Action.CLOSE:
            self.log.info("round %d: deadline reached with %d/%d updates; closing", self.round,
                          len(self.accepted), self._target())
            self._close_round(now, outbox, events)
        elif d.action is Action.EXTEND:
            self._extend(d.until, outbox, reason=d.reason)

    def _extend(self, deadline: float, outbox: list, reason: str) -> None:
        """The round again under the same plan with a new deadline (re-published, retained)."""
        assert self.plan is not None
        plan = dataclasses.replace(self.plan, deadline=deadline)
        plan_bytes = plan.encode(self.limits, signer=self._signer)
        self.store.update_plan(self.job.job, self.round, plan_bytes, plan.deadline)
        self.plan, self.plan_bytes, self.deadline = plan, plan_bytes, plan.deadline
        self.extensions += 1
        self.metrics["extensions"] += 1
        if self.hub is not None:
            self.hub.cancel_close()
        self.log.warning("round %d: %s; deadline extended by %.1f s and the plan re-published",
                         self.round, reason, self.job.round_timeout)
        outbox.append((self.topics.plan(), plan_bytes, True))

    def _build_plan(self, rnd: int, delta: Optional[RoundDelta], deadline: float) -> RoundPlan:
        assert self.state is not None
        pf = self.strategy.plan_round(self.job, self.state, rnd)
        plan = self._plan_from(rnd, pf, delta, deadline)
        if self.replica is not None and self.replica.rounds == rnd:
            # the global trainables at the start of this round: devices check theirs against it
            plan = dataclasses.replace(plan, params={**plan.params, "state_digest": self.replica.digest()})
        if self._secure_on():
            extra = secure_plan_params(self.job, self.strategy, plan, 0, self.rlimits.max_devices)
            plan = dataclasses.replace(plan, params={**plan.params, **extra})
        return self._fit_plan(plan)

    def _fit_plan(self, plan: RoundPlan) -> RoundPlan:
        """A plan is one retained message, which cannot be chunked: when its delta would not fit
        (the codec's or the transport's limit, 1 KiB left for the signature), the plan carries
        `delta_by_sync` instead, and each device fetches the delta in its own sync reply, which
        the transport chunks. Costs the server one reply per device instead of one broadcast."""
        if not plan.delta_tensors:
            return plan
        cap = min(self.limits.max_message_bytes,
                  int(getattr(self.transport, "max_payload_bytes", self.limits.max_message_bytes))) - 1024
        # a delta whose tensors alone exceed the cap is decided without encoding it (a full
        # model's delta would otherwise be encoded twice: here and by the caller); a plan whose
        # tensors fit is measured exactly
        size = sum(t.data.nbytes for t in [*plan.delta_tensors, *plan.tensors])
        if size <= cap:
            try:
                size = len(plan.encode(self.limits))
            except MessageTooLarge:
                size = cap + 1
            if size <= cap:
                return plan
        self.log.info("round %d: the delta (%d B of plan) exceeds one message (%d B): devices fetch it by sync",
                      plan.round, size, cap)
        return dataclasses.replace(plan, delta_tensors=[], params={**plan.params, "delta_by_sync": 1})

    def _plan_from(self, rnd: int, pf, delta: Optional[RoundDelta], deadline: float) -> RoundPlan:
        return RoundPlan(
            job=self.job.job, round=rnd, method=self.job.method, lr=pf.lr, local_steps=pf.local_steps,
            batch_size=pf.batch_size, deadline=deadline, min_devices=max(1, int(self.job.min_devices)),
            params={**pf.params, **device_rules(self.job)}, tensors=list(pf.tensors),
            delta_tensors=list(delta.tensors) if delta is not None else [])

    def _set_plan(self, plan: RoundPlan, now: float) -> None:
        self.plan_bytes = plan.encode(self.limits, signer=self._signer)
        self.plan = plan
        self.deadline = plan.deadline
        self.opened_at = now
        self.extensions = 0

    def _aggregate_round(self, now: float, outbox: list, events: list, secure_sum=None) -> None:
        assert self.plan is not None and self.state is not None
        rnd = self.round
        devices = sorted(self.accepted)
        t0 = time.perf_counter()
        if secure_sum is not None:
            total, survivors = secure_sum
            devices = sorted(survivors)
            stubs = [self.accepted[d][0].stub(self.job.job, self.job.method) for d in devices]
            new_state, delta = self.strategy.aggregate_secure(self.job, self.state, self.plan, total, stubs)
        else:
            if self.acc is None:
                raise RuntimeError(f"round {rnd} has no open accumulator")
            if self.hub is not None:  # the workers' partial sums (exact: the same bits as one server)
                self.hub.merge_into(self.acc)
            new_state, delta = self.acc.finalize()
        updates = [self.accepted[d][0] for d in devices]
        agg_s = time.perf_counter() - t0
        delta = RoundDelta(round=rnd, tensors=list(delta.tensors))
        if self.replica is not None:  # rebuilt from the store if anything below fails
            self.replica.apply(delta)
        weights = np.array([u.num_samples for u in updates], np.float64)
        losses = np.array([u.train_loss for u in updates], np.float64)
        loss = float((weights * losses).sum() / weights.sum()) if weights.sum() > 0 else float("nan")
        finished = rnd + 1 >= self.job.rounds
        next_plan = None if finished else self._build_plan_for(rnd + 1, new_state, delta,
                                                               now + self.job.round_timeout)
        next_bytes = next_plan.encode(self.limits, signer=self._signer) if next_plan is not None else None
        # the next round's accumulator too, so nothing can fail between the commit and the switch
        next_acc = (self.strategy.start_round(self.job, new_state, next_plan)
                    if next_plan is not None and not next_plan.params.get("secagg_len") else None)
        summary = self.strategy.summary(new_state)
        metrics = {
            "round": rnd, "n_updates": len(updates), "devices": devices,
            "train_loss": loss if np.isfinite(loss) else None,
            "num_samples": int(weights.sum()),
            "bytes_in": int(sum(self.accepted[d][1] for d in devices)),
            "bytes_out": len(self.plan_bytes), "next_plan_bytes": len(next_bytes or b""),
            "delta_values": int(sum(t.data.size for t in delta.tensors)),
            "duration_s": max(0.0, now - self.opened_at), "aggregate_s": agg_s,
            "target": self._target(), "extensions": self.extensions,
            "opened_at": self.opened_at, "closed_at": now, "strategy": summary,
            **({"secagg": self.secure.summary()} if self.secure is not None else {}),
            **({"workers": self.hub.summary()} if self.hub is not None else {})}
        state_msg = self._job_state_after(now, new_state, rnd + 1, finished)
        self.store.commit_round(self.job.job, rnd, new_state, delta, now, len(updates), metrics,
                                next_bytes, next_plan.deadline if next_plan is not None else 0.0,
                                finished=finished)  # a savepoint of its own inside the batch
        # -- committed to the transaction: now the in-memory state follows
        self.state = new_state
        self.sync.remember(delta)
        self.accepted = {}
        self.acc = next_acc
        self.quota.new_round()
        self.history.append(metrics)
        self.round = rnd + 1  # after the history, for lock-free readers polling .round
        self.metrics["round_duration_sum"] += metrics["duration_s"]
        self.metrics["round_duration_count"] += 1
        self.metrics["last_round_duration"] = metrics["duration_s"]
        if metrics["train_loss"] is not None:
            self.metrics["train_loss"] = metrics["train_loss"]
        if finished:
            self.done = True
            self.plan, self.plan_bytes, self.deadline = None, b"", 0.0
            self.secure = None
        else:
            assert next_plan is not None and next_bytes is not None
            self.plan, self.plan_bytes = next_plan, next_bytes
            self.deadline, self.opened_at, self.extensions = next_plan.deadline, now, 0
            self.expected = self._countable_online()
            self._open_secure(next_plan, now)
        self.digest = state_msg.digest
        if not finished:
            outbox.append((self.topics.plan(), self.plan_bytes, True))
        if self.hub is not None:
            self.hub.new_round()
            outbox.append(self.hub.control())
        outbox.append((self.topics.state(), state_msg.encode(self.limits, signer=self._signer), True))
        self.log.info("round %d aggregated: %d updates (%s), loss %s, %.3f s%s", rnd, len(updates),
                      ",".join(devices) if len(devices) <= 8 else f"{len(devices)} devices",
                      "-" if metrics["train_loss"] is None else f"{loss:.4f}", metrics["duration_s"],
                      "; job finished" if finished else "")
        events.append(metrics)

    def _build_plan_for(self, rnd: int, state: MethodState, delta: RoundDelta, deadline: float) -> RoundPlan:
        saved, self.state = self.state, state
        try:
            return self._build_plan(rnd, delta, deadline)
        finally:
            self.state = saved

    def _job_state_after(self, now: float, state: MethodState, rnd: int, done: bool) -> JobState:
        """The JobState as it will be once the round is committed (built before the commit,
        so nothing can fail between the commit and the in-memory switch)."""
        saved = (self.state, self.round, self.done, self.digest)
        try:
            self.state, self.round, self.done = state, rnd, done
            self._refresh_digest()
            msg = self._job_state(now)
            msg.validate(self.limits)
            return msg
        finally:
            self.state, self.round, self.done, self.digest = saved

    def _refresh_digest(self) -> None:
        try:
            if self.replica is not None:
                self.digest = self.replica.digest()
            else:
                self.digest = state_digest(self.strategy.full_state(self.job, self.state)) if self.state else ""
        except Exception as e:  # a digest is informational
            self.log.debug("no state digest: %s", e)
            self.digest = ""

    def _job_state(self, now: float) -> JobState:
        return JobState(job=self.job.job, round=self.round, history_from=self._history_from(),
                        method=self.job.method, model=_truncate(self.model_id, 1024), digest=self.digest,
                        updated_at=now,
                        params={"done": int(self.done), "rounds": int(self.job.rounds),
                                "min_devices": int(self.job.min_devices),
                                "devices_per_round": int(self.job.devices_per_round),
                                "round_timeout": float(self.job.round_timeout)})

    def _strategy_summary(self) -> dict:
        try:
            return self.strategy.summary(self.state) if self.state is not None else {}
        except Exception as e:
            return {"error": repr(e)}

    def _metrics_copy(self) -> dict:
        m = dict(self.metrics)
        m["rejected"] = dict(self.metrics["rejected"])
        return m
