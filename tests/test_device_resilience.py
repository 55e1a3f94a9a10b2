"""A failed step does not end a device: it publishes an `error` status with the reason, skips
the round, and carries on from the global state; the server counts it and stops waiting."""
import numpy as np
import pytest

from edgefed.data import iid_split, load_rotten_tomatoes, train_heldout_split
from edgefed.federation import run_federation
from edgefed.methods import JobConfig
from edgefed.methods.fedkseed import FedKSeedClient
from edgefed.runtime import DeviceModel
from edgefed.simulate import thread_devices
from edgefed.zo import DivergedError


@pytest.mark.parametrize("fault", ["nan_loss", "bad_delta"])
def test_device_skips_a_failed_round_and_ends_on_the_global_model(tiny_artifacts, tmp_path, monkeypatch, fault):
    train, held = train_heldout_split(load_rotten_tomatoes(), heldout=30, seed=0)
    shards = iid_split(train[:240], 3)
    victim = shards[1][0]
    real_train, real_apply = FedKSeedClient.local_train, FedKSeedClient.apply_delta
    hits = []

    def local_train(self, model, examples, plan, seed, progress=False):
        if fault == "nan_loss" and plan.round == 1 and examples[0] == victim:
            hits.append(plan.round)
            raise DivergedError("loss is nan at step 2 (lr too high?)")
        return real_train(self, model, examples, plan, seed, progress)

    def apply_delta(self, model, delta, plan_params):
        if fault == "bad_delta" and delta.round == 1 and not hits and model is agents[1].model:
            hits.append(delta.round)
            model.params[:3] += 1.0  # half-applied, then refused: the state is no longer global
            raise ValueError("delta does not fit")
        return real_apply(self, model, delta, plan_params)

    monkeypatch.setattr(FedKSeedClient, "local_train", local_train)
    monkeypatch.setattr(FedKSeedClient, "apply_delta", apply_delta)
    art = tiny_artifacts["lora"]
    job = JobConfig(job=f"resilience-{fault}", method="fedkseed", artifact=str(art), rounds=4, devices_per_round=0,
                    min_devices=2, round_timeout=30.0, lr=1e-2, eps=1e-3, local_steps=4, batch_size=8, k=256)
    base = DeviceModel(art, threads=1, batch_size=8, seq_len=32, check_memory=False)
    starter = thread_devices(base, job.job, shards)
    agents = starter.agents
    res = run_federation(job, art, held, broker_url=f"inproc://{job.job}", start_devices=starter,
                         out_dir=tmp_path, eval_n=10, progress=False)
    assert hits == [1] and res.rounds_completed == 4
    sick = agents[1]
    assert sick.stats.errors == 1 and sick.stats.rounds_trained == 3  # skipped one round, trained the rest
    assert res.server_summary["history"][1 if fault == "nan_loss" else 2]["n_updates"] == 2
    assert "sim-001" not in res.server_summary["history"][1 if fault == "nan_loss" else 2]["devices"]
    for a in agents:  # the device that failed is back on the global model, bit for bit
        np.testing.assert_array_equal(a.model.params, res.final_params)


def test_drift_is_detected_by_the_plan_digest_and_repaired(tiny_artifacts, tmp_path, caplog):
    """One flipped bit in a device's trainables after round 1: the next plan's digest of the
    global trainables catches it, the device resyncs from the artifact, every replica ends
    bit-identical to the server's."""
    import logging

    from edgefed.agent import DeviceAgent

    class BitFlip(DeviceAgent):
        def _serve(self, plan):
            super()._serve(plan)
            if plan.round == 1 and self.device == "sim-002":
                p = self.model.params
                p[7] = np.nextafter(p[7], np.float32(np.inf))  # one ulp: the smallest drift there is

    train, held = train_heldout_split(load_rotten_tomatoes(), heldout=30, seed=0)
    art = tiny_artifacts["lora"]
    job = JobConfig(job="drift", method="fedkseed", artifact=str(art), rounds=3, devices_per_round=0,
                    min_devices=3, round_timeout=30.0, lr=1e-2, eps=1e-3, local_steps=4, batch_size=8, k=256)
    base = DeviceModel(art, threads=1, batch_size=8, seq_len=32, check_memory=False)
    starter = thread_devices(base, job.job, iid_split(train[:240], 3), agent_cls=BitFlip)
    with caplog.at_level(logging.INFO, logger="edgefed.agent"):
        res = run_federation(job, art, held, broker_url="inproc://drift", start_devices=starter,
                             out_dir=tmp_path, eval_n=10, progress=False)
    assert res.rounds_completed == 3
    assert [a.stats.resyncs for a in starter.agents] == [0, 0, 1]
    assert any("sim-002: parameters differ from the global model at the start of round 2" in r.getMessage()
               for r in caplog.records)
    for a in starter.agents:
        np.testing.assert_array_equal(a.model.params, res.final_params)


def test_large_trainables_are_restored_exactly_from_a_file(tiny_artifacts, tmp_path, monkeypatch):
    """Trainables over the in-memory limit (full-parameter SmolLM2) are snapshotted to a file
    for the restore after local training: exact, so no device ever needs a resync."""
    from edgefed.methods import fedkseed
    monkeypatch.setattr(fedkseed, "SNAPSHOT_LIMIT_BYTES", 0)
    monkeypatch.setenv("EDGEFED_SNAPSHOT_DIR", str(tmp_path))
    train, held = train_heldout_split(load_rotten_tomatoes(), heldout=30, seed=0)
    art = tiny_artifacts["full"]
    job = JobConfig(job="big-restore", method="fedkseed", artifact=str(art), rounds=3, devices_per_round=0,
                    min_devices=3, round_timeout=30.0, lr=1e-2, eps=1e-3, local_steps=6, batch_size=8, k=256)
    base = DeviceModel(art, threads=1, batch_size=8, seq_len=32, check_memory=False)
    starter = thread_devices(base, job.job, iid_split(train[:240], 3))
    res = run_federation(job, art, held, broker_url="inproc://big-restore", start_devices=starter,
                         out_dir=tmp_path / "run", eval_n=10, progress=False)
    assert res.rounds_completed == 3 and not np.array_equal(res.final_params, base.params)
    assert [a.stats.resyncs for a in starter.agents] == [0, 0, 0]
    assert not list(tmp_path.glob("edgefed-snapshot-*"))  # every snapshot file removed
    for a in starter.agents:
        np.testing.assert_array_equal(a.model.params, res.final_params)


def test_snapshot_round_trips_through_a_file(tmp_path):
    from edgefed.snapshot import ParamSnapshot
    p = np.random.default_rng(0).standard_normal(5_000_001).astype(np.float32)
    want = p.copy()
    with ParamSnapshot(p, memory_limit=0, directory=tmp_path) as snap:
        assert snap.path is not None and snap.path.stat().st_size == p.nbytes
        p += 1.0
        snap.restore(p)
    np.testing.assert_array_equal(p, want)
    assert not list(tmp_path.iterdir())
