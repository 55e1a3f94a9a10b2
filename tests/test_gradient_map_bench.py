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
    zhz = np.zeros(80)
    zhz[0:10] = 0.8   # tr(H) 8 in layer 0's a, 1 in layer 1's a, 1 in b: curvature where the gradient is
    zhz[10:20] = 0.1
    zhz[20:30] = 0.1
    rows = gm.tensor_rows(tensors, g, g * g * 2, zhz)  # a batch's squared gradient: twice the mean's
    assert [r["share"] for r in rows] == pytest.approx([0.9, 0.09, 0.01])
    assert [r["curv_share"] for r in rows] == pytest.approx([0.8, 0.1, 0.1])
    assert all(r["signal"] == pytest.approx(0.5) for r in rows)
    subs = {s["subset"]: s for s in gm.subsets(rows, ["a$"])}
    assert subs["all (plain MeZO)"]["predicted_x"] == pytest.approx(1.0)
    assert subs["all (plain MeZO)"]["predicted_curv_x"] == pytest.approx(1.0)
    # a's two tensors: 99% of |g|^2 in 25% of the dimensions -> 3.96x plain MeZO's progress a forward
    # by dimension; but they also hold 90% of the curvature -> only 1.1x by curvature
    assert subs["mask_tensors=a$"]["predicted_x"] == pytest.approx(0.99 / 0.25)
    assert subs["mask_tensors=a$"]["predicted_curv_x"] == pytest.approx(0.99 / 0.9)
    assert subs["mask_tensors=a$"]["tensors"] == 2
    assert subs["group model.layers.*.a"]["predicted_x"] == pytest.approx(0.99 / 0.25)
    assert subs["group model.layers.*.b"]["predicted_x"] == pytest.approx(0.01 / 0.75)
    flat = gm.subsets(gm.tensor_rows(tensors, g, g * g, -zhz), ["a$"])  # no positive curvature: no prediction
    assert all(s["predicted_curv_x"] is None for s in flat)
    assert [s["predicted_curv_x"] for s in gm.subsets(gm.tensor_rows(tensors, g, g * g), [])] == [None] * 3


def test_hutchinsons_estimate_is_the_trace_of_each_tensors_hessian_block():
    """On a quadratic loss 0.5 x'Ax the estimator's per-tensor sums converge to A's diagonal blocks' traces."""
    torch = pytest.importorskip("torch")
    gm = _gm()
    a = torch.tensor([[4.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, -1.0]], dtype=torch.float64)

    class Quadratic:
        def encode(self, rows):
            return rows

        def loss_tensor(self, batch, flat):
            return 0.5 * flat @ a @ flat

    import edgefed.methods.fedavg as fa
    start = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True)
    orig = fa.start_tensor
    fa.start_tensor = lambda model: start
    try:
        zhz = gm.curvature(Quadratic(), [0, 1, 2, 3], batches=50, probes=40, batch=2, seed=0,
                           groups=[np.array([0, 1]), np.array([2])])
    finally:
        fa.start_tensor = orig
    assert zhz[:2].sum() == pytest.approx(6.0, abs=0.4)  # tensor [0:2]: tr of the 2x2 block
    assert zhz[2] == pytest.approx(-1.0)  # probed alone: a 1x1 block's z*Hz is exact, negative curvature too


def test_the_gradient_map_runs_on_the_tiny_model_and_finds_no_gradient_in_loras_a(tmp_path):
    pytest.importorskip("torch")
    js = tmp_path / "g.json"
    r = subprocess.run([sys.executable, "benchmarks/gradient_map.py", "--model", "tiny", "--batches", "2",
                        "--curv-batches", "2", "--probes", "4", "--threads", "1", "--json", str(js), "--plot", str(tmp_path / "g.png")],
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
    curv = [t["curv_share"] for t in res["tensors"]]
    # the tiny model is random: its start may be a saddle (trace <= 0), and then no shares are given
    assert curv == [None] * len(curv) or sum(curv) == pytest.approx(1.0)
    assert res["probes"] == 4 and "share of tr(H)" in r.stdout
    bad = subprocess.run([sys.executable, "benchmarks/gradient_map.py", "--model", "tiny", "--template", "no text"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "has no {text}" in bad.stderr
