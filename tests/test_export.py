"""Export tests on a tiny random Llama (fast). ONNX Runtime is compared with an independent
torch reference (plain HF forward with merged LoRA / inputs_embeds), not with the exporter's
own wrapper, at random values of the trainables."""
import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from edgefed.export import artifact as art  # noqa: E402
from edgefed.export import export_artifact, parse_task, parse_trainable  # noqa: E402
from edgefed.export.specs import DEFAULT_TEMPLATE  # noqa: E402

LORA = "lora:r=4,alpha=8,targets=q_proj,v_proj"  # scale 2
CLS = "classify:labels=positive,negative"
TEXTS = ["a gorgeous, witty film", "dull and far too long", "fine.", "the best movie of the year, by far",
         "a mess"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from edgefed.models import load_model, tiny_random_model

    d = tiny_random_model(tmp_path_factory.mktemp("tiny"), seed=0)
    model, tok = load_model(d)
    return d, model, tok


@pytest.fixture(scope="module")
def artifacts(tiny, tmp_path_factory):
    """Export each (trainable, task) combination once for the module."""
    d, model, tok = tiny
    root = tmp_path_factory.mktemp("art")
    out = {}
    for tr in ("full", "norms", LORA, "prompt:tokens=5"):
        for task in ("lm", CLS):
            key = (tr.split(":")[0], task.split(":")[0])
            out[key] = export_artifact(model, root / "-".join(key), tr, task, tokenizer=tok, progress=False)
    return out


def _batch(tokjson, manifest, texts):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokjson))
    cls = manifest["task"]["kind"] == "classify"
    if cls:
        texts = [manifest["task"]["template"].format(text=t) for t in texts]
    ids = [tok.encode(t).ids for t in texts]
    T = max(map(len, ids))
    x = np.full((len(ids), T), manifest["pad_token_id"], np.int64)
    m = np.zeros_like(x)
    for i, r in enumerate(ids):
        x[i, :len(r)], m[i, :len(r)] = r, 1
    y = np.arange(len(ids), dtype=np.int64) % 2 if cls else np.where(m == 1, x, -100)
    return x, m, y


def _reference_loss(model, manifest, views, x, m, y):
    """Plain transformers forward with the trainables applied the 'obvious' way."""
    model = copy.deepcopy(model)
    sd = dict(model.named_parameters())
    mode = manifest["trainable_mode"]
    prompt = None
    with torch.no_grad():
        if mode in ("full", "norms"):
            for name, v in views.items():
                sd[name].copy_(torch.from_numpy(v))
        elif mode == "lora":
            for name, v in views.items():
                if name.endswith(".lora_A"):
                    base = name[: -len(".lora_A")]
                    b = torch.from_numpy(views[base + ".lora_B"])
                    sd[base + ".weight"] += 2.0 * b @ torch.from_numpy(v)
        else:
            prompt = torch.from_numpy(views["soft_prompt"])
        ids, mask, tgt = map(torch.from_numpy, (x, m, y))
        emb = model.get_input_embeddings()(ids)
        if prompt is not None:
            P = prompt.shape[0]
            emb = torch.cat([prompt.expand(len(ids), -1, -1), emb], 1)
            mask = torch.cat([torch.ones(len(ids), P, dtype=mask.dtype), mask], 1)
            if tgt.dim() == 2:
                tgt = torch.cat([torch.full((len(ids), P), -100), tgt], 1)
        if manifest["task"]["kind"] == "lm":
            return model(inputs_embeds=emb, attention_mask=mask, labels=tgt).loss.item()
        logits = model(inputs_embeds=emb, attention_mask=mask).logits
        last = logits[torch.arange(len(ids)), mask.sum(1) - 1]
        # single-token label words here (multi-token ones: tests/test_tasks.py)
        lab = last[:, [ids[0] for ids in manifest["task"]["label_token_ids"]]]
        return torch.nn.functional.cross_entropy(lab, tgt).item()


@pytest.mark.parametrize("mode", ["full", "norms", "lora", "prompt"])
@pytest.mark.parametrize("task", ["lm", "classify"])
def test_onnx_matches_torch(tiny, artifacts, mode, task):
    _, model, _ = tiny
    d = artifacts[(mode, task)]
    man = art.read_manifest(d)
    assert man["export_check"]["abs_diff"] <= 1e-4 * abs(man["export_check"]["torch_loss"]) + 1e-6
    flat = art.read_trainable(d, man)
    rng = np.random.default_rng(0)
    flat += rng.normal(0, 0.05, flat.shape).astype(np.float32)  # LoRA B != 0 from here on
    views = art.trainable_views(flat, man)
    x, m, y = _batch(d / "tokenizer.json", man, TEXTS)  # batch/seq differ from the traced ones
    sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"input_ids": x, "attention_mask": m, "targets": y} | views)
    ref = _reference_loss(model, man, views, x, m, y)
    assert np.isclose(outs[0], ref, rtol=1e-4, atol=1e-6), (outs[0], ref)
    if task == "classify":
        assert outs[1].shape == (len(TEXTS), 2)


@pytest.mark.parametrize("mode", ["full", "norms", "lora", "prompt"])
def test_manifest_and_trainable_roundtrip(tiny, artifacts, mode):
    _, model, tok = tiny
    d = artifacts[(mode, "classify")]
    man = json.loads((d / "manifest.json").read_text())
    assert man["format"] == "edgefed-artifact" and man["format_version"] == 2
    assert man["trainable_mode"] == mode and man["task"]["labels"] == ["positive", "negative"]
    assert man["task"]["template"] == DEFAULT_TEMPLATE
    assert man["inputs"] == ["input_ids", "attention_mask", "targets"]
    assert man["outputs"] == ["loss", "label_logits"]
    assert man["files"] == {"onnx": "model.onnx", "tokenizer": "tokenizer.json", "trainable": "trainable.bin"}
    assert man["quantized_frozen"] is False and man["opset"] == 17
    assert man["pad_token_id"] == tok.pad_token_id and man["eos_token_id"] == tok.eos_token_id
    art.verify_checksums(d, man)
    # layout is contiguous and covers the file
    off = 0
    for t in man["trainable"]:
        assert t["offset"] == off and t["numel"] == int(np.prod(t["shape"]))
        off += t["numel"]
    assert off == man["n_trainable"] == (d / "trainable.bin").stat().st_size // 4
    # trainable inputs: same order and shapes as the manifest
    sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    ins = sess.get_inputs()
    assert [i.name for i in ins[:3]] == ["input_ids", "attention_mask", "targets"]
    assert [i.name for i in ins[3:]] == [t["name"] for t in man["trainable"]]
    assert [list(i.shape) for i in ins[3:]] == [t["shape"] for t in man["trainable"]]
    assert [o.name for o in sess.get_outputs()] == ["loss", "label_logits"]
    # initial values
    views = art.trainable_views(art.read_trainable(d, man), man)
    params = dict(model.named_parameters())
    if mode == "full":
        assert "lm_head.weight" not in views and "model.embed_tokens.weight" in views  # tied = one tensor
        assert man["n_frozen"] == 0
        for name, v in views.items():
            np.testing.assert_array_equal(v, params[name].detach().numpy())
    elif mode == "norms":  # every layer's two RMSNorm gains and the final norm's, nothing else
        L = model.config.num_hidden_layers
        want = [f"model.layers.{i}.{n}.weight" for i in range(L) for n in ("input_layernorm", "post_attention_layernorm")]
        assert list(views) == want + ["model.norm.weight"]
        assert man["n_trainable"] == (2 * L + 1) * model.config.hidden_size
        assert man["n_frozen"] == sum(p.numel() for p in model.parameters()) - man["n_trainable"]
        for name, v in views.items():
            np.testing.assert_array_equal(v, params[name].detach().numpy())
    elif mode == "lora":
        assert len(views) == 2 * 2 * model.config.num_hidden_layers
        a = views["model.layers.0.self_attn.q_proj.lora_A"]
        assert a.shape == (4, 64) and np.abs(a).max() > 0
        assert not np.any(views["model.layers.1.self_attn.v_proj.lora_B"])
        assert man["n_frozen"] == sum(p.numel() for p in model.parameters())
    else:
        sp = views["soft_prompt"]
        assert sp.shape == (5, 64)
        from tokenizers import Tokenizer

        # no prompt_init given: the soft prompt starts from an instruction naming the task's labels
        assert man["prompt_init"] == "Classify this text as positive or negative."
        ids = Tokenizer.from_file(str(d / "tokenizer.json")).encode(
            man["prompt_init"], add_special_tokens=False).ids[:5]
        np.testing.assert_array_equal(sp, params["model.embed_tokens.weight"].detach().numpy()[ids])


def test_prompt_init_follows_the_task_or_the_user(tiny, tmp_path):
    """A soft prompt for a user's own task starts from that task's words, not the demo's
    sentiment instruction; --prompt-init overrides; a text with no tokens is refused."""
    from tokenizers import Tokenizer

    from edgefed.export.specs import default_prompt_init
    _, model, tok = tiny
    assert default_prompt_init({"kind": "classify", "labels": ["ABBR", "DESC", "HUM"]}) == \
        "Classify this text as ABBR, DESC or HUM."
    emb = model.get_input_embeddings().weight.detach().numpy()

    def start(d):
        man = art.read_manifest(d)
        sp = art.trainable_views(art.read_trainable(d, man), man)["soft_prompt"]
        ids = Tokenizer.from_file(str(d / "tokenizer.json")).encode(man["prompt_init"], add_special_tokens=False).ids
        return man, sp, ids

    d = export_artifact(model, tmp_path / "trec", "prompt:tokens=40", "classify:labels=ABBR,DESC,HUM",
                        tokenizer=tok, progress=False)
    man, sp, ids = start(d)
    assert man["prompt_init"] == "Classify this text as ABBR, DESC or HUM."
    assert len(ids) < 40  # shorter than the prompt: repeated to fill it
    np.testing.assert_array_equal(sp, emb[(ids * 40)[:40]])

    d = export_artifact(model, tmp_path / "own", "prompt:tokens=3", CLS, tokenizer=tok, progress=False,
                        prompt_init="Is this review glowing or scathing?")
    man, sp, ids = start(d)
    assert man["prompt_init"] == "Is this review glowing or scathing?"
    np.testing.assert_array_equal(sp, emb[ids[:3]])

    with pytest.raises(ValueError, match="has no tokens"):
        export_artifact(model, tmp_path / "empty", "prompt:tokens=3", CLS, tokenizer=tok, progress=False,
                        prompt_init="")


def test_cache_key_holds_the_prompt_init():
    """Two starting texts are two artifacts; other trainables' keys do not change with it."""
    from edgefed.export.cache import artifact_key
    key = lambda tr, init: artifact_key("m", tr, CLS, None, False, init)  # noqa: E731
    assert len({key("prompt:tokens=8", None), key("prompt:tokens=8", "a"), key("prompt:tokens=8", "b")}) == 3
    assert key(LORA, "a") == key(LORA, None) == artifact_key("m", LORA, CLS, None, False)


def test_tokenizer_and_label_ids(artifacts):
    from tokenizers import Tokenizer

    d = artifacts[("lora", "classify")]
    man = art.read_manifest(d)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert man["task"]["label_token_ids"] == [tok.encode(" positive", add_special_tokens=False).ids,
                                             tok.encode(" negative", add_special_tokens=False).ids]
    lm = art.read_manifest(artifacts[("lora", "lm")])
    assert lm["outputs"] == ["loss", "row_nll", "row_tokens", "next_logits"] and lm["task"]["kind"] == "lm"


def test_model_restored_after_lora_export(tiny, artifacts):
    _, model, _ = tiny
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_quantized_lora_keeps_adapter_sensitivity(tiny, artifacts, tmp_path):
    _, model, tok = tiny
    q = export_artifact(model, tmp_path / "q", LORA, CLS, tokenizer=tok, quantize_frozen=True, progress=False)
    man = art.read_manifest(q)
    assert man["quantized_frozen"] is True
    assert man["export_check"]["abs_diff"] < 0.05 * abs(man["export_check"]["torch_loss"])
    fp = artifacts[("lora", "classify")]
    assert (q / "model.onnx").stat().st_size < (fp / "model.onnx").stat().st_size
    # The adapter path must stay float: a small change of B moves both losses alike.
    x, m, y = _batch(q / "tokenizer.json", man, TEXTS)
    flat = art.read_trainable(q, man)
    delta = np.zeros_like(flat)
    for t in man["trainable"]:
        if t["name"].endswith("lora_B"):
            delta[t["offset"]:t["offset"] + t["numel"]] = np.random.default_rng(1).normal(0, 1e-2, t["numel"])
    diffs = []
    for d in (fp, q):
        sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
        run = [sess.run(["loss"], {"input_ids": x, "attention_mask": m, "targets": y}
                        | art.trainable_views(f, man))[0] for f in (flat, flat + delta)]
        diffs.append(float(run[1] - run[0]))
    assert abs(diffs[0]) > 1e-5 and np.isclose(diffs[1], diffs[0], rtol=0.3), diffs


def test_dynamic_int8_exports(tiny, tmp_path):
    _, model, tok = tiny
    q = export_artifact(model, tmp_path / "dq", "prompt:tokens=4", "lm", tokenizer=tok,
                        quantize_frozen="dynamic-int8", progress=False)
    assert art.read_manifest(q)["quantized_frozen"] is True


def test_full_quantize_rejected(tiny, tmp_path):
    _, model, tok = tiny
    with pytest.raises(ValueError, match="quantize"):
        export_artifact(model, tmp_path / "x", "full", CLS, tokenizer=tok, quantize_frozen=True, progress=False)


def test_specs():
    s = parse_trainable("lora:r=8,targets=q_proj,v_proj,k_proj")
    assert (s.mode, s.r, s.alpha, s.targets) == ("lora", 8, 16.0, ("q_proj", "v_proj", "k_proj"))
    assert parse_trainable("prompt:tokens=20").tokens == 20
    assert parse_task(CLS).labels == ("positive", "negative")
    for bad in ("lora:r=x", "prompt:tokens=0", "adapters", "lora:rank=8", "full:r=2"):
        with pytest.raises(ValueError):
            parse_trainable(bad)
    with pytest.raises(ValueError):
        parse_task("classify:labels=positive")


def test_cli(tiny, tmp_path, monkeypatch, capsys):
    from edgefed.export.cli import main

    d, _, _ = tiny
    out = tmp_path / "cli"
    assert main(["export", "--model", str(d), "--trainable", "prompt:tokens=3", "--task", CLS,
                 "--template", r"Text: {text}\nLabel:", "--prompt-init", "Judge the review.",
                 "--out", str(out), "--no-progress"]) == 0
    man = art.read_manifest(out)
    assert man["task"]["template"] == "Text: {text}\nLabel:" and man["trainable"][0]["shape"][0] == 3
    assert man["prompt_init"] == "Judge the review."
    monkeypatch.setenv("EDGEFED_CACHE", str(tmp_path / "cache"))
    capsys.readouterr()
    assert main(["models", "--json"]) == 0
    listing = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert {"smollm2-135m", "tiny"} <= set(listing) and not listing["tiny"]["prepared"]
