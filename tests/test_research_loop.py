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
    # ZO variants (edgefed.directions, adaptive probes, seed-space server optimisers)
    ("fedkseed", "onnx", dict(lr=1e-2, eps=1e-3, k=128, params={"mask_frac": 0.3, "mask_block": 16})),
    ("fedkseed", "onnx", dict(lr=1e-2, eps=1e-3, k=128, params={
        "mask_frac": 0.5, "mask_by": "random", "mask_tensors": "lora_B", "server_opt": "avgm",
        "server_lr": 1.0, "server_momentum": 0.8})),
    ("fedkseed", "onnx", dict(lr=1e-2, eps=1e-3, k=128, params={
        "lowrank": 1, "n_perturb": 1, "n_perturb_max": 4, "adaptive_tol": 0.3, "server_opt": "adam",
        "server_lr": 1e-3})),
    ("fedkseed", "torch", dict(lr=1e-2, eps=1e-3, k=128, params={"lowrank": 1, "mask_tensors": "lora_B"})),
    # the demo's LoRA recipe: B only, the server scaling the devices' mean step (sqrt(devices))
    ("fedkseed", "onnx", dict(lr=1e-2, eps=1e-3, k=128, params={"mask_tensors": "lora_B", "server_lr": 2.0})),
    # ... with length buckets (edgefed.batching): the batches change, the replicas still agree
    ("fedkseed", "onnx", dict(lr=1e-2, eps=1e-3, k=128, params={"mask_tensors": "lora_B", "server_lr": 2.0,
                                                               "length_buckets": 2})),
    ("fedmezo", "torch", dict(lr=1e-2, eps=1e-3, k=128, params={"length_buckets": 3})),
    ("fedmezo", "onnx", dict(lr=1e-2, eps=1e-3, k=128, params={"mask_frac": 0.25, "n_perturb_max": 3})),
])
def test_the_inline_loop_ends_on_the_full_paths_bits(art, tmp_path, method, backend, kw, request):
    data = list(load_rotten_tomatoes()[:120])
    shards = iid_split(data, 3)
    if backend == "torch":
        from edgefed.backends.torch_model import TorchModel
        base = TorchModel(art, seq_len=64)
    else:
        base = DeviceModel(art, threads=1, batch_size=4, seq_len=64, check_memory=False)
    # its own job (and in-process broker) per case: retained messages of another case must not leak in
    job = _job(f"full-{request.node.callspec.id}", method, art, **kw)
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
    # a host sends only its own components: rank 1 sends half of rank 2's values
    from edgefed.methods import get_method
    from edgefed.protocol import RoundPlan
    sizes = {}
    for r in (1, 2):
        plan = RoundPlan(job="j", round=0, method="hetlora", lr=5e-3, local_steps=1, batch_size=4, deadline=0.0,
                         params={"rank": r})
        out = get_method("hetlora").client().local_train(host.fork(), shards[0], plan, seed=0)
        sizes[r] = {t.name: t.data.size for t in out.tensors}["delta"]
    assert sizes[2] == 2 * sizes[1] and sizes[2] == host.n_trainable


def test_flora_merges_the_exact_weighted_sum_of_products_on_every_host(art, tmp_path):
    """Hosts of ranks 1 and 2 each train a fresh adapter per round; every host merges the
    stacked product into its frozen weights: the merge equals sum_i w_i B_i A_i (which FedAvg
    of A and B does not), and the full path (server, transport, agents) gives the same bits."""
    from edgefed.backends.torch_model import TorchModel
    from edgefed.export.artifact import read_manifest
    from edgefed.methods import get_method
    from edgefed.methods.flora import stack_product
    from edgefed.methods.hetlora import _factors, lora_modules
    from edgefed.methods.lora_math import fedavg_lora_product

    host = TorchModel(art, seq_len=64)
    shards = iid_split(list(load_rotten_tomatoes()[:120]), 3)
    kw = dict(lr=5e-3, params={"assign": '{"pi": {"rank": 1}, "*": {"rank": 2}}'})
    classes = ["pi", "gpu", "gpu"]
    # one round by hand: the stack's product against the weighted sum of each host's product
    job1 = _job("fl1", "flora", art, **{**kw, "params": {**kw["params"]}})
    job1.rounds = 1
    forks = [host.fork() for _ in shards]
    res1 = run_inline(job1, forks, shards, device_classes=classes)
    mods = lora_modules(read_manifest(art))
    name = mods[0][0]
    merged = forks[0].base_weight(name).astype(np.float64) - host.base_weight(name).astype(np.float64)
    assert np.abs(merged).max() > 0, "nothing was merged"
    assert all(np.array_equal(f.base_weight(name), forks[0].base_weight(name)) for f in forks)
    assert res1.state.scalars["ranks"] == "1,2,2"

    # the full path: same bits in every host's merged weights as the inline loop
    job = _job("fl-full", "flora", art, **kw)
    starter = thread_devices(host, job.job, shards, device_classes=classes)
    run_federation(job, art, list(load_rotten_tomatoes()[:20]), broker_url=f"inproc://{job.job}",
                   start_devices=starter, out_dir=tmp_path, eval_n=20, progress=False, seq_len=64)
    inline_forks = [host.fork() for _ in shards]
    run_inline(_job("fl-inline", "flora", art, **kw), inline_forks, shards, device_classes=classes)
    for mod in mods:
        want = inline_forks[0].base_weight(mod[0])
        for agent in starter.agents:
            np.testing.assert_array_equal(agent.model.base_weight(mod[0]), want)
    # stacking is exact where averaging factors is not
    rng = np.random.default_rng(0)
    As = [rng.standard_normal((1, 4)), rng.standard_normal((2, 4))]
    Bs = [rng.standard_normal((3, 1)), rng.standard_normal((3, 2))]
    w = np.array([0.25, 0.75])
    A_s = np.concatenate(As)
    B_s = np.concatenate([w[0] * Bs[0], w[1] * Bs[1]], axis=1)
    exact = sum(wi * B @ A for wi, A, B in zip(w, As, Bs))
    np.testing.assert_allclose(stack_product(A_s, B_s, 1.0), exact, rtol=1e-12)
    assert not np.allclose(fedavg_lora_product(As, Bs, w, 1.0), exact, rtol=1e-3)
    assert get_method("flora").client().apply_delta is not None


def test_the_server_runs_rounds_on_the_selected_devices_only(art, tmp_path):
    """select_fraction: each round the devices the rule selects train (with their class's
    local_steps), the others sit out; the server counts only the selected ones (no wait for the
    rest until the deadline), and the result equals the inline loop's."""
    from edgefed.assign import plan_for
    from edgefed.protocol import RoundPlan

    data = list(load_rotten_tomatoes()[:160])
    shards = iid_split(data, 4)
    classes = ["pi", "pi", "gpu", "gpu"]
    params = {"select_fraction": 0.5, "assign": '{"pi": {"local_steps": 1}}'}
    base = DeviceModel(art, threads=1, batch_size=4, seq_len=64, check_memory=False)
    job = JobConfig(job="sel", method="fedkseed", artifact=str(art), rounds=4, devices_per_round=0, min_devices=1,
                    round_timeout=60, local_steps=3, batch_size=4, lr=1e-2, eps=1e-3, k=128, params=params)
    starter = thread_devices(base, job.job, shards, device_classes=classes)
    res = run_federation(job, art, data[:20], broker_url="inproc://sel", start_devices=starter, out_dir=tmp_path,
                         eval_n=20, progress=False, seq_len=64)
    from edgefed_server.store import Store
    with Store(tmp_path / "server.sqlite") as st:
        metrics = st.round_metrics("sel")
    ids = [f"sim-{i:03d}" for i in range(4)]
    for m in metrics:
        plan = RoundPlan(job="sel", round=m["round"], method="fedkseed", lr=1e-2, local_steps=3, batch_size=4,
                         deadline=0.0, params={"run_seed": 0, **params})
        chosen = [d for d, c in zip(ids, classes) if plan_for(plan, d, c) is not None]
        if not chosen:
            continue
        assert sorted(m["devices"]) == chosen
        assert m["duration_s"] < 30, "the round waited for devices that were not selected"
    inline = run_inline(job, [base.fork() for _ in shards], shards, device_classes=classes)
    np.testing.assert_array_equal(inline.params, res.final_params)


def test_flora_never_takes_the_trainables_for_its_global_model(art):
    """FLoRA's global model is the merged weights: a full-state sync must not hand it the
    adapter as if it were the model (that silently lost every merge when the stacks outgrew
    one message); it fails loudly with the fix instead."""
    from edgefed.methods import get_method
    from edgefed.protocol import DEFAULT_LIMITS
    from edgefed.replica import TrainablesReplica
    from edgefed_server.sync import full_state

    job = _job("fl", "flora", art, lr=5e-3)
    strat = get_method("flora").server()
    rep = TrainablesReplica(art, get_method("flora").client(), {})
    assert full_state(rep, 0, strat, job, strat.init_state(job), DEFAULT_LIMITS) == []
    fed = TrainablesReplica(art, get_method("fedavg").client(), {})
    assert [t.name for t in full_state(fed, 0, get_method("fedavg").server(), job, None, DEFAULT_LIMITS)] == ["trainables"]
    with pytest.raises(NotImplementedError, match="--max-message-mb"):
        get_method("flora").client().apply_full_state(None, [], {})


def test_watching_the_inline_loop_does_not_change_it(art):
    """on_round sees each round's global model without moving any replica (FLoRA's merges
    included: reporting once applied a round's stack twice to the first host)."""
    from edgefed.backends.torch_model import TorchModel
    from edgefed.methods.hetlora import lora_modules
    from edgefed.export.artifact import read_manifest

    host = TorchModel(art, seq_len=64)
    shards = iid_split(list(load_rotten_tomatoes()[:90]), 3)
    name = lora_modules(read_manifest(art))[0][0]
    merged = []
    for watch in (False, True):
        forks = [host.fork() for _ in shards]
        seen = []
        run_inline(_job(f"w{watch}", "flora", art, lr=5e-3), forks, shards,
                   on_round=(lambda r, p, m: seen.append(r)) if watch else None)
        merged.append([f.base_weight(name) for f in forks])
        assert seen == ([0, 1, 2] if watch else [])
    for a, b in zip(*merged):
        np.testing.assert_array_equal(a, b)
