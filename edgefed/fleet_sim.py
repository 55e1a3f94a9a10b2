"""Thousands of virtual devices across processes: each worker process loads the artifact once
and runs its slice of the devices as threads (simulate.thread_devices: forks of one graph), all
on one MQTT broker with the real server. Workers are Ray actors when Ray is installed and asked
for (`backend="ray"`, e.g. across a cluster), else local processes (multiprocessing, spawn).

A worker reports, when its devices are done, each device's id, rounds trained and the digest of
its final trainables, so a caller can check every replica against the server's global model
without moving the parameters. Host side (simulation), no torch needed.
"""
from __future__ import annotations

import multiprocessing as mp
import threading
from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = ["ProcessFleet", "DeviceReport", "worker_main"]


@dataclass(frozen=True)
class DeviceReport:
    device: str
    rounds_trained: int
    updates_accepted: int
    digest: str


def worker_main(url: str, job: str, artifact: str, shards: Sequence[Sequence], first: int, seq_len: Optional[int],
                batch_size: Optional[int]) -> list[DeviceReport]:
    """One worker: devices sim-{first}.. on `url`, until the job is done. Returns their reports."""
    from . import kernels
    from .replica import params_digest
    from .runtime import DeviceModel
    from .simulate import thread_devices

    kernels.set_num_threads(1)
    base = DeviceModel(artifact, threads=1, check_memory=False, seq_len=seq_len, batch_size=batch_size)
    ids = [f"sim-{first + i:05d}" for i in range(len(shards))]
    starter = thread_devices(base, job, shards, device_ids=ids)
    halt = starter(url)
    try:
        for th in starter.threads:  # each device leaves once the job is finished
            th.join()
    finally:
        halt()
    failed = halt.failure()
    if failed:
        raise RuntimeError(failed)
    return [DeviceReport(a.device, a.stats.rounds_trained, a.stats.updates_accepted, params_digest(a.model.params))
            for a in starter.agents]


def _mp_entry(q, *args) -> None:
    try:
        q.put(("ok", worker_main(*args)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        q.put(("error", f"{type(e).__name__}: {e}"))


class ProcessFleet:
    """A run_federation `start_devices` spreading shards over `processes` workers."""

    def __init__(self, job: str, artifact: str, shards: Sequence[Sequence], processes: int, *,
                 backend: str = "processes", seq_len: Optional[int] = None, batch_size: Optional[int] = None):
        if processes < 1:
            raise ValueError("processes must be >= 1")
        if backend not in ("processes", "ray"):
            raise ValueError(f"backend {backend!r}: use processes or ray")
        if backend == "ray":
            try:
                import ray  # noqa: F401
            except ImportError:
                raise RuntimeError("backend ray: Ray is not installed here (pip install ray), or use processes") from None
        self.job, self.artifact, self.backend = job, str(artifact), backend
        self.seq_len, self.batch_size = seq_len, batch_size
        per = -(-len(shards) // processes)
        self.slices = [(i, list(shards[i:i + per])) for i in range(0, len(shards), per)]
        self.reports: list[DeviceReport] = []
        self.errors: list[str] = []

    def __call__(self, url: str):
        done = threading.Event()
        if self.backend == "ray":
            import ray
            if not ray.is_initialized():
                ray.init(ignore_reinit_error=True, log_to_driver=False)
            remote = ray.remote(worker_main)
            refs = [remote.remote(url, self.job, self.artifact, sl, first, self.seq_len, self.batch_size)
                    for first, sl in self.slices]

            def collect():
                for r in refs:
                    try:
                        self.reports.extend(ray.get(r))
                    except Exception as e:  # noqa: BLE001
                        self.errors.append(str(e))
                done.set()
            procs = []
        else:
            ctx = mp.get_context("spawn")  # a clean interpreter: no inherited threads or broker clients
            q = ctx.Queue()
            procs = [ctx.Process(target=_mp_entry, args=(q, url, self.job, self.artifact, sl, first, self.seq_len,
                                                       self.batch_size), daemon=True)
                     for first, sl in self.slices]
            for p in procs:
                p.start()

            def collect():
                for _ in procs:
                    status, value = q.get()
                    if status == "ok":
                        self.reports.extend(value)
                    else:
                        self.errors.append(value)
                done.set()
        threading.Thread(target=collect, daemon=True).start()

        def halt():
            done.wait(120)
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.terminate()
        halt.failure = lambda: self.errors[0] if self.errors else None
        return halt

    @property
    def workers(self) -> int:
        return len(self.slices)
