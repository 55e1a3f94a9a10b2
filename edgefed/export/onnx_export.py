"""Causal LM -> EdgeFed ONNX artifact whose trainable tensors are graph inputs.

The device runtime perturbs/updates the flat trainable buffer in place and feeds its views
as inputs; frozen weights stay initializers (optionally int8 via dynamic quantisation).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from . import artifact as art
from . import quantize as quant
from .adapters import ExportWrapper, lora_patched, make_core, make_emulator
from .specs import DEFAULT_TEMPLATE, TaskSpec, TrainableSpec, default_prompt_init, parse_task, parse_trainable

__all__ = ["export_artifact"]

# Two batches of different shape: tracing on one and verifying on the other catches
# shapes that were baked into the graph instead of staying dynamic.
_SAMPLES = [
    "A gorgeous, witty, seductive movie.",
    "Meandering and glacially paced, and often just plain dull.",
    "The performances are strong, but the script never finds its footing.",
    "An utterly charming comedy that earns every one of its laughs.",
]
_TRACE_IDX, _VERIFY_IDX = [0, 2], [1, 3, 0]
_QUANT_RTOL = 0.1  # quantised frozen weights: the loss moves by a few per cent


def _log(msg: str) -> None:
    print(f"[edgefed.export] {msg}", file=sys.stderr, flush=True)


def _resolve_model(model, tokenizer, model_name):
    if isinstance(model, (str, os.PathLike)):
        from edgefed.models import load_model

        name = str(model)
        model, loaded_tok = load_model(name)
        return model, tokenizer or loaded_tok, model_name or Path(name).name
    if tokenizer is None:
        from transformers import AutoTokenizer

        src = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
        if not src or not Path(src).is_dir():
            raise ValueError("pass tokenizer= (the model has no local name_or_path to load it from)")
        tokenizer = AutoTokenizer.from_pretrained(src)
    name = model_name or Path(getattr(model, "name_or_path", "") or "model").name
    return model, tokenizer, name


def _source_dir(model) -> str:
    src = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    return str(Path(src).resolve()) if src and Path(src).is_dir() else ""


def _plain_backend(tokenizer):
    """The `tokenizers` object devices will use, without HF padding/truncation settings."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    tok.no_padding()
    tok.no_truncation()
    return tok


@contextlib.contextmanager
def _eager_eval(model):
    """Eager attention (SDPA with GQA does not trace) and eval mode, restored afterwards."""
    prev_attn = getattr(model.config, "_attn_implementation", None)
    was_training = model.training
    if prev_attn != "eager":
        model.set_attn_implementation("eager")
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
        if prev_attn not in (None, "eager"):
            model.set_attn_implementation(prev_attn)


def _sample_records(task: dict, idx) -> list:
    """Rows of the task's own record type, so the check batches go through the device's encoder."""
    from edgefed.data.records import Example, PreferencePair, SFTExample

    kind, texts = task["kind"], [_SAMPLES[i] for i in idx]
    if kind == "classify":
        labels = task["labels"]
        return [Example(t, labels[i % len(labels)]) for i, t in enumerate(texts)]
    if kind == "lm":
        return [Example(t, "") for t in texts]
    if kind == "sft":
        return [SFTExample("Summarise this review in one word.", t.split()[1], input=t if i % 2 else "",
                           system="Be brief." if i == 2 else "",
                           history=(("user", "Hello"), ("assistant", "Hi!")) if i == 1 else ())
                for i, t in enumerate(texts)]
    return [PreferencePair(f"Write a review like: {t}", t, _SAMPLES[(j + 1) % len(_SAMPLES)])
            for j, t in zip(idx, texts)]


def _batch(tok, task: dict, pad_id: int, eos_id: int, idx) -> list[np.ndarray]:
    """Graph inputs in order, built exactly as a device builds them (edgefed.tasks)."""
    from edgefed.tasks import make_task

    b = make_task(task, tok, pad_id, 512, eos_id).encode(_sample_records(task, idx))
    feeds = [b.input_ids, b.attention_mask, b.targets]
    if task["kind"] == "dpo":  # any reference values exercise the graph's use of them
        feeds.append(np.linspace(-30.0, -5.0, b.input_ids.shape[0], dtype=np.float32))
    return feeds


def _label_token_ids(tok, labels) -> list[list[int]]:
    """Each label word's tokens as they follow the prompt (a space, then the label)."""
    seqs = []
    for lab in labels:
        enc = tok.encode(" " + lab, add_special_tokens=False).ids
        if not enc:
            raise ValueError(f"label {lab!r} tokenises to nothing")
        seqs.append(enc)
    seen: dict[tuple, str] = {}
    for lab, s in zip(labels, seqs):
        if tuple(s) in seen:
            raise ValueError(f"labels {seen[tuple(s)]!r} and {lab!r} tokenise identically ({s}); rename one")
        seen[tuple(s)] = lab
    return seqs


def _task_entry(tk: TaskSpec, tok, hf_tokenizer, template: str | None, data, fields) -> dict:
    """The manifest's "task" entry: everything a device needs to build batches for the graph."""
    from edgefed.tasks.prompt_format import check_template, derive_chat_format

    if tk.kind == "classify":
        labels = list(tk.labels)
        if tk.auto_labels or data is not None:
            records = _records(data, "classify", fields)
            if tk.auto_labels:
                from edgefed.data import label_set
                labels = label_set(records)
                if len(labels) < 2:
                    raise ValueError(f"{data}: the data holds {len(labels)} label(s) {labels}; need >= 2")
            else:
                from edgefed.data import label_targets
                label_targets(records, labels)  # refuses labels the data has and the spec lacks
        template = DEFAULT_TEMPLATE if template is None else template
        check_template(template, {"text"}, {"text"}, "classify --template")
        return {"kind": "classify", "labels": labels, "label_token_ids": _label_token_ids(tok, labels),
                "template": template}
    if tk.kind == "lm":
        if template is not None:
            raise ValueError("task lm trains on the raw text: it takes no --template")
        return {"kind": "lm"}
    entry = {"kind": tk.kind, "format": derive_chat_format(hf_tokenizer, template).to_dict()}
    if tk.kind == "dpo":
        entry["beta"] = tk.beta
    return entry


def _records(data, kind: str, fields):
    if isinstance(data, (str, os.PathLike)):
        from edgefed.data import read_records
        return read_records(data, kind, fields)
    if data is None:
        raise ValueError("classify:labels=auto reads the label set from the data: pass --data FILE")
    return list(data)


def _soft_prompt_init(tok, model, n_tokens: int, text: str) -> torch.Tensor:
    ids = tok.encode(text, add_special_tokens=False).ids
    if not ids:
        raise ValueError(f"prompt_init {text!r} has no tokens: give the soft prompt a starting text "
                         "(an instruction for your task)")
    ids = (ids * (n_tokens // len(ids) + 1))[:n_tokens]  # truncate or repeat
    emb = model.get_input_embeddings().weight
    return emb.detach()[torch.tensor(ids)].clone().float()


def _trainables(core: torch.nn.Module, ts: TrainableSpec, lora_wrappers, offsite: dict | None = None
                ) -> list[tuple[str, str]]:
    """[(graph input name, parameter path inside core)] in manifest order."""
    if ts.mode == "offsite":  # the adapter layers' parameters, named as in the emulator
        dec = core.lm.get_decoder()
        dec_path = next(p for p, m in core.lm.named_modules() if m is dec)
        prefixes = tuple(f"lm.{dec_path}.layers.{j}." for j in offsite["emulator_adapter"])
        return [(p[len("lm."):], p) for p, _ in core.named_parameters() if p.startswith(prefixes)]
    if ts.mode == "full":
        # named_parameters() drops duplicates, so tied lm_head/embed_tokens is one tensor.
        return [(p[len("lm."):], p) for p, _ in core.named_parameters() if p.startswith("lm.")]
    if ts.mode == "norms":
        found = [(p[len("lm."):], p) for p in _norm_gains(core.lm)]
        if not found:
            raise ValueError("trainable 'norms': this model has no normalisation layer with a gain (weight)")
        return found
    if ts.mode == "lora":
        return [(f"{m}.{ab}", f"lm.{m}.{ab}") for m in lora_wrappers for ab in ("lora_A", "lora_B")]
    return [("soft_prompt", "soft_prompt")]


def _norm_gains(lm: torch.nn.Module) -> list[str]:
    """"lm.<module path>.weight" of every normalisation layer with a gain, in model order: torch's
    LayerNorm / RMSNorm and transformers' own (LlamaRMSNorm, ...), found by class name."""
    return [f"lm.{path}.weight" for path, mod in lm.named_modules()
            if isinstance(getattr(mod, "weight", None), torch.nn.Parameter) and mod.weight.dim() == 1
            and "norm" in type(mod).__name__.lower()]


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def export_artifact(model, out_dir, trainable: str = "full", task: str = "lm",
                    template: str | None = None, quantize_frozen: bool | str = False,
                    opset: int = 17, progress: bool = True, *, tokenizer=None,
                    model_name: str | None = None, prompt_init: str | None = None,
                    seed: int = 0, data=None, fields=None) -> Path:
    """Export `model` (a transformers causal LM, or a registry name / model dir) to an
    EdgeFed artifact folder and check ONNX Runtime's loss against torch's. Returns out_dir.

    quantize_frozen: False | True (= "int8") | "int8" | "dynamic-int8" (see
    export/quantize.py: only the weight-only methods keep the loss smooth for ZO training).
    prompt_init: prompt mode: the text whose token embeddings the soft prompt starts from (cut
    or repeated to its length); default: an instruction built from the task's labels
    (specs.default_prompt_init).
    template: classify: a format string with {text} (default DEFAULT_TEMPLATE); sft / dpo: with
    {instruction} [and {input}], replacing the tokenizer's chat template; lm: none.
    data: a data file (or records) of the task: classify:labels=auto reads its label set from
    it, and fixed labels are checked against it.
    """
    from tqdm import tqdm

    ts, tk = parse_trainable(trainable), parse_task(task)
    qmethod = quant.normalize(quantize_frozen)
    if qmethod and ts.mode == "full":
        raise ValueError("quantize_frozen needs a frozen part: use lora or prompt mode")
    base_model = str(model) if isinstance(model, (str, os.PathLike)) else _source_dir(model)
    model, tokenizer, model_name = _resolve_model(model, tokenizer, model_name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # written last: marks a complete artifact
    tok = _plain_backend(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
    task_entry = _task_entry(tk, tok, tokenizer, template, data, fields)
    stages = ["trace", "save", "verify"] + (["quantise", "verify-q"] if qmethod else [])
    bar = tqdm(total=len(stages), desc="export", unit="stage", disable=not progress, file=sys.stderr)
    t0 = time.time()

    with contextlib.ExitStack() as stack, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings from transformers are expected noise
        stack.callback(bar.close)  # an error then starts on its own line
        stack.enter_context(_eager_eval(model))
        wrappers = (stack.enter_context(lora_patched(model, ts.targets, ts.r, ts.alpha, seed))
                    if ts.mode == "lora" else {})
        if ts.mode == "prompt":
            prompt_init = default_prompt_init(task_entry) if prompt_init is None else prompt_init
            soft = _soft_prompt_init(tok, model, ts.tokens, prompt_init)
        else:
            soft = None
        lm, offsite = (make_emulator(model, ts.adapter, ts.drop) if ts.mode == "offsite" else (model, None))
        core = make_core(lm, task_entry, soft).eval()
        names, paths = zip(*_trainables(core, ts, wrappers, offsite))
        params = dict(core.named_parameters())
        init = [params[p].detach().clone().float() for p in paths]
        n_trainable = sum(t.numel() for t in init)
        n_frozen = sum(p.numel() for k, p in params.items() if k not in set(paths))
        wrapper = ExportWrapper(core, list(paths))
        from edgefed.tasks import TASKS
        io_names = ["input_ids", "attention_mask", "targets"] + (["ref_logps"] if tk.kind == "dpo" else [])
        out_names = list(TASKS[tk.kind].outputs)
        seq_axes = {0: "batch", 1: "seq"}
        dyn = {"input_ids": seq_axes, "attention_mask": seq_axes,
               "targets": {0: "batch"} if tk.kind == "classify" else seq_axes, "ref_logps": {0: "batch"}}
        dyn = {k: v for k, v in dyn.items() if k in io_names}
        dyn.update({o: {0: "batch"} for o in out_names[1:]})

        # -- trace
        bar.set_postfix_str("trace")
        tmp = Path(tempfile.mkdtemp(prefix=".export.", dir=out))
        stack.callback(shutil.rmtree, tmp, True)
        fp32_path = tmp / "model.fp32.onnx"
        tb = [torch.from_numpy(a) for a in _batch(tok, task_entry, pad_id, eos_id, _TRACE_IDX)]
        torch.onnx.export(wrapper, (*tb, *init), str(fp32_path), input_names=io_names + list(names),
                          output_names=out_names, dynamic_axes=dyn, opset_version=opset,
                          do_constant_folding=True, dynamo=False)
        bar.update()

        # -- save trainable.bin + tokenizer, torch reference loss on a differently shaped batch
        bar.set_postfix_str("save")
        layout = art.trainable_layout([(n, tuple(t.shape)) for n, t in zip(names, init)])
        art.write_trainable(out / art.FILES["trainable"], [t.numpy() for t in init])
        tok.save(str(out / art.FILES["tokenizer"]))
        vb = _batch(tok, task_entry, pad_id, eos_id, _VERIFY_IDX)
        vt = [torch.from_numpy(a) for a in vb]
        # Also check at perturbed trainables: LoRA B starts at zero, so the initial point
        # alone would not exercise the adapter path at all.
        gen = torch.Generator().manual_seed(seed + 1)
        pert = [t + 0.05 * (t.std() if t.numel() > 1 and t.std() > 0 else 1.0)
                * torch.randn(t.shape, generator=gen) for t in init]
        refs = [_as_numpy(wrapper(*vt, *init)), _as_numpy(wrapper(*vt, *pert))]
        bar.update()

        # -- verify fp32 graph, feeding the trainables read back from trainable.bin
        bar.set_postfix_str("verify")
        manifest_stub = {"n_trainable": n_trainable, "files": art.FILES, "trainable": layout}
        views = art.trainable_views(art.read_trainable(out, manifest_stub), manifest_stub)
        feeds = [dict(zip(io_names, vb)) | views,
                 dict(zip(io_names, vb)) | {n: t.numpy() for n, t in zip(names, pert)}]
        expected_inputs = io_names + list(names)
        final_path = fp32_path
        got = _check(fp32_path, feeds, refs, expected_inputs, rtol=1e-4)
        bar.update()

        if qmethod:
            bar.set_postfix_str("quantise")
            final_path = tmp / f"model.{qmethod}.onnx"
            quant.quantize(fp32_path, final_path, qmethod)
            bar.update()
            bar.set_postfix_str("verify-q")
            fp32_loss = float(got[0])
            got = _check(final_path, feeds, refs, expected_inputs, rtol=_QUANT_RTOL)
            _log(f"{qmethod} frozen part: onnx loss {float(got[0]):.6f} vs torch fp32 "
                 f"{float(refs[0][0]):.6f} (fp32 onnx {fp32_loss:.6f}); "
                 f"size {fp32_path.stat().st_size / 1e6:.1f} -> {final_path.stat().st_size / 1e6:.1f} MB")
            if qmethod == "dynamic-int8":
                _log("warning: dynamic-int8 re-quantises activations per batch; the loss jumps "
                     "under eps-sized perturbations, so use this artifact for evaluation, not ZO")
            bar.update()
        os.replace(final_path, out / art.FILES["onnx"])
    bar.close()

    manifest = {
        "format": art.FORMAT, "format_version": art.FORMAT_VERSION, "model": model_name,
        # where torch hosts load the frozen weights from (a registry name, or a local dir)
        "base_model": base_model,
        "trainable_mode": ts.mode, "trainable_spec": trainable,
        **({"offsite": offsite} if offsite else {}),
        **({"prompt_init": prompt_init} if ts.mode == "prompt" else {}),
        "task": task_entry, "task_spec": task,
        "inputs": io_names, "outputs": out_names,
        "trainable": layout, "n_trainable": int(n_trainable), "n_frozen": int(n_frozen),
        "opset": opset, "quantized_frozen": qmethod is not None,
        "pad_token_id": int(pad_id), "eos_token_id": int(eos_id),
        "max_seq_len": int(getattr(model.config, "max_position_embeddings", 2048)),
        "files": dict(art.FILES),
        "sha256": {f: art.sha256_file(out / f) for f in art.FILES.values()},
        "export_check": {"torch_loss": float(refs[0][0]), "onnx_loss": float(got[0]),
                         "abs_diff": float(abs(float(refs[0][0]) - float(got[0])))},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    _log(f"{model_name} [{ts.mode}, {tk.kind}] -> {out} in {time.time() - t0:.1f} s: "
         f"{n_trainable:,} trainable, {n_frozen:,} frozen, loss diff "
         f"{manifest['export_check']['abs_diff']:.2e}")
    return out


def _as_numpy(out) -> list[np.ndarray]:
    return [o.detach().numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _check(path: Path, feeds: list[dict], refs: list[list[np.ndarray]], expected_inputs,
           rtol: float) -> list[np.ndarray]:
    """Run ORT on each feed and compare with torch. The graph inputs must be exactly
    input_ids, attention_mask, targets + trainables in manifest order. Returns the first run."""
    sess = _session(path)
    graph_inputs = [i.name for i in sess.get_inputs()]
    if graph_inputs != list(expected_inputs):
        raise RuntimeError(f"graph inputs {graph_inputs[:6]}... differ from the expected "
                           f"{list(expected_inputs)[:6]}... (a trainable was unused or renamed)")
    atol = 1e-6 if rtol <= 1e-4 else 1e-2
    results = []
    for k, (feed, ref) in enumerate(zip(feeds, refs)):
        got = sess.run(None, feed)
        # int8 shifts all label logits of a row by a similar amount (softmax-invariant):
        # only the loss is a meaningful check there.
        pairs = list(zip(got, ref))[: 1 if rtol > 1e-3 else None]
        for i, (g, r) in enumerate(pairs):
            # label_logits are not averaged over the batch: a bit looser than the loss
            # ... and judged against their own scale: logits near 0 among logits of +-30 differ
            # by float32 reassociation (~1e-5 of the scale) between torch and ORT kernels
            scale = float(np.max(np.abs(r))) if np.size(r) else 0.0
            tol, at = (rtol, atol) if i == 0 else (max(rtol, 1e-3), max(10 * atol, 1e-5 * scale))
            if not np.allclose(g, r, rtol=tol, atol=at):
                what = sess.get_outputs()[i].name
                point = "initial" if k == 0 else "perturbed"
                raise RuntimeError(f"{path.name}: ONNX Runtime {what} {np.ravel(g)[:4]} != torch "
                                   f"{np.ravel(r)[:4]} at the {point} trainables (rtol {tol})")
        results.append(got)
    return results[0]
