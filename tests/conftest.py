"""Shared fixtures: a tiny random Llama exported once per session as EdgeFed artifacts."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory):
    """{'full' | 'norms' | 'lora' | 'prompt': artifact dir} for a tiny classifier (needs torch: host side)."""
    pytest.importorskip("torch")
    from edgefed.export import export_artifact
    from edgefed.models import load_model, tiny_random_model

    root = tmp_path_factory.mktemp("tiny-artifacts")
    model, tok = load_model(tiny_random_model(root / "model", seed=0))
    out = {}
    for name, spec in [("full", "full"), ("norms", "norms"), ("lora", "lora:r=4,targets=q_proj,v_proj"),
                       ("prompt", "prompt:tokens=4")]:
        out[name] = export_artifact(model, root / name, spec, "classify:labels=positive,negative",
                                    tokenizer=tok, progress=False)
    return out
