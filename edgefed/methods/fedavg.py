"""FedAvg family by backprop (white-box and gray-box): local SGD / AdamW epochs on torch hosts,
sample-weighted averaging of the parameter deltas, then a server optimiser.

One method covers the configurations the literature names separately, because the artifact
decides what is trainable and which loss is trained:
- FedSFT / full fine-tuning: an artifact exported with `--trainable full`;
- LoRA FedAvg: `--trainable lora:r=8,...`; FedPrompt (soft prompt tuning): `--trainable prompt`;
- federated DPO on LoRA: `--task dpo` with a LoRA artifact;
- FedProx: `--param prox_mu=0.01` (the proximal term mu/2 ||w - w_global||^2 on each host);
- FedAvgM / FedAdagrad / FedAdam / FedYogi: `--param server_opt=avgm|adagrad|adam|yogi`
  (edgefed.methods.server_opt; server_lr, server_momentum, server_beta2, server_tau).

The client half needs the torch backend (`edgefed device --backend torch`); the server half
is numpy. What crosses the network is one flat delta per host (f32, or bf16 / f16 with
`--param update_dtype=bf16`, half the bytes) and one f32 delta back, which every replica adds
to the same float32 buffer, so all replicas stay bit-identical. Plain means aggregate as the
updates stream in (exact sums, edgefed.exactsum: server memory does not grow with the hosts,
and any order or split between aggregation workers gives the same bits)."""
from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np

from ..protocol import InvalidField, RoundDelta, RoundPlan, Tensor, Update
from ..security.robust import RobustConfig, aggregate_dense, clip_to_norm
from . import server_opt
from .base import (ClientAlgorithm, ClientResult, JobConfig, MethodState, PlanFields, RoundAccumulator,
                   ServerStrategy, check_num_samples, cum_delta_state, cum_delta_summary, expect_tensors)
from .partials import dense_mean, exact_dense, split_refusal

__all__ = ["FedAvgClient", "FedAvgServer", "backprop_norm_bound", "OPTIMIZERS", "UPDATE_DTYPES",
           "backprop_steps", "start_tensor", "finite_delta", "plan_settings"]

DELTA = "delta"
OPTIMIZERS = ("adamw", "sgd")
UPDATE_DTYPES = ("f32", "bf16", "f16")
# An AdamW step moves each coordinate by at most about lr * (1 - b1) / sqrt(1 - b2) (3.2 lr at
# torch's defaults; 1 lr at the first step); 10 lr leaves room for weight decay on |w| < 100.
_ADAM_STEP_BOUND = 10.0


def plan_settings(params: dict) -> dict:
    opt = str(params.get("optimizer", "adamw")).lower()
    if opt not in OPTIMIZERS:
        raise ValueError(f"optimizer={opt!r}: use one of {', '.join(OPTIMIZERS)}")
    dtype = str(params.get("update_dtype", "f32")).lower()
    if dtype not in UPDATE_DTYPES:
        raise ValueError(f"update_dtype={dtype!r}: use one of {', '.join(UPDATE_DTYPES)}")
    mu = float(params.get("prox_mu", 0.0))
    wd = float(params.get("weight_decay", 0.0))
    clip = float(params.get("grad_clip", 1.0 if opt == "sgd" else 0.0))
    for name, v in (("prox_mu", mu), ("weight_decay", wd), ("grad_clip", clip)):
        if not np.isfinite(v) or v < 0:
            raise ValueError(f"{name}={v} must be finite and >= 0")
    if opt == "sgd" and clip <= 0:
        raise ValueError("optimizer=sgd needs grad_clip > 0: it is what bounds an honest host's delta")
    return {"optimizer": opt, "update_dtype": dtype, "prox_mu": mu, "weight_decay": wd, "grad_clip": clip}


def backprop_norm_bound(job: JobConfig, plan: RoundPlan, n: int) -> float:
    """The largest L2 norm of an honest host's delta over n trainables: `update_norm_bound` when
    the job sets it; else sgd: local_steps x lr x grad_clip (the clipped total gradient, proximal
    term included); adamw: local_steps x lr x 10 x sqrt(n) (per-coordinate step bound). Plus
    half-precision rounding of the reported delta (2^-7 relative for bf16)."""
    explicit = float(job.params.get("update_norm_bound", 0.0))
    if explicit > 0:
        return explicit
    s = plan_settings(plan.params)
    steps, lr = int(plan.local_steps), abs(float(plan.lr))
    bound = steps * lr * (s["grad_clip"] if s["optimizer"] == "sgd" else _ADAM_STEP_BOUND * float(np.sqrt(n)))
    return bound * (1 + 2.0 ** -7) * (1 + 1e-6) + 1e-30


def start_tensor(model):
    """The global trainables as a torch tensor to optimise (a copy; model.params is untouched)."""
    if not hasattr(model, "trainable_tensor"):
        raise RuntimeError("this method trains by backprop: run this host with `edgefed device --backend torch` "
                           "(ONNX devices train forward-only: join a fedkseed or fedmezo job)")
    return model.trainable_tensor(True)


def backprop_steps(model, examples, plan: RoundPlan, seed: int, flat, s: dict, progress: bool = False,
                   opt_state: dict | None = None):
    """plan.local_steps optimiser steps on `flat` (in place): AdamW or SGD, FedProx's proximal term
    around flat's starting value, total-gradient clipping. Returns (losses, batch size).
    opt_state: a dict that keeps the optimiser between calls (a central run scored in slices);
    None = a fresh optimiser, as every federated round starts."""
    import torch

    from ..trainer import progress_bar
    from ..zo import DivergedError

    if not examples:
        raise ValueError("no training examples on this host: check --data")
    bs = min(int(plan.batch_size), len(examples))
    gen = np.random.default_rng(seed)  # the same batch order rule as the ZO trainer
    start = flat.detach().clone()
    opt = (opt_state or {}).get("opt")
    if opt is None:
        opt = (torch.optim.AdamW([flat], lr=plan.lr, weight_decay=s["weight_decay"]) if s["optimizer"] == "adamw"
               else torch.optim.SGD([flat], lr=plan.lr, weight_decay=s["weight_decay"]))
        if opt_state is not None:
            opt_state["opt"] = opt
    losses = []
    lock = getattr(model, "step_lock", None) or contextlib.nullcontext()
    bar = progress_bar(plan.local_steps, f"round {plan.round}", progress)
    try:
        for t in range(int(plan.local_steps)):
            rows = gen.choice(len(examples), size=bs, replace=False)
            batch = model.encode([examples[i] for i in rows])
            with lock:  # virtual hosts sharing one module: one step at a time (TorchModel.step_lock)
                opt.zero_grad(set_to_none=True)
                loss = model.loss_tensor(batch, flat)
                if not torch.isfinite(loss):
                    raise DivergedError(f"loss is {float(loss)} at local step {t}; nothing was sent. Lower lr.")
                total = loss
                if s["prox_mu"] > 0:  # FedProx: stay near the global model
                    total = total + 0.5 * s["prox_mu"] * (flat - start).pow(2).sum()
                total.backward()
                if s["grad_clip"] > 0:
                    torch.nn.utils.clip_grad_norm_([flat], s["grad_clip"])
                opt.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        bar.close()
    return losses, bs


def finite_delta(flat, start) -> np.ndarray:
    from ..zo import DivergedError

    delta = (flat.detach() - start).float().cpu().numpy()
    if not np.all(np.isfinite(delta)):
        raise DivergedError("the local delta has non-finite values; nothing was sent. Lower lr.")
    return delta


class FedAvgClient(ClientAlgorithm):
    """Local backprop on a TorchModel (edgefed.backends.torch_model)."""

    def local_train(self, model, examples, plan: RoundPlan, seed: int, progress: bool = False) -> ClientResult:
        s = plan_settings(plan.params)
        flat = start_tensor(model)
        start = flat.detach().clone()
        losses, bs = backprop_steps(model, examples, plan, seed, flat, s, progress)
        delta = finite_delta(flat, start)
        return ClientResult(num_samples=int(plan.local_steps) * bs,
                            tensors=[Tensor.encode_as(DELTA, delta, s["update_dtype"])],
                            train_loss=float(np.mean(losses)))

    def apply_delta(self, model, delta: RoundDelta, plan_params: dict) -> None:
        for t in delta.tensors:
            if t.name != DELTA or t.data.size != model.params.size:
                raise InvalidField(f"fedavg delta {t.name!r} of {t.data.size} values does not fit "
                                   f"{model.params.size} trainables: wrong artifact?")
            model.params += t.float32().reshape(-1)

    def apply_full_state(self, model, tensors: Sequence[Tensor], plan_params: dict) -> None:
        model.reset_params()
        for t in tensors:
            if t.name == "cum_delta":
                model.params += t.float32().reshape(-1)


class FedAvgServer(ServerStrategy):
    def init_state(self, job: JobConfig) -> MethodState:
        exact_dense(job.params)  # refuse a bad exact_sum at creation
        server_opt.ServerOptConfig.from_params(job.params)  # refuse a bad optimiser at creation
        RobustConfig.from_params(job.params, dense=True)
        bound = float(job.params.get("update_norm_bound", 0.0))
        if not np.isfinite(bound) or bound < 0:
            raise ValueError(f"update_norm_bound={bound} must be finite and >= 0 (0: derived)")
        plan_settings(job.params)
        if str(job.params.get("dp_mode", "off")) != "off":
            raise ValueError("fedavg has no DP mode yet; DP-ZO runs with fedkseed / fedmezo")
        return MethodState(scalars={"rounds_aggregated": 0, "n": 0}, arrays={})

    def plan_round(self, job: JobConfig, state: MethodState, round_id: int) -> PlanFields:
        p = job.params
        keep = ("optimizer", "update_dtype", "prox_mu", "weight_decay", "grad_clip")
        return PlanFields(lr=job.lr, local_steps=job.local_steps, batch_size=job.batch_size,
                          params={"run_seed": int(job.seed), **{k: p[k] for k in keep if k in p}})

    def validate_update(self, job, state: MethodState, plan: RoundPlan, update: Update) -> None:
        # one flat float tensor "delta" (f32 / bf16 / f16), nothing else (no seeds: not a ZO method)
        ts = expect_tensors(update.tensors, {DELTA: (UPDATE_DTYPES, 1)}, f"fedavg update from {update.device}")
        n = int(state.scalars.get("n", 0))
        d = ts[DELTA].float32()
        if n and d.size != n:
            raise InvalidField(f"update from {update.device} has {d.size} parameters, the job {n}: the "
                               f"host runs another artifact")
        check_num_samples(plan, update)
        d64 = d.astype(np.float64)
        norm = float(np.sqrt(np.dot(d64, d64)))
        bound = backprop_norm_bound(job, plan, d.size)
        if not norm <= bound:
            raise InvalidField(f"update from {update.device}: delta L2 norm {norm:.6g} exceeds the bound "
                               f"{bound:.6g} (update_norm_bound, or derived from lr x local_steps x the "
                               f"optimiser's step bound); rejected")

    def start_round(self, job: JobConfig, state: MethodState, plan: RoundPlan) -> RoundAccumulator:
        cfg = RobustConfig.from_params(job.params, dense=True)
        if cfg.aggregator == "mean":
            return self._exact_mean(job, state, plan, cfg.norm_clip)
        return super().start_round(job, state, plan)

    def partials_unsupported(self, job: JobConfig):
        if type(self).start_round is not FedAvgServer.start_round:  # subclasses that buffer (hetlora)
            return super().partials_unsupported(job)
        return split_refusal(job.params, dense=True)

    def _exact_mean(self, job: JobConfig, state: MethodState, plan: RoundPlan, norm_clip: float):
        """sum_i w_i clip(d_i) / sum_i w_i, added as updates stream in (server memory does not grow with
        the hosts); with exact_sum=1 exact, so any order or split between workers gives the same bits."""
        return dense_mean(job.params, lambda u: clip_to_norm(u.tensors[0].float32().reshape(-1), norm_clip),
                          lambda avg: self.apply_mean(job, state.copy(), plan, avg))

    def aggregate(self, job, state: MethodState, plan: RoundPlan, updates: Sequence[Update]):
        if not updates:
            raise ValueError("aggregate needs at least one update (the engine enforces min_devices >= 1)")
        cfg = RobustConfig.from_params(job.params, dense=True)
        ordered = sorted(updates, key=lambda u: u.device)
        if cfg.aggregator == "mean":
            acc = self._exact_mean(job, state, plan, cfg.norm_clip)
            for u in ordered:
                acc.add(u)
            return acc.finalize()
        avg = aggregate_dense([u.tensors[0].float32().reshape(-1) for u in ordered],
                              [u.num_samples for u in ordered], cfg)
        return self.apply_mean(job, state.copy(), plan, avg)

    @staticmethod
    def apply_mean(job: JobConfig, state: MethodState, plan: RoundPlan, avg: np.ndarray):
        """The server optimiser's step from the round's mean client delta; state is modified."""
        ocfg = server_opt.ServerOptConfig.from_params(job.params)
        opt_state = {k: v for k, v in state.arrays.items() if k.startswith("opt_")}
        step, opt_state = server_opt.server_step(ocfg, opt_state, avg.astype(np.float32))
        step = np.ascontiguousarray(step, dtype=np.float32)
        state.arrays.update(opt_state)
        cum = state.arrays.get("cum_delta")
        state.arrays["cum_delta"] = step.copy() if cum is None else (cum + step).astype(np.float32)
        state.scalars["n"] = int(step.size)
        state.scalars["rounds_aggregated"] = int(state.scalars.get("rounds_aggregated", 0)) + 1
        return state, RoundDelta(round=plan.round, tensors=[Tensor(DELTA, step)])

    def full_state(self, job, state: MethodState) -> list[Tensor]:
        return cum_delta_state(state)

    def summary(self, state: MethodState) -> dict:
        return cum_delta_summary(state)
