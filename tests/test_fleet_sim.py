"""Virtual devices across processes (edgefed.fleet_sim): worker processes each run a slice of
the fleet as threads on one broker with the real server; every device of every process ends on
the server's global model (digests compared), and a worker's failure stops the job with its
reason."""
import numpy as np
import pytest

from edgefed.data import iid_split, load_rotten_tomatoes
from edgefed.federation import run_federation
from edgefed.fleet_sim import ProcessFleet
from edgefed.methods import JobConfig
from edgefed.replica import params_digest


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    pytest.importorskip("torch")
    from edgefed.export import export_artifact
    from edgefed.models import load_model, tiny_random_model

    root = tmp_path_factory.mktemp("fleet")
    model, tok = load_model(tiny_random_model(root / "model", seed=0))
    return export_artifact(model, root / "lora", "lora:r=2,targets=q_proj,v_proj",
                           "classify:labels=positive,negative", tokenizer=tok, progress=False)


def test_devices_in_several_processes_end_on_the_global_model(art, tmp_path):
    from edgefed.transport.broker import start_broker

    data = list(load_rotten_tomatoes()[:240])
    shards = iid_split(data, 6)
    job = JobConfig(job="fleet", method="fedkseed", artifact=str(art), rounds=3, devices_per_round=6, min_devices=6,
                    round_timeout=120, lr=1e-2, eps=1e-3, local_steps=2, batch_size=4, k=128)
    fleet = ProcessFleet(job.job, str(art), shards, processes=2, seq_len=64)
    broker = start_broker()
    try:
        res = run_federation(job, art, data[:20], broker_url=broker.url, start_devices=fleet, out_dir=tmp_path,
                             eval_n=20, progress=False, seq_len=64)
    finally:
        broker.stop()
    assert fleet.workers == 2
    assert sorted(r.device for r in fleet.reports) == [f"sim-{i:05d}" for i in range(6)]
    want = params_digest(res.final_params)
    assert {r.digest for r in fleet.reports} == {want}
    assert all(r.rounds_trained == 3 and r.updates_accepted == 3 for r in fleet.reports)


def test_ray_backend_says_when_ray_is_missing(art):
    try:
        import ray  # noqa: F401
        pytest.skip("ray is installed here")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="pip install ray"):
        ProcessFleet("j", str(art), [[1]], 1, backend="ray")
