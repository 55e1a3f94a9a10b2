"""argparse helpers for `edgefed export` and `edgefed models` (wired into edgefed/cli.py).

Building the parsers imports neither torch nor transformers; only run_* do, lazily.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import quantize as quant
from .specs import DEFAULT_TEMPLATE, TASK_HELP, parse_task, parse_trainable


def _spec_type(parse):
    def check(s: str) -> str:
        try:
            parse(s)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return s
    return check


def add_prompt_init_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt-init", default=None, metavar="TEXT",
                        help="--trainable prompt: the soft prompt starts from this text's token embeddings "
                             "(write an instruction for your task; default: one built from the task's labels)")


def add_export_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default="smollm2-135m",
                        help="registry name (smollm2-135m, tiny) or a local transformers model dir")
    parser.add_argument("--trainable", default="lora:r=8,targets=q_proj,v_proj",
                        type=_spec_type(parse_trainable),
                        help='"full" | "norms" (LN-tuning) | "lora:r=8,targets=q_proj,v_proj[,alpha=16]" | "prompt:tokens=20"')
    parser.add_argument("--task", default="classify:labels=positive,negative",
                        type=_spec_type(parse_task), help=TASK_HELP)
    parser.add_argument("--data", default=None, help="a data file of the task (JSONL, CSV, TSV, Parquet, "
                        "saved datasets dir): classify:labels=auto reads the label set from it; fixed "
                        "labels are checked against it")
    parser.add_argument("--template", default=None,
                        help=r"classify: prompt with {text} (default %r); sft/dpo: prompt with {instruction} "
                             r"[and {input}] instead of the tokenizer's chat template; \n is a newline. "
                             r"`edgefed zero-shot` compares candidates" % DEFAULT_TEMPLATE)
    add_prompt_init_arg(parser)
    parser.add_argument("--out", required=True, help="artifact directory to write")
    parser.add_argument("--quantize", nargs="?", const="int8", default=None, choices=quant.METHODS,
                        help="quantise the frozen weights (lora/prompt only): int8 weight-only (default), "
                             "or dynamic-int8 (2x faster forward, but its loss is too jumpy for ZO)")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--seed", type=int, default=0, help="LoRA initialisation seed")
    parser.add_argument("--no-progress", action="store_true")
    from edgefed.data_args import add_field_args
    add_field_args(parser)
    return parser


def run_export(args: argparse.Namespace) -> int:
    from edgefed.data_args import fields_from_args

    from .onnx_export import export_artifact

    # Shells make typing a newline awkward: accept a literal backslash-n too.
    template = args.template.replace("\\n", "\n") if args.template is not None else None
    try:
        out = export_artifact(args.model, args.out, trainable=args.trainable, task=args.task,
                              template=template, quantize_frozen=args.quantize or False, opset=args.opset,
                              progress=not args.no_progress, seed=args.seed, data=args.data,
                              prompt_init=args.prompt_init,
                              fields=fields_from_args(args))
    except (ValueError, OSError) as e:  # bad template, data or labels: say what, no traceback
        print(f"edgefed export: {e}", file=sys.stderr)
        return 2
    m = json.loads((out / "manifest.json").read_text())
    chk = m["export_check"]
    labels = f" {m['task']['labels']}" if m["task"].get("labels") else ""
    print(f"{out}: {m['trainable_mode']} / {m['task']['kind']}{labels}, {m['n_trainable']:,} trainable "
          f"in {len(m['trainable'])} tensors, {m['n_frozen']:,} frozen, quantized={m['quantized_frozen']}; "
          f"torch loss {chk['torch_loss']:.6f} vs onnx {chk['onnx_loss']:.6f} (|diff| {chk['abs_diff']:.2e})")
    return 0


def add_models_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--prepare", metavar="NAME", action="append", default=[],
                        help="convert/generate a registry model into the cache (repeatable)")
    parser.add_argument("--json", action="store_true", help="machine-readable listing")
    return parser


def run_models(args: argparse.Namespace) -> int:
    from edgefed.models import list_models, prepare_model

    for name in args.prepare:
        print(f"prepared {name}: {prepare_model(name)}", file=sys.stderr)
    models = list_models()
    if args.json:
        print(json.dumps(models, indent=1))
        return 0
    for m in models:
        n = f"{m['n_params'] / 1e6:.1f}M" if m["n_params"] else "?"
        state = "prepared" if m["prepared"] else "not prepared"
        print(f"{m['name']:<14} {n:>8}  {state:<13} {m['path']}\n{'':<14} {m['source']}")
    return 0


def main(argv=None) -> int:
    """Standalone entry point until edgefed/cli.py wires the subcommands."""
    p = argparse.ArgumentParser(prog="edgefed")
    sub = p.add_subparsers(dest="cmd", required=True)
    add_export_args(sub.add_parser("export", help="export a model to an ONNX training artifact"))
    add_models_args(sub.add_parser("models", help="list / prepare packaged models"))
    args = p.parse_args(argv)
    return run_export(args) if args.cmd == "export" else run_models(args)


if __name__ == "__main__":
    sys.exit(main())
