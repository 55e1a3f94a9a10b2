"""Simulation: N virtual devices and the server in one process, over the in-process transport
(the same bytes as MQTT) or a real broker. Researchers use it to compare methods.

    edgefed simulate --devices 8 --method fedkseed --model tiny --rounds 10 --split dirichlet --alpha 0.3
"""
from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
import uuid
from pathlib import Path

from . import kernels
from .agent import DeviceAgent
from .data import SENTIMENT_PROMPT_INIT, SENTIMENT_TEMPLATE, SPLIT_KINDS, split_examples, train_heldout_split, write_split_report
from .data_args import add_field_args, fields_from_args
from .methods import METHODS, JobConfig
from .runtime import DeviceModel
from .transport import make_transport

__all__ = ["add_simulate_args", "run_simulate", "thread_devices", "add_job_args", "job_from_args"]


def add_job_args(p: argparse.ArgumentParser, *, rounds: int, local_steps: int, lr: float, batch: int) -> None:
    p.add_argument("--method", default="fedkseed", choices=sorted(METHODS))
    p.add_argument("--model", default="smollm2-135m", help="packaged model name (smollm2-135m, tiny) or a path")
    p.add_argument("--trainable", default="lora:r=8,targets=q_proj,v_proj")
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--local-steps", type=int, default=local_steps)
    p.add_argument("--batch-size", type=int, default=batch)
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row on devices and in evaluation "
                   "(default: the device class's, 64); sft/dpo answers must fit whole")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--k", type=int, default=4096, help="seed pool size")
    p.add_argument("--pro", action="store_true", help="FedKSeed-Pro seed probabilities")
    p.add_argument("--data", default=None, help="your data (JSONL, CSV, TSV, Parquet or a saved datasets "
                   "directory); default: the packaged Rotten Tomatoes snippets (sentiment, or pairs for dpo)")
    p.add_argument("--task", default=None, help='task spec: "classify:labels=auto" (default with --data), '
                   '"classify:labels=a,b", "sft", "dpo[:beta=0.1]", "lm"')
    p.add_argument("--template", default=None, help=r"prompt template: classify {text}; sft/dpo {instruction} "
                   r"[{input}] (default: the tokenizer's chat template); \n is a newline")
    from .export.cli import add_prompt_init_arg
    add_prompt_init_arg(p)
    p.add_argument("--split", choices=list(SPLIT_KINDS), default="iid",
                   help="iid, dirichlet (label skew, classify) or group (one device per value of the group field)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (non-IID)")
    p.add_argument("--heldout", default="500", help="held-out rows taken from the data (a number), or a "
                   "separate held-out file of the same format")
    p.add_argument("--eval-n", type=int, default=128, help="held-out rows evaluated every round")
    p.add_argument("--generate-n", type=int, default=0, help="sft: held-out rows decoded greedily before "
                   "and after training (ROUGE-L, exact match)")
    p.add_argument("--eval-every", type=int, default=1)
    from .methods.base import parse_param
    p.add_argument("--param", action="append", type=parse_param, default=[], metavar="KEY=VALUE",
                   help="job knob (repeatable), as `edgefed server --param`: e.g. clip=10, aggregator=median, "
                        "secure_aggregation=1, dp_mode=local, prox_mu=0.01, server_opt=adam, mask_tensors=lora_B "
                        "(docs/methods.md)")
    p.add_argument("--round-timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default runs/<job>)")
    p.add_argument("--no-progress", action="store_true")
    add_field_args(p)


def task_from_args(args) -> tuple[str, str | None]:
    """(task spec, template) with the defaults for packaged or user data."""
    task = args.task or ("classify:labels=auto" if args.data else "classify:labels=positive,negative")
    template = args.template.replace("\\n", "\n") if args.template else None
    if template is None and not args.data and task.startswith("classify"):
        template = SENTIMENT_TEMPLATE
    return task, template


def prompt_init_from_args(args) -> str | None:
    """A soft prompt's starting text: --prompt-init, else the sentiment instruction on the packaged
    corpus, else None (export builds one from the task's labels)."""
    if args.prompt_init is not None:  # "" too: the export refuses it with a message, not silently
        return args.prompt_init
    return SENTIMENT_PROMPT_INIT if not args.data else None


def job_from_args(args, job_id: str, n_devices: int, artifact: Path) -> JobConfig:
    return JobConfig(job=job_id, method=args.method, artifact=str(artifact), rounds=args.rounds,
                     devices_per_round=n_devices, min_devices=max(1, n_devices // 2),
                     round_timeout=args.round_timeout, lr=args.lr, eps=args.eps,
                     local_steps=args.local_steps, batch_size=args.batch_size, k=args.k,
                     seed_pool_id=args.seed, seed=args.seed,
                     params={"pro": int(args.pro), **dict(getattr(args, "param", None) or [])})


def load_data(args):
    """(train records, held-out records) from --data / --heldout, or the packaged corpus."""
    from .data import load_rotten_tomatoes, read_records, rotten_tomatoes_pairs
    from .export.specs import parse_task

    kind = parse_task(task_from_args(args)[0]).kind
    fields = fields_from_args(args)
    if args.data:
        records = read_records(args.data, kind, fields)
    elif kind == "classify":
        records = load_rotten_tomatoes()
    elif kind == "dpo":
        records = rotten_tomatoes_pairs(load_rotten_tomatoes(), seed=args.seed)
    else:
        raise ValueError(f"task {kind} has no packaged data: pass --data FILE")
    if str(args.heldout).isdigit():
        return train_heldout_split(records, heldout=int(args.heldout), seed=args.seed)
    return records, read_records(args.heldout, kind, fields)


def split_data(args, n: int, out: Path | None = None):
    """Device shards and the held-out set; with `out`, the split and its per-device label
    histogram are written there (split.json, split.png)."""
    train, held = load_data(args)
    shards = split_examples(train, n, args.split, args.alpha, args.seed)
    if out is not None:
        write_split_report(out, shards, held, settings={
            "data": args.data or "packaged", "split": args.split, "alpha": args.alpha, "seed": args.seed,
            "devices": n, "heldout": str(args.heldout)})
    return shards, held


def _run_agent(agent: DeviceAgent, stop: threading.Event, errors: list) -> None:
    try:
        agent.run(stop=stop)
    except Exception as e:  # noqa: BLE001 - reported to the job, which stops with it
        errors.append(f"{agent.device} failed: {type(e).__name__}: {e}")
        raise


def thread_devices(base: DeviceModel, job: str, shards, *, threads_per_device: int = 1,
                   signing_dir=None, agent_cls=None, device_classes=None, transport_options=None,
                   device_ids=None):
    """Virtual devices as threads sharing one loaded graph (DeviceModel.fork; `base` may also be a
    list of one model per shard, e.g. ONNX devices and torch hosts in one job). The returned
    starter keeps its agents in `.agents` (tests compare their parameters). signing_dir: the
    signing/ folder of `edgefed certs` for devices sim-000.. (sign; pass the server
    ServerSigning.from_dir(signing_dir) in run_federation's server_options); None = unsigned.
    agent_cls: a DeviceAgent subclass for every device, or a list of one per shard (fault
    injection, Byzantine devices). device_classes: the class each device announces (per-device
    plans assign settings by class; default x86-sim). transport_options: make_transport options
    of every device (e.g. max_payload_bytes, the broker's message limit). device_ids: the devices'
    ids (default sim-000, sim-001, ...). The starter keeps the device threads in `.threads`."""
    def start(url: str):
        stop = threading.Event()
        workers = []
        errors: list[str] = []
        for i, shard in enumerate(shards):
            dev = device_ids[i] if device_ids else f"sim-{i:03d}"
            model = (base[i] if isinstance(base, (list, tuple)) else base).fork()
            signing = None
            if signing_dir is not None:
                from .security.signing import DeviceSigning
                signing = DeviceSigning.from_files(Path(signing_dir) / f"{dev}.key",
                                                   Path(signing_dir) / "server.pub", dev)
            cls = agent_cls[i] if isinstance(agent_cls, (list, tuple)) else (agent_cls or DeviceAgent)
            agent = cls(make_transport(url, client_id=f"edgefed-{job}-{dev}", **(transport_options or {})),
                        dev, job, model, shard, device_class=device_classes[i] if device_classes else "x86-sim",
                        signing=signing)
            start.agents.append(agent)
            th = threading.Thread(target=_run_agent, args=(agent, stop, errors), name=dev, daemon=True)
            th.start()
            workers.append(th)
            start.threads.append(th)

        def halt():
            end = time.time() + 30  # agents leave by themselves once the job is done
            for th in workers:
                th.join(timeout=max(0.1, end - time.time()))
            stop.set()
            for th in workers:
                th.join(timeout=10)
        # run_federation stops the job at once with a virtual device's error (not at its timeout)
        halt.failure = lambda: errors[0] if errors else None
        return halt
    start.agents = []
    start.threads = []
    return start


def add_simulate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--transport", default="inproc", help="inproc, auto (start a broker) or mqtt://host:port")
    add_job_args(p, rounds=5, local_steps=5, lr=1e-3, batch=8)
    p.add_argument("--torch-hosts", type=int, default=None, help="how many of the devices are torch hosts "
                   "(backprop; the rest run ONNX Runtime). Default: all for backprop methods (fedavg), else 0")
    p.add_argument("--torch-device", default="auto", help="torch hosts' device: cuda, cpu or auto")
    p.add_argument("--processes", type=int, default=1, help="spread the devices over this many worker "
                   "processes (thousands of virtual devices; needs a broker: --transport auto or a URL, "
                   "auto is used when left inproc)")
    p.add_argument("--ray", action="store_true", help="with --processes: Ray actors instead of local "
                   "processes (ray must be installed; ray.init() joins the cluster you configured)")
    p.add_argument("--inline", action="store_true", help="the transport-free loop (edgefed.research): no "
                   "broker, no store, no threads; the same result as the full path, for quick method studies")


def run_simulate(args) -> int:
    from .export.cache import ensure_artifact
    from .federation import DeviceFailed, check_job, print_report, run_federation

    from .data import DataError

    job_id = f"sim-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    out = Path(args.out or f"runs/{job_id}")
    task, template = task_from_args(args)
    try:
        shards, held = split_data(args, args.devices, out)
        artifact = ensure_artifact(args.model, args.trainable, task, template=template, data=args.data,
                                   fields=fields_from_args(args), prompt_init=prompt_init_from_args(args),
                                   progress=not args.no_progress)
        job = job_from_args(args, job_id, args.devices, artifact)
        check_job(job)  # a bad --param: before any device
    except (DataError, ValueError, OSError) as e:
        print(f"edgefed simulate: {e}", file=sys.stderr)
        return 2
    kernels.set_num_threads(1)
    base = DeviceModel(artifact, threads=1, check_memory=False, seq_len=args.seq_len)
    try:  # every row checked before any device starts (labels, lengths), as a real device does
        base.task.validate([r for s in shards for r in s] + list(held))
    except ValueError as e:
        print(f"edgefed simulate: {e}", file=sys.stderr)
        return 2
    needs_torch = args.method in ("fedavg",)
    hosts = args.devices if args.torch_hosts is None and needs_torch else int(args.torch_hosts or 0)
    if needs_torch and hosts < args.devices:
        print(f"edgefed simulate: {args.method} trains by backprop: every device must be a torch host "
              f"(--torch-hosts {args.devices})", file=sys.stderr)
        return 2
    models = base
    if hosts:
        try:
            from .backends import load_model_backend
            host = load_model_backend("torch", artifact, None, batch_size=args.batch_size,
                                      seq_len=args.seq_len or base.seq_len, torch_device=args.torch_device)
        except (RuntimeError, ValueError, OSError) as e:
            print(f"edgefed simulate: {e}", file=sys.stderr)
            return 2
        models = [host if i < hosts else base for i in range(args.devices)]
    if args.inline:
        return _run_inline(args, job, models, shards, held, base)
    if args.processes > 1 and (hosts or args.inline):
        print("edgefed simulate: --processes runs ONNX devices over a broker; it takes neither --torch-hosts "
              "nor --inline", file=sys.stderr)
        return 2
    if args.processes > 1 and args.transport == "inproc":
        args.transport = "auto"  # processes meet on a real broker
    broker = None
    url = f"inproc://{job_id}"
    if args.transport == "auto":
        from .transport.broker import start_broker
        broker = start_broker()
        url = broker.url
    elif args.transport != "inproc":
        url = args.transport
    if args.processes > 1:
        from .fleet_sim import ProcessFleet
        starter = ProcessFleet(job_id, str(artifact), shards, args.processes, backend="ray" if args.ray else "processes",
                               seq_len=args.seq_len, batch_size=args.batch_size)
    else:
        starter = thread_devices(models, job_id, shards)
    try:
        res = run_federation(job, artifact, held, broker_url=url, out_dir=out,
                             start_devices=starter, eval_n=args.eval_n,
                             generate_n=args.generate_n, seq_len=args.seq_len,
                             eval_every=args.eval_every, progress=not args.no_progress,
                             title=f"simulation: {args.devices} devices, {args.method}, {args.split}")
    except DeviceFailed as e:
        print(f"edgefed simulate failed: {e}", file=sys.stderr)
        return 1
    finally:
        if broker is not None:
            broker.stop()
    print_report(res)
    return 0


def _run_inline(args, job, models, shards, held, evaluator) -> int:
    """--inline: edgefed.research.run_inline, evaluating the global model with ONNX Runtime."""
    from .research import run_inline

    subset = list(held)[: args.eval_n]
    evaluator = evaluator.fork()
    kind = evaluator.task.primary

    def score(params):
        evaluator.params[:] = params
        return evaluator.evaluate(subset)

    before = score(evaluator.params.copy())
    print(f"round   0: held-out[{len(subset)}] {kind} {before[kind]:.4f}, loss {before['loss']:.4f}")

    def on_round(rnd, params, m):
        line = f"round {rnd + 1:>3}: train loss {m['train_loss']:.4f}, {m['bytes_up']:.0f} B up per device"
        if (rnd + 1) % args.eval_every == 0 or rnd + 1 == job.rounds:
            ev = score(params)
            line += f", held-out {kind} {ev[kind]:.4f}, loss {ev['loss']:.4f}"
        print(line, flush=True)

    forks = [(models[i] if isinstance(models, (list, tuple)) else models).fork() for i in range(len(shards))]
    try:
        run_inline(job, forks, shards, on_round=on_round)
    except (ValueError, RuntimeError) as e:
        print(f"edgefed simulate --inline: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    ap = argparse.ArgumentParser()
    add_simulate_args(ap)
    sys.exit(run_simulate(ap.parse_args()))
