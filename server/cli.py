"""`edgefed server`: run the aggregation server of one job.

    edgefed server --job NAME --method fedkseed --artifact DIR --broker URL|auto --db PATH \
        --rounds N --local-steps S --lr X --eps Y --k K --min-devices M --devices-per-round D \
        --round-timeout T --http-port P [--param key=value ...] [--resume]

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

__all__ = ["add_server_args", "run_server", "parse_param", "job_config_from_args", "main"]


def parse_param(text: str) -> tuple:
    """'key=value' -> (key, int | float | str); true/false become 1/0."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--param {text!r}: use key=value")
    k, v = text.split("=", 1)
    k = k.strip()
    if not k:
        raise argparse.ArgumentTypeError(f"--param {text!r}: empty key")
    v = v.strip()
    low = v.lower()
    if low in ("true", "yes", "on"):
        return k, 1
    if low in ("false", "no", "off"):
        return k, 0
    for conv in (int, float):
        try:
            return k, conv(v)
        except ValueError:
            pass
    return k, v


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
    s.add_argument("--client-id", default=None, help="MQTT client id (default edgefed-server-<job>)")
    s.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    s.add_argument("--quiet", action="store_true", help="no per-round progress lines")
    s.add_argument("--linger", type=float, default=60.0,
                   help="after the last round, keep answering sync requests (devices fetch the "
                        "final model) until every device has left, at most this many seconds")
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
    from .store import Store

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
    db = args.db or f"edgefed-{args.job}.db"
    store = Store(db)
    broker = None
    transport = None
    server: Optional[Server] = None
    stop = threading.Event()
    stopped_by: List[int] = []
    try:
        if store.has_job(args.job) and not args.resume:
            print(f"edgefed server: job {args.job!r} already exists in {db}; pass --resume to "
                  f"continue it, or use another --job or --db", file=sys.stderr)
            return 2
        if args.resume and not store.has_job(args.job):
            print(f"job {args.job!r} is not in {db} yet: starting it", flush=True)
        if args.broker == "auto":
            broker = start_broker()
            print(f"started a {broker.kind} broker at {broker.url}", flush=True)
            url = broker.url
        else:
            url = args.broker
        # A stable client id gives the server a persistent session: updates published while it
        # is down (restart after a crash) are queued by the broker and delivered on reconnect.
        transport = make_transport(url, args.client_id or f"edgefed-server-{args.job}")
        transport.connect()

        def on_signal(signum: int, frame: Any) -> None:
            stopped_by.append(signum)
            stop.set()

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, on_signal)

        server = Server(transport, store, cfg, http_port=args.http_port,
                        allow_unknown_devices=args.allow_unknown_devices, history=args.history)
        total = cfg.rounds
        if not args.quiet:
            server.add_round_listener(lambda s: print(_progress_line(s, total), flush=True))
        server.start()
        total = server.job.rounds  # the stored configuration wins on --resume
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
        if server is not None:
            server.stop()
            server.flush(5.0)
        if transport is not None:
            transport.close()
        store.close()
        if broker is not None:
            broker.stop()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="edgefed server", description="EdgeFed aggregation server")
    add_server_args(p)
    return run_server(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
