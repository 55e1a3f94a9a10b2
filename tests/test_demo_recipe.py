"""The demo's ZO recipe follows the trainable: LoRA moves only its B matrices; every other kind
gets a recipe whose job params fit its artifact (a LoRA mask on a soft prompt would stop every
device at its first step)."""
import argparse

import pytest

from edgefed.demo import PLAIN_LR, QUICK, RECIPES, add_demo_args, apply_quick, recipe
from edgefed.directions import WHOLE, direction_space
from edgefed.runtime import DeviceModel


@pytest.mark.parametrize("kind", ["lora", "prompt", "norms", "full"])
def test_each_trainable_kind_gets_a_recipe_its_artifact_accepts(tiny_artifacts, kind):
    art = tiny_artifacts[kind]
    from edgefed.export.artifact import read_manifest
    lr, params = recipe(read_manifest(art)["trainable_spec"])
    assert lr > 0
    model = DeviceModel(art, threads=1, check_memory=False)
    space = direction_space(model, dict(params))
    if kind == "lora":
        names = list(model.views)
        moved = {names[p.buf] for p in space.pieces}
        assert moved and all(n.endswith("lora_B") for n in moved)
    elif kind not in RECIPES:
        assert space is WHOLE and lr == PLAIN_LR


def test_the_recipe_lr_is_the_default_and_yours_wins():
    p = argparse.ArgumentParser()
    add_demo_args(p)
    assert p.parse_args([]).lr is None, "None: filled from the trainable's recipe at run time"
    assert p.parse_args(["--lr", "0.01"]).lr == 0.01
    assert recipe("lora:r=8,targets=q_proj,v_proj") == (4e-3, [("mask_tensors", "lora_B"), ("server_lr", 2)])
    # the server's step is sqrt(devices): it keeps one device's noise while averaging shrinks the step
    assert recipe("lora:r=8", devices=16)[1] == [("mask_tensors", "lora_B"), ("server_lr", 4)]
    assert dict(recipe("lora:r=8", devices=8)[1])["server_lr"] == pytest.approx(8 ** 0.5, abs=1e-4)
    assert recipe("lora:r=8", devices=1)[1] == [("mask_tensors", "lora_B")], "one device: nothing averaged"
    assert recipe("prompt:tokens=8")[1] == [], "no LoRA mask on a soft prompt"


def test_the_soft_prompt_starts_from_words_for_the_data():
    """Packaged sentiment corpus: the sentiment instruction; your data: None, so the export
    builds one from your labels; --prompt-init wins over both."""
    from edgefed.data import SENTIMENT_PROMPT_INIT
    from edgefed.simulate import prompt_init_from_args
    p = argparse.ArgumentParser()
    add_demo_args(p)
    assert prompt_init_from_args(p.parse_args([])) == SENTIMENT_PROMPT_INIT
    assert prompt_init_from_args(p.parse_args(["--data", "trec.jsonl"])) is None
    assert prompt_init_from_args(p.parse_args(["--data", "t.jsonl", "--prompt-init", "Kind of answer?"])) == \
        "Kind of answer?"
    assert prompt_init_from_args(p.parse_args(["--prompt-init", ""])) == "", "passed on, for export to refuse"


def test_quick_fills_in_only_what_you_did_not_give():
    """`--quick --trainable prompt:tokens=4 --rounds 2` is a quick soft-prompt demo of 2 rounds,
    not the quick LoRA demo with your flags dropped."""
    p = argparse.ArgumentParser()
    add_demo_args(p)
    args = p.parse_args(["--quick", "--trainable", "prompt:tokens=4", "--rounds", "2"])
    apply_quick(args)
    assert (args.trainable, args.rounds) == ("prompt:tokens=4", 2)
    assert (args.model, args.local_steps, args.heldout) == ("tiny", QUICK["local_steps"], QUICK["heldout"])
    plain = p.parse_args(["--quick"])
    apply_quick(plain)
    assert {k: getattr(plain, k) for k in QUICK} == QUICK
