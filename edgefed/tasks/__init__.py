"""Task kinds: how records become batches for the exported graph, and how a model is scored.

One module per kind; the runtime, evaluation and CLI look kinds up here by the artifact
manifest's task entry and know none by name. Device side: no torch."""
from __future__ import annotations

from .base import Batch, Task, TooLong
from .classify import ClassifyTask
from .dpo import DPOTask
from .prompt_format import ALPACA, PromptFormat, check_template
from .sft import LMTask, SFTTask

__all__ = ["TASKS", "make_task", "Batch", "Task", "TooLong", "PromptFormat", "ALPACA", "check_template"]

TASKS: dict[str, type[Task]] = {t.kind: t for t in (ClassifyTask, LMTask, SFTTask, DPOTask)}


def make_task(spec: dict, tokenizer, pad_id: int, limit: int, eos_id: int | None = None) -> Task:
    kind = spec.get("kind")
    if kind not in TASKS:
        raise ValueError(f"unknown task kind {kind!r} in the artifact; this EdgeFed knows {sorted(TASKS)}")
    return TASKS[kind](spec, tokenizer, pad_id, limit, eos_id)
