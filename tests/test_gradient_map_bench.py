"""benchmarks/gradient_map.py: the mask prediction's arithmetic, and the tool end to end on the
tiny model, where LoRA's start fixes part of the answer (B = 0, so A's gradient is exactly 0)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gm():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gradient_map
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return gradient_map


def test_a_subsets_predicted_progress_is_its_share_of_the_gradient_over_its_share_of_dimensions():
    gm = _gm()
    tensors = [{"name": "model.layers.0.a", "offset": 0, "numel": 10},
               {"name": "model.layers.1.a", "offset": 10, "numel": 10},
               {"name": "model.layers.0.b", "offset": 20, "numel": 60}]
    g = np.zeros(80)
    g[0:10] = 3.0   # layer 0's a: 90 of |g|^2 = 100
    g[20] = 1.0     # one coordinate of b: 1
    g[10:19] = 1.0  # layer 1's a: 9
    rows = gm.tensor_rows(tensors, g, g * g * 2)  # a batch's squared gradient: twice the mean's
    assert [r["share"] for r in rows] == pytest.approx([0.9, 0.09, 0.01])
    assert all(r["signal"] == pytest.approx(0.5) for r in rows)
    subs = {s["subset"]: s for s in gm.subsets(rows, ["a$"])}
    assert subs["all (plain MeZO)"]["predicted_x"] == pytest.approx(1.0)
    # a's two tensors: 99% of |g|^2 in 25% of the dimensions -> 3.96x plain MeZO's progress a forward
    assert subs["mask_tensors=a$"]["predicted_x"] == pytest.approx(0.99 / 0.25)
    assert subs["mask_tensors=a$"]["tensors"] == 2
    assert subs["group model.layers.*.a"]["predicted_x"] == pytest.approx(0.99 / 0.25)
    assert subs["group model.layers.*.b"]["predicted_x"] == pytest.approx(0.01 / 0.75)


def test_the_gradient_map_runs_on_the_tiny_model_and_finds_no_gradient_in_loras_a(tmp_path):
    pytest.importorskip("torch")
    js = tmp_path / "g.json"
    r = subprocess.run([sys.executable, "benchmarks/gradient_map.py", "--model", "tiny", "--batches", "2",
                        "--threads", "1", "--json", str(js), "--plot", str(tmp_path / "g.png")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(js.read_text())
    shares = {t["name"]: t["share"] for t in res["tensors"]}
    assert sum(shares.values()) == pytest.approx(1.0)
    assert all(v == 0.0 for n, v in shares.items() if n.endswith("lora_A")), "B = 0 at the start: A gets no gradient"
    subs = {s["subset"]: s for s in res["subsets"]}
    assert subs["mask_tensors=lora_B"]["share"] == pytest.approx(1.0)
    assert subs["mask_tensors=lora_B"]["predicted_x"] == pytest.approx(1 / subs["mask_tensors=lora_B"]["dim_share"])
    assert "| mask_tensors=lora_B |" in r.stdout and (tmp_path / "g.png").exists()
    bad = subprocess.run([sys.executable, "benchmarks/gradient_map.py", "--model", "tiny", "--template", "no text"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "has no {text}" in bad.stderr
