"""LoRA aggregation math (edgefed.methods.lora_math): FLoRA stacking, the naive factor-average
baseline, HetLoRA truncate / pad / sparsity weights / aggregate / self-pruning, against hand
computations on small integer matrices; and every shape error."""
from __future__ import annotations

import numpy as np
import pytest

from edgefed.methods.lora_math import (fedavg_lora_product, flora_delta, flora_stack,
                                       hetlora_aggregate, pad, rank_of, self_prune,
                                       sparsity_weights, truncate)

F64 = np.float64

# FLoRA hand example: client 0 rank 1, client 1 rank 2, 2x2 layer, weights 1:3 (0.25, 0.75)
A0 = np.array([[1, 2]], F64)
B0 = np.array([[3], [4]], F64)            # B0 A0 = [[3, 6], [4, 8]]
A1 = np.array([[1, 0], [2, 1]], F64)
B1 = np.array([[0, 1], [1, 1]], F64)      # B1 A1 = [[2, 1], [3, 1]]
W = [1, 3]
# 0.25 [[3, 6], [4, 8]] + 0.75 [[2, 1], [3, 1]]
WEIGHTED_SUM = np.array([[2.25, 2.25], [3.25, 2.75]])


# --------------------------------------------------------------------------- FLoRA
def test_flora_stack_by_hand():
    A_s, B_s = flora_stack([A0, A1], [B0, B1], W)
    np.testing.assert_array_equal(A_s, [[1, 2], [1, 0], [2, 1]])
    np.testing.assert_array_equal(B_s, [[0.75, 0, 0.75], [1, 0.75, 0.75]])
    np.testing.assert_allclose(B_s @ A_s, WEIGHTED_SUM, rtol=1e-12)


def test_flora_delta_by_hand():
    d = flora_delta([A0, A1], [B0, B1], W, scale=2.0)
    assert d.dtype == np.float32 and d.shape == (2, 2)
    np.testing.assert_array_equal(d, 2 * WEIGHTED_SUM)


def test_fedavg_of_factors_is_not_the_average_update():
    """Ranks 1 and 2 zero-padded: A_avg = [[1, .5], [1.5, .75]], B_avg = [[.75, .75], [1.75, .75]]."""
    naive = fedavg_lora_product([A0, A1], [B0, B1], W, scale=1.0)
    np.testing.assert_allclose(naive, [[1.875, 0.9375], [2.875, 1.4375]], rtol=1e-7)
    assert not np.allclose(naive, WEIGHTED_SUM, rtol=0.05)
    np.testing.assert_allclose(flora_delta([A0, A1], [B0, B1], W, 1.0), WEIGHTED_SUM, rtol=1e-7)


def test_fedavg_of_factors_same_rank_classic_counterexample():
    """Two rank-1 clients on orthogonal directions: the average update is I / 2, the product of
    the averaged factors is ones / 4 (cross terms)."""
    As = [np.array([[1, 0]], F64), np.array([[0, 1]], F64)]
    Bs = [np.array([[1], [0]], F64), np.array([[0], [1]], F64)]
    np.testing.assert_allclose(flora_delta(As, Bs, [1, 1], 1.0), 0.5 * np.eye(2))
    naive = fedavg_lora_product(As, Bs, [1, 1], 1.0)
    np.testing.assert_allclose(naive, np.full((2, 2), 0.25))
    assert not np.allclose(naive, 0.5 * np.eye(2), atol=0.1)


def test_flora_heterogeneous_ranks_random():
    rng = np.random.default_rng(0)
    ranks, n_in, n_out = [1, 3, 2, 5], 7, 6
    As = [rng.standard_normal((r, n_in)) for r in ranks]
    Bs = [rng.standard_normal((n_out, r)) for r in ranks]
    w = np.array([5.0, 1.0, 0.0, 2.0])
    A_s, B_s = flora_stack(As, Bs, w)
    assert A_s.shape == (sum(ranks), n_in) and B_s.shape == (n_out, sum(ranks))
    expected = sum(wi / w.sum() * B @ A for wi, A, B in zip(w, As, Bs))
    np.testing.assert_allclose(B_s @ A_s, expected, rtol=1e-12)
    np.testing.assert_allclose(flora_delta(As, Bs, w, 0.5), 0.5 * expected, rtol=1e-6, atol=1e-7)


def test_flora_weights_normalised_and_dtype_kept():
    A_s, B_s = flora_stack([A0.astype(np.float32)], [B0.astype(np.float32)], [7.0])
    assert A_s.dtype == np.float32 and B_s.dtype == np.float32
    np.testing.assert_array_equal(B_s, B0)          # a single client's weight is 1
    A_s, _ = flora_stack([A0.astype(np.int64)], [B0.astype(np.int64)], [1])
    assert A_s.dtype == np.float64


def test_flora_inputs_not_modified():
    a0, b0 = A0.copy(), B0.copy()
    flora_stack([a0, A1], [b0, B1], W)
    np.testing.assert_array_equal(b0, B0)
    np.testing.assert_array_equal(a0, A0)


# --------------------------------------------------------------------------- HetLoRA
def test_truncate_pad_round_trip():
    rng = np.random.default_rng(1)
    A = rng.standard_normal((4, 5)).astype(np.float32)
    B = rng.standard_normal((3, 4)).astype(np.float32)
    a, b = truncate(A, B, 2)
    np.testing.assert_array_equal(a, A[:2])
    np.testing.assert_array_equal(b, B[:, :2])
    a[0, 0] = 99.0                                   # a copy: the global is untouched
    assert A[0, 0] != 99.0
    a, b = truncate(A, B, 2)
    A_p, B_p = pad(a, b, 4)
    assert A_p.shape == A.shape and B_p.shape == B.shape and A_p.dtype == np.float32
    np.testing.assert_array_equal(A_p[:2], A[:2])
    np.testing.assert_array_equal(A_p[2:], 0)
    np.testing.assert_array_equal(B_p[:, 2:], 0)
    np.testing.assert_allclose(B_p @ A_p, b @ a, rtol=1e-6)   # padding keeps the product
    np.testing.assert_array_equal(truncate(A_p, B_p, 2)[0], a)
    np.testing.assert_array_equal(truncate(A, B, 4)[0], A)    # r = rank: the whole adapter
    assert rank_of(A_p, B_p) == 4


# HetLoRA hand example: client 0 rank 1 (||B0 A0|| = ||[[3, 4], [0, 0]]|| = 5),
# client 1 rank 2 (||B1 A1|| = ||diag(9, 12)|| = 15): sparsity weights 0.25, 0.75
HA0 = np.array([[3, 4]], F64)
HB0 = np.array([[1], [0]], F64)
HA1 = np.array([[9, 0], [0, 12]], F64)
HB1 = np.eye(2)


def test_sparsity_weights_by_hand():
    np.testing.assert_allclose(sparsity_weights([HA0, HA1], [HB0, HB1]), [0.25, 0.75], rtol=1e-12)
    # same norm, swapped order
    np.testing.assert_allclose(sparsity_weights([HA1, HA0], [HB1, HB0]), [0.75, 0.25], rtol=1e-12)


def test_sparsity_weights_zero_updates():
    zero_B = [np.zeros((2, 1)), np.zeros((2, 2)), np.zeros((2, 1))]
    As = [HA0, HA1, HA0]
    np.testing.assert_array_equal(sparsity_weights(As, zero_B), [1 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(sparsity_weights([HA0, HA1], [np.zeros((2, 1)), HB1]), [0.0, 1.0])


def test_sparsity_weights_match_dense_norms():
    rng = np.random.default_rng(2)
    As = [rng.standard_normal((r, 9)) for r in (1, 4, 2)]
    Bs = [rng.standard_normal((6, r)) for r in (1, 4, 2)]
    norms = np.array([np.linalg.norm(B @ A) for A, B in zip(As, Bs)])
    np.testing.assert_allclose(sparsity_weights(As, Bs), norms / norms.sum(), rtol=1e-12)


def test_hetlora_aggregate_by_hand_sparsity_weights():
    """Component 0: 0.25 [3, 4] + 0.75 [9, 0] = [7.5, 1] (B: 0.25 e1 + 0.75 e1 = e1);
    component 1: client 1 only, normalised over itself: A row [0, 12], B column e2."""
    A_g, B_g = hetlora_aggregate([HA0, HA1], [HB0, HB1], r_max=2)
    np.testing.assert_allclose(A_g, [[7.5, 1.0], [0.0, 12.0]], rtol=1e-12)
    np.testing.assert_allclose(B_g, [[1.0, 0.0], [0.0, 1.0]], rtol=1e-12)
    assert A_g.dtype == np.float64


def test_hetlora_higher_components_not_shrunk_by_padding():
    """Normalising over all clients would give component 1 = 0.75 [0, 12] = [0, 9]; here it keeps
    client 1's value, round after round."""
    A_g, B_g = hetlora_aggregate([HA0, HA1], [HB0, HB1], r_max=2)
    assert not np.allclose(A_g[1], [0.0, 9.0])
    for _ in range(5):  # re-aggregating the global with a rank-1 client never decays it
        A_g, B_g = hetlora_aggregate([HA0, A_g], [HB0, B_g], r_max=2, weights=[1, 1])
    np.testing.assert_allclose(A_g[1], [0.0, 12.0])
    np.testing.assert_allclose(B_g[:, 1], [0.0, 1.0])


def test_hetlora_aggregate_explicit_weights_by_hand():
    A_g, B_g = hetlora_aggregate([HA0, HA1], [HB0, HB1], r_max=2, weights=[2, 2])
    np.testing.assert_allclose(A_g, [[6.0, 2.0], [0.0, 12.0]])   # 0.5 [3, 4] + 0.5 [9, 0]
    np.testing.assert_allclose(B_g, np.eye(2))


def test_hetlora_uncovered_components_zero_or_previous():
    # r_max 3: no client has component 2; weight 0 for the rank-2 client: component 1 uncovered too
    A_g, B_g = hetlora_aggregate([HA0, HA1], [HB0, HB1], r_max=3, weights=[1, 0])
    np.testing.assert_allclose(A_g, [[3, 4], [0, 0], [0, 0]])
    np.testing.assert_allclose(B_g, [[1, 0, 0], [0, 0, 0]])
    prev_A = np.arange(6, dtype=F64).reshape(3, 2) + 1
    prev_B = np.arange(6, dtype=F64).reshape(2, 3) + 10
    A_g, B_g = hetlora_aggregate([HA0, HA1], [HB0, HB1], r_max=3, weights=[1, 0],
                                 previous=(prev_A, prev_B))
    np.testing.assert_allclose(A_g, [[3, 4], prev_A[1], prev_A[2]])
    np.testing.assert_allclose(B_g[:, 0], [1, 0])
    np.testing.assert_allclose(B_g[:, 1:], prev_B[:, 1:])


def test_hetlora_same_ranks_is_weighted_fedavg_of_factors():
    rng = np.random.default_rng(3)
    As = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(3)]
    Bs = [rng.standard_normal((5, 3)).astype(np.float32) for _ in range(3)]
    A_g, B_g = hetlora_aggregate(As, Bs, r_max=3, weights=[1, 2, 1])
    assert A_g.dtype == np.float32
    np.testing.assert_allclose(A_g, (As[0] + 2 * As[1] + As[2]) / 4, rtol=1e-6)
    np.testing.assert_allclose(B_g, (Bs[0] + 2 * Bs[1] + Bs[2]) / 4, rtol=1e-6)


def test_self_prune_tiny_tail_is_pruned():
    A = np.diag([1.0, 1.0, 1.0, 1e-6])
    B = np.eye(4)
    assert self_prune(A, B, gamma=0.25, tol=1e-3) == 3       # k = 1, ratio 1e-6 / sqrt(3)


def test_self_prune_large_tail_is_kept():
    A = np.diag([1.0, 1.0, 1.0, 1.0])
    assert self_prune(A, np.eye(4), gamma=0.25, tol=1e-3) == 4  # ratio 1/2
    assert self_prune(A, np.eye(4), gamma=0.5, tol=0.5) == 4    # k = 2, ratio sqrt(2)/2 = 0.707


def test_self_prune_k_and_floor():
    A = np.diag([1.0, 1.0, 1e-6, 1e-6])
    assert self_prune(A, np.eye(4), gamma=0.5, tol=1e-3) == 2   # k = floor(2) = 2
    assert self_prune(A, np.eye(4), gamma=0.1, tol=1e-3) == 3   # k = max(1, floor(0.4)) = 1
    # never below 1: gamma = 1 tests r - 1 components at most
    A = np.diag([1.0, 1e-9, 1e-9, 1e-9])
    assert self_prune(A, np.eye(4), gamma=1.0, tol=1e-3) == 1
    assert self_prune(np.ones((1, 3)), np.ones((2, 1)), gamma=1.0, tol=1.0) == 1
    # a tail that is tiny only through B
    A = np.ones((3, 2))
    B = np.array([[1.0, 2.0, 1e-8], [0.5, 1.0, 0.0]])
    assert self_prune(A, B, gamma=0.34, tol=1e-4) == 2


def test_self_prune_zero_update_and_zero_tol_keep_rank():
    assert self_prune(np.ones((3, 2)), np.zeros((2, 3)), gamma=0.5, tol=0.9) == 3
    A = np.diag([1.0, 1.0, 0.0])
    assert self_prune(A, np.eye(3), gamma=0.34, tol=0.0) == 3


# --------------------------------------------------------------------------- errors
def test_shape_errors():
    a, b = np.ones((2, 3)), np.ones((4, 2))
    with pytest.raises(ValueError, match=r"rank 2 .* 3 columns"):
        flora_stack([a], [np.ones((4, 3))], [1])
    with pytest.raises(ValueError, match=r"client 1: A has in=5.*in=3"):
        flora_stack([a, np.ones((2, 5))], [b, b], [1, 1])
    with pytest.raises(ValueError, match=r"client 1: B has out=6.*out=4"):
        hetlora_aggregate([a, a], [b, np.ones((6, 2))], r_max=2)
    with pytest.raises(ValueError, match="2 A factors but 1 B"):
        flora_delta([a, a], [b], [1, 1], 1.0)
    with pytest.raises(ValueError, match="no client adapters"):
        flora_stack([], [], [])
    with pytest.raises(ValueError, match="2-D"):
        fedavg_lora_product([np.ones(3)], [b], [1], 1.0)
    with pytest.raises(ValueError, match="rank 0"):
        pad(np.ones((0, 3)), np.ones((4, 0)), 2)
    with pytest.raises(ValueError, match="non-finite"):
        sparsity_weights([np.full((2, 3), np.nan)], [b])
    with pytest.raises(ValueError, match="dtype"):
        truncate(np.array([["x"]]), np.ones((1, 1)), 1)


def test_rank_errors():
    a, b = np.ones((2, 3)), np.ones((4, 2))
    with pytest.raises(ValueError, match=r"client 1 has rank 2 > r_max=1"):
        hetlora_aggregate([np.ones((1, 3)), a], [np.ones((4, 1)), b], r_max=1)
    with pytest.raises(ValueError, match=r"rank 2 > r_max=1"):
        pad(a, b, 1)
    with pytest.raises(ValueError, match=r"rank-2 adapter to rank 3"):
        truncate(a, b, 3)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"r="):
            truncate(a, b, bad)
    with pytest.raises(ValueError, match="r_max=0"):
        hetlora_aggregate([a], [b], r_max=0)
    with pytest.raises(ValueError, match="previous global has A"):
        hetlora_aggregate([a], [b], r_max=2, previous=(np.ones((3, 3)), np.ones((4, 3))))


@pytest.mark.parametrize("weights, match", [
    ([1], "1 weights for 2 clients"),
    ([1, -1], ">= 0"),
    ([0, 0], "all zero"),
    ([1, float("nan")], "finite"),
    ([[1, 1]], "1-D"),
    (None, "1-D"),
    (["a", "b"], "1-D"),
])
def test_weight_errors(weights, match):
    with pytest.raises(ValueError, match=match):
        flora_stack([A0, A1], [B0, B1], weights)


def test_scale_and_prune_param_errors():
    with pytest.raises(ValueError, match="scale"):
        flora_delta([A0], [B0], [1], float("inf"))
    with pytest.raises(ValueError, match="scale"):
        fedavg_lora_product([A0], [B0], [1], None)
    with pytest.raises(ValueError, match="gamma"):
        self_prune(A1, B1, gamma=0.0, tol=0.1)
    with pytest.raises(ValueError, match="gamma"):
        self_prune(A1, B1, gamma=1.5, tol=0.1)
    with pytest.raises(ValueError, match="tol"):
        self_prune(A1, B1, gamma=0.5, tol=-1)
