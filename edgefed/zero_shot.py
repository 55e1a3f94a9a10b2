"""`edgefed zero-shot`: score candidate prompt templates on held-out data with the base model,
before any training (host side: the export needs torch; scoring runs through ONNX Runtime).

The model is exported once (LoRA r=8 on q,v: LoRA B starts at zero, so the graph computes the
base model). A template is not part of the graph, only of the manifest's task entry, so each
candidate is scored by swapping the device model's task and evaluating the same held-out rows.

Ranking: classify by accuracy (then macro-F1, then loss); sft by loss; dpo by the base model's
own preference (summed log-probability of chosen > rejected). A DPO loss is log 2 for every
template before training (the reference is the model itself), so it cannot rank templates.
Every row also carries its paired difference from the best row on the same examples with a 95%
interval: a "best" that is within noise of the runner-up says so.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .jsonable import plain

__all__ = ["add_zero_shot_args", "run_zero_shot", "read_templates", "held_out_sample",
           "Candidate", "ZeroShotError", "TRAINABLE", "CHAT"]

log = logging.getLogger(__name__)

# LoRA B starts at zero: the exported graph computes the base model, and the same artifact
# shape is what `edgefed export` / the demo train.
TRAINABLE = "lora:r=8,targets=q_proj,v_proj"
_MAX_NEW_TOKENS = 48  # SFTTask.evaluate's default for generate_n
CHAT = "chat"  # sft/dpo candidate: the tokenizer's own chat template (the artifact's derived format)

_PLACEHOLDERS = {
    "classify": ({"text"}, {"text"}),
    "sft": ({"instruction"}, {"instruction", "input"}),
    "dpo": ({"instruction"}, {"instruction", "input"}),
}


class ZeroShotError(Exception):
    """A user error: printed as one message, exit code 2, no traceback."""


@dataclass(frozen=True)
class Candidate:
    template: str | None  # None: the tokenizer's chat template (sft/dpo "chat")
    where: str            # "file:line" or "file[item]"

    @property
    def shown(self) -> str:
        if self.template is None:
            return "chat (the tokenizer's chat template)"
        return "'" + _escape(self.template) + "'"  # quoted: leading/trailing spaces matter


def _escape(t: str) -> str:
    """A template on one line, the way --templates files and `edgefed export --template` take it."""
    return t.replace("\n", "\\n")


# ---------------------------------------------------------------------------- templates

def _is_comment(line: str) -> bool:
    # '##...' is kept: Markdown headings start Alpaca-style templates ("### Instruction:\n...").
    return line.startswith("#") and not line.startswith("##")


def read_templates(path: str | Path, kind: str) -> list[Candidate]:
    """Candidates from a file: one per line (a literal \\n is a newline; blank lines and lines
    starting with a single '#' are skipped), or a JSON list of strings when the name ends in
    .json. Every template is checked for the task's placeholders; the first bad one raises
    ZeroShotError naming file and line (or item)."""
    from .tasks import check_template

    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ZeroShotError(f"cannot read templates file {p}: {exc}") from None
    items: list[tuple[str, str]] = []
    if p.name.lower().endswith(".json"):
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ZeroShotError(f"{p}: not valid JSON ({exc}); expected a list of template strings") from None
        if not isinstance(data, list):
            raise ZeroShotError(f"{p}: expected a JSON list of template strings, got {type(data).__name__}")
        for i, t in enumerate(data):
            if not isinstance(t, str):
                raise ZeroShotError(f"{p}[{i}]: expected a string, got {type(t).__name__} {t!r}")
            items.append((f"{p}[{i}]", t))
    else:
        for no, line in enumerate(raw.splitlines(), 1):
            if not line.strip() or _is_comment(line):
                continue
            items.append((f"{p}:{no}", line.replace("\\n", "\n")))
    if not items:
        raise ZeroShotError(f"{p}: no templates (one per line, or a JSON list in a .json file)")
    required, allowed = _PLACEHOLDERS[kind]
    out: list[Candidate] = []
    seen: dict[str | None, str] = {}
    for where, t in items:
        if t.strip() == CHAT:
            if kind == "classify":
                raise ZeroShotError(f"{where}: 'chat' (the tokenizer's chat template) is a candidate for "
                                    "sft and dpo only; a classify template needs {text}")
            cand = Candidate(None, where)
        else:
            try:
                check_template(t, required, allowed, f"{kind} template")
            except ValueError as exc:
                raise ZeroShotError(f"{where}: {exc}") from None
            cand = Candidate(t, where)
        if cand.template in seen:
            log.warning("%s: same template as %s; scored once", where, seen[cand.template])
            continue
        seen[cand.template] = where
        out.append(cand)
    return out


# ---------------------------------------------------------------------------- data

def held_out_sample(records: Sequence, n: int, seed: int) -> tuple[list, str]:
    """A seeded held-out sample of n records: balanced per label for labelled examples when
    the data allows it (train_heldout_split), else uniformly random. Returns (sample, how)."""
    from .data import train_heldout_split

    if n >= len(records):
        order = np.random.default_rng(seed).permutation(len(records))
        return [records[i] for i in order], f"all {len(records)} rows (--n {n} >= the data)"
    try:
        _, held = train_heldout_split(records, heldout=n, seed=seed)
        labelled = hasattr(records[0], "label")
        return held, ("balanced per label" if labelled else "random") + f", seed {seed}"
    except ValueError:
        order = np.random.default_rng(seed).permutation(len(records))[:n]
        return [records[int(i)] for i in order], f"random, seed {seed} (too few rows for a balanced sample)"


def _label_task(task: str, records: Sequence, data_path: str) -> tuple[str, str | None, Path | None]:
    """(task string for ensure_artifact, data file for it, temp file to delete). labels=auto
    becomes the data's label list, so the artifact does not depend on how the file is read."""
    from .data import label_set, label_targets, write_jsonl
    from .data.records import Example
    from .export.specs import parse_task

    spec = parse_task(task)
    if not spec.auto_labels:
        label_targets(records, spec.labels)  # DataError naming the first row with an unknown label
        return task, None, None
    labels = label_set(records)
    if len(labels) < 2:
        raise ZeroShotError(f"{data_path}: the data holds {len(labels)} label(s) {labels}; "
                            "classification needs >= 2")
    if all(lab and "," not in lab and "=" not in lab and lab == lab.strip() for lab in labels):
        return "classify:labels=" + ",".join(labels), None, None
    # Labels the spec grammar cannot carry: let the exporter read them from a plain copy.
    fh = tempfile.NamedTemporaryFile("w", suffix=".jsonl", prefix="edgefed-zero-shot-", delete=False)
    fh.close()
    tmp = Path(fh.name)
    write_jsonl(tmp, [Example(r.text, r.label) for r in records])
    return task, str(tmp), tmp


def _check_model(name: str) -> None:
    from .models import REGISTRY

    if name in REGISTRY:
        return
    p = Path(name).expanduser()
    if not (p.is_dir() and (p / "config.json").is_file()):
        raise ZeroShotError(f"unknown model {name!r}: not one of {sorted(REGISTRY)} and not a "
                            "directory containing config.json")


# ---------------------------------------------------------------------------- scoring

def _eos_text(dm) -> str:
    eos = dm.manifest.get("eos_token_id")
    if eos is None:
        return ""
    return dm.tokenizer.id_to_token(int(eos)) or dm.tokenizer.decode([int(eos)], skip_special_tokens=False)


def _check_generation_room(task, rows: Sequence, c: Candidate, seq_len: int) -> None:
    """Greedy generation (SFTTask.generate) keeps min(48, limit // 2) tokens free for the answer."""
    room = min(_MAX_NEW_TOKENS, task.limit // 2)
    for r, (head, _text, tail) in zip(rows, task.pieces(rows)):
        if len(head) + len(tail) + room > task.limit:
            raise ZeroShotError(
                f"{c.where}: --generate-n needs {room} free tokens to generate into, but this template's "
                f"wrappers take {len(head) + len(tail)} of the {task.limit} for {r.origin or 'a row'}: "
                f"raise --seq-len (now {seq_len}) or lower --generate-n to 0")


def _make_tasks(dm, candidates: Sequence[Candidate], sample: Sequence, seq_len: int,
                generate_n: int = 0) -> list:
    """One task per candidate, each checked against the sample (room for text, rows that fit)
    before any scoring starts. Returns [(task, n truncated rows)]."""
    from .tasks import PromptFormat, TooLong, make_task

    base = dm.manifest["task"]
    kind = base["kind"]
    eos = dm.manifest.get("eos_token_id")
    eos = None if eos is None else int(eos)
    limit = min(dm.seq_len, dm.max_seq_len)
    out = []
    for c in candidates:
        if kind == "classify":
            spec = {**base, "template": c.template}
        elif c.template is None:
            spec = dict(base)
        else:
            fmt = PromptFormat(template=c.template, assistant_prefix="", response_suffix=_eos_text(dm))
            spec = {**base, "format": fmt.to_dict()}
        try:
            task = make_task(spec, dm.tokenizer, dm.pad_id, limit, eos)
            truncated = task.validate(sample)["truncated"]
            if kind == "sft" and generate_n > 0:
                _check_generation_room(task, sample[:generate_n], c, seq_len)
        except TooLong as exc:
            raise ZeroShotError(f"{c.where}: with this template {exc} (--seq-len {seq_len})") from None
        except ValueError as exc:
            raise ZeroShotError(f"{c.where}: {exc} (--seq-len {seq_len})") from None
        out.append((task, truncated))
    return out


def _dpo_scores(dm, records: Sequence, batch_size: int) -> dict:
    """The base model's own preference under this prompt: sum log p(chosen) vs sum log p(rejected).
    (The DPO loss and reward margin are log 2 and 0 for every template before training: the
    reference is the model itself.)"""
    from .metrics import preference_metrics

    lps = []
    for a in range(0, len(records), batch_size):
        out = dm.run(dm.task.encode_rows(records[a:a + batch_size]))
        lps.append(out["seq_logps"].astype(np.float64))
    lp = np.concatenate(lps)
    m = lp[0::2] - lp[1::2]
    pm = preference_metrics(m)
    return {"n": len(records), "preference_accuracy": pm["accuracy"],
            "preference_accuracy_ci": [pm["accuracy_ci_low"], pm["accuracy_ci_high"]],
            "logp_margin": pm["mean_margin"], "logp_margin_ci": [pm["margin_ci_low"], pm["margin_ci_high"]],
            "ties": pm["ties"], "correct": m > 0, "margins": m}


def _score(dm, kind: str, sample: Sequence, batch_size: int, generate_n: int) -> dict:
    if kind == "dpo":
        return _dpo_scores(dm, sample, batch_size)
    if kind == "sft":
        return dm.evaluate(sample, batch_size, generate_n=generate_n)
    res = dm.evaluate(sample, batch_size)
    counts = np.bincount(np.asarray(res["predictions"], dtype=np.int64), minlength=len(dm.labels))
    top = int(counts.argmax())
    res["top_prediction"] = {"label": dm.labels[top], "share": float(counts[top] / max(len(sample), 1))}
    res["prediction_counts"] = {lab: int(c) for lab, c in zip(dm.labels, counts)}
    return res


def _sort_key(kind: str):
    if kind == "classify":
        return lambda r: (-r["accuracy"], -r["macro_f1"], r["loss"])
    if kind == "sft":
        return lambda r: (r["loss"],)
    return lambda r: (-r["preference_accuracy"], -r["logp_margin"])


def _vs_best(kind: str, best: dict, row: dict) -> dict:
    """Paired difference row - best on the same examples, with a 95% interval."""
    from .metrics import paired_gain, paired_mean_gain

    if kind == "sft":
        g = paired_mean_gain(best["example_loss"], row["example_loss"])
        return {"metric": "loss", "diff": g["gain"], "ci": [g["ci_low"], g["ci_high"]]}
    g = paired_gain(best["correct"], row["correct"])
    name = "accuracy" if kind == "classify" else "preference_accuracy"
    return {"metric": name, "diff": g["gain"], "ci": [g["ci_low"], g["ci_high"]]}


# ---------------------------------------------------------------------------- output

def _pct(x: float) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def _ci(ci, scale: float = 1.0, fmt: str = "{:.1f}") -> str:
    lo, hi = ci
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "[n/a]"
    return "[" + fmt.format(lo * scale) + ", " + fmt.format(hi * scale) + "]"


def _vs_cell(kind: str, v: dict | None) -> str:
    if v is None:
        return "best"
    if kind == "sft":
        return f"{v['diff']:+.3f} {_ci(v['ci'], 1.0, '{:+.3f}')}"
    return f"{100 * v['diff']:+.1f} {_ci(v['ci'], 100.0, '{:+.1f}')}"


def format_table(rows: list[dict], kind: str, generate_n: int = 0) -> str:
    if kind == "classify":
        head = ["#", "accuracy [95% CI]", "macro-F1 [95% CI]", "loss", "vs best, pts [95% CI]",
                "most predicted", "truncated", "template"]
        body = [[str(r["rank"]), f"{_pct(r['accuracy'])} {_ci(r['accuracy_ci'], 100.0)}",
                 f"{r['macro_f1']:.3f} {_ci(r['macro_f1_ci'], 1.0, '{:.3f}')}", f"{r['loss']:.4f}",
                 _vs_cell(kind, r["vs_best"]),
                 f"{r['top_prediction']['label']} {_pct(r['top_prediction']['share'])}",
                 str(r["truncated"]), r["shown"]] for r in rows]
    elif kind == "sft":
        head = ["#", "loss", "perplexity", "vs best, loss [95% CI]"]
        head += ["ROUGE-L [95% CI]", "exact match"] if generate_n > 0 else []
        head += ["truncated", "template"]
        body = []
        for r in rows:
            line = [str(r["rank"]), f"{r['loss']:.4f}", f"{r['perplexity']:.2f}", _vs_cell(kind, r["vs_best"])]
            if generate_n > 0:
                line += [f"{r['rouge_l']:.3f} {_ci(r['rouge_l_ci'], 1.0, '{:.3f}')}", _pct(r["exact_match"])]
            body.append(line + [str(r["truncated"]), r["shown"]])
    else:
        head = ["#", "preference acc. [95% CI]", "log-prob margin [95% CI]", "vs best, pts [95% CI]",
                "truncated", "template"]
        body = [[str(r["rank"]), f"{_pct(r['preference_accuracy'])} {_ci(r['preference_accuracy_ci'], 100.0)}",
                 f"{r['logp_margin']:+.3f} {_ci(r['logp_margin_ci'], 1.0, '{:+.3f}')}",
                 _vs_cell(kind, r["vs_best"]), str(r["truncated"]), r["shown"]] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt_row = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    lines = [fmt_row(head), fmt_row(["-" * w for w in widths])] + [fmt_row(b) for b in body]
    return "\n".join(lines)


def _sh(s: str) -> str:
    import shlex
    return shlex.quote(s)


def export_command(model: str, task: str, kind: str, template: str | None, data: str,
                   field_args: list[str]) -> str:
    """The `edgefed export` line that builds this candidate's artifact."""
    parts = ["edgefed export", f"--model {_sh(model)}", f"--trainable {TRAINABLE}", f"--task {_sh(task)}"]
    if "labels=auto" in task.replace(" ", ""):
        parts += [f"--data {_sh(data)}", *field_args]
    if template is not None:
        parts.append("--template '" + _escape(template).replace("'", "'\"'\"'") + "'")
    parts.append(f"--out artifacts/{Path(model).name}-{kind}")
    return " ".join(parts)


def _field_args(args: argparse.Namespace) -> list[str]:
    """The non-default data options, to repeat on the export line (its --data is read again)."""
    from dataclasses import asdict

    from .data_args import fields_from_args

    out = []
    for name, value in asdict(fields_from_args(args)).items():
        if value:
            out.append(f"--data-split {_sh(value)}" if name == "split" else f"--{name}-field {_sh(value)}")
    return out


_DROP = {"predictions", "targets", "correct", "example_loss", "example_rouge_l", "margins", "samples"}


def _jsonable(x):
    return plain({k: v for k, v in x.items() if k not in _DROP} if isinstance(x, dict) else x)


def _int_at_least(lo: int):
    def check(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            v = None
        if v is None or v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {s!r}")
        return v
    return check


_positive, _non_negative = _int_at_least(1), _int_at_least(0)


def add_zero_shot_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .data_args import add_field_args
    from .export.specs import TASK_HELP

    p.description = ("Score candidate prompt templates with the base model on a seeded held-out "
                     "sample, before training, and print the `edgefed export` line for the best.")
    p.add_argument("--data", required=True, help="the task's data (JSONL, CSV, TSV, Parquet, datasets dir)")
    p.add_argument("--task", required=True, help=f"task spec: {TASK_HELP} (lm takes no template)")
    p.add_argument("--templates", required=True, metavar="FILE",
                   help=r"candidates, one per line (\n = newline; blank lines and '# ...' comments "
                        "skipped; '##...' lines are templates), or a JSON list in a .json file. "
                        "classify: exactly {text}; sft/dpo: {instruction} [and {input}], or the word "
                        "'chat' for the tokenizer's own chat template")
    p.add_argument("--model", default="smollm2-135m", help="registry name (smollm2-135m, tiny) or a model dir")
    p.add_argument("--n", type=_positive, default=200, help="held-out rows to score on (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="held-out sample seed (default %(default)s)")
    p.add_argument("--threads", type=_positive, default=2, help="ONNX Runtime threads (default %(default)s)")
    p.add_argument("--seq-len", type=_positive, default=64,
                   help="tokens per row, as on the devices (default %(default)s: device_configs/)")
    p.add_argument("--batch-size", type=_positive, default=None, help="evaluation batch (default 32, dpo 16)")
    p.add_argument("--generate-n", type=_non_negative, default=0,
                   help="sft: also greedy-generate this many rows for ROUGE-L / exact match (slow)")
    p.add_argument("--json", default=None, metavar="OUT", help="write every row (and the best) as JSON")
    p.add_argument("--no-progress", action="store_true")
    add_field_args(p)
    return p


def run_zero_shot(args: argparse.Namespace) -> int:
    tmp: list[Path] = []
    try:
        return _run(args, tmp)
    except ZeroShotError as exc:
        print(f"edgefed zero-shot: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:  # DataError is a ValueError
        if getattr(args, "verbose", False):
            log.exception("zero-shot failed")
        print(f"edgefed zero-shot: {exc}", file=sys.stderr)
        return 2
    finally:
        for p in tmp:
            p.unlink(missing_ok=True)


def _run(args: argparse.Namespace, tmp: list[Path]) -> int:
    from tqdm import tqdm

    if not getattr(args, "verbose", False):
        logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score's INFO chatter

    from .data import read_records
    from .data_args import fields_from_args
    from .export.specs import parse_task

    try:
        kind = parse_task(args.task).kind
    except ValueError as exc:
        raise ZeroShotError(str(exc)) from None
    if kind not in _PLACEHOLDERS:
        raise ZeroShotError(f"task {kind} trains on the raw text and takes no template: nothing to compare")
    candidates = read_templates(args.templates, kind)  # all checked before any model work
    _check_model(args.model)
    records = read_records(args.data, kind, fields_from_args(args))
    sample, how = held_out_sample(records, args.n, args.seed)
    export_task, export_data = args.task, None
    if kind == "classify":
        export_task, export_data, t = _label_task(args.task, records, args.data)
        if t is not None:
            tmp.append(t)

    from .export.cache import ensure_artifact
    from .runtime import DeviceModel

    t0 = time.time()
    art = ensure_artifact(args.model, TRAINABLE, export_task, template=None, data=export_data,
                          progress=not args.no_progress)
    dm = DeviceModel(art, threads=args.threads, seq_len=args.seq_len, check_memory=False)
    export_s = time.time() - t0
    tasks = _make_tasks(dm, candidates, sample, args.seq_len, args.generate_n)
    batch = args.batch_size or (16 if kind == "dpo" else 32)

    print(f"zero-shot: {len(candidates)} template(s) on {len(sample)} held-out rows of {args.data} "
          f"({how}); model {args.model}, task {kind}"
          + (f" {dm.labels}" if kind == "classify" else "") + f", seq_len {min(dm.seq_len, dm.max_seq_len)}",
          file=sys.stderr)
    rows: list[dict] = []
    bar = tqdm(list(zip(candidates, tasks)), desc="templates", unit="template", file=sys.stderr,
               disable=args.no_progress)
    for c, (task, truncated) in bar:
        dm.task = task
        t1 = time.time()
        res = _score(dm, kind, sample, batch, args.generate_n)
        rows.append({**res, "template": c.template, "chat": c.template is None, "source": c.where,
                     "shown": c.shown, "truncated": int(truncated), "seconds": round(time.time() - t1, 2)})
    bar.close()

    rows.sort(key=_sort_key(kind))  # stable: file order breaks ties
    best = rows[0]
    for i, r in enumerate(rows, 1):
        r["rank"] = i
        r["vs_best"] = None if r is best else _vs_best(kind, best, r)
    cmd = export_command(args.model, args.task, kind, best["template"], args.data, _field_args(args))

    print(format_table(rows, kind, args.generate_n))
    if kind == "classify":
        what = f"accuracy {_pct(best['accuracy'])}, macro-F1 {best['macro_f1']:.3f}"
    elif kind == "sft":
        what = f"loss {best['loss']:.4f}, perplexity {best['perplexity']:.2f}"
    else:
        what = f"preference accuracy {_pct(best['preference_accuracy'])}"
    print(f"\nbest: {best['shown']} ({best['source']}; {what})")
    if len(rows) > 1:
        second = rows[1]["vs_best"]
        lo, hi = second["ci"]
        if math.isfinite(lo) and math.isfinite(hi) and lo <= 0 <= hi:
            print("note: the runner-up is within noise of the best (its paired 95% interval includes 0); "
                  "a larger --n separates them")
    print(f"export it with:\n  {cmd}")
    if any(r["truncated"] for r in rows):
        print(f"note: 'truncated' rows had their text cut to fit --seq-len {args.seq_len}", file=sys.stderr)

    if args.json:
        out = {"model": args.model, "task": args.task, "kind": kind, "data": args.data, "n": len(sample),
               "sample": how, "seed": args.seed, "seq_len": min(dm.seq_len, dm.max_seq_len),
               "trainable": TRAINABLE, "artifact": str(art), "export_seconds": round(export_s, 2),
               "labels": dm.labels if kind == "classify" else None,
               "rows": [_jsonable({k: v for k, v in r.items() if k != "shown"}) for r in rows],
               "best": {"template": best["template"], "source": best["source"], "export_command": cmd}}
        p = Path(args.json)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"rows written to {p}", file=sys.stderr)
    return 0
