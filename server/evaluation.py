"""Held-out evaluation of the global model on the aggregation server (`edgefed server --heldout`).

`HeldoutEvaluator` keeps its own copy of the global model (a DeviceModel of the job's artifact
plus `edgefed.global_model.GlobalModel`, which applies each aggregated round's delta exactly as
devices do) and evaluates it on the user's held-out rows: at round 0 (before training), every
`every` rounds and after the final round. Rounds are numbered by how many aggregated rounds
the model holds (0 = the artifact's initial trainables).

Thread model: ONE background worker does all the work (apply deltas read from the store, in
order; evaluate). The engine's round listener (`on_round`) only records how far the job got
and wakes the worker, so it never blocks the engine; rounds that close while the worker is
busy are caught up in order. On `--resume` the worker replays the stored deltas from round 0
(evaluating round 0 again for the before/after comparison; evaluations of earlier rounds found
in an existing output file for the same job, artifact and held-out rows are reused).

After every evaluation the history, the latest metrics and the comparison with round 0 (the
paired gain on the same rows: classify/dpo pair per-row correctness, sft/lm per-row loss,
where a negative gain is an improvement) are written atomically to the output JSON file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from edgefed.jsonable import plain, without_arrays

__all__ = ["HeldoutEvaluator", "read_heldout", "artifact_kind", "scalar_metrics", "compare_evaluations"]

FORMAT = "edgefed-heldout-eval"


def artifact_kind(artifact: str | os.PathLike) -> str:
    """The task kind (classify, sft, dpo, lm) of an artifact, from its manifest."""
    from edgefed.export.artifact import read_manifest
    return str(read_manifest(artifact)["task"]["kind"])


def read_heldout(path: str | os.PathLike, artifact: str | os.PathLike, fields=None) -> list:
    """The held-out rows of `path`, read as the artifact's task kind (DataError names file:line)."""
    from edgefed.data import read_records
    return read_records(path, artifact_kind(artifact), fields)


def scalar_metrics(ev: dict) -> dict:
    """An evaluation without its per-row arrays (correct, predictions, example_loss, ...)."""
    return plain(without_arrays(ev))


def compare_evaluations(before: dict, after: dict, n_classes: int = 0) -> dict:
    """The paired comparison of two evaluations on the same rows. classify / dpo: the gain in
    accuracy (per-row `correct`, `paired_gain`; classify adds macro-F1); sft / lm: the change
    in per-row loss (`paired_mean_gain`; negative = better), plus ROUGE-L when both generated."""
    from edgefed.metrics import paired_f1_gain, paired_gain, paired_mean_gain
    if "correct" in before and "correct" in after:
        out = {"metric": "accuracy" if "predictions" in before else "preference_accuracy",
               **paired_gain(before["correct"], after["correct"])}
        if "predictions" in before and "targets" in before and n_classes:
            out["macro_f1"] = paired_f1_gain(before["targets"], before["predictions"],
                                             after["predictions"], n_classes)
        return out
    out = {"metric": "loss", **paired_mean_gain(before["example_loss"], after["example_loss"])}
    if "example_rouge_l" in before and "example_rouge_l" in after:
        out["rouge_l"] = paired_mean_gain(before["example_rouge_l"], after["example_rouge_l"])
    return out


def _records_digest(records: Sequence) -> str:
    h = hashlib.sha256()
    for r in records:
        d = dataclasses.asdict(r) if dataclasses.is_dataclass(r) else {"repr": repr(r)}
        d.pop("origin", None)
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()[:32]


def _atomic_write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=1, allow_nan=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class HeldoutEvaluator:
    """Evaluates a job's global model on held-out rows every `every` rounds and at the end.

        ev = HeldoutEvaluator(artifact, job, records, every=5, out_path="state.db.eval.json")
        ev.attach(server)      # before server.start(): round listener + /status "evaluation"
        server.start()
        ev.start()             # the worker: round 0, then each round's delta in order
        ...
        ev.wait()              # the final round evaluated (or ev.stop() to abandon)

    The constructor loads the model and checks every row (ValueError / DataError naming the
    row's file:line), so bad data fails before the server starts.
    """

    def __init__(self, artifact: str | os.PathLike, job, records: Sequence, every: int = 5,
                 threads: int = 1, generate_n: int = 0, *, out_path: str | os.PathLike | None = None,
                 store=None, batch_size: int = 32, source: str = "", seq_len: Optional[int] = None,
                 logger: Optional[logging.Logger] = None):
        from edgefed.global_model import GlobalModel
        from edgefed.runtime import DeviceModel

        if int(every) < 1:
            raise ValueError(f"--eval-every must be >= 1, got {every}")
        if int(generate_n) < 0:
            raise ValueError(f"--eval-generate must be >= 0, got {generate_n}")
        self.log = logger or logging.getLogger("edgefed.server.eval")
        self.artifact = str(artifact)
        self.job = job
        self.records = list(records)
        if not self.records:
            raise ValueError("the held-out data has no rows")
        self.every = int(every)
        self.batch_size = int(batch_size)
        self.source = str(source)
        self.out_path = Path(out_path) if out_path is not None else None
        self.store = store
        self.model = DeviceModel(artifact, threads=max(1, int(threads)), seq_len=seq_len,
                                 check_memory=False)
        self.kind = self.model.kind
        self.metric = self.model.task.primary
        self.generate_n = int(generate_n)
        if self.generate_n and self.kind != "sft":
            self.log.warning("--eval-generate applies to sft artifacts only; this one is %s", self.kind)
            self.generate_n = 0
        checked = self.model.task.validate(self.records)  # labels known, rows fit: fail now
        self.truncated = int(checked.get("truncated", 0))
        if self.truncated:
            self.log.warning("%d of %d held-out rows are longer than %d tokens: their text is cut from "
                             "its end for evaluation", self.truncated, len(self.records),
                             self.model.task.limit)
        self.glob = GlobalModel(self.model, job)
        self.digest = _records_digest(self.records)

        self._cond = threading.Condition()
        self._known = 0             # rounds aggregated as far as we were told
        self._halt = False
        self._thread: Optional[threading.Thread] = None
        self._finished = threading.Event()
        self._server = None
        self._resume_round = 0
        self._prior: Dict[int, dict] = {}
        self._prior_comparison: Optional[dict] = None
        self._lock = threading.Lock()  # history/latest/comparison (read by the HTTP thread)
        self.history: List[dict] = []
        self.latest: Optional[dict] = None
        self.comparison: Optional[dict] = None
        self.error: Optional[str] = None
        self.done = False
        self.baseline: Optional[dict] = None  # round 0 with its per-row arrays
        self.last: Optional[dict] = None      # the latest evaluation with its arrays

    # ------------------------------------------------------------------ wiring
    def attach(self, server) -> "HeldoutEvaluator":
        """Listen to the server's rounds, read deltas from its store and add "evaluation" to its
        /status JSON. Call before server.start() so no round goes unnoticed."""
        self._server = server
        if self.store is None:
            self.store = server.store
        server.add_round_listener(self.on_round)
        extras = getattr(server, "status_extras", None)
        if extras is None:
            extras = {}
            server.status_extras = extras
        extras["evaluation"] = self.status
        return self

    def on_round(self, summary: dict) -> None:
        """Round listener (engine thread): record the round and wake the worker; never blocks."""
        with self._cond:
            self._known = max(self._known, int(summary["round"]) + 1)
            self._cond.notify_all()

    def start(self, current_round: Optional[int] = None) -> "HeldoutEvaluator":
        """Start the worker. current_round: rounds already aggregated (default: the attached
        server's round, after its start(), which on --resume is where the job stands)."""
        if self._thread is not None:
            return self
        if self.store is None:
            raise ValueError("HeldoutEvaluator needs a store: attach(server) or store=")
        srv = self._server
        if srv is not None and srv.job.to_dict() != self.job.to_dict():
            from edgefed.global_model import GlobalModel  # the stored configuration won (--resume)
            self.job = srv.job
            self.glob = GlobalModel(self.model, self.job)
        if current_round is None:
            current_round = int(srv.round) if srv is not None else 0
        with self._cond:
            self._known = max(self._known, int(current_round))
            self._resume_round = self._known
        self._load_prior()
        self._thread = threading.Thread(target=self._run, name=f"edgefed-eval-{self.job.job}", daemon=True)
        self._thread.start()
        return self

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Until the final round is evaluated or the worker ended (stopped, failed)."""
        return self._finished.wait(timeout)

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def stop(self, timeout: float = 10.0) -> bool:
        """Abandon what is left (an evaluation in progress runs to its end); True if the worker ended."""
        with self._cond:
            self._halt = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    @property
    def rounds_applied(self) -> int:
        return self.glob.rounds_applied

    # ------------------------------------------------------------------ the worker
    def _due(self, r: int) -> bool:
        return r == 0 or r % self.every == 0 or r >= int(self.job.rounds)

    def _run(self) -> None:
        job_id, total = self.job.job, int(self.job.rounds)
        try:
            if self._resume_round:
                self.log.info("held-out evaluation: replaying the %d stored rounds of job %s",
                              self._resume_round, job_id)
            if self._halt:
                return
            self._evaluate(0)
            missing_since: Optional[float] = None
            while self.glob.rounds_applied < total:
                r = self.glob.rounds_applied
                with self._cond:
                    while not self._halt and r >= self._known:
                        self._cond.wait(1.0)
                    if self._halt:
                        return
                delta = self.store.load_delta(job_id, r)
                if delta is None:  # told too early (not committed yet): look again shortly
                    now = time.monotonic()
                    if missing_since is None:
                        missing_since = now
                    elif now - missing_since > 10.0:
                        self.log.warning("held-out evaluation: the delta of round %d is still not in "
                                         "the store; waiting for it", r)
                        missing_since = now
                    with self._cond:
                        if not self._halt:
                            self._cond.wait(0.2)
                    continue
                missing_since = None
                self.glob.apply(delta)
                n = r + 1
                if not self._due(n):
                    continue
                prior = self._prior.get(n)
                if prior is not None and n <= self._resume_round and n < total:
                    with self._lock:  # evaluated by an earlier run of this server: reuse it
                        self.history.append(prior)
                        self.latest = prior
                        pc = self._prior_comparison
                        if pc is not None and pc.get("to_round") == n:
                            self.comparison = pc
                    continue
                if self._halt:
                    return
                self._evaluate(n)
            with self._lock:
                self.done = True
            self._write()
        except Exception as e:
            self.error = f"held-out evaluation failed at round {self.glob.rounds_applied}: {e!r}"
            self.log.exception("held-out evaluation failed at round %d", self.glob.rounds_applied)
            try:
                self._write()
            except Exception:
                pass
        finally:
            self._finished.set()

    def _evaluate(self, rnd: int) -> None:
        t0 = time.perf_counter()
        kw = {"generate_n": self.generate_n} if self.generate_n else {}
        ev = self.glob.evaluate(self.records, batch_size=self.batch_size, **kw)
        secs = time.perf_counter() - t0
        metrics = scalar_metrics(ev)
        entry = {"round": int(rnd), "metric": self.metric, "value": plain(ev.get(self.metric)),
                 "loss": plain(ev.get("loss")), "n": len(self.records), "seconds": round(secs, 4),
                 "at": time.time(), "metrics": metrics}
        comp = None
        if rnd == 0:
            self.baseline = ev
        elif self.baseline is not None:
            comp = compare_evaluations(self.baseline, ev, len(getattr(self.model, "labels", []) or []))
            comp = {"from_round": 0, "to_round": int(rnd), "final": rnd >= int(self.job.rounds),
                    **plain(comp)}
        self.last = ev
        with self._lock:
            self.history = [h for h in self.history if h["round"] != rnd] + [entry]
            self.latest = entry
            if comp is not None:
                self.comparison = comp
        self.log.info("%s", self._line(entry, comp))
        self._write()

    def _line(self, e: dict, comp: Optional[dict]) -> str:
        total = int(self.job.rounds)
        def f(v):  # noqa: E306
            return "-" if v is None else f"{v:.4f}"
        text = f"held-out round {e['round']}/{total}: {self.metric} {f(e['value'])}"
        if self.metric != "loss":
            text += f", loss {f(e['loss'])}"
        elif e["metrics"].get("perplexity") is not None:
            text += f", perplexity {e['metrics']['perplexity']:.3f}"
        if e["metrics"].get("rouge_l") is not None:
            text += f", ROUGE-L {e['metrics']['rouge_l']:.3f}"
        text += f" ({e['n']} rows, {e['seconds']:.1f} s)"
        if comp is not None and comp.get("gain") is not None:
            lo, hi = comp.get("ci_low"), comp.get("ci_high")
            ci = f" [{lo:+.4f}, {hi:+.4f}]" if lo is not None and hi is not None else ""
            text += f"; {comp['metric']} vs round 0: {comp['gain']:+.4f}{ci}"
            if comp["metric"] == "loss":
                text += " (negative = better)"
        return text

    # ------------------------------------------------------------------ output
    def _identity(self) -> dict:
        from .engine import artifact_id
        return {"job": self.job.job, "method": self.job.method, "artifact": artifact_id(self.artifact),
                "heldout": self.source, "heldout_digest": self.digest}

    def _load_prior(self) -> None:
        """Evaluations an earlier run of this server wrote for the same job, artifact and rows."""
        p = self.out_path
        if p is None or not p.is_file() or not self._resume_round:
            return
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            self.log.warning("ignoring %s: %s", p, e)
            return
        ident = self._identity()
        if data.get("format") != FORMAT or any(data.get(k) != v for k, v in ident.items()
                                                if k != "heldout"):
            self.log.info("%s is from another job, artifact or held-out set: starting afresh", p)
            return
        self._prior = {int(h["round"]): h for h in data.get("history", []) if "round" in h}
        self._prior_comparison = data.get("comparison")

    def result(self) -> dict:
        """What the output file holds: identity, history, latest, comparison with round 0."""
        with self._lock:
            return {"format": FORMAT, **self._identity(), "kind": self.kind, "metric": self.metric,
                    "n": len(self.records), "truncated": self.truncated, "every": self.every,
                    "rounds": int(self.job.rounds), "rounds_applied": self.glob.rounds_applied,
                    "done": self.done, "error": self.error, "history": list(self.history),
                    "latest": self.latest, "comparison": self.comparison, "updated_at": time.time()}

    def status(self) -> dict:
        """The compact form for /status: metric names and values, no per-row arrays."""
        with self._lock:
            return {"metric": self.metric, "kind": self.kind, "n": len(self.records), "every": self.every,
                    "file": str(self.out_path) if self.out_path else None,
                    "rounds_applied": self.glob.rounds_applied, "done": self.done, "error": self.error,
                    "latest": self.latest, "comparison": self.comparison,
                    "history": [{"round": h["round"], "value": h["value"], "loss": h["loss"]}
                                for h in self.history]}

    def _write(self) -> None:
        if self.out_path is not None:
            _atomic_write_json(self.out_path, plain(self.result()))

    def summary_line(self) -> str:
        """One line for the end of the run."""
        c = self.comparison
        if self.error:
            return self.error
        if not c:
            return f"held-out {self.metric}: no comparison yet ({self.glob.rounds_applied} rounds applied)"
        lo, hi = c.get("ci_low"), c.get("ci_high")
        ci = f", 95% CI [{lo:+.4f}, {hi:+.4f}]" if lo is not None and hi is not None else ""
        return (f"held-out {c['metric']} ({c['n']} rows): {c['before']:.4f} at round 0 -> {c['after']:.4f} "
                f"at round {c['to_round']}, gain {c['gain']:+.4f}{ci}"
                + (" (negative = better)" if c["metric"] == "loss" else "")
                + (f"; {self.out_path}" if self.out_path else ""))
