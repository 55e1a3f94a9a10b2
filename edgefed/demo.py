"""`edgefed demo`, the main job: a real federated fine-tuning over MQTT.

It starts a broker (Mosquitto when installed, else the embedded amqtt broker), the
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
import os
import subprocess
import sys
import time
from pathlib import Path

from .data import SENTIMENT_TEMPLATE, write_jsonl
from .simulate import add_job_args, job_from_args, split_data

__all__ = ["add_demo_args", "run_demo"]

QUICK = {"model": "tiny", "trainable": "lora:r=4,targets=q_proj,v_proj", "rounds": 3, "local_steps": 4,
         "lr": 1e-2, "heldout": 100, "eval_n": 50, "batch_size": 8}


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny random model, same path, < 2 minutes")
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--broker", default=None, help="mqtt://host:port of an existing broker "
                   "(default: start Mosquitto if installed, else the embedded broker)")
    p.add_argument("--embedded-broker", action="store_true", help="use the embedded amqtt broker")
    p.add_argument("--device-config", default="x86-sim")
    p.add_argument("--device-threads", type=int, default=1)
    p.add_argument("--http-port", type=int, default=0, help="server status page port (0: any free)")
    add_job_args(p, rounds=20, local_steps=16, lr=2e-3, batch=8)


def _device_processes(args, job_id: str, artifact: Path, data_files: list[Path], logs: Path):
    def start(url: str):
        procs = []
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for i, data in enumerate(data_files):
            dev = f"device-{i + 1}"
            cmd = [sys.executable, "-m", "edgefed.cli", "device", "--config", args.device_config,
                   "--broker", url, "--data", str(data), "--artifact", str(artifact), "--job", job_id,
                   "--device-id", dev, "--threads", str(args.device_threads),
                   "--batch-size", str(args.batch_size), "--idle-timeout", str(args.round_timeout * 2)]
            log = open(logs / f"{dev}.log", "w")
            procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        print(f"started {len(procs)} device processes (logs in {logs}/device-*.log)", file=sys.stderr)

        def stop():
            deadline = time.time() + 30
            for p, _ in procs:  # they leave by themselves when the job is done
                try:
                    p.wait(timeout=max(0.1, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    p.terminate()
            for p, log in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                log.close()
        return stop
    return start


def run_demo(args) -> int:
    from . import kernels
    from .export.cache import ensure_artifact
    from .federation import print_report, run_federation
    from .models import prepare_model
    from .transport.broker import start_broker

    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    t0 = time.time()
    job_id = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(args.out or f"runs/{job_id}")
    (out / "data").mkdir(parents=True, exist_ok=True)
    print(f"[1/4] model {args.model}: preparing and exporting ({args.trainable}) ...", file=sys.stderr)
    prepare_model(args.model)
    artifact = ensure_artifact(args.model, args.trainable, template=SENTIMENT_TEMPLATE, progress=True)
    print(f"      artifact {artifact}", file=sys.stderr)
    shards, held = split_data(args, args.devices)
    files = [write_jsonl(out / "data" / f"device-{i + 1}.jsonl", s) for i, s in enumerate(shards)]
    print(f"[2/4] data: {sum(map(len, shards))} training snippets over {args.devices} devices "
          f"({args.split}), {len(held)} held out", file=sys.stderr)
    broker = start_broker(args.broker, prefer="embedded" if args.embedded_broker else "auto")
    print(f"[3/4] broker: {broker.kind} at {broker.url}", file=sys.stderr)
    kernels.set_num_threads(2)
    job = job_from_args(args, job_id, args.devices, artifact)
    try:
        print(f"[4/4] federated fine-tuning: {args.method}, {args.rounds} rounds x {args.local_steps} "
              f"local ZO steps, batch {args.batch_size}, lr {args.lr}, eps {args.eps}", file=sys.stderr)
        res = run_federation(job, artifact, held, broker_url=broker.url, out_dir=out,
                             start_devices=_device_processes(args, job_id, artifact, files, out),
                             eval_every=args.eval_every, eval_n=args.eval_n, http_port=args.http_port,
                             progress=not args.no_progress, timeout=args.round_timeout * (args.rounds + 2),
                             title=f"EdgeFed demo: {args.devices} devices over {broker.kind}, "
                                   f"{args.method} on {args.model} ({args.trainable.split(':')[0]})")
    finally:
        broker.stop()
    print_report(res)
    print(f"total time {(time.time() - t0) / 60:.1f} min; results in {out}/results.json", file=sys.stdout)
    return 0
