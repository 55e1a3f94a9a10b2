"""Deterministic train/held-out and federated splits for any record type (numpy + stdlib).

Label-aware splits (balanced held-out, Dirichlet) need `Example` records; SFT and preference
records have no label, so they get plain random (iid) or natural (group) partitions.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Sequence, TypeVar

import numpy as np

from .errors import DataError
from .labels import label_set
from .records import Example

__all__ = ["train_heldout_split", "iid_split", "dirichlet_split", "group_split", "split_examples",
           "SPLIT_KINDS"]

log = logging.getLogger(__name__)
R = TypeVar("R")
SPLIT_KINDS = ("iid", "dirichlet", "group")


def _labelled(examples: Sequence) -> bool:
    return len(examples) > 0 and all(isinstance(e, Example) for e in examples)


def _by_label(examples: Sequence[Example]) -> dict[str, list[int]]:
    idx: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        idx[e.label].append(i)
    return {lab: idx[lab] for lab in label_set(examples)}


def _check_n(n: int, examples: Sequence) -> None:
    if not 1 <= n <= len(examples):
        raise ValueError(f"need 1 <= n <= {len(examples)} (the number of examples), got n={n}")


def _quotas(sizes: dict[str, int], heldout: int) -> dict[str, int]:
    """Deal `heldout` slots round-robin over labels; each label keeps >= 1 example for training."""
    cap = {lab: n - 1 for lab, n in sizes.items()}
    if heldout > sum(cap.values()):
        raise ValueError(f"heldout={heldout} is too large: {len(sizes)} labels with "
                         f"{sum(sizes.values())} examples can hold out at most {sum(cap.values())} "
                         f"(each label keeps at least one for training)")
    quota = dict.fromkeys(sizes, 0)
    left = heldout
    while left:
        for lab in sizes:
            if left and quota[lab] < cap[lab]:
                quota[lab] += 1
                left -= 1
    fair = heldout // len(sizes)
    short = {lab: q for lab, q in quota.items() if q < fair}
    if short:
        log.warning("held-out split not balanced: %s have too few examples (held out %s, keeping "
                    "1+ each for training); other labels fill the %d held-out slots",
                    sorted(short), [short[k] for k in sorted(short)], heldout)
    return quota


def train_heldout_split(examples: Sequence[R], heldout: int = 400,
                        seed: int = 0) -> tuple[list[R], list[R]]:
    """Deterministic split into (train, held-out). For `Example`s the held-out side is balanced
    per label (round-robin quota, so any `heldout` works); other records: plain random.
    Train keeps the input order; held-out order is shuffled."""
    if not 0 <= heldout < len(examples):
        raise ValueError(f"need 0 <= heldout < {len(examples)} (the number of examples), got {heldout}")
    rng = np.random.default_rng(seed)
    if _labelled(examples):
        groups = _by_label(examples)
        quota = _quotas({lab: len(ix) for lab, ix in groups.items()}, heldout)
        held: set[int] = set()
        for lab, idx in groups.items():
            held.update(int(i) for i in rng.permutation(idx)[:quota[lab]])
    else:
        held = {int(i) for i in rng.permutation(len(examples))[:heldout]}
    # Shuffled so label runs don't align with batch boundaries.
    held_list = [examples[i] for i in rng.permutation(sorted(held))]
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, held_list


def iid_split(examples: Sequence[R], n: int, seed: int = 0) -> list[list[R]]:
    """Shuffle and cut into n near-equal shards (any record type)."""
    _check_n(n, examples)
    perm = np.random.default_rng(seed).permutation(len(examples))
    return [[examples[i] for i in part] for part in np.array_split(perm, n)]


def dirichlet_split(examples: Sequence[Example], n: int, alpha: float = 0.5,
                    seed: int = 0) -> list[list[Example]]:
    """Label-skew non-IID split: each label's examples are dealt to clients in proportions
    drawn from Dirichlet(alpha). Small alpha = strong skew. Every client gets >= 1 example."""
    if examples and not _labelled(examples):
        bad = next(e for e in examples if not isinstance(e, Example))
        raise DataError(f"dirichlet split needs labelled examples (task kind classify), got "
                        f"{type(bad).__name__} records: use split 'iid' or 'group' instead")
    _check_n(n, examples)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    shards: list[list[int]] = [[] for _ in range(n)]
    for idx in _by_label(examples).values():
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


def group_split(examples: Sequence[R], n: int, seed: int = 0) -> list[list[R]]:
    """Natural partition by the `group` field (user, source, movie): whole groups are dealt to
    n devices, largest first, each to the device with fewest examples so far (n equal to the
    number of groups gives one group per device). Ties are broken by `seed`."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        g = getattr(e, "group", "")
        if not g:
            where = getattr(e, "origin", "") or f"example {i}"
            raise DataError(f"{where}: empty 'group': split 'group' needs a group (user, source, ...) "
                            f"on every row")
        groups[g].append(i)
    if not 1 <= n <= len(groups):
        raise ValueError(f"split 'group' needs 1 <= devices <= {len(groups)} (the number of "
                         f"groups in the data), got {n}")
    rng = np.random.default_rng(seed)
    names = sorted(groups)
    tie = {g: int(r) for g, r in zip(names, rng.permutation(len(names)))}
    shards: list[list[int]] = [[] for _ in range(n)]
    for g in sorted(names, key=lambda g: (-len(groups[g]), tie[g])):
        c = min(range(n), key=lambda k: (len(shards[k]), k))
        shards[c].extend(groups[g])
    return [[examples[i] for i in rng.permutation(s)] for s in shards]


def split_examples(examples: Sequence[R], n: int, how: str = "iid", alpha: float = 0.5,
                   seed: int = 0) -> list[list[R]]:
    """Dispatch on `how` in SPLIT_KINDS ("iid", "dirichlet", "group")."""
    if how == "iid":
        return iid_split(examples, n, seed)
    if how == "dirichlet":
        return dirichlet_split(examples, n, alpha, seed)
    if how == "group":
        return group_split(examples, n, seed)
    raise ValueError(f"unknown split {how!r}: expected one of {list(SPLIT_KINDS)}")
