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
  hetlora         torch hosts of two device classes: --pi-clients clients "pi" at rank --pi-rank, the rest
                  "gpu" at rank --gpu-rank (the `assign` rule), truncations of the global r_max adapter,
                  per-component sparsity-weighted aggregation (Cho et al. 2024)
  hetlora-samples hetlora with sample weights (hetlora_weights=samples) instead of the sparsity weights
  flora           the same classes and ranks; a fresh adapter per round, the round's stack merged into
                  every host's frozen weights (Wang et al. 2024). Its global model is not the ONNX
                  graph's trainables (they restart each round) but the hosts' merged weights: its
                  accuracy is one host's TorchModel after the job (every host that finished holds the
                  same bits, checked), and the ONNX global model's accuracy is kept beside it to show
                  the difference. The torch evaluation is checked against ONNX Runtime on the starting
                  model (the same rows, the same predictions)

Runs add up: --merge-into FILE runs only the named --methods and adds them to a saved run (--json
of an earlier invocation with the same settings), replacing rows of the same name; the baseline
and the held-out rows come from it (the starting model is evaluated again and must give the same
predictions), and the baseline's probe runs again so the time ratios of the new rows are taken
against a probe measured beside them.

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

from edgefed.estimate import duration  # noqa: E402

# ----------------------------------------------------------------------------- settings

METHOD_ROWS = {  # row name -> (registry method, client backend, what differs)
    "fedkseed": ("fedkseed", "onnx", "ZO, (seed, scalar) pairs"),
    "fedmezo": ("fedmezo", "onnx", "ZO, dense deltas"),
    "fedkseed-torch": ("fedkseed", "torch", "exact <grad, z> projections"),
    "fedavg": ("fedavg", "torch", "AdamW, f32 deltas"),
    "fedprox": ("fedavg", "torch", "AdamW + prox"),
    "fedavg-adam": ("fedavg", "torch", "AdamW, FedAdam server"),
    "fedavg-bf16": ("fedavg", "torch", "AdamW, bf16 deltas"),
    "hetlora": ("hetlora", "torch", "AdamW, ranks by class, truncation"),
    "hetlora-samples": ("hetlora", "torch", "hetlora, sample weights instead of sparsity weights"),
    "flora": ("flora", "torch", "AdamW, fresh adapters stacked + merged"),
}
RANKED = ("hetlora", "flora")  # methods whose rank comes per device class (assign)
FULL = {"model": "smollm2-135m", "trainable": "lora:r=8,targets=q_proj,v_proj", "rounds": 4, "local_steps": 4,
        "batch": 8, "seq_len": 64, "clients": 10, "devices_per_round": 4, "eval_n": 160, "train": 0,
        "lr_zo": 2e-3, "eps": 1e-3, "lr_backprop": 5e-4,
        "pi_clients": 4, "pi_rank": 2, "gpu_rank": 8}
TINY = {"model": "tiny", "trainable": "lora:r=4,targets=q_proj,v_proj", "rounds": 2, "local_steps": 2,
        "batch": 8, "seq_len": 32, "clients": 10, "devices_per_round": 4, "eval_n": 60, "train": 400,
        "lr_zo": 1e-2, "eps": 1e-3, "lr_backprop": 5e-3,
        "pi_clients": 4, "pi_rank": 2, "gpu_rank": 4}
# seconds per local step on the 2-core dev machine with a test suite beside it (SmolLM2-135M LoRA,
# batch 8 x 64 tokens, one thread): for the estimate printed before the probes measure it
STEP_S = {("onnx", "fedkseed"): 1.7, ("onnx", "fedmezo"): 1.7, ("torch", "fedkseed"): 2.5, ("torch", "fedavg"): 3.2,
          ("torch", "hetlora"): 3.2, ("torch", "flora"): 3.2}
EVAL_ROW_S = 0.22
PROBE_S = 25.0


def _log(msg: str) -> None:
    print(f"[methods] {msg}", file=sys.stderr, flush=True)


def row_settings(name: str, cfg: dict, args) -> dict:
    """The method, backend, lr / eps and job params of one row."""
    method, backend, what = METHOD_ROWS[name]
    params: dict = {}
    if method in RANKED:
        lr, eps = cfg["lr_backprop"], 0.0
        params["assign"] = json.dumps({"pi": {"rank": cfg["pi_rank"]}, "*": {"rank": cfg["gpu_rank"]}})
        if name == "hetlora-samples":
            params["hetlora_weights"] = "samples"
    elif method == "fedavg":
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


def device_classes(cfg: dict) -> list[str]:
    """The class each client announces: the first pi_clients are "pi", the rest "gpu" (only the
    ranked rows pass them: the other methods run as before, every client x86-sim)."""
    return ["pi"] * cfg["pi_clients"] + ["gpu"] * (cfg["clients"] - cfg["pi_clients"])


def make_job(row: dict, cfg: dict, args, artifact, job_id: str):
    from edgefed.methods import JobConfig
    return JobConfig(job=job_id, method=row["method"], artifact=str(artifact), rounds=cfg["rounds"],
                     devices_per_round=cfg["devices_per_round"], min_devices=cfg["devices_per_round"],
                     round_timeout=args.round_timeout, lr=row["lr"], eps=row["eps"],
                     local_steps=cfg["local_steps"], batch_size=cfg["batch"], k=args.k,
                     seed_pool_id=args.seed, seed=args.seed, params=dict(row["params"]))


def lr_text(row: dict) -> str:
    p = row["params"]
    if row["method"] in RANKED:
        ranks = json.loads(p["assign"])
        return (f"AdamW {row['lr']:g}, rank pi {ranks['pi']['rank']} / gpu {ranks['*']['rank']}"
                + (f", {p['hetlora_weights']} weights" if "hetlora_weights" in p else ""))
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


def sampled_agent_cls(chosen: list[list[str]], limits=None):
    """A DeviceAgent that sits out the rounds it was not drawn for; when drawn again it catches
    up on the missed rounds as any device that was away does (a SyncRequest, exact deltas).
    limits: the codec's limits (edgefed.protocol.Limits) for jobs whose messages are larger than
    the default (offsite-tuning's full-layer deltas)."""
    from edgefed.agent import DeviceAgent

    class SampledAgent(DeviceAgent):
        skipped = 0

        def __init__(self, *a, **kw):
            if limits is not None:
                kw.setdefault("limits", limits)
            super().__init__(*a, **kw)

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

    plan = P.decode(Path(spec["plan"]).read_bytes(), limits=P.Limits(max_message_bytes=1 << 30))
    if spec.get("device_class"):  # this class's own plan (assign rules: e.g. its LoRA rank)
        from edgefed.assign import plan_for
        plan = plan_for(plan, "probe", spec["device_class"])
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
    # the update as an agent sends it: the ClientResult's payload fields the Update has (seeds,
    # scalars and/or tensors, depending on the protocol version)
    import dataclasses
    payload = {f.name: getattr(res, f.name) for f in dataclasses.fields(P.Update)
               if f.name in ("seeds", "scalars", "tensors") and hasattr(res, f.name)}
    upd = P.Update(job=plan.job, round=plan.round, device="probe", method=plan.method, msg_id=1,
                   num_samples=res.num_samples, train_loss=res.train_loss, **payload)
    out = {"peak_rss": peak_rss_bytes(), "peak_rss_loaded": peak_loaded, "rss_imports": rss_imports,
           "device_class": spec.get("device_class") or "", "rank": plan.params.get("rank"),
           "rss_loaded": rss_loaded, "load_s": t_load, "round_s": t_round, "train_loss": res.train_loss,
           "update_bytes": len(upd.encode(P.Limits(max_message_bytes=1 << 30))), "torch_imported": "torch" in sys.modules,
           "backward_count": int(getattr(model, "backward_count", 0))}
    print("PROBE " + json.dumps(out), flush=True)
    return 0


def probe(row: dict, job, artifact, shard, cfg: dict, args, work: Path, device_class: str = "") -> dict:
    """One client's local round of `row` in a fresh interpreter (see probe_main); device_class:
    the class whose plan it runs (per-device rules)."""
    from edgefed import protocol as P
    from edgefed.data import write_jsonl
    from edgefed.research import build_plan
    from edgefed.methods import get_method

    strategy = get_method(job.method).server()
    # the round-0 plan as the server builds it (edgefed.research.build_plan: the method's plan
    # fields and the job's per-device rules), whatever the protocol calls its fields
    plan = build_plan(job, 0, strategy.plan_round(job, strategy.init_state(job), 0), None)
    work.mkdir(parents=True, exist_ok=True)
    (work / "plan.bin").write_bytes(plan.encode(P.Limits(max_message_bytes=1 << 30)))
    write_jsonl(work / "shard.jsonl", shard)
    spec = {"plan": str(work / "plan.bin"), "shard": str(work / "shard.jsonl"), "artifact": str(artifact),
            "backend": row["backend"], "seq_len": cfg["seq_len"], "threads": args.client_threads, "seed": 12345,
            "device_class": device_class}
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

def run_job(row: dict, cfg: dict, args, artifact, base, evaluator, shards, held, chosen, out: Path, *,
            limits=None, job_prefix: str = "methods") -> dict:
    """One federated job through the server and device agents; the global model scored on `held`
    by `evaluator` (ONNX Runtime), or, for FLoRA, by a host's own TorchModel (see flora_eval).
    limits: the codec's limits on the server and every device (larger messages)."""
    from edgefed.federation import run_federation
    from edgefed.simulate import thread_devices

    job_id = f"{job_prefix}-{row['name']}-{uuid.uuid4().hex[:6]}"
    job = make_job(row, cfg, args, artifact, job_id)
    classes = device_classes(cfg) if row["method"] in RANKED else None
    starter = thread_devices(base, job_id, shards, agent_cls=sampled_agent_cls(chosen, limits),
                             device_classes=classes)
    load0 = os.getloadavg()
    t0 = time.time()
    # the server's own evaluation runs on a few rows only (before and at the last round); the
    # held-out accuracy is measured below on --eval-n rows, the same rows for every method
    res = run_federation(job, artifact, held[:args.server_eval_n], broker_url=f"inproc://{job_id}",
                         out_dir=out / row["name"], start_devices=starter, eval_n=args.server_eval_n,
                         eval_every=cfg["rounds"], eval_threads=args.threads, progress=False,
                         seq_len=cfg["seq_len"], title=f"{row['name']}",
                         timeout=args.round_timeout * (cfg["rounds"] + 2),
                         server_options={"limits": limits} if limits is not None else None)
    t_fed = time.time() - t0
    if res.rounds_completed != cfg["rounds"]:
        raise RuntimeError(f"{job_id}: {res.rounds_completed}/{cfg['rounds']} rounds")
    t0 = time.time()
    evaluator.params[:] = res.final_params
    ev = evaluator.evaluate(held, batch_size=32)
    extra: dict = {}
    if row["method"] == "flora":  # the global model is in the hosts' merged weights, not the trainables
        extra = flora_eval(starter.agents, base, held, cfg, args)
        extra["onnx_global_accuracy"] = float(ev["accuracy"])
        extra["onnx_global_correct"] = np.asarray(ev["correct"]).astype(int).tolist()
        ev = extra.pop("eval")
    t_eval = time.time() - t0
    rounds = [h for h in res.history if h["round"] > 0]
    up = float(np.mean([h["bytes_in"] / max(1, h["n_updates"]) for h in rounds]))
    carried, down_note = bytes_down(res.history, job_id, out / row["name"] / "server.sqlite")
    trained = {a.device: a.stats.rounds_trained for a in starter.agents}
    return {"job": job_id, "accuracy": float(ev["accuracy"]), "loss": float(ev["loss"]),
            "correct": np.asarray(ev["correct"]).astype(int).tolist(),
            "bytes_up": up, "bytes_down": float(np.mean(carried)), "bytes_down_note": down_note,
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
            "loadavg_end": os.getloadavg(), "history": res.history,
            "device_classes": classes, "server_summary": res.server_summary, **extra}


def bytes_down(history: list[dict], job_id: str, db: Path) -> tuple[list[float], str]:
    """Bytes down per client in rounds 2..R (round 1's plan carries no delta): the round plan,
    plus the previous round's delta where it did not fit the plan (the server then publishes the
    plan with delta_by_sync and each device fetches the delta in its own sync reply; counted as
    the delta's tensor bytes, the reply's header aside). The deltas come from the server's store."""
    from edgefed_server.store import Store

    rounds = [h for h in history if h["round"] > 0]
    with Store(db) as st:
        deltas = st.load_deltas(job_id, 0, len(rounds) - 1)
    tb = [int(sum(np.asarray(t.data).nbytes for t in d.tensors)) for d in deltas]
    per, parts = [], []
    for h in rounds[1:] or rounds:
        prev = tb[h["round"] - 2] if h["round"] >= 2 else 0  # the delta this round's plan carries
        by_sync = h["bytes_out"] < prev
        per.append(float(h["bytes_out"] + (prev if by_sync else 0)))
        parts.append(f"round {h['round']}: plan {h['bytes_out']:,} B" + (f" + delta {prev:,} B by sync" if by_sync else ""))
    return per, "; ".join(parts)


def _torch_eval(model, held, args) -> dict:
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return model.evaluate(held, batch_size=32)
    finally:
        torch.set_num_threads(n)


def flora_eval(agents, base, held, cfg: dict, args) -> dict:
    """FLoRA's global model: the frozen weights with every round's stack merged (the trainables
    restart each round, so the ONNX graph at the final trainables is the starting model). Every
    host that finished the job must hold the same merged bits; one of them is evaluated with its
    own TorchModel. The torch evaluation is checked against ONNX Runtime on the starting model
    (torch_start_check)."""
    from edgefed.methods.hetlora import lora_modules

    mods = [m[0] for m in lora_modules(base.manifest)]
    done = [a for a in agents if a.final_round == cfg["rounds"]]
    if not done:
        raise RuntimeError("flora: no host finished the job")
    ref = done[0].model
    same = sum(all(np.array_equal(a.model.base_weight(m), ref.base_weight(m)) for m in mods) for a in done)
    change = float(np.sqrt(sum(float(np.sum((ref.base_weight(m).astype(np.float64)
                                             - base.base_weight(m).astype(np.float64)) ** 2)) for m in mods)))
    if not change > 0:
        raise RuntimeError("flora: the hosts' frozen weights were never merged (|W - W0| = 0): the round "
                           "stacks did not reach them (a stack over the codec limit falls back to a full "
                           "sync of the trainables, which carries no merge: raise --max-message-mb)")
    if not np.array_equal(ref.params, base._init):
        raise RuntimeError("flora host's trainables are not the fresh adapter: evaluation would double count")
    ev = _torch_eval(ref, held, args)
    return {"eval": ev, "evaluated_by": f"TorchModel of {ref_name(done[0])} (merged weights)",
            "hosts_finished": len(done), "hosts_same_merged_weights": int(same),
            "merged_weight_change_fro": change}


def ref_name(agent) -> str:
    return str(getattr(agent, "device", "?"))


def torch_start_check(base_torch, held, start_correct: np.ndarray, start_pred, args) -> dict:
    """The starting model scored by torch (the FLoRA hosts' evaluator) against ONNX Runtime's
    score of the same rows: how many rows get the same prediction."""
    ev = _torch_eval(base_torch, held, args)
    pred_t = np.asarray(ev["predictions"])
    return {"accuracy": float(ev["accuracy"]), "loss": float(ev["loss"]),
            "same_correct": int(np.sum(np.asarray(ev["correct"]).astype(int) == start_correct)),
            "same_prediction": int(np.sum(pred_t == np.asarray(start_pred))), "n": int(len(held))}


def evaluator_init(ev) -> np.ndarray:
    if not hasattr(ev, "_bench_init"):
        ev._bench_init = ev.params.copy()
    return ev._bench_init


# ----------------------------------------------------------------------------- table and plot

def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def _ci(g: dict) -> str:
    return f"{_pts(g['gain'])} [{_pts(g['ci_low'])}, {_pts(g['ci_high'])}]"


def _ratio(x: float, ref: float) -> str:
    if not ref:
        return "-"
    return f"{x / ref:.0f}x" if x / ref >= 100 else f"{x / ref:.2f}x"


def print_table(rows: list[dict], file=sys.stdout) -> None:
    ref = rows[0]
    print("| method | clients | lr | acc before | acc after | gain, pts (95% CI) | vs baseline, pts (95% CI) | "
          "up B/client/round | x | down B/client/round | x | client peak RSS MB | x | client s/local round | x | "
          "sim s/round | x |", file=file)
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
          "---: | ---: |", file=file)
    for r in rows:
        vs = "(baseline)" if r is ref else _ci(r["vs_baseline"])
        # a row merged into a saved run: its probe's ratios against the baseline's probe run beside it
        p, rp = r["probe"], (r.get("probe_ref") or ref["probe"])
        print(f"| {r['name']} | {r['backend']} | {lr_text(r)} | {100 * r['gain']['before']:.1f}% | "
              f"{100 * r['accuracy']:.1f}% | {_ci(r['gain'])} | {vs} | "
              f"{r['bytes_up']:,.0f} | {_ratio(r['bytes_up'], ref['bytes_up'])} | "
              f"{r['bytes_down']:,.0f} | {_ratio(r['bytes_down'], ref['bytes_down'])} | "
              f"{p['peak_rss'] / 2**20:,.0f} | {_ratio(p['peak_rss'], rp['peak_rss'])} | "
              f"{p['round_s']:.2f} | {_ratio(p['round_s'], rp['round_s'])} | "
              f"{r['round_s']:.2f} | {_ratio(r['round_s'], ref['round_s'])} |", file=file)


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    from edgefed.plotting import pyplot, save

    plt = pyplot()
    if plt is None:
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
    return save(fig, path)


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
        if r.get("device_classes"):
            cls = r["device_classes"]
            print(f"  {r['name']}: classes {', '.join(f'{c} x{cls.count(c)}' for c in dict.fromkeys(cls))}; server "
                  f"summary {r.get('server_summary', {}).get('strategy', r.get('server_summary'))}")
        if r.get("probe_pi"):
            pp = r["probe_pi"]
            print(f"  {r['name']} probe of class pi (rank {pp.get('rank')}): local round {pp['round_s']:.2f} s, peak "
                  f"RSS {pp['peak_rss'] / 2**20:,.0f} MB, update {pp['update_bytes']:,} B; class gpu (rank "
                  f"{r['probe'].get('rank')}): {r['probe']['round_s']:.2f} s, {r['probe']['peak_rss'] / 2**20:,.0f} MB, "
                  f"{r['probe']['update_bytes']:,} B")
        if r.get("probe_ref"):
            print(f"  {r['name']}: probe ratios against the baseline's probe run again beside it "
                  f"({r['probe_ref']['round_s']:.2f} s, {r['probe_ref']['peak_rss'] / 2**20:,.0f} MB)")
        if "onnx_global_accuracy" in r:
            tc = r.get("torch_start_check") or {}
            print(f"  {r['name']}: scored by {r['evaluated_by']}: {r['hosts_same_merged_weights']} of "
                  f"{r['hosts_finished']} hosts that finished hold the same merged weights (|W - W0|_F "
                  f"{r['merged_weight_change_fro']:.4g}); the ONNX global model (trainables only) would score "
                  f"{100 * r['onnx_global_accuracy']:.1f}%; torch vs ONNX Runtime on the starting model: same "
                  f"prediction on {tc.get('same_prediction')}/{tc.get('n')} rows")


def replot(path: str, plot_path: str | None) -> int:
    d = json.loads(Path(path).read_text(encoding="utf-8"))
    cfg = d["config"]
    report(d["rows"], cfg, len(d["start"]["correct"]), d["start"]["accuracy"])
    out = plot(d["rows"], Path(plot_path or d["plot"]), run_title(cfg))
    print(f"(from {path}: {d['seconds'] / 60:.1f} min, load average {d['loadavg_start'][0]:.2f} at start, "
          f"{d['loadavg_end'][0]:.2f} at the end; plot {out})")
    for i, m in enumerate(d.get("merged_runs", [])):
        print(f"(merged run {i + 1}: {', '.join(m['rows'])}, {m['seconds'] / 60:.1f} min, load average "
              f"{m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at the end; {m.get('note', '')})")
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
    ap.add_argument("--pi-clients", type=int, default=None, help="hetlora / flora: the first N clients announce "
                    f"class pi, the rest gpu (default {FULL['pi_clients']})")
    ap.add_argument("--pi-rank", type=int, default=None, help=f"LoRA rank of class pi (default {FULL['pi_rank']})")
    ap.add_argument("--gpu-rank", type=int, default=None, help="LoRA rank of class gpu (default "
                    f"{FULL['gpu_rank']}, the artifact's r_max)")
    ap.add_argument("--server-lr", type=float, default=1e-2, help="FedAdam server lr (fedavg-adam)")
    ap.add_argument("--k", type=int, default=4096, help="FedKSeed seed pool")
    ap.add_argument("--round-timeout", type=float, default=900.0)
    ap.add_argument("--max-message-mb", type=float, default=64.0, help="the codec's message limit on the server "
                    "and every device (as their --max-message-mb): FLoRA's round stack of mixed ranks is ~6 MB "
                    "on SmolLM2, over the 4 MiB default; messages over the broker's 4 MiB go in chunks")
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
    ap.add_argument("--merge-into", default=None, metavar="FILE", help="run only --methods and add them to the "
                    "saved run FILE (its settings, held-out rows and baseline; rows of the same name are "
                    "replaced); write the merged run to --json (FILE itself when --json is not given)")
    ap.add_argument("--_probe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._probe:
        return probe_main(args._probe)
    if args.from_json:
        return replot(args.from_json, args.plot)

    saved = None
    if args.merge_into:
        saved = json.loads(Path(args.merge_into).read_text(encoding="utf-8"))
        args.model = saved["config"]["model"]
    cfg = dict(TINY if args.model == "tiny" else FULL)
    cfg["model"] = args.model
    keys = ("rounds", "local_steps", "batch", "seq_len", "clients", "devices_per_round", "eval_n", "train",
            "lr_zo", "eps", "lr_backprop", "pi_clients", "pi_rank", "gpu_rank")
    if saved is not None:  # the saved run's settings; a different one given here is an error
        for key in keys + ("alpha", "seed", "k", "prox_mu", "server_lr", "client_threads"):
            if key not in saved["config"]:
                continue
            mine = getattr(args, key, None)
            if key in ("alpha", "seed", "k", "prox_mu", "server_lr", "client_threads"):
                if mine != saved["config"][key] and mine != ap.get_default(key):
                    ap.error(f"--{key.replace('_', '-')} {mine} differs from the saved run's {saved['config'][key]}")
                setattr(args, key, saved["config"][key])
            elif mine is not None and mine != saved["config"][key]:
                ap.error(f"--{key.replace('_', '-')} {mine} differs from the saved run's {saved['config'][key]}")
            cfg[key] = saved["config"][key]
        args.baseline = saved["rows"][0]["name"]
    for key in keys:
        v = getattr(args, key)
        if v is not None:
            cfg[key] = v
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in names + [args.baseline] if m not in METHOD_ROWS]
    if bad:
        ap.error(f"unknown method row(s) {bad}; known: {', '.join(METHOD_ROWS)}")
    if saved is None:
        names = [args.baseline] + [m for m in names if m != args.baseline]
    elif args.baseline in names:
        ap.error(f"--merge-into keeps the saved baseline {args.baseline}: run it again without --merge-into")
    if not 0 < cfg["devices_per_round"] <= cfg["clients"]:
        ap.error("need 0 < --devices-per-round <= --clients")
    if not 0 <= cfg["pi_clients"] <= cfg["clients"]:
        ap.error("need 0 <= --pi-clients <= --clients")
    rows = [row_settings(n, cfg, args) for n in names]
    ref_row = row_settings(args.baseline, cfg, args) if saved is not None else None

    from edgefed import kernels
    from edgefed.data import SENTIMENT_TEMPLATE, dirichlet_split, load_rotten_tomatoes, train_heldout_split
    from edgefed.export.cache import ensure_artifact
    from edgefed.metrics import paired_gain
    from edgefed.runtime import DeviceModel

    t_start = time.time()
    load0 = os.getloadavg()
    out = Path(args.out or f"runs/methods-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    if saved is not None:
        _log(f"adding {', '.join(names)} to {args.merge_into} ({len(saved['rows'])} rows, baseline {args.baseline})")
    steps = cfg["rounds"] * cfg["devices_per_round"] * cfg["local_steps"]
    scale = (cfg["batch"] * cfg["seq_len"]) / (8 * 64) * (0.03 if cfg["model"] == "tiny" else 1.0)
    est = sum(steps * STEP_S[(r["backend"], r["method"])] * scale for r in rows) \
        + (len(rows) + 1) * cfg["eval_n"] * EVAL_ROW_S * scale + (0 if args.no_probe else len(rows) * PROBE_S * scale)
    _log(f"{cfg['model']} ({cfg['trainable']}), {len(rows)} methods x {cfg['rounds']} rounds x "
         f"{cfg['devices_per_round']}/{cfg['clients']} clients x {cfg['local_steps']} local steps, batch "
         f"{cfg['batch']} x {cfg['seq_len']} tokens; estimate ~{duration(est)} on 2 cores shared with another "
         f"job (one step ~{STEP_S[('onnx', 'fedkseed')] * scale:.2f} s ZO, ~{STEP_S[('torch', 'fedavg')] * scale:.2f} "
         f"s backprop); load average {load0[0]:.2f}")

    artifact = ensure_artifact(cfg["model"], cfg["trainable"], "classify:labels=positive,negative",
                               template=SENTIMENT_TEMPLATE, progress=False)
    train, held = train_heldout_split(load_rotten_tomatoes(), heldout=cfg["eval_n"], seed=args.seed)
    if cfg["train"]:
        train = train[:cfg["train"]]
    shards = dirichlet_split(train, cfg["clients"], args.alpha, seed=args.seed)
    chosen = selection(cfg["clients"], cfg["devices_per_round"], cfg["rounds"], args.seed)
    if saved is not None and ([len(x) for x in shards] != saved["shard_sizes"] or chosen != saved["selection"]):
        raise SystemExit(f"the shards or the client draw differ from {args.merge_into}'s: the data or the "
                         "split changed since; run every row again")
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

    def show(i, name, p):
        _log(f"probe {i + 1}/{len(rows)} {name}: peak RSS {p['peak_rss'] / 2**20:.0f} MB (after loading "
             f"{p['peak_rss_loaded'] / 2**20:.0f} MB), load {p['load_s']:.1f} s, local round {p['round_s']:.1f} s, "
             f"update {p['update_bytes']:,} B, torch imported: {p['torch_imported']}")
    ref_probe = None
    if saved is not None and not args.no_probe:  # the baseline's probe again, beside the new rows'
        ref_probe = probe(ref_row, make_job(ref_row, cfg, args, artifact, f"probe-{ref_row['name']}"), artifact,
                          shards[probe_shard], cfg, args, out / "probes" / ref_row["name"])
        show(-1, f"{ref_row['name']} (the saved baseline, again)", ref_probe)
    for i, r in enumerate(rows):
        if args.no_probe:
            r["probe"] = {"peak_rss": float("nan"), "round_s": float("nan")}
            continue
        job = make_job(r, cfg, args, artifact, f"probe-{r['name']}")
        # ranked rows: the top class (rank gpu_rank) in the table, the pi class beside it
        r["probe"] = probe(r, job, artifact, shards[probe_shard], cfg, args, out / "probes" / r["name"],
                           device_class="gpu" if r["method"] in RANKED else "")
        show(i, r["name"], r["probe"])
        if r["method"] in RANKED:
            r["probe_pi"] = probe(r, job, artifact, shards[probe_shard], cfg, args, out / "probes" / (r["name"] + "-pi"),
                                  device_class="pi")
            show(i, r["name"] + " (class pi)", r["probe_pi"])
        if ref_probe is not None:
            r["probe_ref"] = ref_probe
    if not args.no_probe:
        par = 2.0 if os.getloadavg()[0] < 1.0 else 1.3  # clients of a round share the cores
        est2 = sum(cfg["rounds"] * cfg["devices_per_round"] * r["probe"]["round_s"] / par for r in rows) \
            + (len(rows) + 1) * cfg["eval_n"] * EVAL_ROW_S * scale
        _log(f"measured local rounds -> the jobs should take ~{duration(est2)} more")

    # 2. the starting model on the held-out rows (the same for every method)
    t0 = time.time()
    start = evaluator.evaluate(held, batch_size=32)
    start_correct = np.asarray(start["correct"]).astype(int)
    _log(f"starting model: acc {start['accuracy']:.4f}, loss {start['loss']:.4f} on {len(held)} rows "
         f"({time.time() - t0:.0f} s)")
    if saved is not None and start_correct.tolist() != saved["start"]["correct"]:
        raise SystemExit(f"the starting model scores the held-out rows differently from {args.merge_into}: the "
                         "rows, the artifact or the evaluator changed; run every row again")
    baseline_correct = saved["rows"][0]["correct"] if saved is not None else None

    # 3. the jobs
    base = {"onnx": DeviceModel(artifact, threads=args.client_threads, batch_size=cfg["batch"],
                                seq_len=cfg["seq_len"], check_memory=False)}
    if any(r["backend"] == "torch" for r in rows):
        import torch

        from edgefed.backends.torch_model import TorchModel
        torch.set_num_threads(args.client_threads)
        base["torch"] = TorchModel(artifact, seq_len=cfg["seq_len"], batch_size=cfg["batch"],
                                   threads=args.client_threads)
    torch_check = None
    if any(r["method"] == "flora" for r in rows):  # flora is scored by torch: check it against ONNX Runtime
        torch_check = torch_start_check(base["torch"], held, start_correct, start["predictions"], args)
        _log(f"torch evaluator on the starting model: acc {torch_check['accuracy']:.4f}, loss "
             f"{torch_check['loss']:.4f}; the same prediction as ONNX Runtime on {torch_check['same_prediction']}"
             f"/{torch_check['n']} rows")
    from edgefed import protocol as P
    limits = P.Limits(max_message_bytes=max(P.DEFAULT_LIMITS.max_message_bytes, int(args.max_message_mb * 2**20)))
    for i, r in enumerate(rows):
        _log(f"job {i + 1}/{len(rows)}: {r['name']} ({r['backend']}, {lr_text(r)}) "
             f"({(time.time() - t_start) / 60:.1f} min so far)")
        r.update(run_job(r, cfg, args, artifact, base[r["backend"]], evaluator, shards, held, chosen, out,
                         limits=limits))
        r["max_message_mb"] = args.max_message_mb
        r["gain"] = paired_gain(start_correct, r["correct"])
        r["vs_baseline"] = paired_gain(baseline_correct if baseline_correct is not None else rows[0]["correct"],
                                       r["correct"])
        if torch_check is not None and r["method"] == "flora":
            r["torch_start_check"] = torch_check
        _log(f"  {r['name']}: acc {r['accuracy']:.4f} ({_ci(r['gain'])} pts), up {r['bytes_up']:,.0f} B, down "
             f"{r['bytes_down']:,.0f} B, {r['round_s']:.1f} s/round, train loss {r['train_loss_per_round']}, "
             f"{r['seconds']['federation']:.0f} + {r['seconds']['evaluation']:.0f} s")

    total = time.time() - t_start
    load1 = os.getloadavg()
    cfg.update(alpha=args.alpha, seed=args.seed)
    title = run_title(cfg)
    this_run = {"argv": sys.argv, "rows": names, "seconds": total, "loadavg_start": load0, "loadavg_end": load1,
                "note": args.note, "baseline_probe_again": ref_probe}
    if saved is not None:
        merged = [r for r in saved["rows"]]
        for r in rows:
            r["run"] = len(saved.get("merged_runs", [])) + 1
            at = [j for j, o in enumerate(merged) if o["name"] == r["name"]]
            if at:
                merged[at[0]] = r
            else:
                merged.append(r)
        saved["rows"] = merged
        saved["config"].update({k: cfg[k] for k in ("pi_clients", "pi_rank", "gpu_rank")})
        saved["merged_runs"] = saved.get("merged_runs", []) + [this_run]
        plot_path = plot(merged, Path(args.plot or saved.get("plot") or out / "methods.png"), run_title(saved["config"]))
        saved["plot"] = str(plot_path)
        report(merged, saved["config"], len(held), start["accuracy"])
        print(f"(this run {total / 60:.1f} min; load average {load0[0]:.2f} at start, {load1[0]:.2f} at the end; "
              f"plot {plot_path}; runs in {out})")
        Path(args.json or args.merge_into).write_text(json.dumps(saved, indent=1, default=str), encoding="utf-8")
        return 0
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
