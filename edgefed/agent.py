"""The device agent: joins a job, keeps its parameters on the global state, trains, reports.

Loop: wait for the retained plan of round R; bring the parameters to the global state at
the start of R (apply the plan's delta, or ask the server for the missing rounds / the full
state); run the method's local training (which puts the parameters back afterwards); publish
the Update and wait for its Ack, re-sending the same bytes (same msg_id: idempotent) until
acknowledged. Broker restarts are ridden out by the transport's reconnect; the retained plan
is delivered again after it and handled idempotently by round id.
No torch: this is device code.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from . import protocol as P
from .assign import plan_for
from .methods import get_method
from .replica import DIGEST_PREFIX, TRAINABLES_TENSOR, artifact_id, params_digest
from .transport.base import Transport, TransportError

__all__ = ["DeviceAgent", "AgentStats"]


def _plan_key(plan: P.RoundPlan) -> tuple[int, int]:
    """(round, secure-aggregation attempt): a failed secure attempt re-opens the same round."""
    return int(plan.round), int(plan.params.get("secagg_attempt", 0))

log = logging.getLogger("edgefed.agent")


def batch_seed(job: str, device: str, plan: P.RoundPlan) -> int:
    """The seed of a device's local batches in a round. It depends on the job's seed (when the
    plan carries one), the device and the round, not on the job id, so re-running a job under
    a new id reproduces it (and the transport-free loop, edgefed.research, draws the same)."""
    run = plan.params.get("run_seed", job)
    return zlib.crc32(f"{run}/{device}/{plan.round}".encode())


@dataclass
class AgentStats:
    rounds_trained: int = 0
    updates_accepted: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    syncs: int = 0
    full_syncs: int = 0
    last_round: int = -1
    errors: int = 0               # rounds skipped after a failed step / bad delta (error status sent)
    resyncs: int = 0              # parameter digests that differed from the plan's (resynced)
    losses: list = field(default_factory=list)


class DeviceAgent:
    def __init__(self, transport: Transport, device_id: str, job: str, model, examples: Sequence, *,
                 device_class: str = "", progress: bool = False, ack_timeout: float = 20.0,
                 sync_timeout: float = 60.0, logger: logging.Logger | None = None,
                 signing=None, limits: P.Limits = P.DEFAULT_LIMITS):
        """signing: an edgefed.security.signing.DeviceSigning (this device's key and the job's
        public key): everything sent is signed, and server messages that are unsigned or not
        signed with the job key are ignored. None = development mode (unsigned, warned once).
        limits: the codec's size limits (raise max_message_bytes on the server and every device
        of a job whose updates or deltas are larger: the transport chunks them on the wire)."""
        self.limits = limits
        if not examples:
            raise ValueError(f"device {device_id}: no training data (check --data)")
        self.t = transport
        self.device = P.check_id(device_id, "device")
        self.job = P.check_id(job, "job")
        self.model = model
        self.examples = list(examples)
        self.device_class = device_class
        self.progress = progress
        self.ack_timeout = ack_timeout
        self.sync_timeout = sync_timeout
        self.log = logger or log
        self.signing = signing
        self._signer = signing.signer if signing is not None else None
        self._verifier = signing.verifier if signing is not None else None
        if signing is None:
            from .security.signing import warn_unsigned
            warn_unsigned(self.log, "device")
        self.topics = P.Topics(job)
        self.ids = P.MessageIds()
        self.stats = AgentStats()
        self.start_round = 0          # parameters == global state at the start of this round
        self._plans: "queue.Queue[P.RoundPlan]" = queue.Queue()
        self._acks: "queue.Queue[P.Ack]" = queue.Queue()
        self._syncs: "queue.Queue[P.SyncReply]" = queue.Queue()
        self._finished = threading.Event()
        self._done_rounds: set[tuple[int, int]] = set()
        self._client = None
        self._last_pparams: dict | None = None
        # secure aggregation: this round's SecAggClient, and the forwarded shares addressed to us
        self._secure = None
        self._secure_lock = threading.Lock()
        self._forwards: "queue.Queue[tuple[int, bytes]]" = queue.Queue()
        self._artifact_warned = False
        self._last_state: P.JobState | None = None
        self.final_round: int | None = None  # set when the job finished: our parameters are its result

    # -- messages in ------------------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes) -> None:
        self.stats.bytes_received += len(payload)
        if not payload:
            return  # a cleared retained message
        try:
            msg = P.decode(payload, limits=self.limits)
            P.check_topic(topic, msg)
            if self._verifier is not None:
                self._verifier(msg, msg.signature)
        except P.ProtocolError as exc:
            self.log.warning("%s: ignored message on %s: %s", self.device, topic, exc)
            return
        if isinstance(msg, P.RoundPlan):
            self._plans.put(msg)
        elif isinstance(msg, P.Ack):
            self._acks.put(msg)
        elif isinstance(msg, P.SyncReply):
            self._syncs.put(msg)
        elif isinstance(msg, P.JobState):
            self._last_state = msg
            self._check_artifact(msg)
            if msg.params.get("done"):
                self._finished.set()

    def _on_secagg(self, topic: str, payload: bytes) -> None:
        """Stage messages of secure aggregation (edgefed.security.secagg): answer the roster and
        the unmask request at once (the training thread may be busy), keep forwards for later."""
        from .security.secagg import SecAggError, Stage, decode_message
        self.stats.bytes_received += len(payload)
        try:
            m = decode_message(payload, max_bytes=1 << 24)
            with self._secure_lock:
                sa = self._secure
                if sa is None or m.round != sa.cfg.round or m.job != self.job:
                    return  # another round's or attempt's message
                if m.stage == Stage.ROSTER:
                    out = sa.share_keys(payload)
                elif m.stage == Stage.UNMASK_REQUEST:
                    out = sa.unmask(payload)
                elif m.stage == Stage.FORWARD:
                    self._forwards.put((m.round, bytes(payload)))
                    return
                else:
                    return
        except SecAggError as exc:
            self.log.warning("%s: ignored secure-aggregation message on %s: %s", self.device, topic, exc)
            return
        self._publish(self.topics.secagg(self.device), out)

    def _wait_forward(self, tag: int, plan: P.RoundPlan) -> bytes | None:
        """The forwarded shares of this attempt, or None when the round moved on without us."""
        grace = max(self.ack_timeout, 5.0)
        while time.time() < float(plan.deadline) + grace:
            try:
                got, data = self._forwards.get(timeout=0.5)
            except queue.Empty:
                if self._finished.is_set() or self._newer_plan_queued(plan):
                    return None
                continue
            if got == tag:
                return data
        return None

    def _status(self, state: str, text: str = "") -> None:
        st = P.Status(job=self.job, device=self.device, state=state, device_class=self.device_class,
                      round=self.stats.last_round, timestamp=time.time(), text=text[:200])
        self._publish(self.topics.status(self.device), self._enc(st), retain=True)

    def _enc(self, msg: P.Message) -> bytes:
        return msg.encode(self.limits, signer=self._signer)

    def _publish(self, topic: str, data: bytes, retain: bool = False) -> None:
        """Publish, waiting out broker outages (the transport reconnects underneath)."""
        while True:
            try:
                self.t.publish(topic, data, qos=1, retain=retain, wait=True, timeout=self.ack_timeout)
                self.stats.bytes_sent += len(data)
                return
            except TransportError as exc:
                if self._finished.is_set():
                    return
                self.log.warning("%s: publish to %s failed (%s); retrying", self.device, topic, exc)
                time.sleep(1.0)

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        will = P.Status(job=self.job, device=self.device, state="offline", device_class=self.device_class,
                        timestamp=time.time(), text="connection lost")
        self.t.set_will(self.topics.status(self.device), self._enc(will), retain=True)
        if not self.t.connected:
            self.t.connect()
        for flt in (self.topics.plan(), self.topics.state(), self.topics.ack(self.device),
                    self.topics.sync_reply(self.device)):
            self.t.subscribe(flt, self._on_message)
        for flt in (self.topics.secagg_all(), self.topics.secagg_to(self.device)):
            self.t.subscribe(flt, self._on_secagg)
        self._status("online")
        self.log.info("%s: joined job %s (%d examples, %d trainable parameters)", self.device, self.job,
                      len(self.examples), self.model.n_trainable)

    def stop(self, state: str = "offline") -> None:
        try:
            self._status(state)
        finally:
            self.t.close()

    def run(self, max_rounds: int | None = None, stop: threading.Event | None = None,
            idle_timeout: float | None = None) -> AgentStats:
        """Serve rounds until the job finishes, max_rounds were trained, or stop is set."""
        self.start()
        stop = stop or threading.Event()
        last_activity = time.time()
        try:
            while not stop.is_set() and not self._finished.is_set():
                if max_rounds is not None and self.stats.rounds_trained >= max_rounds:
                    break
                try:
                    plan = self._plans.get(timeout=0.5)
                except queue.Empty:
                    if idle_timeout and time.time() - last_activity > idle_timeout:
                        self.log.warning("%s: no plan for %.0f s; leaving", self.device, idle_timeout)
                        break
                    continue
                plan = self._latest(plan)
                if _plan_key(plan) in self._done_rounds or plan.round < self.start_round:
                    continue  # redelivered or re-published plan of a round we answered
                last_activity = time.time()
                self._serve(plan)
            if self._finished.is_set():
                self._final_sync()
        finally:
            self.stop("finished" if self._finished.is_set() else "offline")
        return self.stats

    def _final_sync(self) -> None:
        """The job is done: pull the last round(s) so this device holds the trained model."""
        if self._client is None or self._last_pparams is None:
            return
        if self._request_sync(self._last_pparams):
            st = self._last_state
            if st is not None and st.round == self.start_round and st.digest.startswith(DIGEST_PREFIX) \
                    and self._drifted(st.digest, "at the end of the job"):
                if not self._request_sync(self._last_pparams) or params_digest(self.model.params) != st.digest:
                    self.log.error("%s: still not the global model after a full resync", self.device)
                    return
            self.final_round = self.start_round
            self.log.info("%s: job finished; parameters at the final global state (round %d)",
                          self.device, self.start_round)

    def _latest(self, plan: P.RoundPlan) -> P.RoundPlan:
        """Skip plans superseded while we were busy."""
        while True:
            try:
                nxt = self._plans.get_nowait()
            except queue.Empty:
                return plan
            if _plan_key(nxt) >= _plan_key(plan):
                plan = nxt

    # -- one round --------------------------------------------------------------------
    def _serve(self, plan: P.RoundPlan) -> None:
        method = get_method(plan.method)
        if self._client is None or type(self._client) is not method.client:
            self._client = method.client()
        pparams = dict(plan.params)  # the method's settings (a ZO method's k, seed_pool_id, dist ...)
        self._last_pparams = pparams
        try:
            if not self._sync_to(plan, pparams) or not self._check_state(plan, pparams):
                return
        except (P.ProtocolError, ValueError, RuntimeError, NotImplementedError) as exc:
            # a delta or state that does not fit: start over from the artifact, sync from round 0
            self._fail_round(plan, f"could not apply the global update: {exc}", reset=True)
            return
        try:  # this device's part of the round (edgefed.assign): selection, per-class settings
            mine = plan_for(plan, self.device, self.device_class)
        except ValueError as exc:
            self._fail_round(plan, f"cannot read the plan's per-device rules: {exc}", reset=False)
            return
        if mine is None:
            self._done_rounds.add(_plan_key(plan))
            self._status("idle", f"not selected for round {plan.round}")
            return
        plan = mine
        sa = self._start_secure(plan)
        if sa is False:
            return
        self._status("training")
        seed = batch_seed(self.job, self.device, plan)
        try:
            result = self._client.local_train(self.model, self.examples, plan, seed, progress=self.progress)
        except Exception as exc:  # DivergedError (NaN loss), a failed step: skip the round, carry on
            # local_train restores its snapshot also when a step fails; anything else: start over
            intact = bool(np.isfinite(self.model.params).all())
            self._fail_round(plan, f"training failed: {type(exc).__name__}: {exc}", reset=not intact)
            return
        self.stats.rounds_trained += 1
        self.stats.last_round = plan.round
        self.stats.losses.append(result.train_loss)
        self._done_rounds.add(_plan_key(plan))
        if sa is not None:
            result = self._masked_result(sa, result, plan)
            if result is None:
                self._status("idle")
                return
        upd = P.Update(job=self.job, round=plan.round, device=self.device, method=plan.method,
                       msg_id=self.ids.next(), num_samples=result.num_samples, tensors=result.tensors,
                       train_loss=result.train_loss)
        data = self._enc(upd)
        ack = self._send_update(data, upd, plan)
        if ack is not None:
            self.log.info("%s: round %d %s (%s) loss %.4f, %d B up", self.device, plan.round,
                          ack.status.name.lower(), ack.reason, result.train_loss, len(data))
        self._status("idle")

    def _check_state(self, plan: P.RoundPlan, pparams: dict) -> bool:
        """The plan's digest of the global trainables against ours: on a mismatch, back to the
        artifact and a resync from round 0 (exact: the same deltas in the same order)."""
        want = plan.params.get("state_digest")
        if not want or not self._drifted(want, f"at the start of round {plan.round}"):
            return True
        full_before = self.stats.full_syncs
        if not self._sync_to(plan, pparams):
            return False
        got = params_digest(self.model.params)
        if got != want:
            if self.stats.full_syncs > full_before:  # the method's full state, not the trainables
                self.log.warning("%s: the server's full state rebuilds the global model only up to float32 "
                                 "rounding (trainables too large to send); training on", self.device)
                return True
            self._fail_round(plan, f"parameters still differ from the server's after a full resync ({got} != "
                                   f"{want}): is this device running another artifact?", reset=True)
            return False
        self.log.info("%s: back on the global model at round %d after a resync", self.device, plan.round)
        return True

    def _drifted(self, want: str, where: str) -> bool:
        """Whether our trainables differ from the global model's digest `want`; if so, say so, go
        back to the artifact's trainables and to round 0, for the caller to resync."""
        got = params_digest(self.model.params)
        if got == want:
            return False
        self.stats.resyncs += 1
        self.log.error("%s: parameters differ from the global model %s (%s, server %s): resyncing from the "
                       "artifact", self.device, where, got, want)
        self.model.reset_params()
        self.start_round = 0
        return True

    def _check_artifact(self, state: P.JobState) -> None:
        """JobState.model names the artifact the job runs: say so once if ours is another one."""
        if not state.model or self._artifact_warned:
            return
        mine = artifact_id(str(getattr(self.model, "dir", "")))
        if mine and "@" in state.model and mine != state.model:
            self._artifact_warned = True
            self.log.error("%s: this device holds artifact %s, the job runs %s: copy the job's artifact here",
                           self.device, mine, state.model)
            self._status("error", f"artifact {mine} differs from the job's {state.model}")

    def _fail_round(self, plan: P.RoundPlan, reason: str, reset: bool) -> None:
        """Publish an `error` status with the reason and skip this round. reset: the parameters may
        no longer be the global state (a half-applied delta, an inexact restore): go back to the
        artifact's and resync from round 0 at the next plan (deltas replayed in order: exact)."""
        self.stats.errors += 1
        self._done_rounds.add(_plan_key(plan))
        self.log.error("%s: round %d skipped: %s%s", self.device, plan.round, reason,
                       "; resyncing from the artifact" if reset else "")
        if reset:
            self.model.reset_params()
            self.start_round = 0
        self.stats.last_round = plan.round
        self._status("error", reason)

    def _start_secure(self, plan: P.RoundPlan):
        """A secure round: new keys, advertised before training (the key exchange overlaps it).
        Returns the SecAggClient, None for a plain round, False when the plan is unusable."""
        from .security.secagg import SecAggClient, SecAggError, config_from_plan
        try:
            cfg = config_from_plan(self.job, plan.round, plan.params)
        except SecAggError as exc:
            self.log.error("%s: round %d: %s", self.device, plan.round, exc)
            self._status("error", str(exc))
            return False
        if cfg is None:
            return None
        server_key = self._verifier.server_key if self._verifier is not None else None
        sa = SecAggClient(self.device, cfg, signer=self._signer, server_key=server_key)
        with self._secure_lock:
            self._secure = sa
        self._publish(self.topics.secagg(self.device), sa.advertise())
        return sa

    def _masked_result(self, sa, result, plan: P.RoundPlan):
        """The result as this device's masked vector (clipped to the agreed bound first: the
        server cannot check it), or None when the forwarded shares never came."""
        from .methods.base import ClientResult
        from .security.secagg import UPDATE_TENSOR, SecAggError, to_wire
        fwd = self._wait_forward(sa.cfg.round, plan)
        if fwd is None:
            self.log.warning("%s: round %d: no forwarded shares from the server; sitting this attempt out",
                             self.device, plan.round)
            return None
        x = np.clip(self._client.secure_vector(result, plan), -sa.cfg.bound, sa.cfg.bound)
        try:
            with self._secure_lock:
                y = sa.masked_vector(fwd, x)
        except SecAggError as exc:
            self.log.warning("%s: round %d: secure aggregation: %s", self.device, plan.round, exc)
            return None
        return ClientResult(num_samples=result.num_samples, tensors=[P.Tensor(UPDATE_TENSOR, to_wire(y))],
                            train_loss=result.train_loss)

    def _sync_to(self, plan: P.RoundPlan, pparams: dict) -> bool:
        """Bring the parameters to the global state at the start of plan.round."""
        if self.start_round == plan.round:
            return True
        if self.start_round == plan.round - 1 and not plan.params.get("delta_by_sync"):
            delta = P.RoundDelta(plan.round - 1, plan.delta_tensors)
            self._client.apply_delta(self.model, delta, pparams)
            self.start_round = plan.round
            return True
        # Behind by more than one round (joined late, restarted, missed a plan), or the delta was
        # too large for the retained plan (delta_by_sync: it comes in a reply, chunked): ask.
        if not self._request_sync(pparams):
            return False
        if self.start_round == plan.round - 1 and not plan.params.get("delta_by_sync"):
            return self._sync_to(plan, pparams)  # reply stopped one short: the plan has the rest
        return self.start_round == plan.round

    def _request_sync(self, pparams: dict) -> bool:
        """SyncRequest from our start_round; apply the reply (deltas or full state)."""
        self._status("syncing")
        req_id = self.ids.next()
        req = P.SyncRequest(job=self.job, device=self.device, from_round=self.start_round,
                            request_id=req_id)
        req = self._enc(req)
        deadline = time.time() + self.sync_timeout
        next_send = 0.0
        while time.time() < deadline:
            if time.time() >= next_send:
                # Re-sent until answered: a request published while the broker restarted can
                # reach it before the server has re-subscribed, and is then dropped.
                self._publish(self.topics.sync_request(self.device), req)
                next_send = time.time() + 5.0
            try:
                rep = self._syncs.get(timeout=0.5)
            except queue.Empty:
                continue
            if rep.request_id != req_id:
                continue
            if rep.full:
                exact = [t for t in rep.state if t.name == TRAINABLES_TENSOR]
                if (exact and exact[0].data.size == self.model.params.size
                        and self._client.state_is_trainables):  # the bits themselves
                    self.model.params[:] = exact[0].data.reshape(-1)
                else:
                    self._client.apply_full_state(self.model, rep.state, pparams)
                self.stats.full_syncs += 1
            else:
                if rep.from_round != self.start_round:
                    self.log.warning("%s: sync reply starts at %d, we are at %d; asking again later",
                                     self.device, rep.from_round, self.start_round)
                    return False
                for d in sorted(rep.rounds, key=lambda d: d.round):
                    self._client.apply_delta(self.model, d, pparams)
            self.stats.syncs += 1
            self.start_round = rep.to_round
            return True
        self.log.warning("%s: no sync reply in %.0f s", self.device, self.sync_timeout)
        return False

    def _newer_plan_queued(self, plan: P.RoundPlan) -> bool:
        """A plan for a later round (or a later secure-aggregation attempt) is waiting; a
        re-published plan of the same round, after a deadline extension or a server restart,
        is not a reason to stop re-sending."""
        key = _plan_key(plan)
        with self._plans.mutex:
            return any(_plan_key(p) > key for p in self._plans.queue)

    def _send_update(self, data: bytes, upd: P.Update, plan: P.RoundPlan) -> P.Ack | None:
        topic = self.topics.update(self.device)
        for attempt in range(1, 1000):
            self._publish(topic, data)
            deadline = time.time() + self.ack_timeout
            while time.time() < deadline:
                try:
                    ack = self._acks.get(timeout=0.5)
                except queue.Empty:
                    if self._finished.is_set():
                        return None
                    continue
                if ack.msg_id == upd.msg_id:
                    if ack.status in (P.AckStatus.ACCEPTED, P.AckStatus.DUPLICATE):
                        self.stats.updates_accepted += 1
                    return ack
            if self._finished.is_set() or self._newer_plan_queued(plan):
                return None  # the round moved on without us
            self.log.warning("%s: no ack for round %d after %.0f s (attempt %d); re-sending",
                             self.device, upd.round, self.ack_timeout, attempt)
        return None
