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


def test_per_device_rules_select_devices_and_set_their_settings(art):
    """select_fraction picks a seeded subset per round, assign gives each device class its
    settings; both are what the device and the server compute from the broadcast plan."""
    from edgefed.assign import plan_for
    from edgefed.protocol import RoundPlan

    plan = RoundPlan(job="j", round=3, method="fedavg", lr=1e-3, local_steps=8, batch_size=4, deadline=0.0,
                     params={"run_seed": 7, "select_fraction": 0.25,
                             "assign": '{"raspberry-pi-4": {"local_steps": 2, "rank": 2}, "*": {"rank": 8}}'})
    picked = [d for d in (f"dev-{i}" for i in range(2000)) if plan_for(plan, d, "x") is not None]
    assert 400 < len(picked) < 600
    again = [d for d in (f"dev-{i}" for i in range(2000)) if plan_for(plan, d, "x") is not None]
    assert picked == again
    other_round = RoundPlan(**{**{k: getattr(plan, k) for k in ("job", "method", "lr", "local_steps", "batch_size",
                                                                "deadline", "params")}, "round": 4})
    assert picked != [d for d in (f"dev-{i}" for i in range(2000)) if plan_for(other_round, d, "x") is not None]
    pi = plan_for(plan, picked[0], "raspberry-pi-4")
    gpu = plan_for(plan, picked[0], "gpu-host")
    assert (pi.local_steps, pi.params["rank"]) == (2, 2)
    assert (gpu.local_steps, gpu.params["rank"]) == (8, 8)
    bad = RoundPlan(job="j", round=0, method="m", lr=1e-3, local_steps=1, batch_size=1, deadline=0.0,
                    params={"assign": '{"pi": {"local_steps": 0.5}}'})
    with pytest.raises(ValueError, match="local_steps"):
        plan_for(bad, "d", "pi")


def test_hetlora_hosts_of_different_ranks_train_one_adapter(art):
    """Hosts of rank 1 and 2 (by device class) train one rank-2 adapter: the low-rank host's
    update never touches component 1, which only the rank-2 hosts move, and replicas agree."""
    from edgefed.backends.torch_model import TorchModel
    from edgefed.export.artifact import read_manifest
    from edgefed.methods.hetlora import _factors, lora_modules

    host = TorchModel(art, seq_len=64)
    shards = iid_split(list(load_rotten_tomatoes()[:120]), 3)
    job = _job("het", "hetlora", art, lr=5e-3,
               params={"assign": '{"pi": {"rank": 1}, "*": {"rank": 2}}', "prune_gamma": 0.5, "prune_tol": 1e-9})
    seen = []
    res = run_inline(job, [host.fork() for _ in shards], shards, device_classes=["pi", "gpu", "gpu"],
                     on_round=lambda r, p, m: seen.append(p))
    mods = lora_modules(read_manifest(art))
    start = host.params
    for mod in mods:
        A0, B0 = _factors(start, mod)
        A1, B1 = _factors(res.params, mod)
        assert not np.array_equal(B1[:, 1], B0[:, 1]), "component 1 (rank-2 hosts only) moved"
        assert not np.array_equal(B1[:, 0], B0[:, 0])
    assert res.state.scalars["ranks"] == "1,2,2"
