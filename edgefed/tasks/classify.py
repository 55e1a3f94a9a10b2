"""Classification with any label set: the graph scores each label by the sum of its label
word's token log-probabilities after the prompt (multi-token label words included), and the
loss is cross-entropy over those scores.

Truncation rule: the row's text is cut from its end; the template's prefix and suffix (and the
label words the graph appends) are never cut."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..data.records import Example
from .base import Batch, Task

__all__ = ["ClassifyTask"]


class ClassifyTask(Task):
    kind = "classify"
    record_type = Example
    outputs = ("loss", "label_logits")
    primary = "accuracy"

    def __init__(self, spec, tokenizer, pad_id, limit, eos_id=None):
        super().__init__(spec, tokenizer, pad_id, limit, eos_id)
        self.labels: list[str] = list(spec["labels"])
        self.template: str = spec.get("template") or "{text}"
        prefix, _, suffix = self.template.partition("{text}")
        self.prefix_ids = self.ids([prefix])[0] if prefix else []
        self.suffix_ids = self.ids([suffix])[0] if suffix else []
        # The graph appends each label's tokens but the last after the prompt (positions the
        # model reads while scoring later tokens): they need room too.
        extra = max((len(t) - 1 for t in spec.get("label_token_ids", [[0]])), default=0)
        self.room = self.limit - len(self.prefix_ids) - len(self.suffix_ids) - extra
        if self.room < 1:
            raise ValueError(f"the template {self.template!r} and label words leave no room for text "
                             f"in {self.limit} tokens: raise seq_len or shorten the template")

    def targets(self, records: Sequence[Example]) -> np.ndarray:
        from ..data import label_targets
        return label_targets(records, self.labels)

    def encode(self, records: Sequence[Example]) -> Batch:
        if not records:
            raise ValueError("cannot encode an empty batch")
        rows, cut = [], 0
        for ids in self.ids([r.text for r in records]):
            cut += len(ids) > self.room
            rows.append(self.prefix_ids + ids[:self.room] + self.suffix_ids)
        from .base import pad_rows
        ids, mask = pad_rows(rows, self.pad_id)
        return Batch(ids, mask, self.targets(records), n_truncated=cut)

    def evaluate(self, model, records, batch_size: int = 32, **kw) -> dict:
        from ..metrics import classification_metrics
        total, n, preds = 0.0, 0, []
        for a in range(0, len(records), batch_size):
            out = model.run(self.encode(records[a:a + batch_size]))
            k = min(batch_size, len(records) - a)
            total += float(out["loss"]) * k
            n += k
            preds.append(out["label_logits"].argmax(axis=1))
        pred = np.concatenate(preds) if preds else np.zeros(0, np.int64)
        y = self.targets(records)
        res = {"loss": total / max(n, 1), "n": n, "predictions": pred, "targets": y,
               "correct": pred == y, "accuracy": float(np.mean(pred == y)) if n else float("nan")}
        m = classification_metrics(y, pred, len(self.labels), labels=self.labels)
        res.update({"accuracy_ci": [m["accuracy_ci_low"], m["accuracy_ci_high"]], "macro_f1": m["macro_f1"],
                    "macro_f1_ci": [m["macro_f1_ci_low"], m["macro_f1_ci_high"]],
                    "confusion": m["confusion_matrix"], "per_class": m["per_class"]})
        return res
