"""HetLoRA (Cho et al. 2024): heterogeneous LoRA ranks across hosts, rank self-pruning, and
sparsity-weighted aggregation, by backprop on torch hosts.

The artifact holds the global adapter at rank r_max (its `lora:r=...`). A host of rank r
trains the truncation to its first r components (the rest set to zero in its local copy, so
they neither contribute nor move) and reports the delta of those components plus its rank.
Ranks come per device class from the plan's `assign` rule (edgefed.assign), e.g.
`--param assign='{"raspberry-pi-4": {"rank": 2}, "*": {"rank": 8}}'`, and shrink on a host
that self-prunes (`prune_gamma`, `prune_tol`: the last gamma of its components carry less
than tol of its update's norm). The server averages each rank component over the hosts that
have it, weighted by the norm of each host's trained product B_i A_i (HetLoRA's sparsity
weighting; `hetlora_weights=samples` weighs by samples instead), so low-rank hosts do not
shrink the components they lack. The delta goes back in float32 to every replica.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from ..protocol import InvalidField, RoundPlan, Tensor, Update
from . import lora_math
from .base import ClientResult, JobConfig, MethodState, PlanFields, check_num_samples, expect_tensors
from .fedavg import (DELTA, UPDATE_DTYPES, FedAvgClient, FedAvgServer, backprop_norm_bound, backprop_steps,
                     finite_delta, plan_settings, start_tensor)

__all__ = ["HetLoRAClient", "HetLoRAServer", "lora_modules"]

RANK = "rank"


def lora_modules(manifest: dict) -> list[tuple[str, slice, tuple, slice, tuple]]:
    """[(module, A slice, A shape (r, in), B slice, B shape (out, r))] of a LoRA artifact's flat
    trainables, in manifest order."""
    if manifest.get("trainable_mode") != "lora":
        raise ValueError(f"hetlora needs a LoRA artifact (export --trainable lora:r=R_MAX,...), this one is "
                         f"{manifest.get('trainable_mode')!r}")
    ent = {t["name"]: t for t in manifest["trainable"]}
    out = []
    for name in ent:
        if name.endswith(".lora_A"):
            mod = name[: -len(".lora_A")]
            a, b = ent[name], ent[mod + ".lora_B"]
            out.append((mod, slice(a["offset"], a["offset"] + a["numel"]), tuple(a["shape"]),
                        slice(b["offset"], b["offset"] + b["numel"]), tuple(b["shape"])))
    return out


def _factors(flat: np.ndarray, mod) -> tuple[np.ndarray, np.ndarray]:
    _, sa, ash, sb, bsh = mod
    return flat[sa].reshape(ash), flat[sb].reshape(bsh)


def _r_max(mods) -> int:
    return int(mods[0][2][0])


def _rank_of(plan_params: dict, r_max: int) -> int:
    r = int(plan_params.get(RANK, r_max))
    if not 1 <= r <= r_max:
        raise ValueError(f"rank={r} must be in [1, {r_max}] (the artifact's LoRA rank)")
    return r


def truncate_flat(flat: np.ndarray, mods, r: int) -> np.ndarray:
    """A copy of the flat trainables with rank components >= r zeroed in every module."""
    out = flat.copy()
    for mod in mods:
        A, B = _factors(out, mod)
        A[r:] = 0.0
        B[:, r:] = 0.0
    return out


def components(flat: np.ndarray, mod, r: int) -> tuple[np.ndarray, np.ndarray]:
    """The first r rank components of one module: (A[:r], B[:, :r]) (views)."""
    A, B = _factors(flat, mod)
    return A[:r], B[:, :r]


def compact(flat: np.ndarray, mods, r: int) -> np.ndarray:
    """The first r rank components of every module, packed (A[:r] then B[:, :r], manifest
    order): what a rank-r host sends, so its bytes scale with its rank."""
    return np.concatenate([x.reshape(-1) for mod in mods for x in components(flat, mod, r)])


def compact_size(mods, r: int) -> int:
    return sum(r * (ash[1] + bsh[0]) for _, _, ash, _, bsh in mods)


def unpack(packed: np.ndarray, mods, r: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """compact()'s inverse, per module: [(A_r (r, in), B_r (out, r))]."""
    out, pos = [], 0
    for _, _, (_, n_in), _, (n_out, _) in mods:
        A = packed[pos:pos + r * n_in].reshape(r, n_in)
        pos += r * n_in
        B = packed[pos:pos + n_out * r].reshape(n_out, r)
        pos += n_out * r
        out.append((A, B))
    return out


def expand(packed: np.ndarray, mods, r: int, n: int) -> np.ndarray:
    """compact()'s inverse into the artifact's full flat layout (components past r zero)."""
    out = np.zeros(n, np.float32)
    for mod, (A, B) in zip(mods, unpack(packed, mods, r)):
        dA, dB = components(out, mod, r)
        dA[:] = A
        dB[:] = B
    return out


@functools.lru_cache(maxsize=8)
def _artifact_lora(path: str, stamp: int) -> tuple[list, np.ndarray]:
    from ..export.artifact import read_manifest, read_trainable
    m = read_manifest(path)
    init = read_trainable(path, m)
    init.flags.writeable = False  # shared by every caller
    return lora_modules(m), init


def artifact_lora(path: str) -> tuple[list, np.ndarray]:
    """(LoRA modules, initial trainables) of an artifact, read once per manifest version (the
    server checks every update against them; re-reading the files per update was I/O in the
    admission path)."""
    from pathlib import Path
    return _artifact_lora(str(path), (Path(path) / "manifest.json").stat().st_mtime_ns)


class HetLoRAClient(FedAvgClient):
    def __init__(self):
        self.pruned: int | None = None  # this host's rank after self-pruning (kept across rounds)

    def local_train(self, model, examples, plan: RoundPlan, seed: int, progress: bool = False) -> ClientResult:
        import torch

        s = plan_settings(plan.params)
        flat_np = start_tensor(model).detach().cpu().numpy()
        mods = lora_modules(model.manifest)
        r = _rank_of(plan.params, _r_max(mods))
        if self.pruned is not None:
            r = min(r, self.pruned)
        start_np = truncate_flat(flat_np, mods, r)
        flat = torch.from_numpy(start_np.copy()).to(model.device).requires_grad_(True)
        start = flat.detach().clone()
        losses, bs = backprop_steps(model, examples, plan, seed, flat, s, progress)
        delta = finite_delta(flat, start)
        gamma, tol = float(plan.params.get("prune_gamma", 0.0)), float(plan.params.get("prune_tol", 0.0))
        if gamma > 0 and tol > 0:  # keep the rank every module can afford to keep
            trained = start_np + delta
            self.pruned = max(lora_math.self_prune(*components(trained, m, r), gamma, tol) for m in mods)
        return ClientResult(num_samples=int(plan.local_steps) * bs,
                            tensors=[Tensor.encode_as(DELTA, compact(delta, mods, r), s["update_dtype"]),
                                     Tensor(RANK, np.array([r], np.float32))],
                            train_loss=float(np.mean(losses)))


class HetLoRAServer(FedAvgServer):
    def init_state(self, job: JobConfig) -> MethodState:
        st = super().init_state(job)
        if str(job.params.get("server_opt", "fedavg")) not in ("fedavg", "none"):
            raise ValueError("hetlora aggregates factors per rank component; it takes no server_opt")
        weights = str(job.params.get("hetlora_weights", "sparsity"))
        if weights not in ("sparsity", "samples"):
            raise ValueError(f"hetlora_weights={weights!r}: use sparsity or samples")
        try:
            _, init = artifact_lora(job.artifact)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"hetlora reads the artifact's LoRA layout and initial adapter on the server: "
                             f"{job.artifact}: {e}") from None
        st.arrays["global"] = init.copy()
        st.scalars["n"] = int(st.arrays["global"].size)
        return st

    def plan_round(self, job: JobConfig, state: MethodState, round_id: int) -> PlanFields:
        pf = super().plan_round(job, state, round_id)
        for k in ("rank", "prune_gamma", "prune_tol"):
            if k in job.params:
                pf.params[k] = job.params[k]
        return pf

    def _mods(self, job: JobConfig):
        return artifact_lora(job.artifact)[0]

    @staticmethod
    def _packed(ordered: Sequence[Update], name: str, mods) -> tuple[list[int], list[list]]:
        """(ranks, per update the per-module (A_r, B_r) of its packed tensor `name`) of
        updates that validate_update admitted."""
        ranks, parts = [], []
        for u in ordered:
            ts = {t.name: t for t in u.tensors}
            r = int(ts[RANK].data[0])
            ranks.append(r)
            parts.append(unpack(ts[name].float32(), mods, r))
        return ranks, parts

    def validate_update(self, job, state: MethodState, plan: RoundPlan, update: Update) -> None:
        d, r = self._ranked_payload(job, state, plan, update, DELTA, UPDATE_DTYPES, "hetlora")
        check_num_samples(plan, update)
        norm = float(np.linalg.norm(d.astype(np.float64)))
        bound = backprop_norm_bound(job, plan, d.size)
        if not norm <= bound:
            raise InvalidField(f"update from {update.device}: delta L2 norm {norm:.6g} exceeds the bound {bound:.6g}")

    def _ranked_payload(self, job, state: MethodState, plan: RoundPlan, update: Update, name: str,
                        dtypes, method: str) -> tuple[np.ndarray, int]:
        """(the payload tensor `name` in the full flat layout, the host's rank) of an update checked
        for rank (1 <= rank <= the plan's) and for the packed size of that rank (compact())."""
        ts = expect_tensors(update.tensors, {name: (dtypes, 1), RANK: (("f32",), 1)},
                            f"{method} update from {update.device}")
        if ts[RANK].data.shape != (1,):
            raise InvalidField(f"{method} update from {update.device} must carry {name!r} and {RANK!r} (one value)")
        mods = self._mods(job)
        r, allowed = float(ts[RANK].data[0]), min(_rank_of(plan.params, _r_max(mods)), _r_max(mods))
        if r != int(r) or not 1 <= r <= allowed:
            raise InvalidField(f"update from {update.device} claims rank {r}; its plan allows 1..{allowed}")
        packed, r = ts[name].float32(), int(r)
        if packed.ndim != 1 or packed.size != compact_size(mods, r):
            raise InvalidField(f"update from {update.device} carries {packed.size} values; rank {r} over this "
                               f"artifact's LoRA modules is {compact_size(mods, r)}")
        d = expand(packed, mods, r, int(state.scalars["n"]))
        return d, int(r)

    def start_round(self, job, state, plan):  # per-component weights need every update: buffered
        from .base import BufferedAccumulator
        return BufferedAccumulator(self, job, state, plan)

    def aggregate(self, job, state: MethodState, plan: RoundPlan, updates: Sequence[Update]):
        if not updates:
            raise ValueError("aggregate needs at least one update")
        state = state.copy()
        mods = self._mods(job)
        r_max = _r_max(mods)
        ordered = sorted(updates, key=lambda u: u.device)
        g = state.arrays["global"]
        ranks, parts = self._packed(ordered, DELTA, mods)
        if str(job.params.get("hetlora_weights", "sparsity")) == "samples":
            w = np.array([u.num_samples for u in ordered], np.float64)
        else:  # ||B_i A_i||_F of each host's trained adapter (global truncation + its delta), all modules
            w = np.array([np.sqrt(sum(
                lora_math.product_fro_norm(*(x + dx for x, dx in zip(components(g, m, r), p))) ** 2
                for m, p in zip(mods, mp))) for r, mp in zip(ranks, parts)])
            if not w.sum() > 0:
                w[:] = 1.0
        step = np.zeros_like(g)
        for j, mod in enumerate(mods):
            A_g, B_g = lora_math.hetlora_aggregate([mp[j][0] for mp in parts], [mp[j][1] for mp in parts], r_max, w)
            _, sa, _, sb, _ = mod
            step[sa] = A_g.reshape(-1)
            step[sb] = B_g.reshape(-1)
        step = step.astype(np.float32)
        # the global adapter as every replica holds it: float32 += float32, as apply_delta does
        state.arrays["global"] = (g + step).astype(np.float32)
        state.scalars["ranks"] = ",".join(map(str, ranks))
        return self.apply_mean(job, state, plan, step)
