"""Torch modules that define what the exported graph computes: LoRA, soft prompt, losses."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    """y = base(x) + (alpha/r) * x A^T B^T. B starts at zero, so the export is the base model."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = alpha / r
        a = torch.empty(r, base.in_features)
        # kaiming_uniform_(a=sqrt(5)) as nn.Linear/peft, but with our own generator (reproducible).
        bound = 1.0 / math.sqrt(base.in_features)
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale


@contextlib.contextmanager
def lora_patched(model: nn.Module, targets, r: int, alpha: float, seed: int = 0):
    """Temporarily replace target Linear layers (matched by attribute name) with LoRALinear.
    Yields {module path: LoRALinear}; the caller's model is restored on exit."""
    gen = torch.Generator().manual_seed(seed)
    swapped = []  # (parent, attr, original)
    wrappers = {}
    try:
        for path, mod in list(model.named_modules()):
            for attr, child in list(mod.named_children()):
                if attr in targets and isinstance(child, nn.Linear):
                    w = LoRALinear(child, r, alpha, gen)
                    setattr(mod, attr, w)
                    swapped.append((mod, attr, child))
                    wrappers[f"{path}.{attr}" if path else attr] = w
        if not wrappers:
            raise ValueError(f"no nn.Linear named {list(targets)} in the model")
        yield wrappers
    finally:
        for mod, attr, child in reversed(swapped):
            setattr(mod, attr, child)


class LossCore(nn.Module):
    """(input_ids, attention_mask, targets) -> loss [, label_logits] for a causal LM.

    Batches are right-padded. Classification reads the hidden state at the last real token
    and multiplies it only with the label words' rows of the output embedding (no full-vocab
    matmul). LM loss is the shifted next-token cross-entropy with -100 ignored (targets[:, t]
is the token expected at position t, as HF `labels`).
    """

    def __init__(self, lm: nn.Module, task_kind: str, label_token_ids=None,
                 soft_prompt: torch.Tensor | None = None):
        super().__init__()
        self.lm = lm
        self.task_kind = task_kind
        self.register_buffer("label_ids", torch.tensor(label_token_ids or [0], dtype=torch.long),
                             persistent=False)
        self.soft_prompt = nn.Parameter(soft_prompt) if soft_prompt is not None else None

    def forward(self, input_ids, attention_mask, targets):
        decoder = self.lm.get_decoder()
        head = self.lm.get_output_embeddings()
        emb = decoder.get_input_embeddings()(input_ids)
        mask = attention_mask
        n_prompt = 0
        if self.soft_prompt is not None:
            n_prompt = self.soft_prompt.shape[0]
            b = input_ids.shape[0]
            emb = torch.cat([self.soft_prompt.unsqueeze(0).expand(b, -1, -1), emb], dim=1)
            mask = torch.cat([torch.ones(b, n_prompt, dtype=mask.dtype), mask], dim=1)
        hidden = decoder(inputs_embeds=emb, attention_mask=mask, use_cache=False).last_hidden_state

        if self.task_kind == "classify":
            # Computed in-graph so devices only feed the padded batch.
            last = (mask.sum(dim=1) - 1).to(torch.long)
            idx = last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
            h_last = hidden.gather(1, idx).squeeze(1)
            w = head.weight.index_select(0, self.label_ids)
            bias = head.bias.index_select(0, self.label_ids) if head.bias is not None else None
            label_logits = F.linear(h_last, w, bias)
            return F.cross_entropy(label_logits, targets), label_logits

        if n_prompt:
            # As peft's prompt tuning (labels padded with -100 over the virtual tokens): the
            # last soft-prompt position predicts the first real token.
            h, labels = hidden[:, n_prompt - 1:-1], targets
        else:
            h, labels = hidden[:, :-1], targets[:, 1:]
        # 2-D input + explicit bias exports as Gemm(transB=1) on the weight itself; lm_head(h)
        # would export MatMul(Transpose(W)), which constant folding turns into a second copy
        # of the tied embedding matrix (+113 MB for SmolLM2).
        w = head.weight
        bias = head.bias if head.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
        logits = F.linear(h.reshape(-1, h.shape[-1]), w, bias)
        return F.cross_entropy(logits, labels.reshape(-1), ignore_index=-100)


@contextlib.contextmanager
def swapped_params(root: nn.Module, values: dict[str, torch.Tensor]):
    """Temporarily replace parameters (by path) with plain tensors, including every tied alias
    of the same Parameter object. torch.func.functional_call does this too but refuses to run
    under the TorchScript tracer that torch.onnx.export(dynamo=False) uses."""
    params = dict(root.named_parameters(remove_duplicate=False))
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for mod in root.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((mod, name))
    done = []
    try:
        for path, value in values.items():
            orig = params[path]
            for mod, name in owners[id(orig)]:
                del mod._parameters[name]
                setattr(mod, name, value)  # a plain tensor attribute, seen by forward()
                done.append((mod, name, orig))
        yield
    finally:
        for mod, name, orig in reversed(done):
            delattr(mod, name)
            mod._parameters[name] = orig


class ExportWrapper(nn.Module):
    """Makes the trainable tensors explicit forward arguments, so tracing turns them into
    graph inputs while everything else becomes initializers."""

    def __init__(self, core: nn.Module, param_paths: list[str]):
        super().__init__()
        self.core = core
        self.param_paths = list(param_paths)

    def forward(self, input_ids, attention_mask, targets, *trainables):
        # Tied aliases (lm_head.weight = embed_tokens.weight) follow the replaced tensor.
        with swapped_params(self.core, dict(zip(self.param_paths, trainables))):
            return self.core(input_ids, attention_mask, targets)
