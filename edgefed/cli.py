"""The `edgefed` command. Each subcommand imports its implementation lazily, so a
device without torch can run `edgefed device` and friends."""
from __future__ import annotations

import argparse
import sys


def _bench_kernels(args: argparse.Namespace) -> int:
    import runpy
    from pathlib import Path
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"
    if not bench.exists():
        print(f"benchmarks/kernels.py not found next to this install ({bench}); "
              "run it from a source checkout", file=sys.stderr)
        return 2
    sys.argv = [str(bench), *args.rest]
    runpy.run_path(str(bench), run_name="__main__")
    return 0


def _demo(args: argparse.Namespace) -> int:
    try:
        from .demo import add_demo_args, run_demo  # noqa: F401
    except ImportError:
        # Until the federated demo lands, the main job is the kernel benchmark.
        args.rest = []
        return _bench_kernels(args)
    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgefed", description="Federated post-training of language "
                                "models on devices people own")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench-kernels", help="perturbation kernel throughput vs baselines")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=_bench_kernels)
    d = sub.add_parser("demo", help="the main job: a real federated fine-tuning over MQTT")
    try:
        from .demo import add_demo_args
        add_demo_args(d)
    except ImportError:
        pass
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
