"""read_records / write_jsonl over every supported format, field mappings and bad input."""
import csv
import json
import sys

import pytest

from edgefed import data as D
from edgefed.data import DataError, Example, Fields, PreferencePair, SFTExample, read_records

ROWS = [{"text": "great film", "label": "positive", "group": "u1"},
        {"text": "dull, long", "label": "negative", "group": "u2"},
        {"text": "fine", "label": "neutral", "group": "u1"}]
EXPECTED = [Example(r["text"], r["label"], r["group"]) for r in ROWS]


def write_table(path, rows, delim=","):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=delim)
        w.writeheader()
        w.writerows(rows)
    return path


def write_lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def save_to_disk(d, columns, features=None):
    """Imitate datasets.Dataset.save_to_disk: Arrow IPC stream + dataset_info.json + state.json."""
    pa = pytest.importorskip("pyarrow")
    d.mkdir(parents=True)
    table = pa.table(columns)
    with pa.OSFile(str(d / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as w:
            for batch in table.to_batches(max_chunksize=2):
                w.write_batch(batch)
    feats = features or {c: {"dtype": "string", "_type": "Value"} for c in columns}
    (d / "dataset_info.json").write_text(json.dumps({"citation": "", "features": feats}))
    (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                                              "_fingerprint": "0", "_split": None}))
    return d


# ---------------------------------------------------------------- formats

def test_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n\n  \n" + json.dumps(ROWS[1]) + "\n" + json.dumps(ROWS[2]))
    got = read_records(p, "classify")
    assert got == EXPECTED and [e.origin for e in got] == [f"{p}:1", f"{p}:4", f"{p}:5"]
    assert read_records(p, "classify", limit=2) == EXPECTED[:2]
    assert D.read_jsonl(p) == EXPECTED


def test_json_array(tmp_path):
    p = tmp_path / "alpaca.json"
    p.write_text(json.dumps([{"instruction": "Add", "input": "1+1", "output": "2"},
                             {"instruction": "Name a color", "input": "", "output": "red"}], indent=2))
    got = read_records(p, "sft")
    assert got == [SFTExample("Add", "2", "1+1"), SFTExample("Name a color", "red")]
    assert [e.origin for e in got] == [f"{p}:2", f"{p}:7"]
    p.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": "", "output": "c"}]')
    with pytest.raises(DataError, match=r"alpaca.json:2: field 'instruction' is empty"):
        read_records(p, "sft")


@pytest.mark.parametrize("ext, delim", [(".csv", ","), (".tsv", "\t")])
def test_csv_tsv(tmp_path, ext, delim):
    p = write_table(tmp_path / f"d{ext}", ROWS, delim)
    got = read_records(p, "classify")
    assert got == EXPECTED and got[0].origin == f"{p}:2"  # the header is line 1


def test_csv_quoted_newlines_and_bom(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes('\ufefftext,label\n"two\nlines",a\nok,\n'.encode())
    with pytest.raises(DataError, match=r"d.csv:4: field 'label' is empty"):  # row 2 starts on line 4
        read_records(p, "classify")


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"review": [r["text"] for r in ROWS], "stars": [5, 1, 3],
                             "user_id": [7, 8, 7]}), p)
    got = read_records(p, "classify", Fields(text="review", label="stars"))
    assert [(e.text, e.label, e.group) for e in got] == [("great film", "5", "7"), ("dull, long", "1", "8"),
                                                        ("fine", "3", "7")]
    assert got[2].origin == f"{p}:row 2"
    pq.write_table(pa.table({"text": ["a", "b", "c"], "label": [1.0, None, 2.5]}), p)
    with pytest.raises(DataError, match=r"d.parquet:row 1: field 'label' is null.*\(and 1 more bad row\)"
                                        r"\n  .*d.parquet:row 2: field 'label' must be"):
        read_records(p, "classify")


def test_datasets_dir_classlabel(tmp_path):
    d = save_to_disk(tmp_path / "ds", {"sentence": ["a", "b", "c"], "label": [2, 0, 1]},
                     {"sentence": {"dtype": "string", "_type": "Value"},
                      "label": {"names": ["neg", "pos", "neutral"], "_type": "ClassLabel"}})
    got = read_records(d, "classify")
    assert [(e.text, e.label) for e in got] == [("a", "neutral"), ("b", "neg"), ("c", "pos")]
    assert got[2].origin == f"{d}:row 2"  # rows counted across record batches
    assert D.label_set(got) == ["neg", "neutral", "pos"]


def test_datasets_dir_bad_classlabel(tmp_path):
    d = save_to_disk(tmp_path / "ds", {"text": ["a", "b"], "label": [0, -1]},
                     {"text": {"dtype": "string", "_type": "Value"},
                      "label": {"names": ["neg", "pos"], "_type": "ClassLabel"}})
    with pytest.raises(DataError, match=r"ds:row 1: field 'label' is -1.*no label"):
        read_records(d, "classify")


def test_dataset_dict(tmp_path):
    root = tmp_path / "dd"
    save_to_disk(root / "train", {"text": ["t1", "t2"], "label": ["x", "y"]})
    save_to_disk(root / "test", {"text": ["e1"], "label": ["x"]})
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert [e.text for e in read_records(root, "classify")] == ["t1", "t2"]
    assert [e.text for e in read_records(root, "classify", Fields(split="test"))] == ["e1"]
    with pytest.raises(DataError, match=r"without split 'validation'.*\['train', 'test'\]"):
        read_records(root, "classify", Fields(split="validation"))
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["test"]}))
    with pytest.raises(DataError, match=r"without split 'train'.*\['test'\].*Fields\(split="):
        read_records(root, "classify")


def test_unknown_format_and_missing(tmp_path):
    p = tmp_path / "d.xlsx"
    p.write_text("x")
    with pytest.raises(DataError, match=r"d.xlsx: unknown data format '.xlsx'.*\.jsonl.*\.csv.*\.parquet"):
        read_records(p, "classify")
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "nope.jsonl", "classify")
    with pytest.raises(DataError, match="not a Hugging Face datasets directory"):
        read_records(tmp_path, "classify")
    with pytest.raises(ValueError, match="task kind"):
        read_records(p, "regression")


def test_pyarrow_missing(tmp_path, monkeypatch):
    p = tmp_path / "d.parquet"
    p.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(DataError, match="pip install pyarrow"):
        read_records(p, "classify")


# ---------------------------------------------------------------- field mapping

def test_default_field_names(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [{"sentence": "s", "category": "c", "user": "u", "id": 1}])
    assert read_records(p, "classify") == [Example("s", "c", "u")]
    # First present default wins ("text" before "content"); the choice holds for every row.
    p = write_lines(tmp_path / "e.jsonl", [{"text": "t", "content": "x", "label": 1},
                                           {"content": "only content", "label": 0}])
    with pytest.raises(DataError, match=r"e.jsonl:2: missing field 'text'; the row has 'content', 'label'"):
        read_records(p, "classify")


def test_explicit_fields(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [{"body": "b", "y": "1", "who": "w", "text": "ignored"}])
    assert read_records(p, "classify", Fields(text="body", label="y", group="who")) == [Example("b", "1", "w")]
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'stars' \(Fields.label\) not found.*'body'"):
        read_records(p, "classify", Fields(label="stars"))
    p = write_lines(tmp_path / "e.jsonl", [{"body": "b", "label": "x", "src": "a"}, {"body": "c", "label": "y"}])
    with pytest.raises(DataError, match=r"e.jsonl:2: missing field 'src' \(group\)"):
        read_records(p, "classify", Fields(text="body", group="src"))  # explicit: required on every row


def test_missing_field_lists_tried_names(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [{"body": "b", "label": "x"}])
    with pytest.raises(DataError, match=r"d.jsonl:1: missing field 'text': tried 'text', 'sentence', "
                                        r"'content', 'review', 'document'.*columns 'body', 'label'"):
        read_records(p, "classify")


def test_fields_parse():
    assert Fields.parse("text=review, label=stars") == Fields(text="review", label="stars")
    assert Fields.parse(None) == Fields()
    with pytest.raises(ValueError, match="NAME=COLUMN"):
        Fields.parse("txt=review")


def test_labels_and_lm(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [{"text": "a", "label": 3}, {"text": "b", "label": " pos "}])
    assert [e.label for e in read_records(p, "classify")] == ["3", "pos"]
    lm = read_records(p, "lm")
    assert [(e.text, e.label) for e in lm] == [("a", ""), ("b", "")]
    q = D.write_jsonl(tmp_path / "lm.jsonl", lm)
    assert json.loads(q.read_text().splitlines()[0]) == {"text": "a"} and read_records(q, "lm") == lm


# ---------------------------------------------------------------- sft / dpo

def test_sft_alpaca_dolly(tmp_path):
    p = write_lines(tmp_path / "a.jsonl", [{"instruction": "Sum", "input": "1+2", "output": "3"},
                                           {"instruction": "Hi", "input": "", "output": "Hello"}])
    assert read_records(p, "sft") == [SFTExample("Sum", "3", "1+2"), SFTExample("Hi", "Hello")]
    p = write_table(tmp_path / "dolly.csv", [
        {"instruction": "Who?", "context": "Ada wrote it.", "response": "Ada", "category": "closed_qa"}])
    assert read_records(p, "sft") == [SFTExample("Who?", "Ada", "Ada wrote it.")]


def test_sft_chat(tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    share = [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]
    p = write_lines(tmp_path / "c.jsonl", [{"messages": msgs, "prompt": "Hi"}])
    assert read_records(p, "sft") == [SFTExample("2+2?", "4", system="Be brief.",
                                                 history=(("user", "Hi"), ("assistant", "Hello")))]
    p = write_lines(tmp_path / "s.jsonl", [{"conversations": [{"from": "system", "value": "S"}] + share}])
    assert read_records(p, "sft") == [SFTExample("Q", "A", system="S")]
    p = write_table(tmp_path / "c.csv", [{"messages": json.dumps(share)}])  # chat as JSON text in a cell
    assert read_records(p, "sft") == [SFTExample("Q", "A")]


@pytest.mark.parametrize("msgs, msg", [
    ([{"role": "user", "content": "Q"}], "must end with a user message, then the assistant"),
    ([{"role": "user", "content": "Q"}, {"role": "tool", "content": "x"}], "message 2 has role 'tool'"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": " "}], "last assistant message is empty"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": 4}], "message 2 content must be a string"),
    ([{"text": "Q"}], "message 1 has no 'role'"),
    ("hello", "must be a list of messages"),
])
def test_sft_chat_errors(tmp_path, msgs, msg):
    p = write_lines(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                         {"role": "assistant", "content": "b"}]},
                                           {"messages": msgs}])
    with pytest.raises(DataError, match=rf"c.jsonl:2: field 'messages'.*{msg}"):
        read_records(p, "sft")


def test_dpo(tmp_path):
    p = write_lines(tmp_path / "p.jsonl", [{"prompt": "P", "chosen": "good", "rejected": "bad", "user": "u"}])
    assert read_records(p, "dpo") == [PreferencePair("P", "good", "bad", "u")]
    conv = lambda a: [{"role": "user", "content": "Tell me"}, {"role": "assistant", "content": a}]  # noqa: E731
    p = write_lines(tmp_path / "uf.jsonl", [{"chosen": conv("yes"), "rejected": conv("no")}])
    assert read_records(p, "dpo") == [PreferencePair("Tell me", "yes", "no")]
    p = write_lines(tmp_path / "np.jsonl", [{"chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"np.jsonl:1: missing field 'prompt': tried 'prompt', 'question'"):
        read_records(p, "dpo")
    p = write_lines(tmp_path / "e.jsonl", [{"prompt": "P", "chosen": "a", "rejected": ""}])
    with pytest.raises(DataError, match=r"e.jsonl:1: field 'rejected' is empty"):
        read_records(p, "dpo")


def test_write_jsonl_roundtrips_every_type(tmp_path):
    sft = [SFTExample("Q", "A", "ctx", "sys", group="g"),
           SFTExample("Q2", "A2", "", "sys", (("user", "hi"), ("assistant", "yo"))),
           SFTExample("Q3", "A3", "in", "", (("user", "hi"), ("assistant", "yo")))]
    pairs = [PreferencePair("P", "c", "r", "g"), PreferencePair("P2", "c2", "r2")]
    ex = [Example("t", "l", "g"), Example("t2", "7")]
    for kind, recs in (("sft", sft[:1]), ("sft", sft[1:]), ("dpo", pairs), ("classify", ex)):
        assert read_records(D.write_jsonl(tmp_path / f"{kind}.jsonl", recs), kind) == recs
    with pytest.raises(TypeError):
        D.write_jsonl(tmp_path / "x.jsonl", [("a", "b")])


# ---------------------------------------------------------------- bad input

BAD = [  # (file name, content, kind, expected "name:line: ... field" pattern)
    ("d.jsonl", '{"text": "ok", "label": "a"}\n{"text": "ok", "label": "a"\n', "classify", r"d.jsonl:2: invalid JSON"),
    ("d.jsonl", '{"text": "ok", "label": "a"}\n["ok", 1]\n', "classify", r"d.jsonl:2: expected a JSON object"),
    ("d.jsonl", '{"text": "ok", "label": "a"}\n{"text": "ok"}\n', "classify", r"d.jsonl:2: missing field 'label'"),
    ("d.jsonl", '{"text": "ok", "label": "a"}\n{"text": 3, "label": "a"}\n', "classify",
     r"d.jsonl:2: field 'text' must be a string, got int"),
    ("d.jsonl", '{"text": "ok", "label": "a"}\n{"text": "  ", "label": "a"}\n', "classify", r"d.jsonl:2: field 'text' is empty"),
    ("d.jsonl", '{"text": "ok", "label": "a"}\n{"text": "x", "label": ""}\n', "classify", r"d.jsonl:2: field 'label' is empty"),
    ("d.jsonl", '{"text": "ok", "label": "a"}\n{"text": "x", "label": null}\n', "classify", r"d.jsonl:2: field 'label' is null"),
    ("d.jsonl", '{"text": "ok", "label": "a"}\n{"text": "x", "label": true}\n', "classify",
     r"d.jsonl:2: field 'label' must be .* boolean"),
    ("d.jsonl", '{"text": "ok", "label": "a"}\n{"text": "x", "label": 0.5}\n', "classify", r"d.jsonl:2: field 'label' must be"),
    ("d.jsonl", '{"text": "ok", "label": "a"}\n{"text": "x", "label": [1]}\n', "classify", r"d.jsonl:2: field 'label' must be"),
    ("d.jsonl", '{"text": "ok", "label": "a", "group": "g"}\n{"text": "x", "label": "a", "group": 1.5}\n', "classify",
     r"d.jsonl:2: field 'group' must be"),
    ("s.jsonl", '{"instruction": "q", "response": "a"}\n{"instruction": "q", "response": ""}\n', "sft",
     r"s.jsonl:2: field 'response' is empty"),
    ("s.jsonl", '{"instruction": "q", "output": "a"}\n{"instruction": "q"}\n', "sft",
     r"s.jsonl:2: missing field 'output' \(response\)"),
    ("d.csv", "text,label\nok,a\nbad\n", "classify", r"d.csv:3: row has 1 cells but the header has 2"),
    ("d.csv", "text,label\nok,a\n,b\n", "classify", r"d.csv:3: field 'text' is empty"),
    ("d.tsv", "text\tcategory\nok\t\n", "classify", r"d.tsv:2: field 'category' \(label\) is empty"),
    ("d.jsonl", "", "classify", r"d.jsonl: empty file"),
    ("d.jsonl", "\n \n", "classify", r"d.jsonl: empty file"),
    ("d.csv", "", "classify", r"d.csv: empty file"),
    ("d.csv", "text,label\n", "classify", r"d.csv: empty file"),
]


@pytest.mark.parametrize("name, content, kind, pattern", BAD)
def test_bad_input(tmp_path, name, content, kind, pattern):
    p = tmp_path / name
    p.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=pattern):
        read_records(p, kind)


@pytest.mark.parametrize("name", ["d.jsonl", "d.csv"])
def test_undecodable_bytes(tmp_path, name):
    p = tmp_path / name
    head = b'{"text": "ok", "label": "a"}\n' if name.endswith("jsonl") else b"text,label\n"
    bad = b'{"text": "caf\xe9", "label": "a"}\n' if name.endswith("jsonl") else b"caf\xe9,a\n"
    p.write_bytes(head + bad)
    offset = len(head) + bad.index(b"\xe9")
    with pytest.raises(DataError, match=rf"{name}:2: cannot decode byte 0xe9 at byte offset {offset}"):
        read_records(p, "classify")


def test_errors_collect(tmp_path):
    rows = ['{"text": "ok", "label": "a"}'] * 16 + ['{"text": "x", "label": ""}'] + [
        '{"text": "ok", "label": "a"}', "{oops", '{"text": 1, "label": "a"}', '{"label": "a"}']
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError) as ei:
        read_records(p, "classify")
    lines = str(ei.value).splitlines()
    assert lines[0] == f"{p}:17: field 'label' is empty (and 3 more bad rows)"
    assert [ln.split(": ")[0].strip() for ln in lines[1:]] == [f"{p}:19", f"{p}:20", f"{p}:21"]
    assert isinstance(ei.value, ValueError)
