"""A job's result leaves in the ecosystem's formats: a PEFT adapter and a merged transformers
checkpoint that compute what the artifact's graph computes at the trained trainables, and an
ONNX artifact that starts from them; the global model is rebuilt from the server's store."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from edgefed.data import iid_split, load_rotten_tomatoes  # noqa: E402
from edgefed.export.results import (export_merged, export_onnx_artifact, export_peft,  # noqa: E402
                                    trainables_from_store)
from edgefed.federation import run_federation  # noqa: E402
from edgefed.methods import JobConfig  # noqa: E402
from edgefed.runtime import DeviceModel  # noqa: E402
from edgefed.simulate import thread_devices  # noqa: E402


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    from edgefed.export import export_artifact
    from edgefed.models import load_model, tiny_random_model

    root = tmp_path_factory.mktemp("results")
    model, tok = load_model(tiny_random_model(root / "model", seed=0))
    return {name: export_artifact(model, root / name, spec, "classify:labels=positive,negative", tokenizer=tok,
                                  progress=False)
            for name, spec in [("lora", "lora:r=2,targets=q_proj,v_proj"), ("prompt", "prompt:tokens=3"),
                               ("full", "full")]}


def _trained(art, seed=0):
    p = DeviceModel(art, threads=1, check_memory=False).params.copy()
    return p + np.random.default_rng(seed).standard_normal(p.size).astype(np.float32) * 0.05


def _graph_logits(art, params, ids):
    """Next-token logits of the artifact's own (torch) graph at these trainables."""
    from edgefed.backends.torch_model import TorchModel
    from edgefed.export.adapters import swapped_params

    tm = TorchModel(art)
    tm.params[:] = params
    with torch.no_grad(), swapped_params(tm.core, tm._split(tm._current())):
        emb, mask = tm.core.embed(ids, torch.ones_like(ids))
        h = tm.core.lm.get_decoder()(inputs_embeds=emb, attention_mask=mask).last_hidden_state
        return tm.core.lm.lm_head(h)


def test_peft_adapter_and_merged_checkpoint_compute_the_trained_graph(arts, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgefed.export.artifact import read_manifest

    art = arts["lora"]
    params = _trained(art)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    want = _graph_logits(art, params, ids)
    base_dir = read_manifest(art)["base_model"]
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), export_peft(art, params, tmp_path / "peft"))
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, want, rtol=1e-4, atol=1e-4)
    merged = AutoModelForCausalLM.from_pretrained(export_merged(art, params, tmp_path / "merged"))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, want, rtol=1e-4, atol=1e-4)
        plain = AutoModelForCausalLM.from_pretrained(base_dir)(ids).logits
    assert not torch.allclose(plain, want, atol=1e-4), "the adapter changed nothing: the check would be empty"


def test_soft_prompt_as_a_peft_prompt_tuning_adapter(arts, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgefed.export.artifact import read_manifest

    art = arts["prompt"]
    params = _trained(art, 1)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    want = _graph_logits(art, params, ids)
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(read_manifest(art)["base_model"]),
                                   export_peft(art, params, tmp_path / "peft"))
    with torch.no_grad():
        got = pm(input_ids=ids).logits
    torch.testing.assert_close(got[:, -ids.shape[1]:], want[:, -ids.shape[1]:], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="peft"):
        export_merged(art, params, tmp_path / "m")


def test_the_global_model_rebuilt_from_the_store_starts_a_new_artifact(arts, tmp_path):
    art = arts["full"]
    job = JobConfig(job="res", method="fedkseed", artifact=str(art), rounds=2, devices_per_round=2, min_devices=2,
                    round_timeout=60, lr=1e-3, eps=1e-3, local_steps=2, batch_size=4, k=64)
    base = DeviceModel(art, threads=1, batch_size=4, seq_len=64, check_memory=False)
    data = list(load_rotten_tomatoes()[:60])
    res = run_federation(job, art, data[:10], broker_url="inproc://res", start_devices=thread_devices(
        base, job.job, iid_split(data, 2)), out_dir=tmp_path / "run", eval_n=10, progress=False, seq_len=64)
    params, info = trainables_from_store(tmp_path / "run" / "server.sqlite", "res")
    np.testing.assert_array_equal(params, res.final_params)
    assert info["rounds"] == 2
    new = export_onnx_artifact(art, params, tmp_path / "next", info)
    np.testing.assert_array_equal(DeviceModel(new, threads=1, check_memory=False).params, res.final_params)
    merged_dir = export_merged(art, params, tmp_path / "merged")
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(merged_dir)
    from edgefed.export.artifact import read_manifest, trainable_views
    first = read_manifest(art)["trainable"][0]["name"]
    np.testing.assert_array_equal(dict(m.named_parameters())[first].detach().numpy(),
                                  trainable_views(params, read_manifest(art))[first])
    with pytest.raises(FileExistsError):
        export_onnx_artifact(art, params, tmp_path / "next", info)
