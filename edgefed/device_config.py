"""Device classes (device_configs/*.yaml): threads, memory budget, execution providers,
default batch shape. No torch here: this runs on the device."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

__all__ = ["DeviceConfig", "load_device_config", "config_dirs", "list_device_configs"]

_PRECISIONS = ("fp32", "int8-frozen")


@dataclass(frozen=True)
class DeviceConfig:
    name: str
    arch: str = "any"
    threads: int = os.cpu_count() or 1
    memory_budget_mb: int = 2048
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    batch_size: int = 8
    seq_len: int = 64
    precision: str = "fp32"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        problems = []
        if self.threads < 1:
            problems.append(f"threads={self.threads} (must be >= 1)")
        if self.memory_budget_mb < 64:
            problems.append(f"memory_budget_mb={self.memory_budget_mb} (must be >= 64)")
        if self.batch_size < 1 or self.seq_len < 4:
            problems.append(f"batch_size={self.batch_size}, seq_len={self.seq_len} (need >= 1 and >= 4)")
        if self.precision not in _PRECISIONS:
            problems.append(f"precision={self.precision!r} (one of {_PRECISIONS})")
        if not self.execution_providers:
            problems.append("execution_providers is empty (list at least CPUExecutionProvider)")
        if problems:
            raise ValueError(f"device config {self.name!r} is invalid: " + "; ".join(problems))

    def providers(self, available: list[str]) -> list[str]:
        """The preferred providers this build of ONNX Runtime has, CPU always last."""
        chosen = [p for p in self.execution_providers if p in available]
        if "CPUExecutionProvider" not in chosen:
            chosen.append("CPUExecutionProvider")
        return chosen


def config_dirs() -> list[Path]:
    """Where named configs are looked up: the source tree, then the installed share dir."""
    return [Path(__file__).resolve().parents[1] / "device_configs",
            Path(sys.prefix) / "share" / "edgefed" / "device_configs"]


def list_device_configs() -> list[str]:
    names = set()
    for d in config_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def load_device_config(name_or_path: str | os.PathLike) -> DeviceConfig:
    """A config by file path or by name (e.g. 'raspberry-pi-4-4gb')."""
    import yaml  # device extra; imported here so `edgefed.runtime` loads without it

    path = Path(name_or_path)
    if not path.is_file():
        for d in config_dirs():
            cand = d / f"{name_or_path}.yaml"
            if cand.is_file():
                path = cand
                break
        else:
            raise FileNotFoundError(f"no device config {str(name_or_path)!r}; known: "
                                    f"{', '.join(list_device_configs()) or 'none'} (or give a YAML path)")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    known = {f.name for f in fields(DeviceConfig)} - {"extra"}
    unknown = {k: v for k, v in raw.items() if k not in known}
    kwargs = {k: v for k, v in raw.items() if k in known}
    kwargs.setdefault("name", path.stem)
    if "execution_providers" in kwargs:
        kwargs["execution_providers"] = tuple(kwargs["execution_providers"])
    try:
        return DeviceConfig(**kwargs, extra=unknown)
    except TypeError as exc:
        raise ValueError(f"{path}: {exc}") from None
