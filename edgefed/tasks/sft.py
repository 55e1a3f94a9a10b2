"""Generative fine-tuning. Kind "sft": instruction (+ input, system prompt, earlier turns) ->
response, loss on the response tokens (and the format's end-of-turn marker) only. Kind "lm":
plain text, loss on every token.

Truncation rule (sft): the user's text (instruction and input) is cut from its end; the format's
wrappers and the response are never cut. A row whose response and wrappers alone do not fit
is refused (TooLong, naming the row)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..data.records import Example, SFTExample
from .base import IGNORE, Batch, Task, TooLong, pad_rows
from .prompt_format import PromptFormat

__all__ = ["LMTask", "SFTTask", "prompt_pieces"]

_MARK = "\ue000"  # a private-use character: splits a rendered prompt around the user's text


def prompt_pieces(fmt: PromptFormat, r) -> tuple[str, str, str]:
    """(head, user text, tail) of the prompt in front of the response: only the middle may be cut."""
    instruction = getattr(r, "instruction", None)
    if instruction is None:  # a preference pair: its prompt is the instruction
        instruction, inp, system, history = r.prompt, "", "", ()
    else:
        inp, system, history = r.input, r.system, r.history
    if fmt.template and "{input}" in fmt.template:
        text = instruction
        rendered = fmt.prompt(_MARK, inp, system, history)
    else:
        text = f"{instruction}\n\n{inp}" if inp else instruction
        rendered = fmt.prompt(_MARK, "", system, history)
    head, _, tail = rendered.rpartition(_MARK)
    return head, text, tail


class LMTask(Task):
    kind = "lm"
    record_type = Example
    outputs = ("loss", "row_nll", "row_tokens", "next_logits")

    def encode(self, records: Sequence[Example]) -> Batch:
        rows = self.ids([r.text for r in records])
        cut = sum(len(r) > self.limit for r in rows)
        rows = [r[:self.limit] for r in rows]
        ids, mask, tgt = pad_rows(rows, self.pad_id, rows)
        return Batch(ids, mask, tgt, n_truncated=cut)

    def evaluate(self, model, records, batch_size: int = 32, **kw) -> dict:
        nll, tokens = [], []
        for a in range(0, len(records), batch_size):
            b = self.encode(records[a:a + batch_size])
            out = model.run(b)
            nll.append(out["row_nll"].astype(np.float64))
            tokens.append(np.maximum(out["row_tokens"].astype(np.float64), 1.0))
        nll, tokens = np.concatenate(nll), np.concatenate(tokens)
        loss = float(nll.sum() / tokens.sum())
        return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0))), "n": len(records),
                "tokens": int(tokens.sum()), "example_loss": nll / tokens}


class SFTTask(LMTask):
    kind = "sft"
    record_type = SFTExample

    def __init__(self, spec, tokenizer, pad_id, limit, eos_id=None):
        super().__init__(spec, tokenizer, pad_id, limit, eos_id)
        self.format = PromptFormat.from_dict(spec.get("format") or {})
        suffix = self.format.response_suffix
        sids = self.ids([suffix])[0] if suffix else []
        # Greedy decoding stops at the end-of-turn marker's first token or at EOS.
        self.stop_ids = {i for i in ([sids[0]] if sids else []) + ([eos_id] if eos_id is not None else [])}

    def pieces(self, records) -> list[tuple[list[int], list[int], list[int]]]:
        """Per row (head ids, user-text ids, tail ids)."""
        heads, texts, tails = zip(*(prompt_pieces(self.format, r) for r in records))
        return list(zip(self.ids(heads), self.ids(texts), self.ids(tails)))

    def fit(self, r, head, text, tail, answer_len: int) -> tuple[list[int], bool]:
        """The prompt ids with the user's text cut to leave `answer_len` tokens for answers."""
        room = self.limit - len(head) - len(tail) - answer_len
        if room < 0:
            raise TooLong(f"{r.origin or 'a row'}: the response needs {answer_len} tokens and the "
                          f"format {len(head) + len(tail)}, more than the {self.limit} this artifact and "
                          "device allow: raise the device's seq_len or drop/shorten the row")
        return head + text[:room] + tail, len(text) > room

    def encode(self, records: Sequence[SFTExample]) -> Batch:
        records = self.check_records(records)
        answers = self.ids([r.response + self.format.response_suffix for r in records])
        rows, tgts, cut = [], [], 0
        for r, (head, text, tail), ans in zip(records, self.pieces(records), answers):
            prompt, was_cut = self.fit(r, head, text, tail, len(ans))
            cut += was_cut
            rows.append(prompt + ans)
            tgts.append([IGNORE] * len(prompt) + ans)
        ids, mask, tgt = pad_rows(rows, self.pad_id, tgts)
        return Batch(ids, mask, tgt, n_truncated=cut)

    def generate(self, model, records: Sequence[SFTExample], max_new_tokens: int = 48,
                 batch_size: int = 8) -> list[str]:
        """Greedy decoding through the same runtime (the graph's next_logits output; no KV
        cache, so each new token is one forward over the row)."""
        out = []
        for a in range(0, len(records), batch_size):
            part = records[a:a + batch_size]
            rows = [self.fit(r, h, t, tl, min(max_new_tokens, self.limit // 2))[0]
                    for r, (h, t, tl) in zip(part, self.pieces(part))]
            gen: list[list[int]] = [[] for _ in part]
            live = set(range(len(part)))
            for _ in range(max_new_tokens):
                idx = sorted(live)
                cur = [rows[i] + gen[i] for i in idx]
                ids, mask, tgt = pad_rows(cur, self.pad_id, [[IGNORE] * len(c) for c in cur])
                nxt = model.run(Batch(ids, mask, tgt))["next_logits"].argmax(axis=1)
                for i, tok in zip(idx, nxt.tolist()):
                    if tok in self.stop_ids or len(rows[i]) + len(gen[i]) + 1 >= self.limit:
                        live.discard(i)
                    else:
                        gen[i].append(int(tok))
                if not live:
                    break
            out.extend(self.tokenizer.decode(g, skip_special_tokens=True).strip() for g in gen)
        return out

    def evaluate(self, model, records, batch_size: int = 32, *, generate_n: int = 0,
                 max_new_tokens: int = 48, **kw) -> dict:
        res = super().evaluate(model, records, batch_size)
        if generate_n > 0:
            from ..metrics import exact_match, rouge_l
            sample = list(records[:generate_n])
            preds = self.generate(model, sample, max_new_tokens)
            refs = [r.response for r in sample]
            rl, em = rouge_l(preds, refs), exact_match(preds, refs)
            res.update({"rouge_l": rl["mean"], "rouge_l_ci": [rl["ci_low"], rl["ci_high"]],
                        "example_rouge_l": np.asarray(rl["scores"]), "exact_match": em["mean"],
                        "generate_n": len(sample), "samples": list(zip(preds[:3], refs[:3]))})
        return res
