"""Aggregation-server load benchmark: a real Server (SQLite store, group commit) behind a real
Mosquitto on loopback, fed by simulated devices in worker processes.

  1. Throughput and latency: N logical devices (100, 1000) spread over a few worker processes,
     each worker ONE MQTT client publishing every device's Status and fedkseed Update (200 seed
     scalars, K=4096) on that device's own topic and receiving its Acks. Reported: accepted
     updates per second and round latency (plan built -> round aggregated and committed).
  2. Bytes per device per round for fedkseed (K=4096, 200 local steps, 10 devices a round),
     measured from the encoded Update and RoundPlan messages of real rounds (in-process
     transport, same bytes as MQTT), against the FedKSeed paper's 18 KB and against LoRA FedAvg
     on SmolLM2 (r=8 on q,v: 1,843,200 B each way per device).

    python benchmarks/server_load.py [--devices 100,1000] [--workers 2] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

K = 4096
SCALARS = 200
FEDKSEED_PAPER_BYTES = 18_000  # "< 18 KB per round" (FedKSeed, Qin et al. 2024)
LORA_BYTES_EACH_WAY = 1_843_200  # SmolLM2-135M LoRA r=8 on q,v, fp32


# ----------------------------------------------------------------------------- worker process

def run_worker(a: argparse.Namespace) -> int:
    """Simulated devices first..first+count-1 on one MQTT client."""
    from edgefed.methods.fedkseed import SCALARS as SCALARS_T, seed_tensors
    from edgefed.protocol import MessageIds, Status, Topics, Update, decode
    from edgefed.transport.mqtt import MqttTransport

    top = Topics(a.job)
    names = [f"d{i:05d}" for i in range(a.first, a.first + a.count)]
    rng = np.random.default_rng(a.first)
    seeds = [np.sort(rng.choice(a.k, a.scalars, replace=False)).astype(np.uint32) for _ in names]
    scalars = [rng.normal(size=a.scalars).astype(np.float32) for _ in names]
    ids = MessageIds()
    t = MqttTransport(a.url, f"bench-w{a.first}-{uuid.uuid4().hex[:6]}", clean_start=True,
                      tcp_nodelay=a.nodelay)
    t.connect()
    done = threading.Event()
    acks = [0]
    lock = threading.Lock()
    answered = set()

    def on_ack(topic, payload):
        with lock:
            acks[0] += 1

    def on_state(topic, payload):
        if payload and decode(payload).params.get("done") == 1:
            done.set()

    def on_plan(topic, payload):
        if not payload:
            return
        plan = decode(payload)
        if plan.round in answered:
            return
        answered.add(plan.round)
        for i, n in enumerate(names):
            u = Update(job=a.job, round=plan.round, device=n, method=plan.method, msg_id=ids.next(),
                       num_samples=8, tensors=seed_tensors(seeds[i], scalars[i], SCALARS_T), train_loss=0.5)
            t.publish(top.update(n), u.encode(), wait=False)

    for n in names:
        t.subscribe(top.ack(n), on_ack)
    last = None
    for n in names:
        last = t.publish(top.status(n), Status(job=a.job, device=n, state="online",
                                               device_class="x86-sim", timestamp=time.time()).encode(),
                         retain=True, wait=False)
    if last is not None:
        last.wait(60)
    t.subscribe(top.state(), on_state)
    t.subscribe(top.plan(), on_plan)
    print("READY", flush=True)
    done.wait(a.timeout)
    # clear our retained statuses so the next scale starts clean
    for n in names:
        last = t.publish(top.status(n), b"", retain=True, wait=False)
    if last is not None:
        last.wait(30)
    t.close()
    print(f"ACKS {acks[0]}", flush=True)
    return 0


# ----------------------------------------------------------------------------- throughput

def load_run(url: str, n_devices: int, rounds: int, workers: int, tmp: Path, timeout: float,
             nodelay: bool = True) -> dict:
    from edgefed.methods import JobConfig
    from edgefed.transport.mqtt import MqttTransport
    from edgefed_server.engine import Server
    from edgefed_server.store import Store

    job = f"load{n_devices}-{uuid.uuid4().hex[:4]}"
    per = [n_devices // workers + (1 if i < n_devices % workers else 0) for i in range(workers)]
    procs, first = [], 0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for cnt in per:
        if cnt == 0:
            continue
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", "--url", url, "--job", job, "--first", str(first),
             "--count", str(cnt), "--k", str(K), "--scalars", str(SCALARS), "--timeout", str(timeout)]
            + (["--nodelay"] if nodelay else []),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
        first += cnt
    try:
        for p in procs:
            line = p.stdout.readline()
            if line.strip() != "READY":
                raise RuntimeError(f"worker failed to start: {line!r} {p.stderr.read()[-2000:]}")
        store = Store(tmp / f"{job}.db")
        transport = MqttTransport(url, f"edgefed-server-{job}", tcp_nodelay=nodelay)
        cfg = JobConfig(job=job, method="fedkseed", rounds=rounds, k=K, local_steps=SCALARS, lr=1e-3,
                        devices_per_round=n_devices, min_devices=n_devices, round_timeout=timeout)
        from edgefed_server.engine import ResourceLimits
        # the registry's default cap (1,000 devices) is a safety limit, not a capacity: raise it
        srv = Server(transport, store, cfg, settle=0.5,
                     resource_limits=ResourceLimits(max_devices=max(1000, 2 * n_devices)))
        t0 = time.perf_counter()
        srv.start()
        cpu0 = time.process_time()  # this process runs only the server (devices are elsewhere)
        out = srv.run(timeout=timeout)
        server_cpu = time.process_time() - cpu0
        wall = time.perf_counter() - t0
        srv.stop()
        srv.flush(10)
        transport.close()
        store.close()
    finally:
        acks = 0
        for p in procs:
            try:
                o, _ = p.communicate(timeout=30)
                acks += sum(int(x.split()[1]) for x in o.splitlines() if x.startswith("ACKS"))
            except subprocess.TimeoutExpired:
                p.kill()
    if not out["done"]:
        raise RuntimeError(f"load run with {n_devices} devices did not finish: {out}")
    hist = out["history"]
    steady = hist[1:] or hist  # round 0 includes connection warm-up of the workers
    rates = [h["n_updates"] / h["duration_s"] for h in steady]
    lat = [h["duration_s"] for h in steady]
    return {"devices": n_devices, "rounds": rounds, "workers": len(procs), "client_nodelay": nodelay,
            "updates_per_s_median": statistics.median(rates),
            "updates_per_s_overall": sum(h["n_updates"] for h in steady) / sum(lat),
            "round_latency_s_median": statistics.median(lat), "round_latency_s_max": max(lat),
            "round0_latency_s": hist[0]["duration_s"], "acks_received_by_devices": acks,
            "updates_accepted": out["updates_accepted"], "wall_s": wall,
            "server_cpu_us_per_update": 1e6 * server_cpu / max(1, out["updates_accepted"]),
            "update_bytes": hist[-1]["bytes_in"] / hist[-1]["n_updates"]}


def engine_run(tmp: Path, n_devices: int = 2000) -> dict:
    """The engine alone: pre-encoded updates through the in-process transport (no broker, no
    paho), same validation, SQLite group commit and Acks. Shows what the MQTT runs leave on
    the table on a small machine."""
    from edgefed.methods import JobConfig
    from edgefed.methods.fedkseed import SCALARS as SCALARS_T, seed_tensors
    from edgefed.protocol import MessageIds, Status, Topics, Update
    from edgefed.transport import InProcBroker
    from edgefed_server.engine import Server
    from edgefed_server.store import Store

    broker, job = InProcBroker(), "engine"
    top = Topics(job)
    dev = broker.client("devices")
    dev.connect()
    names = [f"d{i:05d}" for i in range(n_devices)]
    for n in names:
        dev.publish(top.status(n), Status(job=job, device=n, state="online").encode(), retain=True)
    rng, ids = np.random.default_rng(0), MessageIds()
    msgs = [(top.update(n), Update(job=job, round=0, device=n, method="fedkseed", msg_id=ids.next(),
                                   num_samples=8, tensors=seed_tensors(
                                       np.sort(rng.choice(K, SCALARS, replace=False)).astype(np.uint32),
                                       rng.normal(size=SCALARS).astype(np.float32), SCALARS_T)).encode())
            for n in names]
    store = Store(tmp / "engine.db")
    cfg = JobConfig(job=job, method="fedkseed", rounds=1, k=K, local_steps=SCALARS,
                    devices_per_round=n_devices, min_devices=n_devices, round_timeout=120)
    from edgefed_server.engine import ResourceLimits
    srv = Server(broker.client("server"), store, cfg, settle=0.2,
                 resource_limits=ResourceLimits(max_devices=max(1000, 2 * n_devices)))
    srv.start()
    t0 = time.perf_counter()
    for topic, payload in msgs:
        dev.publish(topic, payload)
    out = srv.run(timeout=120)
    dt = time.perf_counter() - t0
    srv.stop()
    store.close()
    assert out["done"], out
    return {"devices": n_devices, "updates_per_s": n_devices / dt, "round_latency_s": dt}


# ----------------------------------------------------------------------------- bytes

def bytes_run(tmp: Path, devices: int = 10, rounds: int = 5, steps: int = 200) -> dict:
    """Encoded Update (uplink) and RoundPlan (downlink) sizes of real fedkseed rounds."""
    from edgefed.methods import JobConfig
    from edgefed.methods.fedkseed import SCALARS as SCALARS_T, seed_tensors
    from edgefed.protocol import MessageIds, Status, Topics, Update, decode
    from edgefed.transport import InProcBroker
    from edgefed_server.engine import Server
    from edgefed_server.store import Store

    broker = InProcBroker()
    job = "bytes"
    top = Topics(job)
    dev = broker.client("devices")
    dev.connect()
    ids = MessageIds()
    names = [f"d{i}" for i in range(devices)]
    up, down = [], []
    rng = np.random.default_rng(0)

    def on_plan(topic, payload):
        plan = decode(payload)
        down.append((plan.round, len(payload)))
        for n in names:  # 200 local steps, seeds drawn from the pool with replacement
            idx = rng.integers(0, int(plan.params["k"]), steps)
            u_idx, inv = np.unique(idx, return_inverse=True)
            g = np.zeros(u_idx.size, np.float64)
            np.add.at(g, inv, rng.normal(size=steps))
            payload = Update(job=job, round=plan.round, device=n, method=plan.method, msg_id=ids.next(),
                             num_samples=steps * 8, tensors=seed_tensors(u_idx, g, SCALARS_T),
                             train_loss=0.7).encode()
            up.append(len(payload))
            dev.publish(top.update(n), payload)

    for n in names:
        dev.publish(top.status(n), Status(job=job, device=n, state="online").encode(), retain=True)
    dev.subscribe(top.plan(), on_plan)
    store = Store(tmp / "bytes.db")
    cfg = JobConfig(job=job, method="fedkseed", rounds=rounds, k=K, local_steps=steps,
                    devices_per_round=devices, min_devices=devices)
    srv = Server(broker.client("server"), store, cfg, settle=0.05)
    out = srv.run(timeout=60)
    srv.stop()
    store.close()
    assert out["done"], out
    plans = [b for r, b in down if r >= 1]  # round 0's plan carries no delta yet
    uplink = float(np.mean(up))
    downlink = float(np.mean(plans))
    total = uplink + downlink
    return {"devices_per_round": devices, "local_steps": steps, "k": K,
            "uplink_update_bytes": uplink, "downlink_plan_bytes": downlink,
            # a fedkseed delta is the tensors seeds + coeffs: two values per seed
            "delta_seeds_per_plan": float(np.mean([h["delta_values"] for h in out["history"]])) / 2,
            "bytes_per_device_per_round": total,
            "fedkseed_paper_bytes": FEDKSEED_PAPER_BYTES,
            "ratio_vs_fedkseed_paper": total / FEDKSEED_PAPER_BYTES,
            "lora_fedavg_bytes_per_device_per_round": 2 * LORA_BYTES_EACH_WAY,
            "lora_over_ours": 2 * LORA_BYTES_EACH_WAY / total}


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="100,1000", help="comma-separated device counts")
    ap.add_argument("--rounds", type=int, default=0, help="rounds per scale (default 6 / 4)")
    ap.add_argument("--workers", type=int, default=4, help="device worker processes")
    ap.add_argument("--timeout", type=float, default=180.0)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--client-nodelay", default="both", choices=["on", "off", "both"],
                    help="TCP_NODELAY on the paho client sockets (server and devices): 'off' is the "
                         "transport with tcp_nodelay=False, 'on' as shipped (TCP_NODELAY)")
    ap.add_argument("--nodelay", action="store_true", help=argparse.SUPPRESS)
    # worker mode (internal)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, default=K, help=argparse.SUPPRESS)
    ap.add_argument("--scalars", type=int, default=SCALARS, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return run_worker(a)

    import logging
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from edgefed.transport.broker import start_broker

    tmp = Path(tempfile.mkdtemp(prefix="edgefed-server-load-"))
    broker = start_broker()
    results = {"broker": broker.kind, "cpus": os.cpu_count(), "python": sys.version.split()[0],
               "load": [], "bytes": None}
    try:
        modes = {"on": [True], "off": [False], "both": [False, True]}[a.client_nodelay]
        for nd in modes:
            for n in [int(x) for x in a.devices.split(",") if x.strip()]:
                rounds = a.rounds or (6 if n <= 100 else 4)
                print(f"load: {n} devices, {rounds} rounds, {a.workers} worker processes, client "
                      f"TCP_NODELAY {'on' if nd else 'off'} ...", flush=True)
                results["load"].append(load_run(broker.url, n, rounds, a.workers, tmp, a.timeout, nd))
        results["engine"] = engine_run(tmp)
        results["bytes"] = bytes_run(tmp)
    finally:
        broker.stop()

    print()
    print(f"Server load through {results['broker']} on loopback ({results['cpus']} CPUs; broker, server "
          f"and {a.workers} device processes share them); fedkseed updates of {SCALARS} scalars, K={K}")
    print(f"{'nodelay':>7} {'devices':>8} {'rounds':>6} {'updates/s (median)':>19} {'updates/s (all)':>16} "
          f"{'latency median s':>17} {'latency max s':>14} {'vs 2000/s':>10} {'server CPU/update':>18}")
    for r in results["load"]:
        print(f"{'on' if r['client_nodelay'] else 'off':>7} {r['devices']:>8} {r['rounds']:>6} {r['updates_per_s_median']:>19,.0f} "
              f"{r['updates_per_s_overall']:>16,.0f} {r['round_latency_s_median']:>17.3f} "
              f"{r['round_latency_s_max']:>14.3f} {r['updates_per_s_overall'] / 2000:>9.2f}x "
              f"{r['server_cpu_us_per_update']:>15.0f} us")
    e = results["engine"]
    print(f"engine alone (in-process transport, no broker): {e['devices']} updates in one round at "
          f"{e['updates_per_s']:,.0f} updates/s ({e['updates_per_s'] / 2000:.2f}x 2000/s)")
    b = results["bytes"]
    print()
    print(f"Bytes per device per round, fedkseed K={b['k']}, {b['local_steps']} local steps, "
          f"{b['devices_per_round']} devices a round (encoded messages)")
    print(f"  uplink Update        {b['uplink_update_bytes']:>12,.0f} B")
    print(f"  downlink RoundPlan   {b['downlink_plan_bytes']:>12,.0f} B   "
          f"({b['delta_seeds_per_plan']:.0f} delta seeds)")
    print(f"  total                {b['bytes_per_device_per_round']:>12,.0f} B   "
          f"= {b['ratio_vs_fedkseed_paper']:.2f}x the FedKSeed paper's 18 KB")
    print(f"  LoRA FedAvg (SmolLM2 r=8 q,v) {b['lora_fedavg_bytes_per_device_per_round']:>10,} B   "
          f"= {b['lora_over_ours']:.0f}x ours")
    print("\n'nodelay' = TCP_NODELAY on the paho client sockets of the server and the devices; the "
          "broker always has set_tcp_nodelay.\nWith it off (MqttTransport(tcp_nodelay=False); on is the default), bursts of "
          "small QoS-1 messages wait for delayed ACKs (~40 ms a round on loopback).")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
        print(f"\nwrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
