"""The torch backend and the methods that need it: a host runs the artifact's own graph in
torch (same losses as ONNX Runtime, exact gradients), joins a FedKSeed job beside ONNX devices
with exact gradient projections, and trains FedAvg / FedProx / server-optimiser jobs by
backprop, every replica bit-identical after the job."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgefed import kernels  # noqa: E402
from edgefed.data import Example, SFTExample, iid_split, load_rotten_tomatoes, rotten_tomatoes_pairs  # noqa: E402
from edgefed.federation import run_federation  # noqa: E402
from edgefed.methods import JobConfig, get_method  # noqa: E402
from edgefed.runtime import DeviceModel  # noqa: E402
from edgefed.simulate import thread_devices  # noqa: E402


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    from edgefed.export import export_artifact
    from edgefed.models import load_model, tiny_random_model

    root = tmp_path_factory.mktemp("torchhosts")
    model, tok = load_model(tiny_random_model(root / "model", seed=0))
    out = {}
    for name, spec, task in [("lora", "lora:r=2,targets=q_proj,v_proj", "classify:labels=positive,negative"),
                             ("full", "full", "classify:labels=positive,negative"),
                             ("prompt", "prompt:tokens=4", "classify:labels=positive,negative"),
                             ("sft", "lora:r=2,targets=q_proj,v_proj", "sft"),
                             ("dpo", "lora:r=2,targets=q_proj,v_proj", "dpo")]:
        out[name] = export_artifact(model, root / name, spec, task, tokenizer=tok, progress=False)
    return out


@pytest.fixture(scope="module")
def reviews():
    return load_rotten_tomatoes()[:200]


def _short_pairs():
    return [p for p in rotten_tomatoes_pairs(load_rotten_tomatoes(), seed=0)
            if max(len(p.chosen), len(p.rejected)) < 90]


def _records(kind, reviews):
    if kind == "sft":
        return [SFTExample("What is the sentiment of this review?", e.label, input=e.text) for e in reviews[:6]]
    if kind == "dpo":
        return _short_pairs()[:3]
    return reviews[:6]


@pytest.mark.parametrize("name", ["lora", "full", "prompt", "sft", "dpo"])
def test_torch_backend_computes_the_onnx_graph_and_its_exact_gradient(arts, reviews, name):
    from edgefed.backends.torch_model import TorchModel

    tm = TorchModel(arts[name], seq_len=96)  # also checks the base model against the export's record
    dm = DeviceModel(arts[name], threads=1, seq_len=96, check_memory=False)
    batch = dm.encode(_records("sft" if name == "sft" else "dpo" if name == "dpo" else "cls", reviews))
    shift = np.random.default_rng(0).standard_normal(dm.params.size).astype(np.float32) * 0.02
    dm.params += shift
    tm.params += shift  # on CPU the torch trainables are views of this buffer
    assert tm.loss(batch) == pytest.approx(dm.loss(batch), rel=1e-5, abs=1e-6)
    loss, grad = tm.loss_and_grad(batch)
    assert grad.shape == tm.params.shape and grad.dtype == np.float32
    # <grad, z> against the two-point estimate that ONNX devices compute
    z = np.empty_like(tm.params)
    kernels.fill(z, 99)
    eps = 1e-3
    kernels.perturb(dm.buffers, 99, eps)
    lp = dm.loss(batch)
    kernels.perturb(dm.buffers, 99, -2 * eps)
    lm = dm.loss(batch)
    assert float(np.dot(grad.astype(np.float64), z)) == pytest.approx((lp - lm) / (2 * eps), rel=2e-2, abs=2e-3)


def test_a_wrong_base_model_is_refused_with_the_fix(arts, tmp_path):
    from edgefed.backends.torch_model import BaseModelMismatch, TorchModel
    from edgefed.models import tiny_random_model

    other = tiny_random_model(tmp_path / "other", seed=1)
    with pytest.raises(BaseModelMismatch, match="--base-model"):
        TorchModel(arts["lora"], base_model=str(other))


def _job(name, method, art, **kw):
    base = dict(job=name, method=method, artifact=str(art), rounds=3, devices_per_round=3, min_devices=3,
                round_timeout=60, local_steps=4, batch_size=4)
    base.update(kw)
    return JobConfig(**base)


def test_a_torch_host_and_onnx_devices_train_one_fedkseed_job_bit_identically(arts, reviews, tmp_path):
    from edgefed.backends.torch_model import TorchModel

    art = arts["lora"]
    job = _job("mixed", "fedkseed", art, lr=1e-2, eps=1e-3, k=256)
    onnx = DeviceModel(art, threads=1, batch_size=4, seq_len=64, check_memory=False)
    host = TorchModel(art, seq_len=64)
    starter = thread_devices([onnx, onnx, host], job.job, iid_split(list(reviews[:150]), 3))
    res = run_federation(job, art, list(reviews[150:]), broker_url=f"inproc://{job.job}", start_devices=starter,
                         out_dir=tmp_path, eval_n=20, progress=False, seq_len=64)
    assert res.rounds_completed == 3
    host_agent = starter.agents[2]
    assert host_agent.model.backward_count == 3 * 4, "the host used exact projections, one backward a step"
    assert host_agent.stats.updates_accepted == 3
    assert not np.array_equal(res.final_params, onnx.params)
    for agent in starter.agents:
        np.testing.assert_array_equal(agent.model.params, res.final_params)


@pytest.mark.parametrize("name,params", [
    ("lora", {}),
    ("full", {"update_dtype": "bf16", "server_opt": "adam", "server_lr": 0.01}),
    ("prompt", {"optimizer": "sgd", "grad_clip": 1.0, "prox_mu": 0.1, "server_opt": "avgm"}),
    ("dpo", {"update_dtype": "f16", "server_opt": "yogi", "server_lr": 0.01}),
])
def test_fedavg_family_trains_by_backprop_and_every_replica_ends_bit_identical(arts, reviews, tmp_path, name, params):
    from edgefed.backends.torch_model import TorchModel

    art = arts[name]
    lr = 0.05 if params.get("optimizer") == "sgd" else 5e-3
    job = _job(f"fa-{name}", "fedavg", art, lr=lr, params=params)
    host = TorchModel(art, seq_len=96)
    data = _short_pairs()[:90] if name == "dpo" else list(reviews[:150])
    held = data[-24:] if name == "dpo" else list(reviews[150:])
    starter = thread_devices(host, job.job, iid_split(data[:-24] if name == "dpo" else data, 3))
    res = run_federation(job, art, held, broker_url=f"inproc://{job.job}", start_devices=starter,
                         out_dir=tmp_path, eval_n=24, progress=False, seq_len=96)
    assert res.rounds_completed == 3
    for agent in starter.agents:
        np.testing.assert_array_equal(agent.model.params, res.final_params)
    hist = [h for h in res.history if h["round"] > 0]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"], "local backprop did not lower the training loss"
    up = hist[0]["bytes_in"] / hist[0]["n_updates"]
    n = host.n_trainable
    per_value = 2 if params.get("update_dtype") in ("bf16", "f16") else 4
    assert n * per_value < up < n * per_value + 600, "the update is the delta at the chosen dtype"


def test_fedavg_on_an_onnx_device_says_to_use_the_torch_backend(arts, reviews):
    from edgefed.protocol import RoundPlan

    dm = DeviceModel(arts["lora"], threads=1, seq_len=64, check_memory=False)
    plan = RoundPlan(job="j", round=0, method="fedavg", lr=1e-3, local_steps=1, batch_size=2, deadline=0.0)
    with pytest.raises(RuntimeError, match="--backend torch"):
        get_method("fedavg").client().local_train(dm, list(reviews[:4]), plan, seed=0)


def test_fedprox_keeps_the_local_model_nearer_the_global_one(arts, reviews):
    from edgefed.backends.torch_model import TorchModel
    from edgefed.protocol import RoundPlan

    host = TorchModel(arts["lora"], seq_len=64)
    norms = {}
    for mu in (0.0, 1.0):  # lr x mu = 0.5: each step pulls half the way back to the global model
        plan = RoundPlan(job="j", round=0, method="fedavg", lr=0.5, local_steps=6, batch_size=4, deadline=0.0,
                         params={"optimizer": "sgd", "grad_clip": 10.0, "prox_mu": mu})
        res = get_method("fedavg").client().local_train(host, list(reviews[:40]), plan, seed=3)
        norms[mu] = float(np.linalg.norm(res.tensors[0].float32()))
    assert 0 < norms[1.0] < 0.8 * norms[0.0]


def test_deltas_larger_than_a_broker_message_travel_in_chunks_and_sync_replies(arts, reviews, tmp_path):
    """Full fine-tuning: every update (808 KB) is over the broker's message limit (64 KiB here),
    so the transport chunks it; the plan is retained and cannot be chunked, so the server sends
    it without the delta (delta_by_sync) and each host fetches the delta in a sync reply. Every
    replica still ends bit-identical."""
    from edgefed.backends.torch_model import TorchModel

    art = arts["full"]
    job = _job("big", "fedavg", art, lr=1e-4)
    host = TorchModel(art, seq_len=64)
    opts = {"max_payload_bytes": 64 << 10}
    starter = thread_devices(host, job.job, iid_split(list(reviews[:120]), 3), transport_options=opts)
    res = run_federation(job, art, list(reviews[150:]), broker_url=f"inproc://{job.job}", start_devices=starter,
                         out_dir=tmp_path, eval_n=16, progress=False, seq_len=64, transport_options=opts)
    assert res.rounds_completed == 3
    for agent in starter.agents:
        np.testing.assert_array_equal(agent.model.params, res.final_params)
        assert agent.stats.syncs >= 2, "the deltas came by sync"
        assert agent.t.chunk_stats()["messages_chunked"] >= 3, "every update went out in chunks"
    up = [h["bytes_in"] / h["n_updates"] for h in res.history if h["round"] > 0]
    assert min(up) > host.n_trainable * 4


@pytest.mark.parametrize("params", [{}, {"mask_tensors": "lora_B"}, {"lowrank": 2, "n_perturb_max": 3}],
                         ids=["dense", "lora_B", "lowrank-adaptive"])
def test_a_hosts_zo_steps_on_its_device_copy_leave_the_cpu_paths_bits(arts, reviews, params):
    """A GPU host's two-point steps run on one device copy of the trainables (zo_session: the
    CUDA kernels perturb it in GPU memory) and hand back exactly what the in-place CPU path
    leaves. Here both run on the CPU, so the session's plumbing is what is checked: the copy in
    and out, the loss at the copy, torch tensors through the kernels, masks and low-rank
    directions on torch tensors. tests/test_cuda_kernels.py checks the CUDA kernels' bits."""
    from edgefed.backends.torch_model import TorchModel
    from edgefed.directions import direction_space
    from edgefed.trainer import LocalTrainer
    from edgefed.zo import SeedPool, ZOConfig

    plain = TorchModel(arts["lora"], seq_len=64)
    plain.zo_on_device = False
    session = plain.fork()
    session.zo_on_device = True
    space = direction_space(plain, params)
    cfg = ZOConfig(lr=5e-2, eps=1e-3, probe="zo", n_perturb_max=int(params.get("n_perturb_max", 0)))
    accs = [LocalTrainer(m, SeedPool(7, 64), cfg, progress=False, space=space).train(list(reviews[:40]), 5,
                                                                                   batch_size=4, seed=3)
            for m in (plain, session)]
    assert not np.array_equal(plain.params, plain._init), "the steps moved the trainables"
    assert np.array_equal(plain.params.view(np.uint32), session.params.view(np.uint32))
    assert [(p.seed_index, p.g) for p in accs[0].history] == [(p.seed_index, p.g) for p in accs[1].history]
    assert plain.forward_count == session.forward_count > 0


def test_a_gpu_hosts_zo_steps_run_on_the_gpu_with_the_cpu_paths_bits(arts, reviews):
    from edgefed import cuda_kernels
    ok, why = cuda_kernels.available()
    if not ok:
        pytest.skip(f"no GPU for the CUDA kernels: {why}")
    from edgefed.backends.torch_model import TorchModel
    from edgefed.directions import WHOLE
    from edgefed.trainer import LocalTrainer
    from edgefed.zo import SeedPool, ZOConfig

    resident = TorchModel(arts["lora"], seq_len=64, device="cuda")
    assert resident.zo_on_device, "on CUDA with the kernels available, steps run on the GPU copy"
    copied = resident.fork()
    copied.zo_on_device = False  # CPU kernels on params, a copy to the GPU per forward
    cfg = ZOConfig(lr=5e-2, eps=1e-3, probe="zo")
    for m in (copied, resident):
        LocalTrainer(m, SeedPool(7, 64), cfg, progress=False, space=WHOLE).train(list(reviews[:40]), 5,
                                                                              batch_size=4, seed=3)
    assert np.array_equal(copied.params.view(np.uint32), resident.params.view(np.uint32))
