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
                               ("full", "full"), ("norms", "norms")]}


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


def test_tuned_norm_gains_merge_into_a_checkpoint_that_computes_the_trained_graph(arts, tmp_path):
    from transformers import AutoModelForCausalLM

    art = arts["norms"]
    params = _trained(art, 2)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    want = _graph_logits(art, params, ids)
    merged = AutoModelForCausalLM.from_pretrained(export_merged(art, params, tmp_path / "merged"))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="merged"):
        export_peft(art, params, tmp_path / "peft")


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


def test_offsite_tuning_trains_on_the_emulator_and_plugs_into_the_full_model(tmp_path):
    """FedOT: the artifact's graph is the layer-dropped emulator with the bottom and top layers
    trainable; devices and hosts train those; export-result --format merged plugs the trained
    adapter into the full model (its other layers untouched), which computes differently from
    the emulator (the middle is whole again) and exports again as a normal artifact."""
    from transformers import AutoModelForCausalLM

    from edgefed.export import export_artifact
    from edgefed.export.artifact import read_manifest
    from edgefed.models import load_model, tiny_random_model
    from edgefed.research import run_inline

    base_dir = tiny_random_model(tmp_path / "m6", seed=0, layers=6)
    model, tok = load_model(base_dir)
    art = export_artifact(model, tmp_path / "ot", "offsite:adapter=1,drop=2", "classify:labels=positive,negative",
                          tokenizer=tok, progress=False)
    man = read_manifest(art)
    assert man["offsite"]["kept"] == [0, 1, 3, 5] and man["offsite"]["adapter"] == [0, 5]
    dev = DeviceModel(art, threads=1, batch_size=4, seq_len=64, check_memory=False)
    shards = iid_split(list(load_rotten_tomatoes()[:60]), 2)
    job = JobConfig(job="ot", method="fedkseed", artifact=str(art), rounds=2, local_steps=2, batch_size=4,
                    lr=1e-3, eps=1e-3, k=64)
    res = run_inline(job, [dev.fork() for _ in shards], shards)  # ZO devices tune the adapter on the emulator
    out = export_merged(art, res.params, tmp_path / "plugged")
    plugged = AutoModelForCausalLM.from_pretrained(out)
    full = AutoModelForCausalLM.from_pretrained(base_dir)
    p, f = dict(plugged.named_parameters()), dict(full.named_parameters())
    top = "model.layers.5.mlp.up_proj.weight"
    emu_top = "model.layers.3.mlp.up_proj.weight"  # the same layer inside the emulator
    from edgefed.export.artifact import trainable_views
    np.testing.assert_array_equal(p[top].detach().numpy(), trainable_views(res.params, man)[emu_top])
    assert not torch.equal(p[top], f[top]), "the trained adapter is in the plugged model"
    assert torch.equal(p["model.layers.2.mlp.up_proj.weight"], f["model.layers.2.mlp.up_proj.weight"])
    again = export_artifact(plugged, tmp_path / "plugged-art", "lora:r=2", "classify:labels=positive,negative",
                            tokenizer=tok, progress=False)
    plugged_dev = DeviceModel(again, threads=1, seq_len=64, check_memory=False)
    held = list(load_rotten_tomatoes()[60:100])
    dev.params[:] = res.params
    emu_eval, plug_eval = dev.evaluate(held), plugged_dev.evaluate(held)
    assert emu_eval["loss"] != plug_eval["loss"]  # both are reported: emulator and plugged-in
