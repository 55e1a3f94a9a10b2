"""Preference pairs (DPO, Rafailov et al. 2023) trained by forward passes only.

The graph takes both answers of each pair (rows 2i = chosen, 2i+1 = rejected), sums each
answer's token log-probabilities under the current trainables and returns
    loss = -mean log sigmoid(beta * ((lp_c - lp_r) - (ref_c - ref_r)))
where ref_* are the same sums under the frozen reference: the artifact's initial trainables.
The device computes the reference sums with the same graph on a second binding that holds the
initial trainables, once per pair (cached), and feeds them as the `ref_logps` input: the
reference never changes, so recomputing it inside every forward would double the cost of each
ZO step for nothing.

Truncation rule: as sft, the prompt's text is cut from its end; neither answer is ever cut."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..data.records import PreferencePair
from .base import IGNORE, Batch, pad_rows
from .sft import SFTTask

__all__ = ["DPOTask"]


class DPOTask(SFTTask):
    kind = "dpo"
    record_type = PreferencePair
    outputs = ("loss", "seq_logps")
    primary = "preference_accuracy"

    def __init__(self, spec, tokenizer, pad_id, limit, eos_id=None):
        super().__init__(spec, tokenizer, pad_id, limit, eos_id)
        self.beta = float(spec.get("beta", 0.1))
        self.reference = None  # callable(batch) -> seq_logps at the reference trainables
        self._ref_cache: dict[PreferencePair, tuple[float, float]] = {}

    def encode_rows(self, records: Sequence[PreferencePair]) -> Batch:
        records = self.check_records(records)
        sfx = self.format.response_suffix
        chosen = self.ids([r.chosen + sfx for r in records])
        rejected = self.ids([r.rejected + sfx for r in records])
        rows, tgts, cut = [], [], 0
        for r, (head, text, tail), c, j in zip(records, self.pieces(records), chosen, rejected):
            prompt, was_cut = self.fit(r, head, text, tail, max(len(c), len(j)))
            cut += was_cut
            for ans in (c, j):
                rows.append(prompt + ans)
                tgts.append([IGNORE] * len(prompt) + ans)
        ids, mask, tgt = pad_rows(rows, self.pad_id, tgts)
        extra = {"ref_logps": np.zeros(len(rows), np.float32), "pair_rows": np.int64(len(records))}
        return Batch(ids, mask, tgt, extra=extra, n_truncated=cut)

    def encode(self, records: Sequence[PreferencePair]) -> Batch:
        batch = self.encode_rows(records)
        if self.reference is not None:
            batch.extra["ref_logps"] = self.ref_logps(records, batch)
        return batch

    def length(self, record) -> int:
        return int(self.encode_rows([record]).input_ids.shape[1])

    def ref_logps(self, records, batch: Batch) -> np.ndarray:
        missing = [i for i, r in enumerate(records) if r not in self._ref_cache]
        if missing:
            lp = self.reference(batch)  # rows of the whole batch; keep what was missing
            for i in missing:
                self._ref_cache[records[i]] = (float(lp[2 * i]), float(lp[2 * i + 1]))
        return np.asarray([v for r in records for v in self._ref_cache[r]], dtype=np.float32)

    def evaluate(self, model, records, batch_size: int = 16, **kw) -> dict:
        total, margins = 0.0, []
        for a in range(0, len(records), batch_size):
            part = records[a:a + batch_size]
            b = self.encode(part)
            out = model.run(b)
            total += float(out["loss"]) * len(part)
            lp, ref = out["seq_logps"].astype(np.float64), b.extra["ref_logps"].astype(np.float64)
            margins.append(self.beta * ((lp[0::2] - ref[0::2]) - (lp[1::2] - ref[1::2])))
        m = np.concatenate(margins) if margins else np.zeros(0)
        from ..metrics import preference_metrics
        pm = preference_metrics(m)
        # A tie (margin exactly 0, as for every pair at the reference itself) counts half: the
        # starting model then scores 50%, not 0%, and a gain is a real preference learnt.
        correct = np.where(m > 0, 1.0, np.where(m == 0, 0.5, 0.0))
        return {"loss": total / max(len(records), 1), "n": len(records), "margins": m,
                "correct": correct, "preference_accuracy": float(correct.mean()) if m.size else float("nan"),
                "reward_margin": float(m.mean()) if m.size else float("nan"), "metrics": pm}
