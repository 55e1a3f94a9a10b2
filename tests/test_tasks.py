"""Task kinds on the device path, checked against plain transformers forwards (tiny model).

Classification with multi-token label words, SFT loss masking and truncation rules, DPO loss
against the frozen reference, greedy generation, and the chat-format derivation."""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgefed.data.records import Example, PreferencePair, SFTExample  # noqa: E402
from edgefed.tasks import TooLong  # noqa: E402
from edgefed.tasks.prompt_format import PromptFormat, check_template, derive_chat_format  # noqa: E402

LABELS = ["very good", "quite bad", "neutral stance"]  # 2, 2 and 6 tokens in the tiny vocab
TEXTS = ["a gorgeous, witty film", "dull and far too long", "fine.", "the best movie of the year, by far"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from edgefed.models import load_model, tiny_random_model
    model, tok = load_model(tiny_random_model(tmp_path_factory.mktemp("tiny"), seed=0))
    return model.eval(), tok


@pytest.fixture(scope="module")
def export(tiny, tmp_path_factory):
    from edgefed.export import export_artifact
    root = tmp_path_factory.mktemp("tasks")
    cache = {}

    def get(task, trainable="full", **kw):
        key = (task, trainable, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = export_artifact(tiny[0], root / f"a{len(cache)}", trainable, task, tokenizer=tiny[1],
                                         progress=False, **kw)
        return cache[key]
    return get


def _device(art, **kw):
    from edgefed.runtime import DeviceModel
    return DeviceModel(art, threads=1, check_memory=False, **kw)


def _perturb(dm, seed=0, scale=0.02):
    dm.params += scale * np.random.default_rng(seed).standard_normal(dm.params.size).astype(np.float32)


def _hf_with(dm, model):
    """A copy of the HF model holding the device's full-mode trainables."""
    ref = copy.deepcopy(model)
    sd = dict(ref.named_parameters())
    with torch.no_grad():
        for name, v in dm.views.items():
            sd[name].copy_(torch.from_numpy(np.array(v)))
    return ref


def _seq_logprob(model, prompt_ids, answer_ids):
    """log p(answer | prompt) by one plain forward over prompt + answer."""
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return float(sum(lp[len(prompt_ids) - 1 + k, t] for k, t in enumerate(answer_ids)))


def test_multi_token_labels_score_the_sum_of_their_token_log_probs(tiny, export):
    art = export("classify:labels=" + ",".join(LABELS), template="Review: {text}\nVerdict:")
    dm = _device(art)
    lens = [len(t) for t in dm.manifest["task"]["label_token_ids"]]
    assert max(lens) > 1 and len(set(lens)) > 1  # really multi-token, of different lengths
    _perturb(dm)
    ref = _hf_with(dm, tiny[0])
    recs = [Example(t, LABELS[i % 3]) for i, t in enumerate(TEXTS)]
    b = dm.encode(recs)
    out = dm.run(b)
    for i in range(len(recs)):
        prompt = b.input_ids[i, :b.attention_mask[i].sum()].tolist()
        want = [_seq_logprob(ref, prompt, toks) for toks in dm.manifest["task"]["label_token_ids"]]
        np.testing.assert_allclose(out["label_logits"][i], want, rtol=1e-4, atol=1e-4)
    scores = torch.tensor(out["label_logits"]).double()
    want_loss = torch.nn.functional.cross_entropy(scores, torch.tensor(b.targets)).item()
    assert out["loss"] == pytest.approx(want_loss, rel=1e-5)


def test_classify_labels_auto_reads_the_data_and_refuses_unknown_labels(tiny, export, tmp_path):
    from edgefed.data import DataError, write_jsonl
    data = write_jsonl(tmp_path / "d.jsonl", [Example(t, lab) for t, lab in
                                              zip(TEXTS * 2, ["sports", "world", "business", "sci tech"] * 2)])
    dm = _device(export("classify:labels=auto", "lora:r=2,targets=q_proj", data=str(data)))
    assert dm.labels == ["business", "sci tech", "sports", "world"]
    ev = dm.evaluate([Example("x", "world"), Example("y", "sports")])
    assert ev["n"] == 2 and 0 <= ev["accuracy"] <= 1 and "macro_f1" in ev
    with pytest.raises(DataError, match="weather"):
        dm.encode([Example("rain", "weather", origin="d.jsonl:9")])
    with pytest.raises(ValueError, match="labels=auto"):
        export("classify:labels=auto")


def test_template_is_validated(tiny, export):
    for bad, msg in [("Review: {txt}", "unknown placeholder"), ("Review:", "lacks"),
                     ("{text} and {text}", "more than once"), ("{text", "not a valid")]:
        with pytest.raises(ValueError, match=msg):
            export("classify:labels=a,b", template=bad)
    with pytest.raises(ValueError, match="instruction"):
        export("sft", template="Q: {question}\nA:")


def test_classify_truncation_cuts_the_text_never_the_template(export):
    dm = _device(export("classify:labels=positive,negative", template="Review: {text}\nVerdict:"), seq_len=24)
    b = dm.encode([Example("dull " * 100, "negative"), Example("fine", "positive")])
    assert b.n_truncated == 1 and b.attention_mask[0].sum() == 24
    suffix = dm.task.suffix_ids
    assert b.input_ids[0, 24 - len(suffix):24].tolist() == suffix


def test_sft_loss_is_on_the_response_only_and_matches_transformers(tiny, export):
    dm = _device(export("sft"))
    _perturb(dm, 1)
    ref = _hf_with(dm, tiny[0])
    recs = [SFTExample("Say it in one word.", "great", input="a gorgeous film"),
            SFTExample("Summarise.", "long and dull", system="Be brief.", history=(("user", "hi"), ("assistant", "hello")))]
    b = dm.encode(recs)
    fmt = dm.task.format
    for i, r in enumerate(recs):
        ans = dm.task.ids([r.response + fmt.response_suffix])[0]
        row = b.targets[i][b.attention_mask[i] == 1].tolist()
        assert row[-len(ans):] == ans and set(row[:-len(ans)]) == {-100}
    out = dm.run(b)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(b.input_ids), attention_mask=torch.tensor(b.attention_mask),
                   labels=torch.tensor(b.targets)).loss.item()
    assert float(out["loss"]) == pytest.approx(want, rel=1e-4)
    ev = dm.evaluate(recs)
    assert ev["loss"] == pytest.approx(want, rel=1e-4) and ev["perplexity"] == pytest.approx(np.exp(want), rel=1e-4)


def test_sft_cuts_the_instruction_keeps_the_response_and_refuses_what_cannot_fit(export):
    dm = _device(export("sft"), seq_len=40)
    b = dm.encode([SFTExample("word " * 200, "great film")])
    assert b.n_truncated == 1 and b.input_ids.shape[1] == 40
    ans = dm.task.ids(["great film" + dm.task.format.response_suffix])[0]
    assert b.input_ids[0, -len(ans):].tolist() == ans
    with pytest.raises(TooLong, match=r"d\.jsonl:7.*raise the device's seq_len"):
        dm.encode([SFTExample("q", "word " * 200, origin="d.jsonl:7")])


def test_greedy_generation_matches_transformers_generate(tiny, export):
    dm = _device(export("sft"))
    _perturb(dm, 2, 0.05)
    ref = _hf_with(dm, tiny[0])
    recs = [SFTExample("Describe the film.", "x"), SFTExample("One word?", "y", input="dull")]
    got = dm.task.generate(dm, recs, max_new_tokens=8)
    for r, text in zip(recs, got):
        head, t, tail = dm.task.pieces([r])[0]
        ids = torch.tensor([head + t + tail])
        with torch.no_grad():
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                               eos_token_id=sorted(dm.task.stop_ids), pad_token_id=dm.pad_id)
        new = [i for i in out[0, ids.shape[1]:].tolist() if i not in dm.task.stop_ids]
        assert text == dm.tokenizer.decode(new, skip_special_tokens=True).strip()


def test_dpo_loss_against_the_frozen_reference(tiny, export):
    dm = _device(export("dpo:beta=0.5"))
    pairs = [PreferencePair("Review the film.", "a gorgeous, witty film", "dull and far too long"),
             PreferencePair("One line?", "fine.", "a mess", origin="p.jsonl:2")]
    # At the artifact's own trainables the policy is the reference: every margin is 0.
    assert dm.loss(dm.encode(pairs)) == pytest.approx(np.log(2), abs=1e-5)
    _perturb(dm, 3)
    b = dm.encode(pairs)
    base, pol = _hf_with(dm._reference, tiny[0]), _hf_with(dm, tiny[0])
    want = []
    for i, p in enumerate(pairs):
        head, t, tail = dm.task.pieces([p])[0]
        prompt = head + t + tail
        c, r = (dm.task.ids([a + dm.task.format.response_suffix])[0] for a in (p.chosen, p.rejected))
        np.testing.assert_allclose(b.extra["ref_logps"][2 * i:2 * i + 2],
                                   [_seq_logprob(base, prompt, c), _seq_logprob(base, prompt, r)], rtol=1e-4)
        margin = (_seq_logprob(pol, prompt, c) - _seq_logprob(pol, prompt, r)) - \
                 (_seq_logprob(base, prompt, c) - _seq_logprob(base, prompt, r))
        want.append(-np.log(1 / (1 + np.exp(-0.5 * margin))))
    assert dm.loss(b) == pytest.approx(np.mean(want), rel=1e-4)
    ev = dm.evaluate(pairs)
    assert ev["n"] == 2 and set(ev["correct"].tolist()) <= {0.0, 1.0}
    assert ev["preference_accuracy"] == pytest.approx(float(np.mean(ev["margins"] > 0)))
    dm.reset_params()  # the reference itself: every margin 0, ties count half
    assert dm.evaluate(pairs)["preference_accuracy"] == 0.5
    assert ev["reward_margin"] == pytest.approx(float(np.mean(ev["margins"])))


def test_chat_format_is_derived_from_the_tokenizer_and_rebuilds_its_rendering(tiny):
    tok = copy.deepcopy(tiny[1])
    tok.chat_template = CHATML
    fmt = derive_chat_format(tok)
    assert fmt.assistant_prefix == "<|im_start|>assistant\n" and fmt.response_suffix == "<|im_end|>\n"
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}]
    assert fmt.prompt("u2", system="S", history=(("user", "u1"), ("assistant", "a1"))) == \
        tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    tok.chat_template = "{{ messages[-1]['content'] }}"  # not a concatenation of turns
    with pytest.raises(ValueError, match="--template"):
        derive_chat_format(tok)
    assert PromptFormat.from_dict(fmt.to_dict()) == fmt
    with pytest.raises(ValueError, match="lacks"):
        check_template("Q: {input}", {"instruction"}, {"instruction", "input"}, "sft --template")
