"""Server-side LoRA aggregation for gray-box methods: FLoRA stacking and HetLoRA.

Convention: a target layer's LoRA update is scale * B @ A with A of shape (r, in) and
B of shape (out, r); r is the client's rank. All functions work on one layer; a strategy calls
them per target layer. Pure numpy (the server needs no torch for this).

Why more than one rule: averaging the factors (FedAvg on A and B separately) does not average
the updates, since mean(B_i) @ mean(A_i) != mean(B_i @ A_i), and it cannot mix ranks at all.
- FLoRA (Wang et al. 2024) stacks the factors, so that the stacked adapter's product is exactly
  the weighted sum of the client products, for any mix of ranks; the price is a stacked rank of
  sum r_i, which is why FLoRA merges it into the base weights every round.
- HetLoRA (Cho et al. 2024) keeps one global rank r_max: clients train truncations of it, the
  server zero-pads them back and averages per rank component, weighting clients by the size of
  their update (sparsity weights); clients may shrink their rank (self_prune).

Weights are always non-negative with at least one positive, and are normalised to sum 1
inside, so callers may pass sample counts.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import numpy as np

__all__ = ["flora_stack", "flora_delta", "fedavg_lora_product", "truncate", "pad",
           "sparsity_weights", "hetlora_aggregate", "self_prune", "rank_of"]


# --------------------------------------------------------------------------- validation
def _as_matrix(x, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{what} has shape {a.shape}; LoRA factors are 2-D (A: (r, in), B: (out, r))")
    if a.dtype.kind not in "fiu":
        raise ValueError(f"{what} has dtype {a.dtype}; pass real numbers (float32 or float64)")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what} has non-finite values (NaN/inf)")
    return a


def _check_pair(A, B, who: str = "") -> tuple[np.ndarray, np.ndarray]:
    """One adapter: A (r, in) and B (out, r) with the same r >= 1."""
    pre = f"{who}: " if who else ""
    A = _as_matrix(A, f"{pre}A")
    B = _as_matrix(B, f"{pre}B")
    if A.shape[0] != B.shape[1]:
        raise ValueError(f"{pre}A has rank {A.shape[0]} (shape {A.shape}) but B has {B.shape[1]} "
                         f"columns (shape {B.shape}); A must be (r, in) and B (out, r) with the same r "
                         f"(swapped or transposed?)")
    if A.shape[0] < 1:
        raise ValueError(f"{pre}rank 0 adapter (A {A.shape}, B {B.shape}); drop it instead")
    return A, B


def _check_pairs(As: Sequence, Bs: Sequence) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Several clients' adapters of one layer: same count, each a valid pair, same (out, in);
    ranks may differ."""
    As, Bs = list(As), list(Bs)
    if len(As) != len(Bs):
        raise ValueError(f"{len(As)} A factors but {len(Bs)} B factors; pass one (A, B) per client")
    if not As:
        raise ValueError("no client adapters to aggregate")
    pairs = [_check_pair(A, B, f"client {i}") for i, (A, B) in enumerate(zip(As, Bs))]
    in0, out0 = pairs[0][0].shape[1], pairs[0][1].shape[0]
    for i, (A, B) in enumerate(pairs[1:], start=1):
        if A.shape[1] != in0:
            raise ValueError(f"client {i}: A has in={A.shape[1]} columns, client 0 has in={in0}: "
                             f"all clients must adapt the same layer")
        if B.shape[0] != out0:
            raise ValueError(f"client {i}: B has out={B.shape[0]} rows, client 0 has out={out0}: "
                             f"all clients must adapt the same layer")
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _check_weights(weights, n: int) -> np.ndarray:
    """float64 weights normalised to sum 1 (so sample counts work as weights)."""
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError):
        w = None
    if w is None or w.ndim != 1:
        raise ValueError(f"weights must be a 1-D sequence of {n} numbers (one per client), got {weights!r}")
    if w.size != n:
        raise ValueError(f"{w.size} weights for {n} clients; pass one weight per client")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be finite and >= 0, got {w.tolist()}")
    total = float(w.sum())
    if total <= 0:
        raise ValueError(f"weights are all zero ({w.tolist()}); at least one client must count")
    return w / total


def _check_scale(scale) -> float:
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"scale={scale!r} must be a finite number (LoRA alpha / r)")
    return float(scale)


def _check_rank(r, what: str) -> int:
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
        raise ValueError(f"{what}={r!r} must be a whole number >= 1")
    return int(r)


def _float_dtype(*arrays: np.ndarray) -> np.dtype:
    """The dtype results come back in: the inputs' common float type, at least float32."""
    return np.result_type(np.float32, *arrays)


def rank_of(A, B) -> int:
    """The rank r of one adapter (validated)."""
    return _check_pair(A, B)[0].shape[0]


# --------------------------------------------------------------------------- FLoRA
def flora_stack(As: Sequence, Bs: Sequence, weights) -> tuple[np.ndarray, np.ndarray]:
    """FLoRA stacking: A_stack = [A_1; ...; A_n] (sum r_i, in), B_stack = [w_1 B_1, ..., w_n B_n]
    (out, sum r_i), so B_stack @ A_stack == sum_i w_i B_i @ A_i: the exact weighted sum of the
    client updates, whatever their ranks (block matrix product).

    Weights are normalised to sum 1 here; the weight goes on B only (putting sqrt(w) on both
    would give the same product). Clients with weight 0 still occupy their r_i rows / columns
    (zero columns in B), so the stacked rank is always sum r_i. Results are in the inputs'
    common float dtype (float32 at least), computed in float64."""
    As, Bs = _check_pairs(As, Bs)
    w = _check_weights(weights, len(As))
    dtype = _float_dtype(*As, *Bs)
    A_stack = np.concatenate([A.astype(np.float64) for A in As], axis=0)
    B_stack = np.concatenate([wi * B.astype(np.float64) for wi, B in zip(w, Bs)], axis=1)
    return A_stack.astype(dtype, copy=False), B_stack.astype(dtype, copy=False)


def flora_delta(As: Sequence, Bs: Sequence, weights, scale: float) -> np.ndarray:
    """The dense (out, in) update scale * B_stack @ A_stack = scale * sum_i w_i B_i A_i (weights
    normalised to sum 1), what FLoRA merges into the base weights. Computed in float64 (one
    product of the stacked float64 factors), returned float32."""
    scale = _check_scale(scale)
    As, Bs = _check_pairs(As, Bs)
    A_stack, B_stack = flora_stack([A.astype(np.float64) for A in As],
                                   [B.astype(np.float64) for B in Bs], weights)
    return (scale * (B_stack @ A_stack)).astype(np.float32)


def fedavg_lora_product(As: Sequence, Bs: Sequence, weights, scale: float) -> np.ndarray:
    """The naive baseline: average the factors, then multiply: scale * (sum w_i B_i) @ (sum w_i A_i),
    dense (out, in), float64 inside, float32 out. This is NOT the weighted sum of the products
    (cross terms w_i w_j B_i A_j appear); it exists to measure that error against flora_delta.

    Mixed ranks are zero-padded to the largest rank first (what naive FedAvg over padded
    adapters does; the average over each component counts every client, padding included)."""
    scale = _check_scale(scale)
    As, Bs = _check_pairs(As, Bs)
    w = _check_weights(weights, len(As))
    r = max(A.shape[0] for A in As)
    A_avg = np.zeros((r, As[0].shape[1]), np.float64)
    B_avg = np.zeros((Bs[0].shape[0], r), np.float64)
    for wi, A, B in zip(w, As, Bs):
        ri = A.shape[0]
        A_avg[:ri] += wi * A
        B_avg[:, :ri] += wi * B
    return (scale * (B_avg @ A_avg)).astype(np.float32)


# --------------------------------------------------------------------------- HetLoRA
def truncate(A, B, r: int) -> tuple[np.ndarray, np.ndarray]:
    """What a rank-r client receives of the global adapter: its first r components,
    (A[:r], B[:, :r]). Copies, so the client's training never writes into the global."""
    A, B = _check_pair(A, B)
    r = _check_rank(r, "r")
    if r > A.shape[0]:
        raise ValueError(f"cannot truncate a rank-{A.shape[0]} adapter to rank {r}; r must be <= "
                         f"{A.shape[0]}")
    return A[:r].copy(), B[:, :r].copy()


def pad(A, B, r_max: int) -> tuple[np.ndarray, np.ndarray]:
    """A rank-r_i client adapter zero-padded back to rank r_max: A gets zero rows r_i..r_max-1,
    B zero columns; the product B @ A is unchanged. Same dtype as the inputs."""
    A, B = _check_pair(A, B)
    r_max = _check_rank(r_max, "r_max")
    r = A.shape[0]
    if r > r_max:
        raise ValueError(f"adapter has rank {r} > r_max={r_max}; truncate() it or raise r_max")
    A_p = np.zeros((r_max, A.shape[1]), A.dtype)
    B_p = np.zeros((B.shape[0], r_max), B.dtype)
    A_p[:r] = A
    B_p[:, :r] = B
    return A_p, B_p


def _product_fro_norm(A: np.ndarray, B: np.ndarray) -> float:
    """||B @ A||_F without forming the (out, in) product: with thin QRs B = Q_B R_B and
    A^T = Q_A R_A, B A = Q_B (R_B R_A^T) Q_A^T and the orthonormal Q's keep the norm, so
    ||B A||_F = ||R_B R_A^T||_F: O((out + in) r^2) work and r x r memory instead of out x in,
    and as accurate as the dense product (QR is backward stable; a Gram-matrix trace is not)."""
    R_B = np.linalg.qr(B.astype(np.float64), mode="r")
    R_A = np.linalg.qr(A.T.astype(np.float64), mode="r")
    return float(np.linalg.norm(R_B @ R_A.T))


product_fro_norm = _product_fro_norm


def sparsity_weights(As: Sequence, Bs: Sequence) -> np.ndarray:
    """HetLoRA's sparsity-weighted aggregation: client i weighs ||B_i A_i||_F / sum_j ||B_j A_j||_F,
    so clients whose update is larger count more (an update that barely moved, e.g. a client
    that trained little, barely dilutes the others). All zero (e.g. every B still at its zero
    init): uniform. float64, sums to 1."""
    As, Bs = _check_pairs(As, Bs)
    norms = np.array([_product_fro_norm(A, B) for A, B in zip(As, Bs)], np.float64)
    total = float(norms.sum())
    if total == 0.0:
        return np.full(len(As), 1.0 / len(As))
    return norms / total


def _check_previous(previous, r_max: int, n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(previous, (tuple, list)) or len(previous) != 2:
        raise ValueError("previous must be the (A_global, B_global) pair of the last round")
    A, B = _check_pair(*previous, who="previous")
    if A.shape != (r_max, n_in) or B.shape != (n_out, r_max):
        raise ValueError(f"previous global has A {A.shape}, B {B.shape}; expected A {(r_max, n_in)}, "
                         f"B {(n_out, r_max)} (rank r_max={r_max}, same layer as the clients)")
    return A, B


def hetlora_aggregate(As: Sequence, Bs: Sequence, r_max: int, weights=None, *,
                      previous: Optional[tuple] = None) -> tuple[np.ndarray, np.ndarray]:
    """HetLoRA server step: the rank-r_max global (A_global, B_global) as a per-component weighted
    average of the zero-padded client factors.

    Component k (row k of A, column k of B) is averaged over the clients that HAVE it (r_i > k)
    and normalised by their weights only: sum_{i: r_i > k} w_i A_i[k] / sum_{i: r_i > k} w_i.
    Normalising over all clients instead would count the padding zeros and shrink the higher
    components by the weight share of the low-rank clients every round, driving them to zero.

    weights: None = sparsity_weights(As, Bs); else non-negative, at least one positive.
    Components that no client with a positive weight has (k >= every such r_i) come back from
    `previous` (the last global, when the factors are values) or zero (when they are deltas).
    Results are in the inputs' common float dtype (float32 at least), computed in float64."""
    As, Bs = _check_pairs(As, Bs)
    r_max = _check_rank(r_max, "r_max")
    for i, A in enumerate(As):
        if A.shape[0] > r_max:
            raise ValueError(f"client {i} has rank {A.shape[0]} > r_max={r_max}; a client trains a "
                             f"truncation of the global adapter, so r_i <= r_max")
    w = sparsity_weights(As, Bs) if weights is None else _check_weights(weights, len(As))
    n_in, n_out = As[0].shape[1], Bs[0].shape[0]
    dtype = _float_dtype(*As, *Bs)
    A_sum = np.zeros((r_max, n_in), np.float64)
    B_sum = np.zeros((n_out, r_max), np.float64)
    w_sum = np.zeros(r_max, np.float64)       # per component: total weight of the clients with it
    for wi, A, B in zip(w, As, Bs):
        r = A.shape[0]
        A_sum[:r] += wi * A
        B_sum[:, :r] += wi * B
        w_sum[:r] += wi
    has = w_sum > 0
    A_g = np.zeros_like(A_sum)
    B_g = np.zeros_like(B_sum)
    A_g[has] = A_sum[has] / w_sum[has, None]
    B_g[:, has] = B_sum[:, has] / w_sum[has]
    if previous is not None:
        A_prev, B_prev = _check_previous(previous, r_max, n_in, n_out)
        A_g[~has] = A_prev[~has]
        B_g[:, ~has] = B_prev[:, ~has]
    return A_g.astype(dtype, copy=False), B_g.astype(dtype, copy=False)


def self_prune(A, B, gamma: float, tol: float) -> int:
    """HetLoRA rank self-pruning (client side): the rank to keep for the next round.

    The tail is the last k = max(1, floor(gamma * r)) components (never all of them: the
    result is at least 1). If ||B[:, r-k:] @ A[r-k:]||_F < tol * ||B @ A||_F the tail adds
    almost nothing to the update, and the client drops it (returns r - k); else it keeps r.
    A zero update carries no evidence either way: r is kept. gamma in (0, 1], tol >= 0
    (tol = 0 never prunes)."""
    A, B = _check_pair(A, B)
    if not isinstance(gamma, numbers.Real) or not 0 < gamma <= 1:
        raise ValueError(f"gamma={gamma!r} must be in (0, 1]: the fraction of rank components "
                         f"tested for pruning")
    if not isinstance(tol, numbers.Real) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"tol={tol!r} must be a finite number >= 0 (tail norm / total norm threshold)")
    r = A.shape[0]
    if r == 1:
        return 1
    # the epsilon keeps e.g. 0.29 * 100 = 28.999999999999996 at 29
    k = min(max(1, math.floor(gamma * r + 1e-9)), r - 1)
    total = _product_fro_norm(A, B)
    if total == 0.0:
        return r
    tail = _product_fro_norm(A[r - k:], B[:, r - k:])
    return r - k if tail < tol * total else r
