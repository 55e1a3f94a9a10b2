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
from ..security import dp
from ..security.robust import RobustConfig, aggregate_sparse, clip_to_norm
from ..snapshot import MEMORY_LIMIT_BYTES, ParamSnapshot
from ..trainer import LocalTrainer
from ..zo import ScalarAccumulator, SeedPool, ZOConfig, pro_probabilities
from .base import (ClientAlgorithm, ClientResult, JobConfig, MethodState, PlanFields, SecureSpec,
                   ServerStrategy, check_num_samples)

__all__ = ["FedKSeedClient", "FedKSeedServer", "DEFAULT_SCALAR_BOUND", "probe_bound", "check_job_bounds",
           "dp_denominator", "DP_TAIL"]

# |g| of one probe, g = (L+ - L-) / (2 eps), that no healthy device reaches: a cross-entropy that
# moves by 20 nats between theta +- eps z with eps = 1e-3 (docs/server.md, "Bounds").
DEFAULT_SCALAR_BOUND = 1e4
# float32 rounding slack when checking device scalars against a bound
_REL_TOL = 1e-6

# Trainables up to this size are copied in memory for the restore after local training; bigger
# ones (full-parameter) to a file (edgefed.snapshot): exact either way.
SNAPSHOT_LIMIT_BYTES = MEMORY_LIMIT_BYTES

# Gaussian tail used to size bounds that DP noise must fit in: P(|N(0, s^2)| > DP_TAIL s) < e^-50.
DP_TAIL = 10.0

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
            "clip": float(p.get("clip", 0.0)), "run_seed": int(job.seed),
            **({"probe": str(p["probe"])} if "probe" in p else {}),
            **dp.DPConfig.from_params(p).plan_params()}


def probe_bound(job: JobConfig) -> float:
    """The largest |g| one probe of an honest device can report: the job's `clip` when set (the
    device clips to it), else `scalar_bound` (default DEFAULT_SCALAR_BOUND). With local DP
    (dp_mode=local) the device adds unbounded Gaussian noise after clipping, so only
    `scalar_bound` holds (check_job_bounds makes sure it is >> dp_clip + noise)."""
    bound = float(job.params.get("scalar_bound", DEFAULT_SCALAR_BOUND))
    clip = float(job.params.get("clip", 0.0))
    if dp.DPConfig.from_params(job.params).local:
        return bound
    return min(clip, bound) if clip > 0 else bound


def check_job_bounds(job: JobConfig, *, dense: bool) -> RobustConfig:
    """Refuse a job whose bound / aggregation params make no sense (at job creation)."""
    cfg = RobustConfig.from_params(job.params, dense=dense)
    try:
        bound = float(job.params.get("scalar_bound", DEFAULT_SCALAR_BOUND))
        clip = float(job.params.get("clip", 0.0))
    except (TypeError, ValueError):
        raise ValueError("job params scalar_bound and clip must be numbers") from None
    if not (np.isfinite(bound) and bound > 0):
        raise ValueError(f"scalar_bound={bound} must be finite and > 0")
    if not np.isfinite(clip) or clip < 0:
        raise ValueError(f"clip={clip} must be finite and >= 0 (0: off)")
    if clip > bound:
        raise ValueError(f"clip={clip} exceeds scalar_bound={bound}: devices would send scalars the "
                         f"server rejects; raise scalar_bound too")
    dcfg = dp.DPConfig.from_params(job.params)
    dcfg.sampling_rate(int(job.devices_per_round))  # devices_per_round <= dp_population
    if dcfg.central and cfg.aggregator != "mean":
        raise ValueError(f"dp_mode=central needs aggregator=mean (the accountant's sensitivity is that of "
                         f"the sum of clipped updates), not {cfg.aggregator!r}")
    if dcfg.local and not dense:
        worst = dcfg.clip + DP_TAIL * dcfg.noise_std
        if worst > bound:
            raise ValueError(f"dp_clip={dcfg.clip:g} with dp_noise_multiplier={dcfg.noise_multiplier:g}: a "
                             f"noisy probe reaches {worst:g} (clip + {DP_TAIL:g} sigma), beyond scalar_bound="
                             f"{bound:g}; honest devices would be rejected: raise scalar_bound")
    return cfg


def dp_denominator(job: JobConfig, n_updates: int) -> int:
    """Central DP divides the noisy sum by a fixed count (DP-FedAvg), not by the round's updates:
    devices_per_round, else dp_population, else (every device, q = 1) the updates received."""
    if int(job.devices_per_round) > 0:
        return int(job.devices_per_round)
    pop = int(float(job.params.get("dp_population", 0) or 0))
    return pop if pop > 0 else max(1, int(n_updates))


def check_scalars(job: JobConfig, plan: RoundPlan, update: Update) -> None:
    """Each reported scalar is the sum of the g of the probes that drew that seed; every probe has
    |g| <= probe_bound(job) and a device runs S = local_steps x n_perturb probes. So an honest
    update has sum |g_j| <= bound x S and, as each of its n seeds took at least one probe,
    |g_j| <= bound x (S - n + 1). Anything beyond is rejected (not clipped)."""
    b = probe_bound(job)
    clip = float(job.params.get("clip", 0.0))
    what = f"clip {b:g}" if 0 < clip <= b else f"scalar_bound {b:g}"
    q = max(1, int(plan.params.get("n_perturb", 1)))
    probes = int(plan.local_steps) * q
    a = np.abs(update.scalars.astype(np.float64))
    n = int(a.size)
    per_seed = b * max(1, probes - n + 1)
    worst = int(np.argmax(a))
    if a[worst] > per_seed * (1 + _REL_TOL):
        raise InvalidField(
            f"update from {update.device}: scalar {float(update.scalars[worst]):.6g} for seed index "
            f"{int(update.seeds[worst])} is out of bounds: each probe has |g| <= {what}, and with "
            f"{probes} probes (local_steps {plan.local_steps} x n_perturb {q}) over {n} seeds one seed "
            f"sums at most {probes - n + 1} of them, |g| <= {per_seed:g}")
    total = float(a.sum())
    if total > b * probes * (1 + _REL_TOL):
        raise InvalidField(
            f"update from {update.device}: sum of |scalars| {total:.6g} is out of bounds: {probes} "
            f"probes (local_steps {plan.local_steps} x n_perturb {q}) of |g| <= {what} sum to at "
            f"most {b * probes:g}")


def zo_config(lr: float, eps: float, params: dict) -> ZOConfig:
    return ZOConfig(lr=lr, eps=eps, n_perturb=int(params.get("n_perturb", 1)),
                    dist=str(params.get("dist", "normal")), clip=float(params.get("clip", 0.0)),
                    probe=str(params.get("probe", "auto")))


class FedKSeedClient(ClientAlgorithm):
    def __init__(self, noise_seed: int | None = None):
        # local DP noise: os.urandom-seeded unless a seed is given (tests only; see dp.device_rng)
        self.noise_seed = noise_seed

    def local_train(self, model, examples, plan: RoundPlan, seed: int, progress: bool = False) -> ClientResult:
        pool = seed_pool(plan.seed_pool_id, plan.k)
        cfg = zo_config(plan.lr, plan.eps, plan.params)
        noise_gen = None
        dcfg = dp.DPConfig.from_params(plan.params)
        if dcfg.local:  # DP-ZO: every probe's g clipped to dp_clip, plus N(0, (sigma C)^2)
            cfg.clip = min(cfg.clip, dcfg.clip) if cfg.clip > 0 else dcfg.clip
            cfg.noise_std = dcfg.noise_std
            noise_gen = dp.device_rng(self.noise_seed)
        snapshot = ParamSnapshot(model.params, memory_limit=SNAPSHOT_LIMIT_BYTES)
        trainer = LocalTrainer(model, pool, cfg, progress=progress)
        acc = ScalarAccumulator(plan.k)
        try:
            trainer.train(examples, plan.local_steps, batch_size=plan.batch_size, seed=seed,
                          probs=plan.seed_probs, desc=f"round {plan.round}", acc=acc, noise_gen=noise_gen)
        finally:
            # Back to the global state (also after a failed step), bit for bit: the aggregated
            # delta is what moves this device forward.
            snapshot.restore(model.params)
            snapshot.close()
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

    def secure_vector(self, result: ClientResult, plan: RoundPlan) -> np.ndarray:
        """[w * G_0 .. w * G_{K-1}, w]: the per-seed sums of this device's scalars over the whole
        pool, weighted by its samples, and the weight, so the sum gives the weighted mean."""
        w = float(result.num_samples)
        v = np.bincount(result.seeds.astype(np.int64), weights=result.scalars.astype(np.float64),
                        minlength=int(plan.k))
        return np.concatenate([w * v, [w]])


class FedKSeedServer(ServerStrategy):
    def init_state(self, job: JobConfig) -> MethodState:
        k = int(job.k)
        SeedPool(job.seed_pool_id, k)  # validates K
        check_job_bounds(job, dense=False)
        probes = int(job.local_steps) * max(1, int(job.params.get("n_perturb", 1)))
        dstate = dp.state_scalars(dp.DPConfig.from_params(job.params), int(job.devices_per_round), probes)
        return MethodState(scalars={"rounds_aggregated": 0, **dstate},
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
        check_num_samples(plan, update)
        check_scalars(job, plan, update)

    def aggregate(self, job, state: MethodState, plan: RoundPlan, updates: Sequence[Update]):
        if not updates:
            raise ValueError("aggregate needs at least one update (the engine enforces min_devices >= 1)")
        state = state.copy()
        k = int(job.k)
        cfg = RobustConfig.from_params(job.params, dense=False)
        ordered = sorted(updates, key=lambda u: u.device)
        dcfg = dp.DPConfig.from_params(job.params)
        if dcfg.central:
            # Each device's per-seed vector clipped to L2 norm C, summed in device order, plus
            # N(0, (sigma C)^2) on EVERY seed of the pool (which seeds a device drew is no secret
            # of its data, but it would tell who took part), over a fixed count.
            S = np.zeros(k, np.float64)
            for u in ordered:
                v = np.bincount(u.seeds.astype(np.int64), weights=u.scalars.astype(np.float64), minlength=k)
                S += clip_to_norm(v, dcfg.clip)
            if dcfg.noise_std > 0:
                S += dp.central_rng(job.seed, plan.round).normal(0.0, dcfg.noise_std, k)
            G = S / dp_denominator(job, len(ordered))
            # FedKSeed-Pro statistics from the released aggregate only (post-processing)
            state.arrays["abs_sum"] += np.abs(G)
            state.arrays["counts"] += 1
        elif cfg.aggregator == "mean":  # sample-weighted; a device that did not draw seed j adds 0
            total = float(sum(u.num_samples for u in ordered))
            G = np.zeros(k, np.float64)
            for u in ordered:
                idx = u.seeds.astype(np.int64)
                g = clip_to_norm(u.scalars, cfg.norm_clip) if cfg.norm_clip > 0 else u.scalars.astype(np.float64)
                np.add.at(G, idx, (u.num_samples / total) * g)
                np.add.at(state.arrays["abs_sum"], idx, np.abs(g))
                np.add.at(state.arrays["counts"], idx, 1)
        else:  # per seed over the devices that drew it (edgefed.security.robust.aggregate_sparse)
            agg = aggregate_sparse(k, [u.seeds for u in ordered], [u.scalars for u in ordered], cfg)
            G = agg.value
            state.arrays["abs_sum"] += agg.abs_value
            state.arrays["counts"] += agg.voters
        return self._apply(job, state, plan, G)

    def _apply(self, job, state: MethodState, plan: RoundPlan, G: np.ndarray, stats_from_aggregate: bool = False):
        """The round's coefficients from the per-seed aggregate G (and Pro's statistics from G
        itself when the per-device values are not known: central DP, secure aggregation)."""
        if stats_from_aggregate:
            nz_g = np.flatnonzero(G)
            state.arrays["abs_sum"][nz_g] += np.abs(G[nz_g])
            state.arrays["counts"][nz_g] += 1
        q = int(plan.params.get("n_perturb", 1))
        coeff = (-float(plan.lr) / q * float(job.params.get("server_lr", 1.0))) * G
        nz = np.flatnonzero(coeff).astype(np.uint32)
        c32 = coeff[nz].astype(np.float32)
        state.arrays["cum_coeffs"][nz] += c32.astype(np.float64)
        state.scalars["rounds_aggregated"] = int(state.scalars.get("rounds_aggregated", 0)) + 1
        return state, RoundDelta(round=plan.round, seeds=nz, coeffs=c32)

    def secure_spec(self, job: JobConfig, plan: RoundPlan) -> SecureSpec:
        # one seed sums at most all probes of the round: |w * G_j| <= cap * bound * probes
        cap = int(plan.local_steps) * int(plan.batch_size)
        probes = int(plan.local_steps) * max(1, int(plan.params.get("n_perturb", 1)))
        return SecureSpec(length=int(plan.k) + 1, bound=float(cap) * probe_bound(job) * probes)

    def aggregate_secure(self, job, state: MethodState, plan: RoundPlan, total: np.ndarray,
                         updates: Sequence[Update]):
        k = int(job.k)
        weight = float(total[k])
        if not weight > 0:
            raise ValueError(f"secure sum carries total weight {weight}; expected the survivors' samples")
        return self._apply(job, state.copy(), plan, total[:k] / weight, stats_from_aggregate=True)

    def full_state(self, job, state: MethodState) -> list[Tensor]:
        return [Tensor("cum_coeffs", state.arrays["cum_coeffs"].astype(np.float32))]

    def summary(self, state: MethodState) -> dict:
        cum = state.arrays["cum_coeffs"]
        return {"seeds_used": int(np.count_nonzero(cum)), "coeff_norm": float(np.linalg.norm(cum)),
                "rounds_aggregated": int(state.scalars.get("rounds_aggregated", 0)),
                **dp.summary(state.scalars)}
