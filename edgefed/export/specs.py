"""Parsing of the `--trainable` and `--task` spec strings (no torch).

Grammar: "<kind>[:key=value,key=value,...]". A comma-separated token without "=" continues
the previous value, so "lora:r=8,targets=q_proj,v_proj" gives targets=["q_proj", "v_proj"].
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Task-neutral: a template written for your data usually scores better; `edgefed zero-shot`
# compares candidates (the demo uses edgefed.data.SENTIMENT_TEMPLATE, picked that way).
DEFAULT_TEMPLATE = "Text: {text}\nLabel:"


def default_prompt_init(task_entry: dict) -> str:
    """The text whose token embeddings a soft prompt starts from, when the user gives none: an
    instruction built from the task itself (a classify task's own labels), so a prompt for TREC
    does not start from a sentiment instruction. `--prompt-init` (edgefed export, demo,
    simulate) sets one written for the data; the packaged sentiment corpus uses
    edgefed.data.SENTIMENT_PROMPT_INIT."""
    kind = task_entry["kind"]
    if kind == "classify":
        labels = [str(x) for x in task_entry["labels"]]
        choices = " or ".join(labels) if len(labels) == 2 else ", ".join(labels[:-1]) + " or " + labels[-1]
        return f"Classify this text as {choices}."
    if kind in ("sft", "dpo"):
        return "Follow the instruction and give a helpful, accurate answer."
    return "Continue the text."


def _parse(spec: str) -> tuple[str, dict[str, list[str]]]:
    kind, _, rest = spec.strip().partition(":")
    opts: dict[str, list[str]] = {}
    key = None
    for tok in filter(None, (t.strip() for t in rest.split(","))):
        if "=" in tok:
            key, _, val = tok.partition("=")
            key = key.strip()
            if key in opts:
                raise ValueError(f"{spec!r}: option {key!r} given twice")
            opts[key] = [val.strip()] if val.strip() else []
        elif key is None:
            raise ValueError(f"{spec!r}: expected key=value, got {tok!r}")
        else:
            opts[key].append(tok)
    return kind.strip().lower(), opts


def _one(spec: str, opts: dict, key: str, cast, default):
    if key not in opts:
        return default
    if len(opts[key]) != 1:
        raise ValueError(f"{spec!r}: option {key!r} takes one value")
    try:
        return cast(opts[key][0])
    except ValueError:
        raise ValueError(f"{spec!r}: bad value for {key!r}: {opts[key][0]!r}") from None


def _check_known(spec: str, opts: dict, known: set[str]) -> None:
    unknown = set(opts) - known
    if unknown:
        raise ValueError(f"{spec!r}: unknown option(s) {sorted(unknown)}; known: {sorted(known)}")


@dataclass(frozen=True)
class TrainableSpec:
    mode: str  # "full" | "norms" | "lora" | "prompt" | "offsite"
    spec: str  # the string as given (goes into the manifest)
    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    tokens: int = 20
    adapter: int = 2   # offsite: decoder layers tuned at each end (bottom and top)
    drop: int = 2      # offsite: the emulator keeps every `drop`-th middle layer


def parse_trainable(spec: str) -> TrainableSpec:
    kind, opts = _parse(spec)
    if kind == "full":
        _check_known(spec, opts, set())
        return TrainableSpec("full", spec)
    if kind == "norms":  # LN-tuning: only the normalisation layers' gains train (35k of SmolLM2-135M's 135M)
        _check_known(spec, opts, set())
        return TrainableSpec("norms", spec)
    if kind == "lora":
        _check_known(spec, opts, {"r", "alpha", "targets"})
        r = _one(spec, opts, "r", int, 8)
        alpha = _one(spec, opts, "alpha", float, 2.0 * r)  # scale alpha/r = 2, peft's common choice
        targets = tuple(opts.get("targets") or ("q_proj", "v_proj"))
        if r < 1:
            raise ValueError(f"{spec!r}: r must be >= 1")
        return TrainableSpec("lora", spec, r=r, alpha=alpha, targets=targets)
    if kind == "prompt":
        _check_known(spec, opts, {"tokens"})
        tokens = _one(spec, opts, "tokens", int, 20)
        if tokens < 1:
            raise ValueError(f"{spec!r}: tokens must be >= 1")
        return TrainableSpec("prompt", spec, tokens=tokens)
    if kind == "offsite":
        _check_known(spec, opts, {"adapter", "drop"})
        adapter = _one(spec, opts, "adapter", int, 2)
        drop = _one(spec, opts, "drop", int, 2)
        if adapter < 1 or drop < 1:
            raise ValueError(f"{spec!r}: adapter and drop must be >= 1")
        return TrainableSpec("offsite", spec, adapter=adapter, drop=drop)
    raise ValueError(f"trainable spec {spec!r}: kind must be full, norms, lora, prompt or offsite")


@dataclass(frozen=True)
class TaskSpec:
    kind: str  # "classify" | "lm" | "sft" | "dpo"
    spec: str
    labels: tuple[str, ...] = field(default_factory=tuple)
    auto_labels: bool = False  # classify:labels=auto: the label set is read from --data
    beta: float = 0.1          # dpo: the KL strength of the implicit reward


TASK_HELP = ('"classify:labels=auto" (label set read from --data) | "classify:labels=a,b,c" | "sft" | '
             '"dpo[:beta=0.1]" | "lm"')


def parse_task(spec: str) -> TaskSpec:
    kind, opts = _parse(spec)
    if kind in ("lm", "sft"):
        _check_known(spec, opts, set())
        return TaskSpec(kind, spec)
    if kind == "dpo":
        _check_known(spec, opts, {"beta"})
        beta = _one(spec, opts, "beta", float, 0.1)
        if not beta > 0:
            raise ValueError(f"{spec!r}: beta must be > 0")
        return TaskSpec("dpo", spec, beta=beta)
    if kind == "classify":
        _check_known(spec, opts, {"labels"})
        labels = tuple(opts.get("labels") or ("positive", "negative"))
        if labels == ("auto",):
            return TaskSpec("classify", spec, auto_labels=True)
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"{spec!r}: need >= 2 distinct labels (or labels=auto with --data)")
        return TaskSpec("classify", spec, labels=labels)
    raise ValueError(f"task spec {spec!r}: kind must be classify, sft, dpo or lm ({TASK_HELP})")
