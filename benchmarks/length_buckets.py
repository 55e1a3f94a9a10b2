"""Local ZO training time with length buckets (`--param length_buckets=M`) against plain draws.

    python benchmarks/length_buckets.py [--buckets 1,4,8] [--steps 16] [--blocks 3] [--json FILE]

A device batch is padded to its longest row and a forward pass costs about its padded tokens.
With length_buckets=M a device draws M batches' rows at once and groups them by length
(edgefed.batching). This times the device's own training loop (LocalTrainer: encode, two ONNX
forwards, kernel passes) on SmolLM2-135M-Instruct, LoRA r=8 (q,v) with B only (the demo's
recipe), one ONNX Runtime thread and batch 8 (as each demo device runs), on the sentiment
training rows, for each template. The baseline is M = 1 in the same run: blocks of `--steps`
steps alternate between the settings, so drift in the machine's speed hits each alike.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TEMPLATES = {
    "plain": "SENTIMENT_TEMPLATE",  # the demo's default (edgefed.data)
    "instr": "Classify the sentiment of this movie review.\nReview: {text}\nOverall, the sentiment of this review is",
}


def _log(msg: str) -> None:
    print(f"[length_buckets {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(template: str, buckets: list[int], steps: int, blocks: int, batch: int, threads: int) -> list[dict]:
    import numpy as np

    from edgefed import kernels
    from edgefed.data import SENTIMENT_TEMPLATE, load_rotten_tomatoes
    from edgefed.export.cache import ensure_artifact
    from edgefed.runtime import DeviceModel
    from edgefed.trainer import LocalTrainer
    from edgefed.zo import SeedPool, ZOConfig

    text = TEMPLATES[template]
    # the demo's artifact (the same cache key): `edgefed demo [--template ...]` exports the same one
    art = ensure_artifact(task="classify:labels=positive,negative",
                          template=SENTIMENT_TEMPLATE if text == "SENTIMENT_TEMPLATE" else text, progress=False)
    kernels.set_num_threads(threads)
    model = DeviceModel(art, threads=threads, batch_size=batch, seq_len=64, check_memory=False)
    rows = list(load_rotten_tomatoes())
    plain_tokens = float(np.mean([model.row_length(r) for r in rows[:2000]]))
    encode = model.encode
    shapes: list[int] = []

    def counting_encode(recs):
        b = encode(recs)
        shapes.append(int(b.input_ids.shape[1]))
        return b
    model.encode = counting_encode
    out = {m: {"seconds": [], "padded": []} for m in buckets}
    model.loss(encode(rows[:batch]))  # warm-up: ONNX Runtime's first pass allocates
    for blk in range(blocks):
        for m in buckets:
            model.reset_params()
            shapes.clear()
            cfg = ZOConfig(lr=4e-3, eps=1e-3, length_buckets=m)
            t = time.perf_counter()
            LocalTrainer(model, SeedPool(blk, 4096), cfg, progress=False).train(rows, steps, batch_size=batch,
                                                                                 seed=blk)
            out[m]["seconds"].append((time.perf_counter() - t) / steps)
            out[m]["padded"].extend(shapes)
            _log(f"{template} M={m} block {blk}: {out[m]['seconds'][-1]:.3f} s a step, "
                 f"{np.mean(shapes):.1f} tokens a batch")
    base = statistics.median(out[buckets[0]]["seconds"])
    return [{"template": template, "buckets": m, "row_tokens": plain_tokens,
             "padded_tokens": float(np.mean(out[m]["padded"])),
             "step_s": statistics.median(out[m]["seconds"]), "step_s_all": out[m]["seconds"],
             "speedup": base / statistics.median(out[m]["seconds"])} for m in buckets]


def table(rows: list[dict]) -> str:
    lines = ["| template | length_buckets | tokens a row | padded tokens a batch row | s a step (median) | "
             "speed vs length_buckets=1 |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['template']} | {r['buckets']} | {r['row_tokens']:.1f} | {r['padded_tokens']:.1f} | "
                     f"{r['step_s']:.3f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--buckets", default="1,4,8", help="settings to time; the first is the baseline (1)")
    p.add_argument("--templates", default="plain,instr", help=f"of {', '.join(TEMPLATES)}")
    p.add_argument("--steps", type=int, default=16, help="ZO steps a block (two forwards each)")
    p.add_argument("--blocks", type=int, default=3, help="blocks per setting, interleaved")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (a demo device: 1)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    buckets = [int(x) for x in a.buckets.split(",")]
    if buckets[0] != 1:
        p.error("--buckets must start with 1, the baseline")
    rows = []
    for t in a.templates.split(","):
        if t not in TEMPLATES:
            p.error(f"--templates: {t!r} is not one of {', '.join(TEMPLATES)}")
        rows += run(t, buckets, a.steps, a.blocks, a.batch, a.threads)
    print(table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
