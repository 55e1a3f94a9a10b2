"""Host-side export: transformers causal LM -> EdgeFed ONNX artifact (needs torch).

`export_artifact` is imported lazily so that `import edgefed.export.artifact` (numpy only)
and the CLI's argument parsing do not pull in torch.
"""
from .specs import DEFAULT_TEMPLATE, default_prompt_init, parse_task, parse_trainable

__all__ = ["export_artifact", "parse_task", "parse_trainable", "DEFAULT_TEMPLATE", "default_prompt_init"]


def __getattr__(name):
    if name == "export_artifact":
        from .onnx_export import export_artifact

        return export_artifact
    raise AttributeError(name)
