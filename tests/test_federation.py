"""Federation end to end: server + device agents over the in-process transport, Mosquitto and
the embedded broker; devices killed mid-round; the broker restarted mid-job; the demo."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgefed.data import iid_split, load_rotten_tomatoes, train_heldout_split, write_jsonl
from edgefed.federation import run_federation
from edgefed.methods import JobConfig
from edgefed.runtime import DeviceModel
from edgefed.simulate import thread_devices
from edgefed.transport.broker import find_mosquitto, start_broker

ROOT = Path(__file__).resolve().parents[1]
needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed (CI installs it)")


@pytest.fixture(scope="module")
def data():
    train, held = train_heldout_split(load_rotten_tomatoes(), heldout=60, seed=0)
    return train[:400], held


def _job(name, method, artifact, *, rounds=3, steps=6, lr=1e-2, n=3, timeout=60.0, min_devices=None):
    return JobConfig(job=name, method=method, artifact=str(artifact), rounds=rounds, devices_per_round=n,
                     min_devices=min_devices or n, round_timeout=timeout, lr=lr, eps=1e-3,
                     local_steps=steps, batch_size=8, k=1024, seed_pool_id=7)


@pytest.mark.parametrize("method", ["fedkseed", "fedmezo"])
def test_simulation_devices_end_on_the_global_model(tiny_artifacts, data, tmp_path, method):
    train, held = data
    art = tiny_artifacts["lora"]
    job = _job(f"sim-{method}", method, art)
    base = DeviceModel(art, threads=1, batch_size=8, seq_len=32, check_memory=False)
    starter = thread_devices(base, job.job, iid_split(train, 3))
    res = run_federation(job, art, held, broker_url=f"inproc://{job.job}", start_devices=starter,
                         out_dir=tmp_path, eval_n=30, progress=False)
    assert res.rounds_completed == 3 and len(res.history) == 4
    assert not np.array_equal(res.final_params, base.params), "training changed nothing"
    for agent in starter.agents:
        assert agent.stats.rounds_trained == 3 and agent.final_round == 3
        # Same deltas, same order, same kernels: bit-identical to the server-side global model.
        np.testing.assert_array_equal(agent.model.params, res.final_params)
    assert (tmp_path / "rounds.png").stat().st_size > 5000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rounds_completed"] == 3 and saved["bytes_up_per_device_round"] > 0
    if method == "fedkseed":  # seeds and scalars only: 6 steps -> a few dozen bytes of payload
        assert res.bytes_up_per_device_round < 200
    else:  # the whole adapter each way
        assert res.bytes_up_per_device_round > 4 * base.n_trainable


def test_a_job_is_reproducible_whatever_its_id(tiny_artifacts, data, tmp_path):
    """Devices derive their batches from the job's seed, not its (timestamped) id: the same
    job under another id ends on bit-identical parameters; another seed does not."""
    import dataclasses
    train, held = data
    art = tiny_artifacts["lora"]
    base = DeviceModel(art, threads=1, batch_size=8, seq_len=32, check_memory=False)
    finals = []
    for name, seed in [("repro-a", 0), ("repro-b", 0), ("repro-c", 1)]:
        job = dataclasses.replace(_job(name, "fedkseed", art, rounds=2, steps=4), seed=seed)
        res = run_federation(job, art, held, broker_url=f"inproc://{name}", out_dir=tmp_path / name,
                             start_devices=thread_devices(base, name, iid_split(train, 3)),
                             eval_n=10, progress=False)
        finals.append(res.final_params)
    np.testing.assert_array_equal(finals[0], finals[1])
    assert not np.array_equal(finals[0], finals[2])


@pytest.mark.parametrize("history,full", [(None, False), (1, True)], ids=["delta-sync", "full-sync"])
def test_late_device_catches_up(tiny_artifacts, data, tmp_path, history, full):
    """A device that joins after round 2 syncs (deltas, or the full state when the server keeps
    only one round of history), trains the remaining rounds and ends on the global model."""
    from edgefed.agent import DeviceAgent
    from edgefed.transport import make_transport

    train, held = data
    art = tiny_artifacts["lora"]
    job = _job(f"late-{history}", "fedkseed", art, rounds=5, steps=30, n=0, min_devices=2)
    base = DeviceModel(art, threads=1, batch_size=8, seq_len=32, check_memory=False)
    shards = iid_split(train, 3)
    early = thread_devices(base, job.job, shards[:2])
    agents = []

    def start(url):
        stop_early = early(url)

        def join_late():
            while not any(a.stats.last_round >= 2 for a in early.agents):
                time.sleep(0.05)
            agent = DeviceAgent(make_transport(url, client_id="late"), "late", job.job, base.fork(), shards[2])
            agents.append(agent)
            agent.run()
        th = threading.Thread(target=join_late, daemon=True)
        th.start()

        def stop():
            th.join(timeout=60)
            stop_early()
        return stop

    res = run_federation(job, art, held, broker_url=f"inproc://{job.job}", start_devices=start,
                         out_dir=tmp_path, eval_n=20, progress=False, server_options={"history": history})
    assert res.rounds_completed == 5
    late = agents[0]
    assert 1 <= late.stats.rounds_trained <= 3 and late.final_round == 5
    assert late.stats.full_syncs == (1 if full else 0)
    assert late.stats.resyncs == 0  # the full state is the global trainables themselves: exact
    np.testing.assert_array_equal(late.model.params, res.final_params)
    for a in early.agents:
        np.testing.assert_array_equal(a.model.params, res.final_params)


def test_fedkseed_bytes_do_not_grow_with_the_model(tiny_artifacts, data, tmp_path):
    """FedKSeed's uplink is independent of the trainable size: 8 bytes a step plus the header,
    for 200k full parameters as for 1k LoRA ones."""
    train, held = data
    sizes, n = {}, {}
    for mode in ("full", "lora"):
        art = tiny_artifacts[mode]
        job = _job(f"bytes-{mode}", "fedkseed", art, rounds=1, steps=4, lr=1e-3, n=2)
        base = DeviceModel(art, threads=1, batch_size=8, seq_len=32, check_memory=False)
        res = run_federation(job, art, held[:20], broker_url=f"inproc://{job.job}", out_dir=tmp_path / mode,
                             start_devices=thread_devices(base, job.job, iid_split(train, 2)),
                             eval_n=10, progress=False)
        sizes[mode] = res.bytes_up_per_device_round
        n[mode] = base.n_trainable
    assert n["full"] > 50 * n["lora"]
    for mode in sizes:  # <= 4 (seed, scalar) pairs + the fixed fields (protocol v2: the pairs travel as
        assert 60 < sizes[mode] <= 106 + 4 * 8, sizes  # two named tensors, 26 B more than v1's 80)


def _device_cmd(url, job, dev, data, artifact):
    return [sys.executable, "-m", "edgefed.cli", "device", "--config", "x86-sim", "--broker", url,
            "--data", str(data), "--artifact", str(artifact), "--job", job, "--device-id", dev,
            "--threads", "1", "--batch-size", "8", "--idle-timeout", "120"]


def _process_devices(artifact, job, shards, tmp_path, procs, url_holder=None):
    def start(url):
        for i, shard in enumerate(shards):
            data = write_jsonl(tmp_path / f"d{i}.jsonl", shard)
            log = open(tmp_path / f"dev{i}.log", "w")
            procs.append(subprocess.Popen(_device_cmd(url, job, f"dev{i}", data, artifact), stdout=log,
                                          stderr=subprocess.STDOUT, cwd=ROOT))
        # All devices online before the server opens round 0, so its target counts them all.
        logs = [tmp_path / f"dev{i}.log" for i in range(len(shards))]
        end = time.time() + 60
        while time.time() < end and not all(p.exists() and "joined job" in p.read_text() for p in logs):
            time.sleep(0.1)

        def stop():
            for p in procs:
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
        return stop
    return start


def _logs_say(tmp_path, n, text):
    logs = [tmp_path / f"dev{i}.log" for i in range(n)]
    return all(p.exists() and text in p.read_text() for p in logs)


def _run_with_fault(fault, job, art, held, broker, shards, tmp_path, procs):
    """run_federation with device processes while `fault(stop)` runs beside it."""
    stop = threading.Event()
    threading.Thread(target=fault, args=(stop,), daemon=True).start()
    try:
        return run_federation(job, art, held[:20], broker_url=broker.url, out_dir=tmp_path, eval_n=10,
                              start_devices=_process_devices(art, job.job, shards, tmp_path, procs),
                              progress=False, timeout=300)
    finally:
        stop.set()
        broker.stop()


@needs_mosquitto
@pytest.mark.mosquitto
def test_device_killed_mid_job_the_others_finish(tiny_artifacts, data, tmp_path):
    """SIGKILL one of three device processes while it trains round 1: its last will marks it
    offline, the following rounds close with the two left (quorum 2), and the job completes."""
    train, held = data
    art = tiny_artifacts["lora"]
    job = _job("killdev", "fedkseed", art, rounds=4, steps=60, n=0, min_devices=2, timeout=40)
    procs: list = []

    def kill_dev2(stop):
        # after all three had round 0 accepted (dev2 may be the slowest), i.e. during round 1
        while not stop.is_set() and not _logs_say(tmp_path, 3, "round 0 accepted"):
            time.sleep(0.1)
        if procs:
            procs[2].send_signal(signal.SIGKILL)

    res = _run_with_fault(kill_dev2, job, art, held, start_broker(prefer="mosquitto"),
                          iid_split(train, 3), tmp_path, procs)
    assert res.rounds_completed == 4
    assert procs[2].returncode == -signal.SIGKILL
    per_round = [h["n_updates"] for h in res.history[1:]]
    assert per_round[0] == 3 and per_round[-1] == 2, per_round
    assert procs[0].returncode == 0 and procs[1].returncode == 0


@pytest.mark.parametrize("kind", [pytest.param("mosquitto", marks=[needs_mosquitto, pytest.mark.mosquitto]),
                                  "embedded"])
def test_broker_restarted_mid_job(tiny_artifacts, data, tmp_path, kind):
    """The broker goes down for a moment during round 1; server and devices reconnect and the
    job completes with every round aggregated from all devices."""
    train, held = data
    art = tiny_artifacts["lora"]
    job = _job(f"restart-{kind}", "fedkseed", art, rounds=4, steps=60, n=2, timeout=60)
    procs: list = []
    broker = start_broker(prefer=kind, persistence=True)

    def restart_broker(stop):
        while not stop.is_set():
            if _logs_say(tmp_path, 2, "round 0 accepted"):
                broker.restart()
                return
            time.sleep(0.1)

    res = _run_with_fault(restart_broker, job, art, held, broker, iid_split(train, 2), tmp_path, procs)
    assert res.rounds_completed == 4
    assert [h["n_updates"] for h in res.history[1:]] == [2, 2, 2, 2]
    assert all(p.returncode == 0 for p in procs)


def _run_logs(run: Path) -> str:
    return "".join(f"\n== {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:])
                   for f in sorted(run.glob("*.log")))


@pytest.mark.parametrize("flags", [[], pytest.param(["--broker-kind", "mosquitto"], marks=needs_mosquitto)],
                         ids=["embedded-broker", "mosquitto"])
def test_quick_demo_runs_the_real_path(tmp_path, flags):
    env = dict(os.environ, EDGEFED_CACHE=str(tmp_path / "cache"))
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, "-m", "edgefed.cli", "demo", "--quick", "--out", str(tmp_path / "run"),
                            "--no-progress", *flags], capture_output=True, text=True, cwd=ROOT, env=env,
                           timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the quick demo hung; its logs:\n" + _run_logs(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:] + _run_logs(tmp_path / "run")
    assert time.time() - t0 < 120
    out = r.stdout
    assert "before" in out and "after" in out and "95% CI" in out and "bytes on the wire" in out
    assert "estimate: ~" in r.stderr and "(estimated " in out, "the demo says how long it will take"
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["rounds_completed"] == 3 and res["gain"]["n"] == 100
    assert (tmp_path / "run" / "rounds.png").exists()
    for i in range(1, 5):
        log = (tmp_path / "run" / f"device-{i}.log").read_text()
        assert "3 rounds, 3 accepted" in log


def test_demo_stops_with_the_device_error_when_devices_fail(tmp_path):
    """A device that cannot run (here: a config whose memory budget the model does not fit) makes
    the demo stop at once with that device's reason, instead of waiting out round deadlines."""
    cfg = tmp_path / "tiny-board.yaml"
    cfg.write_text("name: tiny-board\narch: x86_64\nthreads: 1\nmemory_budget_mb: 64\n"
                   "execution_providers: [CPUExecutionProvider]\nbatch_size: 8\nseq_len: 64\nprecision: fp32\n")
    env = dict(os.environ, EDGEFED_CACHE=str(tmp_path / "cache"))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "edgefed.cli", "demo", "--quick", "--out", str(tmp_path / "run"),
                        "--no-progress", "--device-config", str(cfg)], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=240)
    assert r.returncode == 1, r.stderr[-3000:]
    assert time.time() - t0 < 90
    assert "exited with code 3" in r.stderr and "allows 64 MB" in r.stderr and "tiny-board" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    bad = subprocess.run([sys.executable, "-m", "edgefed.cli", "demo", "--quick", "--device-config", "no-such-board"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert bad.returncode == 2 and "no-such-board" in bad.stderr and "known:" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("cmd, flags, says", [
    ("demo", ["--quick", "--param", "server_lr=abc"], "job param server_lr='abc' must be a number"),
    ("simulate", ["--model", "tiny", "--rounds", "1", "--param", "server_lr=abc"],
     "job param server_lr='abc' must be a number"),
    ("demo", ["--model", "tiny", "--trainable", "prompt:tokens=4", "--prompt-init", ""], "has no tokens"),
], ids=["demo-param", "simulate-param", "demo-prompt-init"])
def test_a_bad_job_setting_is_refused_before_any_device_starts(tmp_path, cmd, flags, says):
    """A typo in --param or an empty --prompt-init is one line and exit 2 before a broker or a
    device starts, not a traceback from the server's first round."""
    env = dict(os.environ, EDGEFED_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "edgefed.cli", cmd, *flags, "--out", str(tmp_path / "run"),
                        "--no-progress"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"edgefed {cmd}: " in r.stderr and says in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "[3/4] broker" not in r.stderr
    assert not list((tmp_path / "run").glob("device-*.log")) and not (tmp_path / "run" / "server.sqlite").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_killing_the_demo_leaves_no_processes_behind(tmp_path):
    """SIGKILL of the demo (a CI timeout, an OOM kill) takes its broker and devices with it:
    nothing keeps holding ports or CPU."""
    env = dict(os.environ, EDGEFED_CACHE=str(tmp_path / "cache"))
    demo = subprocess.Popen([sys.executable, "-m", "edgefed.cli", "demo", "--quick", "--out", str(tmp_path / "run"),
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=env)

    def children():
        kids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == demo.pid:
                kids.append(int(stat.parent.name))
        return kids

    def alive(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    end = time.time() + 120
    while len(children()) < 5 and time.time() < end and demo.poll() is None:
        time.sleep(0.2)
    kids = children()
    assert len(kids) == 5, f"expected a broker and 4 devices, found {kids}"
    demo.kill()
    demo.wait()
    end = time.time() + 15
    while any(alive(k) for k in kids) and time.time() < end:
        time.sleep(0.2)
    assert not [k for k in kids if alive(k)], "children outlived the demo"
