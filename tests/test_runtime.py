"""On-device forward-only training: zero-copy parameters, exact restores, ZO that learns,
memory refusal, device configs, and no torch on the device side."""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgefed import kernels
from edgefed.data import load_rotten_tomatoes
from edgefed.device_config import DeviceConfig, list_device_configs, load_device_config
from edgefed.runtime import DeviceModel, MemoryBudgetError, load_checkpoint, save_checkpoint
from edgefed.trainer import LocalTrainer
from edgefed.zo import (DivergedError, SeedPool, ZOConfig, pro_probabilities,
                        two_point_step)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def examples():
    return load_rotten_tomatoes()[:64]


@pytest.fixture
def full_model(tiny_artifacts):
    return DeviceModel(tiny_artifacts["full"], threads=1, batch_size=16, seq_len=32)


def test_kernel_update_is_seen_by_next_forward_without_copies(full_model, examples, tiny_artifacts):
    import onnxruntime as ort

    m = full_model
    batch = m.encode(examples[:8])
    base = m.loss(batch)
    ptr = m.params.ctypes.data
    kernels.perturb(m.buffers, 123, 0.05)
    moved = m.loss(batch)
    assert m.params.ctypes.data == ptr
    assert abs(moved - base) > 1e-4, "the forward did not see the in-place update"
    # An independent session fed the perturbed values explicitly agrees.
    sess = ort.InferenceSession(str(Path(tiny_artifacts["full"]) / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    feed = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
            "targets": batch.targets, **{k: np.array(v) for k, v in m.views.items()}}
    assert sess.run(["loss"], feed)[0] == pytest.approx(moved, rel=1e-5)


def test_restore_after_perturbation_is_exact_to_float_rounding(full_model, examples):
    m = full_model
    batch = m.encode(examples[:8])
    theta0 = m.params.copy()
    loss0 = m.loss(batch)
    eps = 1e-3
    kernels.perturb(m.buffers, 9, eps)
    kernels.perturb(m.buffers, 9, -2 * eps)
    kernels.zo_update(m.buffers, 9, eps, 0.0, 0.0)
    z = np.empty_like(theta0)
    kernels.fill(z, 9)
    tol = 4 * np.finfo(np.float32).eps * (np.abs(theta0) + 2 * eps * np.abs(z))
    assert np.all(np.abs(m.params - theta0) <= tol)
    assert m.loss(batch) == pytest.approx(loss0, abs=1e-5)


@pytest.mark.parametrize("mode,lr,steps", [("full", 1e-3, 300), ("lora", 1e-2, 300)])
def test_zo_training_lowers_the_loss(tiny_artifacts, examples, mode, lr, steps):
    m = DeviceModel(tiny_artifacts[mode], threads=1, batch_size=16, seq_len=32)
    before = m.evaluate(examples)["loss"]
    acc = LocalTrainer(m, SeedPool(1, 4096), ZOConfig(lr=lr, eps=1e-3), progress=False).train(
        examples, steps, batch_size=16, seed=0)
    after = m.evaluate(examples)["loss"]
    assert after < before - 0.03, f"{mode}: loss {before:.4f} -> {after:.4f}"
    idx, g = acc.arrays()
    assert idx.dtype == np.uint32 and len(idx) == len(set(idx.tolist())) <= steps
    assert np.all(np.isfinite(g))


def test_nan_loss_aborts_with_parameters_restored():
    theta = np.linspace(-1, 1, 10_000, dtype=np.float32)
    before = theta.copy()
    calls = iter([0.5, float("nan")])
    with pytest.raises(DivergedError, match="nan.*restored"):
        two_point_step(lambda: next(calls), [theta], 5, 0, 1e-3, 1e-3)
    np.testing.assert_allclose(theta, before, atol=4e-7)


def test_checkpoint_round_trip_and_corruption(full_model, tmp_path):
    m = full_model
    kernels.perturb(m.buffers, 1, 0.01)
    saved = m.params.copy()
    path = save_checkpoint(m, tmp_path / "ckpt.bin", {"round": 3})
    m.reset_params()
    assert not np.array_equal(m.params, saved)
    assert load_checkpoint(m, path)["round"] == 3
    np.testing.assert_array_equal(m.params, saved)
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(m, path)
    np.testing.assert_array_equal(m.params, saved)  # a failed load changes nothing


def test_memory_refusal_names_the_numbers(tiny_artifacts):
    cfg = DeviceConfig(name="tiny-box", memory_budget_mb=100, batch_size=64, seq_len=512)
    with pytest.raises(MemoryBudgetError) as e:
        DeviceModel(tiny_artifacts["full"], cfg)
    msg = str(e.value)
    assert "tiny-box" in msg and "100 MB" in msg and "64 x 512" in msg and "batch_size" in msg


def test_device_configs_load():
    names = list_device_configs()
    for want in ["raspberry-pi-4-4gb", "raspberry-pi-5-8gb", "jetson-orin-nano-8gb", "x86-sim"]:
        assert want in names
        cfg = load_device_config(want)
        assert cfg.threads >= 1 and cfg.memory_budget_mb > 0
        assert cfg.providers(["CPUExecutionProvider"])[-1] == "CPUExecutionProvider"
    with pytest.raises(FileNotFoundError, match="raspberry-pi-4-4gb"):
        load_device_config("pdp-11")


def test_bad_device_config_is_explained(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: bad\nthreads: 0\nprecision: fp8\n")
    with pytest.raises(ValueError, match="threads=0.*precision='fp8'"):
        load_device_config(p)


def test_seed_pool_is_deterministic_and_pro_sampling_prefers_large_scalars():
    a, b = SeedPool(42, 1024), SeedPool(42, 1024)
    assert np.array_equal(a.seeds, b.seeds) and len(set(a.seeds.tolist())) == 1024
    assert not np.array_equal(a.seeds, SeedPool(43, 1024).seeds)
    abs_sum = np.zeros(1024)
    counts = np.ones(1024)
    abs_sum[:10] = 50.0
    p = pro_probabilities(abs_sum, counts)
    assert p.sum() == pytest.approx(1.0) and p[0] > 2 * p[500]
    draws = a.sample(np.random.default_rng(0), 20_000, p)
    assert (draws < 10).mean() > 2 * 10 / 1024


DEVICE_MODULES = ["edgefed.kernels", "edgefed.rng", "edgefed.zo", "edgefed.runtime", "edgefed.trainer",
                  "edgefed.data", "edgefed.device_config", "edgefed.protocol", "edgefed.transport",
                  "edgefed.transport.mqtt", "edgefed.transport.inproc", "edgefed.export.artifact",
                  "edgefed.agent", "edgefed.methods", "edgefed.metrics", "edgefed.cli", "edgefed.replica",
                  "edgefed.security.secagg", "edgefed.security.signing", "edgefed.doctor"]


@pytest.mark.parametrize("module", DEVICE_MODULES)
def test_device_modules_import_without_torch(module):
    code = ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'transformers', 'peft'):\n"
            "            raise ImportError(f'{name} is blocked: device side')\n"
            "sys.meta_path.insert(0, Block())\n"
            f"import {module}\n"
            "assert not any(m.split('.')[0] == 'torch' for m in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]


def test_device_training_runs_without_torch(tiny_artifacts, tmp_path):
    """A whole local round in a process where torch cannot be imported."""
    code = ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.split('.')[0] == 'torch': raise ImportError('blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            "from edgefed.data import load_rotten_tomatoes\n"
            "from edgefed.runtime import DeviceModel\n"
            "from edgefed.trainer import LocalTrainer\n"
            "from edgefed.zo import SeedPool, ZOConfig\n"
            f"m = DeviceModel({str(tiny_artifacts['lora'])!r}, threads=1, batch_size=8, seq_len=32)\n"
            "acc = LocalTrainer(m, SeedPool(1, 64), ZOConfig(lr=1e-2), progress=False).train(\n"
            "    load_rotten_tomatoes()[:32], 5, seed=1)\n"
            "print(len(acc.history))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "5"
