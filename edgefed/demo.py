"""`edgefed demo`, the main job: a real federated fine-tuning over MQTT.

It starts a broker (the embedded amqtt broker by default, Mosquitto with --broker-kind), the
aggregation server (in this process) and 4 device processes (`edgefed device`, each with its
own ONNX Runtime session and no torch), which fine-tune SmolLM2-135M-Instruct's LoRA adapters
on Rotten Tomatoes snippets by forward passes only, sending the server nothing but
(seed index, scalar) pairs (FedKSeed). It prints held-out accuracy before and after with the
same template, the paired gain and its 95% interval, bytes on the wire per device per round,
and writes a plot of accuracy and loss over rounds.

`--quick` runs the same path on a tiny random model in well under 2 minutes (for tests).
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from .children import die_with_parent_preexec
from .data import write_jsonl
from .data_args import fields_from_args
from .simulate import add_job_args, job_from_args, prompt_init_from_args, split_data, task_from_args

__all__ = ["add_demo_args", "run_demo"]

# The demo's ZO recipe per trainable kind: (lr, job params), measured with
# benchmarks/zo_convergence.py (docs/results.md "Zeroth-order variants"). LoRA: only the B
# matrices move, at four times MeZO's step: at LoRA's start B = 0, so the gradient of A is
# exactly 0 and perturbing A adds only noise. A kind without a recipe gets MeZO's plain step.
# --lr and --param override them (mask_tensors= moves every trainable).
# LoRA's server step is sqrt(devices): averaging N devices' independent probes cuts the step's
# noise by sqrt(N) and its length by N, so scaling the mean by sqrt(N) keeps one device's noise
# while the signal grows; N (summing) was unstable. Measured: 4 devices, server_lr=2, demo +4.2
# points and loss 0.4659 in 13 rounds against +3.2 and 0.4740 in 16 without it; 16 devices,
# server_lr=4, stable, MeZO's final loss in 1/3 of its forwards (docs/results.md).
# norms: 1e-4, the best step centrally (batch 16; 4e-4 worse, 4e-3 diverged); in the demo 2e-4
# ended at the same accuracy with a higher loss and a gain interval that included zero.
# Not in any recipe: length_buckets (edgefed.batching). It makes ZO steps 1.30-1.35x cheaper, but
# two demos with it ran 20 rounds instead of 12-13 and ended lower (78.8% against 80.4%; 80.8%
# against 82.0% with the instruction template), at about the same held-out loss: docs/results.md
# "Length buckets". Pass --param length_buckets=8 to trade that for time.
RECIPES = {"lora": (4e-3, [("mask_tensors", "lora_B")]), "prompt": (8e-3, []), "norms": (1e-4, [])}
SQRT_N_SERVER_STEP = {"lora"}  # kinds whose recipe adds server_lr = sqrt(devices)
PLAIN_LR = 2e-3


def recipe(trainable: str, devices: int = 4) -> tuple[float, list[tuple[str, object]]]:
    """(lr, job params) of the demo's recipe for this trainable spec on `devices` devices."""
    kind = trainable.split(":", 1)[0].strip()
    lr, params = RECIPES.get(kind, (PLAIN_LR, []))
    params = list(params)
    if kind in SQRT_N_SERVER_STEP and devices > 1:
        params.append(("server_lr", round(math.sqrt(devices), 4)))
    return lr, params


QUICK = {"model": "tiny", "trainable": "lora:r=4,targets=q_proj,v_proj", "rounds": 3, "local_steps": 4,
         "lr": 1e-2, "heldout": 100, "eval_n": 50, "batch_size": 8}


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny random model, same path, < 2 minutes (flags you "
                   "give win: --quick --trainable prompt:tokens=4)")
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--broker", default=None, help="mqtt://host:port of an existing broker "
                   "(default: start one, see --broker-kind)")
    p.add_argument("--broker-kind", choices=["embedded", "mosquitto", "auto"], default="embedded",
                   help="broker to start when --broker is not given: the embedded amqtt broker (works "
                        "after a plain pip install), Mosquitto, or auto (Mosquitto when installed)")
    p.add_argument("--device-config", default="x86-sim")
    p.add_argument("--device-threads", type=int, default=0, help="ONNX Runtime threads per device process "
                   "(0: this machine's cores shared between the devices, at least 1)")
    p.add_argument("--eval-budget", type=float, default=0.1, help="per-round held-out evaluation runs beside the "
                   "devices: evaluate every N rounds so that it costs at most this fraction of the training time "
                   "(--eval-every overrides)")
    p.add_argument("--time-budget", type=float, default=18.0, help="minutes the job may take on this machine: "
                   "when the estimate (forward passes timed on random batches) is over it, fewer rounds are run and the demo says "
                   "so (0: always run --rounds)")
    p.add_argument("--http-port", type=int, default=0, help="server status page port (0: any free)")
    add_job_args(p, rounds=20, local_steps=16, lr=None, batch=8)  # lr None: the trainable's recipe
    p.set_defaults(eval_every=0)  # 0: from --eval-budget


def apply_quick(args) -> None:
    """--quick: QUICK fills in only what the command line left at its default, so
    `--quick --trainable prompt:tokens=4` runs a quick soft-prompt demo."""
    parser = argparse.ArgumentParser()
    add_demo_args(parser)
    defaults = vars(parser.parse_args([]))
    for k, v in QUICK.items():
        if getattr(args, k) == defaults[k]:
            setattr(args, k, v)


class DeviceProcesses:
    """The demo's `edgefed device` processes: started on a broker URL, stopped by calling the
    object; failure() names a device that exited before the job ended, with its log's tail."""

    def __init__(self, args, job_id: str, artifact: Path, data_files: list[Path], logs: Path):
        self.args, self.job_id, self.artifact, self.data_files, self.logs = args, job_id, artifact, data_files, logs
        self.procs: list[tuple[str, subprocess.Popen, IO[str]]] = []  # (device, process, its log)

    def start(self, url: str) -> "DeviceProcesses":
        a = self.args
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for i, data in enumerate(self.data_files):
            dev = f"device-{i + 1}"
            cmd = [sys.executable, "-m", "edgefed.cli", "device", "--config", a.device_config,
                   "--broker", url, "--data", str(data), "--artifact", str(self.artifact), "--job", self.job_id,
                   "--device-id", dev, "--threads", str(a.device_threads),
                   "--batch-size", str(a.batch_size), "--idle-timeout", str(a.round_timeout * 2)]
            if a.seq_len:
                cmd += ["--seq-len", str(a.seq_len)]
            log = open(self.logs / f"{dev}.log", "w")
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                 preexec_fn=die_with_parent_preexec())
            self.procs.append((dev, p, log))
        print(f"started {len(self.procs)} device processes (logs in {self.logs}/device-*.log)", file=sys.stderr)
        return self

    def failure(self) -> str | None:
        """A device process that exited with an error (they exit 0 only once the job is done)."""
        for dev, p, log in self.procs:
            if p.poll() not in (None, 0):
                tail = Path(log.name).read_text(errors="replace").splitlines()[-12:]
                return f"{dev} exited with code {p.returncode}; the end of {log.name}:\n  " + "\n  ".join(tail)
        return None

    def __call__(self) -> None:
        deadline = time.time() + 30
        for _, p, _ in self.procs:  # they leave by themselves when the job is done
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.terminate()
        for _, p, log in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
            log.close()


def plan_time(args, model, shards, held, started: float | None = None) -> None:
    """Size the work to this machine and say how long the job will take, before it starts: device
    threads from the cores, the per-round evaluation interval from --eval-budget, and an estimate
    from forward passes timed on random batches (edgefed.estimate). `started`: when the demo
    started (time.time()); what it spent before the job (model preparation, data, this timing)
    counts against --time-budget and is part of the estimate."""
    started = time.time() if started is None else started
    from .batching import check_buckets
    from .estimate import duration, estimate_job, forwards_per_step, time_forward, usable_cores

    cores = usable_cores()
    args.eval_threads = 1 if args.devices >= cores else max(1, cores - args.devices)
    rows = max(shards, key=len)
    params = dict(args.param or [])
    buckets = check_buckets(params.get("length_buckets", 1))
    # two whole draws of M length-bucketed batches: short and long batches weigh as the job runs them
    fwd = time_forward(model, rows, min(args.batch_size, len(rows)), repeats=max(6, 2 * buckets),
                       length_buckets=buckets)
    sizes = dict(local_steps=args.local_steps, forwards_per_step=forwards_per_step(params),
                 devices=args.devices, batch_size=args.batch_size, eval_n=min(args.eval_n, len(held)),
                 heldout_n=len(held), eval_threads=args.eval_threads, eval_budget=args.eval_budget, cores=cores)
    est = estimate_job(fwd, rounds=args.rounds, eval_every=args.eval_every or None, **sizes)
    spent_s = time.time() - started
    limit = float(getattr(args, "time_budget", 0) or 0) * 60  # 0: no limit
    budget = max(1.0, limit - spent_s)
    if limit and est.total_s > budget and args.rounds > 4:
        fixed = est.eval_final_s
        per_round = (est.total_s - fixed) / args.rounds
        rounds = max(4, int((budget - fixed) / per_round))
        if rounds < args.rounds:
            print(f"      this machine is slower than the demo was sized for ({est.describe()} for "
                  f"{args.rounds} rounds): running {rounds} rounds to stay within --time-budget "
                  f"{args.time_budget:g} min (--time-budget 0 runs all {args.rounds})", file=sys.stderr)
            args.rounds = rounds
            est = estimate_job(fwd, rounds=rounds, eval_every=est.eval_every, **sizes)
    args.eval_every = est.eval_every
    print(f"      estimate: {est.describe()}, after {duration(spent_s)} of preparation; {args.devices} devices x "
          f"{args.device_threads} thread(s), held-out evaluation of {min(args.eval_n, len(held))} rows every "
          f"{est.eval_every} round(s)", file=sys.stderr)
    args.estimate_s = est.total_s + spent_s  # against the demo's total time, printed at the end


def run_demo(args) -> int:
    from . import kernels
    from .export.cache import ensure_artifact
    from .federation import DeviceFailed, check_job, print_report, run_federation
    from .device_config import load_device_config
    from .models import prepare_model
    from .estimate import duration, usable_cores
    from .transport.broker import start_broker

    if args.quick:
        apply_quick(args)
    recipe_lr, recipe_params = recipe(args.trainable, args.devices)
    if args.lr is None:
        args.lr = recipe_lr
    try:  # before any work: a typo here would otherwise surface in every device's log
        load_device_config(args.device_config)
    except (OSError, ValueError) as e:
        print(f"edgefed demo: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    job_id = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(args.out or f"runs/{job_id}")
    (out / "data").mkdir(parents=True, exist_ok=True)
    from .data import DataError

    task, template = task_from_args(args)
    try:  # the user's data is read and split before any model work: a bad row fails in seconds
        shards, held = split_data(args, args.devices, out)
    except (DataError, ValueError, OSError) as e:
        print(f"edgefed demo: {e}", file=sys.stderr)
        return 2
    print(f"[1/4] model {args.model}: preparing and exporting ({args.trainable}, {task}) ...", file=sys.stderr)
    prepare_model(args.model)
    args.param = recipe_params + list(getattr(args, "param", None) or [])  # yours come last and win
    try:  # a bad trainable, template or --param fails here, before a broker or device starts
        artifact = ensure_artifact(args.model, args.trainable, task, template=template, data=args.data,
                                   fields=fields_from_args(args), prompt_init=prompt_init_from_args(args),
                                   progress=True)
        check_job(job_from_args(args, job_id, args.devices, artifact))  # rounds may still change: plan_time
    except (ValueError, OSError) as e:
        print(f"edgefed demo: {e}", file=sys.stderr)
        return 2
    print(f"      artifact {artifact}", file=sys.stderr)
    from .runtime import DeviceModel
    try:  # every row checked before the devices start (labels known, answers fit seq_len)
        if not args.device_threads:  # the cores shared between the device processes
            args.device_threads = max(1, usable_cores() // args.devices)
        probe_model = DeviceModel(artifact, threads=args.device_threads, check_memory=False, seq_len=args.seq_len)
        probe_model.task.validate([r for s in shards for r in s] + list(held))
    except ValueError as e:
        print(f"edgefed demo: {e} (--seq-len)", file=sys.stderr)
        return 2
    plan_time(args, probe_model, shards, held, started=t0)
    del probe_model
    files = [write_jsonl(out / "data" / f"device-{i + 1}.jsonl", s) for i, s in enumerate(shards)]
    print(f"[2/4] data: {sum(map(len, shards))} training rows over {args.devices} devices "
          f"({args.split}; {out}/split.json), {len(held)} held out", file=sys.stderr)
    broker = start_broker(args.broker, prefer=args.broker_kind, die_with_parent=True)
    print(f"[3/4] broker: {broker.kind} at {broker.url}", file=sys.stderr)
    kernels.set_num_threads(2)
    job = job_from_args(args, job_id, args.devices, artifact)
    try:
        variant = ", ".join(f"{k}={v}" for k, v in job.params.items() if k != "pro" and v != "")
        print(f"[4/4] federated fine-tuning: {args.method}, {args.rounds} rounds x {args.local_steps} "
              f"local ZO steps, batch {args.batch_size}, lr {args.lr}, eps {args.eps}"
              + (f", {variant}" if variant else ""), file=sys.stderr)
        res = run_federation(job, artifact, held, broker_url=broker.url, out_dir=out,
                             start_devices=DeviceProcesses(args, job_id, artifact, files, out).start,
                             eval_every=args.eval_every, eval_n=args.eval_n, http_port=args.http_port,
                             eval_threads=args.eval_threads,
                             generate_n=args.generate_n, seq_len=args.seq_len,
                             progress=not args.no_progress, timeout=args.round_timeout * (args.rounds + 2),
                             title=f"EdgeFed demo: {args.devices} devices over {broker.kind}, "
                                   f"{args.method} on {args.model} ({args.trainable.split(':')[0]})")
    except (DeviceFailed, TimeoutError) as e:
        print(f"edgefed demo failed: {e}\nserver, device and broker logs are in {out}/", file=sys.stderr)
        return 1
    finally:
        if broker.log_path and Path(broker.log_path).exists():  # kept for post-mortems
            shutil.copyfile(broker.log_path, out / "broker.log")
        broker.stop()
    print_report(res)
    print(f"total time {(time.time() - t0) / 60:.1f} min (estimated {duration(args.estimate_s)} at the start); "
          f"results in {out}/results.json", file=sys.stdout)
    return 0
