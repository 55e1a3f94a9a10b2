"""`edgefed server`: run the aggregation server of one job.

    edgefed server --job NAME --method fedkseed --artifact DIR --broker URL|auto --db PATH \
        --rounds N --local-steps S --lr X --eps Y --k K --min-devices M --devices-per-round D \
        --round-timeout T --http-port P [--param key=value ...] [--resume] \
        [--heldout FILE --eval-every N --eval-threads T --eval-generate G --eval-out PATH]

With --heldout the server also evaluates the global model on the user's held-out rows (read as
the artifact's task kind) at round 0, every --eval-every rounds and after the final round, in a
background thread (server/evaluation.py), and writes the history and the paired before/after
gain to <db>.eval.json (or --eval-out).

Also runnable as `python -m edgefed_server.cli ...`. SIGTERM/SIGINT stop cleanly (the job
can be continued with --resume); after a SIGKILL the store has everything that was acked.
Exit codes: 0 job finished, 2 usage/configuration error, 1 failure, 128+signal when stopped.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from typing import Any, List, Optional

from edgefed.methods.base import parse_param  # re-exported: the server CLI and `edgefed simulate` share it

__all__ = ["add_server_args", "run_server", "parse_param", "job_config_from_args", "main",
           "add_worker_args", "run_worker"]



def _stop_on_signals(stop: threading.Event, stopped_by: List[int]) -> None:
    """SIGTERM / SIGINT set `stop` (and are recorded) instead of killing mid-transaction; only the
    main thread may install handlers (tests run the CLI in threads)."""
    def on_signal(signum: int, frame: Any) -> None:
        stopped_by.append(signum)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)

def message_limits(mb: float):
    """protocol.Limits with max_message_bytes = mb MiB (at least the default 4)."""
    from edgefed.protocol import DEFAULT_LIMITS, Limits
    size = max(DEFAULT_LIMITS.max_message_bytes, int(float(mb) * (1 << 20)))
    return Limits(max_message_bytes=size)


def add_server_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("job")
    g.add_argument("--job", required=True, help="job id (1..64 of [A-Za-z0-9_.-])")
    g.add_argument("--method", default="fedkseed", help="registered method (edgefed.methods)")
    g.add_argument("--artifact", default="", help="artifact directory the devices run")
    g.add_argument("--rounds", type=int, default=10)
    g.add_argument("--local-steps", type=int, default=10)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--eps", type=float, default=1e-3)
    g.add_argument("--k", type=int, default=4096, help="seed pool size K (ZO methods)")
    g.add_argument("--seed-pool-id", type=int, default=0)
    g.add_argument("--seed", type=int, default=0, help="job-level randomness")
    g.add_argument("--min-devices", type=int, default=1, help="quorum at the deadline")
    g.add_argument("--devices-per-round", type=int, default=0,
                   help="close a round after this many accepted updates (0: every online device)")
    g.add_argument("--round-timeout", type=float, default=300.0, help="seconds from plan to deadline")
    g.add_argument("--param", action="append", type=parse_param, default=[], metavar="KEY=VALUE",
                   help="method-specific knob (repeatable), e.g. --param pro=1")
    s = p.add_argument_group("server")
    s.add_argument("--broker", default="auto",
                   help="mqtt://host:port, or 'auto' to start Mosquitto (else embedded amqtt)")
    s.add_argument("--db", default=None, help="SQLite store (default: ./edgefed-<job>.db)")
    s.add_argument("--resume", action="store_true",
                   help="continue the job stored in --db (required if the job exists)")
    s.add_argument("--http-port", type=int, default=None,
                   help="serve /, /status, /metrics on 127.0.0.1:PORT (0 = any free port)")
    s.add_argument("--allow-unknown-devices", action="store_true",
                   help="accept updates from devices that never published a Status")
    s.add_argument("--history", type=int, default=None,
                   help="delta syncs reach back this many rounds (default: all)")
    s.add_argument("--max-message-mb", type=float, default=4.0,
                   help="largest protocol message (an update, a sync reply); raise it on the server and "
                        "every device for full-model deltas: the transport sends it in chunks")
    s.add_argument("--broker-message-kb", type=int, default=4096,
                   help="the broker's per-message limit: larger payloads go in chunks (EMQX: 1024)")
    s.add_argument("--max-devices", type=int, default=1000,
                   help="registered devices per job; Statuses of new devices past it are refused")
    s.add_argument("--inbound-bytes", type=int, default=64 << 20,
                   help="byte budget of the inbound queue; messages past it are dropped, not acked")
    s.add_argument("--status-devices", type=int, default=100,
                   help="devices listed by /status (counts cover all of them)")
    s.add_argument("--http-allowed-host", action="append", default=[], metavar="HOST[:PORT]",
                   help="extra Host header the status page answers (default: 127.0.0.1/localhost)")
    s.add_argument("--signing-dir", default=None, metavar="DIR",
                   help="sign everything with the job key and accept only device messages signed "
                        "with keys in the registry: DIR/server.key + DIR/devices.json (the signing/ "
                        "folder `edgefed certs` writes). Without it: development mode, unsigned")
    s.add_argument("--workers", action="store_true",
                   help="scale-out: take updates through the MQTT 5 shared subscription of --share-group, "
                        "with `edgefed worker` processes as the other members (docs/server.md 'Scale-out')")
    s.add_argument("--share-group", default=None,
                   help="shared-subscription group of the coordinator and its workers (default edgefed-<job>)")
    s.add_argument("--worker-timeout", type=float, default=10.0,
                   help="seconds a closing round waits for a worker's partial before aggregating the "
                        "updates it accepted from the store")
    s.add_argument("--client-id", default=None, help="MQTT client id (default edgefed-server-<job>)")
    s.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    s.add_argument("--quiet", action="store_true", help="no per-round progress lines")
    s.add_argument("--linger", type=float, default=60.0,
                   help="after the last round, keep answering sync requests (devices fetch the "
                        "final model) until every device has left, at most this many seconds")
    e = p.add_argument_group("held-out evaluation (needs --artifact)")
    e.add_argument("--heldout", default=None, metavar="FILE",
                   help="held-out rows (JSONL/JSON, CSV, TSV, Parquet, datasets dir) read as the "
                        "artifact's task kind; the global model is evaluated on them as the job runs")
    e.add_argument("--eval-every", type=int, default=5, metavar="N",
                   help="evaluate every N aggregated rounds (and at round 0 and after the last round)")
    e.add_argument("--eval-threads", type=int, default=1, metavar="T",
                   help="ONNX Runtime threads for the evaluation")
    e.add_argument("--eval-generate", type=int, default=0, metavar="N",
                   help="sft: greedy generations on the first N held-out rows per evaluation (ROUGE-L)")
    e.add_argument("--eval-out", default=None, metavar="PATH",
                   help="evaluation history JSON (default: <db>.eval.json)")
    from edgefed.data_args import add_field_args
    add_field_args(p)
    return p


def job_config_from_args(args: argparse.Namespace):
    from edgefed.methods import JobConfig
    return JobConfig(job=args.job, method=args.method, artifact=args.artifact or "",
                     rounds=args.rounds, devices_per_round=args.devices_per_round,
                     min_devices=args.min_devices, round_timeout=args.round_timeout, lr=args.lr,
                     eps=args.eps, local_steps=args.local_steps, batch_size=args.batch_size, k=args.k,
                     seed_pool_id=args.seed_pool_id, seed=args.seed, params=dict(args.param or []))


def _progress_line(s: dict, total: int) -> str:
    loss = "-" if s.get("train_loss") is None else f"{s['train_loss']:.4f}"
    strat = s.get("strategy") or {}
    extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in list(strat.items())[:3])
    return (f"round {s['round']} done ({s['round'] + 1}/{total}): {s['n_updates']} updates, loss {loss}, "
            f"{s['duration_s']:.2f} s, in {s['bytes_in'] / 1024:.1f} KB, plan {s['bytes_out'] / 1024:.1f} KB"
            + (f", {extra}" if extra else ""))


def _linger(server, seconds: float, stop: threading.Event) -> None:
    """Devices pull the last round's delta with a SyncRequest once the job is done; stay until
    every device that announced itself reports finished or offline."""
    end = time.monotonic() + max(0.0, seconds)
    while time.monotonic() < end and not stop.is_set():
        states = [d.get("state") for d in server.status()["devices"]]
        if all(s in ("finished", "offline") for s in states):
            return
        time.sleep(0.2)


def run_server(args: argparse.Namespace) -> int:
    from edgefed.methods import get_method
    from edgefed.protocol import check_id
    from edgefed.transport import make_transport
    from edgefed.transport.broker import start_broker

    from .engine import Server
    from .store import IncompatibleJob, Store

    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=getattr(logging, args.log_level), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("edgefed.server")
    log.setLevel(getattr(logging, args.log_level))
    try:
        check_id(args.job, "job")
        get_method(args.method)
        cfg = job_config_from_args(args)
    except ValueError as e:
        print(f"edgefed server: {e}", file=sys.stderr)
        return 2
    heldout = getattr(args, "heldout", None)
    if heldout:
        if not args.artifact:
            print("edgefed server: --heldout needs --artifact DIR (the held-out rows are read and "
                  "evaluated with the artifact the devices run)", file=sys.stderr)
            return 2
        for opt, value, low in (("--eval-every", args.eval_every, 1), ("--eval-threads", args.eval_threads, 1),
                                ("--eval-generate", args.eval_generate, 0)):
            if value < low:
                print(f"edgefed server: {opt} must be >= {low}, got {value}", file=sys.stderr)
                return 2
    signing = None
    if getattr(args, "signing_dir", None):
        try:
            from edgefed.security.signing import ServerSigning
            signing = ServerSigning.from_dir(args.signing_dir)
        except (ValueError, OSError, ImportError) as e:
            print(f"edgefed server: --signing-dir: {e}", file=sys.stderr)
            return 2
        log.info("signing: job key %s, %d registered devices", args.signing_dir,
                 len(signing.verifier.devices))
    db = args.db or f"edgefed-{args.job}.db"
    store = Store(db)
    broker = None
    transport = None
    server: Optional[Server] = None
    evaluator = None
    stop = threading.Event()
    stopped_by: List[int] = []
    try:
        if store.has_job(args.job) and not args.resume:
            print(f"edgefed server: job {args.job!r} already exists in {db}; pass --resume to "
                  f"continue it, or use another --job or --db", file=sys.stderr)
            return 2
        if args.resume and not store.has_job(args.job):
            print(f"job {args.job!r} is not in {db} yet: starting it", flush=True)
        if args.resume and store.has_job(args.job):
            try:  # a job stored by another protocol version cannot be resumed
                store.check_protocol(args.job)
            except IncompatibleJob as e:
                print(f"edgefed server: {e}", file=sys.stderr)
                return 2
        if heldout:  # bad data fails here, before any broker or server starts
            evaluator = _make_evaluator(args, (store.load_job(args.job) if args.resume else None) or cfg,
                                        db, log)
            if evaluator is None:
                return 2
        if args.broker == "auto":
            broker = start_broker()
            print(f"started a {broker.kind} broker at {broker.url}", flush=True)
            url = broker.url
        else:
            url = args.broker
        # A stable client id gives the server a persistent session: updates published while it
        # is down (restart after a crash) are queued by the broker and delivered on reconnect.
        transport = make_transport(url, args.client_id or f"edgefed-server-{args.job}",
                                   max_payload_bytes=int(args.broker_message_kb) << 10)
        transport.connect()

        _stop_on_signals(stop, stopped_by)

        from .engine import ResourceLimits
        rlimits = ResourceLimits(max_devices=args.max_devices, inbound_bytes=args.inbound_bytes,
                                 status_devices=args.status_devices)
        share = None
        if getattr(args, "workers", False) or getattr(args, "share_group", None):
            from .worker import share_group
            share = share_group(args.job, args.share_group)
        try:
            server = Server(transport, store, cfg, http_port=args.http_port,
                            allow_unknown_devices=args.allow_unknown_devices, history=args.history,
                            resource_limits=rlimits, http_allowed_hosts=args.http_allowed_host,
                            signing=signing, limits=message_limits(args.max_message_mb),
                            share_group=share, worker_timeout=args.worker_timeout)
        except ValueError as e:
            print(f"edgefed server: {e}", file=sys.stderr)
            return 2
        if share:
            print(f"aggregation workers: shared subscription group {share}", flush=True)
        total = cfg.rounds
        if not args.quiet:
            server.add_round_listener(lambda s: print(_progress_line(s, total), flush=True))
        if evaluator is not None:
            evaluator.attach(server)
        server.start()
        total = server.job.rounds  # the stored configuration wins on --resume
        if evaluator is not None:
            evaluator.start()
            print(f"held-out evaluation: {len(evaluator.records)} rows of {heldout} ({evaluator.kind}, "
                  f"{evaluator.metric}) at round 0, every {evaluator.every} rounds and at the end"
                  + (f" (replaying the {server.round} stored rounds first)" if server.round else "")
                  + f"; history in {evaluator.out_path}", flush=True)
        print(f"server for job {server.job.job} ({server.job.method}) on {url}, store {db}, "
              f"round {server.round}/{total}"
              + (f", status http://127.0.0.1:{server.http_port}/" if server.http_port is not None else ""),
              flush=True)
        summary = server.run(stop_event=stop)
        if summary["done"]:
            _linger(server, args.linger, stop)
            print(f"job {summary['job']} finished: {summary['rounds_completed']} rounds, "
                  f"{summary['updates_accepted']} updates accepted this run, digest "
                  f"{summary['digest'][:16]}", flush=True)
            if evaluator is not None:
                if not evaluator.finished:
                    print("waiting for the held-out evaluation of the final round ...", flush=True)
                while not evaluator.wait(0.2) and not stop.is_set():
                    pass
                if stopped_by:
                    print(f"stopped by signal {stopped_by[0]} before the final held-out evaluation",
                          flush=True)
                    return 128 + stopped_by[0]
                if evaluator.error:
                    print(f"edgefed server: the job finished but {evaluator.error}", file=sys.stderr)
                    return 1
                print(evaluator.summary_line(), flush=True)
            return 0
        if stopped_by:
            print(f"stopped by signal {stopped_by[0]} at round {summary['round']}; continue with "
                  f"--resume", flush=True)
            return 128 + stopped_by[0]
        print(f"server stopped at round {summary['round']}: {summary.get('error') or 'engine ended'}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        log.exception("server failed: %s", e)
        return 1
    finally:
        if evaluator is not None and not evaluator.stop(10.0):
            log.warning("the held-out evaluation is still running; leaving it")
        if server is not None:
            server.stop()
            server.flush(5.0)
        if transport is not None:
            transport.close()
        store.close()
        if broker is not None:
            broker.stop()


def _make_evaluator(args: argparse.Namespace, job, db: str, log: logging.Logger):
    """The HeldoutEvaluator of --heldout, or None after printing why (bad data, bad artifact)."""
    from edgefed.data_args import fields_from_args

    from .evaluation import HeldoutEvaluator, read_heldout

    artifact = job.artifact or args.artifact
    try:
        records = read_heldout(args.heldout, artifact, fields_from_args(args))
        return HeldoutEvaluator(artifact, job, records, every=args.eval_every, threads=args.eval_threads,
                                generate_n=args.eval_generate, source=str(args.heldout),
                                out_path=args.eval_out or f"{db}.eval.json", logger=log)
    except (ValueError, OSError, KeyError) as e:  # DataError is a ValueError; names file:line
        print(f"edgefed server: --heldout: {e}", file=sys.stderr)
        return None


def add_worker_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--job", required=True, help="job id")
    p.add_argument("--worker-id", required=True, help="this worker's id (its MQTT user <id>@<job> and "
                   "signing key <id>.key, from `edgefed certs --workers`)")
    p.add_argument("--broker", required=True, help="mqtt(s)://... of an MQTT 5 broker (Mosquitto >= 1.6, EMQX 5)")
    p.add_argument("--share-group", default=None, help="shared-subscription group (default edgefed-<job>, "
                   "as the coordinator's)")
    p.add_argument("--signing-dir", default=None, metavar="DIR",
                   help="DIR/<worker-id>.key, DIR/devices.json and DIR/server.pub (the signing/ folder of "
                        "`edgefed certs`); without it: development mode, unsigned")
    p.add_argument("--client-id", default=None, help="MQTT client id (default edgefed-worker-<job>-<id>)")
    p.add_argument("--max-message-mb", type=float, default=4.0)
    p.add_argument("--broker-message-kb", type=int, default=4096)
    p.add_argument("--inbound-bytes", type=int, default=64 << 20,
                   help="byte budget of the inbound queue; messages past it are dropped, not acked")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def run_worker(args: argparse.Namespace) -> int:
    """`edgefed worker`: exit 0 when the job is finished, 2 on a configuration error, 1 on a
    failure, 128+signal when stopped."""
    from edgefed.protocol import check_id
    from edgefed.transport import make_transport

    from .worker import Worker

    logging.basicConfig(level=getattr(logging, args.log_level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        check_id(args.job, "job")
        check_id(args.worker_id, "worker")
    except ValueError as e:
        print(f"edgefed worker: {e}", file=sys.stderr)
        return 2
    signing = None
    if args.signing_dir:
        try:
            from edgefed.security.signing import WorkerSigning
            signing = WorkerSigning.from_dir(args.signing_dir, args.worker_id)
        except (ValueError, OSError, ImportError) as e:
            print(f"edgefed worker: --signing-dir: {e}", file=sys.stderr)
            return 2
    from .limits import ResourceLimits
    try:
        rlimits = ResourceLimits(inbound_bytes=args.inbound_bytes)
    except ValueError as e:
        print(f"edgefed worker: --inbound-bytes: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    stopped_by: List[int] = []

    _stop_on_signals(stop, stopped_by)
    transport = make_transport(args.broker, args.client_id or f"edgefed-worker-{args.job}-{args.worker_id}",
                               max_payload_bytes=int(args.broker_message_kb) << 10)
    worker = Worker(transport, args.job, args.worker_id, group=args.share_group, signing=signing,
                    limits=message_limits(args.max_message_mb), resource_limits=rlimits)
    try:
        transport.connect()
        worker.start()
        print(f"worker {args.worker_id} of job {args.job}: shared subscription "
              f"{worker.topics.shared_updates(worker.group)}", flush=True)
        finished = worker.run(stop_event=stop)
        if worker.error:
            print(f"edgefed worker: {worker.error}", file=sys.stderr)
            return 2
        if finished:
            print(f"job {args.job} finished: {worker.stats}", flush=True)
            return 0
        return 128 + stopped_by[0] if stopped_by else 1
    except Exception as e:  # noqa: BLE001
        logging.getLogger("edgefed.worker").exception("worker failed: %s", e)
        return 1
    finally:
        worker.stop()
        transport.close()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="edgefed server", description="EdgeFed aggregation server")
    add_server_args(p)
    return run_server(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
