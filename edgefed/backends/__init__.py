"""The model protocol methods see, in two backends: ONNX Runtime (devices: `edgefed.runtime.
DeviceModel`, no torch) and torch (hosts: `edgefed.backends.torch_model.TorchModel`, CPU or
CUDA with bf16 autocast, backprop). Both hold the global trainables as one flat float32 buffer
`params` in the artifact's manifest order, so every method's delta, replay and digest apply to
either bit for bit. This module imports neither backend until asked."""
from __future__ import annotations

import os

__all__ = ["BACKENDS", "load_model_backend"]

BACKENDS = ("onnx", "torch")


def load_model_backend(backend: str, artifact: str | os.PathLike, config=None, *, base_model=None,
                       torch_device: str | None = None, **kw):
    """A model for `edgefed device` / simulation. onnx: DeviceModel(artifact, config, **kw);
    torch: TorchModel(artifact, base_model, device=torch_device) sized from the config."""
    if backend == "onnx":
        from ..runtime import DeviceModel
        return DeviceModel(artifact, config, **kw)
    if backend == "torch":
        try:
            from .torch_model import TorchModel
        except ImportError as e:
            raise RuntimeError(f"--backend torch needs the host extra (torch, transformers): {e}. "
                               "Install with pip install 'edgefed[host]' or use --backend onnx") from None
        bs = kw.get("batch_size") or (config.batch_size if config is not None else 8)
        sl = kw.get("seq_len") or (config.seq_len if config is not None else 128)
        threads = kw.get("threads") or (config.threads if config is not None else None)
        return TorchModel(artifact, base_model, device=torch_device, batch_size=bs, seq_len=sl, threads=threads)
    raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
