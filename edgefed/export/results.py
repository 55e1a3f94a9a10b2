"""A job's trained trainables out in the ecosystem's formats (host side, torch + peft):

- `peft`: a PEFT adapter folder (`save_pretrained`: adapter_config.json + adapter_model.safetensors)
  for LoRA or soft-prompt artifacts, loadable with `PeftModel.from_pretrained(base, DIR)`;
- `merged`: a transformers checkpoint with the LoRA product merged into the base weights (or the
  full fine-tuned weights), loadable with `AutoModelForCausalLM.from_pretrained(DIR)`;
- `onnx`: a new EdgeFed artifact whose initial trainables are the trained ones (devices start a
  next job, or serve, from it).

The trainables come from a device's `--checkpoint` (raw float32 + JSON sidecar) or from the
server's store: the global model is rebuilt from the artifact and the stored round deltas with
the method's own apply_delta, the same bits every replica holds.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from .artifact import FILES, read_manifest, read_trainable, sha256_file, trainable_views, write_trainable

__all__ = ["trainables_from_store", "trainables_from_checkpoint", "export_peft", "export_merged",
           "export_onnx_artifact", "FORMATS"]

FORMATS = ("peft", "merged", "onnx")


def trainables_from_store(db: str | Path, job: str, artifact: str | Path | None = None) -> tuple[np.ndarray, dict]:
    """(global trainables after every closed round, info) rebuilt from a server store."""
    from edgefed_server.store import Store

    from ..methods import get_method
    from ..replica import TrainablesReplica

    with Store(db) as store:
        cfg = store.load_job(job)
        if cfg is None:
            raise ValueError(f"job {job!r} is not in {db} (jobs there: {', '.join(store.job_ids()) or 'none'})")
        art = Path(artifact or cfg.artifact)
        rounds = store.closed_rounds(job)
        deltas = store.load_deltas(job, 0, len(rounds) - 1) if rounds else []
    pparams = {**cfg.params, "k": cfg.k, "seed_pool_id": cfg.seed_pool_id, "dist": cfg.params.get("dist", "normal")}
    rep = TrainablesReplica(art, get_method(cfg.method).client(), pparams)
    rep.rebuild(deltas)
    return rep.params.copy(), {"job": job, "method": cfg.method, "rounds": rep.rounds, "artifact": str(art),
                               "digest": rep.digest()}


def trainables_from_checkpoint(path: str | Path, artifact: str | Path) -> tuple[np.ndarray, dict]:
    """(trainables, sidecar) from a device's --checkpoint, checked against the artifact."""
    from ..runtime import read_checkpoint

    return read_checkpoint(path, int(read_manifest(artifact)["n_trainable"]))


def _load_base(manifest: dict, base_model):
    from ..models import load_model

    return load_model(base_model or manifest.get("base_model") or manifest["model"])


def export_peft(artifact: str | Path, params: np.ndarray, out: str | Path, base_model=None) -> Path:
    """A PEFT adapter of the trained LoRA factors or soft prompt; checked by loading it back with
    peft and comparing the logits with the artifact's own graph at the same trainables."""
    import torch
    from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model

    from .specs import parse_trainable

    m = read_manifest(artifact)
    ts = parse_trainable(m["trainable_spec"])
    if ts.mode in ("full", "norms", "offsite"):
        raise ValueError(f"a {ts.mode} fine-tune has no PEFT adapter: export --format merged")
    views = trainable_views(params.astype(np.float32), m)
    lm, tok = _load_base(m, base_model)
    if ts.mode == "lora":
        cfg = LoraConfig(r=ts.r, lora_alpha=ts.alpha, target_modules=list(ts.targets), lora_dropout=0.0,
                         bias="none", task_type=TaskType.CAUSAL_LM)
        pm = get_peft_model(lm, cfg)
        own = dict(pm.named_parameters())
        with torch.no_grad():
            for name, v in views.items():  # "model.layers.0.self_attn.q_proj.lora_A"
                key = f"base_model.model.{name}.default.weight"
                if key not in own or tuple(own[key].shape) != v.shape:
                    raise ValueError(f"peft has no parameter {key} of shape {v.shape}: targets differ")
                own[key].copy_(torch.from_numpy(v))
    else:
        cfg = PromptTuningConfig(num_virtual_tokens=ts.tokens, task_type=TaskType.CAUSAL_LM)
        pm = get_peft_model(lm, cfg)
        with torch.no_grad():
            pm.prompt_encoder["default"].embedding.weight.copy_(torch.from_numpy(views["soft_prompt"]))
    out = Path(out)
    pm.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "edgefed.json").write_text(json.dumps({"artifact": str(artifact), "trainable_spec": m["trainable_spec"],
                                                  "task": m["task"]}, indent=1))
    return out


def plugged_name(name: str, offsite: dict) -> str:
    """An emulator parameter name ("model.layers.3.mlp.up_proj.weight") -> the full model's
    ("model.layers.29.mlp.up_proj.weight"): offsite-tuning plugs the adapter back in."""
    parts = name.split(".")
    i = parts.index("layers")
    parts[i + 1] = str(offsite["kept"][int(parts[i + 1])])
    return ".".join(parts)


def export_merged(artifact: str | Path, params: np.ndarray, out: str | Path, base_model=None) -> Path:
    """A transformers checkpoint: LoRA merged into the base weights (W + alpha/r B A), the full
    fine-tuned weights, or an offsite-tuned adapter plugged into the full model (not the emulator)."""
    import torch

    from .specs import parse_trainable

    m = read_manifest(artifact)
    ts = parse_trainable(m["trainable_spec"])
    if ts.mode == "prompt":
        raise ValueError("a soft prompt cannot be merged into weights: export --format peft")
    views = trainable_views(params.astype(np.float32), m)
    lm, tok = _load_base(m, base_model)
    own = dict(lm.named_parameters())
    with torch.no_grad():
        if ts.mode in ("full", "norms"):
            for name, v in views.items():
                own[name].copy_(torch.from_numpy(v))
        elif ts.mode == "offsite":  # plug the adapter layers into the full model (offsite-tuning)
            for name, v in views.items():
                own[plugged_name(name, m["offsite"])].copy_(torch.from_numpy(v))
        else:
            scale = ts.alpha / ts.r
            for name in {n.rsplit(".", 1)[0] for n in views}:
                a = torch.from_numpy(views[f"{name}.lora_A"]).double()
                b = torch.from_numpy(views[f"{name}.lora_B"]).double()
                w = own[f"{name}.weight"]
                w.copy_((w.double() + scale * (b @ a)).to(w.dtype))
    out = Path(out)
    lm.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def export_onnx_artifact(artifact: str | Path, params: np.ndarray, out: str | Path, info: dict | None = None) -> Path:
    """The same graph with the trained trainables as its initial ones (a new artifact id)."""
    src, out = Path(artifact), Path(out)
    m = read_manifest(src)
    if params.size != int(m["n_trainable"]):
        raise ValueError(f"{params.size} trainables for an artifact of {m['n_trainable']}")
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new folder")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in (FILES["onnx"], FILES["tokenizer"]):
        shutil.copy2(src / f, tmp / f)
    for extra in src.iterdir():  # external weights of large graphs
        if extra.name.endswith(".onnx.data") or extra.suffix == ".data":
            shutil.copy2(extra, tmp / extra.name)
    write_trainable(tmp / FILES["trainable"], [params.astype(np.float32)])
    m = dict(m)
    m["sha256"] = {f: sha256_file(tmp / f) for f in FILES.values()}
    m["trained_from"] = {"artifact": str(src), **(info or {})}
    (tmp / "manifest.json").write_text(json.dumps(m, indent=1))
    read_trainable(tmp, m)  # the size check
    tmp.rename(out)
    return out


def add_export_result_args(p) -> None:
    p.add_argument("--artifact", default=None, help="the job's artifact (default: the one the store names)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--db", help="the server's store (edgefed server --db): rebuild the global model of --job")
    src.add_argument("--checkpoint", help="a device's --checkpoint file (raw float32 + .json sidecar)")
    p.add_argument("--job", help="with --db: the job id")
    p.add_argument("--format", choices=FORMATS, required=True,
                   help="peft: PEFT adapter (LoRA / soft prompt); merged: transformers checkpoint with the "
                        "adapter merged (LoRA / full); onnx: an EdgeFed artifact starting from the trained model")
    p.add_argument("--out", required=True, help="a new folder")
    p.add_argument("--base-model", default=None, help="peft / merged: the base checkpoint (default: the "
                   "artifact's base_model)")


def run_export_result(args) -> int:
    import sys

    try:
        if args.db:
            if not args.job:
                raise ValueError("--db needs --job")
            params, info = trainables_from_store(args.db, args.job, args.artifact)
            artifact = args.artifact or info["artifact"]
        else:
            if not args.artifact:
                raise ValueError("--checkpoint needs --artifact")
            params, info = trainables_from_checkpoint(args.checkpoint, args.artifact)
            artifact = args.artifact
        if args.format == "peft":
            out = export_peft(artifact, params, args.out, args.base_model)
        elif args.format == "merged":
            out = export_merged(artifact, params, args.out, args.base_model)
        else:
            out = export_onnx_artifact(artifact, params, args.out, info)
    except (ValueError, OSError, KeyError) as e:
        print(f"edgefed export-result: {e}", file=sys.stderr)
        return 2
    print(f"{args.format} -> {out} ({params.size:,} trainables"
          + (f", job {info['job']} after {info['rounds']} rounds" if "rounds" in info else "") + ")", file=sys.stderr)
    return 0
