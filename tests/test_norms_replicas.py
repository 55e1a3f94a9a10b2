"""LN-tuning (the `norms` trainable) is one more artifact layout: after every round each device's
replica, the server's global model and the transport-free loop hold the same bits, for a ZO
method on ONNX devices and a backprop method on torch hosts."""
import numpy as np
import pytest

from edgefed.data import iid_split, load_rotten_tomatoes
from edgefed.federation import run_federation
from edgefed.methods import JobConfig
from edgefed.research import run_inline
from edgefed.runtime import DeviceModel
from edgefed.simulate import thread_devices


@pytest.mark.parametrize("method,backend,kw", [
    ("fedkseed", "onnx", dict(lr=1e-3, eps=1e-3, k=64)),
    ("fedavg", "torch", dict(lr=5e-3)),
])
def test_norms_replicas_are_bit_identical_every_round(tiny_artifacts, tmp_path, method, backend, kw):
    art = tiny_artifacts["norms"]
    data = list(load_rotten_tomatoes()[:90])
    shards = iid_split(data, 3)
    if backend == "torch":
        from edgefed.backends.torch_model import TorchModel
        base = TorchModel(art, seq_len=64)
    else:
        base = DeviceModel(art, threads=1, batch_size=4, seq_len=64, check_memory=False)

    def job(name):
        return JobConfig(job=name, method=method, artifact=str(art), rounds=2, devices_per_round=3, min_devices=3,
                         round_timeout=60, local_steps=2, batch_size=4, **kw)

    starter = thread_devices(base, f"norms-{method}", shards)
    full = run_federation(job(f"norms-{method}"), art, data[:10], broker_url=f"inproc://norms-{method}",
                          start_devices=starter, out_dir=tmp_path, eval_n=10, progress=False, seq_len=64)
    assert not np.array_equal(full.final_params, base.params), "nothing trained"
    for agent in starter.agents:  # each round's plan carries the global digest: a drifted replica resyncs
        assert agent.stats.resyncs == 0
        np.testing.assert_array_equal(agent.model.params, full.final_params)
    inline = run_inline(job("inline"), [base.fork() for _ in shards], shards)
    np.testing.assert_array_equal(inline.params, full.final_params)
