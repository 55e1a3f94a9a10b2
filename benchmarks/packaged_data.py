"""Real public data that ships inside a PyPI package: two BIG-bench tasks from the `bigbench`
1.0.0 source distribution (358 MB, read straight out of the .tar.gz; never pip-installed).

    python benchmarks/packaged_data.py [--out DIR] [--multiemo-n 3000] [--qasc-n 2000] [--seed 0]

* MultiEmo-EN (Kocon et al., 2021; CC BY 4.0): machine-translated Polish consumer reviews
  (hotels, medicine, products, school reviews), one sentence a row, 4 classes: negative,
  positive, neutral, ambivalent (`multiemo/{domain}_sentence_en/task.json`, label = the argmax
  of `target_scores`). 57k sentences; texts that occur twice keep one row, texts that occur
  with two different labels are dropped; `group` = the domain.
* QASC answer generation (Khot et al., 2020; CC BY 4.0; Natural Instructions subtask 041):
  "Fact: ...\\nQuestion: ..." -> a short answer (usually 1-4 words) that lies within the fact.
  Mapped to SFTExample(instruction=QASC_INSTRUCTION, input="Fact: ...\\nQuestion: ...",
  response=the first target).

`locate_bigbench()` finds the sdist (an existing file, or `pip download --no-deps
bigbench==1.0.0` into the cache once); the few task.json files used are extracted next to it
the first time, so later reads take milliseconds. `multiemo(n, seed)` / `qasc(n, seed)` give
deterministic subsamples as edgefed records; `write()` writes them as JSONL that
`edgefed simulate --data`, `edgefed zero-shot --data` and `edgefed export --data` read back.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from edgefed.data import Example, SFTExample, write_jsonl  # noqa: E402

__all__ = ["locate_bigbench", "multiemo", "qasc", "write", "MULTIEMO_LABELS", "QASC_INSTRUCTION",
           "BIGBENCH_VERSION"]

BIGBENCH_VERSION = "1.0.0"
SDIST = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
_ROOT = f"bigbench-{BIGBENCH_VERSION}/bigbench/benchmark_tasks/"
MULTIEMO_DOMAINS = ("hotels", "medicine", "products", "reviews")
MULTIEMO_LABELS = ("negative", "positive", "neutral", "ambivalent")
_MULTIEMO = {d: f"multiemo/{d}_sentence_en/task.json" for d in MULTIEMO_DOMAINS}
_QASC = "natural_instructions/subtask041_qasc_answer_generation/task.json"
QASC_INSTRUCTION = "Answer the question using the fact."


def _log(msg: str) -> None:
    print(f"[packaged_data] {msg}", file=sys.stderr, flush=True)


def default_download_dir() -> Path:
    from edgefed.models import cache_dir
    return cache_dir() / "datasets"


def locate_bigbench(download_dir: str | os.PathLike | None = None, sdist: str | os.PathLike | None = None) -> Path:
    """The bigbench sdist: `sdist` (or $EDGEFED_BIGBENCH_SDIST) when given, else
    DOWNLOAD_DIR/bigbench-1.0.0.tar.gz (default ~/.cache/edgefed/datasets), fetched once with
    `pip download --no-deps bigbench==1.0.0` (PyPI, 358 MB) when it is not there."""
    given = sdist or os.environ.get("EDGEFED_BIGBENCH_SDIST")
    if given:
        p = Path(given).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"bigbench sdist {p} does not exist")
        return p
    d = Path(download_dir).expanduser() if download_dir else default_download_dir()
    p = d / SDIST
    if p.is_file():
        return p
    d.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(d), f"bigbench=={BIGBENCH_VERSION}"]
    _log(f"{p} not found: downloading it once from PyPI (358 MB):\n  {' '.join(cmd)}")
    subprocess.run(cmd, check=True)
    if not p.is_file():
        raise FileNotFoundError(f"pip download finished but {p} is not there")
    return p


def _task_files(members: tuple[str, ...], download_dir=None, sdist=None) -> dict[str, dict]:
    """{member: parsed task.json}, extracted once next to the sdist's cache (bigbench-1.0.0/...)."""
    cache = (Path(download_dir).expanduser() if download_dir else default_download_dir()) / f"bigbench-{BIGBENCH_VERSION}"
    if any(not (cache / m).is_file() for m in members):  # one pass extracts every file used here
        missing = [m for m in (*_MULTIEMO.values(), _QASC, *members) if not (cache / m).is_file()]
        missing = list(dict.fromkeys(missing))
        src = locate_bigbench(download_dir, sdist)
        _log(f"reading {len(missing)} task file(s) out of {src} (one pass over the archive, ~7 s)")
        want = {_ROOT + m: m for m in missing}
        found = set()
        with tarfile.open(src, "r:gz") as tar:
            for info in tar:
                m = want.get(info.name)
                if m is None:
                    continue
                out = cache / m
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_name(out.name + ".partial")
                tmp.write_bytes(tar.extractfile(info).read())
                tmp.rename(out)
                found.add(m)
                if len(found) == len(want):
                    break
        lost = sorted(set(missing) - found)
        if lost:
            raise FileNotFoundError(f"{src} lacks {lost}")
    return {m: json.loads((cache / m).read_text(encoding="utf-8")) for m in members}


def _label(scores: dict) -> str:
    best = max(scores.values())
    top = [k for k, v in scores.items() if v == best]
    if len(top) != 1 or best <= 0:
        raise ValueError(f"no single target label in {scores}")
    return top[0]


def multiemo_all(download_dir=None, sdist=None) -> list[Example]:
    """Every MultiEmo-EN sentence of the four domains, deduplicated (see the module doc), in
    file order; origin "domain:index"."""
    files = _task_files(tuple(_MULTIEMO.values()), download_dir, sdist)
    labels: dict[str, set[str]] = defaultdict(set)
    rows: list[tuple[str, str, str, str]] = []
    for dom in MULTIEMO_DOMAINS:
        for i, ex in enumerate(files[_MULTIEMO[dom]]["examples"]):
            text = " ".join(ex["input"].split())
            lab = _label(ex["target_scores"])
            if lab not in MULTIEMO_LABELS:
                raise ValueError(f"multiemo {dom}:{i}: unexpected label {lab!r}")
            labels[text].add(lab)
            rows.append((text, lab, dom, f"multiemo/{dom}_sentence_en:{i}"))
    seen: set[str] = set()
    out = []
    for text, lab, dom, origin in rows:
        if not text or len(labels[text]) > 1 or text in seen:
            continue
        seen.add(text)
        out.append(Example(text, lab, group=dom, origin=origin))
    return out


def _subsample(rows: list, n: int | None, seed: int) -> list:
    """n rows drawn uniformly without replacement (seeded), kept in source order."""
    if n is None or n >= len(rows):
        return list(rows)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    keep = np.sort(np.random.default_rng(seed).choice(len(rows), size=n, replace=False))
    return [rows[int(i)] for i in keep]


def multiemo(n: int | None = 3000, seed: int = 0, download_dir=None, sdist=None) -> list[Example]:
    """A deterministic uniform subsample of n MultiEmo-EN sentences (natural label mix)."""
    return _subsample(multiemo_all(download_dir, sdist), n, seed)


def _clean(s: str) -> str:
    """Trailing spaces before newlines removed ("fact. \\nQuestion" -> "fact.\\nQuestion")."""
    return re.sub(r"[ \t]+\n", "\n", s).strip()


def qasc_all(download_dir=None, sdist=None) -> list[SFTExample]:
    files = _task_files((_QASC,), download_dir, sdist)
    out, seen = [], set()
    for i, ex in enumerate(files[_QASC]["examples"]):
        tgt = ex["target"]
        tgt = tgt[0] if isinstance(tgt, list) else tgt
        inp, resp = _clean(ex["input"]), str(tgt).strip()
        if not inp or not resp or inp in seen:
            continue
        seen.add(inp)
        out.append(SFTExample(instruction=QASC_INSTRUCTION, input=inp, response=resp,
                              origin=f"natural_instructions/subtask041_qasc:{i}"))
    return out


def qasc(n: int | None = 2000, seed: int = 0, download_dir=None, sdist=None) -> list[SFTExample]:
    """A deterministic uniform subsample of n QASC rows as SFTExamples."""
    return _subsample(qasc_all(download_dir, sdist), n, seed)


def write(path: str | os.PathLike, records) -> Path:
    """Records as JSONL (edgefed.data.write_jsonl): {"text","label","group"} or
    {"instruction","input","response"}, read back by every `--data` option."""
    return write_jsonl(path, records)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/packaged-data")
    ap.add_argument("--multiemo-n", type=int, default=3000)
    ap.add_argument("--qasc-n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--download-dir", default=None, help="default ~/.cache/edgefed/datasets")
    ap.add_argument("--bigbench", default=None, help="an existing bigbench-1.0.0.tar.gz")
    args = ap.parse_args(argv)
    out = Path(args.out)
    me = multiemo(args.multiemo_n, args.seed, args.download_dir, args.bigbench)
    qa = qasc(args.qasc_n, args.seed, args.download_dir, args.bigbench)
    p1, p2 = write(out / "multiemo.jsonl", me), write(out / "qasc.jsonl", qa)
    counts = {lab: sum(e.label == lab for e in me) for lab in MULTIEMO_LABELS}
    print(f"{p1}: {len(me)} rows {counts}")
    print(f"{p2}: {len(qa)} rows")
    print("\nfederated runs on them:")
    print(f"  edgefed simulate --data {p1} --task classify:labels=auto --split dirichlet --alpha 0.5 --devices 4")
    print(f"  edgefed simulate --data {p2} --task sft --split iid --devices 4 --generate-n 40")


if __name__ == "__main__":
    main()
