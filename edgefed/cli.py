"""The `edgefed` command. Each subcommand imports its implementation lazily, so a device
without torch can run `edgefed device` and friends."""
from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path


def _bench_kernels(args: argparse.Namespace) -> int:
    import runpy
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_speed.py"
    if not bench.exists():
        print(f"benchmarks/kernel_speed.py not found next to this install ({bench}); "
              "run it from a source checkout", file=sys.stderr)
        return 2
    sys.argv = [str(bench), *args.rest]
    runpy.run_path(str(bench), run_name="__main__")
    return 0


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="device class name or YAML (device_configs/)")
    p.add_argument("--broker", required=True, help="mqtt://host:port of the job's broker")
    p.add_argument("--data", required=True, help="this device's rows (JSONL, CSV, TSV, Parquet or a saved "
                   "datasets directory) of the artifact's task: classify text+label, sft instruction+response "
                   "or messages, dpo prompt+chosen+rejected")
    p.add_argument("--artifact", required=True, help="the exported model folder the job runs")
    p.add_argument("--job", required=True)
    p.add_argument("--device-id", default=None, help="default: the host name")
    p.add_argument("--threads", type=int, default=None, help="override the config's threads")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: the config's); "
                   "rows longer are cut by the task's rule, or refused where an answer would be cut")
    p.add_argument("--max-rounds", type=int, default=None)
    p.add_argument("--idle-timeout", type=float, default=None, help="leave after this long with no plan")
    p.add_argument("--progress", action="store_true", help="show a progress bar for local training")
    p.add_argument("--checkpoint", default=None, help="save the final trained parameters here "
                   "(raw float32 + JSON sidecar) when the job finishes")
    p.add_argument("--backend", choices=("onnx", "torch"), default="onnx",
                   help="onnx: ONNX Runtime, forward passes only, no torch (Pis, Jetsons); torch: a host "
                        "with the host extra runs the same artifact's graph in torch (CUDA + bf16 when "
                        "present) and backprops: exact gradient projections in ZO jobs, backprop methods")
    p.add_argument("--base-model", default=None, help="torch backend: the checkpoint the artifact was "
                   "exported from (registry name or dir; default: the manifest's base_model)")
    p.add_argument("--torch-device", default="auto", help="torch backend: cuda, cuda:1, cpu or auto")
    p.add_argument("--max-message-mb", type=float, default=4.0, help="largest protocol message; as the "
                   "server's --max-message-mb (full-model deltas)")
    p.add_argument("--broker-message-kb", type=int, default=4096, help="the broker's per-message limit: "
                   "larger payloads go in chunks")
    p.add_argument("--signing-key", default=None, metavar="FILE",
                   help="this device's Ed25519 key (signing/<device>.key from `edgefed certs`): "
                        "sign updates and statuses; needs --server-key")
    p.add_argument("--server-key", default=None, metavar="FILE",
                   help="the job's public key (signing/server.pub): ignore server messages not "
                        "signed with it. Without both: development mode, unsigned")
    from .data_args import add_field_args
    add_field_args(p)


def _device(args: argparse.Namespace) -> int:
    from . import kernels
    from .agent import DeviceAgent
    from .data import read_records
    from .data_args import fields_from_args
    from .device_config import load_device_config
    from .export.artifact import read_manifest
    from .runtime import MemoryBudgetError, peak_rss_bytes, save_checkpoint
    from .transport import BrokerUnreachable, make_transport

    try:
        cfg = load_device_config(args.config)
        kind = read_manifest(args.artifact)["task"]["kind"]
        examples = read_records(args.data, kind, fields_from_args(args))
    except (OSError, ValueError, KeyError) as exc:
        print(f"edgefed device: {exc}", file=sys.stderr)
        return 2
    device_id = args.device_id or socket.gethostname().split(".")[0]
    signing = None
    if bool(args.signing_key) != bool(args.server_key):
        print("edgefed device: --signing-key and --server-key go together", file=sys.stderr)
        return 2
    if args.signing_key:
        try:
            from .security.signing import DeviceSigning
            signing = DeviceSigning.from_files(args.signing_key, args.server_key, device_id)
        except (ValueError, OSError, ImportError) as exc:
            print(f"edgefed device: {exc}", file=sys.stderr)
            return 2
    from .backends import load_model_backend
    try:
        model = load_model_backend(args.backend, args.artifact, cfg, threads=args.threads,
                                   batch_size=args.batch_size, seq_len=args.seq_len,
                                   base_model=args.base_model, torch_device=args.torch_device)
    except MemoryBudgetError as exc:
        print(f"edgefed device: {exc}", file=sys.stderr)
        return 3
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"edgefed device: {exc}", file=sys.stderr)
        return 2
    try:  # every row checked now (labels known to the artifact, fits seq_len), not mid-round
        checked = model.task.validate(examples)
    except ValueError as exc:
        print(f"edgefed device: {exc}", file=sys.stderr)
        return 2
    if checked["truncated"]:
        print(f"edgefed device: {checked['truncated']} of {checked['n']} rows are longer than "
              f"{model.task.limit} tokens: their text is cut from its end (templates and answers are kept)",
              file=sys.stderr)
    kernels.set_num_threads(args.threads or cfg.threads)
    from .protocol import DEFAULT_LIMITS, Limits
    t = make_transport(args.broker, client_id=f"edgefed-{args.job}-{device_id}",
                       max_payload_bytes=int(args.broker_message_kb) << 10)
    limits = Limits(max_message_bytes=max(DEFAULT_LIMITS.max_message_bytes, int(args.max_message_mb * (1 << 20))))
    agent = DeviceAgent(t, device_id, args.job, model, examples, device_class=cfg.name, limits=limits,
                        progress=args.progress, signing=signing)
    try:
        stats = agent.run(max_rounds=args.max_rounds, idle_timeout=args.idle_timeout)
    except BrokerUnreachable as exc:
        print(f"edgefed device: {exc}", file=sys.stderr)
        return 4
    if args.checkpoint and agent.final_round is not None:
        path = save_checkpoint(model, args.checkpoint, {"job": args.job, "round": agent.final_round})
        print(f"device {device_id}: final model (round {agent.final_round}) saved to {path}", file=sys.stderr)
    print(f"device {device_id}: {stats.rounds_trained} rounds, {stats.updates_accepted} accepted, "
          f"{stats.bytes_sent} B sent, {stats.bytes_received} B received, peak RSS "
          f"{peak_rss_bytes() / 2**20:.0f} MB", file=sys.stderr)
    return 0


def _delegate(module: str, add: str, run: str):
    """A subcommand implemented elsewhere: (add_args, run) resolved on use."""
    def add_args(p: argparse.ArgumentParser) -> None:
        import importlib
        getattr(importlib.import_module(module), add)(p)

    def go(args: argparse.Namespace) -> int:
        import importlib
        return int(getattr(importlib.import_module(module), run)(args) or 0)
    return add_args, go


SUBCOMMANDS = {
    # name: (help, add_args, run)
    "export": ("export a model as an EdgeFed ONNX artifact (host, needs torch)",
               *_delegate("edgefed.export.cli", "add_export_args", "run_export")),
    "export-result": ("a job's trained model as a PEFT adapter, a merged transformers checkpoint or an ONNX "
                      "artifact (host)", *_delegate("edgefed.export.results", "add_export_result_args",
                                                    "run_export_result")),
    "models": ("list / prepare packaged models (host)",
               *_delegate("edgefed.export.cli", "add_models_args", "run_models")),
    "server": ("run the aggregation server for a job",
               *_delegate("edgefed_server.cli", "add_server_args", "run_server")),
    "worker": ("an aggregation worker of a job (MQTT 5 shared subscription; partial sums merged exactly)",
               *_delegate("edgefed_server.cli", "add_worker_args", "run_worker")),
    "device": ("run a device: join a job, train forward-only, report", _add_device_args, _device),
    "simulate": ("N virtual devices and the server in one process",
                 *_delegate("edgefed.simulate", "add_simulate_args", "run_simulate")),
    "demo": ("the main job: federated fine-tuning of SmolLM2 over MQTT",
             *_delegate("edgefed.demo", "add_demo_args", "run_demo")),
    "certs": ("make a CA, server and device certificates, Mosquitto password file and ACL for a job",
              *_delegate("edgefed.security.certs", "add_certs_args", "run_certs")),
    "doctor": ("check this machine as a device: Python, onnxruntime, kernels, memory, broker, clock",
               *_delegate("edgefed.doctor", "add_doctor_args", "run_doctor")),
    "zero-shot": ("score candidate templates on held-out data before training (host)",
                  *_delegate("edgefed.zero_shot", "add_zero_shot_args", "run_zero_shot")),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgefed", description="Federated post-training of language "
                                "models on devices people own")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench-kernels", help="perturbation kernel throughput vs baselines")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=_bench_kernels)
    # Only the chosen subcommand's arguments are built, so `edgefed device` never imports
    # the host-side modules of `export` or `demo`.
    chosen = next((a for a in (argv if argv is not None else sys.argv[1:]) if a in SUBCOMMANDS), None)
    for name, (help_, add_args, run) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_)
        if name == chosen:
            add_args(sp)
        sp.set_defaults(func=run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
