"""Privacy / accuracy trade-off of DP-ZO FedKSeed on the sentiment task (Rotten Tomatoes).

    python benchmarks/dp_tradeoff.py                       # tiny random model, quick (~2 min on 2 cores)
    python benchmarks/dp_tradeoff.py --model smollm2-135m --rounds 20 --local-steps 16 --devices 8

One federated job per noise multiplier sigma (plus the non-private run, dp_mode=off), each through
the real server and device agents over the in-process transport (edgefed.federation.run_federation),
the same data split, batches and seeds. Prints one table: sigma, epsilon at --delta (the strategy's
summary, i.e. dp_accounting's RDP accountant), held-out accuracy and loss after training, and the
ratios to the non-private run (held-out accuracy / its accuracy, held-out loss / its loss: 1 = as
good as without DP).

Privacy model (docs/security.md, "Differential privacy"): user-level, one device's data is the
unit. --mode central (default): devices send clipped-free scalars, the server clips each device's
per-seed vector to L2 norm --clip and adds N(0, (sigma x clip)^2) to every seed of the pool, and the
device sampling rate is q = devices / --population. --mode local: each device clips every probe's
scalar to --clip and adds the noise itself (epsilon per device, against the server too, no
amplification, sensitivity 2 x clip). With the tiny random model the accuracy stays near chance
(it is a smoke run of the pipeline); the loss columns show the trend.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from edgefed import kernels  # noqa: E402
from edgefed.data import SENTIMENT_TEMPLATE, iid_split, load_rotten_tomatoes, train_heldout_split  # noqa: E402
from edgefed.methods import JobConfig  # noqa: E402


def run_one(args, artifact, base, train, held, sigma: float | None, out: Path) -> dict:
    from edgefed.federation import run_federation
    from edgefed.simulate import thread_devices

    job_id = f"dp-{'off' if sigma is None else sigma}-{uuid.uuid4().hex[:6]}".replace(".", "p")
    params: dict = {}
    if sigma is not None:
        params = {"dp_mode": args.mode, "dp_clip": args.clip, "dp_noise_multiplier": sigma,
                  "dp_delta": args.delta, "dp_population": args.population}
    job = JobConfig(job=job_id, method="fedkseed", artifact=str(artifact), rounds=args.rounds,
                    devices_per_round=args.devices, min_devices=args.devices, round_timeout=900.0, lr=args.lr,
                    eps=args.eps, local_steps=args.local_steps, batch_size=args.batch, k=args.k,
                    seed_pool_id=args.seed, seed=args.seed, params=params)
    t0 = time.time()
    res = run_federation(job, artifact, held, broker_url=f"inproc://{job_id}", out_dir=out / job_id,
                         start_devices=thread_devices(base, job_id, iid_split(train, args.devices, seed=args.seed)),
                         eval_n=len(held), eval_every=args.rounds, eval_threads=args.threads, progress=False,
                         seq_len=args.seq_len)
    s = res.server_summary.get("strategy", {})
    return {"sigma": sigma, "epsilon": s.get("dp_epsilon", float("inf")) if sigma is not None else float("inf"),
            "acc0": res.before["accuracy"], "loss0": res.before["loss"],
            "acc": res.after["accuracy"], "loss": res.after["loss"], "seconds": time.time() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny (default, random weights: a quick smoke run) or smollm2-135m")
    ap.add_argument("--trainable", default=None, help="default: lora r=4 (tiny) / r=8 (smollm2), q_proj,v_proj")
    ap.add_argument("--mode", choices=["central", "local"], default="central")
    ap.add_argument("--sigmas", default="0.5,1,2,4", help="noise multipliers (the non-private run is added)")
    ap.add_argument("--clip", type=float, default=1.0, help="dp_clip C")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--population", type=int, default=100, help="devices of the job N: q = devices / N (central)")
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--local-steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--k", type=int, default=512, help="seed pool size (central noise covers every seed)")
    ap.add_argument("--train", type=int, default=400, help="training rows (split over the devices)")
    ap.add_argument("--heldout", type=int, default=100)
    ap.add_argument("--seq-len", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    args = ap.parse_args(argv)

    from edgefed.export.cache import ensure_artifact
    from edgefed.runtime import DeviceModel

    trainable = args.trainable or ("lora:r=4,targets=q_proj,v_proj" if args.model == "tiny"
                                   else "lora:r=8,targets=q_proj,v_proj")
    artifact = ensure_artifact(args.model, trainable, template=SENTIMENT_TEMPLATE, progress=False)
    kernels.set_num_threads(1)
    base = DeviceModel(artifact, threads=1, batch_size=args.batch, seq_len=args.seq_len, check_memory=False)
    train, held = train_heldout_split(load_rotten_tomatoes(), heldout=args.heldout, seed=args.seed)
    train = train[:args.train]
    sigmas = [float(x) for x in args.sigmas.split(",") if x.strip()]
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="dp_tradeoff-"))
    rows = []
    t0 = time.time()
    for sigma in [None] + sigmas:
        r = run_one(args, artifact, base, train, held, sigma, out)
        rows.append(r)
        print(f"[dp_tradeoff] sigma={'off' if sigma is None else sigma}: eps {r['epsilon']:.3g}, acc {r['acc']:.3f}, "
              f"loss {r['loss']:.4f} ({r['seconds']:.0f} s)", file=sys.stderr)
    ref = rows[0]
    q = min(1.0, args.devices / args.population) if args.mode == "central" else 1.0
    print(f"\nDP-ZO FedKSeed, dp_mode={args.mode}, model {args.model} ({trainable}), {args.devices} devices x "
          f"{args.rounds} rounds x {args.local_steps} steps, clip {args.clip:g}, q {q:g}, delta {args.delta:g}, "
          f"held-out {len(held)} rows; start: acc {ref['acc0']:.3f}, loss {ref['loss0']:.4f}")
    print("| sigma | epsilon | held-out acc | held-out loss | acc / non-private | loss / non-private |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        sig = "off (non-private)" if r["sigma"] is None else f"{r['sigma']:g}"
        eps = "inf" if r["epsilon"] == float("inf") else f"{r['epsilon']:.3g}"
        print(f"| {sig} | {eps} | {r['acc']:.3f} | {r['loss']:.4f} | {r['acc'] / ref['acc']:.3f} | "
              f"{r['loss'] / ref['loss']:.4f} |")
    print(f"\n({time.time() - t0:.0f} s; runs in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
