"""On-device ZO step cost for SmolLM2-135M, batch 8 x 64 tokens, 2 threads.

    python benchmarks/device_step.py [--modes full,lora,prompt] [--steps 3] [--json FILE]

For each trainable set (full, LoRA r=8 on q,v, 20-token soft prompt):
  - ZO step time (2 ONNX forwards + 3 kernel passes) as a multiple of one ONNX forward
    (targets: full <= 2.4x, LoRA and prompt <= 2.1x);
  - against a MeZO-style torch step (torch forwards, torch.normal perturbations per tensor,
    the reference optimizer's habit), full only (target: ZO >= 2x faster);
  - peak RSS of ZO training vs inference alone (target <= 1.2x) and vs torch backprop with
    AdamW on the same trainables (reported).
Each peak-RSS figure comes from its own subprocess (peak RSS only ever grows).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SPECS = {"full": "full", "lora": "lora:r=8,targets=q_proj,v_proj", "prompt": "prompt:tokens=20"}
TASK = "classify:labels=positive,negative"
B, T, THREADS = 8, 64, 2


def _batch_examples():
    from edgefed.data import load_rotten_tomatoes
    ex = load_rotten_tomatoes()
    # Long snippets so every row fills the 64 tokens.
    return sorted(ex, key=lambda e: -len(e.text))[:B]


def _median_time(fn, n):
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def worker_ort(mode: str, kind: str, steps: int) -> dict:
    from edgefed import kernels
    from edgefed.export.cache import ensure_artifact
    from edgefed.runtime import DeviceModel, peak_rss_bytes
    from edgefed.zo import two_point_step

    art = ensure_artifact(trainable=SPECS[mode], task=TASK, progress=False)
    kernels.set_num_threads(THREADS)
    m = DeviceModel(art, threads=THREADS, batch_size=B, seq_len=T, check_memory=False)
    batch = m.encode(_batch_examples())
    assert batch.input_ids.shape == (B, T), batch.input_ids.shape
    out = {"mode": mode, "kind": kind, "n_trainable": m.n_trainable}
    fwd, zo = [], []
    seeds = iter(range(10_000))
    m.loss(batch)  # warm-up
    for _ in range(steps):  # interleaved, so load from elsewhere hits both alike
        t0 = time.perf_counter()
        m.loss(batch)
        fwd.append(time.perf_counter() - t0)
        if kind == "zo":
            t0 = time.perf_counter()
            two_point_step(lambda: m.loss(batch), m.buffers, next(seeds), 0, 1e-3, 1e-7)
            zo.append(time.perf_counter() - t0)
    out["forward_s"] = statistics.median(fwd)
    if zo:
        out["zo_step_s"] = statistics.median(zo)
    out["peak_rss"] = peak_rss_bytes()
    return out


def _torch_model(mode: str):
    import torch
    from edgefed.models import load_model
    model, tok = load_model("smollm2-135m")
    model.set_attn_implementation("eager")
    torch.set_num_threads(THREADS)
    for p in model.parameters():
        p.requires_grad_(mode == "full")
    trainables = [p for p in model.parameters()] if mode == "full" else []
    prompt = None
    if mode == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        trainables = [p for p in model.parameters() if p.requires_grad]
    elif mode == "prompt":
        emb = model.get_input_embeddings().weight
        prompt = torch.nn.Parameter(emb[:20].detach().clone())
        trainables = [prompt]
    return model, tok, trainables, prompt


def _torch_loss(model, tok, prompt, texts, label_ids):
    import torch
    enc = tok([f"Review: {t}\nSentiment:" for t in texts], return_tensors="pt", padding="max_length",
              truncation=True, max_length=T)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if prompt is not None:
        emb = model.get_input_embeddings()(ids)
        emb = torch.cat([prompt.unsqueeze(0).expand(ids.shape[0], -1, -1), emb], 1)
        mask = torch.cat([torch.ones(ids.shape[0], prompt.shape[0], dtype=mask.dtype), mask], 1)
        logits = model(inputs_embeds=emb, attention_mask=mask).logits
    else:
        logits = model(input_ids=ids, attention_mask=mask).logits
    last = mask.sum(1) - 1
    lab = logits[torch.arange(ids.shape[0]), last][:, label_ids]
    return torch.nn.functional.cross_entropy(lab, torch.zeros(ids.shape[0], dtype=torch.long))


def worker_torch(mode: str, kind: str, steps: int) -> dict:
    import torch
    from edgefed.runtime import peak_rss_bytes
    model, tok, params, prompt = _torch_model(mode)  # noqa: F841
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = [e.text for e in _batch_examples()]
    label_ids = [tok(" positive").input_ids[0], tok(" negative").input_ids[0]]
    out = {"mode": mode, "kind": kind}
    if kind == "mezo":
        # The reference optimizer's step: perturb by regenerating torch.normal per tensor.
        def perturb(seed, scale):
            torch.manual_seed(seed)
            for p in params:
                z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
                p.data.add_(z, alpha=scale)

        def step(seed=[0]):
            seed[0] += 1
            with torch.no_grad():
                perturb(seed[0], 1e-3)
                lp = _torch_loss(model, tok, prompt, texts, label_ids)
                perturb(seed[0], -2e-3)
                lm = _torch_loss(model, tok, prompt, texts, label_ids)
                perturb(seed[0], 1e-3)
                g = float(lp - lm) / 2e-3
                perturb(seed[0], -1e-7 * g)
        out["mezo_step_s"] = _median_time(step, steps)
    else:
        opt = torch.optim.AdamW(params, lr=1e-5)

        def step():
            opt.zero_grad()
            _torch_loss(model, tok, prompt, texts, label_ids).backward()
            opt.step()
        out["backprop_step_s"] = _median_time(step, max(1, steps - 1))
    out["peak_rss"] = peak_rss_bytes()
    return out


def run_worker(mode, kind, steps) -> dict:
    r = subprocess.run([sys.executable, __file__, "--worker", kind, "--modes", mode, "--steps", str(steps)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"worker {kind}/{mode} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="full,lora,prompt")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    if args.worker:
        fn = worker_ort if args.worker in ("infer", "zo") else worker_torch
        print(json.dumps(fn(modes[0], args.worker, args.steps)))
        return {}

    from edgefed.export.cache import ensure_artifact
    for mode in modes:  # export first, outside the timed workers
        print(f"artifact {mode}: {ensure_artifact(trainable=SPECS[mode], task=TASK)}", file=sys.stderr)
    rows = {}
    for mode in modes:
        print(f"measuring {mode} ...", file=sys.stderr)
        infer = run_worker(mode, "infer", args.steps)
        zo = run_worker(mode, "zo", args.steps)
        bp = run_worker(mode, "backprop", args.steps)
        row = {"n_trainable": zo["n_trainable"], "forward_s": zo["forward_s"], "zo_step_s": zo["zo_step_s"],
               "zo_step_x_forward": zo["zo_step_s"] / zo["forward_s"],
               "rss_infer_mb": infer["peak_rss"] / 2**20, "rss_zo_mb": zo["peak_rss"] / 2**20,
               "rss_backprop_mb": bp["peak_rss"] / 2**20, "backprop_step_s": bp["backprop_step_s"]}
        row["rss_zo_x_infer"] = zo["peak_rss"] / infer["peak_rss"]
        row["rss_zo_x_backprop"] = zo["peak_rss"] / bp["peak_rss"]
        if mode == "full":
            mz = run_worker(mode, "mezo", max(2, args.steps - 1))
            row["torch_mezo_step_s"] = mz["mezo_step_s"]
            row["speedup_vs_torch_mezo"] = mz["mezo_step_s"] / zo["zo_step_s"]
            row["rss_torch_mezo_mb"] = mz["peak_rss"] / 2**20
        rows[mode] = row

    print(f"\nSmolLM2-135M, batch {B} x {T}, {THREADS} threads (ratios; seconds are this machine's)")
    hdr = (f"{'mode':<8}{'trainable':>12}{'fwd s':>8}{'ZO s':>8}{'ZO/fwd':>8}{'vs MeZO':>9}"
           f"{'RSS ZO MB':>11}{'ZO/inf':>8}{'ZO/bp':>7}")
    print(hdr)
    print("-" * len(hdr))
    for mode, r in rows.items():
        vs = f"{r['speedup_vs_torch_mezo']:.2f}x" if "speedup_vs_torch_mezo" in r else "-"
        print(f"{mode:<8}{r['n_trainable']:>12,}{r['forward_s']:>8.2f}{r['zo_step_s']:>8.2f}"
              f"{r['zo_step_x_forward']:>8.2f}{vs:>9}{r['rss_zo_mb']:>11.0f}{r['rss_zo_x_infer']:>8.2f}"
              f"{r['rss_zo_x_backprop']:>7.2f}")
    targets = []
    for mode, r in rows.items():
        lim = 2.4 if mode == "full" else 2.1
        targets.append((f"{mode}: ZO step <= {lim}x forward", r["zo_step_x_forward"], lim, "le"))
        targets.append((f"{mode}: ZO peak RSS <= 1.2x inference", r["rss_zo_x_infer"], 1.2, "le"))
    if "full" in rows:
        targets.append(("full: >= 2x faster than MeZO-style torch", rows["full"]["speedup_vs_torch_mezo"], 2.0, "ge"))
    print()
    for name, v, lim, op in targets:
        ok = v <= lim if op == "le" else v >= lim
        print(f"  {'PASS' if ok else 'MISS':<5}{name}: {v:.2f}")
    result = {"batch": [B, T], "threads": THREADS, "rows": rows,
              "targets": {n: {"value": v, "limit": lim, "met": (v <= lim if op == "le" else v >= lim)}
                          for n, v, lim, op in targets}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
