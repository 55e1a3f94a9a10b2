"""One federated job end to end, host side: the aggregation server, the devices (started by
the caller: threads in simulation, processes in the demo), and evaluation of the global
model on held-out data before, during and after training."""
from __future__ import annotations

import json
import logging
import queue
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .jsonable import without_arrays
from .global_model import GlobalModel, plot_rounds
from .methods import JobConfig, get_method
from .metrics import paired_f1_gain, paired_gain, paired_mean_gain, plot_confusion
from .runtime import DeviceModel
from .trainer import progress_bar
from .transport import make_transport

__all__ = ["DeviceFailed", "FederationResult", "check_job", "run_federation", "print_report"]

log = logging.getLogger("edgefed.federation")

# broker url -> stop function; if the stop function also has failure() -> str | None, the job is
# abandoned with that message as soon as it returns one (a device process crashed)
StartDevices = Callable[[str], Callable[[], None]]


class DeviceFailed(RuntimeError):
    """A device the job started exited with an error before the job finished."""


@dataclass
class FederationResult:
    job: dict
    before: dict
    after: dict
    gain: dict
    history: list
    rounds_completed: int
    seconds: float
    bytes_up_per_device_round: float
    bytes_down_per_device_round: float
    plot: str
    server_summary: dict
    final_params: np.ndarray | None = None  # the global model's trainables (not serialised)

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "final_params"}


def compare(before: dict, after: dict, n_classes: int = 0) -> dict:
    """The paired before/after comparison on the same held-out rows: accuracy-like metrics
    (classify, dpo) pair per-row correctness; sft / lm pair per-row loss (negative = better)."""
    if "correct" in before:
        g = {"metric": "accuracy", **paired_gain(before["correct"], after["correct"])}
        if "predictions" in before and n_classes:
            g["macro_f1"] = paired_f1_gain(before["targets"], before["predictions"], after["predictions"], n_classes)
        return g
    return {"metric": "loss", **paired_mean_gain(before["example_loss"], after["example_loss"])}


def primary(ev: dict, kind: str) -> float:
    return float(ev["accuracy"] if kind == "classify" else ev["preference_accuracy"] if kind == "dpo"
                 else ev["loss"])


def check_job(job: JobConfig) -> None:
    """Refuse a job the server would refuse (unknown method, a bad --param: ValueError naming
    it), before a broker or device starts: the strategy's init_state is where it checks them."""
    get_method(job.method).server().init_state(job)


def run_federation(job: JobConfig, artifact: str | Path, heldout: Sequence, *,
                   broker_url: str, start_devices: StartDevices, out_dir: str | Path,
                   eval_every: int = 1, eval_n: int = 128, eval_threads: int = 2,
                   http_port: int | None = None, timeout: float = 3600.0, progress: bool = True,
                   title: str = "", server_options: dict | None = None,
                   generate_n: int = 0, seq_len: int | None = None,
                   transport_options: dict | None = None) -> FederationResult:
    """server_options go to edgefed_server.engine.Server (e.g. history=2: rounds of deltas kept
    for sync before devices further behind get the full state). generate_n: sft held-out rows
    decoded greedily before and after (ROUGE-L, exact match). seq_len: tokens per held-out row
    (default: the default device class's)."""
    from edgefed_server.engine import Server
    from edgefed_server.store import Store

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    model = DeviceModel(artifact, threads=eval_threads, check_memory=False, seq_len=seq_len)
    glob = GlobalModel(model, job)
    kind, metric = model.kind, model.task.primary
    subset = list(heldout[:eval_n])
    print(f"evaluating the starting model on {len(heldout)} held-out rows ...", file=sys.stderr)
    before = glob.evaluate(heldout, generate_n=generate_n)
    ev0 = glob.evaluate(subset) if len(subset) < len(heldout) else before
    history = [{"round": 0, "train_loss": None, "eval_metric": primary(ev0, kind), "eval_loss": ev0["loss"],
                "eval_n": len(subset), "metric": metric}]
    print(f"  before: {metric} {primary(before, kind):.4f}" + (f", loss {before['loss']:.4f}" if metric != "loss" else ""),
          file=sys.stderr)

    store = Store(out / "server.sqlite")
    transport = make_transport(broker_url, client_id=f"edgefed-server-{job.job}", **(transport_options or {}))
    server = Server(transport, store, job, http_port=http_port, **(server_options or {}))
    done_rounds: "queue.Queue[dict]" = queue.Queue()
    server.add_round_listener(done_rounds.put)
    stop_devices = start_devices(broker_url)
    bar = progress_bar(job.rounds, "rounds", progress)
    try:
        server.start()
        if server.http_port:
            print(f"server status: http://127.0.0.1:{server.http_port}/", file=sys.stderr)
        end = time.time() + timeout
        device_failure = getattr(stop_devices, "failure", lambda: None)
        while glob.rounds_applied < job.rounds:
            failed = device_failure()
            if failed:
                raise DeviceFailed(f"job {job.job} stopped after {glob.rounds_applied}/{job.rounds} rounds: "
                                   f"{failed}")
            if time.time() > end:
                raise TimeoutError(f"job {job.job} did not finish in {timeout:.0f} s "
                                   f"({glob.rounds_applied}/{job.rounds} rounds)")
            try:
                m = done_rounds.get(timeout=1.0)
            except queue.Empty:
                continue
            r = int(m["round"])
            glob.apply(store.load_delta(job.job, r))
            h = {"round": r + 1, "train_loss": m.get("train_loss"), "n_updates": m["n_updates"],
                 "bytes_in": m["bytes_in"], "bytes_out": m["bytes_out"], "duration_s": m["duration_s"],
                 "eval_metric": None, "eval_loss": None, "eval_n": len(subset), "metric": metric}
            if (r + 1) % eval_every == 0 or r + 1 == job.rounds:
                ev = glob.evaluate(subset)
                h["eval_metric"], h["eval_loss"] = primary(ev, kind), ev["loss"]
            history.append(h)
            bar.update(1)
            line = (f"round {r + 1:>3}/{job.rounds}: {m['n_updates']} updates, train loss "
                    f"{m.get('train_loss') or float('nan'):.4f}, {m['duration_s']:.0f} s")
            if h["eval_metric"] is not None:
                line += f", held-out[{len(subset)}] " + (f"{metric} {h['eval_metric']:.3f} " if metric != "loss" else "")
                line += f"loss {h['eval_loss']:.4f}"
            print(line, file=sys.stderr)
        server_summary = server.summary()
    finally:
        bar.close()
        stop_devices()
        server.stop()
        transport.close()
    print(f"evaluating the trained model on {len(heldout)} held-out rows ...", file=sys.stderr)
    after = glob.evaluate(heldout, generate_n=generate_n)
    store.close()
    gain = compare(before, after, len(model.labels))
    if "confusion" in after:
        plot_confusion(after["confusion"], model.labels, out / "confusion.png",
                       f"held-out, after {glob.rounds_applied} rounds")
    rounds = [h for h in history if h["round"] > 0]
    up = float(np.mean([h["bytes_in"] / max(1, h["n_updates"]) for h in rounds])) if rounds else 0.0
    down = float(np.mean([h["bytes_out"] for h in rounds])) if rounds else 0.0
    plot = plot_rounds(history, out / "rounds.png", title or f"{job.job}: {job.method}")
    result = FederationResult(job=job.to_dict(), before=without_arrays(before), after=without_arrays(after), gain=gain,
                              history=history, rounds_completed=glob.rounds_applied,
                              seconds=time.time() - t_start, bytes_up_per_device_round=up,
                              bytes_down_per_device_round=down, plot=str(plot),
                              server_summary=server_summary, final_params=model.params.copy())
    (out / "results.json").write_text(json.dumps(result.to_json(), indent=1, default=str))
    return result


def print_report(res: FederationResult, file=sys.stdout) -> None:
    g = res.gain
    print("", file=file)
    print(f"job {res.job['job']}: {res.job['method']}, {res.rounds_completed} rounds in {res.seconds / 60:.1f} min",
          file=file)
    if g["metric"] == "accuracy":
        p = lambda x: f"{100 * x:.1f}%"  # noqa: E731
        name = "preference accuracy" if "preference_accuracy" in res.after else "accuracy"
        print(f"held-out {name} ({g['n']} rows, same template before and after):", file=file)
        print(f"  before  {p(g['before'])}   (loss {res.before['loss']:.4f})", file=file)
        print(f"  after   {p(g['after'])}   (loss {res.after['loss']:.4f})", file=file)
        print(f"  gain    {100 * g['gain']:+.1f} points, 95% CI [{100 * g['ci_low']:+.1f}, {100 * g['ci_high']:+.1f}] "
              f"(paired; {g['fixed']} fixed, {g['broken']} broken)", file=file)
        if "macro_f1" in g:
            f = g["macro_f1"]
            print(f"  macro-F1 {f['before']:.3f} -> {f['after']:.3f} ({f['gain']:+.3f}, 95% CI "
                  f"[{f['ci_low']:+.3f}, {f['ci_high']:+.3f}])", file=file)
    else:
        print(f"held-out loss per token ({g['n']} rows, same format before and after):", file=file)
        print(f"  before  {g['before']:.4f}   (perplexity {res.before.get('perplexity', float('nan')):.2f})", file=file)
        print(f"  after   {g['after']:.4f}   (perplexity {res.after.get('perplexity', float('nan')):.2f})", file=file)
        print(f"  change  {g['gain']:+.4f}, 95% CI [{g['ci_low']:+.4f}, {g['ci_high']:+.4f}] (paired; negative "
              "is better)", file=file)
        if "rouge_l" in res.after:
            print(f"  ROUGE-L {res.before['rouge_l']:.3f} -> {res.after['rouge_l']:.3f} on "
                  f"{res.after['generate_n']} greedy generations", file=file)
    print(f"bytes on the wire per device per round: {res.bytes_up_per_device_round:,.0f} B up (update), "
          f"{res.bytes_down_per_device_round:,.0f} B down (plan)", file=file)
    print(f"plot: {res.plot}", file=file)
