"""Federated methods compared on one job: forward-only ONNX devices against torch hosts training
by backprop, same data, same clients, same rounds / local steps / batch:

    python benchmarks/methods.py [--rounds 4 --local-steps 4 --batch 8] [--json FILE] [--plot FILE]
    python benchmarks/methods.py --model tiny          # a tiny random model: the whole path in < 1 min

The job: SmolLM2-135M-Instruct with LoRA r=8 on q_proj,v_proj (the artifact of the demo and
learning_check, edgefed.export.cache.ensure_artifact), classify:labels=positive,negative on the
packaged Rotten Tomatoes snippets with edgefed.data.SENTIMENT_TEMPLATE; a balanced held-out set
(train_heldout_split, as the demo); the rest split over --clients 10 simulated clients by
Dirichlet(--alpha 0.5) label skew. Each round --devices-per-round clients take part, the same
ones for every method (drawn from the seed), and every client draws the same batches in every
method (its batch seed depends on the job seed, the client and the round only).

Rows (--methods; the first named --baseline, fedkseed by default, runs first):

  fedkseed        ONNX devices, FedKSeed (two forward passes a step, (seed, scalar) pairs)
  fedmezo         ONNX devices, FedMeZO (two forward passes a step, dense LoRA deltas)
  fedkseed-torch  the same FedKSeed job with torch hosts (edgefed.backends.torch_model): exact
                  gradient projections <grad L, z> instead of the two-point estimate
  fedavg          torch hosts, local AdamW by backprop, sample-weighted mean of the LoRA deltas
  fedprox         fedavg + the proximal term (prox_mu 0.01)
  fedavg-adam     fedavg + FedAdam on the server (server_opt=adam, server_lr 1e-2)
  fedavg-bf16     fedavg with bf16 updates (half the bytes up)

Every job runs through the real aggregation server (edgefed_server.engine.Server) and device
agents (edgefed.agent.DeviceAgent) over the in-process transport, clients as threads sharing
one loaded model (edgefed.simulate.thread_devices), as `edgefed simulate` runs them.

Columns: held-out accuracy before / after (the same rows for every method, evaluated by ONNX
Runtime on the global model), the paired gain with its 95% interval, and the paired difference
to the baseline's final model; bytes up per client per round (the round's accepted update bytes
/ updates) and down (the round plan, which carries the previous round's aggregate: rounds 2..R,
as round 1's plan carries none); client peak memory and the time of one client's local round,
both measured in a FRESH subprocess per method that loads what a client loads (ONNX devices:
the ONNX graph, no torch; torch hosts: the base checkpoint in torch) and runs one local round
of the method on one client's shard (VmHWM; threads in one process cannot give per-client
memory); the simulation's wall time per round (all of the round's clients on this machine's
cores); and each as a ratio to the baseline row.

Progress goes to stderr, the table (markdown) to stdout; --json FILE keeps everything (per-round
history, per-row correctness, the probes, load averages); --plot FILE (default
<out>/methods.png) draws gains with intervals, the ratios, and training loss per round.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

# ----------------------------------------------------------------------------- settings

METHOD_ROWS = {  # row name -> (registry method, client backend, what differs)
    "fedkseed": ("fedkseed", "onnx", "ZO, (seed, scalar) pairs"),
    "fedmezo": ("fedmezo", "onnx", "ZO, dense deltas"),
    "fedkseed-torch": ("fedkseed", "torch", "exact <grad, z> projections"),
    "fedavg": ("fedavg", "torch", "AdamW, f32 deltas"),
    "fedprox": ("fedavg", "torch", "AdamW + prox"),
    "fedavg-adam": ("fedavg", "torch", "AdamW, FedAdam server"),
    "fedavg-bf16": ("fedavg", "torch", "AdamW, bf16 deltas"),
}
FULL = {"model": "smollm2-135m", "trainable": "lora:r=8,targets=q_proj,v_proj", "rounds": 4, "local_steps": 4,
        "batch": 8, "seq_len": 64, "clients": 10, "devices_per_round": 4, "eval_n": 160, "train": 0,
        "lr_zo": 2e-3, "eps": 1e-3, "lr_backprop": 5e-4}
TINY = {"model": "tiny", "trainable": "lora:r=4,targets=q_proj,v_proj", "rounds": 2, "local_steps": 2,
        "batch": 8, "seq_len": 32, "clients": 10, "devices_per_round": 4, "eval_n": 60, "train": 400,
        "lr_zo": 1e-2, "eps": 1e-3, "lr_backprop": 5e-3}
# seconds per local step on the 2-core dev machine with a test suite beside it (SmolLM2-135M LoRA,
# batch 8 x 64 tokens, one thread): for the estimate printed before the probes measure it
STEP_S = {("onnx", "fedkseed"): 1.7, ("onnx", "fedmezo"): 1.7, ("torch", "fedkseed"): 2.5, ("torch", "fedavg"): 3.2}
EVAL_ROW_S = 0.22
PROBE_S = 25.0


def _log(msg: str) -> None:
    print(f"[methods] {msg}", file=sys.stderr, flush=True)


def row_settings(name: str, cfg: dict, args) -> dict:
    """The method, backend, lr / eps and job params of one row."""
    method, backend, what = METHOD_ROWS[name]
    params: dict = {}
    if method == "fedavg":
        lr, eps = cfg["lr_backprop"], 0.0
        if name == "fedprox":
            params["prox_mu"] = args.prox_mu
        elif name == "fedavg-adam":
            params.update(server_opt="adam", server_lr=args.server_lr)
        elif name == "fedavg-bf16":
            params["update_dtype"] = "bf16"
    else:
        lr, eps = cfg["lr_zo"], cfg["eps"]
        params["pro"] = 0
    return {"name": name, "method": method, "backend": backend, "what": what, "lr": lr, "eps": eps,
            "params": params}


def make_job(row: dict, cfg: dict, args, artifact, job_id: str):
    from edgefed.methods import JobConfig
    return JobConfig(job=job_id, method=row["method"], artifact=str(artifact), rounds=cfg["rounds"],
                     devices_per_round=cfg["devices_per_round"], min_devices=cfg["devices_per_round"],
                     round_timeout=args.round_timeout, lr=row["lr"], eps=row["eps"],
                     local_steps=cfg["local_steps"], batch_size=cfg["batch"], k=args.k,
                     seed_pool_id=args.seed, seed=args.seed, params=dict(row["params"]))


def lr_text(row: dict) -> str:
    p = row["params"]
    if row["method"] == "fedavg":
        s = f"AdamW {row['lr']:g}"
        if "prox_mu" in p:
            s += f", mu {p['prox_mu']:g}"
        if "server_opt" in p:
            s += f", server {p['server_opt']} {p['server_lr']:g}"
        if "update_dtype" in p:
            s += f", {p['update_dtype']}"
        return s
    return f"{row['lr']:g}" + (f" / eps {row['eps']:g}" if row["backend"] == "onnx" else " (exact)")


# ----------------------------------------------------------------------------- client selection

def selection(n_clients: int, per_round: int, rounds: int, seed: int) -> list[list[str]]:
    """The clients that take part in each round: per_round of n_clients, drawn from the seed (the
    same for every method)."""
    out = []
    for r in range(rounds):
        pick = np.random.default_rng([seed, 7919, r]).choice(n_clients, size=per_round, replace=False)
        out.append([f"sim-{int(i):03d}" for i in sorted(pick)])
    return out


def sampled_agent_cls(chosen: list[list[str]]):
    """A DeviceAgent that sits out the rounds it was not drawn for; when drawn again it catches
    up on the missed rounds as any device that was away does (a SyncRequest, exact deltas)."""
    from edgefed.agent import DeviceAgent

    class SampledAgent(DeviceAgent):
        skipped = 0

        def _serve(self, plan):
            r = int(plan.round)
            if r < len(chosen) and self.device not in chosen[r]:
                self.skipped += 1
                return
            super()._serve(plan)
    return SampledAgent


# ----------------------------------------------------------------------------- one client, alone

def probe_main(spec_path: str) -> int:
    """Child process: load what one client loads, run one local round of the plan on one shard,
    print JSON (peak RSS, RSS after loading, seconds, torch imported or not)."""
    from edgefed.runtime import peak_rss_bytes

    def rss() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    from edgefed import protocol as P
    from edgefed.data import read_jsonl
    from edgefed.methods import get_method

    plan = P.decode(Path(spec["plan"]).read_bytes())
    shard = read_jsonl(spec["shard"])
    rss_imports = rss()
    t0 = time.time()
    if spec["backend"] == "torch":
        import torch

        from edgefed.backends.torch_model import TorchModel
        torch.set_num_threads(spec["threads"])
        model = TorchModel(spec["artifact"], seq_len=spec["seq_len"], batch_size=plan.batch_size,
                           threads=spec["threads"])
    else:
        from edgefed import kernels
        from edgefed.runtime import DeviceModel
        kernels.set_num_threads(spec["threads"])
        model = DeviceModel(spec["artifact"], threads=spec["threads"], batch_size=plan.batch_size,
                            seq_len=spec["seq_len"], check_memory=False)
    t_load = time.time() - t0
    rss_loaded = rss()
    peak_loaded = peak_rss_bytes()
    client = get_method(plan.method).client()
    t0 = time.time()
    res = client.local_train(model, shard, plan, seed=spec["seed"])
    t_round = time.time() - t0
    upd = P.Update(job=plan.job, round=plan.round, device="probe", method=plan.method, msg_id=1,
                   num_samples=res.num_samples, seeds=res.seeds, scalars=res.scalars, tensors=res.tensors,
                   train_loss=res.train_loss)
    out = {"peak_rss": peak_rss_bytes(), "peak_rss_loaded": peak_loaded, "rss_imports": rss_imports,
           "rss_loaded": rss_loaded, "load_s": t_load, "round_s": t_round, "train_loss": res.train_loss,
           "update_bytes": len(upd.encode()), "torch_imported": "torch" in sys.modules,
           "backward_count": int(getattr(model, "backward_count", 0))}
    print("PROBE " + json.dumps(out), flush=True)
    return 0


def probe(row: dict, job, artifact, shard, cfg: dict, args, work: Path) -> dict:
    """One client's local round of `row` in a fresh interpreter (see probe_main)."""
    from edgefed import protocol as P
    from edgefed.data import write_jsonl
    from edgefed.methods import get_method

    strategy = get_method(job.method).server()
    pf = strategy.plan_round(job, strategy.init_state(job), 0)
    plan = P.RoundPlan(job=job.job, round=0, method=job.method, seed_pool_id=pf.seed_pool_id, k=pf.k, lr=pf.lr,
                       eps=pf.eps, local_steps=pf.local_steps, batch_size=pf.batch_size, deadline=0.0,
                       min_devices=1, seed_probs=pf.seed_probs, params=dict(pf.params))
    work.mkdir(parents=True, exist_ok=True)
    (work / "plan.bin").write_bytes(plan.encode())
    write_jsonl(work / "shard.jsonl", shard)
    spec = {"plan": str(work / "plan.bin"), "shard": str(work / "shard.jsonl"), "artifact": str(artifact),
            "backend": row["backend"], "seq_len": cfg["seq_len"], "threads": args.client_threads, "seed": 12345}
    (work / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    t0 = time.time()
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--_probe", str(work / "spec.json")],
                       capture_output=True, text=True, timeout=900)
    (work / "probe.log").write_text(p.stdout + p.stderr, encoding="utf-8")
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("PROBE ")), None)
    if p.returncode or line is None:
        raise RuntimeError(f"client probe of {row['name']} failed ({p.returncode}): {p.stderr[-2000:]}")
    out = json.loads(line[6:])
    out["process_s"] = time.time() - t0
    return out


# ----------------------------------------------------------------------------- one federated job

def run_job(row: dict, cfg: dict, args, artifact, base, evaluator, shards, held, chosen, out: Path) -> dict:
    from edgefed.federation import run_federation
    from edgefed.simulate import thread_devices

    job_id = f"methods-{row['name']}-{uuid.uuid4().hex[:6]}"
    job = make_job(row, cfg, args, artifact, job_id)
    starter = thread_devices(base, job_id, shards, agent_cls=sampled_agent_cls(chosen))
    load0 = os.getloadavg()
    t0 = time.time()
    # the server's own evaluation runs on a few rows only (before and at the last round); the
    # held-out accuracy is measured below on --eval-n rows, the same rows for every method
    res = run_federation(job, artifact, held[:args.server_eval_n], broker_url=f"inproc://{job_id}",
                         out_dir=out / row["name"], start_devices=starter, eval_n=args.server_eval_n,
                         eval_every=cfg["rounds"], eval_threads=args.threads, progress=False,
                         seq_len=cfg["seq_len"], title=f"{row['name']}",
                         timeout=args.round_timeout * (cfg["rounds"] + 2))
    t_fed = time.time() - t0
    if res.rounds_completed != cfg["rounds"]:
        raise RuntimeError(f"{job_id}: {res.rounds_completed}/{cfg['rounds']} rounds")
    t0 = time.time()
    evaluator.params[:] = res.final_params
    ev = evaluator.evaluate(held, batch_size=32)
    t_eval = time.time() - t0
    rounds = [h for h in res.history if h["round"] > 0]
    up = float(np.mean([h["bytes_in"] / max(1, h["n_updates"]) for h in rounds]))
    carried = [h["bytes_out"] for h in rounds if h["round"] >= 2] or [h["bytes_out"] for h in rounds]
    trained = {a.device: a.stats.rounds_trained for a in starter.agents}
    return {"job": job_id, "accuracy": float(ev["accuracy"]), "loss": float(ev["loss"]),
            "correct": np.asarray(ev["correct"]).astype(int).tolist(),
            "bytes_up": up, "bytes_down": float(np.mean(carried)),
            "bytes_down_all_rounds": res.bytes_down_per_device_round,
            "round_s": float(np.mean([h["duration_s"] for h in rounds])),
            "round_s_each": [h["duration_s"] for h in rounds],
            "updates_per_round": [int(h["n_updates"]) for h in rounds],
            "train_loss_per_round": [h["train_loss"] for h in rounds],
            "rounds_trained_per_client": trained,
            "backward_passes": int(sum(getattr(a.model, "backward_count", 0) for a in starter.agents)),
            "clients_at_global_model": sum(bool(a.final_round == cfg["rounds"]
                                                and np.array_equal(a.model.params, res.final_params))
                                           for a in starter.agents),
            "delta_norm": float(np.linalg.norm(res.final_params - evaluator_init(evaluator))),
            "seconds": {"federation": t_fed, "evaluation": t_eval}, "loadavg_start": load0,
            "loadavg_end": os.getloadavg(), "history": res.history}


def evaluator_init(ev) -> np.ndarray:
    if not hasattr(ev, "_bench_init"):
        ev._bench_init = ev.params.copy()
    return ev._bench_init


# ----------------------------------------------------------------------------- table and plot

def _dur(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min"


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def _ci(g: dict) -> str:
    return f"{_pts(g['gain'])} [{_pts(g['ci_low'])}, {_pts(g['ci_high'])}]"


def _ratio(x: float, ref: float) -> str:
    return f"{x / ref:.2f}x" if ref else "-"


def print_table(rows: list[dict], file=sys.stdout) -> None:
    ref = rows[0]
    print("| method | clients | lr | acc before | acc after | gain, pts (95% CI) | vs baseline, pts (95% CI) | "
          "up B/client/round | x | down B/client/round | x | client peak RSS MB | x | client s/local round | x | "
          "sim s/round | x |", file=file)
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
          "---: | ---: |", file=file)
    for r in rows:
        vs = "(baseline)" if r is ref else _ci(r["vs_baseline"])
        p, rp = r["probe"], ref["probe"]
        print(f"| {r['name']} | {r['backend']} | {lr_text(r)} | {100 * r['gain']['before']:.1f}% | "
              f"{100 * r['accuracy']:.1f}% | {_ci(r['gain'])} | {vs} | "
              f"{r['bytes_up']:,.0f} | {_ratio(r['bytes_up'], ref['bytes_up'])} | "
              f"{r['bytes_down']:,.0f} | {_ratio(r['bytes_down'], ref['bytes_down'])} | "
              f"{p['peak_rss'] / 2**20:,.0f} | {_ratio(p['peak_rss'], rp['peak_rss'])} | "
              f"{p['round_s']:.2f} | {_ratio(p['round_s'], rp['round_s'])} | "
              f"{r['round_s']:.2f} | {_ratio(r['round_s'], ref['round_s'])} |", file=file)


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log("matplotlib missing: no plot")
        return None
    names = [r["name"] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(1, 3, figsize=(17, 5.2), gridspec_kw={"width_ratios": [1, 1.5, 1]})
    g = np.array([100 * r["gain"]["gain"] for r in rows])
    lo = np.array([100 * r["gain"]["ci_low"] for r in rows])
    hi = np.array([100 * r["gain"]["ci_high"] for r in rows])
    colors = ["tab:blue" if r["backend"] == "onnx" else "tab:orange" for r in rows]
    ax[0].bar(x, g, color=colors)
    ax[0].errorbar(x, g, yerr=[g - lo, hi - g], fmt="none", ecolor="k", capsize=4)
    ax[0].axhline(0, color="grey", lw=0.8)
    ax[0].set_xticks(x, names, rotation=35, ha="right")
    ax[0].set_ylabel("held-out accuracy gain, points (paired 95% CI)")
    ax[0].set_title(f"gain over the start ({rows[0]['gain']['n']} rows)\nblue: ONNX devices, orange: torch hosts")
    ref = rows[0]
    metrics = [("bytes up", lambda r: r["bytes_up"]), ("bytes down", lambda r: r["bytes_down"]),
               ("client peak RSS", lambda r: r["probe"]["peak_rss"]),
               ("client s/local round", lambda r: r["probe"]["round_s"]), ("sim s/round", lambda r: r["round_s"])]
    w = 0.8 / len(metrics)
    for j, (label, f) in enumerate(metrics):
        vals = [f(r) / f(ref) if f(ref) else np.nan for r in rows]
        ax[1].bar(x + (j - (len(metrics) - 1) / 2) * w, vals, w, label=label)
    ax[1].set_yscale("log")
    top = max(f(r) / f(ref) for _, f in metrics for r in rows if f(ref))
    ax[1].set_ylim(top=max(10.0, top) * 40)  # room for the legend above the bars
    ax[1].axhline(1, color="grey", lw=0.8)
    ax[1].set_xticks(x, names, rotation=35, ha="right")
    ax[1].set_ylabel(f"ratio to {ref['name']} (log scale)")
    ax[1].set_title("cost per client, ratio to the baseline")
    ax[1].legend(fontsize=8, ncol=3, loc="upper center")
    for r in rows:
        ls = [v for v in r["train_loss_per_round"]]
        ax[2].plot(range(1, len(ls) + 1), ls, marker="o", label=r["name"],
                   ls="-" if r["backend"] == "onnx" else "--")
    ax[2].set_xticks(range(1, max(len(r["train_loss_per_round"]) for r in rows) + 1))
    ax[2].set_xlabel("round")
    ax[2].set_ylabel("mean local training loss")
    ax[2].set_title("training loss per round (the round's clients)")
    ax[2].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_title(cfg: dict) -> str:
    return (f"{cfg['model']} LoRA ({cfg['trainable'].split(':')[1]}), sentiment, {cfg['clients']} clients "
            f"Dirichlet({cfg['alpha']:g}), {cfg['devices_per_round']}/round, {cfg['rounds']} rounds x "
            f"{cfg['local_steps']} steps, batch {cfg['batch']}x{cfg['seq_len']}, seed {cfg['seed']}")


def report(rows: list[dict], cfg: dict, n_held: int, start_acc: float) -> None:
    print(f"\n{run_title(cfg)}; held-out {n_held} balanced rows (starting accuracy {100 * start_acc:.1f}%); "
          f"ratios (x) against {rows[0]['name']}")
    print_table(rows)
    for r in rows:
        trained = sum(r["rounds_trained_per_client"].values())
        took_part = sum(v > 0 for v in r["rounds_trained_per_client"].values())
        print(f"{r['name']}: {trained} client-rounds trained by {took_part} clients, "
              f"{r['clients_at_global_model']} of them at the final global model bit for bit, |global delta| "
              f"{r['delta_norm']:.4g}" + (f", {r['backward_passes']} backward passes (exact projections)"
                                          if r["backward_passes"] else "")
              + f", train loss per round {[round(x, 4) if x is not None else None for x in r['train_loss_per_round']]}")


def replot(path: str, plot_path: str | None) -> int:
    d = json.loads(Path(path).read_text(encoding="utf-8"))
    cfg = d["config"]
    report(d["rows"], cfg, len(d["start"]["correct"]), d["start"]["accuracy"])
    out = plot(d["rows"], Path(plot_path or d["plot"]), run_title(cfg))
    print(f"(from {path}: {d['seconds'] / 60:.1f} min, load average {d['loadavg_start'][0]:.2f} at start, "
          f"{d['loadavg_end'][0]:.2f} at the end; plot {out})")
    return 0


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m, or tiny (a tiny random model: a "
                    "smoke run of the whole path, accuracy stays near chance)")
    ap.add_argument("--methods", default=",".join(METHOD_ROWS), help=f"rows, comma-separated: {', '.join(METHOD_ROWS)}")
    ap.add_argument("--baseline", default="fedkseed", help="the row the ratios are taken against (runs first)")
    ap.add_argument("--rounds", type=int, default=None, help=f"default {FULL['rounds']} ({TINY['rounds']} tiny)")
    ap.add_argument("--local-steps", type=int, default=None, help=f"default {FULL['local_steps']}")
    ap.add_argument("--batch", type=int, default=None, help=f"default {FULL['batch']}")
    ap.add_argument("--seq-len", type=int, default=None, help=f"default {FULL['seq_len']}")
    ap.add_argument("--clients", type=int, default=None, help=f"default {FULL['clients']}")
    ap.add_argument("--devices-per-round", type=int, default=None,
                    help=f"clients drawn per round, the same for every method (default {FULL['devices_per_round']})")
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew concentration")
    ap.add_argument("--eval-n", type=int, default=None, help=f"balanced held-out rows (default {FULL['eval_n']})")
    ap.add_argument("--train", type=int, default=None, help="training rows used, 0 = all")
    ap.add_argument("--lr-zo", type=float, default=None, help=f"ZO rows (default {FULL['lr_zo']:g}, the demo's)")
    ap.add_argument("--eps", type=float, default=None)
    ap.add_argument("--lr-backprop", type=float, default=None, help=f"AdamW rows (default {FULL['lr_backprop']:g})")
    ap.add_argument("--prox-mu", type=float, default=0.01)
    ap.add_argument("--server-lr", type=float, default=1e-2, help="FedAdam server lr (fedavg-adam)")
    ap.add_argument("--k", type=int, default=4096, help="FedKSeed seed pool")
    ap.add_argument("--round-timeout", type=float, default=900.0)
    ap.add_argument("--server-eval-n", type=int, default=8, help="rows of the server's own evaluation")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads of the held-out evaluation")
    ap.add_argument("--client-threads", type=int, default=1, help="threads per client (sim and probe)")
    ap.add_argument("--no-probe", action="store_true", help="skip the per-client subprocess probes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="run folder (default runs/methods-<time>)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="plot file (default <out>/methods.png)")
    ap.add_argument("--note", default="", help="what else ran on the machine (kept in the JSON)")
    ap.add_argument("--from-json", default=None, metavar="FILE", help="print the table and draw the plot of a "
                    "saved run (--json FILE of an earlier invocation) without running anything")
    ap.add_argument("--_probe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._probe:
        return probe_main(args._probe)
    if args.from_json:
        return replot(args.from_json, args.plot)

    cfg = dict(TINY if args.model == "tiny" else FULL)
    cfg["model"] = args.model
    for key in ("rounds", "local_steps", "batch", "seq_len", "clients", "devices_per_round", "eval_n", "train",
                "lr_zo", "eps", "lr_backprop"):
        v = getattr(args, key)
        if v is not None:
            cfg[key] = v
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in names + [args.baseline] if m not in METHOD_ROWS]
    if bad:
        ap.error(f"unknown method row(s) {bad}; known: {', '.join(METHOD_ROWS)}")
    names = [args.baseline] + [m for m in names if m != args.baseline]
    if not 0 < cfg["devices_per_round"] <= cfg["clients"]:
        ap.error("need 0 < --devices-per-round <= --clients")
    rows = [row_settings(n, cfg, args) for n in names]

    from edgefed import kernels
    from edgefed.data import SENTIMENT_TEMPLATE, dirichlet_split, load_rotten_tomatoes, train_heldout_split
    from edgefed.export.cache import ensure_artifact
    from edgefed.metrics import paired_gain
    from edgefed.runtime import DeviceModel

    t_start = time.time()
    load0 = os.getloadavg()
    out = Path(args.out or f"runs/methods-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    steps = cfg["rounds"] * cfg["devices_per_round"] * cfg["local_steps"]
    scale = (cfg["batch"] * cfg["seq_len"]) / (8 * 64) * (0.03 if cfg["model"] == "tiny" else 1.0)
    est = sum(steps * STEP_S[(r["backend"], r["method"])] * scale for r in rows) \
        + (len(rows) + 1) * cfg["eval_n"] * EVAL_ROW_S * scale + (0 if args.no_probe else len(rows) * PROBE_S * scale)
    _log(f"{cfg['model']} ({cfg['trainable']}), {len(rows)} methods x {cfg['rounds']} rounds x "
         f"{cfg['devices_per_round']}/{cfg['clients']} clients x {cfg['local_steps']} local steps, batch "
         f"{cfg['batch']} x {cfg['seq_len']} tokens; estimate ~{_dur(est)} on 2 cores shared with another "
         f"job (one step ~{STEP_S[('onnx', 'fedkseed')] * scale:.2f} s ZO, ~{STEP_S[('torch', 'fedavg')] * scale:.2f} "
         f"s backprop); load average {load0[0]:.2f}")

    artifact = ensure_artifact(cfg["model"], cfg["trainable"], "classify:labels=positive,negative",
                               template=SENTIMENT_TEMPLATE, progress=False)
    train, held = train_heldout_split(load_rotten_tomatoes(), heldout=cfg["eval_n"], seed=args.seed)
    if cfg["train"]:
        train = train[:cfg["train"]]
    shards = dirichlet_split(train, cfg["clients"], args.alpha, seed=args.seed)
    chosen = selection(cfg["clients"], cfg["devices_per_round"], cfg["rounds"], args.seed)
    kernels.set_num_threads(args.client_threads)
    evaluator = DeviceModel(artifact, threads=args.threads, seq_len=cfg["seq_len"], check_memory=False)
    evaluator_init(evaluator)
    labels = evaluator.labels
    shard_labels = [{lab: sum(e.label == lab for e in s) for lab in labels} for s in shards]
    _log(f"artifact {artifact}; {len(train)} training rows over {cfg['clients']} clients (Dirichlet "
         f"{args.alpha:g}): {[len(s) for s in shards]}; held-out {len(held)} balanced rows; clients per round "
         f"{chosen}")

    # 1. one client's local round per method, each in a fresh process (memory, time alone)
    probe_shard = max(range(len(shards)), key=lambda i: len(shards[i]))  # any shard; the largest
    for i, r in enumerate(rows):
        if args.no_probe:
            r["probe"] = {"peak_rss": float("nan"), "round_s": float("nan")}
            continue
        job = make_job(r, cfg, args, artifact, f"probe-{r['name']}")
        r["probe"] = probe(r, job, artifact, shards[probe_shard], cfg, args, out / "probes" / r["name"])
        p = r["probe"]
        _log(f"probe {i + 1}/{len(rows)} {r['name']}: peak RSS {p['peak_rss'] / 2**20:.0f} MB (after loading "
             f"{p['peak_rss_loaded'] / 2**20:.0f} MB), load {p['load_s']:.1f} s, local round {p['round_s']:.1f} s, "
             f"update {p['update_bytes']:,} B, torch imported: {p['torch_imported']}")
    if not args.no_probe:
        par = 2.0 if os.getloadavg()[0] < 1.0 else 1.3  # clients of a round share the cores
        est2 = sum(cfg["rounds"] * cfg["devices_per_round"] * r["probe"]["round_s"] / par for r in rows) \
            + (len(rows) + 1) * cfg["eval_n"] * EVAL_ROW_S * scale
        _log(f"measured local rounds -> the jobs should take ~{_dur(est2)} more")

    # 2. the starting model on the held-out rows (the same for every method)
    t0 = time.time()
    start = evaluator.evaluate(held, batch_size=32)
    start_correct = np.asarray(start["correct"]).astype(int)
    _log(f"starting model: acc {start['accuracy']:.4f}, loss {start['loss']:.4f} on {len(held)} rows "
         f"({time.time() - t0:.0f} s)")

    # 3. the jobs
    base = {"onnx": DeviceModel(artifact, threads=args.client_threads, batch_size=cfg["batch"],
                                seq_len=cfg["seq_len"], check_memory=False)}
    if any(r["backend"] == "torch" for r in rows):
        import torch

        from edgefed.backends.torch_model import TorchModel
        torch.set_num_threads(args.client_threads)
        base["torch"] = TorchModel(artifact, seq_len=cfg["seq_len"], batch_size=cfg["batch"],
                                   threads=args.client_threads)
    for i, r in enumerate(rows):
        _log(f"job {i + 1}/{len(rows)}: {r['name']} ({r['backend']}, {lr_text(r)}) "
             f"({(time.time() - t_start) / 60:.1f} min so far)")
        r.update(run_job(r, cfg, args, artifact, base[r["backend"]], evaluator, shards, held, chosen, out))
        r["gain"] = paired_gain(start_correct, r["correct"])
        r["vs_baseline"] = paired_gain(rows[0]["correct"], r["correct"])
        _log(f"  {r['name']}: acc {r['accuracy']:.4f} ({_ci(r['gain'])} pts), up {r['bytes_up']:,.0f} B, down "
             f"{r['bytes_down']:,.0f} B, {r['round_s']:.1f} s/round, train loss {r['train_loss_per_round']}, "
             f"{r['seconds']['federation']:.0f} + {r['seconds']['evaluation']:.0f} s")

    total = time.time() - t_start
    load1 = os.getloadavg()
    cfg.update(alpha=args.alpha, seed=args.seed)
    title = run_title(cfg)
    report(rows, cfg, len(held), start["accuracy"])
    plot_path = plot(rows, Path(args.plot) if args.plot else out / "methods.png", title)
    print(f"({total / 60:.1f} min; load average {load0[0]:.2f} at start, {load1[0]:.2f} at the end; plot "
          f"{plot_path}; runs in {out})")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "config": {**cfg, "alpha": args.alpha, "k": args.k, "seed": args.seed, "prox_mu": args.prox_mu,
                       "server_lr": args.server_lr, "client_threads": args.client_threads, "argv": sys.argv,
                       "note": args.note},
            "selection": chosen, "shard_sizes": [len(s) for s in shards], "shard_labels": shard_labels,
            "start": {"accuracy": float(start["accuracy"]), "loss": float(start["loss"]),
                      "correct": start_correct.tolist()},
            "rows": rows, "seconds": total, "loadavg_start": load0, "loadavg_end": load1,
            "plot": str(plot_path)}, indent=1, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
