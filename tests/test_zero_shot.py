"""`edgefed zero-shot`: candidate templates scored by the base model on held-out rows (tiny model)."""
from __future__ import annotations

import json

import pytest

from edgefed.cli import main
from edgefed.data import Example, write_jsonl
from edgefed.zero_shot import CHAT, ZeroShotError, held_out_sample, read_templates

_TEXTS = ["a warm, funny and moving film", "dull, slow and far too long", "it is a movie about a dog",
          "the best thing I saw this year", "a mess of a script", "the plot follows two brothers",
          "brilliant acting all round", "I wanted my money back", "it runs ninety minutes"]
_LABELS = ["positive", "negative", "neutral"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One EdgeFed cache for the module: the tiny model is prepared and exported once."""
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("zs-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEFED_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def data3(tmp_path_factory):
    """60 rows, 3 labels (20 each)."""
    rows = [Example(f"{_TEXTS[i % len(_TEXTS)]} ({i})", _LABELS[i % 3]) for i in range(60)]
    return write_jsonl(tmp_path_factory.mktemp("zs-data") / "three.jsonl", rows)


def _templates(tmp_path, lines: list[str], name: str = "templates.txt"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


_THREE = ["# sentiment candidates", r"Review: {text}\nSentiment:", "", r"Text: {text}\nLabel:",
          "{text} In one word, this is"]


def test_three_templates_table_best_and_json(cache, data3, tmp_path, capsys):
    out = tmp_path / "rows.json"
    rc = main(["zero-shot", "--model", "tiny", "--data", str(data3), "--task", "classify:labels=auto",
               "--templates", str(_templates(tmp_path, _THREE)), "--n", "30", "--json", str(out)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    for shown in (r"'Review: {text}\nSentiment:'", r"'Text: {text}\nLabel:'", "'{text} In one word, this is'"):
        assert shown in cap.out
    assert "best: '" in cap.out
    assert "edgefed export --model tiny --trainable lora:r=8,targets=q_proj,v_proj --task classify:labels=auto" in cap.out
    assert "--template '" in cap.out and "templates" in cap.err  # the progress bar goes to stderr

    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert {r["template"] for r in rows} == {"Review: {text}\nSentiment:", "Text: {text}\nLabel:",
                                            "{text} In one word, this is"}
    assert doc["n"] == 30 and doc["labels"] == sorted(_LABELS)
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["n"] == 30
        assert r["accuracy_ci"][0] <= r["accuracy"] <= r["accuracy_ci"][1]
        assert 0.0 <= r["macro_f1"] <= 1.0
    accs = [r["accuracy"] for r in rows]
    assert accs == sorted(accs, reverse=True)  # best first
    assert [r["rank"] for r in rows] == [1, 2, 3] and rows[0]["vs_best"] is None
    assert doc["best"]["template"] == rows[0]["template"]
    assert doc["best"]["export_command"] in cap.out


def test_templates_change_the_scores(cache, data3, tmp_path, capsys):
    out = tmp_path / "two.json"
    t = _templates(tmp_path, [r"Review: {text}\nSentiment:", "Please read this: {text} It was"])
    rc = main(["zero-shot", "--model", "tiny", "--data", str(data3), "--task", "classify:labels=auto",
               "--templates", str(t), "--n", "30", "--json", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    losses = [r["loss"] for r in json.loads(out.read_text())["rows"]]
    assert len(losses) == 2 and abs(losses[0] - losses[1]) > 1e-6


def test_bad_placeholder_fails_before_any_model_work(data3, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGEFED_CACHE", str(tmp_path / "cache"))
    t = _templates(tmp_path, ["# candidates", r"Review: {text}\nSentiment:", "Review: {txt}\nSentiment:"])
    rc = main(["zero-shot", "--model", "tiny", "--data", str(data3), "--task", "classify:labels=auto",
               "--templates", str(t)])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{t}:3:" in err and "txt" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cache").exists()  # nothing prepared or exported


@pytest.mark.parametrize("argv, expect", [
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--task", "classify:labels=positive,negative"], "'neutral' is not one of"),
    (["--task", "lm"], "takes no template"),
])
def test_errors_exit_2_with_one_message(data3, tmp_path, monkeypatch, capsys, argv, expect):
    monkeypatch.setenv("EDGEFED_CACHE", str(tmp_path / "cache"))
    base = {"--model": "tiny", "--task": "classify:labels=auto"}
    base.update(dict(zip(argv[::2], argv[1::2])))
    args = ["zero-shot", "--data", str(data3), "--templates", str(_templates(tmp_path, ["{text} is"]))]
    args += [x for kv in base.items() for x in kv]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err


def test_missing_data_file_exits_2(tmp_path, capsys):
    rc = main(["zero-shot", "--model", "tiny", "--data", str(tmp_path / "none.jsonl"), "--task",
               "classify:labels=auto", "--templates", str(_templates(tmp_path, ["{text} is"]))])
    assert rc == 2 and "none.jsonl" in capsys.readouterr().err


def test_sft_chat_and_user_templates(cache, tmp_path, capsys):
    from edgefed.data import SFTExample

    rows = [SFTExample(f"Say the word number {i}.", ["yes", "no", "maybe"][i % 3]) for i in range(24)]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    out = tmp_path / "sft.json"
    t = _templates(tmp_path, [CHAT, r"Q: {instruction}\nA: "])
    rc = main(["zero-shot", "--model", "tiny", "--data", str(data), "--task", "sft", "--templates", str(t),
               "--n", "12", "--json", str(out), "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "chat (the tokenizer's chat template)" in cap.out and r"'Q: {instruction}\nA: '" in cap.out
    doc = json.loads(out.read_text())
    assert {r["template"] for r in doc["rows"]} == {None, "Q: {instruction}\nA: "}
    losses = [r["loss"] for r in doc["rows"]]
    assert losses == sorted(losses) and losses[0] != losses[1]
    assert "--task sft" in doc["best"]["export_command"]


# ---------------------------------------------------------------------- no model needed

def test_read_templates_lines_and_json(tmp_path):
    t = _templates(tmp_path, ["# a comment", "", r"A: {text}\nB:", "### Heading {text}", r"A: {text}\nB:"])
    got = read_templates(t, "classify")
    assert [c.template for c in got] == ["A: {text}\nB:", "### Heading {text}"]  # duplicate scored once
    assert got[0].where == f"{t}:3"
    j = tmp_path / "t.json"
    j.write_text(json.dumps(["{instruction}\n{input}\n", "chat"]))
    got = read_templates(j, "sft")
    assert [c.template for c in got] == ["{instruction}\n{input}\n", None]


@pytest.mark.parametrize("lines, kind, expect", [
    (["{text} {text}"], "classify", "more than once"),
    (["no placeholder"], "classify", "lacks"),
    (["{instruction} {text}"], "sft", "unknown placeholder"),
    (["chat"], "classify", "sft and dpo only"),
    (["{text"], "classify", "not a valid format string"),
    (["# only a comment"], "classify", "no templates"),
])
def test_read_templates_refuses(tmp_path, lines, kind, expect):
    with pytest.raises(ZeroShotError, match=expect):
        read_templates(_templates(tmp_path, lines), kind)


def test_held_out_sample_is_seeded_and_balanced():
    rows = [Example(f"t{i}", _LABELS[i % 3]) for i in range(90)]
    a, how = held_out_sample(rows, 30, seed=1)
    assert a == held_out_sample(rows, 30, seed=1)[0] and a != held_out_sample(rows, 30, seed=2)[0]
    assert "balanced" in how and sorted(e.label for e in a) == sorted(_LABELS * 10)
    everything, how = held_out_sample(rows, 500, seed=0)
    assert sorted(everything, key=lambda e: e.text) == sorted(rows, key=lambda e: e.text) and "all 90" in how
