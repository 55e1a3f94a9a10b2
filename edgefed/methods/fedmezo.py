"""FedMeZO-style: MeZO on a small trainable set (LoRA / soft prompt) on each device, with the
resulting parameter deltas averaged FedAvg-style on the server. More bytes than FedKSeed
(the whole adapter each way) but no seed pool and no replay cost."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..protocol import InvalidField, RoundDelta, RoundPlan, Tensor, Update
from ..security import dp
from ..security.robust import RobustConfig, aggregate_dense, clip_to_norm
from ..trainer import LocalTrainer
from .base import (ClientAlgorithm, ClientResult, JobConfig, MethodState, PlanFields, SecureSpec, ServerStrategy,
                   check_num_samples, cum_delta_state, cum_delta_summary, expect_tensors)
from .partials import dense_mean, exact_dense, split_refusal
from .fedkseed import (DP_TAIL, check_job_bounds, dp_denominator, max_probes, probe_bound, space_of, zo_config, zo_plan,
                       zo_plan_params)

__all__ = ["FedMeZOClient", "FedMeZOServer", "delta_norm_bound"]

DELTA = "delta"
# float32 rounding of the parameters (|theta| < 16: 3 kernel passes of half an ulp <= 2^-18) per
# probe and element, so that an honest delta of tiny coefficients is never over the bound
_ROUNDING_SLACK = 2.0 ** -18


def delta_norm_bound(job: JobConfig, plan: RoundPlan, n: int) -> float:
    """The largest L2 norm of an honest delta over n trainables: `update_norm_bound` when the job
    sets it, else derived. A probe moves theta by (lr/q) |g| ||z|| with |g| <= probe_bound(job)
    and ||z|| <= sqrt(n) + 10 (rademacher: exactly sqrt(n); normal: P(more) < e^-50), and a round
    runs local_steps x q probes, so ||delta|| <= lr x bound x local_steps x (sqrt(n) + 10),
    plus float32 rounding."""
    explicit = float(job.params.get("update_norm_bound", 0.0))
    if explicit > 0:
        return explicit
    q = max_probes(plan.params)
    steps = int(plan.local_steps)
    root = float(np.sqrt(n))
    dcfg = dp.DPConfig.from_params(job.params)
    if dcfg.local:  # clipped to C, plus N(0, (sigma C)^2 I_n): norm <= sigma C (sqrt(n) + 10) w.p. 1 - e^-50
        return (dcfg.clip + dcfg.noise_std * (root + DP_TAIL)) * (1 + 1e-3) + root * 2.0 ** -24 * (dcfg.clip + 1.0)
    return (abs(float(plan.lr)) * probe_bound(job) * steps * (root + 10.0) * (1 + 1e-3)
            + steps * q * root * _ROUNDING_SLACK)


def _artifact_trainables(job: JobConfig) -> int:
    """The trainable count from the job's artifact manifest (a secure round's vector length)."""
    from ..export.artifact import read_manifest
    try:
        return int(read_manifest(job.artifact)["n_trainable"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"secure aggregation needs the job's artifact on the server to size the vectors: "
                         f"{job.artifact}/manifest.json: {e}") from None


class FedMeZOClient(ClientAlgorithm):
    def __init__(self, noise_seed: int | None = None):
        # local DP noise: os.urandom-seeded unless a seed is given (tests only; see dp.device_rng)
        self.noise_seed = noise_seed

    def local_train(self, model, examples, plan: RoundPlan, seed: int, progress: bool = False) -> ClientResult:
        # Fresh seeds every round and device: the pool only names them.
        zp = zo_plan(plan)
        pool = zp.pool
        start = model.params.copy()
        try:
            acc = LocalTrainer(model, pool, zo_config(plan.lr, zp.eps, plan.params), progress,
                               space=space_of(model, plan.params)).train(
                examples, plan.local_steps, batch_size=plan.batch_size, seed=seed, desc=f"round {plan.round}")
            delta = model.params - start
        finally:
            model.params[:] = start
        dcfg = dp.DPConfig.from_params(plan.params)
        if dcfg.local:  # the round's delta clipped to L2 norm dp_clip, plus N(0, (sigma C)^2) per value
            delta = dp.privatize_vector(delta, dcfg.clip, dcfg.noise_multiplier,
                                        dp.device_rng(self.noise_seed)).astype(np.float32)
        return ClientResult(num_samples=plan.local_steps * min(plan.batch_size, len(examples)),
                            tensors=[Tensor(DELTA, delta)], train_loss=acc.mean_loss())

    def apply_delta(self, model, delta: RoundDelta, plan_params: dict) -> None:
        for t in delta.tensors:
            if t.name != DELTA or t.data.size != model.params.size:
                raise InvalidField(f"fedmezo delta {t.name!r} of {t.data.size} values does not fit "
                                   f"{model.params.size} trainables: wrong artifact?")
            model.params += t.data.reshape(-1)

    def apply_full_state(self, model, tensors: Sequence[Tensor], plan_params: dict) -> None:
        model.reset_params()
        for t in tensors:
            if t.name == "cum_delta":
                model.params += t.data.reshape(-1)

    def secure_vector(self, result: ClientResult, plan: RoundPlan) -> np.ndarray:
        """[w * delta, w]: the sample-weighted delta and the weight (their sums give the mean)."""
        w = float(result.num_samples)
        d = result.tensors[0].data.reshape(-1).astype(np.float64)
        return np.concatenate([w * d, [w]])


class FedMeZOServer(ServerStrategy):
    def init_state(self, job: JobConfig) -> MethodState:
        exact_dense(job.params)  # refuse a bad exact_sum at creation
        check_job_bounds(job, dense=True)
        bound = float(job.params.get("update_norm_bound", 0.0))
        if not np.isfinite(bound) or bound < 0:
            raise ValueError(f"update_norm_bound={bound} must be finite and >= 0 (0: derived from lr, "
                             f"scalar_bound / clip and local_steps)")
        dstate = dp.state_scalars(dp.DPConfig.from_params(job.params), int(job.devices_per_round), 1)
        return MethodState(scalars={"rounds_aggregated": 0, "n": 0, **dstate}, arrays={})

    def plan_round(self, job: JobConfig, state: MethodState, round_id: int) -> PlanFields:
        return PlanFields(lr=job.lr, local_steps=job.local_steps, batch_size=job.batch_size,
                          params=zo_plan_params(job, seed_pool_id=job.seed_pool_id + round_id))

    def validate_update(self, job, state: MethodState, plan: RoundPlan, update: Update) -> None:
        ts = expect_tensors(update.tensors, {DELTA: (("f32",), 1)}, f"fedmezo update from {update.device}")
        n = int(state.scalars.get("n", 0))
        if n and ts[DELTA].data.size != n:
            raise InvalidField(f"update from {update.device} has {ts[DELTA].data.size} parameters, the job "
                               f"{n}: the device runs another artifact")
        if not np.all(np.isfinite(ts[DELTA].data)):
            raise InvalidField(f"update from {update.device} has non-finite parameter deltas")
        check_num_samples(plan, update)
        d = ts[DELTA].data.astype(np.float64)
        norm = float(np.sqrt(np.dot(d, d)))
        bound = delta_norm_bound(job, plan, d.size)
        if not norm <= bound:  # also catches an overflow to inf
            src = ("update_norm_bound" if float(job.params.get("update_norm_bound", 0.0)) > 0 else
                   f"lr {plan.lr:g} x |g| <= {probe_bound(job):g} x local_steps {plan.local_steps} x "
                   f"(sqrt({d.size}) + 10)")
            raise InvalidField(f"update from {update.device}: delta L2 norm {norm:.6g} exceeds the bound "
                               f"{bound:.6g} ({src}); rejected")

    def aggregate(self, job, state: MethodState, plan: RoundPlan, updates: Sequence[Update]):
        if not updates:
            raise ValueError("aggregate needs at least one update (the engine enforces min_devices >= 1)")
        state = state.copy()
        cfg = RobustConfig.from_params(job.params, dense=True)
        ordered = sorted(updates, key=lambda u: u.device)
        dcfg = dp.DPConfig.from_params(job.params)
        if dcfg.central:  # DP-FedAvg: sum of deltas clipped to C, + N(0, (sigma C)^2 I), / fixed count
            total = None
            for u in ordered:
                c = clip_to_norm(u.tensors[0].data.reshape(-1), dcfg.clip)
                total = c if total is None else total + c
            if dcfg.noise_std > 0:
                total = total + dp.central_rng(job.seed, plan.round).normal(0.0, dcfg.noise_std, total.size)
            avg = total / dp_denominator(job, len(ordered))
        elif cfg.aggregator == "mean":  # exact sums (start_round)
            acc = self._exact_mean(job, state, plan, cfg.norm_clip)
            for u in ordered:
                acc.add(u)
            return acc.finalize()
        else:
            avg = aggregate_dense([u.tensors[0].data for u in ordered], [u.num_samples for u in ordered], cfg)
        return self._apply(state, plan, avg)

    def start_round(self, job: JobConfig, state: MethodState, plan: RoundPlan):
        cfg = RobustConfig.from_params(job.params, dense=True)
        if cfg.aggregator == "mean" and not dp.DPConfig.from_params(job.params).central:
            return self._exact_mean(job, state, plan, cfg.norm_clip)
        return super().start_round(job, state, plan)

    def partials_unsupported(self, job: JobConfig):
        return split_refusal(job.params, dense=True)

    def _exact_mean(self, job: JobConfig, state: MethodState, plan: RoundPlan, norm_clip: float):
        """The sample-weighted mean of the deltas as updates stream in (exact with exact_sum=1)."""
        return dense_mean(job.params, lambda u: clip_to_norm(u.tensors[0].data.reshape(-1), norm_clip),
                          lambda avg: self._apply(state.copy(), plan, avg))

    @staticmethod
    def _apply(state: MethodState, plan: RoundPlan, avg: np.ndarray):
        avg32 = avg.astype(np.float32)
        cum = state.arrays.get("cum_delta")
        state.arrays["cum_delta"] = avg32.copy() if cum is None else (cum + avg32).astype(np.float32)
        state.scalars["n"] = int(avg32.size)
        state.scalars["rounds_aggregated"] = int(state.scalars.get("rounds_aggregated", 0)) + 1
        return state, RoundDelta(round=plan.round, tensors=[Tensor(DELTA, avg32)])

    def secure_spec(self, job: JobConfig, plan: RoundPlan) -> SecureSpec:
        n = _artifact_trainables(job)
        cap = int(plan.local_steps) * int(plan.batch_size)
        return SecureSpec(length=n + 1, bound=float(cap) * delta_norm_bound(job, plan, n))

    def aggregate_secure(self, job, state: MethodState, plan: RoundPlan, total: np.ndarray,
                         updates: Sequence[Update]):
        weight = float(total[-1])
        if not weight > 0:
            raise ValueError(f"secure sum carries total weight {weight}; expected the survivors' samples")
        return self._apply(state.copy(), plan, total[:-1] / weight)

    def full_state(self, job, state: MethodState) -> list[Tensor]:
        return cum_delta_state(state)

    def summary(self, state: MethodState) -> dict:
        return {**cum_delta_summary(state), **dp.summary(state.scalars)}
