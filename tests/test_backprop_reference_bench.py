"""benchmarks/backprop_reference.py at a small scale (tiny random model), and the optimiser state
it keeps across scored slices (edgefed.methods.fedavg.backprop_steps' opt_state)."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]


def test_the_backprop_reference_runs_end_to_end_and_rebuilds_its_table(tmp_path):
    js = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "benchmarks/backprop_reference.py", "--model", "tiny", "--steps", "4",
                        "--evals", "2", "--lrs", "1e-3", "--readout-epochs", "6", "--heldout", "40",
                        "--json", str(js), "--plot", str(tmp_path / "p.png")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    # the readout refuses to run (non-zero exit) unless its frozen features predict as the graph does
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(js.read_text())
    assert res["n_heldout"] == 40 and len(res["zero_shot"]["correct"]) == 40
    bp = [x for x in res["rows"] if x["row"].startswith("backprop")]
    assert [x["step"] for x in bp] == [2, 4]
    assert bp[-1]["loss"] < res["zero_shot"]["loss"], "AdamW on the training rows lowers held-out loss"
    ro = [x for x in res["rows"] if x["row"] == "readout"]
    assert [x["step"] for x in ro] == [1, 2, 3, 4, 5, 6]
    for x in res["rows"]:  # paired against the same rows' zero-shot
        assert x["gain"]["gain"] == pytest.approx(x["accuracy"] - res["zero_shot"]["accuracy"])
    assert (tmp_path / "p.png").exists()
    again = subprocess.run([sys.executable, "benchmarks/backprop_reference.py", "--from-json", str(js)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout == r.stdout


class _Bowl:
    """A model whose loss is sum(flat^2) whatever the batch: only the optimiser's state matters."""
    def encode(self, rows):
        return rows

    def loss_tensor(self, batch, flat):
        return (flat ** 2).sum()


def test_backprop_steps_keep_adamw_state_across_slices_only_when_asked():
    from edgefed.methods.fedavg import backprop_steps, plan_settings

    s = plan_settings({"optimizer": "adamw"})
    plan = lambda n: SimpleNamespace(local_steps=n, batch_size=2, lr=0.1, round=0, params={})  # noqa: E731
    start = torch.tensor([1.0, -2.0, 3.0])
    one = start.clone().requires_grad_(True)
    backprop_steps(_Bowl(), [0, 1, 2], plan(6), 0, one, s)
    kept, state = start.clone().requires_grad_(True), {}
    for i in range(2):
        backprop_steps(_Bowl(), [0, 1, 2], plan(3), i, kept, s, opt_state=state)
    assert torch.equal(kept, one), "two slices sharing opt_state are one run of 6 steps"
    fresh = start.clone().requires_grad_(True)
    for i in range(2):
        backprop_steps(_Bowl(), [0, 1, 2], plan(3), i, fresh, s)
    assert not torch.equal(fresh, one), "a fresh AdamW per slice restarts its moments and bias correction"


def test_a_federated_jobs_store_is_rebuilt_and_scored_on_the_same_rows(tmp_path):
    """--store replays a job's stored round deltas: the model it scores is the one the job
    itself reported after training, and a job of another template is refused."""
    sim = tmp_path / "sim"
    r = subprocess.run([sys.executable, "-m", "edgefed.cli", "simulate", "--model", "tiny", "--rounds", "2",
                        "--local-steps", "4", "--devices", "2", "--lr", "0.05", "--out", str(sim), "--no-progress"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    job = json.loads((sim / "results.json").read_text())
    assert job["after"]["loss"] != job["before"]["loss"], "the job moved the model"
    js = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "benchmarks/backprop_reference.py", "--model", "tiny", "--steps", "1",
                        "--evals", "1", "--lrs", "1e-3", "--readout-epochs", "0", "--heldout", "500",
                        "--json", str(js), "--store", f"sim job={sim / 'server.sqlite'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(js.read_text())
    assert res["zero_shot"]["loss"] == pytest.approx(job["before"]["loss"], rel=1e-6)  # the same 500 rows
    (stored,) = res["jobs"]
    assert stored["loss"] == pytest.approx(job["after"]["loss"], rel=1e-6)
    assert stored["accuracy"] == job["after"]["accuracy"]
    assert f"| sim job | {job['after']['accuracy']:.1%} | backprop lr 0.001 seed 0 | 1 |" in r.stdout  # paired with the row
    bad = json.loads(js.read_text())
    bad["template"] = "Text: {text}\nLabel:"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    refused = subprocess.run([sys.executable, "benchmarks/backprop_reference.py", "--from-json", str(tmp_path / "bad.json"),
                              "--store", f"x={sim / 'server.sqlite'}"], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode != 0 and "used the template" in refused.stderr
