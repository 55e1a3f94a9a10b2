"""edgefed.metrics: classification, generation and preference statistics (fast, CPU only)."""
from __future__ import annotations

import math
import struct
import subprocess
import sys

import numpy as np
import pytest

from edgefed import metrics as M
from edgefed.metrics import (classification_metrics, exact_match, mean_interval, normalize_answer,
                             paired_f1_gain, paired_gain, paired_mean_gain, plot_confusion,
                             preference_metrics, rouge_l, wilson_interval)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _ref_macro_f1(t, p):
    """Plain-Python macro-F1, zero_division=0, over classes in y_true or y_pred."""
    f1s = []
    for c in sorted(set(t) | set(p)):
        tp = sum(1 for a, b in zip(t, p) if a == c and b == c)
        n_pred = sum(1 for b in p if b == c)
        n_true = sum(1 for a in t if a == c)
        prec = tp / n_pred if n_pred else 0.0
        rec = tp / n_true if n_true else 0.0
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    return sum(f1s) / len(f1s)


def _noisy(n, k, acc, seed):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, k, n)
    p = np.where(rng.random(n) < acc, t, rng.integers(0, k, n))
    return t, p


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return struct.unpack(">II", data[16:24])  # IHDR width, height


# ------------------------------------------------------------------ classification

def test_hand_computed_confusion_and_macro_f1():
    t = [0, 0, 0, 1, 1, 2]
    p = [0, 0, 1, 1, 2, 2]
    r = classification_metrics(t, p, 3, labels=["a", "b", "c"], n_boot=200)
    assert r["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert r["n"] == 6 and r["accuracy"] == pytest.approx(4 / 6)
    assert (r["accuracy_ci_low"], r["accuracy_ci_high"]) == pytest.approx(wilson_interval(4, 6))
    # tp = [2, 1, 1], support = [3, 2, 1], predicted = [2, 2, 2]
    pc = r["per_class"]
    assert [c["label"] for c in pc] == ["a", "b", "c"]
    assert [c["precision"] for c in pc] == pytest.approx([1.0, 0.5, 0.5])
    assert [c["recall"] for c in pc] == pytest.approx([2 / 3, 0.5, 1.0])
    assert [c["f1"] for c in pc] == pytest.approx([0.8, 0.5, 2 / 3])
    assert [c["support"] for c in pc] == [3, 2, 1]
    assert [c["predicted"] for c in pc] == [2, 2, 2]
    assert r["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert r["macro_f1_classes"] == 3


def test_macro_f1_convention_absent_and_unsupported_classes():
    # class 3 never occurs: left out of the mean (same value as with 3 classes)
    t, p = [0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2]
    r4 = classification_metrics(t, p, 4, n_boot=0)
    assert r4["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert r4["macro_f1_classes"] == 3
    assert r4["per_class"][3] == {"class": 3, "label": "3", "precision": 0.0, "recall": 0.0,
                                  "f1": 0.0, "support": 0, "predicted": 0}
    assert math.isnan(r4["macro_f1_ci_low"]) and math.isnan(r4["macro_f1_ci_high"])
    # class 1 predicted but never true: F1 = 0 and it counts in the mean
    r = classification_metrics([0, 0], [0, 1], 2, n_boot=0)
    assert r["per_class"][1]["precision"] == 0.0 and r["per_class"][1]["f1"] == 0.0
    assert r["macro_f1"] == pytest.approx((2 / 3 + 0.0) / 2)


def test_matches_sklearn_when_installed():
    sk = pytest.importorskip("sklearn.metrics")
    for k, seed in [(2, 0), (5, 1), (100, 2)]:
        t, p = _noisy(300, k, 0.6, seed)
        r = classification_metrics(t, p, k, n_boot=0)
        assert r["macro_f1"] == pytest.approx(sk.f1_score(t, p, average="macro", zero_division=0))
        assert r["accuracy"] == pytest.approx(sk.accuracy_score(t, p))
        assert r["confusion_matrix"] == sk.confusion_matrix(t, p, labels=list(range(k))).tolist()
        prec, rec, f1, sup = sk.precision_recall_fscore_support(
            t, p, labels=list(range(k)), zero_division=0)
        assert [c["precision"] for c in r["per_class"]] == pytest.approx(prec)
        assert [c["recall"] for c in r["per_class"]] == pytest.approx(rec)
        assert [c["f1"] for c in r["per_class"]] == pytest.approx(f1)
        assert [c["support"] for c in r["per_class"]] == list(sup)


@pytest.mark.parametrize("k", [2, 5, 100])
def test_class_counts_against_reference(k):
    t, p = _noisy(500, k, 0.7, seed=k)
    r = classification_metrics(t, p, k, seed=3, n_boot=300)
    cm = np.array(r["confusion_matrix"])
    assert cm.shape == (k, k) and cm.sum() == 500
    assert r["accuracy"] == pytest.approx(np.trace(cm) / 500) == pytest.approx(np.mean(t == p))
    assert cm.sum(axis=1).tolist() == np.bincount(t, minlength=k).tolist()
    assert cm.sum(axis=0).tolist() == np.bincount(p, minlength=k).tolist()
    assert r["macro_f1"] == pytest.approx(_ref_macro_f1(t.tolist(), p.tolist()))
    assert r["macro_f1_ci_low"] <= r["macro_f1"] <= r["macro_f1_ci_high"]
    assert r["accuracy_ci_low"] <= r["accuracy"] <= r["accuracy_ci_high"]
    assert len(r["per_class"]) == k and r["labels"] == [str(i) for i in range(k)]


def test_vectorised_bootstrap_rows_match_reference():
    rng = np.random.default_rng(7)
    for k in (2, 5, 30):
        t, p = _noisy(60, k, 0.5, seed=k)
        idx = rng.integers(0, 60, size=(25, 60))
        got = M._macro_f1_rows(t, p, k, idx)
        want = [_ref_macro_f1(t[row].tolist(), p[row].tolist()) for row in idx]
        assert got == pytest.approx(want)


def test_bootstrap_deterministic_by_seed_and_narrows_with_n():
    t, p = _noisy(200, 5, 0.7, seed=0)
    a = classification_metrics(t, p, 5, seed=11, n_boot=500)
    b = classification_metrics(t, p, 5, seed=11, n_boot=500)
    c = classification_metrics(t, p, 5, seed=12, n_boot=500)
    key = ("macro_f1_ci_low", "macro_f1_ci_high")
    assert [a[x] for x in key] == [b[x] for x in key]
    assert [a[x] for x in key] != [c[x] for x in key]

    widths = []
    for n in (100, 2500):
        t, p = _noisy(n, 5, 0.7, seed=1)
        r = classification_metrics(t, p, 5, seed=0, n_boot=500)
        assert r["macro_f1_ci_low"] < r["macro_f1"] < r["macro_f1_ci_high"]
        widths.append(r["macro_f1_ci_high"] - r["macro_f1_ci_low"])
    assert widths[1] < widths[0] / 2.5  # ~ 1/sqrt(25) = 1/5 expected


def test_bootstrap_chunking_is_transparent(monkeypatch):
    t, p = _noisy(300, 4, 0.6, seed=5)
    whole = classification_metrics(t, p, 4, seed=9, n_boot=200)
    monkeypatch.setattr(M, "_BOOT_CHUNK", 300 * 7)  # 7 replicates per chunk
    chunked = classification_metrics(t, p, 4, seed=9, n_boot=200)
    assert chunked["macro_f1_ci_low"] == whole["macro_f1_ci_low"]
    assert chunked["macro_f1_ci_high"] == whole["macro_f1_ci_high"]


def test_classification_input_validation():
    with pytest.raises(ValueError):
        classification_metrics([0, 1], [0], 2)
    with pytest.raises(ValueError):
        classification_metrics([], [], 2)
    with pytest.raises(ValueError):
        classification_metrics([0, 2], [0, 1], 2)  # id out of range
    with pytest.raises(ValueError):
        classification_metrics([0, 1], [0, 1], 2, labels=["only-one"])
    with pytest.raises(ValueError):
        classification_metrics([0, 1], [0, 1], 2, n_boot=-1)
    with pytest.raises(TypeError):
        classification_metrics(["a", "b"], ["a", "b"], 2)
    # integral floats and numpy arrays are accepted
    r = classification_metrics(np.array([0.0, 1.0]), np.array([0, 1]), 2, n_boot=10)
    assert r["accuracy"] == 1.0 and r["macro_f1"] == 1.0


def test_result_is_json_ready():
    import json

    t, p = _noisy(50, 3, 0.6, seed=0)
    r = classification_metrics(t, p, 3, n_boot=50)
    assert json.loads(json.dumps(r)) == r


# ------------------------------------------------------------------ paired macro-F1 gain

def test_paired_f1_gain():
    t, before = _noisy(400, 5, 0.5, seed=3)
    same = paired_f1_gain(t, before, before, 5, n_boot=200)
    assert same["gain"] == 0.0 and same["ci_low"] == 0.0 and same["ci_high"] == 0.0
    assert same["fixed"] == same["broken"] == 0

    after = before.copy()
    wrong = np.flatnonzero(before != t)
    after[wrong[: len(wrong) // 2]] = t[wrong[: len(wrong) // 2]]  # fix half of the errors
    g = paired_f1_gain(t, before, after, 5, seed=4, n_boot=500)
    rb = classification_metrics(t, before, 5, n_boot=0)
    ra = classification_metrics(t, after, 5, n_boot=0)
    assert g["before"] == pytest.approx(rb["macro_f1"]) and g["after"] == pytest.approx(ra["macro_f1"])
    assert g["gain"] == pytest.approx(ra["macro_f1"] - rb["macro_f1"]) and g["gain"] > 0
    assert 0 < g["ci_low"] < g["gain"] < g["ci_high"]
    assert g["fixed"] == len(wrong) // 2 and g["broken"] == 0
    assert paired_f1_gain(t, before, after, 5, seed=4, n_boot=500) == g  # deterministic

    # pairing: the gain's interval is narrower than the unpaired combination of both intervals
    ib = classification_metrics(t, before, 5, seed=4, n_boot=500)
    ia = classification_metrics(t, after, 5, seed=5, n_boot=500)
    unpaired = math.hypot(ib["macro_f1_ci_high"] - ib["macro_f1_ci_low"],
                          ia["macro_f1_ci_high"] - ia["macro_f1_ci_low"])
    assert g["ci_high"] - g["ci_low"] < unpaired


def test_paired_gain_unchanged():
    g = paired_gain([0, 0, 1, 1], [1, 0, 1, 0])
    assert g["gain"] == 0.0 and g["fixed"] == 1 and g["broken"] == 1 and g["n"] == 4
    with pytest.raises(ValueError):
        paired_gain([], [])


# ------------------------------------------------------------------ plots

def test_plot_confusion_writes_png_for_2_and_100_classes(tmp_path):
    pytest.importorskip("matplotlib")
    sizes = {}
    for k in (2, 100):
        t, p = _noisy(30 * k, k, 0.6, seed=k)
        r = classification_metrics(t, p, k, n_boot=0)
        labels = [f"class-{i}" for i in range(k)]
        out = plot_confusion(r["confusion_matrix"], labels, tmp_path / "sub" / f"cm{k}.png",
                             title=f"{k} classes")
        assert out == tmp_path / "sub" / f"cm{k}.png"
        assert out.stat().st_size > 0
        sizes[k] = _png_size(out)
    assert sizes[100][0] > sizes[2][0] and sizes[100][1] > sizes[2][1]  # the figure scales up


def test_plot_confusion_edge_cases(tmp_path):
    pytest.importorskip("matplotlib")
    # an empty row (class never true) must not break row normalisation; labels may be None
    out = plot_confusion([[0, 0], [1, 2]], None, tmp_path / "z.png")
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError):
        plot_confusion([[1, 2, 3]], None, tmp_path / "bad.png")
    with pytest.raises(ValueError):
        plot_confusion([[1, 0], [0, 1]], ["only"], tmp_path / "bad.png")


def test_import_stays_light():
    code = ("import sys, edgefed.metrics; "
            "bad = [m for m in ('matplotlib', 'rouge_score', 'nltk', 'scipy', 'sklearn') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ generation

def test_rouge_l_known_strings():
    pytest.importorskip("rouge_score")
    r = rouge_l(["the cat sat on the mat", "alpha beta"], ["the cat sat on the mat", "gamma delta"])
    assert r["scores"] == pytest.approx([1.0, 0.0])
    assert r["n"] == 2 and r["mean"] == pytest.approx(0.5)
    # LCS("a c e f", "a b c d e") = "a c e": P = 3/4, R = 3/5, F = 2PR/(P+R) = 2/3
    r = rouge_l(["a c e f"], ["a b c d e"])
    assert r["scores"] == pytest.approx([2 / 3])
    assert r["mean_precision"] == pytest.approx(0.75) and r["mean_recall"] == pytest.approx(0.6)
    assert math.isnan(r["ci_low"])  # one example: no interval
    # case and punctuation are ignored by the tokenizer; several references: best one counts
    r = rouge_l(["The cat, sat!", "x y"], [["dog", "the cat sat"], "x y"])
    assert r["scores"] == pytest.approx([1.0, 1.0])


def test_rouge_l_interval_and_stemmer():
    pytest.importorskip("rouge_score")
    preds = ["the cat sat on the mat", "a b", "one two three", "red blue", "x"]
    refs = ["the cat is on the mat", "a b", "one three", "green yellow", "x y"]
    r = rouge_l(preds, refs)
    m, lo, hi = mean_interval(r["scores"])
    assert (r["mean"], r["ci_low"], r["ci_high"]) == pytest.approx((m, lo, hi))
    assert r["ci_low"] < r["mean"] < r["ci_high"]
    assert rouge_l(["running cats"], ["run cat"])["scores"][0] == 0.0
    assert rouge_l(["running cats"], ["run cat"], use_stemmer=True)["scores"][0] == 1.0
    with pytest.raises(ValueError):
        rouge_l(["a"], ["a", "b"])
    with pytest.raises(TypeError):
        rouge_l("a", "a")


def test_exact_match_normalisation():
    assert normalize_answer("  The  Cat's   hat! ") == "cats hat"
    assert normalize_answer("An apple, a day.") == "apple day"
    assert normalize_answer("theater") == "theater"  # articles only as whole words
    r = exact_match(["The Eiffel Tower.", "paris", "cats", "42"],
                    ["eiffel tower", "Paris!", "cat", ["forty-two", "42"]])
    assert r["matches"] == [True, True, False, True]
    assert r["k"] == 3 and r["n"] == 4 and r["mean"] == 0.75
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(wilson_interval(3, 4))
    with pytest.raises(ValueError):
        exact_match([], [])


# ------------------------------------------------------------------ preference and generic

def test_preference_metrics():
    r = preference_metrics([1.0, -1.0, 0.0, 2.0])
    assert r["n"] == 4 and r["k"] == 2 and r["accuracy"] == 0.5 and r["ties"] == 1
    assert (r["accuracy_ci_low"], r["accuracy_ci_high"]) == pytest.approx(wilson_interval(2, 4))
    # mean 0.5, sample sd sqrt(5/3), t(0.975, 3) = 3.182446
    half = 3.182446 * math.sqrt(5 / 3) / 2
    assert r["mean_margin"] == pytest.approx(0.5)
    assert (r["margin_ci_low"], r["margin_ci_high"]) == pytest.approx((0.5 - half, 0.5 + half))
    good = preference_metrics(np.full(50, 0.3) + np.linspace(-0.1, 0.1, 50))
    assert good["accuracy"] == 1.0 and good["accuracy_ci_low"] > 0.9 and good["margin_ci_low"] > 0
    with pytest.raises(ValueError):
        preference_metrics([])


def test_mean_interval_and_paired_mean_gain():
    assert mean_interval([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    m, lo, hi = mean_interval([3.0])
    assert m == 3.0 and math.isnan(lo) and math.isnan(hi)
    # 40 values: t quantile beyond the table (df = 39) ~ 2.022691
    x = np.arange(40, dtype=float)
    m, lo, hi = mean_interval(x)
    assert m == pytest.approx(19.5)
    assert hi - m == pytest.approx(2.022691 * x.std(ddof=1) / math.sqrt(40), rel=1e-6)

    g = paired_mean_gain([1.0, 2.0, 3.0], [2.0, 3.0, 5.0])
    assert g["n"] == 3 and g["before"] == 2.0 and g["after"] == pytest.approx(10 / 3)
    d = np.array([1.0, 1.0, 2.0])
    half = 4.302653 * d.std(ddof=1) / math.sqrt(3)
    assert g["gain"] == pytest.approx(4 / 3)
    assert (g["ci_low"], g["ci_high"]) == pytest.approx((4 / 3 - half, 4 / 3 + half))
    with pytest.raises(ValueError):
        paired_mean_gain([1.0, 2.0], [1.0])


def test_t_quantiles_match_scipy_when_installed():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 29, 30, 31, 45, 100, 1000, 100000):
        assert M._t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-5)
