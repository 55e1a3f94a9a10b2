"""Offsite-tuning (FedOT) on the methods benchmark's job: the clients train only the adapter
layers of a layer-dropped emulator, and the trained adapter is plugged back into the full model.

    python benchmarks/offsite.py [--rounds 4 --local-steps 4 --batch 8 --lr 1e-4] [--json FILE] [--plot FILE]
                                 [--methods-json runs/methods-full/methods.json]
    python benchmarks/offsite.py --model tiny          # a tiny random 6-layer model: the whole path in ~1 min
    python benchmarks/offsite.py --from-json FILE      # table and plot of a saved run, no run

The artifact: SmolLM2-135M-Instruct exported with `--trainable offsite:adapter=2,drop=2`
(edgefed.export.cache.ensure_artifact): the bottom 2 and top 2 of the 30 decoder layers are the
trainable adapter, the emulator keeps every 2nd middle layer (17 layers in all; plain layer drop,
no distillation). Same task, template, data, held-out rows, clients (10, Dirichlet(0.5)),
client draw per round, rounds, local steps and batch as benchmarks/methods.py. The job: fedavg
(torch hosts, local AdamW by backprop, full adapter-layer weights), through the real server and
device agents over the in-process transport; deltas of tens of MB go as chunks (the codec's
limit is raised on the server and every device, as --max-message-mb does).

Scored on the same held-out rows (paired 95% intervals between any two):

  (a) emulator, trained   the artifact's ONNX graph with the trained adapter (DeviceModel): what
                          the devices saw while training
  (b) plugged-in, trained export_merged puts the trained adapter layers into the full model (its
                          middle layers whole again); that checkpoint is exported as a normal
                          LoRA artifact (B = 0: the checkpoint itself) and scored with DeviceModel;
                          --plugged-torch also scores it with torch (TorchModel on the plugged
                          checkpoint), a check of the ONNX export
  (c) full model, zero-shot  the LoRA r=8 artifact of the methods benchmark at its start (B = 0)
  (d) emulator, zero-shot    the offsite artifact at its initial trainables

Costs per client: bytes up / down per round (accepted update bytes per update; the round plan
plus, when the delta does not fit one broker message, the delta fetched in a sync reply: see
notes), client peak RSS and one local round's time in a fresh subprocess (as methods.py), for
FedOT and for fedavg with LoRA r=8 on the full model probed in the same run; ratios FedOT / LoRA.
--methods-json FILE adds the methods benchmark's fedavg row (LoRA on the full model, the same
clients and batches) to the accuracy table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import methods as M  # noqa: E402  (benchmarks/methods.py: selection, probes, one federated job)

FULL = {"model": "smollm2-135m", "offsite": "offsite:adapter=2,drop=2", "lora": "lora:r=8,targets=q_proj,v_proj",
        "rounds": 4, "local_steps": 4, "batch": 8, "seq_len": 64, "clients": 10, "devices_per_round": 4,
        "eval_n": 160, "train": 0, "lr": 1e-4, "lr_lora": 5e-4}
TINY = {"model": "tiny6", "offsite": "offsite:adapter=1,drop=2", "lora": "lora:r=4,targets=q_proj,v_proj",
        "rounds": 2, "local_steps": 2, "batch": 8, "seq_len": 32, "clients": 10, "devices_per_round": 4,
        "eval_n": 60, "train": 400, "lr": 1e-3, "lr_lora": 5e-3}
ROWS = [("emulator_tuned", "(a) emulator, trained adapter", "ONNX, offsite artifact + trained params"),
        ("plugged", "(b) full model, trained adapter plugged in", "ONNX, plugged checkpoint exported again"),
        ("full_zero", "(c) full model, zero-shot", "ONNX, LoRA artifact at B = 0"),
        ("emulator_zero", "(d) emulator, zero-shot", "ONNX, offsite artifact at its initial params")]


def _log(msg: str) -> None:
    print(f"[offsite] {msg}", file=sys.stderr, flush=True)


def model_source(name: str) -> str:
    """A registry name, or for tiny6 a tiny random Llama of 6 layers (offsite needs a middle)."""
    if name != "tiny6":
        return name
    from edgefed.models import cache_dir, tiny_random_model
    d = cache_dir() / "models" / "tiny6"
    if not (d / "config.json").is_file():
        tiny_random_model(d, seed=0, layers=6)
    return str(d)


def _score(ev) -> dict:
    pred = np.asarray(ev["predictions"])
    return {"accuracy": float(ev["accuracy"]), "loss": float(ev["loss"]),
            "correct": np.asarray(ev["correct"]).astype(int).tolist(), "pred_first_label": float(np.mean(pred == 0))}


# ----------------------------------------------------------------------------- table and plot

def _ci(g: dict) -> str:
    return f"{100 * g['gain']:+.1f} [{100 * g['ci_low']:+.1f}, {100 * g['ci_high']:+.1f}]"


def tables(d: dict, file=sys.stdout) -> None:
    from edgefed.metrics import paired_gain, wilson_interval

    sc = d["scores"]
    rows = [(k, label, how) for k, label, how in ROWS]
    if "plugged_torch" in sc:
        rows.append(("plugged_torch", "(b') plugged in, scored by torch", "TorchModel on the plugged checkpoint"))
    if "lora_fedavg" in sc:
        rows.append(("lora_fedavg", "fedavg, LoRA r=8 on the full model (methods run)", sc["lora_fedavg"]["how"]))
    n = len(sc["full_zero"]["correct"])
    print(f"\nheld-out accuracy ({n} balanced rows; paired 95% intervals on the same rows)", file=file)
    print("| model | scored by | accuracy (Wilson 95%) | loss | predicts 'positive' | vs (c) full zero-shot, pts | "
          "vs (a) emulator trained, pts | ratio to (c) |", file=file)
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |", file=file)
    labels = d.get("labels") or ["first", "second"]
    for k, label, how in rows:
        s = sc[k]
        lo, hi = wilson_interval(int(sum(s["correct"])), n)
        vs_c = "-" if k == "full_zero" else _ci(paired_gain(sc["full_zero"]["correct"], s["correct"]))
        vs_a = "-" if k == "emulator_tuned" else _ci(paired_gain(sc["emulator_tuned"]["correct"], s["correct"]))
        ratio = s["accuracy"] / sc["full_zero"]["accuracy"] if sc["full_zero"]["accuracy"] else float("nan")
        share = s.get("pred_first_label")
        share = "-" if share is None else f"{100 * (share if labels[0] == 'positive' else 1 - share):.0f}%"
        print(f"| {label} | {how} | {100 * s['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] | "
              f"{s['loss']:.4f} | {share} | {vs_c} | {vs_a} | {ratio:.3f} |", file=file)
    c = d["costs"]
    print("\ncost per client (FedOT = fedavg on the emulator's adapter layers; LoRA = fedavg with LoRA r=8 on "
          "the full model; probes in this run, one after the other)", file=file)
    print("| | trainables | up B/client/round | down B/client/round | client peak RSS MB | client s/local round | "
          "sim s/round |", file=file)
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |", file=file)
    fo, lo_ = c["fedot"], c["lora"]

    def cell(v, fmt):
        return "-" if v is None else format(v, fmt)
    for name, x in (("FedOT", fo), ("LoRA fedavg", lo_)):
        print(f"| {name} | {x['trainables']:,} | {cell(x.get('bytes_up'), ',.0f')} | "
              f"{cell(x.get('bytes_down'), ',.0f')} | {x['peak_rss'] / 2**20:,.0f} | {x['round_s']:.2f} | "
              f"{cell(x.get('round_s_sim'), '.1f')} |", file=file)

    def rat(key):
        a, b = fo.get(key), lo_.get(key)
        return f"{a / b:.2f}x" if a is not None and b else "-"
    print(f"| ratio FedOT / LoRA | {fo['trainables'] / lo_['trainables']:.1f}x | {rat('bytes_up')} | "
          f"{rat('bytes_down')} | {rat('peak_rss')} | {rat('round_s')} | {rat('round_s_sim')} |", file=file)


def plot(d: dict, path: Path) -> Path | None:
    from edgefed.plotting import pyplot, save

    plt = pyplot()
    if plt is None:
        _log("matplotlib missing: no plot")
        return None
    from edgefed.metrics import wilson_interval

    sc = d["scores"]
    keys = [k for k, _, _ in ROWS] + [k for k in ("lora_fedavg",) if k in sc]
    names = {"emulator_tuned": "(a) emulator\ntrained", "plugged": "(b) full model\nplugged in",
             "full_zero": "(c) full model\nzero-shot", "emulator_zero": "(d) emulator\nzero-shot",
             "lora_fedavg": "LoRA r=8 fedavg\n(full model)"}
    n = len(sc["full_zero"]["correct"])
    acc = np.array([100 * sc[k]["accuracy"] for k in keys])
    ci = np.array([[100 * x for x in wilson_interval(int(sum(sc[k]["correct"])), n)] for k in keys])
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.4, 1]})
    colors = ["tab:orange", "tab:green", "tab:grey", "tab:brown", "tab:blue"][:len(keys)]
    x = np.arange(len(keys))
    ax[0].bar(x, acc, color=colors)
    ax[0].errorbar(x, acc, yerr=[acc - ci[:, 0], ci[:, 1] - acc], fmt="none", ecolor="k", capsize=4)
    ax[0].axhline(50, color="grey", lw=0.8, ls=":")
    ax[0].set_xticks(x, [names[k] for k in keys], fontsize=8)
    ax[0].set_ylabel("held-out accuracy, % (Wilson 95%)")
    ax[0].set_ylim(0, 100)
    ax[0].set_title(f"held-out accuracy ({n} rows; dotted: chance)")
    c = d["costs"]
    mets = [("bytes up", "bytes_up"), ("bytes down", "bytes_down"), ("client peak RSS", "peak_rss"),
            ("client s/local round", "round_s"), ("trainables", "trainables")]
    vals = [c["fedot"][k] / c["lora"][k] if c["fedot"].get(k) is not None and c["lora"].get(k) else np.nan
            for _, k in mets]
    ax[1].bar(np.arange(len(mets)), vals, color="tab:orange")
    ax[1].axhline(1, color="grey", lw=0.8)
    ax[1].set_yscale("log")
    ax[1].set_xticks(np.arange(len(mets)), [m for m, _ in mets], rotation=25, ha="right", fontsize=8)
    for i, v in enumerate(vals):
        if np.isfinite(v):
            ax[1].text(i, v, f"{v:.2f}x", ha="center", va="bottom", fontsize=8)
    ax[1].set_title("FedOT per client, ratio to LoRA r=8 fedavg on the full model")
    cfg = d["config"]
    fig.suptitle(f"{cfg['model']} {cfg['offsite']}, fedavg AdamW {cfg['lr']:g}, {cfg['clients']} clients "
                 f"Dirichlet({cfg['alpha']:g}), {cfg['devices_per_round']}/round, {cfg['rounds']} rounds x "
                 f"{cfg['local_steps']} steps, batch {cfg['batch']}x{cfg['seq_len']}", fontsize=10)
    return save(fig, path)


def report(d: dict) -> None:
    cfg = d["config"]
    j = d["job"]
    print(f"\n{cfg['model']} {cfg['offsite']} (emulator {d['offsite_split']['n_kept']} of "
          f"{d['offsite_split']['n_layers']} layers, adapter layers {d['offsite_split']['adapter']}), fedavg AdamW "
          f"{cfg['lr']:g}, {cfg['clients']} clients Dirichlet({cfg['alpha']:g}), {cfg['devices_per_round']}/round, "
          f"{cfg['rounds']} rounds x {cfg['local_steps']} steps, batch {cfg['batch']}x{cfg['seq_len']}, seed "
          f"{cfg['seed']}")
    tables(d)
    print(f"\nFedOT job: train loss per round {[round(x, 4) for x in j['train_loss_per_round']]}, |adapter delta| "
          f"{j['delta_norm']:.4g}, {j['clients_at_global_model']} clients at the final global model bit for bit, "
          f"{sum(j['rounds_trained_per_client'].values())} client-rounds; bytes down per round (plan + the delta "
          f"in sync replies where it did not fit the plan): {d['costs']['fedot'].get('bytes_down_note', '')}")
    if "plugged_torch" in d["scores"]:
        t = d["scores"]["plugged_torch"]
        same = int(np.sum(np.asarray(t["correct"]) == np.asarray(d["scores"]["plugged"]["correct"])))
        print(f"plugged-in model, torch vs the ONNX export: same correctness on {same}/{len(t['correct'])} rows, "
              f"loss {t['loss']:.4f} vs {d['scores']['plugged']['loss']:.4f}")


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m, or tiny (a 6-layer random model: "
                    "a smoke run, accuracy stays near chance)")
    ap.add_argument("--offsite", default=None, help=f"trainable spec (default {FULL['offsite']})")
    for key, h in (("rounds", "rounds"), ("local-steps", "local steps"), ("batch", "batch"), ("seq-len", "tokens"),
                   ("clients", "clients"), ("devices-per-round", "clients per round"),
                   ("eval-n", "balanced held-out rows"), ("train", "training rows used, 0 = all")):
        ap.add_argument(f"--{key}", type=int, default=None, help=f"{h} (default {FULL[key.replace('-', '_')]})")
    ap.add_argument("--lr", type=float, default=None, help=f"AdamW lr of the adapter layers (default {FULL['lr']:g})")
    ap.add_argument("--lr-lora", type=float, default=None, help="AdamW lr of the LoRA probe (the methods "
                    f"benchmark's, default {FULL['lr_lora']:g})")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--round-timeout", type=float, default=900.0)
    ap.add_argument("--server-eval-n", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="threads of the held-out evaluations")
    ap.add_argument("--client-threads", type=int, default=1)
    ap.add_argument("--no-probe", action="store_true")
    ap.add_argument("--plugged-torch", action="store_true", help="also score the plugged-in checkpoint with "
                    "torch (a check of its ONNX export)")
    ap.add_argument("--methods-json", default=None, help="a methods.py --json run of the same settings: its "
                    "fedavg row (LoRA r=8 on the full model) joins the accuracy table")
    ap.add_argument("--out", default=None, help="run folder (default runs/offsite-<time>)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="plot file (default <out>/offsite.png)")
    ap.add_argument("--note", default="")
    ap.add_argument("--from-json", default=None, metavar="FILE")
    args = ap.parse_args(argv)
    if args.from_json:
        d = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
        report(d)
        out = plot(d, Path(args.plot or d["plot"]))
        print(f"(from {args.from_json}: {d['seconds'] / 60:.1f} min, load average {d['loadavg_start'][0]:.2f} at "
              f"start, {d['loadavg_end'][0]:.2f} at the end; plot {out})")
        return 0

    cfg = dict(TINY if args.model == "tiny" else FULL)
    for key in ("offsite", "rounds", "local_steps", "batch", "seq_len", "clients", "devices_per_round", "eval_n",
                "train", "lr", "lr_lora"):
        v = getattr(args, key)
        if v is not None:
            cfg[key] = v
    cfg.update(alpha=args.alpha, seed=args.seed)

    from edgefed import kernels
    from edgefed import protocol as P
    from edgefed.data import SENTIMENT_TEMPLATE, dirichlet_split, load_rotten_tomatoes, train_heldout_split
    from edgefed.export.artifact import read_manifest
    from edgefed.export.cache import ensure_artifact
    from edgefed.export.results import export_merged
    from edgefed.runtime import DeviceModel

    t_start = time.time()
    load0 = os.getloadavg()
    out = Path(args.out or f"runs/offsite-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    task = "classify:labels=positive,negative"
    src = model_source(cfg["model"])
    _log(f"{cfg['model']}: exporting (or reusing) the {cfg['offsite']} and {cfg['lora']} artifacts; load average "
         f"{load0[0]:.2f}")
    off_art = ensure_artifact(src, cfg["offsite"], task, template=SENTIMENT_TEMPLATE, progress=False)
    lora_art = ensure_artifact(src, cfg["lora"], task, template=SENTIMENT_TEMPLATE, progress=False)
    man = read_manifest(off_art)
    split = dict(man["offsite"], n_kept=len(man["offsite"]["kept"]))
    n_off, n_lora = int(man["n_trainable"]), int(read_manifest(lora_art)["n_trainable"])
    _log(f"offsite artifact {off_art}: emulator keeps {split['kept']} of {split['n_layers']} layers, adapter "
         f"{split['adapter']}, {n_off:,} trainables ({n_off * 4 / 2**20:.1f} MB f32); LoRA artifact {lora_art}: "
         f"{n_lora:,} trainables")

    train, held = train_heldout_split(load_rotten_tomatoes(), heldout=cfg["eval_n"], seed=args.seed)
    if cfg["train"]:
        train = train[:cfg["train"]]
    shards = dirichlet_split(train, cfg["clients"], args.alpha, seed=args.seed)
    chosen = M.selection(cfg["clients"], cfg["devices_per_round"], cfg["rounds"], args.seed)
    kernels.set_num_threads(args.client_threads)
    _log(f"{len(train)} training rows over {cfg['clients']} clients: {[len(s) for s in shards]}; held-out "
         f"{len(held)}; clients per round {chosen}")

    row = {"name": "fedot", "method": "fedavg", "backend": "torch", "what": "AdamW, adapter layers", "lr": cfg["lr"],
           "eps": 0.0, "params": {}}
    lora_row = {"name": "fedavg-lora", "method": "fedavg", "backend": "torch", "what": "AdamW, LoRA",
                "lr": cfg["lr_lora"], "eps": 0.0, "params": {}}
    # the codec's limit: an update or a delta is n_off float32 values; a sync reply may carry two
    limits = P.Limits(max_message_bytes=max(P.DEFAULT_LIMITS.max_message_bytes, 2 * 4 * n_off + (8 << 20)))

    # 1. probes: one client's local round in a fresh process, FedOT and LoRA fedavg, back to back
    probes = {}
    probe_shard = max(range(len(shards)), key=lambda i: len(shards[i]))
    if not args.no_probe:
        for r, art in ((row, off_art), (lora_row, lora_art)):
            job = M.make_job(r, cfg, args, art, f"probe-{r['name']}")
            probes[r["name"]] = p = M.probe(r, job, art, shards[probe_shard], cfg, args, out / "probes" / r["name"])
            _log(f"probe {r['name']}: peak RSS {p['peak_rss'] / 2**20:.0f} MB, load {p['load_s']:.1f} s, local "
                 f"round {p['round_s']:.1f} s, update {p['update_bytes']:,} B")

    # 2. zero-shot scores: the full model (LoRA at B = 0) and the emulator (its initial params)
    t0 = time.time()
    full_eval = DeviceModel(lora_art, threads=args.threads, seq_len=cfg["seq_len"], check_memory=False)
    labels = full_eval.labels
    scores = {"full_zero": _score(full_eval.evaluate(held, batch_size=32))}
    del full_eval
    emu_eval = DeviceModel(off_art, threads=args.threads, seq_len=cfg["seq_len"], check_memory=False)
    M.evaluator_init(emu_eval)
    scores["emulator_zero"] = _score(emu_eval.evaluate(held, batch_size=32))
    _log(f"zero-shot: full model {scores['full_zero']['accuracy']:.4f}, emulator "
         f"{scores['emulator_zero']['accuracy']:.4f} ({time.time() - t0:.0f} s)")

    # 3. the FedOT job (torch hosts train the emulator's adapter layers by backprop)
    import torch

    from edgefed.backends.torch_model import TorchModel
    torch.set_num_threads(args.client_threads)
    host = TorchModel(off_art, seq_len=cfg["seq_len"], batch_size=cfg["batch"], threads=args.client_threads)
    _log(f"FedOT job: fedavg, AdamW {cfg['lr']:g}, codec limit {limits.max_message_bytes / 2**20:.0f} MiB "
         f"({(time.time() - t_start) / 60:.1f} min so far)")
    job = M.run_job(row, cfg, args, off_art, host, emu_eval, shards, held, chosen, out, limits=limits,
                    job_prefix="offsite")
    scores["emulator_tuned"] = {k: job[k] for k in ("accuracy", "loss", "correct")}
    scores["emulator_tuned"]["pred_first_label"] = None
    final = emu_eval.params.copy()  # run_job left the trained params in the evaluator
    _log(f"  emulator with the trained adapter: {job['accuracy']:.4f}; up {job['bytes_up']:,.0f} B, down "
         f"{job['bytes_down']:,.0f} B, {job['round_s']:.1f} s/round, train loss {job['train_loss_per_round']}")
    del host
    scores["emulator_tuned"]["pred_first_label"] = _score(emu_eval.evaluate(held, batch_size=32))["pred_first_label"]
    del emu_eval

    # 4. the adapter plugged into the full model: a transformers checkpoint, exported as a LoRA artifact
    t0 = time.time()
    plugged_dir = out / "plugged"
    shutil.rmtree(plugged_dir, ignore_errors=True)
    export_merged(off_art, final, plugged_dir)
    plugged_art = out / "plugged-artifact"
    shutil.rmtree(plugged_art, ignore_errors=True)
    from edgefed.export import export_artifact
    export_artifact(str(plugged_dir), plugged_art, cfg["lora"], task, template=SENTIMENT_TEMPLATE, progress=False)
    t_export = time.time() - t0
    pev = DeviceModel(plugged_art, threads=args.threads, seq_len=cfg["seq_len"], check_memory=False)
    scores["plugged"] = _score(pev.evaluate(held, batch_size=32))
    del pev
    _log(f"plugged-in model: {scores['plugged']['accuracy']:.4f} (export {t_export:.0f} s)")
    if args.plugged_torch:
        tm = TorchModel(lora_art, base_model=str(plugged_dir), seq_len=cfg["seq_len"], check_base=False)
        torch.set_num_threads(args.threads)
        scores["plugged_torch"] = _score(tm.evaluate(held, batch_size=32))
        torch.set_num_threads(args.client_threads)
        del tm

    # 5. the methods benchmark's LoRA fedavg row, when its run has the same settings and rows
    if args.methods_json:
        md = json.loads(Path(args.methods_json).read_text(encoding="utf-8"))
        same = all(md["config"].get(k) == cfg[k] for k in ("rounds", "local_steps", "batch", "seq_len", "clients",
                                                           "devices_per_round", "eval_n", "alpha", "seed"))
        fr = next((r for r in md["rows"] if r["name"] == "fedavg"), None)
        if not same or fr is None or md["start"]["correct"] != scores["full_zero"]["correct"]:
            _log(f"{args.methods_json}: other settings or held-out rows; its fedavg row is left out")
        else:
            scores["lora_fedavg"] = {"accuracy": fr["accuracy"], "loss": fr["loss"], "correct": fr["correct"],
                                     "pred_first_label": None,
                                     "how": f"ONNX, {Path(args.methods_json).name}, an earlier run"}

    costs = {
        "fedot": {"trainables": n_off, "bytes_up": job["bytes_up"], "bytes_down": job["bytes_down"],
                  "round_s_sim": job["round_s"],
                  "peak_rss": probes.get("fedot", {}).get("peak_rss", float("nan")),
                  "round_s": probes.get("fedot", {}).get("round_s", float("nan")),
                  "bytes_down_note": "see history"},
        "lora": {"trainables": n_lora, "peak_rss": probes.get("fedavg-lora", {}).get("peak_rss", float("nan")),
                 "round_s": probes.get("fedavg-lora", {}).get("round_s", float("nan")),
                 "bytes_up": None, "bytes_down": None, "round_s_sim": None}}
    if "lora_fedavg" in scores:  # the LoRA job's bytes and sim time from that run
        costs["lora"].update(bytes_up=fr["bytes_up"], bytes_down=fr["bytes_down"], round_s_sim=fr["round_s"])
    elif probes:
        costs["lora"]["bytes_up"] = probes["fedavg-lora"]["update_bytes"]
    costs["fedot"]["bytes_down_note"] = job["bytes_down_note"]
    total = time.time() - t_start
    d = {"config": {**cfg, "k": args.k, "client_threads": args.client_threads, "argv": sys.argv, "note": args.note,
                    "codec_limit_bytes": limits.max_message_bytes},
         "labels": labels, "offsite_split": split, "artifacts": {"offsite": str(off_art), "lora": str(lora_art),
                                                                 "plugged": str(plugged_art)},
         "selection": chosen, "shard_sizes": [len(s) for s in shards], "scores": scores, "costs": costs,
         "probes": probes, "job": {k: v for k, v in job.items() if k not in ("correct",)},
         "export_plugged_s": t_export, "seconds": total, "loadavg_start": load0, "loadavg_end": os.getloadavg()}
    plot_path = plot(d, Path(args.plot) if args.plot else out / "offsite.png")
    d["plot"] = str(plot_path)
    report(d)
    print(f"({total / 60:.1f} min; load average {load0[0]:.2f} at start, {d['loadavg_end'][0]:.2f} at the end; "
          f"plot {plot_path}; runs in {out})")
    if args.json:
        Path(args.json).write_text(json.dumps(d, indent=1, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
