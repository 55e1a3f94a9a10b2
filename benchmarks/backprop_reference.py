"""What backprop reaches on the demo's rows: the reference the ZO demo is judged against.

    python benchmarks/backprop_reference.py [--template T] [--steps 100] [--lrs 5e-4,1e-3]
        [--seeds 1] [--json FILE] [--plot FILE]
    python benchmarks/backprop_reference.py --model tiny --steps 8 --evals 2   # smoke run, < 1 min

The demo's task and split (packaged Rotten Tomatoes, classify:labels=positive,negative, 500
balanced held-out rows, seed 0: the rows `edgefed demo` scores), with one template, centrally:

- zero-shot: the artifact's starting model (the baseline of every row below);
- readout: only a linear correction of the label words' output rows (plus a bias per label)
  trains, on the frozen model's last hidden state, full-batch Adam over every training row.
  This is the most a head-only trainable can get from the frozen features, however it is
  trained; a ZO job whose accuracy stalls near it is changing the readout, not the features;
- backprop: LoRA r=8 (q,v) of the same artifact by AdamW on the torch backend (the host path,
  edgefed.methods.fedavg.backprop_steps), batch 8, scored after every slice of --steps.

Each row: held-out accuracy, the paired gain over zero-shot with its 95% interval (the same
500 rows), and held-out loss. Table to stdout, progress to stderr, curves to --plot.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from edgefed.data import SENTIMENT_TEMPLATE, load_rotten_tomatoes, train_heldout_split  # noqa: E402
from edgefed.metrics import paired_gain  # noqa: E402

TASK = "classify:labels=positive,negative"


def _log(msg: str) -> None:
    print(f"[backprop_reference {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def scored(model, held, base=None) -> dict:
    ev = model.evaluate(held, batch_size=32)
    out = {"accuracy": ev["accuracy"], "loss": ev["loss"], "correct": ev["correct"].astype(int).tolist()}
    if base is not None:
        out["gain"] = paired_gain(base["correct"], out["correct"])
    return out


def last_hidden(model, records, batch_size: int = 32):
    """The frozen model's hidden state at each row's last real token (what the label scores read)."""
    import torch

    core, hs = model.core, []
    with torch.no_grad():
        for a in range(0, len(records), batch_size):
            b = model.encode(records[a:a + batch_size])
            ids, mask = torch.from_numpy(b.input_ids), torch.from_numpy(b.attention_mask)
            emb, m = core.embed(ids, mask)
            h = core.lm.get_decoder()(inputs_embeds=emb, attention_mask=m, use_cache=False).last_hidden_state
            hs.append(core.last_real(h, m))
    return torch.cat(hs)


def readout(model, train, held, base, epochs: int, lr: float, checkpoints: list[int]) -> list[dict]:
    """Full-batch Adam on (delta of the label rows, bias) over the frozen features; scored at
    `checkpoints` epochs. Single-token label words only (the sentiment task's)."""
    import torch
    import torch.nn.functional as F

    if model.core.ctx.numel():
        _log("readout: skipped (a label word has several tokens; the readout scores first tokens only)")
        return []
    out_emb = model.core.lm.get_output_embeddings()
    w0 = out_emb.weight.detach()[model.core.first]
    b0 = out_emb.bias.detach()[model.core.first] if out_emb.bias is not None else torch.zeros(w0.shape[0])
    _log(f"readout: features of {len(train)} training and {len(held)} held-out rows ...")
    h_tr, h_te = last_hidden(model, train), last_hidden(model, held)
    y_tr = torch.from_numpy(model.task.targets(train)).long()
    y_te = model.task.targets(held)
    dw = torch.zeros_like(w0, requires_grad=True)
    bias = torch.zeros(w0.shape[0], requires_grad=True)
    # At zero correction the readout must be right and wrong on the same rows as the graph (with
    # two labels: predict as it does), or the features are not what the label scores read.
    start_correct = (h_te @ w0.T + b0).argmax(1).numpy() == y_te
    agree = float(np.mean(start_correct == np.asarray(base["correct"], dtype=bool)))
    if agree < 0.99:
        raise RuntimeError(f"the frozen features predict like the graph on only {agree:.1%} of held-out rows: "
                           "they are not what the label scores read")
    opt = torch.optim.Adam([dw, bias], lr=lr)
    rows = []
    for ep in range(1, epochs + 1):
        opt.zero_grad()
        F.cross_entropy(h_tr @ (w0 + dw).T + b0 + bias, y_tr).backward()
        opt.step()
        if ep in checkpoints:
            with torch.no_grad():
                z = h_te @ (w0 + dw).T + b0 + bias
                loss = float(F.cross_entropy(z, torch.from_numpy(y_te).long()))
                correct = (z.argmax(1).numpy() == y_te).astype(int).tolist()
            rows.append({"row": "readout", "step": ep, "accuracy": float(np.mean(correct)), "loss": loss,
                         "correct": correct, "gain": paired_gain(base["correct"], correct)})
            _log(f"readout epoch {ep}: {rows[-1]['accuracy']:.3f} / {loss:.4f}")
    return rows


def backprop(model, train, held, base, lr: float, steps: int, evals: int, seed: int, batch: int) -> list[dict]:
    import torch

    from edgefed.methods.fedavg import backprop_steps, plan_settings, start_tensor

    model.reset_params()
    flat = start_tensor(model)
    s = plan_settings({"optimizer": "adamw"})
    rows, done = [], 0
    per = [steps // evals + (i < steps % evals) for i in range(evals)]
    opt_state = {}
    for i, n in enumerate(per):
        plan = SimpleNamespace(local_steps=n, batch_size=batch, lr=lr, round=i, params={})
        # one AdamW across slices: the slices are one run, scored in between
        backprop_steps(model, train, plan, seed * 1000 + i, flat, s, opt_state=opt_state)
        done += n
        with torch.no_grad():
            model.params[:] = flat.detach().cpu().numpy()
        r = scored(model, held, base)
        rows.append({"row": f"backprop lr {lr:g}", "lr": lr, "seed": seed, "step": done, **r})
        _log(f"backprop lr {lr:g} seed {seed} step {done}: {r['accuracy']:.3f} / {r['loss']:.4f}")
    model.reset_params()
    return rows


def score_store(label: str, db: str, held, res: dict, threads: int) -> dict:
    """A federated job's global model, rebuilt from its server store (the stored round deltas
    replayed on the artifact, the bits every replica holds), scored on the same rows."""
    from edgefed.export.artifact import read_manifest
    from edgefed.export.results import trainables_from_store
    from edgefed.runtime import DeviceModel
    from edgefed_server.store import Store

    with Store(db) as store:
        jobs = store.job_ids()
    if len(jobs) != 1:
        raise SystemExit(f"--store {db}: holds {len(jobs)} jobs ({', '.join(jobs) or 'none'}); give a store of one job")
    params, info = trainables_from_store(db, jobs[0])
    template = read_manifest(info["artifact"])["task"].get("template")
    if template != res["template"]:
        raise SystemExit(f"--store {db}: job {jobs[0]} used the template {template!r}, these rows were scored "
                         f"with {res['template']!r}; compare runs of one template")
    model = DeviceModel(info["artifact"], threads=threads, check_memory=False)
    start = scored(model, held)
    if start["correct"] != res["zero_shot"]["correct"]:
        raise SystemExit(f"--store {db}: the job's starting model does not predict as this reference's zero-shot "
                         "on these rows (another model, artifact or held-out split)")
    model.params[:] = params
    out = scored(model, held, res["zero_shot"])
    _log(f"{label}: job {jobs[0]} after {info['rounds']} rounds: {out['accuracy']:.3f} / {out['loss']:.4f}")
    return {"row": label, "step": f"{info['rounds']} rounds", "job": jobs[0], "store": str(db), **out}


def _name(row: dict) -> str:
    return row["row"] + (f" seed {row['seed']}" if "seed" in row else "")


def print_store_comparison(res: dict, file=sys.stdout) -> None:
    """Each federated job against each reference row, paired on the same rows."""
    if not res.get("jobs"):
        return
    print("\n| federated job | accuracy | against | steps | difference, pts [95% CI] (job right only / row right only) |",
          file=file)
    print("| --- | ---: | --- | ---: | ---: |", file=file)
    for job in res["jobs"]:
        for r in res["rows"]:
            d = paired_gain(r["correct"], job["correct"])
            print(f"| {job['row']} | {job['accuracy']:.1%} | {_name(r)} "
                  f"| {r['step']} | {100 * d['gain']:+.1f} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}] "
                  f"({d['fixed']} / {d['broken']}) |", file=file)


def print_table(res: dict, file=sys.stdout) -> None:
    base = res["zero_shot"]
    print(f"\ntemplate {res['template']!r}, {res['n_heldout']} held-out rows, {res['n_train']} training rows\n",
          file=file)
    print("| row | steps | accuracy | gain over zero-shot, pts [95% CI] (fixed / broken) | loss |", file=file)
    print("| --- | ---: | ---: | ---: | ---: |", file=file)
    print(f"| zero-shot (baseline) | 0 | {base['accuracy']:.1%} | - | {base['loss']:.4f} |", file=file)
    for r in res["rows"] + res.get("jobs", []):
        g = r["gain"]
        print(f"| {_name(r)} | {r['step']} | {r['accuracy']:.1%} | "
              f"{100 * g['gain']:+.1f} [{100 * g['ci_low']:+.1f}, {100 * g['ci_high']:+.1f}] "
              f"({g['fixed']} / {g['broken']}) | {r['loss']:.4f} |", file=file)


def merge(results: list[dict]) -> dict:
    """Runs of the same template and held-out rows (say seeds run apart) as one result."""
    first = results[0]
    for r in results[1:]:
        if (r["template"], r["zero_shot"]["correct"]) != (first["template"], first["zero_shot"]["correct"]):
            raise SystemExit("--from-json: these runs differ in template or held-out rows; merge only "
                             "runs of one template (same --heldout)")
    return {**first, "rows": [row for r in results for row in r["rows"]],
            "seconds": sum(r.get("seconds", 0.0) for r in results)}


def print_seed_summary(res: dict, file=sys.stdout) -> None:
    """Backprop rows with several seeds: seed-mean accuracy and gain with 95% t intervals."""
    from edgefed.metrics import mean_interval

    groups: dict[tuple[str, int], list[dict]] = {}
    for r in res["rows"]:
        if r["row"] != "readout":
            groups.setdefault((r["row"], r["step"]), []).append(r)
    groups = {k: g for k, g in groups.items() if len(g) > 1}  # one seed has no interval: the table above
    if not groups:
        return
    print("\n| row | steps | seeds | accuracy, seed-mean [95% CI] | gain, pts [95% CI] | loss, seed-mean |", file=file)
    print("| --- | ---: | ---: | ---: | ---: | ---: |", file=file)
    for (name, step), g in sorted(groups.items()):
        m, lo, hi = mean_interval([r["accuracy"] for r in g])
        base = res["zero_shot"]["accuracy"]
        print(f"| {name} | {step} | {len(g)} | {m:.1%} [{lo:.1%}, {hi:.1%}] | {100 * (m - base):+.1f} "
              f"[{100 * (lo - base):+.1f}, {100 * (hi - base):+.1f}] | {np.mean([r['loss'] for r in g]):.4f} |",
              file=file)


def plot(res: dict, path: Path) -> Path | None:
    from edgefed.plotting import pyplot, save

    plt = pyplot()
    if plt is None:
        _log("matplotlib missing: no plot")
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.axhline(100 * res["zero_shot"]["accuracy"], color="grey", ls=":", label="zero-shot")
    ro = [r for r in res["rows"] if r["row"] == "readout"]
    if ro:
        ax.axhline(100 * max(r["accuracy"] for r in ro), color="tab:green", ls="--",
                   label="readout on frozen features (best epoch)")
    for name in sorted({r["row"] for r in res["rows"] if r["row"] != "readout"}):
        for seed in sorted({r.get("seed", 0) for r in res["rows"] if r["row"] == name}):
            pts = [(0, res["zero_shot"]["accuracy"])] + [(r["step"], r["accuracy"]) for r in res["rows"]
                                                         if r["row"] == name and r.get("seed", 0) == seed]
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=f"{name} seed {seed}")
    for i, (label, acc) in enumerate(res.get("marks", [])):  # other results on the same rows (--mark)
        ax.axhline(100 * acc, color=f"C{4 + i}", ls="-.", lw=1.2, label=label)
    if res.get("target"):
        ax.axhline(100 * res["target"], color="tab:red", lw=0.8, label=f"target {100 * res['target']:.2f}%")
    ax.set_xlabel("backprop steps (batch 8)")
    ax.set_ylabel(f"held-out accuracy, % ({res['n_heldout']} rows)")
    ax.set_title(f"What backprop reaches on the demo's rows ({res['template'].split('{text}')[0].strip()[:48]!r})",
                 fontsize=9)
    ax.legend(fontsize=7)
    return save(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m, or tiny (smoke run)")
    ap.add_argument("--template", default=SENTIMENT_TEMPLATE, help="classify template with {text}")
    ap.add_argument("--trainable", default="lora:r=8,targets=q_proj,v_proj")
    ap.add_argument("--heldout", type=int, default=500)
    ap.add_argument("--steps", type=int, default=100, help="backprop steps per run")
    ap.add_argument("--evals", type=int, default=4, help="held-out scorings per backprop run")
    ap.add_argument("--lrs", default="5e-4,1e-3", help="AdamW learning rates, comma-separated")
    ap.add_argument("--seeds", type=int, default=1, help="batch orders per lr")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--readout-epochs", type=int, default=300, help="0: no readout row")
    ap.add_argument("--readout-lr", type=float, default=1e-3)
    ap.add_argument("--target", type=float, default=0.8275, help="drawn on the plot (the issue's 82.75%%)")
    ap.add_argument("--mark", action="append", default=[], metavar="LABEL=ACCURACY",
                    help="draw another result on the same rows, e.g. 'ZO demo, 12 rounds=0.820' (repeatable)")
    ap.add_argument("--store", action="append", default=[], metavar="LABEL=SQLITE",
                    help="a federated job's server store (say runs/demo-*/server.sqlite, a job of the same "
                         "template): its global model is rebuilt, scored on the same rows and compared "
                         "pairwise with every row (repeatable)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--from-json", default=None, help="print the table (and --plot) of earlier --json files "
                    "(comma-separated: runs of one template, say seeds run apart, merged)")
    args = ap.parse_args(argv)
    try:  # checked before any work: a typo must not cost a finished run
        marks = [(m.rpartition("=")[0], float(m.rpartition("=")[2])) for m in args.mark]
    except ValueError:
        ap.error(f"--mark {args.mark}: write LABEL=ACCURACY, the accuracy as a fraction (0.820)")
    stores = [spec.rpartition("=") for spec in args.store]
    for spec, (label, sep, db) in zip(args.store, stores):
        if not sep or not Path(db).is_file():
            ap.error(f"--store {spec!r}: write LABEL=PATH to an existing server.sqlite")

    if args.from_json:
        res = merge([json.loads(Path(p).read_text()) for p in args.from_json.split(",") if p])
    else:
        import torch

        from edgefed.backends.torch_model import TorchModel
        from edgefed.export.cache import ensure_artifact
        from edgefed.models import prepare_model

        torch.set_num_threads(args.threads)
        try:
            lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
        except ValueError:
            ap.error(f"--lrs {args.lrs!r}: give numbers separated by commas, e.g. 5e-4,1e-3")
        from zo_convergence import read_template
        args.template = read_template(ap, args.template)
        t0 = time.time()
        prepare_model(args.model)
        art = ensure_artifact(args.model, args.trainable, TASK, template=args.template, progress=False)
        model = TorchModel(art, device="cpu", batch_size=args.batch, seq_len=args.seq_len)
        train, held = train_heldout_split(load_rotten_tomatoes(), heldout=args.heldout, seed=0)
        base = scored(model, held)
        _log(f"zero-shot: {base['accuracy']:.3f} / {base['loss']:.4f}")
        rows = []
        if args.readout_epochs > 0:
            scored_at = sorted({max(1, args.readout_epochs * k // 6) for k in range(1, 7)})
            rows += readout(model, train, held, base, args.readout_epochs, args.readout_lr, scored_at)
        for lr in lrs:
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                rows += backprop(model, train, held, base, lr, args.steps, args.evals, seed, args.batch)
        res = {"template": args.template, "model": args.model, "trainable": args.trainable,
               "n_heldout": len(held), "n_train": len(train), "batch": args.batch, "target": args.target,
               "zero_shot": base, "rows": rows, "seconds": time.time() - t0,
               "threads": args.threads, "command": " ".join(sys.argv)}
    if stores:
        _, held = train_heldout_split(load_rotten_tomatoes(), heldout=res["n_heldout"], seed=0)
        for label, _, db in stores:
            res.setdefault("jobs", []).append(score_store(label, db, held, res, args.threads))
    if args.json:  # after --store: the jobs' rows are kept too
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))
    res["marks"] = marks
    print_table(res)
    print_seed_summary(res)
    print_store_comparison(res)
    if args.plot:
        p = plot(res, Path(args.plot))
        if p:
            _log(f"plot: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
