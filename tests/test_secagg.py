"""Secure aggregation (edgefed.security.secagg): the sum comes out exact up to the fixed-point
step, dropouts are recovered up to the threshold, and every message a device or server should
not act on is refused."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefed.security.secagg import (FixedPoint, SecAggClient, SecAggConfig, SecAggError, SecAggServer, Stage,
                                     decode_message, neighbours, run_in_memory)
from edgefed.security.signing import Signer


def _inputs(n, length, bound, seed=0):
    rng = np.random.default_rng(seed)
    return {f"dev{i:02d}": rng.uniform(-bound, bound, length) for i in range(n)}


def _cfg(n, length=257, bound=10.0, threshold=None, degree=0, rnd=1, job="job1", bits=32):
    nb = n - 1 if degree == 0 else degree
    return SecAggConfig(job=job, round=rnd, length=length, threshold=threshold or nb // 2 + 1, degree=degree,
                        fixed=FixedPoint.for_sum(n, bound, bits), bound=bound)


def _check_sum(total, inputs, survivors, cfg):
    want = sum(inputs[d] for d in survivors)
    step = 2.0 ** -cfg.fixed.frac_bits
    assert np.max(np.abs(total - want)) <= len(survivors) * step / 2 + 1e-12


@pytest.mark.parametrize("n,degree,bits", [(5, 0, 32), (12, 6, 32), (12, 0, 64)])
def test_sum_is_exact_up_to_the_fixed_point_step(n, degree, bits):
    inputs = _inputs(n, 257, 10.0)
    cfg = _cfg(n, degree=degree, bits=bits)
    total, survivors, nbytes = run_in_memory(cfg, inputs)
    assert survivors == sorted(inputs)
    _check_sum(total, inputs, survivors, cfg)
    assert nbytes["masked"] >= n * 257 * bits // 8  # the vectors themselves


def test_signed_round_with_dropouts_at_every_stage():
    n, degree = 10, 8
    inputs = _inputs(n, 300, 5.0, seed=3)
    signers = {d: Signer.generate(d) for d in inputs}
    cfg = _cfg(n, length=300, bound=5.0, degree=degree, threshold=5)
    drop = {Stage.SHARES: ["dev07"], Stage.MASKED: ["dev03"], Stage.UNMASK: ["dev01"]}
    total, survivors, _ = run_in_memory(cfg, inputs, drop=drop, signers=signers, server_signer=Signer.generate("server"))
    # dev07 never shared keys, dev03 shared but sent no input (its masks are removed through
    # its reconstructed key); dev01 sent its input, then went quiet during unmasking
    assert survivors == sorted(set(inputs) - {"dev07", "dev03"})
    _check_sum(total, inputs, survivors, cfg)


def test_too_many_dropouts_fail_with_a_clear_error():
    inputs = _inputs(6, 50, 1.0)
    cfg = _cfg(6, length=50, bound=1.0, threshold=4)  # complete graph: 5 neighbours, tolerate 1 loss
    with pytest.raises(SecAggError, match="masked inputs arrived|too few unmask shares"):
        run_in_memory(cfg, inputs, drop={Stage.MASKED: ["dev00", "dev01", "dev02"]})


def _to_masked_inputs(srv, clients, inputs, senders=None):
    """Advertise, roster, shares, forwards; then masked inputs from `senders` (default: all)."""
    for c in clients.values():
        srv.add_advertise(c.advertise())
    roster = srv.roster()
    for c in clients.values():
        srv.add_shares(c.share_keys(roster))
    for d in (senders if senders is not None else clients):
        srv.add_masked(clients[d].masked_input(srv.forward(d), inputs[d]))


def test_a_masked_input_reveals_nothing_alone():
    """One device's masked vector is uniform noise to the server: uncorrelated with its input."""
    inputs = _inputs(4, 4096, 1.0, seed=9)
    cfg = _cfg(4, length=4096, bound=1.0)
    srv = SecAggServer(cfg, graph_seed=1)
    clients = {d: SecAggClient(d, cfg) for d in inputs}
    _to_masked_inputs(srv, clients, inputs)
    seen = cfg.fixed.decode(srv.masked["dev00"])
    assert abs(np.corrcoef(seen, inputs["dev00"])[0, 1]) < 0.1
    raw = srv.masked["dev00"].astype(np.float64)  # uniform over the whole ring, like any key stream
    assert abs(raw.mean() / 2**32 - 0.5) < 0.02 and abs(raw.std() / 2**32 - 12 ** -0.5) < 0.02


def _setup(n=5, **kw):
    inputs = _inputs(n, 64, 1.0)
    cfg = _cfg(n, length=64, bound=1.0, **kw)
    server_signer = Signer.generate("server")
    signers = {d: Signer.generate(d) for d in inputs}
    keys = {d: s.public_key() for d, s in signers.items()}
    srv = SecAggServer(cfg, signer=server_signer, device_keys=keys, graph_seed=5)
    clients = {d: SecAggClient(d, cfg, signer=signers[d], server_key=server_signer.public_key(), peer_keys=keys)
               for d in inputs}
    return cfg, inputs, srv, clients, server_signer, signers


def test_device_refuses_to_reveal_both_secrets_of_a_peer():
    cfg, inputs, srv, clients, server_signer, _ = _setup()
    _to_masked_inputs(srv, clients, inputs)
    honest = srv.unmask_request()
    clients["dev00"].unmask(honest)  # reveals dev01's self-mask share (dev01 survived)
    # a curious server now claims dev01 dropped, to get its key share too
    liar = SecAggServer(cfg, signer=server_signer)
    liar.survivors, liar.dropped = ["dev00", "dev02", "dev03", "dev04"], ["dev01"]
    from edgefed.security import secagg as S
    body = S._W().u32(4)
    for d in liar.survivors:
        body.id(d)
    body.u32(1).id("dev01")
    forged = S._pack(Stage.UNMASK_REQUEST, cfg, S.SERVER_ID, body.bytes(), server_signer)
    with pytest.raises(SecAggError, match="both secrets of dev01"):
        clients["dev00"].unmask(forged)


def test_unmask_request_below_threshold_is_refused():
    cfg, inputs, srv, clients, *_ = _setup(n=5, threshold=3)
    _to_masked_inputs(srv, clients, inputs, senders=("dev00", "dev01"))
    with pytest.raises(SecAggError, match="at least 3"):
        srv.unmask_request()  # the server itself will not unmask 2 inputs


def test_forged_and_replayed_messages_are_refused():
    cfg, inputs, srv, clients, server_signer, signers = _setup()
    adv = clients["dev00"].advertise()
    # a stranger's advertisement (not a registered device) and a tampered one
    stranger = SecAggClient("dev99", cfg, signer=Signer.generate("dev99"))
    with pytest.raises(SecAggError, match="not a registered device"):
        srv.add_advertise(stranger.advertise())
    tampered = bytearray(adv)
    tampered[-70] ^= 1  # inside the signed body
    with pytest.raises(SecAggError):
        srv.add_advertise(bytes(tampered))
    # dev01's key used to speak for dev00
    impostor = SecAggClient("dev00", cfg, signer=Signer("dev00", signers["dev01"]._key))
    with pytest.raises(SecAggError, match="bad signature"):
        srv.add_advertise(impostor.advertise())
    # a message of another round
    other = SecAggClient("dev00", _cfg(5, length=64, bound=1.0, rnd=2), signer=signers["dev00"])
    with pytest.raises(SecAggError, match="round 2"):
        srv.add_advertise(other.advertise())
    for c in clients.values():
        srv.add_advertise(c.advertise())
    with pytest.raises(SecAggError, match="twice"):
        srv.add_advertise(adv)
    roster = srv.roster()
    # a roster signed by someone else, or one that swaps this device's keys
    fake_srv = SecAggServer(cfg, signer=Signer.generate("server"))
    for c in clients.values():
        fake_srv.add_advertise(c.advertise())
    with pytest.raises(SecAggError, match="bad signature"):
        clients["dev00"].share_keys(fake_srv.roster())
    swapped = SecAggServer(cfg, signer=server_signer)
    swapped.add_advertise(SecAggClient("dev00", cfg, signer=signers["dev00"]).advertise())
    for d in ("dev01", "dev02", "dev03", "dev04"):
        swapped.add_advertise(clients[d].advertise())
    with pytest.raises(SecAggError, match="own keys"):
        clients["dev00"].share_keys(swapped.roster())
    shares = {d: c.share_keys(roster) for d, c in clients.items()}
    for s in shares.values():
        srv.add_shares(s)
    # a forward whose ciphertext was altered in transit
    fwd = bytearray(srv.forward("dev00"))
    fwd[200] ^= 0x40
    with pytest.raises(SecAggError):
        clients["dev00"].masked_input(bytes(fwd), inputs["dev00"])


def test_bounds_and_fixed_point_are_checked():
    with pytest.raises(SecAggError, match="fraction bits"):
        FixedPoint.for_sum(100_000, 1e5)  # the sum would wrap a 32-bit ring
    assert FixedPoint.for_sum(100_000, 1e5, bits=64).frac_bits > 20
    fx = FixedPoint.for_sum(10, 2.0)
    with pytest.raises(SecAggError, match="clip before encoding"):
        fx.encode(np.array([2.5]), 2.0)
    with pytest.raises(SecAggError, match="non-finite"):
        fx.encode(np.array([np.nan]), 2.0)
    x = np.array([-2.0, -1e-3, 0.0, 1.5, 2.0])
    assert np.max(np.abs(fx.decode(fx.encode(x, 2.0)) - x)) <= 2.0 ** -fx.frac_bits / 2
    with pytest.raises(SecAggError, match="above half"):
        SecAggConfig(job="j", round=0, length=4, threshold=3, degree=6)


def test_neighbour_graph_is_symmetric_regular_and_agreed():
    ids = [f"d{i}" for i in range(40)]
    g = neighbours(ids, 7, 8)
    assert all(len(v) == 8 for v in g.values())
    assert all(u in g[v] for u in g for v in g[u])
    assert g == neighbours(list(reversed(ids)), 7, 8)  # order of arrival does not matter
    assert g != neighbours(ids, 8, 8)
    assert all(len(v) == 39 for v in neighbours(ids, 7, 0).values())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_decoder_never_crashes_on_garbage(data):
    try:
        decode_message(b"EFSA" + data)
    except SecAggError:
        pass
