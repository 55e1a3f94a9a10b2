"""Torch modules that define what the exported graph computes: LoRA, soft prompt, and one
loss core per task kind (classify, lm / sft, dpo)."""
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


def offsite_layers(n_layers: int, adapter: int, drop: int) -> dict:
    """Offsite-tuning's split of a decoder of n_layers (Xiao et al. 2023): the bottom and top
    `adapter` layers are the trainable adapter; the emulator keeps every `drop`-th layer of the
    middle, frozen. Returns {"kept": original indices in emulator order, "adapter": original
    indices of the adapter layers, "emulator_adapter": their indices inside the emulator}."""
    if 2 * adapter >= n_layers:
        raise ValueError(f"offsite adapter={adapter} at each end leaves no middle in {n_layers} layers; "
                         f"use adapter <= {max(1, (n_layers - 1) // 2)}")
    middle = list(range(adapter, n_layers - adapter))
    kept = list(range(adapter)) + middle[::drop] + list(range(n_layers - adapter, n_layers))
    adapt = list(range(adapter)) + list(range(n_layers - adapter, n_layers))
    return {"kept": kept, "adapter": adapt, "emulator_adapter": [kept.index(i) for i in adapt],
            "n_layers": n_layers}


def make_emulator(model: nn.Module, adapter: int, drop: int) -> tuple[nn.Module, dict]:
    """A layer-dropped copy of a causal LM (its weights shared with `model`, not copied) and the
    split (offsite_layers). The decoder's layer list and config are replaced on a shallow copy."""
    import copy

    dec = model.get_decoder()
    split = offsite_layers(len(dec.layers), adapter, drop)
    emu = copy.copy(model)
    emu_dec = copy.copy(dec)
    emu_dec._modules = dict(dec._modules)  # copy.copy shares the module dict: give the copy its own
    emu_dec.layers = nn.ModuleList([dec.layers[i] for i in split["kept"]])
    emu._modules = dict(model._modules)
    for name, mod in model._modules.items():
        if mod is dec:
            emu._modules[name] = emu_dec
    emu.config = copy.deepcopy(model.config)
    emu.config.num_hidden_layers = len(split["kept"])
    for attr in ("layer_types",):  # per-layer lists some configs carry
        if isinstance(getattr(emu.config, attr, None), list):
            setattr(emu.config, attr, [getattr(model.config, attr)[i] for i in split["kept"]])
    return emu, split


class _Core(nn.Module):
    """A causal LM (+ an optional soft prompt) read through its decoder and output embedding."""

    def __init__(self, lm: nn.Module, soft_prompt: torch.Tensor | None = None):
        super().__init__()
        self.lm = lm
        self.soft_prompt = nn.Parameter(soft_prompt) if soft_prompt is not None else None

    def embed(self, input_ids, attention_mask):
        """(embeddings, mask) with the soft prompt's virtual tokens in front."""
        emb = self.lm.get_decoder().get_input_embeddings()(input_ids)
        mask = attention_mask
        if self.soft_prompt is not None:
            b, n = input_ids.shape[0], self.soft_prompt.shape[0]
            emb = torch.cat([self.soft_prompt.unsqueeze(0).expand(b, -1, -1), emb], dim=1)
            mask = torch.cat([torch.ones(b, n, dtype=mask.dtype), mask], dim=1)
        return emb, mask

    def n_prompt(self) -> int:
        return 0 if self.soft_prompt is None else int(self.soft_prompt.shape[0])

    def head(self, h):
        """Output-embedding logits of 2-D h. F.linear with an explicit bias exports as
        Gemm(transB=1) on the weight itself; lm_head(h) would export MatMul(Transpose(W)), which
        constant folding turns into a second copy of the tied embedding matrix (+113 MB for
        SmolLM2)."""
        w = self.lm.get_output_embeddings().weight
        b = self.lm.get_output_embeddings().bias
        return F.linear(h, w, b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype))

    @staticmethod
    def last_real(hidden, mask):
        """Hidden state at each row's last real position (batches are right-padded)."""
        last = (mask.sum(dim=1) - 1).to(torch.long)
        return hidden.gather(1, last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])).squeeze(1)

    def token_nll(self, input_ids, attention_mask, targets):
        """(per-position NLL [B, T'], valid [B, T'], hidden, mask); targets[:, t] is the token
        expected at position t, as HF `labels`, -100 = no loss."""
        emb, mask = self.embed(input_ids, attention_mask)
        hidden = self.lm.get_decoder()(inputs_embeds=emb, attention_mask=mask,
                                       use_cache=False).last_hidden_state
        n = self.n_prompt()
        # As peft's prompt tuning: the last soft-prompt position predicts the first real token.
        h, labels = (hidden[:, n - 1:-1], targets) if n else (hidden[:, :-1], targets[:, 1:])
        logits = self.head(h.reshape(-1, h.shape[-1]))
        nll = F.cross_entropy(logits, labels.reshape(-1), ignore_index=-100, reduction="none")
        return nll.view(labels.shape), labels != -100, hidden, mask


class LMCore(_Core):
    """Kinds lm and sft -> (loss = mean NLL over target tokens, row_nll [B] summed NLL,
    row_tokens [B], next_logits [B, V] at each row's last real position, for greedy decoding)."""

    def forward(self, input_ids, attention_mask, targets):
        nll, valid, hidden, mask = self.token_nll(input_ids, attention_mask, targets)
        row_nll = nll.sum(dim=1)
        row_tokens = valid.sum(dim=1).to(nll.dtype)
        loss = row_nll.sum() / row_tokens.sum()
        return loss, row_nll, row_tokens, self.head(self.last_real(hidden, mask))


class DPOCore(_Core):
    """Kind dpo: rows 2i / 2i+1 are pair i's chosen / rejected answers; ref_logps [2B] are the
    answers' summed log-probabilities under the frozen reference -> (DPO loss, seq_logps [2B])."""

    def __init__(self, lm, beta: float, soft_prompt=None):
        super().__init__(lm, soft_prompt)
        self.beta = float(beta)

    def forward(self, input_ids, attention_mask, targets, ref_logps):
        nll, _, _, _ = self.token_nll(input_ids, attention_mask, targets)
        seq = -nll.sum(dim=1)
        margin = (seq[0::2] - seq[1::2]) - (ref_logps[0::2] - ref_logps[1::2])
        return -F.logsigmoid(self.beta * margin).mean(), seq


class ClassifyCore(_Core):
    """Kind classify -> (loss, label_logits [B, C]): label c's score is the sum of the
    log-probabilities of its label word's tokens after the prompt, so multi-token label words
    are scored exactly, in ONE forward for all labels.

    Each label's tokens but the last are appended after the (right-padded) prompt; a 4-D mask
    lets them see the prompt's real tokens and their own label's earlier tokens only, and their
    position ids continue each row's prompt. Single-token label sets append nothing."""

    def __init__(self, lm, label_token_ids: list[list[int]], soft_prompt=None):
        super().__init__(lm, soft_prompt)
        ctx, cls, off, tgt = [], [], [], []
        for c, toks in enumerate(label_token_ids):
            for k in range(len(toks) - 1):
                ctx.append(toks[k]); cls.append(c); off.append(k); tgt.append(toks[k + 1])  # noqa: E702
        n_cls = len(label_token_ids)
        self.register_buffer("first", torch.tensor([t[0] for t in label_token_ids]), persistent=False)
        self.register_buffer("ctx", torch.tensor(ctx, dtype=torch.long), persistent=False)
        self.register_buffer("ctx_cls", torch.tensor(cls, dtype=torch.long), persistent=False)
        self.register_buffer("ctx_off", torch.tensor(off, dtype=torch.long), persistent=False)
        self.register_buffer("ctx_tgt", torch.tensor(tgt, dtype=torch.long), persistent=False)
        self.register_buffer("ctx_onehot", F.one_hot(self.ctx_cls, n_cls).float() if ctx
                             else torch.zeros(0, n_cls), persistent=False)

    def forward(self, input_ids, attention_mask, targets):
        emb, mask = self.embed(input_ids, attention_mask)
        decoder = self.lm.get_decoder()
        lens = mask.sum(dim=1)
        if self.ctx.numel() == 0:
            hidden = decoder(inputs_embeds=emb, attention_mask=mask, use_cache=False).last_hidden_state
        else:
            b, t, s = mask.shape[0], mask.shape[1], self.ctx.shape[0]
            x = torch.cat([emb, decoder.get_input_embeddings()(self.ctx).unsqueeze(0).expand(b, -1, -1)], 1)
            q = torch.arange(t)
            pos = torch.cat([q.unsqueeze(0).expand(b, -1), lens.unsqueeze(1) + self.ctx_off.unsqueeze(0)], 1)
            real = mask.unsqueeze(1) == 1                                                   # [B, 1, T]
            pp = (q.view(1, -1, 1) >= q.view(1, 1, -1)) & real                              # prompt -> prompt
            ps = torch.zeros(b, t, s, dtype=torch.bool)                                     # prompt -> labels
            sp = real.expand(-1, s, -1)                                                     # labels -> prompt
            ss = ((self.ctx_cls.view(-1, 1) == self.ctx_cls.view(1, -1))
                  & (self.ctx_off.view(1, -1) <= self.ctx_off.view(-1, 1))).unsqueeze(0).expand(b, -1, -1)
            allowed = torch.cat([torch.cat([pp, ps], 2), torch.cat([sp, ss], 2)], 1)
            neg = torch.finfo(emb.dtype).min
            add = torch.where(allowed, torch.zeros((), dtype=emb.dtype), torch.full((), neg, dtype=emb.dtype))
            hidden = decoder(inputs_embeds=x, attention_mask=add.unsqueeze(1), position_ids=pos,
                             use_cache=False).last_hidden_state
        h_last = self.last_real(hidden[:, :mask.shape[1]], mask)
        scores = F.log_softmax(self.head(h_last), dim=-1).index_select(1, self.first)
        if self.ctx.numel():
            h_ctx = hidden[:, mask.shape[1]:]
            lp = F.log_softmax(self.head(h_ctx.reshape(-1, h_ctx.shape[-1])), dim=-1)
            lp = lp.view(h_ctx.shape[0], h_ctx.shape[1], -1)
            tok = lp.gather(2, self.ctx_tgt.view(1, -1, 1).expand(lp.shape[0], -1, 1)).squeeze(2)
            scores = scores + tok @ self.ctx_onehot
        return F.cross_entropy(scores, targets), scores


def make_core(lm, task: dict, soft_prompt=None) -> _Core:
    """The graph's module for a manifest task entry (kind + its settings)."""
    kind = task["kind"]
    if kind == "classify":
        return ClassifyCore(lm, task["label_token_ids"], soft_prompt)
    if kind == "dpo":
        return DPOCore(lm, task.get("beta", 0.1), soft_prompt)
    return LMCore(lm, soft_prompt)


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

    def forward(self, *args):
        # Graph inputs first (3, or 4 with dpo's ref_logps), then the trainables in manifest order.
        n_io = len(args) - len(self.param_paths)
        # Tied aliases (lm_head.weight = embed_tokens.weight) follow the replaced tensor.
        with swapped_params(self.core, dict(zip(self.param_paths, args[n_io:]))):
            return self.core(*args[:n_io])
