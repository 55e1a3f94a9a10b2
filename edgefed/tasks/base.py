"""What every task kind shares on the device: the padded batch, and tokenisation helpers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = ["Batch", "Task", "TooLong", "pad_rows", "TaskBatches"]

IGNORE = -100  # targets at this value carry no loss (HF `labels` convention)


class TooLong(ValueError):
    """A row that cannot fit the sequence length without cutting what must not be cut."""


@dataclass
class Batch:
    input_ids: np.ndarray       # int64 [B, T], right-padded
    attention_mask: np.ndarray  # int64 [B, T]
    targets: np.ndarray         # int64 [B] (classify) or [B, T] (lm, sft, dpo; -100 = no loss)
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # more graph inputs (dpo: ref_logps)
    n_truncated: int = 0        # rows whose text was cut to fit (by the task's stated rule)

    @property
    def size(self) -> int:
        """Examples in the batch (a dpo pair is one example over two rows)."""
        return int(self.extra["pair_rows"]) if "pair_rows" in self.extra else int(self.input_ids.shape[0])

    def feeds(self) -> dict[str, np.ndarray]:
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "targets": self.targets}
        out.update({k: v for k, v in self.extra.items() if k != "pair_rows"})
        return out


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, targets: Sequence[Sequence[int]] | None = None):
    """Right-pad token rows into (input_ids, attention_mask[, targets padded with -100])."""
    T = max(len(r) for r in rows)
    ids = np.full((len(rows), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), T), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    if targets is None:
        return ids, mask
    tgt = np.full((len(rows), T), IGNORE, dtype=np.int64)
    for i, t in enumerate(targets):
        tgt[i, :len(t)] = t
    return ids, mask, tgt


class Task:
    """A task kind on the device: records -> batches, and evaluation through the runtime.

    `spec` is the manifest's "task" entry, `tokenizer` a `tokenizers.Tokenizer`, `limit` the
    tokens a row may use (min of the device's seq_len and the model's context)."""
    kind = ""
    record_type: type = object
    outputs: tuple[str, ...] = ("loss",)
    primary = "loss"  # the metric reports lead with (and pair before/after on)

    def __init__(self, spec: dict, tokenizer, pad_id: int, limit: int, eos_id: int | None = None):
        self.spec, self.tokenizer, self.pad_id, self.limit, self.eos_id = spec, tokenizer, pad_id, limit, eos_id

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def check_records(self, records: Sequence) -> list:
        bad = [r for r in records if not isinstance(r, self.record_type)]
        if bad:
            raise ValueError(f"task {self.kind} takes {self.record_type.__name__} rows, got "
                             f"{type(bad[0]).__name__} ({getattr(bad[0], 'origin', '') or 'row'}): "
                             "read the data with the artifact's task kind")
        return list(records)

    def validate(self, records: Sequence) -> dict:
        """Every row checked before training starts, so a bad row fails fast with its file and
        line instead of mid-round. Returns {"n": rows, "truncated": rows that will be cut}."""
        records = self.check_records(records)
        truncated = 0
        for a in range(0, len(records), 256):
            truncated += self.encode(records[a:a + 256]).n_truncated
        return {"n": len(records), "truncated": truncated}

    def encode(self, records: Sequence) -> Batch:
        raise NotImplementedError

    def length(self, record) -> int:
        """Tokens one record's batch row pads to (its rows' longest, for a pair): what length
        buckets sort by. No model call (DPO's reference scores are not needed for a length)."""
        return int(self.encode([record]).input_ids.shape[1])

    def evaluate(self, model, records: Sequence, batch_size: int = 32, **kw) -> dict:
        raise NotImplementedError


class TaskBatches:
    """Records -> batches through a model's task (`self.task`, `self.batch_size`): what the ONNX
    and torch backends share, so both tokenise exactly alike."""

    def encode(self, records: Sequence) -> Batch:
        """Tokenise with the artifact's task (template, label words, prompt format)."""
        if not records:
            raise ValueError("cannot encode an empty batch")
        return self.task.encode(records)

    def row_length(self, record) -> int:
        return self.task.length(record)

    def batches(self, records: Sequence, batch_size: int | None = None, shuffle_seed: int | None = None):
        bs = batch_size or self.batch_size
        order = np.arange(len(records))
        if shuffle_seed is not None:
            np.random.default_rng(shuffle_seed).shuffle(order)
        for a in range(0, len(order), bs):
            yield self.encode([records[i] for i in order[a:a + bs]])
