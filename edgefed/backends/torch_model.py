"""Host-side model: the same artifact's loss graph run by torch, with backprop.

A GPU (or CPU) host joins the same jobs as ONNX devices: it reads the artifact (manifest,
tokenizer, initial trainables, task entry), rebuilds the exported module from the base model's
checkpoint (the same LoRA / soft-prompt / task cores edgefed.export traced), and exposes the
interface methods see on a DeviceModel: `params` (one flat float32 buffer in manifest order,
the global state every replica holds bit for bit), `buffers`, `encode`, `batches`, `run`,
`loss`, `evaluate`, `reset_params`, `fork`. On top: `loss_and_grad` (one backward pass) and
`trainable_tensor` / `loss_tensor` for local optimisers.

On CPU the torch trainables are zero-copy views of `params` (torch.from_numpy), so a kernel's
in-place update is what the next forward sees, as with ONNX Runtime's IOBinding. On CUDA the
flat buffer is copied to the GPU for each forward (trainables only: LoRA is a few MB) and
matmuls run under bf16 autocast; local optimisers work on a GPU copy and hand back a delta.

Host only (torch, transformers): devices never import this module.
"""
from __future__ import annotations

import contextlib
import copy
import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..export.adapters import lora_patched, make_core, make_emulator, swapped_params
from ..export.artifact import read_manifest, read_trainable, trainable_views
from ..export.specs import parse_trainable
from ..tasks import Batch, make_task
from ..tasks.base import TaskBatches

__all__ = ["TorchModel", "BaseModelMismatch", "resolve_device"]


class BaseModelMismatch(ValueError):
    """The base checkpoint does not compute what the artifact was exported from."""


def resolve_device(device: str | None = None) -> torch.device:
    """'auto' / None: CUDA when present, else CPU."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--torch-device {device}: torch {torch.__version__} sees no CUDA device on this "
                         "host; use cpu (or install a CUDA build of torch)")
    return dev


class TorchModel(TaskBatches):
    """An EdgeFed artifact's loss graph in torch (see the module docstring)."""

    backend = "torch"

    def __init__(self, artifact: str | os.PathLike, base_model: str | os.PathLike | None = None, *,
                 device: str | None = None, batch_size: int = 8, seq_len: int = 128,
                 threads: int | None = None, autocast: bool | None = None, check_base: bool = True):
        from tokenizers import Tokenizer

        from ..models import load_model

        self.dir = Path(artifact)
        if not (self.dir / "manifest.json").is_file():
            raise FileNotFoundError(f"{self.dir} is not an EdgeFed artifact (no manifest.json); "
                                    "create one with `edgefed export`")
        self.manifest = m = read_manifest(self.dir)
        if m.get("quantized_frozen"):
            raise ValueError(f"{self.dir} has int8 frozen weights for devices; a torch host needs the "
                             "float artifact of the same model (export without --quantize)")
        self.device = resolve_device(device)
        if threads:
            torch.set_num_threads(int(threads))
        self.autocast = (self.device.type == "cuda") if autocast is None else bool(autocast)
        self.batch_size, self.seq_len = int(batch_size), int(seq_len)
        base = base_model or m.get("base_model") or m.get("model")
        try:
            lm, _ = load_model(base)
        except (ValueError, OSError) as e:
            raise BaseModelMismatch(
                f"cannot load the base model {str(base)!r} of artifact {self.dir.name}: {e}. Pass "
                "--base-model NAME_OR_DIR (the checkpoint the artifact was exported from)") from None
        lm.requires_grad_(False)
        self._stack = contextlib.ExitStack()  # the LoRA patch lives as long as the model
        # Forks share the module, and a forward swaps its trainables in as attributes: one
        # forward at a time. Backward passes hold it too (step_lock): torch's CPU kernels split
        # work by the threads free at the moment, so concurrent virtual hosts would not get the
        # bits a host alone gets (measured: FLoRA replicas differed in the last bits).
        self._forward_lock = threading.RLock()
        self.step_lock = self._forward_lock
        ts = parse_trainable(m["trainable_spec"])
        wrappers = (self._stack.enter_context(lora_patched(lm, ts.targets, ts.r, ts.alpha, 0))
                    if ts.mode == "lora" else {})
        self.lora_wrappers = wrappers  # module path in the LM -> LoRALinear (FLoRA merges into .base)
        # the frozen Parameter objects themselves: during another fork's forward the module
        # attribute is that fork's swapped-in tensor, so never read weights through the module
        self._frozen = {name: w.base.weight for name, w in wrappers.items()}
        self.lora_scale = ts.alpha / ts.r if ts.mode == "lora" else 0.0
        hidden = lm.get_input_embeddings().weight.shape[1]
        soft = torch.zeros(ts.tokens, hidden) if ts.mode == "prompt" else None
        offsite = None
        if ts.mode == "offsite":  # train on the emulator, as the artifact's graph does
            lm, offsite = make_emulator(lm, ts.adapter, ts.drop)
        self.core = make_core(lm, m["task"], soft).eval()
        from ..export.onnx_export import _trainables
        pairs = _trainables(self.core, ts, wrappers, offsite)
        names = [t["name"] for t in m["trainable"]]
        if [n for n, _ in pairs] != names:
            raise BaseModelMismatch(f"the base model's trainables {[n for n, _ in pairs][:4]}... differ from "
                                    f"the artifact's {names[:4]}...: wrong --base-model")
        self.paths = [p for _, p in pairs]
        own = dict(self.core.named_parameters())
        for t, p in zip(m["trainable"], self.paths):
            if tuple(own[p].shape) != tuple(t["shape"]):
                raise BaseModelMismatch(f"trainable {t['name']}: base model shape {tuple(own[p].shape)}, "
                                        f"artifact {tuple(t['shape'])}: wrong --base-model")
        for p in own.values():
            p.requires_grad_(False)
        self.core.to(self.device)
        if self.device.type == "cuda":  # eager attention was for ONNX tracing; sdpa is faster on GPUs
            lm.set_attn_implementation("sdpa")

        self.pad_id = int(m.get("pad_token_id", 0))
        self.max_seq_len = int(m.get("max_seq_len", self.seq_len))
        self.tokenizer = Tokenizer.from_file(str(self.dir / m["files"]["tokenizer"]))
        eos = m.get("eos_token_id")
        self.task = make_task(m["task"], self.tokenizer, self.pad_id, min(self.seq_len, self.max_seq_len),
                              None if eos is None else int(eos))
        self.kind = self.task.kind
        self.labels: list[str] = list(m["task"].get("labels") or [])
        self._out_names = list(m["outputs"])
        self._in_names = list(m["inputs"])
        self.params = read_trainable(self.dir, m)
        self._init = self.params.copy()
        self._overrides: dict[str, torch.Tensor] = {}  # frozen weights this model changed (FLoRA)
        self._bind()
        self._reference: TorchModel | None = None
        if self.kind == "dpo":
            self.task.reference = self._reference_logps
        self.forward_count = 0
        self.backward_count = 0
        self._zo_on_device: bool | None = None
        if check_base:
            self._check_base()

    # -- parameters -------------------------------------------------------------------
    def _bind(self) -> None:
        self.views = trainable_views(self.params, self.manifest)
        self.buffers = [v.reshape(-1) for v in self.views.values()]  # kernel order == manifest order
        self._flat_cpu = torch.from_numpy(self.params)  # shares memory with self.params

    def _split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {p: flat[t["offset"]:t["offset"] + t["numel"]].view(t["shape"])
                for p, t in zip(self.paths, self.manifest["trainable"])}

    def trainable_tensor(self, requires_grad: bool = True) -> torch.Tensor:
        """A copy of the global trainables on the compute device, for a local optimiser."""
        return self._flat_cpu.to(self.device, copy=True).requires_grad_(requires_grad)

    @contextlib.contextmanager
    def zo_session(self):
        """Local ZO training with the trainables held on the compute device: yields (buffers, loss)
        where buffers are views of one device copy of the trainables (manifest order, what the
        kernels take) and loss(batch) is the loss there. On CUDA the seeded kernels perturb them in
        GPU memory (edgefed.cuda_kernels: the CPU kernels' bits), so a step costs no host copies and
        no CPU work; on leaving, the trainables come back to `params`, bit for bit what the CPU
        path would have left."""
        flat = self._flat_cpu.to(self.device, copy=True)
        bufs = [flat[t["offset"]:t["offset"] + t["numel"]] for t in self.manifest["trainable"]]

        def loss(batch: Batch) -> float:
            with torch.no_grad():
                return float(self._forward(batch, flat)[0].float())
        try:
            yield bufs, loss
        finally:
            self.params[:] = flat.cpu().numpy()

    @property
    def zo_on_device(self) -> bool:
        """Whether local ZO steps run in a zo_session: on CUDA, when the CUDA seeded kernels load
        there. Otherwise the CPU kernels step `params` and each forward copies it to the device,
        said once in a warning on CUDA."""
        if self._zo_on_device is None:
            self._zo_on_device = False
            if self.device.type == "cuda":
                from .. import cuda_kernels
                ok, why = cuda_kernels.available()
                try:
                    if not ok:
                        raise cuda_kernels.CudaUnavailable(why)
                    cuda_kernels.prepare(self.device)
                    self._zo_on_device = True
                except cuda_kernels.CudaUnavailable as e:
                    import warnings
                    warnings.warn(f"ZO steps on this GPU host use the CPU kernels and copy the trainables for every "
                                  f"forward: {e}", RuntimeWarning, stacklevel=2)
        return self._zo_on_device

    @zo_on_device.setter
    def zo_on_device(self, value: bool) -> None:
        self._zo_on_device = bool(value)

    def _current(self) -> torch.Tensor:
        return self._flat_cpu if self.device.type == "cpu" else self._flat_cpu.to(self.device)

    def reset_params(self) -> None:
        """Back to the artifact's initial trainables, in place (and frozen weights unmerged)."""
        self.params[:] = self._init
        self._overrides = {}

    @property
    def n_trainable(self) -> int:
        return int(self.params.size)

    def fork(self) -> "TorchModel":
        """Another virtual host on the same loaded weights: its own trainables."""
        other = object.__new__(TorchModel)
        other.__dict__.update(self.__dict__)
        other.params = self._init.copy()
        other._overrides = {}
        other._bind()
        other.forward_count = other.backward_count = 0
        other._reference = None
        if self.kind == "dpo":
            other.task = copy.copy(self.task)
            other.task._ref_cache = {}
            other.task.reference = other._reference_logps
        return other

    def merge_into_base(self, module: str, delta_w: np.ndarray) -> None:
        """W <- float32(float64(W) + delta_w) for a LoRA target's frozen weight (FLoRA), computed in
        numpy (elementwise IEEE operations: the same bits on every host). The merged weight is
        this model's own (forks share the module, not their merges); reset_params drops it."""
        path = f"lm.{module}.base.weight"
        cur = self.base_weight(module).astype(np.float64)
        if delta_w.shape != cur.shape:
            raise ValueError(f"{module}: merge of shape {delta_w.shape} into a weight of {cur.shape}")
        self._overrides[path] = torch.from_numpy((cur + delta_w).astype(np.float32)).to(self.device)

    def base_weight(self, module: str) -> np.ndarray:
        """A LoRA target's frozen weight as this model computes with it (merges included)."""
        path = f"lm.{module}.base.weight"
        w = self._overrides.get(path)
        if w is None:
            w = self._frozen[module]
        return w.detach().float().cpu().numpy()

    # -- compute ----------------------------------------------------------------------
    def _inputs(self, batch: Batch) -> list[torch.Tensor]:
        feeds = batch.feeds()
        return [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n in self._in_names]

    def _forward(self, batch: Batch, flat: torch.Tensor):
        """The core's outputs (a tuple, manifest order) at trainables `flat`."""
        ctx = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast
               else contextlib.nullcontext())
        with self._forward_lock, swapped_params(self.core, {**self._split(flat), **self._overrides}), ctx:
            out = self.core(*self._inputs(batch))
        self.forward_count += 1
        return out if isinstance(out, tuple) else (out,)

    def loss_tensor(self, batch: Batch, flat: torch.Tensor) -> torch.Tensor:
        """The task loss at trainables `flat` (a trainable_tensor()), differentiable."""
        return self._forward(batch, flat)[0].float()

    def run(self, batch: Batch) -> dict[str, np.ndarray]:
        """Every graph output at the current parameters, by name (as DeviceModel.run)."""
        with torch.no_grad():
            outs = self._forward(batch, self._current())
        return {n: o.detach().float().cpu().numpy() for n, o in zip(self._out_names, outs)}

    def loss(self, batch: Batch) -> float:
        return float(self.run(batch)["loss"])

    def loss_and_grad(self, batch: Batch) -> tuple[float, np.ndarray]:
        """(loss, d loss / d params as a flat float32 array), one forward and one backward."""
        flat = self.trainable_tensor(True)
        with self.step_lock:
            loss = self.loss_tensor(batch, flat)
            loss.backward()
        self.backward_count += 1
        return float(loss.detach()), flat.grad.detach().float().cpu().numpy()

    def _reference_logps(self, batch: Batch) -> np.ndarray:
        if self._reference is None:
            self._reference = self.fork()
        return self._reference.run(batch)["seq_logps"]

    def evaluate(self, records: Sequence, batch_size: int | None = None, **kw) -> dict:
        return self.task.evaluate(self, list(records), batch_size or 32, **kw)

    # -- checks -----------------------------------------------------------------------
    def _check_base(self) -> None:
        """The export's own check batch must give the loss the exporter recorded: proof that
        this base checkpoint is the one the artifact's frozen weights came from."""
        want = (self.manifest.get("export_check") or {}).get("torch_loss")
        if want is None or self.device.type != "cpu" or self.autocast:
            return  # (bf16 / GPU kernels move the loss a little: nothing exact to compare)
        from ..export.onnx_export import _VERIFY_IDX, _batch
        eos = self.manifest.get("eos_token_id")
        feeds = _batch(self.tokenizer, self.manifest["task"], self.pad_id, -1 if eos is None else int(eos),
                       _VERIFY_IDX)
        with torch.no_grad(), self._forward_lock, swapped_params(self.core, self._split(self._current())):
            got = float(self.core(*[torch.from_numpy(a) for a in feeds])[0])
        if not abs(got - float(want)) <= 1e-4 * max(1.0, abs(float(want))):
            raise BaseModelMismatch(
                f"base model {self.manifest.get('base_model') or self.manifest.get('model')!r} gives loss "
                f"{got:.6f} on the export's check batch, the artifact recorded {float(want):.6f}: it is "
                "not the checkpoint this artifact was exported from; pass the right --base-model")

    def close(self) -> None:
        self._stack.close()
