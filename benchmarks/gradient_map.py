"""Where the gradient is at the start: which trainable tensors a ZO mask should perturb.

    python benchmarks/gradient_map.py [--template T] [--task sentiment|trec] [--batches 32]
        [--mask lora_B,v_proj\\.lora_B] [--json FILE] [--plot FILE]
    python benchmarks/gradient_map.py --model tiny --batches 2   # smoke run, < 1 min

A two-point ZO step with a direction z drawn in a subspace S (a `mask_tensors` regex) moves
the loss, in expectation, by -lr |g_S|^2 + lr^2/2 E[(z.g)^2 z'Hz]. Two models of the second
term give two predictions of the progress per forward pass at the best step, each as a multiple
of perturbing everything (plain MeZO):

- by dimension (L-smooth, the same curvature everywhere): |g_S|^2 / d_S, so dropping
  dimensions that carry no gradient pays (the classic argument for sparse ZO);
- by curvature: |g_S|^2 / tr(H_S), the trace of the loss Hessian's block on S (its effective
  dimension), so dropping dimensions pays only where they carry curvature and no gradient.

This measures g, the mean training gradient of the artifact's starting trainables, over
--batches random batches, and tr(H) per tensor by Hutchinson's estimator (z * Hz, Rademacher z
over one tensor group at a time, --probes per group and batch over --curv-batches batches:
Hessian-vector products by double backprop), on
the torch backend (a host's job: devices never run it). For each tensor group (a tensor name
with its layer number dropped) and each --mask it reports the shares of dimensions, |g|^2 and
tr(H), and both predictions. They describe the start only: the model moves, so check a choice
with benchmarks/zo_convergence.py (docs/results.md "Where the gradient is" has both).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402



def _log(msg: str) -> None:
    print(f"[gradient_map {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def mean_gradient(model, train, batches: int, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean gradient, mean squared per-batch gradient) of the training loss at the start."""
    import torch

    from edgefed.methods.fedavg import start_tensor

    flat = start_tensor(model)
    rng = np.random.default_rng(seed)
    g_sum = torch.zeros_like(flat)
    g2_sum = torch.zeros_like(flat)
    for i in range(batches):
        rows = rng.choice(len(train), size=min(batch, len(train)), replace=False)
        flat.grad = None
        model.loss_tensor(model.encode([train[j] for j in rows]), flat).backward()
        g = flat.grad.detach()
        g_sum += g
        g2_sum += g * g
        if (i + 1) % 8 == 0 or i + 1 == batches:
            _log(f"batch {i + 1}/{batches}")
    return (g_sum / batches).numpy().astype(np.float64), (g2_sum / batches).numpy().astype(np.float64)


def curvature(model, train, batches: int, probes: int, batch: int, seed: int,
              groups: list[np.ndarray]) -> np.ndarray:
    """Per coordinate, z * (Hz) averaged over `probes` Rademacher z per group and batch, z zero
    outside its group, over `batches` batches: summed over a tensor it estimates the trace of the
    tensor's diagonal block of the batch loss's Hessian without bias (Hutchinson). Probing one
    group at a time keeps other groups' blocks out of the noise (with z over everything, the
    cross terms of every pair of tensors land in each tensor's sum)."""
    import torch

    from edgefed.methods.fedavg import start_tensor

    flat = start_tensor(model)
    rng = np.random.default_rng(seed + 1)  # other batches than the gradient's
    gen = torch.Generator().manual_seed(seed)
    masks = []
    for idx in groups:
        m = torch.zeros(flat.shape, dtype=flat.dtype)
        m[torch.from_numpy(np.asarray(idx, dtype=np.int64))] = 1.0
        masks.append(m)
    acc = torch.zeros_like(flat)
    n = len(masks) * probes
    for i in range(batches):
        rows = rng.choice(len(train), size=min(batch, len(train)), replace=False)
        loss = model.loss_tensor(model.encode([train[j] for j in rows]), flat)
        (g,) = torch.autograd.grad(loss, flat, create_graph=True)
        k = 0
        for m in masks:
            for _ in range(probes):
                k += 1
                z = (torch.randint(0, 2, flat.shape, generator=gen).to(flat.dtype) * 2 - 1) * m
                (hz,) = torch.autograd.grad(g @ z, flat, retain_graph=k < n)
                acc += z * hz
        _log(f"curvature: batch {i + 1}/{batches} ({n} Hessian-vector products)")
    return (acc / (batches * probes)).detach().numpy().astype(np.float64)


def group_of(name: str) -> str:
    return re.sub(r"(layers|h|blocks)\.\d+\.", r"\1.*.", name)


def tensor_rows(tensors: list[dict], g: np.ndarray, g2: np.ndarray, zhz: np.ndarray | None = None) -> list[dict]:
    """Per tensor: its share of |g|^2 and of the dimensions, how much batches agree, and (with
    zhz, curvature()'s output) its share of tr(H)."""
    total, dims = float(np.sum(g * g)), int(g.size)
    trace = float(np.sum(zhz)) if zhz is not None else None
    rows = []
    for t in tensors:
        sl = slice(t["offset"], t["offset"] + t["numel"])
        energy = float(np.sum(g[sl] * g[sl]))
        rows.append({"name": t["name"], "numel": int(t["numel"]), "share": energy / total,
                     "dim_share": t["numel"] / dims,
                     # the mean gradient's energy over the per-batch gradient's: how much a batch agrees
                     "signal": energy / max(float(np.sum(g2[sl])), 1e-300),
                     "trace": float(np.sum(zhz[sl])) if zhz is not None else None,
                     # no shares of a trace that is not positive (the start sits at a saddle)
                     "curv_share": float(np.sum(zhz[sl])) / trace if trace and trace > 0 else None})
    return rows


def subset_row(label: str, rows: list[dict], keep) -> dict:
    chosen = [r for r in rows if keep(r["name"])]
    share = sum(r["share"] for r in chosen)
    dim_share = sum(r["dim_share"] for r in chosen)
    curv = None if any(r.get("curv_share") is None for r in rows) else sum(r["curv_share"] for r in chosen)
    trace = None if any(r.get("trace") is None for r in rows) else sum(r["trace"] for r in chosen)
    return {"subset": label, "tensors": len(chosen), "numel": sum(r["numel"] for r in chosen), "share": share,
            "trace": trace,
            "dim_share": dim_share, "predicted_x": share / dim_share if dim_share else 0.0, "curv_share": curv,
            # no prediction where the estimated curvature is not positive (noise, or a saddle's direction)
            "predicted_curv_x": share / curv if curv is not None and curv > 0 else None}


def subsets(rows: list[dict], masks: list[str]) -> list[dict]:
    out = [subset_row("all (plain MeZO)", rows, lambda n: True)]
    for m in masks:
        rx = re.compile(m)
        out.append(subset_row(f"mask_tensors={m}", rows, lambda n, rx=rx: bool(rx.search(n))))
    for grp in dict.fromkeys(group_of(r["name"]) for r in rows):
        out.append(subset_row(f"group {grp}", rows, lambda n, grp=grp: group_of(n) == grp))
    return out


def print_tables(res: dict, file=sys.stdout) -> None:
    total = res["subsets"][0].get("trace")
    curv = "; no curvature (--probes 0)"
    if res.get("probes") and total is not None:
        curv = (f"; tr(H) = {total:.4g} from {res['probes']} probes a group x {res['curv_batches']} batches"
                + ("" if total > 0 else " (not positive: the start is a saddle, so no curvature prediction)"))
    print(f"\n{res['model']} ({res['trainable']}), {res['task']}, template {res['template']!r}: mean gradient "
          f"over {res['batches']} batches of {res['batch']}{curv}\n", file=file)
    print("| subset | tensors | dimensions | share of dimensions | share of \\|g\\|^2 | tr(H) | share of tr(H) | "
          "predicted progress per forward, x plain MeZO: by dimension | by curvature |", file=file)
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", file=file)

    def cell(v, fmt):
        return "-" if v is None else format(v, fmt)
    for s in res["subsets"]:
        print(f"| {s['subset']} | {s['tensors']} | {s['numel']:,} | {s['dim_share']:.3f} | {s['share']:.3f} "
              f"| {cell(s.get('trace'), '.4g')} | {cell(s.get('curv_share'), '.3f')} | {s['predicted_x']:.2f} "
              f"| {cell(s.get('predicted_curv_x'), '.2f')} |", file=file)


def plot(res: dict, path: Path) -> Path | None:
    from edgefed.plotting import pyplot, save

    plt = pyplot()
    if plt is None:
        return None
    by: dict[str, dict[int, float]] = {}
    for r in res["tensors"]:
        m = re.search(r"(?:layers|h|blocks)\.(\d+)\.", r["name"])
        if m:
            by.setdefault(group_of(r["name"]), {})[int(m.group(1))] = r["share"]
    if not by:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    for grp, layers in by.items():
        xs = sorted(layers)
        ax.plot(xs, [layers[x] for x in xs], marker="o", ms=3, label=grp)
    ax.set_xlabel("layer")
    ax.set_ylabel("share of |g|^2 at the start")
    ax.set_title(f"Where the gradient is ({res['task']}, {res['trainable']})", fontsize=10)
    ax.legend(fontsize=7)
    return save(fig, path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m, or tiny (smoke run)")
    ap.add_argument("--trainable", default="lora:r=8,targets=q_proj,v_proj")
    ap.add_argument("--task", choices=["sentiment", "trec"], default="sentiment")
    ap.add_argument("--template", default=None, help="the task's template with {text}")
    ap.add_argument("--batches", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probes", type=int, default=2,
                    help="Hutchinson probes per tensor group and batch for tr(H) (0: no curvature, the gradient only)")
    ap.add_argument("--curv-batches", type=int, default=8, help="batches the curvature is averaged over")
    ap.add_argument("--mask", default=r"lora_B,v_proj\.lora_B,q_proj\.lora_B",
                    help="comma-separated mask_tensors regexes to predict for")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    if args.batches < 1 or args.curv_batches < 1 or args.probes < 0:
        ap.error("--batches and --curv-batches must be at least 1, --probes at least 0")
    from zo_convergence import read_template, task_artifact

    args.template = read_template(ap, args.template)
    masks = [m for m in args.mask.split(",") if m]
    for m in masks:
        try:
            re.compile(m)
        except re.error as e:
            ap.error(f"--mask {m!r} is not a regular expression: {e}")

    import torch

    from edgefed.backends.torch_model import TorchModel
    from edgefed.data import train_heldout_split
    from edgefed.export.artifact import read_manifest

    torch.set_num_threads(args.threads)
    # the artifact zo_convergence.py trains, so the map describes the runs it predicts
    art, rows, template = task_artifact(args.model, args.trainable, args.task, args.template,
                                        Path(f"runs/gradient-map-{time.strftime('%Y%m%d-%H%M%S')}"))
    train, _ = train_heldout_split(rows, heldout=500 if args.task == "sentiment" else 200, seed=0)
    model = TorchModel(art, device="cpu", batch_size=args.batch, seq_len=args.seq_len)
    t0 = time.time()
    g, g2 = mean_gradient(model, train, args.batches, args.batch, args.seed)
    if not np.any(g):
        raise SystemExit("the mean gradient is zero: no trainable moves the loss at the start")
    manifest = read_manifest(art)["trainable"]
    zhz = None
    if args.probes:
        by_group: dict[str, list] = {}
        for t in manifest:
            by_group.setdefault(group_of(t["name"]), []).append(np.arange(t["offset"], t["offset"] + t["numel"]))
        zhz = curvature(model, train, args.curv_batches, args.probes, args.batch, args.seed,
                        [np.concatenate(v) for v in by_group.values()])
    tensors = tensor_rows(manifest, g, g2, zhz)
    res = {"model": args.model, "trainable": args.trainable, "task": args.task, "template": template,
           "batches": args.batches, "batch": args.batch, "seq_len": args.seq_len, "seed": args.seed,
           "probes": args.probes, "curv_batches": args.curv_batches,
           "wall_s": time.time() - t0, "tensors": tensors, "subsets": subsets(tensors, masks)}
    print_tables(res)
    path = plot(res, Path(args.plot) if args.plot else Path("runs/gradient_map.png"))
    if path:
        _log(f"plot: {path}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
        _log(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
