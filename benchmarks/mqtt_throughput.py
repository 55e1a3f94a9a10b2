"""QoS-1 throughput through EdgeFed's MQTT transport: Mosquitto vs the embedded amqtt broker.

4 publisher clients (one thread each) and 1 subscriber in this process, 1.2 KB payloads,
loopback only. Two publisher modes:
  pipelined  publish(wait=False), then wait for every PUBACK (up to max_inflight in flight)
  lockstep   publish(wait=True): one PUBACK round trip per message, as a device sending updates

    python benchmarks/mqtt_throughput.py [--messages 2000] [--brokers mosquitto,embedded,inproc]

Bounded: each run stops after --max-seconds even if messages are missing (reported as lost).
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from edgefed.transport import InProcBroker, make_transport, start_broker  # noqa: E402
from edgefed.transport.broker import find_mosquitto  # noqa: E402
from edgefed.transport.mqtt import MqttTransport  # noqa: E402

PAYLOAD = bytes(range(256)) * 4 + bytes(176)  # 1,200 bytes


def run(url: str, messages: int, publishers: int, mode: str, max_seconds: float) -> dict:
    per_pub = messages // publishers
    total = per_pub * publishers
    received = [0]
    done = threading.Event()
    lock = threading.Lock()

    def on_msg(topic: str, payload: bytes) -> None:
        with lock:
            received[0] += 1
            if received[0] >= total:
                done.set()

    def client(cid: str):
        if url.startswith("inproc://"):
            return make_transport(url, cid)
        return MqttTransport(url, cid, publish_timeout=max_seconds)

    sub = client(f"bench-sub-{mode}")
    sub.connect()
    sub.subscribe("bench/+", on_msg)
    pubs = [client(f"bench-pub-{mode}-{i}") for i in range(publishers)]
    for p in pubs:
        p.connect()

    def publish_all(p, i: int) -> None:
        topic = f"bench/{i}"
        if mode == "lockstep":
            for _ in range(per_pub):
                p.publish(topic, PAYLOAD, qos=1)
        else:
            handles = [p.publish(topic, PAYLOAD, qos=1, wait=False) for _ in range(per_pub)]
            for h in handles:
                h.wait(max_seconds)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=publish_all, args=(p, i)) for i, p in enumerate(pubs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max_seconds)
    done.wait(max(0.0, max_seconds - (time.perf_counter() - t0)))
    elapsed = time.perf_counter() - t0
    for c in pubs + [sub]:
        c.close()
    return {"received": received[0], "total": total, "seconds": elapsed,
            "rate": received[0] / elapsed if elapsed else 0.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--publishers", type=int, default=4)
    ap.add_argument("--brokers", default="mosquitto,embedded,inproc")
    ap.add_argument("--modes", default="pipelined,lockstep")
    ap.add_argument("--max-seconds", type=float, default=60.0)
    a = ap.parse_args()

    rows = []
    for kind in a.brokers.split(","):
        if kind == "mosquitto" and find_mosquitto() is None:
            print("mosquitto not installed: skipped", file=sys.stderr)
            continue
        handle = None
        if kind == "inproc":
            url = "inproc://bench"
            InProcBroker.named("bench")
        else:
            handle = start_broker(prefer=kind)
            url = handle.url
        try:
            for mode in a.modes.split(","):
                r = run(url, a.messages, a.publishers, mode, a.max_seconds)
                rows.append((kind, mode, r))
        finally:
            if handle:
                handle.stop()

    print(f"\nQoS 1, {len(PAYLOAD)} B payloads, {a.publishers} publishers -> 1 subscriber, "
          f"{a.messages} messages, one process, loopback")
    print(f"{'broker':<10} {'mode':<10} {'msg/s':>9} {'seconds':>8} {'received':>12}")
    for kind, mode, r in rows:
        print(f"{kind:<10} {mode:<10} {r['rate']:>9.0f} {r['seconds']:>8.2f} "
              f"{r['received']:>6}/{r['total']:<5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
