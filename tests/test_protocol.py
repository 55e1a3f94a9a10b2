"""Wire format: round trips, every rejection path, fuzzing, topics, dedup, docs in sync."""
import re
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from edgefed import protocol as P

ROOT = Path(__file__).resolve().parents[1]


def _rng(seed=0):
    return np.random.default_rng(seed)


def _zo(seeds, values, name="scalars"):
    """A ZO method's (seed index, value) pairs as the tensors it sends: "seeds" u32 + f32 values."""
    return [P.Tensor("seeds", np.asarray(seeds, np.uint32)), P.Tensor(name, np.asarray(values, np.float32))]


def sample_messages():
    r = _rng(1)
    k = 4096
    return [
        P.RoundPlan("job-1", 7, "fedkseed", lr=3e-7, local_steps=10, batch_size=8, deadline=1.8e9,
                    min_devices=3,
                    params={"alpha": 0.5, "rounds": 40, "loss": "label-token", "flag": True, "eps": 1e-3,
                            "k": k, "seed_pool_id": -(2**63) + 5},
                    tensors=[P.Tensor("seed_probs", r.random(k).astype(np.float32))],
                    delta_tensors=[*_zo(r.integers(0, k, 300), r.standard_normal(300), "coeffs"),
                                   P.Tensor("layers.0.q_proj.lora_A", r.standard_normal((8, 64)))]),
        P.RoundPlan("j", 0, "fedavg"),
        P.Update("job-1", 7, "pi4-kitchen", "fedkseed", msg_id=P.MessageIds().next(), num_samples=64,
                 tensors=_zo(r.integers(0, k, 200), r.standard_normal(200)), train_loss=0.693),
        P.Update("job-1", 7, "jetson.2", "fedlora", msg_id=1, num_samples=1,
                 tensors=[P.Tensor("a", r.standard_normal((8, 576))),
                          P.Tensor("b", r.standard_normal((576, 8))), P.Tensor("scalar", 3.0)]),
        P.Ack("job-1", 7, "pi4-kitchen", 12345, P.AckStatus.LATE, "round 7 closed at 12:00; ünïcode"),
        P.Ack("job-1", 7, "d", 1),
        P.Status("job-1", "pi4-kitchen", "training", "raspberry-pi-4", 7, 1.7e9, "step 3/10"),
        P.Status("job-1", "d", "offline"),
        P.SyncRequest("job-1", "pi4-kitchen", from_round=3, full=False, request_id=99),
        P.SyncReply("job-1", "pi4-kitchen", 3, 6, request_id=99, rounds=[
            P.RoundDelta(4, _zo([1, 2], [0.5, -0.5], "coeffs")), P.RoundDelta(6, [P.Tensor("t", np.ones(3))])]),
        P.SyncReply("job-1", "d", 0, 6, full=True, state=[P.Tensor("w", r.standard_normal((4, 4)))]),
        P.JobState("job-1", 7, 2, "fedkseed", model="smollm2-135m/lora-r8",
                   digest="ab" * 32, updated_at=1.7e9, params={"x": 1}),
    ]


@pytest.mark.parametrize("msg", sample_messages(), ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    data = msg.encode()
    back = P.decode(data)
    assert type(back) is type(msg)
    assert back == msg and back.encode() == data
    for f, _ in msg.SCHEMA:  # field by field, not only via bytes
        a, b = getattr(msg, f), getattr(back, f)
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and np.array_equal(a, b)
        elif isinstance(a, list):
            assert len(a) == len(b)
        else:
            assert a == b, f
    assert P.decode(bytearray(data)) == msg and P.decode(memoryview(data)) == msg


def test_decoded_arrays_are_owned_and_writable():
    u = P.decode(sample_messages()[2].encode())
    u.tensor("scalars").data[0] = 1.0  # no read-only view of the payload
    assert u.tensor("seeds").data.dtype == np.uint32 and u.tensor("scalars").data.dtype == np.float32


def test_sizes_are_compact():
    k = 4096
    u = P.Update("j", 1, "d", "fedkseed", 1, 8, _zo(np.arange(k), np.zeros(k)))
    assert len(u.encode()) < 8 * k + 128  # 4 B index + 4 B scalar per seed, small fixed part
    # v2 (ZO pairs as two named tensors: names, shapes) costs 26 B more than v1 (64 + 8k: two plain arrays)
    assert len(u.encode()) == 8 * k + 90
    assert len(P.Ack("j", 1, "d", 1).encode()) < 48


def _frame(mtype, body, version=P.PROTOCOL_VERSION, flags=0, magic=P.MAGIC):
    head = P.HEADER.pack(magic, version, mtype, flags, len(body))
    return head + body + P.TRAILER.pack(zlib.crc32(head + body))


def _refresh_crc(data: bytes) -> bytes:
    return data[:-4] + P.TRAILER.pack(zlib.crc32(data[:-4]))


def test_bad_magic():
    data = bytearray(P.Ack("j", 1, "d", 1).encode())
    data[:4] = b"MQTT"
    with pytest.raises(P.BadMagic, match="not an EdgeFed message"):
        P.decode(bytes(data))


def test_wrong_version_message_text():
    data = bytearray(P.Ack("j", 1, "d", 1).encode())
    data[4] = 3
    with pytest.raises(P.UnsupportedVersion) as e:
        P.decode(_refresh_crc(bytes(data)))
    assert str(e.value) == ("protocol version 3 not supported (this build speaks 2); "
                            "upgrade edgefed on the device")
    assert e.value.received == 3
    data[4] = 1  # a v1 message (an edgefed from before the v2 change): the same error, with its hint
    with pytest.raises(P.UnsupportedVersion) as e:
        P.decode(_refresh_crc(bytes(data)))
    assert str(e.value) == ("protocol version 1 not supported (this build speaks 2); "
                            "the sender runs an older edgefed; upgrade it")
    data[4] = 0
    with pytest.raises(P.UnsupportedVersion, match="version 0 not supported.*older"):
        P.decode(bytes(data))


def test_version_checked_before_crc():
    # a future version may change the trailer; the version error must still be the one shown
    for version in (1, 3):
        data = bytearray(P.Ack("j", 1, "d", 1).encode())
        data[4] = version
        data[-1] ^= 0xFF
        with pytest.raises(P.UnsupportedVersion):
            P.decode(bytes(data))


@pytest.mark.parametrize("cut", [0, 1, 15, 16, 30, -1])
def test_truncated(cut):
    data = sample_messages()[2].encode()
    with pytest.raises(P.TruncatedMessage):
        P.decode(data[:cut] if cut >= 0 else data[:cut])


def test_truncated_inside_body_with_consistent_header():
    # header and CRC agree with a body that is cut in the middle of an array
    full = sample_messages()[2].encode()
    body = full[P.HEADER.size:-4][:60]
    with pytest.raises(P.TruncatedMessage, match="needs .* bytes but only"):
        P.decode(_frame(int(P.MessageType.UPDATE), body))


def test_crc_mismatch():
    data = bytearray(sample_messages()[2].encode())
    data[40] ^= 0x01
    with pytest.raises(P.ChecksumMismatch, match="CRC32 mismatch"):
        P.decode(bytes(data))


def test_unknown_type_flags_and_trailing_bytes():
    with pytest.raises(P.ProtocolError, match="unknown message type 99"):
        P.decode(_frame(99, b""))
    body = P.Ack("j", 1, "d", 1).encode()[P.HEADER.size:-4]
    with pytest.raises(P.ProtocolError, match="unknown header flags"):
        P.decode(_frame(int(P.MessageType.ACK), body, flags=0x8000))
    with pytest.raises(P.ProtocolError, match="trailing bytes"):
        P.decode(_frame(int(P.MessageType.ACK), body + b"\0"))
    with pytest.raises(P.ProtocolError, match="expected a Update"):
        P.decode(P.Ack("j", 1, "d", 1).encode(), expect=P.Update)


def test_oversize_message_rejected_up_front():
    with pytest.raises(P.MessageTooLarge, match="limit is 4194304"):
        P.decode(b"\0" * (4 * 1024 * 1024 + 1))
    small = P.Limits(max_message_bytes=1000)
    big = P.Update("j", 1, "d", "m", 1, 1, _zo(np.arange(500), np.zeros(500)))
    with pytest.raises(P.MessageTooLarge):
        big.encode(limits=small)
    with pytest.raises(P.MessageTooLarge):
        P.decode(big.encode(), limits=small)


def _update_body_claiming(count: int, n_tensors: int = 1) -> bytes:
    """An Update body whose (first) u32 tensor claims `count` elements but carries none."""
    w = b""
    for s in ("j",):
        w += struct.pack("<H", len(s)) + s.encode()
    w += struct.pack("<I", 1)
    for s in ("d", "m"):
        w += struct.pack("<H", len(s)) + s.encode()
    w += struct.pack("<QI", 1, 1)
    w += struct.pack("<H", n_tensors) + struct.pack("<H", 5) + b"seeds"
    w += struct.pack("<BI", 1, count) + struct.pack("<BI", 2, count)
    return w


def test_huge_counts_rejected_before_allocating():
    tracemalloc.start()
    try:
        for count in (2**32 - 1, 70_000, 1000):
            with pytest.raises(P.ProtocolError) as e:
                P.decode(_frame(int(P.MessageType.UPDATE), _update_body_claiming(count)))
            assert isinstance(e.value, (P.MessageTooLarge, P.TruncatedMessage))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024  # nothing close to count * 4 bytes was ever allocated


def test_limits_on_counts():
    with pytest.raises(P.MessageTooLarge, match="limit is 256"):
        P.decode(_frame(int(P.MessageType.UPDATE), _update_body_claiming(1, n_tensors=257)))
    with pytest.raises(P.MessageTooLarge, match="message limit is 4194304"):
        P.decode(_frame(int(P.MessageType.UPDATE), _update_body_claiming(2**20 + 1)))
    lim = P.Limits(max_tensors=1, max_params=1, max_text=5)
    with pytest.raises(P.MessageTooLarge):
        P.Update("j", 1, "d", "m", 1, 1, tensors=[P.Tensor("a", [1]), P.Tensor("b", [1])]
                 ).encode(limits=lim)
    with pytest.raises(P.MessageTooLarge):
        P.RoundPlan("j", 1, "m", params={"a": 1, "b": 2}).encode(limits=lim)
    with pytest.raises(P.MessageTooLarge):
        P.Ack("j", 1, "d", 1, reason="too long").encode(limits=lim)
    # a decoder with tighter limits refuses what a looser encoder produced
    with pytest.raises(P.MessageTooLarge):
        P.decode(P.Ack("j", 1, "d", 1, reason="too long").encode(), limits=lim)


def test_an_empty_tensor_with_a_huge_dimension_is_refused_not_crashed():
    # shape (0, 3) holds no values; a shape of (0, 2**32 - 1) holds none either, but numpy cannot
    # even build it: the decoder must say so with its own error (found by the hypothesis fuzzer)
    good = P.Update("j", 1, "d", "m", 1, 4, [P.Tensor("w", np.zeros((0, 3), np.float32))]).encode()
    assert P.decode(good).tensors[0].data.shape == (0, 3)
    b = bytearray(good)
    at = good.index(b"\x01\x00w\x02") + 4  # name "w", 2 dims: the shape follows
    assert struct.unpack_from("<2I", b, at) == (0, 3)
    struct.pack_into("<I", b, at + 4, 2**32 - 1)
    struct.pack_into("<I", b, len(b) - 4, zlib.crc32(bytes(b[:-4])))
    with pytest.raises(P.MessageTooLarge, match=r"\(w\) has shape \(0, 4294967295\)"):
        P.decode(bytes(b))
    # nor may several dims, each under the limit, multiply past it beside the zero
    good = P.Update("j", 1, "d", "m", 1, 4, [P.Tensor("w", np.zeros((0, 3, 3, 3), np.float32))]).encode()
    b = bytearray(good)
    at = good.index(b"\x01\x00w\x04") + 4
    struct.pack_into("<4I", b, at, 0, 10**6, 10**6, 10**6)
    struct.pack_into("<I", b, len(b) - 4, zlib.crc32(bytes(b[:-4])))
    with pytest.raises(P.MessageTooLarge, match=r"\(w\) has shape \(0, 1000000, 1000000, 1000000\)"):
        P.decode(bytes(b))


def test_nan_scalar_names_the_index():
    s = np.zeros(10, np.float32)
    s[7] = np.nan
    with pytest.raises(P.InvalidField, match=r"tensors\[1\] \(scalars\) flat index \[7\] is nan"):
        P.Update("j", 1, "d", "m", 1, 4, _zo(np.arange(10, 20), s)).encode()
    # also when a foreign encoder put it on the wire
    good = P.Update("j", 1, "d", "m", 1, 4, _zo(np.arange(10, 20), np.zeros(10))).encode()
    at = good.index(b"scalars") + 7 + 5 + 5  # name, ndim + dim, dtype + count: start of the f32[10]
    bad = bytearray(good)
    bad[at + 4 * 3: at + 4 * 4] = struct.pack("<f", float("inf"))
    with pytest.raises(P.InvalidField, match=r"\(scalars\) flat index \[3\] is inf"):
        P.decode(_refresh_crc(bytes(bad)))


def test_other_non_finite_values():
    t = np.ones((2, 2))
    t[1, 0] = np.inf
    with pytest.raises(P.InvalidField, match=r"flat index \[2\]"):
        P.Update("j", 1, "d", "m", 1, 1, tensors=[P.Tensor("x", t)]).encode()
    with pytest.raises(P.InvalidField, match="train_loss"):
        P.Update("j", 1, "d", "m", 1, 1, train_loss=float("nan")).encode()
    with pytest.raises(P.InvalidField, match="lr"):
        P.RoundPlan("j", 1, "m", lr=float("inf")).encode()
    with pytest.raises(P.InvalidField, match=r"delta_tensors\[1\] \(coeffs\)"):
        P.RoundPlan("j", 1, "m", delta_tensors=_zo([1], [np.nan], "coeffs")).encode()
    with pytest.raises(P.InvalidField, match=r"tensors\[0\] \(seed_probs\)"):
        P.RoundPlan("j", 1, "m", tensors=[P.Tensor("seed_probs", [np.inf])]).encode()


def test_field_rules():
    with pytest.raises(P.InvalidField, match="num_samples must be > 0"):
        P.Update("j", 1, "d", "m", 1, 0).encode()
    with pytest.raises(P.InvalidField, match="deadline"):
        P.RoundPlan("j", 1, "m", deadline=-1.0).encode()
    with pytest.raises(P.InvalidField, match="round"):
        P.Ack("j", -1, "d", 1).encode()
    with pytest.raises(P.InvalidField, match="ack status"):
        P.Ack("j", 1, "d", 1, status=9).encode()
    with pytest.raises(P.InvalidField, match="must increase"):
        P.SyncReply("j", "d", 3, 6, rounds=[P.RoundDelta(5), P.RoundDelta(5)]).encode()
    with pytest.raises(P.InvalidField, match="to_round"):
        P.SyncReply("j", "d", 6, 3).encode()
    with pytest.raises(P.InvalidField, match="params"):
        P.RoundPlan("j", 1, "m", params={"x": [1]}).encode()


@pytest.mark.parametrize("bad", ["", "a/b", "dev+1", "dev#", "$SYS", "x" * 65, "sp ace",
                                 "ünï", None, 5])
def test_bad_ids(bad):
    with pytest.raises(P.InvalidField, match="not a valid id"):
        P.Update("j", 1, bad, "m", 1, 1).encode()
    with pytest.raises(P.InvalidField):
        P.Topics("job").update(bad)


def test_bad_id_on_the_wire():
    good = P.Ack("job", 1, "dev", 1).encode()
    bad = _refresh_crc(good.replace(b"dev", b"d/v"))
    with pytest.raises(P.InvalidField, match="'d/v' is not a valid id"):
        P.decode(bad)


def test_validate_update_against_plan():
    plan = P.RoundPlan("job", 4, "fedkseed")
    ok = P.Update("job", 4, "d", "fedkseed", 1, 8, _zo([1, 2, 99], [0.1, 0.2, 0.3]))
    assert P.validate_update(ok, plan) is ok
    with pytest.raises(P.RoundMismatch, match="round 3, the current round is 4") as e:
        P.validate_update(P.Update("job", 3, "d", "fedkseed", 1, 8), plan)
    assert (e.value.expected, e.value.received) == (4, 3)
    with pytest.raises(P.InvalidField, match="job"):
        P.validate_update(P.Update("other", 4, "d", "fedkseed", 1, 8), plan)
    with pytest.raises(P.InvalidField, match="method"):
        P.validate_update(P.Update("job", 4, "d", "mezo", 1, 8), plan)


def _fedkseed_plan(k=100, probs=None, **kw):
    from edgefed.methods import JobConfig
    from edgefed.methods.fedkseed import FedKSeedServer
    job = JobConfig(job="job", method="fedkseed", k=k, local_steps=4, batch_size=2,
                    params={"pro": 1} if probs is not None else {})
    srv = FedKSeedServer()
    state = srv.init_state(job)
    pf = srv.plan_round(job, state, 4)
    plan = P.RoundPlan("job", 4, "fedkseed", lr=pf.lr, local_steps=pf.local_steps, batch_size=pf.batch_size,
                       params=pf.params, tensors=pf.tensors if probs is None else
                       [P.Tensor("seed_probs", np.asarray(probs, np.float32))], **kw)
    return srv, job, state, P.decode(plan.encode())


def test_fedkseed_checks_what_its_tensors_mean():
    """v1 checked seed ranges, sampling probabilities and seed/scalar pairs in the generic messages;
    v2 leaves them to the method (the wire layer only checks structure)."""
    from edgefed.methods.fedkseed import FedKSeedClient, zo_plan
    probs = np.ones(100, np.float32)
    probs[5] = 0
    srv, job, state, plan = _fedkseed_plan(probs=probs)
    assert zo_plan(plan).k == 100 and zo_plan(plan).probs[5] == 0

    def check(tensors):
        u = P.Update("job", 4, "d", "fedkseed", 1, 8, tensors)
        srv.validate_update(job, state, plan, P.validate_update(u, plan))

    check(_zo([1, 2, 99], [0.1, 0.2, 0.3]))
    with pytest.raises(P.InvalidField, match="seed index 100 at position 1 is out of range for a pool of K=100"):
        check(_zo([1, 100], [0, 0]))
    with pytest.raises(P.InvalidField, match="probability 0"):
        check(_zo([5], [0.0]))
    with pytest.raises(P.InvalidField, match="2 seed indices but 3 scalars"):
        check([P.Tensor("seeds", np.array([1, 2], np.uint32)), P.Tensor("scalars", np.zeros(3, np.float32))])
    with pytest.raises(P.InvalidField, match="'seeds' has dtype f32; expected u32"):
        check([P.Tensor("seeds", np.array([1.5])), P.Tensor("scalars", np.zeros(1, np.float32))])
    with pytest.raises(P.InvalidField, match="unexpected: \\['delta'\\]"):
        check([*_zo([1], [0.1]), P.Tensor("delta", np.zeros(3, np.float32))])
    with pytest.raises(P.InvalidField, match="missing: \\['scalars'\\]"):
        check([P.Tensor("seeds", np.array([1], np.uint32))])
    with pytest.raises(P.InvalidField, match="'scalars' has dtype u32"):  # e.g. a masked vector
        check([P.Tensor("seeds", np.array([1], np.uint32)), P.Tensor("scalars", np.array([1], np.uint32))])
    # the plan's own settings and tensors
    with pytest.raises(P.InvalidField, match="seed_probs has 3 entries but K=4"):
        zo_plan(_fedkseed_plan(k=4, probs=[1, 1, 1])[3])
    with pytest.raises(P.InvalidField, match="positive sum"):
        zo_plan(_fedkseed_plan(k=2, probs=[0, 0])[3])
    bad = P.RoundPlan("job", 4, "fedkseed", params={**plan.params, "eps": -1.0})
    with pytest.raises(P.InvalidField, match="eps=-1.0 must be >= 0"):
        zo_plan(bad)
    with pytest.raises(P.InvalidField, match="no 'k' param"):
        zo_plan(P.RoundPlan("job", 4, "fedkseed"))
    # a delta with a seed index outside the pool is refused before anything is applied
    with pytest.raises(P.InvalidField, match="seed index 10 at position 1 is out of range for a pool of K=10"):
        FedKSeedClient().apply_delta(None, P.RoundDelta(3, _zo([3, 10], [1, 1], "coeffs")),
                                     {"k": 10, "seed_pool_id": 0})


def test_the_seed_pool_is_not_a_per_device_setting():
    from edgefed.methods import JobConfig
    from edgefed.methods.fedkseed import FedKSeedServer
    job = JobConfig(job="j", method="fedkseed", k=8, params={"assign": '{"pi": {"k": 4}}'})
    with pytest.raises(ValueError, match="assign\\['pi'\\] sets k"):
        FedKSeedServer().init_state(job)


def test_seed_pool_id_round_trips_the_whole_u64_range():
    from edgefed.methods import JobConfig
    from edgefed.methods.fedkseed import zo_plan, zo_plan_params
    for pool_id in (0, 5, 2**63 - 1, 2**63, 2**64 - 1):
        params = zo_plan_params(JobConfig(job="j", method="fedkseed", k=8, seed_pool_id=pool_id))
        plan = P.decode(P.RoundPlan("j", 0, "fedkseed", params=params).encode())
        assert zo_plan(plan).seed_pool_id == pool_id


def test_message_ids_monotonic():
    ids = P.MessageIds()
    seq = [ids.next() for _ in range(1000)]
    assert seq == sorted(set(seq))
    assert P.MessageIds(last=2**62).next() == 2**62 + 1


def test_topics_and_parse():
    t = P.Topics("job-1")
    assert t.plan() == "edgefed/v1/job-1/plan"
    assert t.state() == "edgefed/v1/job-1/state"
    assert t.update("d1") == "edgefed/v1/job-1/update/d1"
    assert t.ack("d1") == "edgefed/v1/job-1/ack/d1"
    assert t.status("d1") == "edgefed/v1/job-1/status/d1"
    assert t.sync_request("d1") == "edgefed/v1/job-1/sync/request/d1"
    assert t.sync_reply("d1") == "edgefed/v1/job-1/sync/reply/d1"
    assert t.all_updates() == "edgefed/v1/job-1/update/+"
    assert P.parse_topic(t.sync_request("d1")) == P.TopicInfo("job-1", "sync_request", "d1")
    assert P.parse_topic(t.plan()) == P.TopicInfo("job-1", "plan")
    for bad in ("edgefed/v2/j/plan", "edgefed/v1/j/nope", "edgefed/v1/j/update", "x"):
        with pytest.raises(P.ProtocolError):
            P.parse_topic(bad)


def test_check_topic():
    t = P.Topics("j")
    u = P.Update("j", 1, "d1", "m", 1, 1)
    P.check_topic(t.update("d1"), u)
    with pytest.raises(P.InvalidField, match="its own topics"):
        P.check_topic(t.update("d2"), u)  # a device posing as another
    with pytest.raises(P.ProtocolError, match="expected RoundPlan"):
        P.check_topic(t.plan(), u)


def test_fuzz_random_bytes_only_raise_protocol_error():
    r = _rng(42)
    for _ in range(3000):
        data = r.integers(0, 256, int(r.integers(0, 200)), dtype=np.uint8).tobytes()
        with pytest.raises(P.ProtocolError):
            P.decode(data)


def test_fuzz_mutated_valid_messages():
    """Flip bytes in valid messages and fix the CRC, so the body parser sees the damage."""
    r = _rng(7)
    seeds = [m.encode() for m in sample_messages()
             if len(m.encode()) < 20000]  # keep it quick
    outcomes = {"ok": 0, "err": 0}
    for i in range(4000):
        data = bytearray(seeds[i % len(seeds)])
        for _ in range(int(r.integers(1, 4))):
            pos = int(r.integers(P.HEADER.size, len(data) - 4)) if len(data) > 20 else 0
            data[pos] = int(r.integers(0, 256))
        if r.random() < 0.2:  # also truncate / extend with a consistent header
            data = data[:-4][:int(r.integers(P.HEADER.size, len(data) - 3))] + data[-4:]
            struct.pack_into("<I", data, 8, len(data) - P.OVERHEAD)
        try:
            P.decode(_refresh_crc(bytes(data)))
            outcomes["ok"] += 1
        except P.ProtocolError:
            outcomes["err"] += 1
    assert outcomes["err"] > 1000  # the parser really was exercised


def test_device_side_imports_no_torch_and_no_pickle():
    code = ("import sys, edgefed.protocol, edgefed.transport, edgefed.transport.mqtt, "
            "edgefed.transport.inproc, edgefed.transport.broker; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'amqtt')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # numpy itself imports pickle; what matters is that our wire code never uses it
    for f in [ROOT / "edgefed" / "protocol.py", *(ROOT / "edgefed" / "transport").glob("*.py")]:
        assert "pickle" not in f.read_text(), f


def test_docs_match_schema():
    """docs/protocol.md is the readable copy of SCHEMA: every message's field table must agree."""
    doc = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    for code, cls in P.MESSAGE_TYPES.items():
        m = re.search(rf"^### {cls.__name__} \(type {code}\)\n(.*?)(?=^### |\Z)", doc, re.M | re.S)
        assert m, f"docs/protocol.md has no section '### {cls.__name__} (type {code})'"
        rows = re.findall(r"^\| `(\w+)` \| `([^`]+)` \|", m.group(1), re.M)
        assert rows == list(cls.SCHEMA), f"{cls.__name__}: docs {rows} != code {list(cls.SCHEMA)}"
    assert f"version {P.PROTOCOL_VERSION}" in doc and P.MAGIC.decode() in doc
    # every wire kind a message uses is explained in the "Field kinds" table
    kinds = re.search(r"^## Field kinds\n(.*?)(?=^## )", doc, re.M | re.S)
    assert kinds, "docs/protocol.md has no '## Field kinds' section"
    listed = {k for row in re.findall(r"^\| ([^|]+) \|", kinds.group(1), re.M) for k in re.findall(r"`([^`]+)`", row)}
    used = {kind for cls in P.MESSAGE_TYPES.values() for _, kind in cls.SCHEMA}
    assert used <= listed, f"kinds without a row in 'Field kinds': {sorted(used - listed)}"


def test_fields_are_declared_once():
    """SCHEMA is derived from the dataclass fields' wire() declarations, in field order."""
    import dataclasses
    for cls in P.MESSAGE_TYPES.values():
        names = [f.name for f in dataclasses.fields(cls)]
        assert [n for n, _ in cls.SCHEMA] == names
        assert all(f.metadata["wire"]["kind"] == k for f, (_, k) in zip(dataclasses.fields(cls), cls.SCHEMA))
    with pytest.raises(TypeError, match="not declared with protocol.wire"):
        @P.message
        class Bad(P.Message):
            x: int = 0


# -- tensor dtypes --------------------------------------------------------------------------

def test_tensors_keep_their_dtype_on_the_wire_and_bf16_rounds_to_nearest_even():
    import ml_dtypes  # the reference bfloat16 (a dependency of onnx on hosts)

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((4, 33)) * 100).astype(np.float32)
    ts = [P.Tensor("f32", x), P.Tensor.bf16("bf16", x), P.Tensor("f16", x.astype(np.float16)),
          P.Tensor("i8", rng.integers(-128, 128, 50).astype(np.int8)),
          P.Tensor("u32", rng.integers(0, 2**32, 7, dtype=np.uint64).astype(np.uint32))]
    upd = P.Update(job="j", round=1, device="d", method="m", msg_id=5, num_samples=3, tensors=ts)
    back = P.decode(upd.encode(), expect=P.Update)
    for a, b in zip(ts, back.tensors):
        assert (a.name, a.dtype, a.shape) == (b.name, b.dtype, b.shape)
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data)
    assert np.array_equal(back.tensors[1].data, x.astype(ml_dtypes.bfloat16).view(np.uint16))
    assert np.array_equal(back.tensors[1].float32(), x.astype(ml_dtypes.bfloat16).astype(np.float32))
    # bytes: half-precision payloads are half the size
    size = {t.dtype: len(P.Update(job="j", round=1, device="d", method="m", msg_id=5, num_samples=3,
                                   tensors=[t]).encode()) for t in ts[:3]}
    assert size["bf16"] - 4 * 33 * 2 < size["f32"] - 4 * 33 * 4 + 8


def test_non_finite_half_precision_values_and_unknown_dtype_codes_are_refused():
    bad = np.array([1.0, np.inf], np.float32)
    with pytest.raises(P.InvalidField, match="must be finite"):
        P.Update(job="j", round=1, device="d", method="m", msg_id=5, num_samples=3,
                 tensors=[P.Tensor.bf16("t", bad)]).encode()
    with pytest.raises(P.InvalidField, match="bf16 data must be uint16"):
        P.Tensor("t", bad, "bf16")
    raw = bytearray(P.Update(job="j", round=1, device="d", method="m", msg_id=5, num_samples=3,
                             tensors=[P.Tensor("t", np.ones(2, np.float16))]).encode())
    i = bytes(raw).index(b"\x03\x02\x00\x00\x00")  # dtype code 3 (f16), count 2
    raw[i] = 9
    body = bytes(raw[:-4])
    import zlib
    raw[-4:] = zlib.crc32(body).to_bytes(4, "little")
    with pytest.raises(P.InvalidField, match="unknown dtype code 9"):
        P.decode(bytes(raw))
