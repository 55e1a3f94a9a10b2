"""The coordinator's side of aggregation workers (docs/server.md "Scale-out: aggregation workers").

With `Server(..., share_group=G)` the server takes updates through the MQTT 5 shared
subscription `$share/G/edgefed/v1/<job>/update/+` like its workers (server/worker.py), so the
broker hands each update to one member. For the updates a worker took, the coordinator gets the
worker's reports (WorkerReport): the worker's decisions and the bytes of what it accepted. It
judges them against the job's state (stored? late? a second update of the device?), stores the
accepted ones and acks them exactly as its own; the worker's accumulator holds their sum.

Closing a round: a close request (WorkerControl, retained) asks every worker that holds
accepted updates of the round for its partial; the coordinator merges, into its own round
accumulator, each worker's partial, minus what the partial holds that the coordinator did not
accept from that worker (a re-sent update that another member took first: subtracted exactly),
plus what the worker reported after the reports its partial covers. The merged accumulator must
count exactly the round's accepted updates in the store, else the aggregation fails and the
round is rebuilt from the store. A worker that does not answer within `worker_timeout`, goes
offline, restarts (a new session) or sends a partial that does not fit is *adopted*: the
coordinator adds the updates it accepted from it from its own store (every accepted update's
bytes are there), so no acked update is ever lost and the result is the same bits either way.
"""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from edgefed.protocol import (Ack, AckStatus, ProtocolError, Status, Update, WorkerControl, WorkerReport,
                              decode)

from .admission import AcceptedMeta, Verdict, reject

__all__ = ["Member", "WorkerHub"]


@dataclass
class Member:
    """One worker process (worker id + session) in the open round."""
    worker: str
    session: int
    seqs: set = field(default_factory=set)                              # report seqs received
    assigned: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # device -> (msg_id, report seq)
    extras: List[Tuple[int, bytes]] = field(default_factory=list)       # (seq, raw) in its sum, not ours
    final: Optional[WorkerReport] = None
    adopted: bool = False


class WorkerHub:
    """Worker bookkeeping of one Server (engine thread only; the Server's lock is held)."""

    def __init__(self, server: Any, group: str, timeout: float):
        self.s = server
        self.group = group
        self.timeout = float(timeout)
        self.members: Dict[Tuple[str, int], Member] = {}
        self.all_adopted = False      # the accumulator was rebuilt from the store: no partials this round
        self.request = 0
        self.sent_at = 0.0
        self.online: Dict[str, bool] = {}
        self.stats = {"reports": 0, "partials_merged": 0, "adopted": 0, "corrections": 0,
                      "worker_accepted": 0, "worker_rejected": 0}

    # ------------------------------------------------------------------ rounds
    def new_round(self) -> None:
        self.members, self.all_adopted, self.request, self.sent_at = {}, False, 0, 0.0

    def adopt_all(self) -> None:
        """The round's accumulator holds every stored update (resume, rebuild)."""
        self.all_adopted = True
        for m in self.members.values():
            m.adopted = True

    def cancel_close(self) -> None:
        self.request = 0

    def control(self, request: int = 0) -> Tuple[str, bytes, bool]:
        s = self.s
        state = s.state.scalars if s.state is not None else {}
        cfg = [json.dumps(s.job.to_dict(), sort_keys=True).encode(),
               json.dumps(state, sort_keys=True, default=float).encode()]
        msg = WorkerControl(job=s.job.job, round=int(s.round), request=int(request), done=bool(s.done), config=cfg)
        return s.topics.worker_control(), msg.encode(s.limits, signer=s._signer), True

    def due(self) -> float:
        return self.sent_at + self.timeout if self.request else float("inf")

    # ------------------------------------------------------------------ statuses
    def on_status(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        s = self.s
        try:
            msg = decode(payload, limits=s.limits, expect=Status, verifier=s._worker_verifier)
        except ProtocolError as e:
            s._reject_log("worker_status", topic, e)
            return
        online = msg.state != "offline"
        was = self.online.get(msg.device)
        self.online[msg.device] = online
        if was != online:
            s.log.info("aggregation worker %s is %s", s._safe(msg.device), msg.state)
        if not online:
            for m in list(self.members.values()):
                if m.worker == msg.device:
                    self.adopt(m, "went offline")

    # ------------------------------------------------------------------ reports
    def on_report(self, topic: str, payload: bytes, outbox: list) -> None:
        s = self.s
        try:
            rep = decode(payload, limits=s.limits, expect=WorkerReport, verifier=s._worker_verifier)
            from edgefed.protocol import check_topic
            check_topic(topic, rep)
        except ProtocolError as e:
            s._reject_log("worker_report", topic, e)
            return
        assert isinstance(rep, WorkerReport)
        self.stats["reports"] += 1
        current = (not s.done and s.plan is not None and rep.round == s.round)
        member = None
        if current:
            key = (rep.worker, rep.session)
            member = self.members.get(key)
            if member is None:
                for m in list(self.members.values()):  # the same worker restarted: its old sums are gone
                    if m.worker == rep.worker and not m.adopted:
                        self.adopt(m, "restarted (a new session)")
                member = self.members[key] = Member(rep.worker, rep.session, adopted=self.all_adopted)
            if rep.seq in member.seqs:
                s.log.debug("worker %s: report %d again (ignored)", rep.worker, rep.seq)
                return
            member.seqs.add(rep.seq)
        now = s.clock()
        for ack_raw, label_raw, raw in zip(rep.decisions, rep.labels, rep.updates):
            try:
                self._entry(topic, rep, member, ack_raw, label_raw.decode("utf-8", "replace"), raw, now, outbox)
            except Exception as e:
                if type(e).__module__.startswith("sqlite3") or type(e).__name__ == "StoreError":
                    raise
                s._count_reject("internal")
                s.log.exception("worker %s: an entry of report %d failed: %s", s._safe(rep.worker), rep.seq,
                                s._safe(e))
                if member is not None and not member.adopted:
                    self.adopt(member, "sent an entry the coordinator could not handle")
        if member is not None and rep.request:
            member.final = rep

    def _entry(self, topic: str, rep: WorkerReport, member: Optional[Member], ack_raw: bytes, label: str,
               raw: bytes, now: float, outbox: list) -> None:
        s = self.s
        ack = decode(ack_raw, limits=s.limits, expect=Ack)
        assert isinstance(ack, Ack)
        if ack.job != s.job.job:
            raise ProtocolError(f"decision for job {ack.job!r}")
        utopic = s.topics.update(ack.device)
        if ack.status is AckStatus.ACCEPTED and label == "" and raw:
            upd = decode(raw, limits=s.limits, expect=Update)  # the worker verified its signature
            assert isinstance(upd, Update)
            if upd.device != ack.device or upd.msg_id != ack.msg_id or upd.job != s.job.job:
                raise ProtocolError("accepted update does not match its decision")
            self.stats["worker_accepted"] += 1
            adopted = member is None or member.adopted
            accepted = s._on_valid_update(utopic, upd, raw, now, outbox, validated=True, add=adopted)
            if member is not None and upd.round == s.round:
                if accepted:
                    member.assigned[upd.device] = (upd.msg_id, rep.seq)
                elif not adopted:
                    member.extras.append((rep.seq, raw))  # in the worker's sum: subtracted at the merge
            return
        prev = s.store.find_update(s.job.job, ack.device, ack.msg_id)
        if prev is not None:  # the worker saw a re-send: the stored answer again
            s.metrics["duplicates"] += 1
            s._ack(outbox, ack.device, prev["round"], ack.msg_id, AckStatus(prev["status"]), prev["reason"])
            return
        if label == "repeat":
            return  # accepted in a report still on its way: that one is acked
        if ack.status is AckStatus.REJECTED:
            self.stats["worker_rejected"] += 1
            s._refuse(utopic, ack.device, ack.msg_id, reject(label or "worker", ack.reason, ack.round), outbox)
            return
        s.metrics["late" if ack.status is AckStatus.LATE else "duplicates"] += 1
        s._ack(outbox, ack.device, ack.round, ack.msg_id, ack.status, ack.reason)

    # ------------------------------------------------------------------ closing
    def _waiting(self) -> List[Member]:
        if self.all_adopted:
            return []
        return [m for m in self.members.values() if not m.adopted and m.assigned
                and (m.final is None or m.final.request != self.request)]

    def prepare_close(self, now: float, outbox: list) -> bool:
        """True when the round can be merged: every worker holding accepted updates of the round
        answered the current close request, or was adopted; else sends the request / waits."""
        if self.all_adopted or not any(not m.adopted and m.assigned for m in self.members.values()):
            return True
        if not self.request:
            self.request = secrets.randbits(63) or 1
            self.sent_at = now
            outbox.append(self.control(self.request))
            return False
        waiting = self._waiting()
        if not waiting:
            return True
        if now < self.sent_at + self.timeout:
            return False
        for m in waiting:
            self.adopt(m, f"did not answer the close request within {self.timeout:g} s")
        return True

    def adopt(self, m: Member, why: str) -> None:
        """Add the updates the coordinator accepted from this worker from the store, and every
        later one as it comes: the worker's partial is not used this round."""
        s = self.s
        if m.adopted:
            return
        m.adopted = True
        self.stats["adopted"] += 1
        if not m.assigned:
            return
        s.log.warning("round %d: aggregation worker %s %s; its %d accepted updates are aggregated from "
                      "the store instead", s.round, s._safe(m.worker), why, len(m.assigned))
        if s.acc is None:
            return
        try:
            rows = {d: raw for d, _i, raw in s.store.accepted_updates(s.job.job, s.round)}
            for device in sorted(m.assigned):
                s.acc.add(decode(rows[device], limits=s.limits, expect=Update))
        except Exception as e:  # noqa: BLE001 - the sums may be half updated: start again from the store
            s.log.error("adopting worker %s failed (%s): the round's sums are rebuilt from the store",
                        s._safe(m.worker), s._safe(e))
            s._rebuild_acc()

    def merge_into(self, acc: Any) -> None:
        """Fold the workers' partials into the coordinator's accumulator (after prepare_close)."""
        s = self.s
        if self.all_adopted:
            return
        rows: Optional[Dict[str, bytes]] = None

        def stored(device: str) -> Update:
            nonlocal rows
            if rows is None:
                rows = {d: raw for d, _i, raw in s.store.accepted_updates(s.job.job, s.round)}
            return decode(rows[device], limits=s.limits, expect=Update)

        for m in self.members.values():
            if m.adopted or not m.assigned:
                continue  # a member with extras only: its partial minus them is zero
            f = m.final
            if (f is None or f.request != self.request or not f.tensors
                    or not set(range(1, f.seq + 1)) <= m.seqs):
                self.adopt(m, "sent no usable partial")  # adds to s.acc, which is `acc`
                continue
            acc.merge(f.tensors)
            self.stats["partials_merged"] += 1
            for seq, raw in m.extras:
                if seq <= f.seq:  # a re-send another member took first: in its sum, not in ours
                    one = s.strategy.start_round(s.job, s.state, s.plan)
                    one.add(decode(raw, limits=s.limits, expect=Update))
                    acc.merge(one.partial(), negate=True)
                    self.stats["corrections"] += 1
            for device, (_msg_id, seq) in sorted(m.assigned.items()):
                if seq > f.seq:  # reported after the partial was taken
                    acc.add(stored(device))
                    self.stats["corrections"] += 1
        if acc.count != len(s.accepted):
            raise ValueError(f"the merged partials hold {acc.count} updates but round {s.round} accepted "
                             f"{len(s.accepted)}; aggregating from the store instead")

    def summary(self) -> dict:
        return {"group": self.group, "online": sorted(w for w, on in self.online.items() if on),
                "members": len(self.members), **self.stats}
