"""Does forward-only training of SmolLM2-135M learn? Two checks:

    python benchmarks/learning_check.py [--modes lora,full] [--heldout 400] [--json FILE]
    python benchmarks/learning_check.py --tasks multiemo,qasc [--json FILE]

--modes (centralised, Rotten Tomatoes): two-point ZO (MeZO) on the device runtime (ONNX Runtime
+ the C++ kernels, no torch in the loop), label words " positive" / " negative", template
edgefed.data.SENTIMENT_TEMPLATE. Prints zero-shot and trained accuracy on a balanced held-out
split, the paired gain with its 95% interval, and held-out loss.

--tasks (federated, real public data shipped inside the `bigbench` PyPI sdist, read by
benchmarks/packaged_data.py): for each task
  1. zero-shot: candidate templates scored with `edgefed zero-shot`'s code on a validation
     sample disjoint from the held-out set (classify: accuracy; sft: loss); the best is kept;
  2. the SmolLM2-135M LoRA r=8 (q,v) artifact is exported with that template;
  3. FedKSeed over 4 virtual devices (threads sharing one ONNX graph) through the real server
     and device agents over the in-process transport (edgefed.federation.run_federation, as
     `edgefed simulate` runs it), Dirichlet(0.5) label-skew split for multiemo, iid for qasc;
  4. held-out metrics before/after on the same rows with paired 95% intervals: multiemo
     (4-class MultiEmo-EN sentiment) accuracy and macro-F1; qasc (QASC answer generation)
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

DEFAULTS = {  # per trainable set: spec, lr, eps, steps (DESIGN.md: lr 1e-2 diverges for LoRA)
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="lora,full")
    ap.add_argument("--steps", type=int, default=None, help="override the per-mode default")
    ap.add_argument("--heldout", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = [run(m, args.steps, args.heldout, args.batch, args.threads, args.seed) for m in args.modes.split(",")]
    print(f"\n{'mode':<7}{'params':>12}{'steps':>6}{'acc before':>11}{'acc after':>10}{'gain (95% CI)':>26}"
          f"{'loss before':>12}{'loss after':>11}{'s/step':>7}")
    for r in rows:
        ci = f"{r['acc_gain'] * 100:+.2f} [{r['acc_ci_low'] * 100:+.2f},{r['acc_ci_high'] * 100:+.2f}]"
        print(f"{r['mode']:<7}{r['n_trainable']:>12,}{r['steps']:>6}{r['acc_before']:>11.4f}{r['acc_after']:>10.4f}"
              f"{ci:>26}{r['loss_before']:>12.4f}{r['loss_after']:>11.4f}{r['seconds_per_step']:>7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
