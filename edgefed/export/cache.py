"""Exported artifacts cached by what they were made from, so the demo, the benchmarks and the
learning check export SmolLM2 once per (model, trainable, task, template, quantize)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ..models import cache_dir
from .artifact import FORMAT_VERSION
from .specs import parse_trainable

__all__ = ["ensure_artifact", "artifact_key"]


def artifact_key(model: str, trainable: str, task: str, template: str | None, quantize: bool,
                 prompt_init: str | None = None) -> str:
    key = [model, trainable, task, template, bool(quantize), FORMAT_VERSION]
    kind = parse_trainable(trainable).mode
    if kind == "prompt":  # the starting text is part of a soft prompt's artifact (None: from the task)
        key.append(["prompt_init", prompt_init])
    blob = json.dumps(key).encode()
    tag = kind + ("-int8" if quantize else "")
    return f"{Path(model).name}-{tag}-{hashlib.sha256(blob).hexdigest()[:10]}"


def ensure_artifact(model: str = "smollm2-135m", trainable: str = "lora:r=8,targets=q_proj,v_proj",
                    task: str = "classify:labels=positive,negative", template: str | None = None,
                    quantize: bool = False, progress: bool = True, data=None, fields=None,
                    prompt_init: str | None = None) -> Path:
    """The artifact directory, exporting it first if this combination was never exported.
    With classify:labels=auto, `data` (a file) decides the labels: its label set joins the key."""
    key_task = task
    if "labels=auto" in task.replace(" ", ""):
        from ..data import label_set, read_records
        if data is None:
            raise ValueError("classify:labels=auto needs the data file to read the labels from")
        key_task = task + "|" + ",".join(label_set(read_records(data, "classify", fields)))
    out = cache_dir() / "artifacts" / artifact_key(model, trainable, key_task, template, quantize, prompt_init)
    if (out / "manifest.json").is_file():
        return out
    from .onnx_export import export_artifact

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    export_artifact(model, tmp, trainable, task, template=template, quantize_frozen=quantize,
                    progress=progress, data=data, fields=fields, prompt_init=prompt_init)
    tmp.rename(out)
    return out
