"""On-device model: an EdgeFed artifact run by ONNX Runtime, no torch.

All trainable parameters live in ONE flat float32 buffer (`DeviceModel.params`). Each
trainable graph input is bound to a zero-copy view of it through OrtValue/IOBinding, so
an in-place kernel update (edgefed.kernels) is what the next forward sees: no copies,
no re-binding. (Plain `session.run(feed)` or `bind_cpu_input` give no such guarantee.)
"""
from __future__ import annotations

import copy
import json
import os
import resource
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .device_config import DeviceConfig
from .export.artifact import read_manifest, read_trainable, trainable_views, verify_checksums
from .tasks import Batch, make_task
from .tasks.base import TaskBatches

__all__ = ["Batch", "DeviceModel", "MemoryBudgetError", "estimate_memory", "peak_rss_bytes",
           "save_checkpoint", "load_checkpoint", "read_checkpoint"]

MB = 1 << 20
# Process overhead before any model: Python, numpy, ONNX Runtime, tokenizer (measured ~150 MB).
_BASE_BYTES = 180 * MB


class MemoryBudgetError(RuntimeError):
    """The model and batch would not fit the device's memory budget."""


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    VmHWM from /proc where there is one: getrusage's ru_maxrss survives execve, so a child
    started by a big parent would report the parent's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def estimate_memory(art_dir: str | os.PathLike, batch_size: int, seq_len: int,
                    manifest: dict | None = None) -> dict:
    """A conservative estimate of peak bytes for training this artifact at this batch shape."""
    art_dir = Path(art_dir)
    m = manifest or read_manifest(art_dir)
    onnx_bytes = sum(p.stat().st_size for p in art_dir.iterdir()
                     if p.suffix in (".onnx", ".data") or p.name.endswith(".onnx.data"))
    trainable_bytes = 4 * int(m["n_trainable"])
    cfg = m.get("model_config") or {}
    hidden = int(cfg.get("hidden_size", 576))
    layers = int(cfg.get("num_hidden_layers", 30))
    inter = int(cfg.get("intermediate_size", 4 * hidden))
    heads = int(cfg.get("num_attention_heads", 9))
    tokens = batch_size * seq_len
    # Live activations of one forward (ORT frees per layer, keep two layers' worth) plus the
    # attention scores and the output projection over the vocabulary for the last position.
    act = 4 * tokens * (8 * hidden + 2 * inter) * 2 + 4 * batch_size * heads * seq_len * seq_len * 2
    vocab = int(cfg.get("vocab_size", 49152))
    if m["task"]["kind"] == "classify":  # one vocabulary row per label token after the first
        act += 4 * batch_size * vocab * (1 + sum(len(t) - 1 for t in m["task"].get("label_token_ids", [])))
    else:  # dpo runs both answers of each pair: twice the rows
        act += 4 * tokens * vocab * (2 if m["task"]["kind"] == "dpo" else 1)
    # ORT holds the graph's initializers plus pre-packed copies of some and its arena: measured
    # peak RSS of SmolLM2 LoRA inference (539 MB graph) was 953 MB, so count the graph 1.4x.
    total = _BASE_BYTES + int(onnx_bytes * 1.4) + trainable_bytes * 2 + act * 2
    return {"total": total, "base": _BASE_BYTES, "weights": onnx_bytes,
            "trainable": trainable_bytes, "activations": act * 2, "layers": layers}


class DeviceModel(TaskBatches):
    """Loads an artifact into ONNX Runtime with its trainables bound zero-copy."""

    def __init__(self, artifact: str | os.PathLike, config: DeviceConfig | None = None, *,
                 threads: int | None = None, batch_size: int | None = None,
                 seq_len: int | None = None, check_memory: bool = True, verify: bool = False,
                 spin_after_run: bool = False):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.dir = Path(artifact)
        if not (self.dir / "manifest.json").is_file():
            raise FileNotFoundError(f"{self.dir} is not an EdgeFed artifact (no manifest.json); "
                                    "create one with `edgefed export`")
        self.manifest = read_manifest(self.dir)
        if verify:
            verify_checksums(self.dir, self.manifest)
        self.config = config or DeviceConfig(name="default")
        self.batch_size = int(batch_size or self.config.batch_size)
        self.seq_len = int(seq_len or self.config.seq_len)
        self.threads = int(threads or self.config.threads)
        self.memory_estimate = estimate_memory(self.dir, self.batch_size, self.seq_len, self.manifest)
        if check_memory:
            self._check_memory()

        self.pad_id = int(self.manifest.get("pad_token_id", 0))
        self.max_seq_len = int(self.manifest.get("max_seq_len", self.seq_len))
        self.tokenizer = Tokenizer.from_file(str(self.dir / self.manifest["files"]["tokenizer"]))
        eos = self.manifest.get("eos_token_id")
        self.task = make_task(self.manifest["task"], self.tokenizer, self.pad_id,
                              min(self.seq_len, self.max_seq_len), None if eos is None else int(eos))
        self.kind = self.task.kind
        self.labels: list[str] = list(self.manifest["task"].get("labels") or [])

        self.params = read_trainable(self.dir, self.manifest)
        self.views = trainable_views(self.params, self.manifest)
        self.buffers = [v.reshape(-1) for v in self.views.values()]  # kernel order == manifest order

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ORT's workers spin while idle, also after a run returns; a ZO step runs our kernels
        # right after every forward on the same cores, and the spinning made that pass ~1.5x
        # slower. Spinning during the run is kept (no spin at all made the forward ~5% slower).
        if not spin_after_run:
            so.add_session_config_entry("session.force_spinning_stop", "1")
        self.providers = self.config.providers(ort.get_available_providers())
        self.session = ort.InferenceSession(str(self.dir / self.manifest["files"]["onnx"]), so,
                                            providers=self.providers)
        self._ort = ort
        self._bind_params()
        self._out_names = list(self.manifest["outputs"])
        self._reference: DeviceModel | None = None
        if self.kind == "dpo":
            self.task.reference = self._reference_logps
        self.forward_count = 0

    def _bind_params(self) -> None:
        self._binding = self.session.io_binding()
        self._param_values = []  # keep the OrtValues alive: they alias self.params
        for name, view in self.views.items():
            val = self._ort.OrtValue.ortvalue_from_numpy(view)
            self._param_values.append(val)
            self._binding.bind_ortvalue_input(name, val)

    def fork(self) -> "DeviceModel":
        """Another virtual device on the same loaded graph (simulation): its own parameter
        buffer and binding, the session and its weights shared."""
        other = object.__new__(DeviceModel)
        other.__dict__.update(self.__dict__)
        other.params = read_trainable(self.dir, self.manifest)
        other.views = trainable_views(other.params, self.manifest)
        other.buffers = [v.reshape(-1) for v in other.views.values()]
        other.forward_count = 0
        other._reference = None
        if self.kind == "dpo":  # its own reference binding and cache: forks run in parallel threads
            other.task = copy.copy(self.task)
            other.task._ref_cache = {}
            other.task.reference = other._reference_logps
        other._bind_params()
        return other

    # -- memory -----------------------------------------------------------------------
    def _check_memory(self) -> None:
        est = self.memory_estimate
        budget = self.config.memory_budget_mb * MB
        if est["total"] > budget:
            raise MemoryBudgetError(
                f"{self.dir.name} at batch {self.batch_size} x {self.seq_len} needs about "
                f"{est['total'] / MB:.0f} MB (weights {est['weights'] / MB:.0f} MB, trainable "
                f"{est['trainable'] / MB:.0f} MB x2, activations {est['activations'] / MB:.0f} MB, "
                f"runtime {est['base'] / MB:.0f} MB) but device {self.config.name!r} allows "
                f"{self.config.memory_budget_mb} MB. Lower batch_size/seq_len, export LoRA or prompt "
                "trainables instead of full, or quantise the frozen part (`edgefed export --quantize`).")

    # -- compute ----------------------------------------------------------------------
    def run(self, batch: Batch) -> dict[str, np.ndarray]:
        """Every graph output at the current parameters, by name."""
        b = self._binding
        for name, arr in batch.feeds().items():
            b.bind_cpu_input(name, arr)
        for n in self._out_names:
            b.bind_output(n, "cpu")
        self.session.run_with_iobinding(b)
        outs = b.copy_outputs_to_cpu()
        self.forward_count += 1
        return dict(zip(self._out_names, outs))

    def loss(self, batch: Batch) -> float:
        return float(self.run(batch)["loss"])

    def _reference_logps(self, batch: Batch) -> np.ndarray:
        """DPO's reference: the same graph on a second binding holding the artifact's initial
        trainables (never updated)."""
        if self._reference is None:
            self._reference = self.fork()
        return self._reference.run(batch)["seq_logps"]

    def evaluate(self, records: Sequence, batch_size: int | None = None, **kw) -> dict:
        """The task's metrics (classify: loss, accuracy, macro-F1; sft: loss, perplexity and,
        with generate_n, ROUGE-L / exact match; dpo: loss, preference accuracy, reward margin)."""
        return self.task.evaluate(self, list(records), batch_size or 32, **kw)

    def reset_params(self) -> None:
        """Back to the artifact's initial trainables, in place (bindings stay valid)."""
        self.params[:] = read_trainable(self.dir, self.manifest)

    @property
    def n_trainable(self) -> int:
        return int(self.params.size)


def save_checkpoint(model: DeviceModel, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """The trainable buffer as raw float32 + a JSON sidecar (no pickle)."""
    import hashlib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    data = model.params.astype("<f4").tobytes()
    tmp.write_bytes(data)
    os.replace(tmp, path)
    side = {"artifact_sha256": model.manifest.get("sha256", {}), "n_trainable": model.n_trainable,
            "sha256": hashlib.sha256(data).hexdigest(), "saved_at": time.time(), **(meta or {})}
    Path(str(path) + ".json").write_text(json.dumps(side, indent=1))
    return path


def read_checkpoint(path: str | os.PathLike, n_trainable: int) -> tuple[np.ndarray, dict]:
    """(trainables as float32, sidecar) of a save_checkpoint file, checked: its sha256, and its
    size against the artifact's n_trainable."""
    import hashlib

    path = Path(path)
    side = json.loads(Path(str(path) + ".json").read_text())
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != side.get("sha256"):
        raise ValueError(f"checkpoint {path} is corrupt (sha256 mismatch); delete it and retrain")
    flat = np.frombuffer(data, dtype="<f4").astype(np.float32)
    if flat.size != int(n_trainable):
        raise ValueError(f"checkpoint {path} has {flat.size} parameters, the artifact {n_trainable}: "
                         "it belongs to another artifact")
    return flat, side


def load_checkpoint(model: DeviceModel, path: str | os.PathLike) -> dict:
    flat, side = read_checkpoint(path, model.n_trainable)
    model.params[:] = flat
    return side
