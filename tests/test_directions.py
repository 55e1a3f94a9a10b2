"""Direction spaces (edgefed.directions), variance-adaptive probes and seed-space server optimisers:
the maths each variant promises, checked against hand computations and the plain kernels."""
import numpy as np
import pytest

from edgefed import kernels
from edgefed.directions import WHOLE, DirectionSpace, DirectionSpec
from edgefed.methods import JobConfig
from edgefed.methods.fedkseed import FedKSeedServer, check_scalars
from edgefed.protocol import RoundPlan, Update
from edgefed.trainer import LocalTrainer
from edgefed.zo import SeedPool, ZOConfig

NAMES = ["layer0.lora_A", "layer0.lora_B", "bias"]
SHAPES = [(4, 96), (96, 4), (40,)]


def _space(**params):
    rs = np.random.default_rng(0)
    initial = [rs.normal(size=int(np.prod(s))).astype(np.float32) for s in SHAPES]
    initial[1][:] = 0.0  # like LoRA's B
    return DirectionSpace(DirectionSpec.from_params(params), NAMES, SHAPES, initial), initial


def _buffers(fill=0.0):
    return [np.full(int(np.prod(s)), fill, np.float32) for s in SHAPES]


def _bits(bufs):
    return np.concatenate([b.view(np.uint32) for b in bufs])


def test_a_block_mask_moves_its_blocks_exactly_as_the_whole_vector_and_nothing_else():
    space, _ = _space(mask_frac=0.3, mask_by="random", mask_block=8, mask_seed=5)
    whole = _buffers(0.5)
    kernels.perturb(whole, 99, 0.1)
    masked = _buffers(0.5)
    space.perturb(masked, 99, 0.1)
    got, want, start = _bits(masked), _bits(whole), _bits(_buffers(0.5))
    moved = got != start
    active = np.zeros(moved.size, bool)
    for p in space.pieces:
        active[p.offset:p.offset + p.stop - p.start] = True
    assert np.array_equal(got[active], want[active])
    assert np.array_equal(got[~active], start[~active])
    total = sum(int(np.prod(s)) for s in SHAPES)
    assert space.n_active == active.sum()
    assert abs(space.n_active / total - 0.3) < 0.05
    again, _ = _space(mask_frac=0.3, mask_by="random", mask_block=8, mask_seed=5)
    other, _ = _space(mask_frac=0.3, mask_by="random", mask_block=8, mask_seed=6)
    assert again.pieces == space.pieces and other.pieces != space.pieces


def test_a_magnitude_mask_takes_the_blocks_of_smallest_initial_weights():
    space, initial = _space(mask_frac=0.6, mask_block=16)
    flat = np.concatenate(initial)
    chosen = np.zeros(flat.size, bool)
    for p in space.pieces:
        chosen[p.offset:p.offset + p.stop - p.start] = True
    b0 = 4 * 96
    assert chosen[b0:b0 + 96 * 4].all(), "LoRA B (all zero) is taken whole"
    starts = np.cumsum([0] + [int(np.prod(s)) for s in SHAPES])
    blocks = [(a + o, min(a + o + 16, e)) for a, e in zip(starts[:-1], starts[1:]) for o in range(0, e - a, 16)]
    assert sum(chosen[a] for a, _ in blocks) == round(0.6 * len(blocks))
    chosen_max = max(np.abs(flat[a:e]).max() for a, e in blocks if chosen[a])
    unchosen_max = min(np.abs(flat[a:e]).max() for a, e in blocks if not chosen[a])
    assert chosen_max <= unchosen_max, "every block left out has larger weights than every block taken"


def test_tensor_masks_and_lowrank_directions():
    space, _ = _space(mask_tensors="lora_B")
    bufs = _buffers()
    space.perturb(bufs, 3, 1.0)
    assert not bufs[0].any() and bufs[1].any() and not bufs[2].any()
    lr_space, _ = _space(lowrank=2)
    assert [m.buf for m in lr_space.matrices] == [0, 1]
    bufs = _buffers()
    lr_space.perturb(bufs, 11, 1.0)
    for m in lr_space.matrices:
        d = bufs[m.buf].reshape(m.rows, m.cols).astype(np.float64)
        assert np.linalg.matrix_rank(d, tol=1e-4) == 2
    assert bufs[2].any()  # the vector moves along plain z
    # the same bits whatever the kernels' thread count, and replay = one seed after another
    seeds, coeffs = [11, 12, 13], [0.5, -0.25, 1e-3]
    one = _buffers(0.1)
    for s, c in zip(seeds, coeffs):
        lr_space.perturb(one, s, c)
    for threads in (1, 2):
        kernels.set_num_threads(threads)
        all_at_once = _buffers(0.1)
        lr_space.replay(all_at_once, seeds, coeffs)
        assert np.array_equal(_bits(one), _bits(all_at_once))


def test_lowrank_directions_have_unit_variance_per_element():
    space = DirectionSpace(DirectionSpec(lowrank=4), ["w"], [(256, 256)])
    out = np.empty(256 * 256, np.float32)
    space.fill(out, 1234)
    assert abs(out.mean()) < 0.02 and abs(out.var() - 1.0) < 0.1


@pytest.mark.parametrize("params", [dict(mask_frac=0.5, mask_block=4), dict(lowrank=2), dict(mask_tensors="bias")])
def test_fill_is_the_direction_that_perturb_adds(params):
    """What a torch host projects its gradient on (fill) is what two-point probes move along."""
    space, _ = _space(**params)
    zero = _buffers()
    space.perturb(zero, 42, 1.0)
    out = np.empty(sum(b.size for b in zero), np.float32)
    space.fill(out, 42)
    assert np.array_equal(out, np.concatenate(zero))


@pytest.mark.parametrize("params,message", [
    (dict(mask_frac=0), "mask_frac"), (dict(mask_frac=1.5), "mask_frac"), (dict(mask_by="large"), "mask_by"),
    (dict(mask_tensors="(("), "regular expression"), (dict(lowrank=2, mask_frac=0.5), "do not combine"),
    (dict(lowrank=-1), "lowrank"), (dict(mask_block=0), "mask_block"),
])
def test_bad_direction_settings_say_what_to_set(params, message):
    with pytest.raises(ValueError, match=message):
        DirectionSpec.from_params(params)


def test_a_pattern_matching_no_tensor_is_refused_with_the_names():
    with pytest.raises(ValueError, match="matches none.*lora_A"):
        DirectionSpace(DirectionSpec(mask_tensors="embed"), NAMES, SHAPES)
    assert DirectionSpec.from_params({}).dense and not DirectionSpec(mask_frac=0.5).plan_params() == {}


class _Quadratic:
    """loss = 0.5 ||theta - target||^2 + noise: a model with the interface trainers use."""

    def __init__(self, n=64, noise=0.0, seed=0):
        self.params = np.zeros(n, np.float32)
        self.buffers = [self.params]
        self.batch_size = 4
        self.target = np.random.default_rng(seed).normal(size=n)
        self.noise = noise
        self.rs = np.random.default_rng(1)

    def encode(self, rows):
        return rows

    def loss(self, batch):
        return 0.5 * float(np.sum((self.params - self.target) ** 2))


def test_adaptive_probes_report_n_perturb_probes_worth_and_pass_the_server_bounds():
    model = _Quadratic()
    pool = SeedPool(7, 256)
    cfg = ZOConfig(lr=1e-3, eps=1e-3, n_perturb=1, n_perturb_max=6, adaptive_tol=0.01)
    acc = LocalTrainer(model, pool, cfg, progress=False).train(list(range(20)), 5, batch_size=4, seed=0)
    per_step = len(acc.history) / 5
    assert 2 <= per_step <= 6, "adaptive steps take between max(2, n_perturb) and n_perturb_max probes"
    assert model.loss(None) < 0.5 * float(np.sum(model.target ** 2)), "the steps descend"
    job = JobConfig(job="j", method="fedkseed", artifact="-", rounds=1, local_steps=5, batch_size=4, k=256,
                    params={"n_perturb": 1, "n_perturb_max": 6, "scalar_bound": 1e4})
    plan = RoundPlan(job="j", round=0, method="fedkseed", lr=1e-3, local_steps=5, batch_size=4,
                     params={"n_perturb": 1, "n_perturb_max": 6, "k": 256, "seed_pool_id": 7, "eps": 1e-3})
    from edgefed.methods.fedkseed import SCALARS, seed_tensors
    idx, g = acc.arrays()
    check_scalars(job, plan, Update(job="j", round=0, device="d", method="fedkseed", msg_id=1, num_samples=20,
                                    tensors=seed_tensors(idx, g, SCALARS)))


def test_seed_space_momentum_follows_its_formula_over_rounds():
    job = JobConfig(job="j", method="fedkseed", artifact="-", rounds=3, local_steps=1, batch_size=1, k=8,
                    lr=0.1, params={"server_opt": "avgm", "server_momentum": 0.5, "server_lr": 2.0})
    server = FedKSeedServer()
    state = server.init_state(job)
    from edgefed.methods.fedkseed import SCALARS, seed_tensors
    m = np.zeros(8, np.float32)
    for rnd, (seeds, g) in enumerate([([1, 3], [1.0, -2.0]), ([3, 5], [4.0, 0.5]), ([0], [1.0])]):
        plan = server.plan_round(job, state, rnd)
        rp = RoundPlan(job="j", round=rnd, method="fedkseed", lr=plan.lr, local_steps=1, batch_size=1,
                       params=plan.params)
        u = Update(job="j", round=rnd, device="d", method="fedkseed", msg_id=rnd + 1, num_samples=1,
                   tensors=seed_tensors(np.array(seeds), np.array(g), SCALARS))
        state, delta = server.aggregate(job, state, rp, [u])
        G = np.zeros(8, np.float32)
        G[seeds] = g
        m = np.float32(0.5) * m + (np.float32(-0.1) * G)
        want = np.float32(2.0) * m
        got = np.zeros(8, np.float32)
        got[delta.tensors[0].data.astype(int)] = delta.tensors[1].data
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.count_nonzero(got) == 4, "momentum keeps moving seeds drawn in earlier rounds"
