"""FLoRA (Wang et al. 2024): federated LoRA by stacking, exact for any mix of ranks, by backprop
on torch hosts.

Averaging LoRA factors (mean A, mean B) does not give the mean update: mean(B) mean(A) !=
mean(B A). FLoRA sends the stacked factors instead: A_s = [A_1; ...; A_n] and
B_s = [w_1 B_1, ..., w_n B_n], whose product is exactly sum_i w_i B_i A_i. Every replica merges
scale * B_s A_s into the frozen target weights, and each round every host trains a fresh
adapter (the artifact's initial A, B = 0) on the merged model, at its own rank (per device
class from the plan's `assign` rule: `{"raspberry-pi-4": {"rank": 2}, "*": {"rank": 8}}`).

On the wire: up, the host's adapter (one flat tensor in the artifact's layout, components past
its rank zero) and its rank; down, the round's stack (A_s then B_s per module, manifest order)
and the ranks that built it: sum r_i x (in + out) values per module, not the dense out x in.
The merge is computed in numpy with elementwise float64 operations in a fixed order
(sum over the stack of outer products), so every host gets the same bits whatever its BLAS or
GPU. The frozen weights live in the model (TorchModel.merge_into_base): ONNX devices cannot
merge into their graph and do not take part; the server's parameter digest covers the
adapter, which restarts each round, so hosts prove the merged weights only by training on them
(a drifted host's updates still aggregate; a late host catches up by replaying the stored
stacks in order).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..protocol import InvalidField, RoundDelta, RoundPlan, Tensor, Update
from .base import ClientAlgorithm, ClientResult, JobConfig, MethodState, check_num_samples
from .fedavg import backprop_norm_bound, backprop_steps, plan_settings, start_tensor
from .hetlora import (RANK, HetLoRAServer, _r_max, _rank_of, artifact_lora, compact, lora_modules, truncate_flat)

__all__ = ["FLoRAClient", "FLoRAServer", "stack_product"]

ADAPTER, STACK, RANKS = "adapter", "stack", "ranks"


def stack_product(A_s: np.ndarray, B_s: np.ndarray, scale: float) -> np.ndarray:
    """scale * B_s @ A_s in float64 as a sum of outer products in stack order: every operation
    an IEEE-rounded elementwise one, so the bits do not depend on BLAS, threads or hardware."""
    out = np.zeros((B_s.shape[0], A_s.shape[1]), np.float64)
    for k in range(A_s.shape[0]):
        out += np.multiply.outer(B_s[:, k].astype(np.float64), A_s[k].astype(np.float64))
    return out * float(scale)


class FLoRAClient(ClientAlgorithm):
    state_is_trainables = False  # the global model is the merged frozen weights

    def local_train(self, model, examples, plan: RoundPlan, seed: int, progress: bool = False) -> ClientResult:
        import torch

        if not hasattr(model, "merge_into_base"):
            raise RuntimeError("flora merges adapters into the frozen weights: run this host with "
                               "`edgefed device --backend torch`")
        s = plan_settings(plan.params)
        start_tensor(model)  # the backend check
        mods = lora_modules(model.manifest)
        r = _rank_of(plan.params, _r_max(mods))
        fresh = truncate_flat(model._init, mods, r)  # a new adapter every round, on the merged model
        flat = torch.from_numpy(fresh.copy()).to(model.device).requires_grad_(True)
        losses, bs = backprop_steps(model, examples, plan, seed, flat, s, progress)
        trained = flat.detach().float().cpu().numpy()
        if not np.all(np.isfinite(trained)):
            from ..zo import DivergedError
            raise DivergedError("the local adapter has non-finite values; nothing was sent. Lower lr.")
        return ClientResult(num_samples=int(plan.local_steps) * bs,
                            tensors=[Tensor(ADAPTER, compact(trained, mods, r)),
                                     Tensor(RANK, np.array([r], np.float32))],
                            train_loss=float(np.mean(losses)))

    def apply_delta(self, model, delta: RoundDelta, plan_params: dict) -> None:
        ts = {t.name: t for t in delta.tensors}
        if not ts:
            return
        if set(ts) != {STACK, RANKS}:
            raise InvalidField(f"flora delta must carry {STACK!r} and {RANKS!r}, got {sorted(ts)}")
        if not hasattr(model, "merge_into_base"):
            return  # the server's replica: the adapter restarts each round, nothing to move
        mods = lora_modules(model.manifest)
        R = int(ts[RANKS].float32().sum())
        stack = ts[STACK].float32()
        want = sum(R * (a[1] + b[0]) for _, _, a, _, b in mods)
        if stack.size != want:
            raise InvalidField(f"flora stack of {stack.size} values; ranks {R} need {want}")
        pos = 0
        for mod in mods:
            name, _, (_, n_in), _, (n_out, _) = mod
            A_s = stack[pos:pos + R * n_in].reshape(R, n_in)
            pos += R * n_in
            B_s = stack[pos:pos + n_out * R].reshape(n_out, R)
            pos += n_out * R
            model.merge_into_base(name, stack_product(A_s, B_s, model.lora_scale))

    def apply_full_state(self, model, tensors, plan_params: dict) -> None:
        raise NotImplementedError(
            "flora has no full-state sync (its global model is the merges, replayed stack by stack): the "
            "stacks did not fit one message or the host is behind the server's kept history; raise "
            "--max-message-mb on the server and every host, and keep --history unlimited")

    def secure_vector(self, result, plan):
        raise NotImplementedError("flora has no secure aggregation")


class FLoRAServer(HetLoRAServer):
    """HetLoRA's job checks and rank settings; its own update, aggregate and delta."""

    def init_state(self, job: JobConfig) -> MethodState:
        st = super().init_state(job)
        st.arrays.pop("global", None)  # the global model is the merged weights, held by the hosts
        return st

    def validate_update(self, job, state: MethodState, plan: RoundPlan, update: Update) -> None:
        a, r = self._ranked_payload(job, state, plan, update, ADAPTER, ("f32",), "flora")
        mods = self._mods(job)
        check_num_samples(plan, update)
        # its movement from the fresh adapter is bounded as any backprop delta
        d = a.astype(np.float64) - truncate_flat(artifact_lora(job.artifact)[1], mods, r)
        bound = backprop_norm_bound(job, plan, a.size)
        if not float(np.linalg.norm(d)) <= bound:
            raise InvalidField(f"update from {update.device}: adapter moved {float(np.linalg.norm(d)):.6g} from "
                               f"its start, more than the bound {bound:.6g}")

    def aggregate(self, job, state: MethodState, plan: RoundPlan, updates: Sequence[Update]):
        if not updates:
            raise ValueError("aggregate needs at least one update")
        state = state.copy()
        mods = self._mods(job)
        ordered = sorted(updates, key=lambda u: u.device)
        ranks, packed = self._packed(ordered, ADAPTER, mods)
        w = np.array([u.num_samples for u in ordered], np.float64)
        w = w / w.sum()
        parts = []
        for j in range(len(mods)):
            parts.append(np.concatenate([mp[j][0] for mp in packed], axis=0).reshape(-1))
            parts.append(np.concatenate([wi * mp[j][1].astype(np.float64) for wi, mp in zip(w, packed)],
                                        axis=1).reshape(-1))
        stack = np.concatenate(parts).astype(np.float32)
        state.scalars["rounds_aggregated"] = int(state.scalars.get("rounds_aggregated", 0)) + 1
        state.scalars["ranks"] = ",".join(map(str, ranks))
        return state, RoundDelta(round=plan.round, tensors=[Tensor(STACK, stack),
                                                           Tensor(RANKS, np.array(ranks, np.float32))])

    def full_state(self, job, state: MethodState) -> list[Tensor]:
        return []

    def summary(self, state: MethodState) -> dict:
        return {"rounds_aggregated": int(state.scalars.get("rounds_aggregated", 0)),
                "ranks": state.scalars.get("ranks", "")}
