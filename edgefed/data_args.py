"""Command-line options for the user's data, shared by export, device, simulate, demo, server
and zero-shot (argparse only: safe to import on a device)."""
from __future__ import annotations

import argparse

__all__ = ["add_field_args", "fields_from_args"]

_FIELDS = ["text", "label", "group", "instruction", "input", "response", "messages", "system",
           "prompt", "chosen", "rejected"]


def add_field_args(p: argparse.ArgumentParser) -> None:
    """--text-field, --label-field, ... (each: the column holding that part of a row) and
    --data-split (which split of a saved `datasets` DatasetDict)."""
    g = p.add_argument_group("data fields (defaults: the usual names, e.g. text/sentence, label/category, "
                             "instruction/prompt, input/context, response/output, messages, chosen, rejected)")
    for f in _FIELDS:
        g.add_argument(f"--{f}-field", default=None, metavar="NAME", help=f"column holding the row's {f}")
    g.add_argument("--data-split", default=None, metavar="NAME",
                   help="split of a saved datasets DatasetDict directory (default: train)")


def fields_from_args(args: argparse.Namespace):
    from .data import Fields
    kw = {f: getattr(args, f"{f}_field", None) for f in _FIELDS}
    return Fields(**kw, split=getattr(args, "data_split", None))
