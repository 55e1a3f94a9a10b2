"""FedKSeed (Qin et al., 2024) and FedKSeed-Pro: federated full-parameter ZO fine-tuning where
only (seed index, scalar) pairs cross the network.

Devices draw perturbation seeds from a shared pool of K seeds, run local two-point ZO steps,
and report the per-seed sum of projected gradients. The server averages those per seed
(weighted by samples) and broadcasts coefficients c_j = -lr/q * G_j; every device replays them
with the batched kernel. With `pro`, seeds whose scalars have been larger are sampled more.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .. import kernels
from ..protocol import InvalidField, RoundDelta, RoundPlan, Tensor, Update
from ..trainer import LocalTrainer
from ..zo import ScalarAccumulator, SeedPool, ZOConfig, pro_probabilities
from .base import ClientAlgorithm, ClientResult, JobConfig, MethodState, PlanFields, ServerStrategy

__all__ = ["FedKSeedClient", "FedKSeedServer"]

# Trainables up to this size are restored from a copy after local training (exact);
# bigger ones (full-parameter) are restored by replaying the local steps negated.
SNAPSHOT_LIMIT_BYTES = 64 << 20

_pools: dict[tuple[int, int], SeedPool] = {}


def seed_pool(pool_id: int, k: int) -> SeedPool:
    key = (int(pool_id), int(k))
    if key not in _pools:
        _pools[key] = SeedPool(*key)
    return _pools[key]


def zo_plan_params(job: JobConfig) -> dict:
    """The ZO knobs a round plan carries to devices (read back by zo_config), and the job's seed,
    from which devices derive their batch order (so a job is reproducible whatever its id)."""
    p = job.params
    return {"n_perturb": int(p.get("n_perturb", 1)), "dist": str(p.get("dist", "normal")),
            "clip": float(p.get("clip", 0.0)), "run_seed": int(job.seed)}


def zo_config(lr: float, eps: float, params: dict) -> ZOConfig:
    return ZOConfig(lr=lr, eps=eps, n_perturb=int(params.get("n_perturb", 1)),
                    dist=str(params.get("dist", "normal")), clip=float(params.get("clip", 0.0)))


class FedKSeedClient(ClientAlgorithm):
    def local_train(self, model, examples, plan: RoundPlan, seed: int, progress: bool = False) -> ClientResult:
        pool = seed_pool(plan.seed_pool_id, plan.k)
        cfg = zo_config(plan.lr, plan.eps, plan.params)
        snapshot = model.params.copy() if model.params.nbytes <= SNAPSHOT_LIMIT_BYTES else None
        trainer = LocalTrainer(model, pool, cfg, progress=progress)
        acc = ScalarAccumulator(plan.k)
        try:
            trainer.train(examples, plan.local_steps, batch_size=plan.batch_size, seed=seed,
                          probs=plan.seed_probs, desc=f"round {plan.round}", acc=acc)
        finally:
            # Back to the global state (also after a failed step): the aggregated delta is
            # what moves this device forward.
            if snapshot is not None:
                model.params[:] = snapshot
            else:
                hist = acc.history[::-1]
                kernels.replay(model.buffers, [pool.seed(p.seed_index) for p in hist],
                               [-p.coeff for p in hist], cfg.dist)
        idx, g = acc.arrays()
        return ClientResult(num_samples=plan.local_steps * min(plan.batch_size, len(examples)),
                            seeds=idx, scalars=g, train_loss=acc.mean_loss())

    def apply_delta(self, model, delta: RoundDelta, plan_params: dict) -> None:
        if delta.seeds.size == 0:
            return
        k = int(plan_params["k"])
        pool = seed_pool(int(plan_params["seed_pool_id"]), k)
        if int(delta.seeds.max()) >= k:
            raise InvalidField(f"delta seed index {int(delta.seeds.max())} outside the pool of {k}")
        kernels.replay(model.buffers, pool.seeds[delta.seeds.astype(np.int64)], delta.coeffs,
                       str(plan_params.get("dist", "normal")))

    def apply_full_state(self, model, tensors: Sequence[Tensor], plan_params: dict) -> None:
        cum = {t.name: t.data for t in tensors}.get("cum_coeffs")
        k = int(plan_params["k"])
        if cum is None or cum.shape != (k,):
            raise InvalidField(f"full state must hold cum_coeffs of shape ({k},)")
        model.reset_params()
        nz = np.flatnonzero(cum)
        pool = seed_pool(int(plan_params["seed_pool_id"]), k)
        kernels.replay(model.buffers, pool.seeds[nz], cum[nz], str(plan_params.get("dist", "normal")))


class FedKSeedServer(ServerStrategy):
    def init_state(self, job: JobConfig) -> MethodState:
        k = int(job.k)
        SeedPool(job.seed_pool_id, k)  # validates K
        return MethodState(scalars={"rounds_aggregated": 0},
                           arrays={"cum_coeffs": np.zeros(k, np.float64),
                                   "abs_sum": np.zeros(k, np.float64),
                                   "counts": np.zeros(k, np.int64)})

    def plan_round(self, job: JobConfig, state: MethodState, round_id: int) -> PlanFields:
        p = job.params
        probs = None
        if p.get("pro"):
            probs = pro_probabilities(state.arrays["abs_sum"], state.arrays["counts"]).astype(np.float32)
        decay = float(p.get("lr_decay", 1.0))
        return PlanFields(lr=job.lr * decay ** round_id, eps=job.eps, local_steps=job.local_steps,
                          batch_size=job.batch_size, seed_pool_id=job.seed_pool_id, k=job.k,
                          seed_probs=probs, params=zo_plan_params(job))

    def validate_update(self, job, state, plan: RoundPlan, update: Update) -> None:
        if update.seeds.size == 0:
            raise InvalidField(f"update from {update.device} carries no seed scalars")
        if update.seeds.size > plan.local_steps * int(plan.params.get("n_perturb", 1)):
            raise InvalidField(f"update from {update.device} has {update.seeds.size} seeds but the plan "
                               f"allows at most {plan.local_steps} steps x {plan.params.get('n_perturb', 1)}")
        if update.tensors:
            raise InvalidField("fedkseed updates carry scalars only, no tensors")

    def aggregate(self, job, state: MethodState, plan: RoundPlan, updates: Sequence[Update]):
        if not updates:
            raise ValueError("aggregate needs at least one update (the engine enforces min_devices >= 1)")
        state = state.copy()
        k = int(job.k)
        total = float(sum(u.num_samples for u in updates))
        G = np.zeros(k, np.float64)
        for u in sorted(updates, key=lambda u: u.device):
            idx = u.seeds.astype(np.int64)
            np.add.at(G, idx, (u.num_samples / total) * u.scalars.astype(np.float64))
            np.add.at(state.arrays["abs_sum"], idx, np.abs(u.scalars.astype(np.float64)))
            np.add.at(state.arrays["counts"], idx, 1)
        q = int(plan.params.get("n_perturb", 1))
        coeff = (-float(plan.lr) / q * float(job.params.get("server_lr", 1.0))) * G
        nz = np.flatnonzero(coeff).astype(np.uint32)
        c32 = coeff[nz].astype(np.float32)
        state.arrays["cum_coeffs"][nz] += c32.astype(np.float64)
        state.scalars["rounds_aggregated"] = int(state.scalars.get("rounds_aggregated", 0)) + 1
        return state, RoundDelta(round=plan.round, seeds=nz, coeffs=c32)

    def full_state(self, job, state: MethodState) -> list[Tensor]:
        return [Tensor("cum_coeffs", state.arrays["cum_coeffs"].astype(np.float32))]

    def summary(self, state: MethodState) -> dict:
        cum = state.arrays["cum_coeffs"]
        return {"seeds_used": int(np.count_nonzero(cum)), "coeff_norm": float(np.linalg.norm(cum)),
                "rounds_aggregated": int(state.scalars.get("rounds_aggregated", 0))}
