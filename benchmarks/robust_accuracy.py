"""Byzantine devices against robust aggregation, measured as held-out accuracy (issue 9):

    python benchmarks/robust_accuracy.py [--rounds N] [--json FILE]     # SmolLM2-135M, ~25 min on 2 cores
    python benchmarks/robust_accuracy.py --quick                        # tiny random model, a smoke run

The sentiment task (Rotten Tomatoes, edgefed.data.SENTIMENT_TEMPLATE, label words " positive" /
" negative"), SmolLM2-135M-Instruct with LoRA r=8 on q,v (the artifact of learning_check and the
demo), FedKSeed, 5 devices on an IID split of which 1 (20%) is Byzantine. For every attack in
(none, scaled, flip, random) and every aggregator in (mean, median, trimmed_mean) one federated
job runs through the real aggregation server (edgefed_server.engine.Server, the job's
`aggregator` param) and real device agents (edgefed.agent.DeviceAgent, virtual devices as
threads sharing one ONNX graph) over MQTT (--broker auto, the default: Mosquitto started once on
loopback, else the embedded amqtt broker; --broker inproc: the in-process broker of `edgefed
simulate`): every update is an encoded Update message that the server decodes, validates (bounds
on num_samples and scalars), stores and aggregates. Same data split, batches and seed
pool in every job, so the jobs differ only in the attack and the aggregator.

The Byzantine device trains honestly and applies every global delta honestly (it stays on the
global model, as a real compromised device would), then reports a corrupted result:

  scaled  its FedKSeed scalars x 1e3, clamped to what the server accepts (the per-seed and total
          bounds of edgefed.methods.fedkseed.check_scalars), so the update is accepted: an
          attacker that knows the bounds sends the largest update that passes them
  flip    its scalars sign-flipped (gradient ascent on its data)
  random  its scalars replaced by N(0, s^2), s = the RMS of its honest scalars (noise of the
          clean scale)

Held-out accuracy is measured on a balanced set (--heldout rows, disjoint from training) once for
the starting model and once after each job (the server's per-round evaluation is skipped: it
would cost as much as the training). Each job is compared with the clean run with plain averaging
(attack none, aggregator mean) measured in the same invocation, on the same rows: the paired
difference in points with its 95% interval (edgefed.metrics.paired_gain) and the accuracy ratio.
The goal of the issue: with 20% Byzantine devices, median and trimmed mean stay within 2 points of
the clean run while plain averaging does not.

Progress goes to stderr, the table to stdout; --json FILE keeps every job's numbers (per-round
history, what the attacker sent, load average).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
import zlib
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from edgefed import kernels  # noqa: E402
from edgefed.agent import DeviceAgent  # noqa: E402
from edgefed.data import (SENTIMENT_TEMPLATE, iid_split, label_targets, load_rotten_tomatoes,  # noqa: E402
                          train_heldout_split)
from edgefed.methods import JobConfig, get_method  # noqa: E402
from edgefed.methods.fedkseed import SCALARS, SEEDS, probe_bound, seed_pairs, seed_tensors  # noqa: E402
from edgefed.metrics import paired_gain  # noqa: E402
from edgefed.simulate import thread_devices  # noqa: E402

ATTACKS = ("none", "scaled", "flip", "random")
AGGREGATORS = ("mean", "median", "trimmed_mean")
SCALE = 1e3
TOLERANCE = 0.02  # the "within 2 points of the clean run"

FULL = {"model": "smollm2-135m", "trainable": "lora:r=8,targets=q_proj,v_proj", "rounds": 3, "local_steps": 6,
        "batch": 8, "lr": 2e-3, "eps": 1e-3, "heldout": 300, "train": 0, "seq_len": 64}
QUICK = {"model": "tiny", "trainable": "lora:r=4,targets=q_proj,v_proj", "rounds": 2, "local_steps": 4,
         "batch": 8, "lr": 1e-2, "eps": 1e-3, "heldout": 60, "train": 400, "seq_len": 32}


def _log(msg: str) -> None:
    print(f"[robust_accuracy] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the attacker

def corrupt(g: np.ndarray, attack: str, rng: np.random.Generator, bound: float,
            probes: int) -> tuple[np.ndarray, bool]:
    """(the scalars a Byzantine device reports instead of its honest `g`, whether the scaled
    attack had to be clamped to the server's bounds). bound: |g| of one probe the server accepts
    (fedkseed.probe_bound), probes: local_steps x n_perturb of the plan."""
    x = g.astype(np.float64)
    clamped = False
    if attack == "scaled":
        x = x * SCALE
        # the largest update check_scalars accepts (with a little slack below its float tolerance)
        per_seed = bound * max(1, probes - x.size + 1) * (1 - 1e-5)
        total = bound * probes * (1 - 1e-5)
        if np.abs(x).max() > per_seed:
            x, clamped = np.clip(x, -per_seed, per_seed), True
        s = float(np.abs(x).sum())
        if s > total:
            x, clamped = x * (total / s), True
    elif attack == "flip":
        x = -x
    elif attack == "random":
        x = rng.normal(0.0, float(np.sqrt(np.mean(x * x))) or 1.0, x.size)
    elif attack != "none":
        raise ValueError(f"unknown attack {attack!r}")
    return x.astype(np.float32), clamped


class ByzantineAgent(DeviceAgent):
    """A device agent that trains and follows the global model honestly but reports corrupted
    scalars (the approach of tests/test_robust.py: the agent's client of the method's exact class,
    its local_train wrapped). Everything it sends is a regular Update through the transport."""

    attack = "scaled"
    bound = 1e4

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent: list = []  # per round: honest and reported scalar sizes

    def _serve(self, plan):
        if not getattr(self._client, "byzantine", False):
            client = get_method(plan.method).client()  # the exact class, so the agent keeps it
            honest = client.local_train
            rng = np.random.default_rng(zlib.crc32(self.device.encode()))

            def local_train(model, examples, plan, seed, progress=False):
                res = honest(model, examples, plan, seed, progress)
                probes = int(plan.local_steps) * max(1, int(plan.params.get("n_perturb", 1)))
                seeds, clean = seed_pairs(res.tensors, SCALARS, "honest result")
                sent, clamped = corrupt(clean, self.attack, rng, self.bound, probes)
                res.tensors = seed_tensors(seeds, sent, SCALARS)
                self.sent.append({"round": plan.round, "n": int(clean.size),
                                  "honest_max_abs": float(np.abs(clean).max()),
                                  "sent_max_abs": float(np.abs(sent).max()),
                                  "honest_rms": float(np.sqrt(np.mean(clean.astype(np.float64) ** 2))),
                                  "sent_rms": float(np.sqrt(np.mean(sent.astype(np.float64) ** 2))),
                                  "clamped": clamped})
                return res
            client.local_train = local_train
            client.byzantine = True
            self._client = client
        super()._serve(plan)


def devices(base, job: str, shards, attackers: set, attack: str, bound: float):
    """edgefed.simulate.thread_devices (virtual devices as threads sharing one graph), with a
    ByzantineAgent at the indices in `attackers` when attack != 'none'."""
    byz = type("Byzantine", (ByzantineAgent,), {"attack": attack, "bound": bound})
    return thread_devices(base, job, shards,
                          agent_cls=[byz if attack != "none" and i in attackers else DeviceAgent
                                     for i in range(len(shards))])


# ----------------------------------------------------------------------------- one job

def run_job(cfg: dict, args, artifact, base, evaluator, shards, held, attack: str, aggregator: str,
            broker: str, out: Path) -> dict:
    from edgefed.federation import run_federation

    job_id = f"robust-{attack}-{aggregator}-{uuid.uuid4().hex[:6]}".replace("_", "-")
    job = JobConfig(job=job_id, method="fedkseed", artifact=str(artifact), rounds=cfg["rounds"],
                    devices_per_round=args.devices, min_devices=max(1, args.devices - args.byzantine),
                    round_timeout=args.round_timeout, lr=cfg["lr"], eps=cfg["eps"], local_steps=cfg["local_steps"],
                    batch_size=cfg["batch"], k=args.k, seed_pool_id=args.seed, seed=args.seed,
                    params={"pro": 0, "aggregator": aggregator})
    attackers = set(range(args.devices - args.byzantine, args.devices))
    starter = devices(base, job_id, shards, attackers, attack, probe_bound(job))
    url = f"inproc://{job_id}" if broker == "inproc" else broker
    load0 = os.getloadavg()
    t0 = time.time()
    # The server-side evaluation runs on a few rows only (run_federation evaluates before, at the
    # last round and after); the real held-out evaluation is done below, once per job.
    res = run_federation(job, artifact, held[:args.server_eval_n], broker_url=url, out_dir=out / job_id,
                         start_devices=starter, eval_n=args.server_eval_n, eval_every=cfg["rounds"],
                         eval_threads=args.threads, progress=False, seq_len=cfg["seq_len"],
                         title=f"{attack} / {aggregator}", timeout=args.round_timeout * (cfg["rounds"] + 2))
    t_fed = time.time() - t0
    if res.rounds_completed != cfg["rounds"]:
        raise RuntimeError(f"{job_id}: {res.rounds_completed}/{cfg['rounds']} rounds")
    in_sync = all(a.final_round == cfg["rounds"] and np.array_equal(a.model.params, res.final_params)
                  for a in starter.agents)
    t0 = time.time()
    evaluator.params[:] = res.final_params
    ev = evaluator.evaluate(held, batch_size=32)
    t_eval = time.time() - t0
    sent = [e for a in starter.agents if isinstance(a, ByzantineAgent) for e in a.sent]
    accepted = accepted_log(out / job_id / "server.sqlite", job_id, cfg["rounds"],
                            {f"sim-{i:03d}" for i in attackers} if attack != "none" else set())
    rounds = [h for h in res.history if h["round"] > 0]
    return {"attack": attack, "aggregator": aggregator, "job": job_id, "accuracy": float(ev["accuracy"]),
            "loss": float(ev["loss"]), "correct": np.asarray(ev["correct"]).astype(int).tolist(),
            "updates_per_round": [int(h["n_updates"]) for h in rounds],
            "train_loss_per_round": [h["train_loss"] for h in rounds],
            "devices_at_global_model": in_sync, "attacker_sent": sent, **accepted,
            "coeff_norm": float(res.server_summary.get("strategy", {}).get("coeff_norm", float("nan"))),
            "seconds": {"federation": t_fed, "evaluation": t_eval}, "loadavg_start": load0,
            "loadavg_end": os.getloadavg()}


def accepted_log(db: Path, job: str, rounds: int, attackers: set) -> dict:
    """From the server's store: in how many rounds an attacker's update was accepted (so it went
    into the aggregate), and how the seeds were shared: a per-seed median / trimmed mean can only
    outvote an outlier where >= 3 devices drew the seed (robust.min_voters); a seed drawn by fewer
    takes the clipped fallback of robust.aggregate_sparse."""
    from edgefed.protocol import decode
    from edgefed_server.store import Store

    store = Store(db)
    try:
        attacker_rounds, groups, robust = 0, 0, 0
        for r in range(rounds):
            ups = [decode(raw) for _, _, raw in store.accepted_updates(job, r)]
            attacker_rounds += any(u.device in attackers for u in ups)
            seeds = (np.concatenate([np.unique(u.tensor(SEEDS).data) for u in ups]) if ups
                     else np.zeros(0, np.int64))
            _, voters = np.unique(seeds, return_counts=True)
            groups += int(voters.size)
            robust += int((voters >= 3).sum())
    finally:
        store.close()
    return {"attacker_accepted_rounds": attacker_rounds, "seed_groups": groups, "seed_groups_3plus": robust}


# ----------------------------------------------------------------------------- table

def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def print_table(rows: list[dict], ref: dict, start: dict, file=sys.stdout) -> None:
    print("| attack | aggregator | held-out acc | vs clean mean: diff, pts (95% CI) | acc / clean | "
          "held-out loss | within 2 pts | attacker's update aggregated | min |", file=file)
    print("| --- | --- | ---: | ---: | ---: | ---: | :---: | ---: | ---: |", file=file)
    for r in rows:
        d = r["vs_clean"]
        ci = "(reference)" if r is ref else f"{_pts(d['gain'])} [{_pts(d['ci_low'])}, {_pts(d['ci_high'])}]"
        ok = "-" if r is ref else ("yes" if abs(d["gain"]) <= TOLERANCE + 1e-12 else "**no**")
        acc_ratio = r["accuracy"] / ref["accuracy"] if ref["accuracy"] else float("nan")
        upd = "-" if r["attack"] == "none" else f"{r['attacker_accepted_rounds']}/{len(r['updates_per_round'])} rounds"
        mins = (r["seconds"]["federation"] + r["seconds"]["evaluation"]) / 60
        print(f"| {r['attack']} | {r['aggregator']} | {100 * r['accuracy']:.1f}% | {ci} | {acc_ratio:.3f} | "
              f"{r['loss']:.4f} | {ok} | {upd} | {mins:.1f} |", file=file)
    print(f"\nstarting model (before any job): {100 * start['accuracy']:.1f}%, loss {start['loss']:.4f}; "
          f"clean mean run: {100 * ref['accuracy']:.1f}% "
          f"({_pts(ref['vs_start']['gain'])} pts [{_pts(ref['vs_start']['ci_low'])}, "
          f"{_pts(ref['vs_start']['ci_high'])}] vs the start)", file=file)
    groups = sum(r["seed_groups"] for r in rows)
    many = sum(r["seed_groups_3plus"] for r in rows)
    print(f"seeds drawn by >= 3 devices in a round (where a per-seed median / trimmed mean can outvote one "
          f"device; the others take the clipped fallback, robust.aggregate_sparse): {many} of {groups} "
          f"(seed, round) pairs over all jobs", file=file)


def verdict(rows: list[dict]) -> list[str]:
    out = []
    for attack in ATTACKS[1:]:
        got = {r["aggregator"]: r for r in rows if r["attack"] == attack}
        if not got:
            continue
        parts = [f"{a} {_pts(r['vs_clean']['gain'])}" for a, r in got.items()]
        robust_ok = all(abs(r["vs_clean"]["gain"]) <= TOLERANCE + 1e-12 for a, r in got.items() if a != "mean")
        mean_hurt = "mean" in got and abs(got["mean"]["vs_clean"]["gain"]) > TOLERANCE + 1e-12
        out.append(f"{attack}: {', '.join(parts)} pts vs clean mean -> robust aggregators within 2 pts: "
                   f"{'yes' if robust_ok else 'NO'}; plain mean off by more than 2 pts: {'yes' if mean_hurt else 'no'}")
    return out


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny random model, 2 rounds x 4 steps: a smoke run of "
                    "the pipeline (accuracy stays near chance)")
    ap.add_argument("--model", default=None, help="packaged model (default smollm2-135m; tiny with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help=f"default {FULL['rounds']} ({QUICK['rounds']} with --quick)")
    ap.add_argument("--local-steps", type=int, default=None, help=f"default {FULL['local_steps']}")
    ap.add_argument("--batch", type=int, default=None, help=f"default {FULL['batch']}")
    ap.add_argument("--lr", type=float, default=None, help=f"default {FULL['lr']:g}")
    ap.add_argument("--eps", type=float, default=None)
    ap.add_argument("--heldout", type=int, default=None, help=f"balanced held-out rows (default {FULL['heldout']})")
    ap.add_argument("--train", type=int, default=None, help="training rows used, 0 = all (default: all)")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--devices", type=int, default=5)
    ap.add_argument("--byzantine", type=int, default=1, help="Byzantine devices (the last ones, sim-004 by default)")
    ap.add_argument("--k", type=int, default=4096, help="FedKSeed seed pool size (the demo's)")
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--aggregators", default=",".join(AGGREGATORS))
    ap.add_argument("--broker", default="auto", help="inproc (the in-process broker), auto (start Mosquitto, "
                    "else the embedded amqtt broker) or mqtt://host:port")
    ap.add_argument("--round-timeout", type=float, default=600.0)
    ap.add_argument("--server-eval-n", type=int, default=8, help="held-out rows the server's own evaluation uses")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads of the held-out evaluation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="run folder (default runs/robust-<time>)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    cfg = dict(QUICK if args.quick else FULL)
    for key in ("model", "rounds", "local_steps", "batch", "lr", "eps", "heldout", "train", "seq_len"):
        v = getattr(args, key)
        if v is not None:
            cfg[key] = v
    if cfg["model"] == "tiny" and not args.quick:
        cfg["trainable"] = QUICK["trainable"]
    attacks = [a for a in args.attacks.split(",") if a]
    aggs = [a for a in args.aggregators.split(",") if a]
    bad = [a for a in attacks if a not in ATTACKS] + [a for a in aggs if a not in AGGREGATORS]
    if bad:
        ap.error(f"unknown attack/aggregator {bad}; attacks {ATTACKS}, aggregators {AGGREGATORS}")
    if not 0 < args.byzantine < args.devices:
        ap.error("need 0 < --byzantine < --devices")
    jobs = [("none", "mean")] + [(a, g) for a in attacks for g in aggs if (a, g) != ("none", "mean")]

    from edgefed.export.cache import ensure_artifact
    from edgefed.runtime import DeviceModel

    t_start = time.time()
    load0 = os.getloadavg()
    out = Path(args.out or f"runs/robust-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    artifact = ensure_artifact(cfg["model"], cfg["trainable"], template=SENTIMENT_TEMPLATE, progress=False)
    kernels.set_num_threads(1)
    base = DeviceModel(artifact, threads=1, batch_size=cfg["batch"], seq_len=cfg["seq_len"], check_memory=False)
    evaluator = DeviceModel(artifact, threads=args.threads, seq_len=cfg["seq_len"], check_memory=False)
    train, held = train_heldout_split(load_rotten_tomatoes(), heldout=cfg["heldout"], seed=args.seed)
    if cfg["train"]:
        train = train[:cfg["train"]]
    shards = iid_split(train, args.devices, seed=args.seed)
    y = label_targets(held, evaluator.labels)
    _log(f"{cfg['model']} ({cfg['trainable']}), fedkseed K={args.k}, {args.devices} devices "
         f"({args.byzantine} Byzantine), IID shards of {[len(s) for s in shards]} rows, held-out {len(held)} "
         f"(labels {dict(zip(evaluator.labels, np.bincount(y, minlength=len(evaluator.labels)).tolist()))}); "
         f"{len(jobs)} jobs of {cfg['rounds']} rounds x {cfg['local_steps']} steps, batch {cfg['batch']}, "
         f"lr {cfg['lr']:g}; load average {load0[0]:.2f}")

    broker, handle = args.broker, None
    if broker == "auto":
        from edgefed.transport.broker import start_broker
        (out / "broker").mkdir(exist_ok=True)
        handle = start_broker(prefer="auto", workdir=str(out / "broker"))
        broker = handle.url
        _log(f"broker: {handle.kind} at {broker}")

    t0 = time.time()
    start = evaluator.evaluate(held, batch_size=32)
    _log(f"starting model: acc {start['accuracy']:.4f}, loss {start['loss']:.4f} ({time.time() - t0:.0f} s)")
    start_correct = np.asarray(start["correct"]).astype(int)

    rows = []
    try:
        for i, (attack, agg) in enumerate(jobs):
            _log(f"job {i + 1}/{len(jobs)}: attack {attack}, aggregator {agg} "
                 f"({(time.time() - t_start) / 60:.1f} min so far)")
            r = run_job(cfg, args, artifact, base, evaluator, shards, held, attack, agg, broker, out)
            ref = rows[0] if rows else r
            r["vs_clean"] = paired_gain(ref["correct"], r["correct"])
            r["vs_start"] = paired_gain(start_correct, r["correct"])
            rows.append(r)
            clamp = sum(e["clamped"] for e in r["attacker_sent"])
            _log(f"  {attack}/{agg}: acc {r['accuracy']:.4f} ({_pts(r['vs_clean']['gain'])} pts vs clean mean), "
                 f"loss {r['loss']:.4f}, updates {r['updates_per_round']} (attacker's aggregated in "
                 f"{r['attacker_accepted_rounds']}), "
                 f"{r['seconds']['federation']:.0f} + {r['seconds']['evaluation']:.0f} s"
                 + (f"; attacker |g| max {max(e['sent_max_abs'] for e in r['attacker_sent']):.3g} "
                    f"(honest {max(e['honest_max_abs'] for e in r['attacker_sent']):.3g}), clamped {clamp}x"
                    if r["attacker_sent"] else ""))
    finally:
        if handle is not None:
            handle.halt()

    ref = rows[0]
    total = time.time() - t_start
    print(f"\nByzantine devices on the sentiment task: {cfg['model']} ({cfg['trainable']}), FedKSeed K={args.k}, "
          f"{args.devices} devices of which {args.byzantine} Byzantine (IID), {cfg['rounds']} rounds x "
          f"{cfg['local_steps']} local steps, batch {cfg['batch']}, lr {cfg['lr']:g}, eps {cfg['eps']:g}, seed "
          f"{args.seed}; held-out {len(held)} balanced rows; transport {args.broker}")
    print_table(rows, ref, start)
    for line in verdict(rows):
        print(line)
    load1 = os.getloadavg()
    print(f"({total / 60:.1f} min; load average {load0[0]:.2f} at start, {load1[0]:.2f} at the end; runs in {out})")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "config": {**cfg, "k": args.k, "devices": args.devices, "byzantine": args.byzantine, "seed": args.seed,
                       "broker": args.broker, "scale": SCALE, "argv": sys.argv},
            "start": {"accuracy": float(start["accuracy"]), "loss": float(start["loss"]),
                      "correct": start_correct.tolist()},
            "jobs": rows, "verdict": verdict(rows), "seconds": total, "loadavg_start": load0, "loadavg_end": load1,
        }, indent=1, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
