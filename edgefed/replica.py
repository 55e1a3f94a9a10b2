"""The global trainables without a model: what the server keeps so it can publish a digest of
the exact parameters every device must hold after each round, and how both sides compute it.

Device side (no torch, no ONNX Runtime needed): the artifact's initial trainables, the method's
apply_delta, and sha256 over the float32 bytes.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import numpy as np

from .export.artifact import read_manifest, read_trainable, trainable_views
from .protocol import RoundDelta

__all__ = ["params_digest", "artifact_id", "TrainablesReplica", "DIGEST_PREFIX", "TRAINABLES_TENSOR"]

DIGEST_PREFIX = "params-sha256:"
TRAINABLES_TENSOR = "trainables"  # a full-state sync that carries the global trainables themselves


def params_digest(params: np.ndarray) -> str:
    """'params-sha256:<32 hex>' of the trainables' little-endian float32 bytes."""
    a = np.ascontiguousarray(params, dtype="<f4")
    return DIGEST_PREFIX + hashlib.sha256(memoryview(a).cast("B")).hexdigest()[:32]


def artifact_id(path: str) -> str:
    """The id devices must match: '<dir name>@<sha256 of the ONNX file, 16 hex>' when the
    artifact's manifest is readable, else the path as given."""
    if not path:
        return ""
    try:
        p = Path(path)
        m = json.loads((p / "manifest.json").read_text())
        onnx = m.get("files", {}).get("onnx", "model.onnx")
        digest = m.get("sha256", {}).get(onnx, "")
        return f"{p.name}@{digest[:16]}" if digest else p.name
    except (OSError, ValueError):
        return path[-256:]


class TrainablesReplica:
    """The artifact's trainables, moved round by round with the method's own apply_delta: the
    same kernels in the same order as on every device, so the same bits."""

    def __init__(self, artifact: str | Path, method_client, plan_params: dict):
        self.dir = Path(artifact)
        self.manifest = read_manifest(self.dir)
        self.params = read_trainable(self.dir, self.manifest)
        self.views = trainable_views(self.params, self.manifest)
        self.buffers = [v.reshape(-1) for v in self.views.values()]  # kernel order == manifest order
        self.client = method_client
        self.plan_params = dict(plan_params)
        self.rounds = 0
        self._digest: str | None = None  # of the current params: the plan and JobState both carry it

    def reset_params(self) -> None:
        self.params[:] = read_trainable(self.dir, self.manifest)
        self.rounds = 0
        self._digest = None

    def apply(self, delta: RoundDelta) -> None:
        if delta.round != self.rounds:
            raise ValueError(f"delta of round {delta.round}, replica at round {self.rounds}")
        self._digest = None
        self.client.apply_delta(self, delta, self.plan_params)
        self.rounds += 1

    def rebuild(self, deltas: Iterable[RoundDelta]) -> None:
        """From the artifact again, through every stored delta in order (resume, reload)."""
        self.reset_params()
        for d in sorted(deltas, key=lambda d: d.round):
            self.apply(d)

    def digest(self) -> str:
        """params_digest of the trainables, hashed once per round (a second over full SmolLM2)."""
        if self._digest is None:
            self._digest = params_digest(self.params)
        return self._digest
