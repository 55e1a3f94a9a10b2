"""An aggregation worker (`edgefed worker`): one of the members of a job's MQTT 5 shared
subscription `$share/<group>/edgefed/v1/<job>/update/+`, so the broker hands each device
update to exactly one member (the coordinator, `edgefed server --share-group`, is a member
too). docs/server.md "Scale-out: aggregation workers" has the whole design; in short:

- The worker checks each update it gets exactly as the server's admission does (signature of
  the device, its topic, the round, the device's own part of the plan, the method's
  validate_update) and adds the valid ones to its round accumulator, whose sums are exact
  (edgefed.methods.partials): any split of the round between workers merges to the same bits.
- After each batch it reports to the coordinator (WorkerReport on worker/report/<worker>,
  signed with its own key): every decision (an Ack, unsigned: the coordinator signs and sends
  the Acks) and the bytes of each update it accepted. The coordinator stores them and acks the
  devices: an update is acked accepted only once the coordinator's store holds it.
- When the coordinator closes the round it asks for the partials (WorkerControl with a
  request id, retained on worker/control); the worker answers with a report whose tensors are
  its accumulator's partial(), covering its reports 1..seq of the round.

The worker needs no store and no job key: the coordinator publishes the job configuration and
the method state's scalars (WorkerControl.config) and the plan, signed with the job key.
"""
from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from edgefed.assign import plan_for
from edgefed.methods import JobConfig, MethodState, get_method
from edgefed.methods.base import RoundAccumulator
from edgefed.protocol import (DEFAULT_LIMITS, Ack, AckStatus, Limits, ProtocolError, RoundPlan, Status,
                              Topics, Update, WorkerControl, WorkerReport, check_id, check_topic, decode,
                              parse_topic, validate_update)

from .admission import reason_class
from .inbound import InboundQueue, Offer, TooLarge
from .limits import DEFAULT_RESOURCE_LIMITS, LogLimiter, ResourceLimits, sanitize

__all__ = ["Worker", "WorkerError", "DEFAULT_GROUP", "share_group"]

DEFAULT_GROUP = "edgefed"
_STOP = object()


def share_group(job: str, group: Optional[str] = None) -> str:
    """The shared-subscription group of a job's coordinator and workers (default edgefed-<job>)."""
    return check_id(group or f"{DEFAULT_GROUP}-{job}", "share group")


class WorkerError(RuntimeError):
    """The worker cannot serve this job (its method cannot split a round, ...)."""


class Worker:
    """One aggregation worker of a job over a transport (MQTT 5 broker with shared subscriptions).

    signing: an edgefed.security.signing.WorkerSigning (its key, the device registry, the job's
    public key); None = development mode (unsigned, like the server). resource_limits: the
    inbound queue's budget (inbound_bytes, inbound_messages), as the server's: past it a message
    is dropped, not acked, and counted (stats["inbound_dropped"])."""

    def __init__(self, transport, job: str, worker_id: str, *, group: Optional[str] = None,
                 signing: Any = None, logger: Optional[logging.Logger] = None,
                 clock: Callable[[], float] = time.time, hold_s: float = 5.0, max_held: int = 10000,
                 max_batch: int = 1024, limits: Limits = DEFAULT_LIMITS,
                 resource_limits: ResourceLimits = DEFAULT_RESOURCE_LIMITS):
        self.transport = transport
        self.job_id = check_id(job, "job")
        self.worker_id = check_id(worker_id, "worker")
        self.group = share_group(job, group)
        self.topics = Topics(self.job_id)
        self.signing = signing
        self.log = logger or logging.getLogger("edgefed.worker")
        self.clock = clock
        self.hold_s = float(hold_s)
        self.max_held = int(max_held)
        self.max_batch = int(max_batch)
        self.limits = limits
        self.session = secrets.randbits(64) or 1
        self._verifier = signing.verifier if signing is not None else None
        self._server_verifier = signing.server_verifier if signing is not None else None
        self._signer = signing.signer if signing is not None else None
        if signing is None:
            from edgefed.security.signing import warn_unsigned
            warn_unsigned(self.log, "worker")
        self._loglim = LogLimiter(resource_limits.log_burst, resource_limits.log_interval_s)
        # bounded: whoever can publish on the update topic must not grow the worker's memory
        self.inq = InboundQueue(limits.max_message_bytes, resource_limits.inbound_bytes,
                                resource_limits.inbound_messages)
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self.error: Optional[str] = None
        self.done = threading.Event()
        # what the coordinator published
        self.job: Optional[JobConfig] = None
        self.strategy = None
        self.state: Optional[MethodState] = None
        self.control_round = -1
        self.request = 0          # the newest close request seen
        self.plan: Optional[RoundPlan] = None
        self.devices: Dict[str, str] = {}  # device -> device class (from their statuses)
        # the open round
        self.round = -1
        self.acc: Optional[RoundAccumulator] = None
        self.broken = False       # an add() failed: no partial this round (the coordinator re-adds)
        self.accepted: Dict[str, int] = {}     # device -> msg_id
        self.seq = 0
        self.answered = 0         # the close request last answered
        self.pending: List[Tuple[bytes, bytes, bytes]] = []  # (ack, label, raw) not yet reported
        self.held: List[Tuple[float, str, Update, bytes]] = []  # waiting for a plan / a status
        self.stats = {"updates": 0, "accepted": 0, "rejected": 0, "reports": 0, "partials": 0,
                      "held": 0, "inbound_dropped": 0, "inbound_too_large": 0}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Worker":
        offline = Status(job=self.job_id, device=self.worker_id, state="offline", timestamp=self.clock())
        try:
            self.transport.set_will(self.topics.worker_status(self.worker_id),
                                    offline.encode(self.limits, signer=self._signer), qos=1, retain=True)
        except Exception as e:  # noqa: BLE001 - a transport without wills: the coordinator times out instead
            self.log.debug("no will: %s", e)
        if not self.transport.connected:
            self.transport.connect()
        pv = getattr(self.transport, "protocol_version", "5")
        if pv not in (None, "5"):
            self.log.warning("the broker speaks MQTT %s: shared subscriptions ($share/...) need MQTT 5 "
                             "(Mosquitto >= 1.6 also offers them to 3.1.1 clients; amqtt does not)", pv)
        online = Status(job=self.job_id, device=self.worker_id, state="online", timestamp=self.clock())
        self.transport.publish(self.topics.worker_status(self.worker_id),
                               online.encode(self.limits, signer=self._signer), qos=1, retain=True)
        self._thread = threading.Thread(target=self._loop, name=f"edgefed-worker-{self.worker_id}", daemon=True)
        self._thread.start()
        for flt in (self.topics.worker_control(), self.topics.plan(), self.topics.all_statuses()):
            self.transport.subscribe(flt, self._on_message)
        self.transport.subscribe(self.topics.shared_updates(self.group), self._on_message)
        self.log.info("worker %s of job %s: shared subscription %s", self.worker_id, self.job_id,
                      self.topics.shared_updates(self.group))
        return self

    def stop(self, timeout: float = 5.0) -> None:
        try:
            self.transport.unsubscribe(self.topics.shared_updates(self.group))
        except Exception:  # noqa: BLE001
            pass
        self.inq.signal(_STOP)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        try:
            offline = Status(job=self.job_id, device=self.worker_id, state="offline", timestamp=self.clock())
            self.transport.publish(self.topics.worker_status(self.worker_id),
                                   offline.encode(self.limits, signer=self._signer), qos=1, retain=True,
                                   timeout=2.0)
        except Exception:  # noqa: BLE001 - closing anyway
            pass

    def run(self, stop_event: Optional[threading.Event] = None, timeout: Optional[float] = None) -> bool:
        """Until the job is finished (True), stop_event is set or timeout passed (False)."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self.done.is_set():
            if stop_event is not None and stop_event.is_set():
                return False
            if end is not None and time.monotonic() > end:
                return False
            if self._thread is not None and not self._thread.is_alive():
                return False
            self.done.wait(0.1)
        return True

    # ------------------------------------------------------------------ engine thread
    def _on_message(self, topic: str, payload: bytes) -> None:
        """Transport thread: offer to the bounded queue, never block (server/inbound.py)."""
        offer = self.inq.offer(topic, payload)
        if offer is Offer.TOO_LARGE:
            self.stats["inbound_too_large"] += 1
        elif offer is Offer.DROPPED:
            self.stats["inbound_dropped"] += 1
            self._warn("inbound", "inbound queue full (%d bytes / %d messages budget): dropped a %d-byte "
                       "message on %s, not acked (%d dropped so far)", self.inq.budget_bytes,
                       self.inq.budget_messages, len(payload), sanitize(topic), self.stats["inbound_dropped"])

    def _loop(self) -> None:
        while True:
            batch = self.inq.take(0.2, self.max_batch)
            stop = any(b is _STOP for b in batch)
            try:
                for topic, payload in self.inq.messages(batch):
                    self._handle(topic, payload)
                self._expire_held()
                self._report()
            except Exception as e:  # noqa: BLE001 - never die on one batch
                self.log.exception("worker batch failed: %s", sanitize(e))
            finally:
                self.inq.release(batch)
            if stop:
                return

    def _handle(self, topic: str, payload: bytes) -> None:
        try:
            info = parse_topic(topic)
        except ProtocolError:
            return
        if info.kind == "update":
            self._on_update(topic, info.device or "", payload)
        elif isinstance(payload, TooLarge):  # only the coordinator writes the other topics
            self._warn("too_large", "a %d-byte message on %s is over the limit (%d B): ignored", payload.n,
                       sanitize(topic), self.limits.max_message_bytes)
        elif info.kind == "worker_control":
            self._on_control(payload)
        elif info.kind == "plan":
            self._on_plan(payload)
        elif info.kind == "status":
            self._on_status(topic, payload)

    def _warn(self, key: str, fmt: str, *args: Any) -> None:
        sup = self._loglim.check(key)
        if sup is None:
            return
        self.log.warning(fmt + (" (%d similar lines suppressed)" if sup else ""), *(args + ((sup,) if sup else ())))

    # ------------------------------------------------------------------ coordinator messages
    def _on_control(self, payload: bytes) -> None:
        if not payload:
            return
        try:
            msg = decode(payload, limits=self.limits, expect=WorkerControl, verifier=self._server_verifier)
            if msg.job != self.job_id:
                raise ProtocolError(f"control for job {msg.job!r}")
            cfg = json.loads(msg.config[0]) if msg.config else None
            scalars = json.loads(msg.config[1]) if len(msg.config) > 1 else {}
        except (ProtocolError, ValueError, IndexError) as e:
            self._warn("control", "ignored a control message: %s", sanitize(e))
            return
        if cfg is not None and self.job is None:
            job = JobConfig.from_dict(cfg)
            strategy = get_method(job.method).server()
            why = strategy.partials_unsupported(job)
            if why is None and int(job.params.get("secure_aggregation", 0) or 0):
                why = "secure aggregation: the coordinator sees only the round's masked sum"
            if why is not None:
                self.error = f"job {job.job!r} cannot use aggregation workers: {why}"
                self.log.error("%s", self.error)
                self.done.set()
                return
            self.job, self.strategy = job, strategy
            self.log.info("job %s: method %s, %d rounds", job.job, job.method, job.rounds)
        if msg.round >= self.control_round:
            self.control_round = int(msg.round)
            self.state = MethodState(scalars=dict(scalars), arrays={})
            self.request = int(msg.request)
        if msg.done:
            self.log.info("job %s is finished", self.job_id)
            self.done.set()
        self._maybe_open()

    def _on_plan(self, payload: bytes) -> None:
        if not payload:
            return
        try:
            plan = decode(payload, limits=self.limits, expect=RoundPlan, verifier=self._server_verifier)
            check_topic(self.topics.plan(), plan)
        except ProtocolError as e:
            self._warn("plan", "ignored a plan: %s", sanitize(e))
            return
        if self.plan is None or plan.round >= self.plan.round:
            self.plan = plan  # a re-published plan of the same round (extension): new deadline
        self._maybe_open()

    def _on_status(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        try:
            msg = decode(payload, limits=self.limits, expect=Status, verifier=self._verifier)
            check_topic(topic, msg)
        except ProtocolError:
            return
        self.devices[msg.device] = msg.device_class
        if any(h[1] == msg.device for h in self.held):
            self._release_held()

    def _maybe_open(self) -> None:
        """Open the plan's round once the plan and the control message of that round are in."""
        p = self.plan
        if p is None or self.job is None or self.control_round != p.round or p.round <= self.round:
            return
        if self.round >= 0 and self.pending:
            self._report()  # decisions of the old round go out first
        self.round = int(p.round)
        assert self.state is not None
        self.acc = self.strategy.start_round(self.job, self.state, p)
        self.broken, self.accepted, self.seq, self.answered = False, {}, 0, 0
        self.log.debug("round %d open", self.round)
        self._release_held()

    # ------------------------------------------------------------------ updates
    def _decision(self, device: str, rnd: int, msg_id: int, status: AckStatus, reason: str = "",
                  label: str = "", raw: bytes = b"") -> None:
        r = reason.encode("utf-8")[:1000].decode("utf-8", "ignore")
        ack = Ack(job=self.job_id, round=max(0, int(rnd)), device=device, msg_id=int(msg_id), status=status, reason=r)
        self.pending.append((ack.encode(self.limits), label.encode(), raw))
        if status is AckStatus.REJECTED:
            self.stats["rejected"] += 1

    def _on_update(self, topic: str, device: str, payload: bytes) -> None:
        self.stats["updates"] += 1
        try:
            if isinstance(payload, TooLarge):
                raise payload.error(self.limits.max_message_bytes)
            msg = decode(payload, limits=self.limits, verifier=self._verifier)
            check_topic(topic, msg)
        except ProtocolError as e:
            try:
                check_id(device, "device")
            except ProtocolError:
                return
            self._decision(device, max(self.round, 0), 0, AckStatus.REJECTED, str(e), reason_class(e))
            return
        assert isinstance(msg, Update)
        self._admit(msg, bytes(payload))

    def _admit(self, msg: Update, raw: bytes) -> None:
        device = msg.device
        if self.acc is None or msg.round > self.round or device not in self.devices:
            if len(self.held) >= self.max_held:  # not acked: the device re-sends it
                self._warn("held", "more than %d updates waiting for a plan or a status: dropped one of %s",
                           self.max_held, sanitize(device))
                return
            self.held.append((self.clock(), device, msg, raw))
            self.stats["held"] += 1
            return
        plan = self.plan
        assert plan is not None and self.job is not None and self.state is not None
        if msg.round < self.round:
            self._decision(device, msg.round, msg.msg_id, AckStatus.LATE,
                           f"round {msg.round} is closed; the current round is {self.round}: sync and train "
                           f"on the current plan", "late")
            return
        prev = self.accepted.get(device)
        if prev == msg.msg_id:  # a re-send: the coordinator answers with the stored Ack
            self._decision(device, msg.round, msg.msg_id, AckStatus.ACCEPTED, "", "repeat")
            return
        if prev is not None:
            self._decision(device, msg.round, msg.msg_id, AckStatus.DUPLICATE,
                           f"an update from {device} for round {msg.round} was already accepted (msg_id "
                           f"{prev}); one update per device and round", "duplicate")
            return
        try:
            mine = plan_for(plan, device, self.devices.get(device, ""))
        except ValueError as e:
            self._decision(device, msg.round, msg.msg_id, AckStatus.REJECTED,
                           f"the plan's per-device rules cannot be read: {e}", "plan")
            return
        if mine is None:
            self._decision(device, msg.round, msg.msg_id, AckStatus.REJECTED,
                           f"{device} is not selected for round {msg.round} (select_fraction="
                           f"{plan.params.get('select_fraction')}): it sits this round out", "not_selected")
            return
        try:
            validate_update(msg, mine)
        except ProtocolError as e:
            self._decision(device, msg.round, msg.msg_id, AckStatus.REJECTED, str(e), reason_class(e))
            return
        try:
            self.strategy.validate_update(self.job, self.state, mine, msg)
        except ProtocolError as e:
            self._decision(device, msg.round, msg.msg_id, AckStatus.REJECTED, str(e), "strategy")
            return
        except Exception as e:  # noqa: BLE001
            self._decision(device, msg.round, msg.msg_id, AckStatus.REJECTED,
                           f"{self.job.method} refused the update: {e!r}", "strategy")
            return
        if not self.broken:
            try:
                self.acc.add(msg)
            except Exception as e:  # noqa: BLE001 - the sums may be half updated: no partial this round
                self.broken = True
                self.log.error("round %d: add() failed (%s); this worker sends no partial for the round and "
                               "the coordinator aggregates its updates from its store", self.round, sanitize(e))
        self.accepted[device] = msg.msg_id
        self.stats["accepted"] += 1
        self._decision(device, msg.round, msg.msg_id, AckStatus.ACCEPTED, raw=raw)

    def _release_held(self) -> None:
        held, self.held = self.held, []
        for _t, _d, msg, raw in held:
            self._admit(msg, raw)

    def _expire_held(self) -> None:
        """Updates held longer than hold_s: for a round that has not started, the server's answer
        (rejected, future_round); from a device whose status never came, judged with no class."""
        if not self.held:
            return
        now = self.clock()
        held, self.held = self.held, []
        for item in held:
            t, device, msg, raw = item
            if now - t < self.hold_s:
                self.held.append(item)
            elif self.acc is not None and msg.round <= self.round:
                self.devices.setdefault(device, "")  # the coordinator refuses it if it is unknown there too
                self._admit(msg, raw)
            else:
                self._decision(device, msg.round, msg.msg_id, AckStatus.REJECTED,
                               f"update from {device} is for round {msg.round}, which has not started "
                               f"(current round {self.round})", "future_round")

    # ------------------------------------------------------------------ reports
    def _report(self) -> None:
        close = (self.acc is not None and self.control_round == self.round and self.request > self.answered)
        if not self.pending and not close:
            return
        if self.round < 0 and not close:  # decisions before any round (bad messages): round 0
            rnd = 0
        else:
            rnd = max(self.round, 0)
        self.seq += 1
        tensors = []
        request = 0
        if close:
            request = self.request
            if not self.broken:
                tensors = self.acc.partial()  # type: ignore[union-attr]
            self.answered = self.request
            self.stats["partials"] += 1
        pending, self.pending = self.pending, []
        rep = WorkerReport(job=self.job_id, worker=self.worker_id, session=self.session, round=rnd,
                           seq=self.seq, request=request, decisions=[p[0] for p in pending],
                           labels=[p[1] for p in pending], updates=[p[2] for p in pending], tensors=tensors)
        data = rep.encode(self.limits, signer=self._signer)
        self.transport.publish(self.topics.worker_report(self.worker_id), data, qos=1, wait=False)
        self.stats["reports"] += 1
        if close:
            self.log.info("round %d: partial of %d accepted updates sent (request %d, report %d)",
                          self.round, len(self.accepted), request, self.seq)
