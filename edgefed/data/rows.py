"""One raw row (a dict) -> one record of a task kind, with the column choices made once.

Columns are decided from the schema (tables) or the first row (JSON): an explicit
`Fields` name must exist; otherwise the first present default name wins. Then every row must
have the chosen required columns; optional ones (group, input, system) may be missing.
"""
from __future__ import annotations

import json
import math
from typing import Any

from .errors import DataError
from .fields import Fields
from .records import Example, PreferencePair, SFTExample

__all__ = ["RowError", "RowMapper"]

_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
          "chatgpt": "assistant", "bot": "assistant", "model": "assistant", "system": "system"}


class RowError(Exception):
    """One bad row; the reader adds the location and collects it."""


def _q(names) -> str:
    return ", ".join(repr(n) for n in names)


class RowMapper:
    def __init__(self, kind: str, fields: Fields, columns: list[str], first: dict,
                 class_labels: dict[str, list[str]], where: str):
        self.kind, self.fields, self.columns = kind, fields, list(columns)
        self.class_labels, self.where = class_labels, where
        self.cols: dict[str, tuple[str, bool, bool]] = {}  # role -> (column, explicit, required)
        self.late: set[str] = set()  # optional roles absent so far: JSON rows may add them later
        if kind in ("classify", "lm"):
            self._pick("text", True)
            if kind == "classify":
                self._pick("label", True)
        elif kind == "sft":
            self.chat = self._chat_mode()
            if self.chat:
                self._pick("messages", True)
            else:
                self._pick("instruction", True)
                self._pick("response", True)
            self._pick("input", False)
            self._pick("system", False)
        elif kind == "dpo":
            self._pick("chosen", True)
            self._pick("rejected", True)
            chosen = first.get(self.cols["chosen"][0])
            self._pick("prompt", not isinstance(chosen, (list, tuple)))  # chats carry the prompt
        else:
            raise ValueError(f"unknown task kind {kind!r}: expected classify, lm, sft or dpo")
        self._pick("group", False)

    def _chat_mode(self) -> bool:
        f = self.fields
        if f.messages is not None:
            return True
        if f.instruction is not None or f.response is not None:
            return False
        return any(n in self.columns for n in f.candidates("messages")[0])

    def _pick(self, role: str, required: bool) -> None:
        names, explicit = self.fields.candidates(role)
        for n in names:
            if n in self.columns:
                self.cols[role] = (n, explicit, required or explicit)
                return
        if explicit:
            raise DataError(f"{self.where}: field {names[0]!r} (Fields.{role}) not found; the data "
                            f"has columns {_q(self.columns)}")
        if required:
            raise DataError(f"{self.where}: missing field {role!r}: tried {_q(names)} (or set "
                            f"Fields.{role}); the data has columns {_q(self.columns)}")
        self.late.add(role)

    # ---------------------------------------------------------------- values

    def _name(self, role: str) -> str:
        col = self.cols[role][0]
        return f"field {col!r}" if col == role else f"field {col!r} ({role})"

    def _get(self, row: dict, role: str) -> Any:
        if role not in self.cols:
            if role not in self.late:
                return None
            # Writers often omit empty optional keys ("group", "input"): adopt the first name seen.
            col = next((n for n in self.fields.candidates(role)[0] if n in row), None)
            if col is None:
                return None
            self.cols[role] = (col, False, False)
            self.late.discard(role)
        col, _, required = self.cols[role]
        if col not in row:
            if required:
                raise RowError(f"missing {self._name(role)}; the row has {_q(sorted(row))}")
            return None
        return row[col]

    def _str(self, row: dict, role: str, required: bool = True) -> str:
        v = self._get(row, role)
        if v is None:
            if required:
                raise RowError(f"{self._name(role)} is null (missing)")
            return ""
        if not isinstance(v, str):
            raise RowError(f"{self._name(role)} must be a string, got {type(v).__name__} {v!r:.40}")
        if required and not v.strip():
            raise RowError(f"{self._name(role)} is empty")
        return v

    def _label(self, row: dict) -> str:
        v = self._get(row, "label")
        names = self.class_labels.get(self.cols["label"][0])
        if names is not None and isinstance(v, int) and not isinstance(v, bool):
            if not 0 <= v < len(names):
                raise RowError(f"{self._name('label')} is {v}, outside the ClassLabel names "
                               f"{names}" + (" (-1 means no label)" if v == -1 else ""))
            return names[v]
        if v is None:
            raise RowError(f"{self._name('label')} is null (missing)")
        if isinstance(v, bool):
            raise RowError(f"{self._name('label')} must be a label name or an integer, got a boolean")
        if isinstance(v, int):
            return str(v)
        if isinstance(v, float):
            if math.isfinite(v) and v.is_integer():
                return str(int(v))  # Parquet/pandas turn int columns with gaps into floats
            raise RowError(f"{self._name('label')} must be a label name or an integer, got {v!r}")
        if not isinstance(v, str):
            raise RowError(f"{self._name('label')} must be a label name or an integer, got "
                           f"{type(v).__name__}")
        if not v.strip():
            raise RowError(f"{self._name('label')} is empty")
        return v.strip()

    def _group(self, row: dict) -> str:
        v = self._get(row, "group")
        if v is None:
            return ""
        if isinstance(v, int) and not isinstance(v, bool):
            return str(v)
        if not isinstance(v, str):
            raise RowError(f"{self._name('group')} must be a string or an integer, got {type(v).__name__}")
        return v.strip()

    # ---------------------------------------------------------------- records

    def convert(self, row: dict, origin: str):
        group = self._group(row)
        if self.kind == "classify":
            return Example(self._str(row, "text"), self._label(row), group, origin)
        if self.kind == "lm":
            return Example(self._str(row, "text"), "", group, origin)
        if self.kind == "sft":
            return self._sft(row, group, origin)
        return self._dpo(row, group, origin)

    def _sft(self, row: dict, group: str, origin: str) -> SFTExample:
        inp = self._str(row, "input", required=False)
        system = self._str(row, "system", required=False)
        if not self.chat:
            return SFTExample(self._str(row, "instruction"), self._str(row, "response"), inp,
                              system, (), group, origin)
        turns = self._turns(row, "messages")
        if turns and turns[0][0] == "system":
            system = turns.pop(0)[1]
        where = self._name("messages")
        for k, (role, _) in enumerate(turns):
            if role == "system":
                raise RowError(f"{where}: a system message is only allowed first (turn {k + 1})")
        if len(turns) < 2 or turns[-1][0] != "assistant" or turns[-2][0] != "user":
            raise RowError(f"{where} must end with a user message, then the assistant's reply "
                           f"(got roles {[r for r, _ in turns]})")
        for role, text in turns[-2:]:
            if not text.strip():
                raise RowError(f"{where}: the last {role} message is empty")
        return SFTExample(turns[-2][1], turns[-1][1], inp, system, tuple(turns[:-2]), group, origin)

    def _turns(self, row: dict, role: str) -> list[tuple[str, str]]:
        v = self._get(row, role)
        where = self._name(role)
        if isinstance(v, str) and v.lstrip().startswith("["):
            try:
                v = json.loads(v)  # a chat stored as JSON text in a CSV cell
            except json.JSONDecodeError as err:
                raise RowError(f"{where}: invalid JSON ({err.msg})") from None
        if not isinstance(v, (list, tuple)):
            raise RowError(f"{where} must be a list of messages, got {type(v).__name__}")
        turns = []
        for k, m in enumerate(v):
            if not isinstance(m, dict):
                raise RowError(f"{where}: message {k + 1} must be an object with role and content")
            if "role" in m:
                r, content = m["role"], m.get("content")
            elif "from" in m:
                r, content = m["from"], m.get("value")
            else:
                raise RowError(f"{where}: message {k + 1} has no 'role' (or ShareGPT 'from')")
            r = _ROLES.get(str(r).strip().lower())
            if r is None:
                raise RowError(f"{where}: message {k + 1} has role {m.get('role', m.get('from'))!r}; "
                               f"expected user/human, assistant/gpt or system")
            if not isinstance(content, str):
                raise RowError(f"{where}: message {k + 1} content must be a string, got "
                               f"{type(content).__name__}")
            turns.append((r, content))
        return turns

    def _dpo(self, row: dict, group: str, origin: str) -> PreferencePair:
        chosen = self._get(row, "chosen")
        if not isinstance(chosen, (list, tuple)):
            c, r = self._str(row, "chosen"), self._str(row, "rejected")
            if "prompt" not in self.cols:
                raise RowError("missing field 'prompt' (chosen/rejected are plain strings)")
            return PreferencePair(self._str(row, "prompt"), c, r, group, origin)
        ct, rt = self._turns(row, "chosen"), self._turns(row, "rejected")
        for name, t in (("chosen", ct), ("rejected", rt)):
            if not t or t[-1][0] != "assistant" or not t[-1][1].strip():
                raise RowError(f"{self._name(name)} must end with a non-empty assistant message")
        if "prompt" in self.cols:
            prompt = self._str(row, "prompt")
        else:
            if ct[:-1] != rt[:-1]:
                raise RowError("chosen and rejected conversations differ before the answer: give "
                               "a 'prompt' field")
            users = [c for r, c in ct[:-1] if r == "user"]
            if not users or ct[-2][0] != "user" or not users[-1].strip():
                raise RowError(f"{self._name('chosen')} has no user turn before the answer")
            prompt = users[-1]
        return PreferencePair(prompt, ct[-1][1], rt[-1][1], group, origin)
