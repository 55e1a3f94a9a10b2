"""What secure aggregation costs, in bytes and time, against plain aggregation measured in the
same run.

    python benchmarks/secagg_overhead.py [--devices 10,50] [--dropout 0,0.1] [--json FILE]
    python benchmarks/secagg_overhead.py --job          # + a whole job, plain vs secure

Part 1 (the protocol, edgefed.security.secagg.run_in_memory: every message encoded, signed with
Ed25519 and decoded as on the wire, SecAgg+ graph of degree 2*ceil(log2 n) for n > 10, else
everyone): per device bytes sent and received and seconds of crypto, for the vectors EdgeFed
sends — FedKSeed's per-seed sums over a pool of K=4096 (+ the weight) and a LoRA r=8 delta of
SmolLM2-135M (460,800 values + the weight) — against the plain update of the same round (FedKSeed:
16 (seed, scalar) pairs; FedMeZO: the float32 delta) and the plain server-side weighted mean.
Dropouts leave after sharing their keys (the costly case: their masks are rebuilt).

Part 2 (--job): the tiny test model, 4 virtual devices, FedKSeed, 4 rounds through the real
server and agents on the in-process transport, plain vs secure_aggregation=1: seconds per round
and bytes per device per round.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from edgefed.security.secagg import (SecAggClient, SecAggServer, config_from_plan,  # noqa: E402
                                     plan_params)
from edgefed.security.signing import Signer  # noqa: E402

VECTORS = {  # name: (length, bound, plain bytes per device)
    "fedkseed K=4096": (4097, 64 * 10.0 * 8, 16 * 8),
    "fedmezo LoRA r=8 (460800)": (460_801, 64 * 0.05, 460_800 * 4),
}


def _degree(n: int) -> int:
    return 0 if n <= 10 else min(n - 1 - (n - 1) % 2, 2 * math.ceil(math.log2(n)))


def protocol_round(n: int, length: int, bound: float, dropout: float, seed: int = 0) -> dict:
    params = plan_params(length, bound, n, 0, _degree(n), 0)
    cfg = config_from_plan("bench", 1, params)
    rng = np.random.default_rng(seed)
    ids = [f"d{i:04d}" for i in range(n)]
    xs = {d: rng.uniform(-bound, bound, length) / n for d in ids}
    signers = {d: Signer.generate(d) for d in ids}
    ss = Signer.generate("server")
    srv = SecAggServer(cfg, signer=ss, device_keys={d: s.public_key() for d, s in signers.items()})
    cl = {d: SecAggClient(d, cfg, signer=signers[d], server_key=ss.public_key()) for d in ids}
    drop = set(ids[:int(round(dropout * n))])
    spent = {d: 0.0 for d in (*ids, "server")}  # seconds of crypto and encoding, per party
    up = {d: 0 for d in ids}
    down = {d: 0 for d in ids}

    def timed(who, fn, *a):
        t0 = time.perf_counter()
        out = fn(*a)
        spent[who] += time.perf_counter() - t0
        return out

    def send(d, make, *a, to):
        """A device's message: made (timed for the device), counted, taken by the server (timed)."""
        m = timed(d, make, *a)
        up[d] += len(m)
        timed("server", to, m)

    for d in ids:
        send(d, cl[d].advertise, to=srv.add_advertise)
    roster = timed("server", srv.roster)
    for d in ids:
        down[d] += len(roster)
        send(d, cl[d].share_keys, roster, to=srv.add_shares)
    alive = [d for d in ids if d not in drop]
    for d in alive:
        fwd = timed("server", srv.forward, d)
        down[d] += len(fwd)
        send(d, cl[d].masked_input, fwd, xs[d], to=srv.add_masked)
    req = timed("server", srv.unmask_request)
    for d in alive:
        down[d] += len(req)
        send(d, cl[d].unmask, req, to=srv.add_unmask)
    total, surv = timed("server", srv.result)
    err = float(np.max(np.abs(total - sum(xs[d] for d in surv))))
    # the plain baseline: the server's weighted mean of the same float32 vectors
    t0 = time.perf_counter()
    w = np.ones(len(alive)) / len(alive)
    _ = sum(wi * xs[d].astype(np.float32) for wi, d in zip(w, alive))
    t_plain = time.perf_counter() - t0
    a = alive
    return {"n": n, "length": length, "dropout": dropout, "degree": _degree(n), "bits": cfg.fixed.bits,
            "frac_bits": cfg.fixed.frac_bits, "up_bytes": float(np.mean([up[d] for d in a])),
            "down_bytes": float(np.mean([down[d] for d in a])), "device_s": float(np.mean([spent[d] for d in a])),
            "server_s": spent["server"], "plain_server_s": t_plain, "max_abs_error": err}


def job_compare(rounds: int = 4) -> list[dict]:
    import tempfile
    from pathlib import Path

    from edgefed.data import iid_split, load_rotten_tomatoes, train_heldout_split
    from edgefed.federation import run_federation
    from edgefed.methods import JobConfig
    from edgefed.runtime import DeviceModel
    from edgefed.simulate import thread_devices
    from edgefed.export import export_artifact
    from edgefed.models import load_model, tiny_random_model

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        model, tok = load_model(tiny_random_model(Path(tmp) / "model", seed=0))  # the tests' tiny model
        art = export_artifact(model, Path(tmp) / "art", "lora:r=4,targets=q_proj,v_proj",
                              "classify:labels=positive,negative", tokenizer=tok, progress=False)
        train, held = train_heldout_split(load_rotten_tomatoes(), heldout=40, seed=0)
        for secure in (False, True):
            p = {"clip": 10.0, **({"secure_aggregation": 1, "secagg_max_devices": 8} if secure else {})}
            name = f"bench-{'secure' if secure else 'plain'}-{os.getpid()}"
            job = JobConfig(job=name, method="fedkseed", artifact=str(art), rounds=rounds, devices_per_round=4,
                            min_devices=4, round_timeout=60, lr=1e-2, eps=1e-3, local_steps=4, batch_size=8,
                            k=4096, seed_pool_id=3, params=p)
            base = DeviceModel(art, threads=1, batch_size=8, seq_len=32, check_memory=False)
            t0 = time.perf_counter()
            res = run_federation(job, art, held, broker_url=f"inproc://{name}",
                                 start_devices=thread_devices(base, name, iid_split(train[:200], 4)),
                                 out_dir=Path(tmp) / name, eval_n=8, eval_every=rounds, progress=False)
            secs = [h["duration_s"] for h in res.server_summary["history"]]
            out.append({"mode": "secure" if secure else "plain", "round_s": float(np.mean(secs)),
                        "up_bytes": res.bytes_up_per_device_round, "down_bytes": res.bytes_down_per_device_round,
                        "wall_s": time.perf_counter() - t0})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="10,50")
    ap.add_argument("--dropout", default="0,0.1")
    ap.add_argument("--vectors", default=",".join(VECTORS), help="comma-separated names from: " + "; ".join(VECTORS))
    ap.add_argument("--job", action="store_true", help="also run a whole tiny job, plain vs secure")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = []
    print(f"load average at start: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    head = (f"{'vector':<28}{'n':>5}{'drop':>6}{'ring':>6}{'up/dev':>12}{'x plain':>9}{'down/dev':>12}"
            f"{'dev s':>8}{'server s':>10}{'x plain':>9}{'max err':>10}")
    print(head)
    for name in [v for v in args.vectors.split(",") if v]:
        length, bound, plain_bytes = VECTORS[name]
        for n in (int(x) for x in args.devices.split(",")):
            for dr in (float(x) for x in args.dropout.split(",")):
                r = protocol_round(n, length, bound, dr)
                r.update(vector=name, plain_up_bytes=plain_bytes)
                rows.append(r)
                print(f"{name:<28}{n:>5}{dr:>6.0%}{r['bits']:>6}{r['up_bytes']:>12,.0f}"
                      f"{r['up_bytes'] / plain_bytes:>9.1f}{r['down_bytes']:>12,.0f}{r['device_s']:>8.3f}"
                      f"{r['server_s']:>10.3f}{r['server_s'] / max(r['plain_server_s'], 1e-9):>9.0f}"
                      f"{r['max_abs_error']:>10.2g}", flush=True)
    jobs = []
    if args.job:
        jobs = job_compare()
        plain = jobs[0]
        print(f"\n{'job (tiny model, 4 devices)':<28}{'s/round':>9}{'x plain':>9}{'up B/dev/round':>16}{'x plain':>9}")
        for j in jobs:
            print(f"{j['mode']:<28}{j['round_s']:>9.2f}{j['round_s'] / plain['round_s']:>9.2f}"
                  f"{j['up_bytes']:>16,.0f}{j['up_bytes'] / plain['up_bytes']:>9.1f}")
    print(f"load average at end: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"protocol": rows, "job": jobs}, f, indent=1)


if __name__ == "__main__":
    main()
