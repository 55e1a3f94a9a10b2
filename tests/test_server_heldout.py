"""`edgefed server --heldout`: the server evaluates the global model on held-out rows at round 0,
every N rounds and after the last round, in one background worker that follows the stored
deltas in order (server/evaluation.py). Real jobs: the tiny exported model, virtual devices on
the in-process transport."""
from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.request

import numpy as np
import pytest

from edgefed.data import iid_split, load_rotten_tomatoes, train_heldout_split, write_jsonl
from edgefed.methods import JobConfig
from edgefed.runtime import DeviceModel
from edgefed.simulate import thread_devices
from edgefed.transport import make_transport
from edgefed_server.cli import add_server_args, run_server
from edgefed_server.engine import Server
from edgefed_server.evaluation import HeldoutEvaluator
from edgefed_server.store import Store


@pytest.fixture(scope="module")
def data():
    train, held = train_heldout_split(load_rotten_tomatoes(), heldout=40, seed=0)
    return train[:240], held


def _job(name, art, rounds, n=2):
    return JobConfig(job=name, method="fedkseed", artifact=str(art), rounds=rounds, devices_per_round=n,
                     min_devices=n, round_timeout=60.0, lr=1e-2, eps=1e-3, local_steps=4, batch_size=8,
                     k=1024, seed_pool_id=7)


def _base(art):
    return DeviceModel(art, threads=1, batch_size=8, seq_len=32, check_memory=False)


def _server_args(argv):
    p = argparse.ArgumentParser()
    add_server_args(p)
    return p.parse_args(argv)


def test_evaluator_follows_the_job_without_blocking_the_engine(tiny_artifacts, data, tmp_path):
    """Round 0's evaluation is held back until the whole job has run: the engine finished every
    round meanwhile (its listener never waited), then the worker caught up in order, evaluated
    rounds 0, 2, 4 and 5, and ends on exactly the devices' parameters."""
    train, held = data
    art = tiny_artifacts["lora"]
    job = _job("heldout-api", art, rounds=5)
    out = tmp_path / "eval.json"
    ev = HeldoutEvaluator(art, job, held, every=2, out_path=out)
    gate, evaluated = threading.Event(), []
    real_evaluate = ev.glob.evaluate

    def gated_evaluate(records, **kw):
        gate.wait(60)
        evaluated.append(ev.rounds_applied)
        return real_evaluate(records, **kw)
    ev.glob.evaluate = gated_evaluate

    starter = thread_devices(_base(art), job.job, iid_split(train, 2))
    store = Store(tmp_path / "server.db")
    transport = make_transport(f"inproc://{job.job}", client_id=f"edgefed-server-{job.job}")
    server = Server(transport, store, job, http_port=0)
    ev.attach(server)
    halt = starter(f"inproc://{job.job}")
    try:
        server.start()
        ev.start()
        summary = server.run(timeout=60)
        assert summary["done"] and summary["rounds_completed"] == 5
        assert ev.rounds_applied == 0 and evaluated == []  # still held at round 0
        gate.set()
        assert ev.wait(60) and ev.error is None
        assert evaluated == [0, 2, 4, 5]
        st = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/status", timeout=10).read())
        e = st["evaluation"]
        assert e["done"] and e["metric"] == "accuracy" and e["rounds_applied"] == 5
        assert [h["round"] for h in e["history"]] == [0, 2, 4, 5]
        assert e["latest"]["round"] == 5 and "correct" not in e["latest"]["metrics"]
        assert e["comparison"]["to_round"] == 5 and e["comparison"]["final"]
    finally:
        gate.set()
        halt()
        ev.stop()
        server.stop()
        transport.close()
        store.close()
    for agent in starter.agents:
        assert agent.final_round == 5
        assert np.array_equal(agent.model.params, ev.model.params)  # same deltas, same order, same kernels
    assert not np.array_equal(ev.model.params, _base(art).params), "training changed nothing"

    saved = json.loads(out.read_text())
    assert saved["done"] and saved["job"] == job.job and saved["n"] == len(held)
    assert [h["round"] for h in saved["history"]] == [0, 2, 4, 5]
    for h in saved["history"]:
        assert 0.0 <= h["value"] <= 1.0 and h["loss"] > 0 and h["metric"] == "accuracy"
    g = saved["comparison"]
    assert g["metric"] == "accuracy" and g["n"] == len(held) and g["from_round"] == 0 and g["to_round"] == 5
    assert g["before"] == saved["history"][0]["value"] and g["after"] == saved["history"][-1]["value"]
    assert g["gain"] == pytest.approx(g["after"] - g["before"])
    assert "ci_low" in g and "ci_high" in g and "macro_f1" in g
    assert not list(tmp_path.glob("eval.json.*.tmp"))  # atomic writes leave no temp files


def test_resume_replays_the_stored_rounds_before_continuing(tiny_artifacts, data, tmp_path):
    """Stop the server after 2 of 4 rounds, restart on the same store: the new evaluator replays
    the stored rounds from round 0, reuses round 2's evaluation from the file (round 0 is
    evaluated again: the comparison needs its per-row results), continues with the live rounds
    and ends bit-identical to the devices."""
    train, held = data
    art = tiny_artifacts["lora"]
    job = _job("heldout-resume", art, rounds=4)
    out, url = tmp_path / "eval.json", f"inproc://{job.job}"
    starter = thread_devices(_base(art), job.job, iid_split(train, 2))
    halt = starter(url)
    for agent in starter.agents:  # updates sent while no server listens: re-sent after this
        agent.ack_timeout = 1.0
    try:
        store = Store(tmp_path / "server.db")
        t1 = make_transport(url, client_id=f"edgefed-server-{job.job}")
        s1 = Server(t1, store, job)
        ev1 = HeldoutEvaluator(art, job, held, every=2, out_path=out).attach(s1)
        s1.start()
        ev1.start()
        assert s1.run(until_round=2, timeout=60)["round"] >= 2
        s1.stop()
        t1.close()
        stopped_at = s1.round
        deadline = time.monotonic() + 60
        while 2 not in [h["round"] for h in ev1.history] and time.monotonic() < deadline:
            time.sleep(0.05)
        ev1.stop(60)
        first = {h["round"]: h for h in json.loads(out.read_text())["history"]}
        assert sorted(first) == [0, 2]

        t2 = make_transport(url, client_id=f"edgefed-server-{job.job}")
        s2 = Server(t2, store, job)
        ev2 = HeldoutEvaluator(art, job, held, every=2, out_path=out).attach(s2)
        s2.start()
        assert s2.round == stopped_at
        ev2.start()
        assert s2.run(timeout=60)["done"]
        assert ev2.wait(60) and ev2.error is None
        halt()  # the devices fetch the final round's delta from s2, then leave
        s2.stop()
        t2.close()
        store.close()
    finally:
        halt()
    saved = json.loads(out.read_text())
    hist = {h["round"]: h for h in saved["history"]}
    assert sorted(hist) == [0, 2, 4] and saved["done"]
    assert hist[2]["at"] == first[2]["at"]  # known before the restart: reused, not evaluated again
    assert hist[0]["value"] == first[0]["value"] and hist[2]["value"] == first[2]["value"]
    assert saved["comparison"]["to_round"] == 4
    for agent in starter.agents:
        assert agent.final_round == 4
        assert np.array_equal(agent.model.params, ev2.model.params)


def test_cli_heldout_writes_the_eval_file_and_resume_replays(tiny_artifacts, data, tmp_path, capsys):
    train, held = data
    art = tiny_artifacts["lora"]
    held_file = write_jsonl(tmp_path / "held.jsonl", held)
    db = tmp_path / "cli.db"
    url = "inproc://heldout-cli"
    argv = ["--job", "heldout-cli", "--artifact", str(art), "--broker", url, "--db", str(db), "--rounds", "3",
            "--local-steps", "4", "--lr", "1e-2", "--k", "1024", "--seed-pool-id", "7", "--min-devices", "2",
            "--devices-per-round", "2", "--round-timeout", "60", "--linger", "10",
            "--heldout", str(held_file), "--eval-every", "2"]
    starter = thread_devices(_base(art), "heldout-cli", iid_split(train, 2))
    halt = starter(url)
    codes = []
    th = threading.Thread(target=lambda: codes.append(run_server(_server_args(argv))))
    th.start()
    th.join(90)
    halt()
    assert codes == [0]
    out = capsys.readouterr().out
    assert "held-out accuracy (40 rows)" in out and "gain" in out
    saved = json.loads((tmp_path / "cli.db.eval.json").read_text())
    assert [h["round"] for h in saved["history"]] == [0, 2, 3] and saved["done"]
    assert saved["heldout"] == str(held_file) and saved["comparison"]["to_round"] == 3

    # --resume of the finished job: the evaluator replays all 3 stored rounds, reuses round 2
    assert run_server(_server_args(argv + ["--resume", "--eval-out", str(tmp_path / "cli.db.eval.json")])) == 0
    again = json.loads((tmp_path / "cli.db.eval.json").read_text())
    assert [h["round"] for h in again["history"]] == [0, 2, 3]
    assert again["history"][1]["at"] == saved["history"][1]["at"]
    assert again["history"][2]["value"] == saved["history"][2]["value"]
    assert again["comparison"]["gain"] == saved["comparison"]["gain"]


@pytest.mark.parametrize("row,why", [('{"text": "fine film"}', "label"),
                                     ('{"text": "fine film", "label": "neutral"}', "neutral")])
def test_cli_bad_heldout_row_exits_2_before_the_server_starts(tiny_artifacts, tmp_path, capsys, row, why):
    held = tmp_path / "held.jsonl"
    held.write_text('{"text": "a good film", "label": "positive"}\n'
                    '{"text": "a bad film", "label": "negative"}\n' + row + "\n")
    db = tmp_path / "bad.db"
    argv = ["--job", "bad", "--artifact", str(tiny_artifacts["lora"]), "--broker", "mqtt://127.0.0.1:1",
            "--db", str(db), "--heldout", str(held)]
    assert run_server(_server_args(argv)) == 2
    err = capsys.readouterr().err
    assert "held.jsonl:3" in err and why in err
    assert not Store(db).has_job("bad")  # nothing started


def test_cli_heldout_needs_an_artifact(tmp_path, capsys):
    held = tmp_path / "held.jsonl"
    held.write_text('{"text": "a good film", "label": "positive"}\n')
    argv = ["--job", "noart", "--broker", "mqtt://127.0.0.1:1", "--db", str(tmp_path / "x.db"),
            "--heldout", str(held)]
    assert run_server(_server_args(argv)) == 2
    assert "--heldout needs --artifact" in capsys.readouterr().err
    assert run_server(_server_args(argv + ["--artifact", "x", "--eval-every", "0"])) == 2
    assert "--eval-every must be >= 1" in capsys.readouterr().err


def test_compare_and_scalar_metrics_per_task_kind():
    """classify/dpo pair per-row correctness, sft/lm per-row loss; arrays never reach the JSON."""
    from edgefed_server.evaluation import compare_evaluations, scalar_metrics
    y = np.array([0, 1, 0, 1])
    before = {"correct": np.array([1, 0, 0, 1], bool), "predictions": np.array([0, 0, 1, 1]), "targets": y}
    after = {"correct": np.array([1, 1, 1, 1], bool), "predictions": y.copy(), "targets": y}
    c = compare_evaluations(before, after, n_classes=2)
    assert c["metric"] == "accuracy" and c["gain"] == 0.5 and c["fixed"] == 2 and c["macro_f1"]["after"] == 1.0
    d = compare_evaluations({"correct": np.array([0, 1], bool), "margins": np.zeros(2)},
                            {"correct": np.array([1, 1], bool), "margins": np.ones(2)})
    assert d["metric"] == "preference_accuracy" and d["gain"] == 0.5
    s = compare_evaluations({"example_loss": np.array([2.0, 3.0, 4.0])}, {"example_loss": np.array([1.5, 2.5, 3.0])})
    assert s["metric"] == "loss" and s["gain"] == pytest.approx(-2 / 3)
    m = scalar_metrics({"loss": np.float32(0.5), "accuracy": 0.75, "correct": before["correct"],
                        "accuracy_ci": (0.2, 0.9), "perplexity": float("inf")})
    assert m == {"loss": 0.5, "accuracy": 0.75, "accuracy_ci": [0.2, 0.9], "perplexity": None}
    json.dumps(m, allow_nan=False)
