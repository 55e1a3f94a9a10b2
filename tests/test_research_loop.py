"""The transport-free loop (edgefed.research) gives the full path's result: the same global
trainables, bit for bit, as the server, broker transport and device agents, for a ZO method on
ONNX devices and a backprop method on torch hosts."""
import numpy as np
import pytest

from edgefed.data import iid_split, load_rotten_tomatoes
from edgefed.federation import run_federation
from edgefed.methods import JobConfig
from edgefed.research import run_inline
from edgefed.runtime import DeviceModel
from edgefed.simulate import thread_devices


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    pytest.importorskip("torch")
    from edgefed.export import export_artifact
    from edgefed.models import load_model, tiny_random_model

    root = tmp_path_factory.mktemp("research")
    model, tok = load_model(tiny_random_model(root / "model", seed=0))
    return export_artifact(model, root / "lora", "lora:r=2,targets=q_proj,v_proj",
                           "classify:labels=positive,negative", tokenizer=tok, progress=False)


def _job(name, method, art, **kw):
    return JobConfig(job=name, method=method, artifact=str(art), rounds=3, devices_per_round=3, min_devices=3,
                     round_timeout=60, local_steps=3, batch_size=4, **kw)


@pytest.mark.parametrize("method,backend,kw", [
    ("fedkseed", "onnx", dict(lr=1e-2, eps=1e-3, k=128, params={"n_perturb": 2})),
    ("fedmezo", "onnx", dict(lr=1e-2, eps=1e-3, k=128)),
    ("fedavg", "torch", dict(lr=5e-3, params={"server_opt": "adam", "server_lr": 0.01})),
])
def test_the_inline_loop_ends_on_the_full_paths_bits(art, tmp_path, method, backend, kw):
    data = list(load_rotten_tomatoes()[:120])
    shards = iid_split(data, 3)
    if backend == "torch":
        from edgefed.backends.torch_model import TorchModel
        base = TorchModel(art, seq_len=64)
    else:
        base = DeviceModel(art, threads=1, batch_size=4, seq_len=64, check_memory=False)
    job = _job(f"full-{method}", method, art, **kw)
    starter = thread_devices(base, job.job, shards)
    full = run_federation(job, art, data[:20], broker_url=f"inproc://{job.job}", start_devices=starter,
                          out_dir=tmp_path, eval_n=20, progress=False, seq_len=64)
    seen = []
    inline = run_inline(_job("inline", method, art, **kw), [base.fork() for _ in shards], shards,
                        on_round=lambda r, p, m: seen.append((r, m["train_loss"])))
    assert not np.array_equal(inline.params, base.params), "nothing trained"
    np.testing.assert_array_equal(inline.params, full.final_params)
    assert [r for r, _ in seen] == [0, 1, 2]
    full_losses = [h["train_loss"] for h in full.history if h["round"] > 0]
    np.testing.assert_allclose([m["train_loss"] for m in inline.history], full_losses, rtol=1e-6)


def test_the_inline_loop_refuses_shared_trainables_and_secure_jobs(art):
    base = DeviceModel(art, threads=1, seq_len=64, check_memory=False)
    shards = iid_split(list(load_rotten_tomatoes()[:40]), 2)
    with pytest.raises(ValueError, match="fork"):
        run_inline(_job("x", "fedkseed", art, k=64), [base, base], shards)
    with pytest.raises(ValueError, match="full path"):
        run_inline(_job("x", "fedkseed", art, k=64, params={"secure_aggregation": 1}),
                   [base.fork(), base.fork()], shards)
