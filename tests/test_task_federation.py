"""Every task kind through the device path: a federated job per kind whose replicas end
bit-identical, and the device side (readers of every format, validation, local ZO steps,
evaluation) in a process where torch cannot be imported."""
import json
import subprocess
import sys

import numpy as np
import pytest

from edgefed.data import (Example, SFTExample, iid_split, load_rotten_tomatoes,
                          rotten_tomatoes_pairs, write_jsonl)
from edgefed.federation import run_federation
from edgefed.methods import JobConfig
from edgefed.runtime import DeviceModel
from edgefed.simulate import thread_devices

TOPICS = ["world", "sports", "business", "science and tech"]  # one label of 3 tokens


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    """{kind: (artifact, train records, held-out records)} on the tiny model, LoRA trainables."""
    pytest.importorskip("torch")
    from edgefed.export import export_artifact
    from edgefed.models import load_model, tiny_random_model

    root = tmp_path_factory.mktemp("kinds")
    model, tok = load_model(tiny_random_model(root / "model", seed=0))
    rt = load_rotten_tomatoes()[:240]
    cls = [Example(e.text, TOPICS[i % 4]) for i, e in enumerate(rt)]
    sft = [SFTExample("What is the sentiment of this review?", e.label, input=e.text) for e in rt]
    dpo = [p for p in rotten_tomatoes_pairs(load_rotten_tomatoes(), seed=0)
           if max(len(p.chosen), len(p.rejected)) < 110][:120]
    data = write_jsonl(root / "cls.jsonl", cls)
    out = {}
    for kind, task, recs in [("classify", "classify:labels=auto", cls), ("sft", "sft", sft), ("dpo", "dpo", dpo)]:
        art = export_artifact(model, root / kind, "lora:r=2,targets=q_proj,v_proj", task, tokenizer=tok,
                              progress=False, data=data if kind == "classify" else None)
        out[kind] = (art, recs[:-24], recs[-24:])
    return out


@pytest.mark.parametrize("kind", ["classify", "sft", "dpo"])
def test_a_federated_job_of_each_kind_ends_bit_identical(kinds, kind, tmp_path):
    art, train, held = kinds[kind]
    job = JobConfig(job=f"k-{kind}", method="fedkseed", artifact=str(art), rounds=2, devices_per_round=3,
                    min_devices=3, round_timeout=60, lr=1e-2, eps=1e-3, local_steps=3, batch_size=4, k=256)
    base = DeviceModel(art, threads=1, batch_size=4, seq_len=96, check_memory=False)
    starter = thread_devices(base, job.job, iid_split(train, 3))
    res = run_federation(job, art, held, broker_url=f"inproc://{job.job}", start_devices=starter,
                         out_dir=tmp_path, eval_n=12, progress=False, generate_n=4 if kind == "sft" else 0, seq_len=96)
    assert res.rounds_completed == 2
    assert not np.array_equal(res.final_params, base.params), "training changed nothing"
    for agent in starter.agents:  # devices and the server's global model: same bits
        np.testing.assert_array_equal(agent.model.params, res.final_params)
    saved = json.loads((tmp_path / "results.json").read_text())
    if kind == "sft":
        assert saved["gain"]["metric"] == "loss" and "rouge_l" in saved["after"]
        assert 0.0 <= saved["after"]["rouge_l"] <= 1.0 and saved["after"]["perplexity"] > 1
    else:
        assert saved["gain"]["metric"] == "accuracy" and saved["gain"]["n"] == len(held)
    if kind == "classify":
        assert saved["after"]["macro_f1"] is not None and len(saved["after"]["confusion"]) == 4
        assert (tmp_path / "confusion.png").stat().st_size > 1000
    if kind == "dpo":
        assert "reward_margin" in saved["after"] and "preference_accuracy" in saved["after"]


_DEVICE_SCRIPT = r'''
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "transformers", "pandas"):
            raise ImportError(f"{name} is blocked: devices have no torch")
sys.meta_path.insert(0, Block())
from edgefed.data import DataError, read_records
from edgefed.runtime import DeviceModel
from edgefed.tasks import TooLong
from edgefed.trainer import LocalTrainer
from edgefed.zo import SeedPool, ZOConfig
cfg = json.loads(sys.argv[1])
out = {}
for kind, (art, files) in cfg["kinds"].items():
    m = DeviceModel(art, threads=1, batch_size=4, seq_len=96, check_memory=False)
    for fmt, path in files.items():
        recs = read_records(path, kind)
        m.task.validate(recs)
        before = m.params.copy()
        LocalTrainer(m, SeedPool(0, 64), ZOConfig(lr=1e-2, eps=1e-3), progress=False).train(recs, 2, batch_size=4)
        ev = m.evaluate(recs[:8])
        out[f"{kind}/{fmt}"] = {"n": len(recs), "moved": bool((m.params != before).any()), "loss": ev["loss"]}
errors = {}
for name, path in cfg["bad"].items():
    try:
        kind = "sft" if name.startswith("sft") else "classify"
        recs = read_records(path, kind)
        DeviceModel(cfg["kinds"][kind][0], threads=1, seq_len=48, check_memory=False).task.validate(recs)
        errors[name] = None
    except (DataError, TooLong, ValueError) as e:
        errors[name] = str(e)
out["errors"] = errors
out["torch_loaded"] = "torch" in sys.modules
print(json.dumps(out))
'''


def _write_formats(root, name, records):
    """The same rows as JSONL, CSV, TSV and Parquet (flat columns)."""
    import csv

    files = {"jsonl": write_jsonl(root / f"{name}.jsonl", records)}
    rows = [json.loads(line) for line in files["jsonl"].read_text().splitlines()]
    cols = sorted({k for r in rows for k in r})
    for fmt, delim in (("csv", ","), ("tsv", "\t")):
        p = root / f"{name}.{fmt}"
        with open(p, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, cols, delimiter=delim)
            w.writeheader()
            w.writerows(rows)
        files[fmt] = p
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({c: [r.get(c, "") for r in rows] for c in cols}), root / f"{name}.parquet")
    files["parquet"] = root / f"{name}.parquet"
    return {k: str(v) for k, v in files.items()}


def test_the_device_path_runs_every_kind_and_format_without_torch(kinds, tmp_path):
    cfg = {"kinds": {}, "bad": {}}
    for kind in ("classify", "sft", "dpo"):
        art, train, _ = kinds[kind]
        recs = train[:12]
        if kind == "sft":  # flat columns for CSV/Parquet: no history
            recs = [SFTExample(r.instruction, r.response, input=r.input) for r in recs]
        cfg["kinds"][kind] = (str(art), _write_formats(tmp_path, kind, recs))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "label.jsonl").write_text('{"text": "fine", "label": "world"}\n{"text": "rain", "label": "weather"}\n')
    (bad / "empty.jsonl").write_text('{"text": "", "label": "world"}\n')
    (bad / "type.jsonl").write_text('{"text": ["a"], "label": "world"}\n')
    (bad / "bytes.jsonl").write_bytes(b'{"text": "ok", "label": "world"}\n{"text": "\xff\xfe", "label": "world"}\n')
    (bad / "sft_long.jsonl").write_text(json.dumps({"instruction": "q", "response": "word " * 80}) + "\n")
    cfg["bad"] = {p.stem: str(p) for p in bad.iterdir()}
    r = subprocess.run([sys.executable, "-c", _DEVICE_SCRIPT, json.dumps(cfg)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert not out["torch_loaded"]
    for kind in ("classify", "sft", "dpo"):
        for fmt in ("jsonl", "csv", "tsv", "parquet"):
            row = out[f"{kind}/{fmt}"]
            assert row["n"] == 12 and row["moved"] and np.isfinite(row["loss"]), (kind, fmt, row)
    err = out["errors"]
    assert "label.jsonl:2" in err["label"] and "weather" in err["label"]
    assert "empty.jsonl:1" in err["empty"] and "text" in err["empty"]
    assert "type.jsonl:1" in err["type"] and "text" in err["type"]
    assert "bytes.jsonl:2" in err["bytes"]
    assert "sft_long.jsonl:1" in err["sft_long"] and "seq_len" in err["sft_long"]
