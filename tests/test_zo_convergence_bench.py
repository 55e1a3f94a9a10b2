"""benchmarks/zo_convergence.py at a small scale (tiny random model): the whole path of the
benchmark runs, spends the forward budget it was given, and reports per-seed intervals."""
import json
import numpy as np
import pytest
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_convergence_benchmark_runs_end_to_end_at_a_small_scale(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "benchmarks/zo_convergence.py", "--model", "tiny", "--forwards", "32",
                        "--seeds", "2", "--variants", "mezo,lora-b,adaptive", "--settings", "central,fed4-dir",
                        "--eval-n", "40", "--evals", "2", "--out", str(out), "--json", str(tmp_path / "r.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "r.json").read_text())
    assert len(res["runs"]) == 3 * 2 * 2
    for run in res["runs"]:
        assert run["curve"][0]["forwards"] == 0 and len(run["curve"]) == 3  # the start + 2 evaluations
        budget = 32 if run["variant"] != "adaptive" else 64  # adaptive spends between 2 and 4 probes a step
        assert 0 < run["forwards"] <= budget, run
    from edgefed.metrics import classification_metrics
    for run in res["runs"]:  # every evaluation keeps its predictions and their macro-F1
        for point in run["curve"]:
            pred, ok = np.array(point["predictions"]), np.array(point["correct"], bool)
            assert len(pred) == 40 and point["accuracy"] == pytest.approx(ok.mean())
            y = np.where(ok, pred, 1 - pred)  # two labels: a wrong prediction names the other one
            assert point["macro_f1"] == pytest.approx(classification_metrics(y, pred, 2)["macro_f1"])
    rows = {(x["setting"], x["variant"]): x for x in res["rows"]}
    mezo = rows[("central", "mezo")]
    finals = [run["curve"][-1]["macro_f1"] for run in res["runs"] if run["setting"] == "central"
              and run["variant"] == "mezo"]
    assert mezo["macro_f1"] == pytest.approx(np.mean(finals))
    assert mezo["seeds"] == 2 and 0.0 <= mezo["ratio_to_mezo"] <= 1.0, "MeZO reaches its own final within its budget"
    assert "| central | lora-b |" in r.stdout
    assert (out / "zo_convergence.png").exists()


def test_server_optimisers_get_several_rounds_per_evaluation(tmp_path):
    r = subprocess.run([sys.executable, "benchmarks/zo_convergence.py", "--model", "tiny", "--forwards", "48",
                        "--seeds", "1", "--variants", "mezo,momentum,momentum+server_momentum=0",
                        "--settings", "fed2-iid", "--eval-n", "40",
                        "--evals", "2", "--rounds-per-eval", "3", "--out", str(tmp_path / "run"),
                        "--json", str(tmp_path / "r.json")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = {run["variant"]: run for run in json.loads((tmp_path / "r.json").read_text())["runs"]}
    for run in runs.values():
        assert run["rounds"] == 6 and run["local_steps"] == 2, run  # 24 steps over 6 rounds x 2 devices
        assert [c["round"] for c in run["curve"]] == [-1, 2, 5], "scored after every third round"
        assert run["forwards"] == 48
    # "+KEY=VALUE" reaches the job: FedAvgM with momentum 0 and server_lr 1 is plain averaging
    loss = {v: [c["loss"] for c in run["curve"]] for v, run in runs.items()}
    assert loss["momentum+server_momentum=0"] == pytest.approx(loss["mezo"], rel=1e-5, abs=1e-6)
    assert loss["momentum"][-1] != pytest.approx(loss["mezo"][-1], rel=1e-5, abs=1e-6)


def test_a_variant_at_a_multiple_of_its_step_and_bad_names_refused():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import zo_convergence as zc
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert zc.variant_params("lora-b@2") == {"mask_tensors": "lora_B", "lr_x": 4.0}  # lora-b's own x2, times 2
    assert zc.variant_params("mezo@0.5") == {"lr_x": 0.5}
    assert zc.variant_params("mezo") == {}
    assert zc.variant_params("lora-b-x4@2+lr_decay=0.9+mask_tensors=lora_A") == {
        "mask_tensors": "lora_A", "lr_x": 8.0, "lr_decay": 0.9}  # +KEY=VALUE adds or overrides job params
    for bad in ("nope", "mezo@", "mezo@x", "mezo@0", "mezo@-1", "mezo+lr_decay", "mezo+=1", "nope+k=1"):
        with pytest.raises(KeyError):
            zc.variant_params(bad)
    r = subprocess.run([sys.executable, "benchmarks/zo_convergence.py", "--model", "tiny", "--variants", "mezo,mezo@x"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "mezo@x" in r.stderr and "NAME@F" in r.stderr
    r = subprocess.run([sys.executable, "benchmarks/zo_convergence.py", "--model", "tiny", "--template", "Review:"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "has no {text}" in r.stderr


def _saved(path, trainable, variant, lr, losses, accs, seeds=(0, 1)):
    """A saved run in the benchmark's --json format: 200 held-out rows scored at 0/100/200 forwards."""
    runs = []
    for seed in seeds:
        curve = [{"forwards": 100 * i, "round": i - 1, "accuracy": a, "loss": l + 0.001 * seed,
                  "correct": [1] * int(200 * a) + [0] * (200 - int(200 * a))}
                 for i, (l, a) in enumerate(zip(losses, accs))]
        runs.append({"variant": variant, "setting": "central", "seed": seed, "lr": lr, "k": 4096, "local_steps": 10,
                     "rounds": 2, "devices": 1, "curve": curve, "wall_s": 1.0, "bytes_up": 100, "bytes_down": 300,
                     "forwards": 200})
    path.write_text(json.dumps({"config": {"trainable": trainable, "task": "sentiment"}, "runs": runs}))
    return path


def test_saved_runs_of_other_trainables_merge_against_the_first_files_mezo(tmp_path):
    """--from-json A,B: seeds and trainables saved by separate invocations form one table; rows
    keep their trainable and step apart, and MeZO of the first file is every row's baseline."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import zo_convergence as zc
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    lora = _saved(tmp_path / "lora.json", "lora:r=8", "mezo", 1e-3, [0.50, 0.49, 0.48], [0.75, 0.76, 0.78])
    more = _saved(tmp_path / "more.json", "lora:r=8", "mezo", 1e-3, [0.50, 0.49, 0.48], [0.75, 0.76, 0.78],
                  seeds=(2,))
    prompt = _saved(tmp_path / "prompt.json", "prompt:tokens=8", "mezo@8", 8e-3, [0.47, 0.45, 0.44],
                    [0.78, 0.80, 0.80])
    rows = zc.summarise(zc.load_runs([lora, more, prompt]))
    assert [(r["variant"], r["seeds"]) for r in rows] == [("lora mezo", 3), ("prompt mezo@8", 2)]
    base, soft = rows
    assert base["baseline"] and not soft["baseline"]
    assert soft["to_mezo_final"] == 0 and soft["to_mezo_loss"] == 0  # starts past the baseline's final
    r = subprocess.run([sys.executable, "benchmarks/zo_convergence.py", "--from-json", f"{lora},{prompt}",
                        "--plot", str(tmp_path / "m.png")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "| prompt mezo@8 | 0.008 |" in r.stdout and (tmp_path / "m.png").exists(), r.stderr
    assert "| - | 100 / 300 |" in r.stdout  # runs saved without macro-F1 leave its column empty
    bad = subprocess.run([sys.executable, "benchmarks/zo_convergence.py", "--from-json", str(tmp_path / "none.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "none.json" in bad.stderr and "--json" in bad.stderr
