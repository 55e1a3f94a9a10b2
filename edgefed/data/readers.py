"""read_records: the user's data file -> records of one task kind; write_jsonl: the inverse.

Bad rows are collected, not fatal one at a time: the error names the first with its
"file:line" and counts the rest, so the user fixes the file in one pass. Nothing is
silently dropped (only blank lines are skipped).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from .errors import DataError
from .fields import Fields
from .records import TASK_KINDS, Example, PreferencePair, Record, SFTExample
from .rows import RowError, RowMapper
from .sources import open_source

__all__ = ["read_records", "read_jsonl", "write_jsonl"]

_SHOW = 5  # bad rows listed in full in one error


def read_records(path: str | os.PathLike, kind: str, fields: Fields | None = None, *,
                 limit: int | None = None) -> list[Record]:
    """Read JSONL/JSON, CSV, TSV, Parquet or a Hugging Face `save_to_disk` directory as records
    of task kind `kind` ("classify", "lm" -> Example; "sft" -> SFTExample; "dpo" ->
    PreferencePair). `fields` maps roles to column names; `limit` stops after that many records.
    Raises DataError naming file, line (or row) and field of the first bad row."""
    if kind not in TASK_KINDS:
        raise ValueError(f"unknown task kind {kind!r}: expected one of {sorted(TASK_KINDS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    fields = fields or Fields()
    src = open_source(path, fields.split)
    out: list[Record] = []
    bad: list[str] = []
    mapper = None
    for loc, row, err in src.rows:
        if limit is not None and len(out) >= limit:
            break
        if err is None:
            if mapper is None:
                mapper = RowMapper(kind, fields, src.columns or list(row), row, src.class_labels, loc)
            try:
                out.append(mapper.convert(row, loc))
                continue
            except RowError as e:
                err = str(e)
        bad.append(f"{loc}: {err}")
    if bad:
        more = len(bad) - 1
        msg = bad[0] + (f" (and {more} more bad row{'s' if more > 1 else ''})" if more else "")
        msg += "".join(f"\n  {b}" for b in bad[1:_SHOW])
        raise DataError(msg)
    if not out:
        raise DataError(f"{src.name}: empty file (no data rows)")
    return out


def read_jsonl(path: str | os.PathLike) -> list[Example]:
    """Classification examples from a data file (any format read_records reads)."""
    return read_records(path, "classify")


def _row(r: Record) -> dict:
    if isinstance(r, Example):
        row = {"text": r.text}
        if r.label:
            row["label"] = r.label  # kind "lm" has no label
    elif isinstance(r, SFTExample):
        if r.history:
            msgs = [{"role": "system", "content": r.system}] if r.system else []
            msgs += [{"role": role, "content": c} for role, c in r.history]
            msgs += [{"role": "user", "content": r.instruction},
                     {"role": "assistant", "content": r.response}]
            row = {"messages": msgs}
        else:
            row = {"instruction": r.instruction, "response": r.response}
            if r.system:
                row["system"] = r.system
        if r.input:
            row["input"] = r.input
    elif isinstance(r, PreferencePair):
        row = {"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}
    else:
        raise TypeError(f"cannot write {type(r).__name__}: expected Example, SFTExample or PreferencePair")
    if r.group:
        row["group"] = r.group
    return row


def write_jsonl(path: str | os.PathLike, records: Iterable[Record]) -> Path:
    """One JSON object per line, in the shape read_records reads back for the record's kind:
    {"text", "label"}, {"instruction", "input", "response", "system"} or {"messages"} (when
    there is history), {"prompt", "chosen", "rejected"}; plus "group" when set."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(_row(r), ensure_ascii=False) + "\n")
    return p
