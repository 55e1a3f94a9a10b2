"""benchmarks/zo_convergence.py at a small scale (tiny random model): the whole path of the
benchmark runs, spends the forward budget it was given, and reports per-seed intervals."""
import json
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
    rows = {(x["setting"], x["variant"]): x for x in res["rows"]}
    mezo = rows[("central", "mezo")]
    assert mezo["seeds"] == 2 and 0.0 <= mezo["ratio_to_mezo"] <= 1.0, "MeZO reaches its own final within its budget"
    assert "| central | lora-b |" in r.stdout
    assert (out / "zo_convergence.png").exists()


def test_server_optimisers_get_several_rounds_per_evaluation(tmp_path):
    r = subprocess.run([sys.executable, "benchmarks/zo_convergence.py", "--model", "tiny", "--forwards", "48",
                        "--seeds", "1", "--variants", "mezo,momentum", "--settings", "fed2-iid", "--eval-n", "40",
                        "--evals", "2", "--rounds-per-eval", "3", "--out", str(tmp_path / "run"),
                        "--json", str(tmp_path / "r.json")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for run in json.loads((tmp_path / "r.json").read_text())["runs"]:
        assert run["rounds"] == 6 and run["local_steps"] == 2, run  # 24 steps over 6 rounds x 2 devices
        assert [c["round"] for c in run["curve"]] == [-1, 2, 5], "scored after every third round"
        assert run["forwards"] == 48


def test_a_variant_at_a_multiple_of_its_step_and_bad_names_refused():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import zo_convergence as zc
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert zc.variant_params("lora-b@2") == {"mask_tensors": "lora_B", "lr_x": 4.0}  # lora-b's own x2, times 2
    assert zc.variant_params("mezo@0.5") == {"lr_x": 0.5}
    assert zc.variant_params("mezo") == {}
    for bad in ("nope", "mezo@", "mezo@x", "mezo@0", "mezo@-1"):
        with pytest.raises(KeyError):
            zc.variant_params(bad)
    r = subprocess.run([sys.executable, "benchmarks/zo_convergence.py", "--model", "tiny", "--variants", "mezo,mezo@x"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "mezo@x" in r.stderr and "NAME@F" in r.stderr
