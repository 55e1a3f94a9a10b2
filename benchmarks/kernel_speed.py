"""Seeded-perturbation kernel throughput against the baselines, measured in one run.

    python benchmarks/kernel_speed.py [--params 50000000] [--threads 0] [--repeats 5] [--json FILE]

Rows are element-updates per second (median of --repeats) over the same buffers: a
model-shaped list of float32 tensors holding --params elements. Baselines:
  torch-mezo   MeZO's perturbation: torch.manual_seed(s); z = torch.normal(0, 1, p.shape);
               p.add_(z, alpha=a), tensor by tensor (the buffers shared with torch).
  numpy-rng    numpy default_rng(s).standard_normal(...) + add, tensor by tensor.
  bandwidth    theta += c with the same threads: one read and one write per element,
               the memory bound no in-place kernel can beat.
Targets (2-core dev machine, 50M params): normal perturb >= 7x torch-mezo and >= 40% of
bandwidth; replay of 16 seeds no slower than 16 separate perturbs.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__file__)))
from edgefed import kernels  # noqa: E402


def model_shaped(n: int) -> list[np.ndarray]:
    """Tensors shaped like a small transformer's (big embedding, many mid-size matrices)."""
    sizes, left = [], n
    emb = n // 5
    sizes.append(emb)
    left -= emb
    while left > 0:
        s = min(left, 576 * 1536)
        sizes.append(s)
        left -= s
    return [np.zeros(s, np.float32) for s in sizes]


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: page faults, thread start-up, lazy init
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=int, default=50_000_000)
    ap.add_argument("--threads", type=int, default=0, help="kernel threads, 0 = all cores")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--replay-seeds", type=int, default=16)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)

    kernels.set_num_threads(args.threads)
    bufs = model_shaped(args.params)
    n = args.params
    k = args.replay_seeds
    seeds = list(range(1000, 1000 + k))
    coeffs = [1e-3 / (j + 1) for j in range(k)]
    rows: dict[str, dict] = {}

    def row(name, seconds, updates_per_elem=1, note=""):
        rows[name] = {"seconds": seconds, "elems_per_s": n * updates_per_elem / seconds, "note": note}

    if kernels.backend() != "cpp":
        print("WARNING: C++ kernels not built; measuring the numpy reference", file=sys.stderr)

    ext = kernels._ext
    if ext is not None:
        row("bandwidth (theta += c)", timed(lambda: ext.add_scalar(bufs, 1e-7), args.repeats),
            note="memory bound, same threads")
    row("perturb normal", timed(lambda: kernels.perturb(bufs, 7, 1e-3, "normal"), args.repeats))
    row("perturb rademacher", timed(lambda: kernels.perturb(bufs, 7, 1e-3, "rademacher"), args.repeats))
    row("zo_update normal", timed(lambda: kernels.zo_update(bufs, 7, 1e-3, 1e-4, 0.5), args.repeats))
    row(f"replay {k} seeds", timed(lambda: kernels.replay(bufs, seeds, coeffs), args.repeats), k,
        note="element-updates/s")

    # every other SIMD path this CPU runs (one binary carries them all; the default is the widest)
    active = kernels.simd_path().split("+")[0]
    for path, ok in kernels.simd_paths():
        if ok and path != active:
            kernels.set_simd_path(path)
            try:
                row(f"perturb normal [{path}]", timed(lambda: kernels.perturb(bufs, 7, 1e-3, "normal"), args.repeats),
                    note=f"SIMD path {path} (EDGEFED_SIMD={path})")
            finally:
                kernels.set_simd_path(active)

    def separate():
        for s, c in zip(seeds, coeffs):
            kernels.perturb(bufs, s, c)
    row(f"{k} separate perturbs", timed(separate, max(1, args.repeats // 2)), k, note="element-updates/s")

    def numpy_rng():
        for j, b in enumerate(bufs):
            b += np.float32(1e-3) * np.random.default_rng(j).standard_normal(b.size, dtype=np.float32)
    row("numpy-rng baseline", timed(numpy_rng, args.repeats), note="default_rng().standard_normal + add")

    try:
        import torch
        torch.set_num_threads(max(1, kernels.get_num_threads()))
        tens = [torch.from_numpy(b) for b in bufs]

        def mezo():
            torch.manual_seed(7)
            for p in tens:
                z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
                p.add_(z, alpha=1e-3)
        row("torch-mezo baseline", timed(mezo, args.repeats), note=f"torch {torch.__version__}")
    except ImportError:
        print("torch not installed: no torch-mezo baseline", file=sys.stderr)

    base = rows.get("torch-mezo baseline", {}).get("elems_per_s")
    bw = rows.get("bandwidth (theta += c)", {}).get("elems_per_s")
    npr = rows["numpy-rng baseline"]["elems_per_s"]
    print(f"\nEdgeFed kernels: {n / 1e6:.0f}M float32 params in {len(bufs)} tensors, "
          f"{kernels.get_num_threads()} threads, backend={kernels.backend()}, SIMD {kernels.simd_path()}, {platform.machine()}")
    hdr = f"{'kernel':<26}{'M elem/s':>10}{'x torch':>9}{'x numpy':>9}{'% bandw':>9}  note"
    print(hdr)
    print("-" * len(hdr))
    for name, r in rows.items():
        e = r["elems_per_s"]
        r["x_torch_mezo"] = e / base if base else None
        r["x_numpy_rng"] = e / npr
        r["frac_bandwidth"] = e / bw if bw else None
        fmt = lambda v, f: f.format(v) if v is not None else "-"  # noqa: E731
        print(f"{name:<26}{e / 1e6:>10.0f}{fmt(r['x_torch_mezo'], '{:>9.2f}')}"
              f"{fmt(r['x_numpy_rng'], '{:>9.2f}')}{fmt(r['frac_bandwidth'] and 100 * r['frac_bandwidth'], '{:>8.0f}%')}  {r['note']}")

    replay_ratio = rows[f"{k} separate perturbs"]["seconds"] / rows[f"replay {k} seeds"]["seconds"]
    targets = {
        "normal perturb >= 7x torch-mezo": (rows["perturb normal"]["x_torch_mezo"], 7.0),
        "normal perturb >= 40% of bandwidth": (rows["perturb normal"]["frac_bandwidth"], 0.40),
        f"replay {k} seeds >= 1x {k} separate perturbs": (replay_ratio, 1.0),
    }
    print()
    for name, (got, want) in targets.items():
        status = "n/a" if got is None else ("PASS" if got >= want else "MISS")
        print(f"  {status:<5}{name}: {'-' if got is None else f'{got:.2f}'}")
    result = {"params": n, "tensors": len(bufs), "threads": kernels.get_num_threads(),
              "backend": kernels.backend(), "simd": kernels.simd_path(), "machine": platform.machine(), "rows": rows,
              "replay_speedup_vs_separate": replay_ratio,
              "targets": {k_: {"value": v, "target": t, "met": v is not None and v >= t}
                          for k_, (v, t) in targets.items()}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
