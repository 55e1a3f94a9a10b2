"""Which column holds what: explicit names, or the first present of a list of common names."""
from __future__ import annotations

from dataclasses import dataclass, fields as _dc_fields

__all__ = ["Fields", "DEFAULT_NAMES"]

DEFAULT_NAMES: dict[str, tuple[str, ...]] = {
    "text": ("text", "sentence", "content", "review", "document"),
    "label": ("label", "labels", "category", "class"),
    "group": ("group", "user", "user_id", "source"),
    "instruction": ("instruction", "prompt", "question"),
    "input": ("input", "context"),
    "response": ("response", "output", "answer", "completion"),
    "messages": ("messages", "conversations"),
    "system": ("system",),
    "prompt": ("prompt", "question", "instruction"),
    "chosen": ("chosen",),
    "rejected": ("rejected",),
}


@dataclass(frozen=True)
class Fields:
    """Column names in the user's data; None means "try the usual names" (DEFAULT_NAMES).

    `split` picks the split of a Hugging Face DatasetDict directory (default "train")."""
    text: str | None = None
    label: str | None = None
    group: str | None = None
    instruction: str | None = None
    input: str | None = None
    response: str | None = None
    messages: str | None = None
    system: str | None = None
    prompt: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    split: str | None = None

    def candidates(self, role: str) -> tuple[tuple[str, ...], bool]:
        """(names to try, explicit?) for a role such as "text"."""
        name = getattr(self, role)
        return ((name,), True) if name is not None else (DEFAULT_NAMES[role], False)

    @classmethod
    def parse(cls, spec: str | None) -> "Fields":
        """'text=review,label=stars' -> Fields(text='review', label='stars') (for CLIs)."""
        if not spec:
            return cls()
        known = {f.name for f in _dc_fields(cls)}
        kw = {}
        for part in spec.split(","):
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or key not in known or not value:
                raise ValueError(f"bad field mapping {part!r}: expected NAME=COLUMN with NAME in "
                                 f"{sorted(known)}")
            kw[key] = value
        return cls(**kw)
