"""FedKSeed (Qin et al., 2024) and FedKSeed-Pro: federated full-parameter ZO fine-tuning where
only (seed index, scalar) pairs cross the network.

Devices draw perturbation seeds from a shared pool of K seeds, run local two-point ZO steps,
and report the per-seed sum of projected gradients. The server averages those per seed
(weighted by samples) and broadcasts coefficients c_j = -lr/q * G_j; every device replays them
with the batched kernel. With `pro`, seeds whose scalars have been larger are sampled more.

On the wire (protocol v2, nothing ZO in the generic messages): the plan's params carry `eps`,
`k` and `seed_pool_id` (with the other ZO knobs), FedKSeed-Pro's sampling probabilities are
the plan tensor "seed_probs" (f32[K]); an update is the tensors "seeds" (u32 seed indices) and
"scalars" (f32, one per index); a delta the tensors "seeds" (u32) and "coeffs" (f32).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..protocol import InvalidField, RoundDelta, RoundPlan, Tensor, Update
from ..security import dp
from ..security.robust import RobustConfig, aggregate_sparse, clip_to_norm
from ..snapshot import MEMORY_LIMIT_BYTES, ParamSnapshot
from ..batching import check_buckets
from ..trainer import LocalTrainer
from ..directions import DirectionSpec, direction_space
from ..zo import ScalarAccumulator, SeedPool, ZOConfig, pro_probabilities
from . import server_opt
from .server_opt import ServerOptConfig
from .base import (ClientAlgorithm, ClientResult, JobConfig, MethodState, PlanFields, SecureSpec,
                   ServerStrategy, check_num_samples, expect_tensors)
from .partials import SeedExactMean, split_refusal

__all__ = ["FedKSeedClient", "FedKSeedServer", "DEFAULT_SCALAR_BOUND", "probe_bound", "check_job_bounds",
           "dp_denominator", "DP_TAIL", "ZOPlan", "zo_plan", "zo_plan_params", "seed_tensors", "seed_pairs",
           "SEEDS", "SCALARS", "COEFFS", "SEED_PROBS"]

# tensor names on the wire
SEEDS, SCALARS, COEFFS, SEED_PROBS = "seeds", "scalars", "coeffs", "seed_probs"
_U64 = (1 << 64) - 1

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


def _i64(v: int) -> int:
    """A u64 (seed pool id) as the i64 a plan param holds (two's complement; read back by zo_plan)."""
    v = int(v) & _U64
    return v - (1 << 64) if v >= 1 << 63 else v


def zo_plan_params(job: JobConfig, seed_pool_id: int | None = None) -> dict:
    """The ZO settings a round plan carries to devices (read back by zo_plan / zo_config): eps, the
    seed pool (k, seed_pool_id), the probe knobs, and the job's seed, from which devices derive
    their batch order (so a job is reproducible whatever its id)."""
    p = job.params
    pool = job.seed_pool_id if seed_pool_id is None else seed_pool_id
    buckets = check_buckets(p.get("length_buckets", 1))
    adaptive = {}
    if int(p.get("n_perturb_max", 0) or 0) > int(p.get("n_perturb", 1)):
        adaptive = {"n_perturb_max": int(p["n_perturb_max"]), "adaptive_tol": float(p.get("adaptive_tol", 0.5))}
    return {"eps": float(job.eps), "k": int(job.k), "seed_pool_id": _i64(pool),
            "n_perturb": int(p.get("n_perturb", 1)), "dist": str(p.get("dist", "normal")),
            "clip": float(p.get("clip", 0.0)), "run_seed": int(job.seed),
            **({"probe": str(p["probe"])} if "probe" in p else {}), **adaptive,
            **({"length_buckets": buckets} if buckets > 1 else {}),  # absent: old plans' bytes
            **DirectionSpec.from_params({**p, "seed_pool_id": pool}).plan_params(),
            **dp.DPConfig.from_params(p).plan_params()}


def max_probes(params: dict) -> int:
    """The most probes one local step may run: n_perturb, or n_perturb_max when adaptive."""
    return max(1, int(params.get("n_perturb", 1)), int(params.get("n_perturb_max", 0) or 0))


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
    from ..assign import ASSIGN_KEY, parse_assign
    for cls, over in parse_assign(job.params.get(ASSIGN_KEY)).items():
        shared = sorted({"k", "seed_pool_id"} & set(over))
        if shared:  # plan params since protocol v2, but every device must draw from the one pool
            raise ValueError(f"assign[{cls!r}] sets {', '.join(shared)}: the seed pool is the job's, shared "
                             f"by every device (set --k / --seed-pool-id for the job)")
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
    DirectionSpec.from_params(job.params)  # mask / lowrank settings
    q, q_max = int(job.params.get("n_perturb", 1)), int(job.params.get("n_perturb_max", 0) or 0)
    if q < 1:
        raise ValueError(f"n_perturb={q} must be >= 1")
    if q_max and q_max <= q:
        raise ValueError(f"n_perturb_max={q_max} must exceed n_perturb={q} (variance-adaptive probes per "
                         f"step between the two), or be 0 (off)")
    check_buckets(job.params.get("length_buckets", 1))
    tol = float(job.params.get("adaptive_tol", 0.5))
    if not (np.isfinite(tol) and tol > 0):
        raise ValueError(f"adaptive_tol={tol} must be > 0")
    opt = ServerOptConfig.from_params(job.params)
    if opt.opt != "fedavg" and cfg.aggregator != "mean":
        raise ValueError(f"server_opt={opt.opt} needs aggregator=mean")
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


class ZOPlan:
    """A ZO plan's method settings, read from its params and tensors and checked (zo_plan)."""

    def __init__(self, k: int, seed_pool_id: int, eps: float, probs: np.ndarray | None):
        self.k, self.seed_pool_id, self.eps, self.probs = k, seed_pool_id, eps, probs

    @property
    def pool(self) -> SeedPool:
        return seed_pool(self.seed_pool_id, self.k)


def _param(params: dict, name: str, kind: type, what: str):
    if name not in params:
        raise InvalidField(f"the {what} plan has no {name!r} param: is the server older than this device?")
    v = params[name]
    if kind is int and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
        raise InvalidField(f"plan param {name}={v!r} must be an integer")
    if kind is float and (isinstance(v, str) or not np.isfinite(float(v))):
        raise InvalidField(f"plan param {name}={v!r} must be a finite number")
    return kind(v)


def pool_params(params: dict, what: str = "ZO") -> tuple[int, int]:
    """(k, seed_pool_id) from a plan's params (or the dict handed to apply_delta), checked."""
    k = _param(params, "k", int, what)
    if not 1 <= k <= SeedPool.MAX_K:
        raise InvalidField(f"plan param k={k} (seed pool size) must be in [1, {SeedPool.MAX_K}]")
    return k, _param(params, "seed_pool_id", int, what) & _U64


def zo_plan(plan: RoundPlan) -> ZOPlan:
    """The ZO settings of a plan (params eps, k, seed_pool_id; tensor seed_probs), checked: what
    protocol v1 checked in the generic RoundPlan."""
    k, pool_id = pool_params(plan.params, plan.method)
    eps = _param(plan.params, "eps", float, plan.method)
    if eps < 0:
        raise InvalidField(f"plan param eps={eps} must be >= 0")
    ts = expect_tensors(plan.tensors, {SEED_PROBS: (("f32",), 1)}, f"{plan.method} plan",
                        optional=(SEED_PROBS,))
    probs = None
    if SEED_PROBS in ts:
        probs = ts[SEED_PROBS].data
        if probs.size != k:
            raise InvalidField(f"seed_probs has {probs.size} entries but K={k}; send one per seed")
        if probs.size and (float(probs.min()) < 0 or float(probs.sum()) <= 0):
            raise InvalidField("seed_probs must be >= 0 with a positive sum")
    return ZOPlan(k, pool_id, eps, probs)


def seed_tensors(seeds: np.ndarray, values: np.ndarray, values_name: str) -> list[Tensor]:
    """(seed indices, one value each) as the tensors "seeds" (u32) and `values_name` (f32)."""
    return [Tensor(SEEDS, np.ascontiguousarray(seeds, dtype=np.uint32).reshape(-1)),
            Tensor(values_name, np.ascontiguousarray(values, dtype=np.float32).reshape(-1))]


def seed_pairs(tensors, values_name: str, what: str, k: int | None = None,
               allow_empty: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The (seeds u32, values f32) pair of an update ("scalars") or a delta ("coeffs"), checked:
    exactly those two 1-D tensors, one value per seed, every seed index < k."""
    if allow_empty and not tensors:
        return np.zeros(0, np.uint32), np.zeros(0, np.float32)
    ts = expect_tensors(tensors, {SEEDS: (("u32",), 1), values_name: (("f32",), 1)}, what)
    seeds, vals = ts[SEEDS].data, ts[values_name].data
    if seeds.size != vals.size:
        raise InvalidField(f"{what}: {seeds.size} seed indices but {vals.size} {values_name}; send one "
                           f"value per seed")
    if k is not None and seeds.size and int(seeds.max()) >= k:
        bad = int(np.flatnonzero(seeds >= k)[0])
        raise InvalidField(f"{what}: seed index {int(seeds[bad])} at position {bad} is out of range "
                           f"for a pool of K={k}")
    return seeds, vals


def update_pairs(u: Update) -> tuple[np.ndarray, np.ndarray]:
    """An accepted update's (seeds, scalars) (validate_update checked them)."""
    return seed_pairs(u.tensors, SCALARS, f"update from {u.device}")


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
    seeds, scalars = update_pairs(update)
    a = np.abs(scalars.astype(np.float64))
    n = int(a.size)
    # variance-adaptive steps run up to n_perturb_max probes but report n_perturb probes' worth
    per_seed = b * max(1, min(probes, int(plan.local_steps) * max_probes(plan.params) - n + 1))
    worst = int(np.argmax(a))
    if a[worst] > per_seed * (1 + _REL_TOL):
        raise InvalidField(
            f"update from {update.device}: scalar {float(scalars[worst]):.6g} for seed index "
            f"{int(seeds[worst])} is out of bounds: each probe has |g| <= {what}, and with "
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
                    n_perturb_max=int(params.get("n_perturb_max", 0) or 0),
                    adaptive_tol=float(params.get("adaptive_tol", 0.5)),
                    dist=str(params.get("dist", "normal")), clip=float(params.get("clip", 0.0)),
                    probe=str(params.get("probe", "auto")),
                    length_buckets=check_buckets(params.get("length_buckets", 1)))


def space_of(model, params: dict):
    """The direction space of the plan (or apply_delta) params on this model's artifact."""
    k, pool_id = pool_params(params)
    try:
        return direction_space(model, {**params, "seed_pool_id": pool_id})
    except ValueError as e:
        raise InvalidField(f"direction settings: {e}") from None


class FedKSeedClient(ClientAlgorithm):
    def __init__(self, noise_seed: int | None = None):
        # local DP noise: os.urandom-seeded unless a seed is given (tests only; see dp.device_rng)
        self.noise_seed = noise_seed

    def local_train(self, model, examples, plan: RoundPlan, seed: int, progress: bool = False) -> ClientResult:
        zp = zo_plan(plan)
        pool = zp.pool
        cfg = zo_config(plan.lr, zp.eps, plan.params)
        noise_gen = None
        dcfg = dp.DPConfig.from_params(plan.params)
        if dcfg.local:  # DP-ZO: every probe's g clipped to dp_clip, plus N(0, (sigma C)^2)
            cfg.clip = min(cfg.clip, dcfg.clip) if cfg.clip > 0 else dcfg.clip
            cfg.noise_std = dcfg.noise_std
            noise_gen = dp.device_rng(self.noise_seed)
        snapshot = ParamSnapshot(model.params, memory_limit=SNAPSHOT_LIMIT_BYTES)
        trainer = LocalTrainer(model, pool, cfg, progress=progress, space=space_of(model, plan.params))
        acc = ScalarAccumulator(zp.k)
        try:
            trainer.train(examples, plan.local_steps, batch_size=plan.batch_size, seed=seed,
                          probs=zp.probs, desc=f"round {plan.round}", acc=acc, noise_gen=noise_gen)
        finally:
            # Back to the global state (also after a failed step), bit for bit: the aggregated
            # delta is what moves this device forward.
            snapshot.restore(model.params)
            snapshot.close()
        idx, g = acc.arrays()
        return ClientResult(num_samples=plan.local_steps * min(plan.batch_size, len(examples)),
                            tensors=seed_tensors(idx, g, SCALARS), train_loss=acc.mean_loss())

    def apply_delta(self, model, delta: RoundDelta, plan_params: dict) -> None:
        k, pool_id = pool_params(plan_params)
        seeds, coeffs = seed_pairs(delta.tensors, COEFFS, f"fedkseed delta of round {delta.round}", k,
                                   allow_empty=True)
        if seeds.size == 0:
            return
        pool = seed_pool(pool_id, k)
        space_of(model, plan_params).replay(model.buffers, pool.seeds[seeds.astype(np.int64)], coeffs,
                                            str(plan_params.get("dist", "normal")))

    def apply_full_state(self, model, tensors: Sequence[Tensor], plan_params: dict) -> None:
        cum = {t.name: t.data for t in tensors}.get("cum_coeffs")
        k, pool_id = pool_params(plan_params)
        if cum is None or cum.shape != (k,):
            raise InvalidField(f"full state must hold cum_coeffs of shape ({k},)")
        model.reset_params()
        nz = np.flatnonzero(cum)
        pool = seed_pool(pool_id, k)
        space_of(model, plan_params).replay(model.buffers, pool.seeds[nz], cum[nz],
                                            str(plan_params.get("dist", "normal")))

    def secure_vector(self, result: ClientResult, plan: RoundPlan) -> np.ndarray:
        """[w * G_0 .. w * G_{K-1}, w]: the per-seed sums of this device's scalars over the whole
        pool, weighted by its samples, and the weight, so the sum gives the weighted mean."""
        w = float(result.num_samples)
        k, _ = pool_params(plan.params)
        seeds, scalars = seed_pairs(result.tensors, SCALARS, "this device's result", k)
        v = np.bincount(seeds.astype(np.int64), weights=scalars.astype(np.float64), minlength=k)
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
        return PlanFields(lr=job.lr * decay ** round_id, local_steps=job.local_steps,
                          batch_size=job.batch_size, params=zo_plan_params(job),
                          tensors=[] if probs is None else [Tensor(SEED_PROBS, probs)])

    def validate_update(self, job, state, plan: RoundPlan, update: Update) -> None:
        zp = zo_plan(plan)
        # exactly "seeds" (u32) and "scalars" (f32), one scalar per seed, every index < K
        seeds, _ = seed_pairs(update.tensors, SCALARS, f"fedkseed update from {update.device}", zp.k)
        if seeds.size == 0:
            raise InvalidField(f"update from {update.device} carries no seed scalars")
        if seeds.size > plan.local_steps * max_probes(plan.params):
            raise InvalidField(f"update from {update.device} has {seeds.size} seeds but the plan "
                               f"allows at most {plan.local_steps} steps x {max_probes(plan.params)}")
        if zp.probs is not None:
            zero = np.flatnonzero(zp.probs[seeds] <= 0)
            if zero.size:
                raise InvalidField(f"update from {update.device} uses seed index {int(seeds[zero[0]])}, which "
                                   f"has sampling probability 0 in round {plan.round}")
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
                seeds, scalars = update_pairs(u)
                v = np.bincount(seeds.astype(np.int64), weights=scalars.astype(np.float64), minlength=k)
                S += clip_to_norm(v, dcfg.clip)
            if dcfg.noise_std > 0:
                S += dp.central_rng(job.seed, plan.round).normal(0.0, dcfg.noise_std, k)
            G = S / dp_denominator(job, len(ordered))
            # FedKSeed-Pro statistics from the released aggregate only (post-processing)
            state.arrays["abs_sum"] += np.abs(G)
            state.arrays["counts"] += 1
        elif cfg.aggregator == "mean":  # sample-weighted, exact: the accumulator's sums (start_round)
            acc = self._exact_mean(job, state, plan, cfg)
            for u in ordered:
                acc.add(u)
            return acc.finalize()
        else:  # per seed over the devices that drew it (edgefed.security.robust.aggregate_sparse)
            pairs = [update_pairs(u) for u in ordered]
            agg = aggregate_sparse(k, [s for s, _ in pairs], [v for _, v in pairs], cfg)
            G = agg.value
            state.arrays["abs_sum"] += agg.abs_value
            state.arrays["counts"] += agg.voters
        return self._apply(job, state, plan, G)

    def start_round(self, job, state: MethodState, plan: RoundPlan):
        cfg = RobustConfig.from_params(job.params, dense=False)
        if cfg.aggregator == "mean" and not dp.DPConfig.from_params(job.params).central:
            return self._exact_mean(job, state, plan, cfg)
        return super().start_round(job, state, plan)

    def partials_unsupported(self, job: JobConfig):
        return split_refusal(job.params, dense=False)

    def _exact_mean(self, job, state: MethodState, plan: RoundPlan, cfg: RobustConfig):
        """The mean aggregator: per seed sum_i n_i g_ij / sum_i n_i with exact sums (so any order or
        split between aggregation workers gives the same bits), plus Pro's statistics."""
        def pairs(u: Update):
            seeds, scalars = update_pairs(u)
            g = clip_to_norm(scalars, cfg.norm_clip) if cfg.norm_clip > 0 else scalars.astype(np.float64)
            return seeds, g

        def finish(G, abs_g, counts):
            new = state.copy()
            new.arrays["abs_sum"] += abs_g
            new.arrays["counts"] += counts
            return self._apply(job, new, plan, G)

        return SeedExactMean(int(job.k), pairs, finish)

    def _apply(self, job, state: MethodState, plan: RoundPlan, G: np.ndarray, stats_from_aggregate: bool = False):
        """The round's coefficients from the per-seed aggregate G (and Pro's statistics from G
        itself when the per-device values are not known: central DP, secure aggregation)."""
        if stats_from_aggregate:
            nz_g = np.flatnonzero(G)
            state.arrays["abs_sum"][nz_g] += np.abs(G[nz_g])
            state.arrays["counts"][nz_g] += 1
        q = int(plan.params.get("n_perturb", 1))
        opt = ServerOptConfig.from_params(job.params)
        if opt.opt == "fedavg":
            coeff = (-float(plan.lr) / q * float(job.params.get("server_lr", 1.0))) * G
        else:  # momentum / Adam over the seed coefficients: still a sum of seeded directions, replayed
            keys = server_opt.state_keys(opt)
            coeff, new = server_opt.server_step(opt, {k: state.arrays[k] for k in keys if k in state.arrays},
                                                ((-float(plan.lr) / q) * G).astype(np.float32))
            state.arrays.update(new)
        nz = np.flatnonzero(coeff).astype(np.uint32)
        c32 = coeff[nz].astype(np.float32)
        state.arrays["cum_coeffs"][nz] += c32.astype(np.float64)
        state.scalars["rounds_aggregated"] = int(state.scalars.get("rounds_aggregated", 0)) + 1
        return state, RoundDelta(round=plan.round, tensors=seed_tensors(nz, c32, COEFFS))

    def secure_spec(self, job: JobConfig, plan: RoundPlan) -> SecureSpec:
        # one seed sums at most all probes of the round: |w * G_j| <= cap * bound * probes
        cap = int(plan.local_steps) * int(plan.batch_size)
        probes = int(plan.local_steps) * max(1, int(plan.params.get("n_perturb", 1)))
        return SecureSpec(length=int(job.k) + 1, bound=float(cap) * probe_bound(job) * probes)

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
