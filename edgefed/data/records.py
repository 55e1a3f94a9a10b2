"""The rows EdgeFed trains on, one type per task kind (device side: stdlib only).

Every record keeps `origin` ("file:line", not compared) so that a problem found later (a
label the artifact does not know, a row too long for its sequence length) names the row.
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Example", "SFTExample", "PreferencePair", "Record", "TASK_KINDS"]


@dataclass(frozen=True)
class Example:
    """Classification (task kind "classify"), and plain text for kind "lm" (label "")."""
    text: str
    label: str            # the label name as the data gives it (an artifact maps names to classes)
    group: str = ""       # natural partition key (user, source, movie): split "group"
    origin: str = field(default="", compare=False)


@dataclass(frozen=True)
class SFTExample:
    """Instruction tuning (task kind "sft"): the loss is on `response` only.

    Alpaca/Dolly rows fill instruction [+ input] + response; chat rows fill system, history
    (earlier turns as (role, content), role "user" or "assistant"), instruction (the last user
    turn) and response (the last assistant turn)."""
    instruction: str
    response: str
    input: str = ""
    system: str = ""
    history: tuple[tuple[str, str], ...] = ()
    group: str = ""
    origin: str = field(default="", compare=False)


@dataclass(frozen=True)
class PreferencePair:
    """Preference data (task kind "dpo"): `chosen` is preferred over `rejected` for `prompt`."""
    prompt: str
    chosen: str
    rejected: str
    group: str = ""
    origin: str = field(default="", compare=False)


Record = Example | SFTExample | PreferencePair
TASK_KINDS = {"classify": Example, "lm": Example, "sft": SFTExample, "dpo": PreferencePair}
