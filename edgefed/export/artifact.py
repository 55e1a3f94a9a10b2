"""Artifact folder I/O (numpy + stdlib only, so devices and tests can use it without torch).

DIR/model.onnx, DIR/tokenizer.json, DIR/trainable.bin (float32 LE, flat, manifest order),
DIR/manifest.json (see read_manifest for the checked keys).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

FORMAT = "edgefed-artifact"
FORMAT_VERSION = 2  # 2: task-generic (inputs/outputs lists, task entry per kind)
FILES = {"onnx": "model.onnx", "tokenizer": "tokenizer.json", "trainable": "trainable.bin"}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def trainable_layout(named_shapes: list[tuple[str, tuple[int, ...]]]) -> list[dict]:
    """Manifest 'trainable' entries: name, shape, element offset, numel."""
    out, offset = [], 0
    for name, shape in named_shapes:
        n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
        out.append({"name": name, "shape": [int(s) for s in shape], "offset": offset, "numel": n})
        offset += n
    return out


def write_trainable(path: str | os.PathLike, arrays: list[np.ndarray]) -> None:
    with open(path, "wb") as fh:
        for a in arrays:
            fh.write(np.ascontiguousarray(a, dtype="<f4").tobytes())


def read_manifest(art_dir: str | os.PathLike) -> dict:
    m = json.loads((Path(art_dir) / "manifest.json").read_text())
    if m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{art_dir}: not an {FORMAT} v{FORMAT_VERSION} artifact (it says "
                         f"{m.get('format')!r} v{m.get('format_version')}): re-export it with this "
                         "EdgeFed's `edgefed export`")
    return m


def read_trainable(art_dir: str | os.PathLike, manifest: dict | None = None) -> np.ndarray:
    """The flat float32 buffer (writable, native order) with its size checked."""
    manifest = manifest or read_manifest(art_dir)
    flat = np.fromfile(Path(art_dir) / manifest["files"]["trainable"], dtype="<f4").astype(np.float32)
    if flat.size != manifest["n_trainable"]:
        raise ValueError(f"{art_dir}: trainable.bin holds {flat.size} floats, "
                         f"manifest says {manifest['n_trainable']}")
    return flat


def trainable_views(flat: np.ndarray, manifest: dict) -> dict[str, np.ndarray]:
    """Zero-copy, shaped views into the flat buffer, in manifest order."""
    return {t["name"]: flat[t["offset"]:t["offset"] + t["numel"]].reshape(t["shape"])
            for t in manifest["trainable"]}


def verify_checksums(art_dir: str | os.PathLike, manifest: dict | None = None) -> None:
    manifest = manifest or read_manifest(art_dir)
    for fname, digest in manifest["sha256"].items():
        got = sha256_file(Path(art_dir) / fname)
        if got != digest:
            raise ValueError(f"{art_dir}/{fname}: sha256 mismatch ({got} != {digest})")
