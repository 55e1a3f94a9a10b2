"""Evaluation statistics shared by the demo, the simulator and the learning check.

Three task kinds, each with an uncertainty estimate next to every number:

* classification: :func:`classification_metrics` (accuracy + Wilson interval, macro-F1 + seeded
  bootstrap interval, per-class scores, confusion matrix), :func:`paired_f1_gain`,
  :func:`paired_gain` (accuracy gain on the same examples) and :func:`plot_confusion`;
* generation: :func:`rouge_l`, :func:`exact_match` (SQuAD-style :func:`normalize_answer`);
* preference (DPO): :func:`preference_metrics`;

plus the generic :func:`mean_interval`, :func:`paired_mean_gain` (per-example float metrics such
as loss or ROUGE-L, before vs after) and :func:`wilson_interval`.

Only numpy is imported here, since this module runs on devices too; matplotlib
(:func:`plot_confusion`) and rouge-score (:func:`rouge_l`) are imported inside the functions
that need them. Every result is a dict of plain Python ints, floats, strings and lists (JSON-ready).
All intervals are two-sided 95% intervals; ``ci_low``/``ci_high`` name their bounds.
"""
from __future__ import annotations

import logging
import math
import re
import string
from pathlib import Path

import numpy as np

__all__ = [
    "paired_gain", "wilson_interval", "mean_interval",
    "classification_metrics", "paired_f1_gain", "plot_confusion",
    "rouge_l", "exact_match", "normalize_answer",
    "preference_metrics", "paired_mean_gain",
]

_Z95 = 1.959963984540054  # standard normal 0.975 quantile
# Student t 0.975 quantiles for 1..30 degrees of freedom; beyond 30 a Cornish-Fisher expansion
# is accurate to ~3e-8 (checked against scipy.stats.t.ppf).
_T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004,
         2.262157, 2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905,
         2.109816, 2.100922, 2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899,
         2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272)
# Bootstrap work is done in chunks of replicates holding at most this many resampled examples,
# which bounds temporary memory (a few tens of MB) whatever n and n_boot are.
_BOOT_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------
# Generic intervals
# --------------------------------------------------------------------------------------------

def paired_gain(before_correct, after_correct, z: float = 1.96) -> dict:
    """Accuracy gain on the SAME examples with a 95% interval from the paired differences
    (tighter and more honest than comparing two independent intervals)."""
    b = np.asarray(before_correct, dtype=np.float64)
    a = np.asarray(after_correct, dtype=np.float64)
    if b.shape != a.shape or b.size == 0:
        raise ValueError("paired_gain needs two equal-length, non-empty correctness vectors")
    d = a - b
    n = d.size
    se = d.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
    return {"n": int(n), "before": float(b.mean()), "after": float(a.mean()), "gain": float(d.mean()),
            "ci_low": float(d.mean() - z * se), "ci_high": float(d.mean() + z * se),
            "fixed": int(((b == 0) & (a == 1)).sum()), "broken": int(((b == 1) & (a == 0)).sum())}


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy k/n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (mid - half, mid + half)


def _t975(df: int) -> float:
    """0.975 quantile of Student's t with ``df`` degrees of freedom (df >= 1)."""
    if df <= len(_T975):
        return _T975[df - 1]
    z, v = _Z95, float(df)
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
            + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * v**4))


def _as_1d_float(values, what: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{what} needs a non-empty 1-D sequence of numbers, got shape {x.shape}")
    return x


def mean_interval(values) -> tuple[float, float, float]:
    """``(mean, ci_low, ci_high)``: the mean with a 95% Student-t interval (mean +- t * s / sqrt(n)).

    One value gives ``(value, nan, nan)``; NaNs propagate (a NaN anywhere gives a NaN mean)."""
    x = _as_1d_float(values, "mean_interval")
    n = x.size
    m = float(x.mean())
    if n < 2:
        return (m, float("nan"), float("nan"))
    half = _t975(n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return (m, m - half, m + half)


def paired_mean_gain(before, after) -> dict:
    """Mean per-example change ``after - before`` on the SAME examples, with a 95% t interval
    of the paired differences. For per-example float metrics: ROUGE-L, loss (there a negative
    gain is an improvement), log-likelihood, reward margin.

    Returns ``{"n", "before", "after", "gain", "ci_low", "ci_high"}`` (before/after are means)."""
    b = _as_1d_float(before, "paired_mean_gain")
    a = _as_1d_float(after, "paired_mean_gain")
    if a.shape != b.shape:
        raise ValueError(f"paired_mean_gain needs equal lengths, got {b.size} and {a.size}")
    gain, lo, hi = mean_interval(a - b)
    return {"n": int(a.size), "before": float(b.mean()), "after": float(a.mean()),
            "gain": gain, "ci_low": lo, "ci_high": hi}


# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------

def _as_class_ids(y, n_classes: int, what: str) -> np.ndarray:
    a = np.asarray(y)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D sequence of class ids, got shape {a.shape}")
    if a.dtype.kind == "b":
        a = a.astype(np.intp)
    elif a.dtype.kind == "f":
        if not (np.all(np.isfinite(a)) and np.all(a == np.round(a))):
            raise ValueError(f"{what} must hold integer class ids")
        a = a.astype(np.intp)
    elif a.dtype.kind not in "iu":
        raise TypeError(f"{what} must hold integer class ids in [0, n_classes), got dtype {a.dtype}")
    if a.min() < 0 or a.max() >= n_classes:
        raise ValueError(f"{what} has class ids outside [0, {n_classes}): "
                         f"min {int(a.min())}, max {int(a.max())}")
    return a.astype(np.intp, copy=False)


def _check_pairs(y_true, preds: list, n_classes) -> tuple[np.ndarray, list]:
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive int, got {n_classes!r}")
    t = _as_class_ids(y_true, int(n_classes), "y_true")
    out = []
    for name, p in preds:
        p = _as_class_ids(p, int(n_classes), name)
        if p.shape != t.shape:
            raise ValueError(f"{name} has {p.size} entries but y_true has {t.size}")
        out.append(p)
    return t, out


def _check_boot(n_boot) -> int:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise ValueError(f"n_boot must be an int >= 0 (0 skips the bootstrap), got {n_boot!r}")
    return int(n_boot)


def _macro_f1_rows(t: np.ndarray, p: np.ndarray, k: int, idx: np.ndarray) -> np.ndarray:
    """Macro-F1 of each row of resampled example indices ``idx`` (shape (b, n)) -> shape (b,).

    Per replicate r, class c: support = #(t == c), predicted = #(p == c), tp = #(t == p == c),
    all from one np.bincount each over ``r * k + c``; F1_c = 2 tp / (support + predicted), and
    the mean runs over the classes with support + predicted > 0 in that replicate."""
    b = idx.shape[0]
    off = (np.arange(b, dtype=np.intp) * k)[:, None]
    tt = t[idx] + off
    pp = p[idx] + off
    size = b * k
    support = np.bincount(tt.ravel(), minlength=size).reshape(b, k)
    predicted = np.bincount(pp.ravel(), minlength=size).reshape(b, k)
    tp = np.bincount(tt[tt == pp], minlength=size).reshape(b, k)
    den = support + predicted
    present = den > 0
    f1 = np.where(present, 2.0 * tp / np.maximum(den, 1), 0.0)
    return f1.sum(axis=1) / present.sum(axis=1)  # n >= 1 so every replicate has a class present


def _bootstrap_macro_f1(t: np.ndarray, preds: list, k: int, seed, n_boot: int) -> list:
    """Bootstrap macro-F1 replicates for each prediction vector in ``preds``; all of them see the
    same resampled example indices (a paired bootstrap). Returns one (n_boot,) array per vector."""
    n = t.size
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _BOOT_CHUNK // n)
    out = [np.empty(n_boot) for _ in preds]
    for start in range(0, n_boot, per_chunk):
        b = min(per_chunk, n_boot - start)
        idx = rng.integers(0, n, size=(b, n))
        for o, p in zip(out, preds):
            o[start:start + b] = _macro_f1_rows(t, p, k, idx)
    return out


def _percentile_ci(reps: np.ndarray) -> tuple[float, float]:
    if reps.size == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return (float(lo), float(hi))


def classification_metrics(y_true, y_pred, n_classes: int, *, labels=None, seed=0,
                           n_boot: int = 1000) -> dict:
    """Accuracy, macro-F1, per-class scores and the confusion matrix of class-id predictions.

    ``y_true`` and ``y_pred`` are equal-length, non-empty sequences of integer class ids in
    ``[0, n_classes)``; ``labels`` optionally names the classes (``n_classes`` strings).

    Conventions (those of scikit-learn's ``f1_score(average="macro", zero_division=0)`` with its
    default labels): for class c, precision = tp / #predicted c, recall = tp / #true c, each 0
    when its denominator is 0, and F1 = 2 tp / (#true c + #predicted c), i.e. 2PR/(P+R) or 0.
    Macro-F1 is the unweighted mean of F1 over the classes that occur in ``y_true`` or ``y_pred``
    (a class that is neither true nor predicted anywhere is left out, not counted as 0).

    Intervals (95%): accuracy by Wilson score; macro-F1 by a percentile bootstrap over examples
    with ``n_boot`` replicates drawn by ``numpy.random.default_rng(seed)`` (same inputs + seed ->
    same interval; ``n_boot=0`` skips it and gives NaN bounds). Each replicate recomputes
    macro-F1 with the same convention, over the classes present in that replicate.

    Returns ``{"n", "n_classes", "labels", "accuracy", "accuracy_ci_low", "accuracy_ci_high",
    "macro_f1", "macro_f1_ci_low", "macro_f1_ci_high", "macro_f1_classes", "n_boot", "seed",
    "per_class", "confusion_matrix"}`` where ``per_class`` is a list of ``n_classes`` dicts
    ``{"class", "label", "precision", "recall", "f1", "support", "predicted"}`` and
    ``confusion_matrix[i][j]`` counts examples of true class i predicted as j.
    """
    t, (p,) = _check_pairs(y_true, [("y_pred", y_pred)], n_classes)
    k = int(n_classes)
    n_boot = _check_boot(n_boot)
    if labels is None:
        names = [str(i) for i in range(k)]
    else:
        names = [str(x) for x in labels]
        if len(names) != k:
            raise ValueError(f"labels has {len(names)} names for {k} classes")
    n = int(t.size)
    cm = np.bincount(t * k + p, minlength=k * k).reshape(k, k)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
    recall = np.where(support > 0, tp / np.maximum(support, 1), 0.0)
    den = support + predicted
    f1 = np.where(den > 0, 2.0 * tp / np.maximum(den, 1), 0.0)
    present = den > 0
    macro = float(f1[present].mean())
    correct = int(tp.sum())
    acc_lo, acc_hi = wilson_interval(correct, n)
    (reps,) = _bootstrap_macro_f1(t, [p], k, seed, n_boot)
    f1_lo, f1_hi = _percentile_ci(reps)
    per_class = [{"class": c, "label": names[c], "precision": float(precision[c]),
                  "recall": float(recall[c]), "f1": float(f1[c]), "support": int(support[c]),
                  "predicted": int(predicted[c])} for c in range(k)]
    return {"n": n, "n_classes": k, "labels": names,
            "accuracy": correct / n, "accuracy_ci_low": acc_lo, "accuracy_ci_high": acc_hi,
            "macro_f1": macro, "macro_f1_ci_low": f1_lo, "macro_f1_ci_high": f1_hi,
            "macro_f1_classes": int(present.sum()), "n_boot": n_boot, "seed": seed,
            "per_class": per_class, "confusion_matrix": cm.tolist()}


def paired_f1_gain(y_true, pred_before, pred_after, n_classes: int, seed=0,
                   n_boot: int = 1000) -> dict:
    """Macro-F1 before and after (same convention as :func:`classification_metrics`) on the SAME
    examples, and the gain ``after - before`` with a 95% paired percentile bootstrap interval:
    every replicate resamples one set of example indices and scores both prediction vectors on
    it. ``n_boot=0`` skips the bootstrap (NaN bounds).

    Returns ``{"n", "before", "after", "gain", "ci_low", "ci_high", "fixed", "broken", "n_boot",
    "seed"}``; fixed / broken count examples that went wrong -> right / right -> wrong."""
    t, (b, a) = _check_pairs(y_true, [("pred_before", pred_before), ("pred_after", pred_after)],
                             n_classes)
    k = int(n_classes)
    n_boot = _check_boot(n_boot)
    whole = np.arange(t.size)[None, :]
    f_before = float(_macro_f1_rows(t, b, k, whole)[0])
    f_after = float(_macro_f1_rows(t, a, k, whole)[0])
    rb, ra = _bootstrap_macro_f1(t, [b, a], k, seed, n_boot)
    lo, hi = _percentile_ci(ra - rb)
    ok_b, ok_a = b == t, a == t
    return {"n": int(t.size), "before": f_before, "after": f_after, "gain": f_after - f_before,
            "ci_low": lo, "ci_high": hi, "fixed": int((~ok_b & ok_a).sum()),
            "broken": int((ok_b & ~ok_a).sum()), "n_boot": n_boot, "seed": seed}


def plot_confusion(cm, labels, path, title: str = "") -> Path:
    """Draw a confusion matrix (rows = true class, columns = predicted) to an image at ``path``
    (format from its suffix, PNG for ``.png``); returns ``Path(path)``. Parent folders are made.

    Cell colours are row-normalised (the fraction of each true class predicted as each column;
    an empty row stays blank), so rare classes read as clearly as common ones; the raw counts
    are written in the cells up to 20 classes. The figure grows with the class count (capped),
    x tick labels are rotated, and above 40 classes the class names are replaced by sparse
    class-index ticks. ``labels`` may be None (class indices are used). Needs matplotlib; uses
    its Agg renderer through ``matplotlib.figure.Figure`` (no pyplot, no global backend change).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plot_confusion needs matplotlib: pip install 'matplotlib>=3.5'") from e
    m = np.asarray(cm, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"cm must be a non-empty square matrix, got shape {m.shape}")
    k = m.shape[0]
    names = [str(i) for i in range(k)] if labels is None else [str(x) for x in labels]
    if len(names) != k:
        raise ValueError(f"labels has {len(names)} names for a {k}x{k} matrix")
    rows = m.sum(axis=1, keepdims=True)
    frac = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)

    side = min(14.0, max(4.5, 2.5 + 0.45 * k))
    fig = Figure(figsize=(side + 1.2, side), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="equal")
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    cbar.set_label("fraction of the true class")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title:
        ax.set_title(title)

    if k <= 40:
        fs = max(6.0, 11.0 - k / 6.0)
        ticks = np.arange(k)
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        rotate = k * max(len(s) for s in names) > 30  # would the names collide flat?
        ax.set_xticklabels(names, fontsize=fs, rotation=45 if rotate else 0,
                           ha="right" if rotate else "center", rotation_mode="anchor")
        ax.set_yticklabels(names, fontsize=fs)
    else:
        step = 10 if k <= 200 else 50
        ticks = np.arange(0, k, step)
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.set_xticklabels([str(i) for i in ticks], fontsize=8)
        ax.set_yticklabels([str(i) for i in ticks], fontsize=8)
        ax.set_xlabel("predicted class (index)")
        ax.set_ylabel("true class (index)")

    if k <= 20:
        fs = max(6.0, 12.0 - 0.3 * k)
        integral = bool(np.all(m == np.round(m)))
        for i in range(k):
            for j in range(k):
                txt = f"{int(m[i, j])}" if integral else f"{m[i, j]:.3g}"
                ax.text(j, i, txt, ha="center", va="center", fontsize=fs,
                        color="white" if frac[i, j] > 0.5 else "black")

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------

def _check_texts(predictions, references, what: str) -> tuple[list, list]:
    preds = list(predictions) if not isinstance(predictions, str) else None
    refs = list(references) if not isinstance(references, str) else None
    if preds is None or refs is None:
        raise TypeError(f"{what} takes sequences of strings, not a single string")
    if not preds or len(preds) != len(refs):
        raise ValueError(f"{what} needs equal-length, non-empty predictions and references, "
                         f"got {len(preds)} and {len(refs)}")
    out_refs = []
    for i, (p, r) in enumerate(zip(preds, refs)):
        if not isinstance(p, str):
            raise TypeError(f"{what}: prediction {i} is {type(p).__name__}, not str")
        rs = [r] if isinstance(r, str) else list(r)
        if not rs or not all(isinstance(x, str) for x in rs):
            raise TypeError(f"{what}: reference {i} must be a str or a non-empty list of str")
        out_refs.append(rs)
    return preds, out_refs


def rouge_l(predictions, references, *, use_stemmer: bool = False, tokenizer=None) -> dict:
    """Sentence-level ROUGE-L (longest common subsequence) F-measure of each prediction against
    its reference, with Google's ``rouge-score`` package (imported here, not at module import).

    ``references[i]`` is a string or a list of acceptable strings (then the best-scoring one
    counts, rouge-score's ``score_multi``). The default rouge-score tokenizer lowercases and
    keeps only ``[a-z0-9]`` runs, so text in other scripts scores 0: pass ``tokenizer`` (any
    object with a ``tokenize(text) -> list[str]`` method) for those. ``use_stemmer`` applies the
    Porter stemmer (pure code, no NLTK data download). Two texts without tokens score 0.

    Returns ``{"n", "mean", "ci_low", "ci_high", "mean_precision", "mean_recall", "scores"}``:
    the mean F-measure with a 95% t interval over examples, and the per-example F-measures.
    """
    try:
        from rouge_score import rouge_scorer
        logging.getLogger("absl").setLevel(logging.WARNING)  # "Using default tokenizer." on every call
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("rouge_l needs rouge-score: pip install 'rouge-score>=0.1.2'") from e
    preds, refs = _check_texts(predictions, references, "rouge_l")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer, tokenizer=tokenizer)
    f, prec, rec = [], [], []
    for p, rs in zip(preds, refs):
        s = (scorer.score(rs[0], p) if len(rs) == 1 else scorer.score_multi(rs, p))["rougeL"]
        f.append(float(s.fmeasure))
        prec.append(float(s.precision))
        rec.append(float(s.recall))
    mean, lo, hi = mean_interval(f)
    return {"n": len(f), "mean": mean, "ci_low": lo, "ci_high": hi,
            "mean_precision": float(np.mean(prec)), "mean_recall": float(np.mean(rec)), "scores": f}


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 answer normalisation: lowercase, drop ASCII punctuation, drop the articles
    a / an / the, collapse whitespace."""
    s = text.lower().translate(_PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(predictions, references) -> dict:
    """Fraction of predictions equal to their reference after :func:`normalize_answer`
    (``references[i]`` may be a list of acceptable answers: any match counts), with a 95%
    Wilson interval.

    Returns ``{"n", "k", "mean", "ci_low", "ci_high", "matches"}`` (``matches``: per-example
    bools, ``k``: how many matched)."""
    preds, refs = _check_texts(predictions, references, "exact_match")
    matches = [any(normalize_answer(p) == normalize_answer(r) for r in rs)
               for p, rs in zip(preds, refs)]
    k, n = sum(matches), len(matches)
    lo, hi = wilson_interval(k, n)
    return {"n": n, "k": k, "mean": k / n, "ci_low": lo, "ci_high": hi, "matches": matches}


# --------------------------------------------------------------------------------------------
# Preference (DPO)
# --------------------------------------------------------------------------------------------

def preference_metrics(margins_chosen_minus_rejected) -> dict:
    """Pairwise preference statistics from per-pair margins ``r(chosen) - r(rejected)`` (for DPO
    the implicit reward ``beta * (log pi/pi_ref (chosen) - log pi/pi_ref (rejected))``).

    Accuracy is the fraction of margins strictly > 0 (a tie counts as wrong), with a 95% Wilson
    interval; the mean margin has a 95% t interval.

    Returns ``{"n", "k", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "ties",
    "mean_margin", "margin_ci_low", "margin_ci_high"}``."""
    m = _as_1d_float(margins_chosen_minus_rejected, "preference_metrics")
    n = int(m.size)
    k = int((m > 0).sum())
    lo, hi = wilson_interval(k, n)
    mean, mlo, mhi = mean_interval(m)
    return {"n": n, "k": k, "accuracy": k / n, "accuracy_ci_low": lo, "accuracy_ci_high": hi,
            "ties": int((m == 0).sum()), "mean_margin": mean, "margin_ci_low": mlo,
            "margin_ci_high": mhi}
