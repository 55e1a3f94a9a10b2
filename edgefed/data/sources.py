"""Raw rows (dicts) out of the file formats users bring, each with its "path:line" location.

A row that cannot even be parsed (invalid JSON, a CSV row with the wrong number of cells)
comes out as (loc, None, message) so the reader can collect it with the other bad rows.
Parquet and Hugging Face `datasets` directories need pyarrow, imported only for them.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from .errors import DataError

__all__ = ["Source", "open_source", "SUPPORTED"]

SUPPORTED = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet",
             "a Hugging Face datasets directory (Dataset.save_to_disk)")
Row = tuple[str, Optional[dict], Optional[str]]  # (location, row, parse error)
_BOM = b"\xef\xbb\xbf"


@dataclass
class Source:
    name: str                                  # the path as shown in messages
    rows: Iterator[Row]
    columns: list[str] | None = None           # known up front for tables; None for JSON
    class_labels: dict[str, list[str]] = field(default_factory=dict)  # ClassLabel names per column


def open_source(path, split: str | None = None) -> Source:
    p = Path(path)
    name = str(path)
    if p.is_dir():
        return _datasets_dir(p, name, split)
    if not p.exists():
        raise DataError(f"{name}: no such file or directory")
    ext = p.suffix.lower()
    if ext in (".jsonl", ".ndjson", ".json"):
        return Source(name, _json_rows(p, name))
    if ext in (".csv", ".tsv"):
        return _csv_source(p, name, "\t" if ext == ".tsv" else ",")
    if ext == ".parquet":
        return _parquet_source(p, name)
    raise DataError(f"{name}: unknown data format {ext or '(no extension)'!r}; supported: "
                    + ", ".join(SUPPORTED))


def _bad_bytes(data: bytes, off: int) -> tuple[int, str]:
    """(1-based line, message) for the undecodable byte at `off` in the file's bytes."""
    return (data.count(b"\n", 0, off) + 1,
            f"cannot decode byte 0x{data[off]:02x} at byte offset {off} as UTF-8 (save the file as UTF-8)")


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line, msg = _bad_bytes(data, err.start + (3 if data.startswith(_BOM) else 0))
        raise DataError(f"{name}:{line}: {msg}") from None


def _read_json(path: Path, name: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise DataError(f"{name}: cannot read {path.name} ({err})") from None


# ------------------------------------------------------------------ JSON Lines / JSON array

def _json_rows(p: Path, name: str) -> Iterator[Row]:
    data = p.read_bytes()
    start = len(_BOM) if data.startswith(_BOM) else 0  # Excel and Notepad write a BOM
    head = data[start:].lstrip()[:1]
    if head == b"[":
        yield from _json_array(_decode(data, name), name)
        return
    if head == b"{" and p.suffix.lower() == ".json":
        _refuse_single_object(data, name)
    for lineno, raw in enumerate(data[start:].split(b"\n"), 1):
        loc = f"{name}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield loc, None, _bad_bytes(data, start + err.start)[1]
            continue
        finally:
            start += len(raw) + 1
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            yield loc, None, f"invalid JSON ({err.msg} at column {err.colno})"
            continue
        yield (loc, row, None) if isinstance(row, dict) else (
            loc, None, f"expected a JSON object, got {_tname(row)}")


def _refuse_single_object(data: bytes, name: str) -> None:
    """A pretty-printed single object would otherwise give one "invalid JSON" per line."""
    try:
        obj = json.loads(data.decode("utf-8-sig"))
    except ValueError:
        return  # JSON Lines (or broken): the line-by-line reader reports it
    if isinstance(obj, dict) and data.strip().count(b"\n"):
        lists = [k for k, v in obj.items() if isinstance(v, list)]
        hint = f" (its key {lists[0]!r} holds a list: save that list instead)" if lists else ""
        raise DataError(f"{name}: one JSON object; expected JSON Lines (one object per line) or "
                        f"a JSON array of objects{hint}")


def _json_array(text: str, name: str) -> Iterator[Row]:
    """A file holding one array of objects (Alpaca's alpaca_data.json): locations are the
    line each element starts on."""
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    line, counted = 1, 0

    def skip(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    i = skip(i)
    if i < len(text) and text[i] == "]":
        return
    while True:
        line += text.count("\n", counted, i)
        counted = i
        try:
            row, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as err:
            raise DataError(f"{name}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
        loc = f"{name}:{line}"
        yield (loc, row, None) if isinstance(row, dict) else (
            loc, None, f"expected a JSON object, got {_tname(row)}")
        i = skip(i)
        if i < len(text) and text[i] == ",":
            i = skip(i + 1)
            continue
        if i < len(text) and text[i] == "]":
            return
        ln = text.count("\n", 0, i) + 1
        raise DataError(f"{name}:{ln}: invalid JSON (expected ',' or ']' after an array element)")


def _tname(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null", int: "a number", float: "a number"}.get(type(v), type(v).__name__)


# ------------------------------------------------------------------ CSV / TSV

def _csv_source(p: Path, name: str, delim: str) -> Source:
    text = _decode(p.read_bytes(), name)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{name}: empty file (expected a header row, then data rows)") from None
    except csv.Error as err:
        raise DataError(f"{name}:1: cannot parse header ({err})") from None
    header = [h.strip() for h in header]
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise DataError(f"{name}:1: duplicate column name(s) {dup} in the header")
    return Source(name, _csv_rows(reader, header, name), columns=header)


def _csv_rows(reader, header: list[str], name: str) -> Iterator[Row]:
    prev = reader.line_num
    while True:
        start = prev + 1  # a quoted cell may span lines: report where the row starts
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            yield f"{name}:{start}", None, f"cannot parse row ({err})"
            prev = reader.line_num
            continue
        prev = reader.line_num
        if not cells or (len(cells) == 1 and not cells[0].strip() and len(header) > 1):
            continue  # blank line
        loc = f"{name}:{start}"
        if len(cells) != len(header):
            yield loc, None, f"row has {len(cells)} cells but the header has {len(header)} columns"
            continue
        yield loc, dict(zip(header, cells)), None


# ------------------------------------------------------------------ Parquet / Arrow (pyarrow)

def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError("reading Parquet or Hugging Face datasets directories needs pyarrow: "
                        "pip install pyarrow") from None
    return pyarrow


def _class_labels(features: Any) -> dict[str, list[str]]:
    """ClassLabel columns of a datasets `features` dict -> their names."""
    out = {}
    if isinstance(features, dict):
        for col, feat in features.items():
            if isinstance(feat, dict) and feat.get("_type") == "ClassLabel" and feat.get("names"):
                out[col] = [str(n) for n in feat["names"]]
    return out


def _table_rows(batches, name: str) -> Iterator[Row]:
    i = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield f"{name}:row {i}", {k: _nan_to_none(v) for k, v in row.items()}, None
            i += 1


def _nan_to_none(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v  # pandas writes NaN for missing


def _parquet_source(p: Path, name: str) -> Source:
    pa = _pyarrow()
    try:
        pf = pa.parquet.ParquetFile(p)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{name}: not a readable Parquet file ({err})") from None
    schema = pf.schema_arrow
    meta = (schema.metadata or {}).get(b"huggingface")  # files pushed by `datasets` carry features
    labels = {}
    if meta:
        try:
            labels = _class_labels(json.loads(meta).get("info", {}).get("features"))
        except (ValueError, AttributeError):
            pass
    return Source(name, _table_rows(pf.iter_batches(batch_size=4096), name),
                  columns=list(schema.names), class_labels=labels)


def _datasets_dir(d: Path, name: str, split: str | None) -> Source:
    dd = d / "dataset_dict.json"
    if dd.is_file():
        splits = (_read_json(dd, name) or {}).get("splits") or sorted(
            c.name for c in d.iterdir() if c.is_dir())
        want = split or "train"
        if want not in splits:
            how = "choose one with Fields(split=...)" if split is None else "choose one of them"
            raise DataError(f"{name}: a DatasetDict without split {want!r}; its splits are "
                            f"{list(splits)}: {how}")
        return _datasets_dir(d / want, f"{name}/{want}", None)
    info, state = d / "dataset_info.json", d / "state.json"
    if not info.is_file() and not state.is_file():
        raise DataError(f"{name}: a directory, but not a Hugging Face datasets directory (no "
                        f"dataset_info.json, state.json or dataset_dict.json); supported: "
                        + ", ".join(SUPPORTED))
    pa = _pyarrow()
    files = []
    if state.is_file():
        files = [d / f["filename"] for f in _read_json(state, name).get("_data_files", [])]
    files = files or sorted(d.glob("data-*.arrow")) or sorted(d.glob("*.arrow"))
    if not files:
        raise DataError(f"{name}: no .arrow data files in this datasets directory")
    labels = {}
    if info.is_file():
        labels = _class_labels(_read_json(info, name).get("features"))
    readers = [_open_arrow(pa, f, name) for f in files]
    return Source(name, _table_rows((b for r in readers for b in r), name),
                  columns=list(readers[0].schema.names), class_labels=labels)


def _open_arrow(pa, f: Path, name: str):
    # save_to_disk writes the Arrow IPC *stream* format; accept the file format too.
    try:
        return pa.ipc.open_stream(pa.memory_map(str(f)))
    except pa.ArrowInvalid:
        try:
            r = pa.ipc.open_file(pa.memory_map(str(f)))
        except pa.ArrowInvalid as err:
            raise DataError(f"{name}: {f.name} is not an Arrow IPC file ({err})") from None
        return _FileBatches(r)
    except OSError as err:
        raise DataError(f"{name}: cannot open {f.name} ({err})") from None


class _FileBatches:
    def __init__(self, reader):
        self.schema = reader.schema
        self._r = reader

    def __iter__(self):
        return (self._r.get_batch(i) for i in range(self._r.num_record_batches))
