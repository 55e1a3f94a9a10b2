"""Chunked transfer: split/reassemble round trips, reordering, loss, corruption, limits."""
import hashlib
import random
import struct
import subprocess
import sys
import threading
import zlib

import numpy as np
import pytest

from edgefed import chunking as C
from edgefed import protocol as P

H = C.CHUNK_HEADER
OVH = C.CHUNK_OVERHEAD


class FakeClock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def _msg(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _feed(r, chunks, sender="dev/a"):
    """Feed all chunks; return the list of non-None results."""
    out = [r.add(sender, c) for c in chunks]
    return [x for x in out if x is not None]


def _fields(chunk):
    return list(H.unpack_from(chunk, 0))


def _rebuild(fields, data):
    """A chunk with the given header fields and data and a *valid* CRC."""
    fields = list(fields)
    fields[-1] = len(data)
    head = H.pack(*fields)
    return head + data + struct.pack("<I", zlib.crc32(data, zlib.crc32(head)))


def _assert_empty(r):
    s = r.stats()
    assert s["streams_in_flight"] == 0 and s["bytes_in_flight"] == 0 and s["senders"] == 0


# --------------------------------------------------------------------------- layout

def test_header_layout():
    assert H.format == "<4sBBHQIIQQ32sI" and H.size == 76 and OVH == 80
    c = C.split(b"hello", 7, 1000)[0]
    magic, ver, flags, res, sid, idx, cnt, total, off, digest, dlen = _fields(c)
    assert (magic, ver, flags, res, sid, idx, cnt, total, off, dlen) == \
        (b"EDGC", 1, 0, 0, 7, 0, 1, 5, 0, 5)
    assert digest == hashlib.sha256(b"hello").digest()
    assert c[76:81] == b"hello" and len(c) == 85
    assert struct.unpack("<I", c[-4:])[0] == zlib.crc32(c[:-4])


# --------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("size_kind", ["zero", "one", "exact", "exact+1", "mib"])
def test_round_trip_sizes(size_kind):
    rnd = random.Random(hash(size_kind) & 0xFFFF)
    for trial in range(3):
        mcb = rnd.randint(OVH + 1, OVH + 70000)
        per = mcb - OVH
        n = {"zero": 0, "one": 1, "exact": per, "exact+1": per + 1,
             "mib": rnd.randint(2 << 20, 4 << 20)}[size_kind]
        if size_kind == "mib":
            mcb = rnd.randint(64 << 10, 1 << 20)
            per = mcb - OVH
        msg = _msg(n, trial)
        chunks = C.split(msg, rnd.getrandbits(64), mcb)
        assert len(chunks) == max(1, -(-n // per))
        assert all(len(c) <= mcb for c in chunks)
        assert all(C.is_chunk(c) for c in chunks)
        r = C.Reassembler()
        out = _feed(r, chunks)
        assert out == [msg] and type(out[0]) is bytes
        _assert_empty(r)
        assert r.stats()["completed"] == 1


def test_exact_chunk_is_one_chunk_and_plus_one_is_two():
    per = 100
    assert len(C.split(_msg(per), 1, per + OVH)) == 1
    two = C.split(_msg(per + 1), 1, per + OVH)
    assert len(two) == 2 and len(two[0]) == per + OVH and len(two[1]) == 1 + OVH


def test_needs_chunking():
    assert not C.needs_chunking(b"x" * 100, 100)
    assert C.needs_chunking(b"x" * 101, 100)
    assert not C.needs_chunking(b"", 1)


def test_split_refuses_bad_arguments():
    with pytest.raises(C.ChunkError, match="leaves no room for data"):
        C.split(b"abc", 1, OVH)
    assert len(C.split(b"abc", 1, OVH + 1)) == 3  # one data byte per chunk is still allowed
    with pytest.raises(C.ChunkError, match="stream_id"):
        C.split(b"abc", -1, 1000)
    with pytest.raises(C.ChunkError, match="stream_id"):
        C.split(b"abc", 1 << 64, 1000)
    with pytest.raises(C.ChunkError, match="must be bytes"):
        C.split("abc", 1, 1000)
    assert isinstance(C.ChunkError("x"), P.ProtocolError)


# --------------------------------------------------------------------------- order, dups, loss

def test_shuffled_chunks_reassemble():
    msg = _msg(50_000, 3)
    chunks = C.split(msg, 42, 1000)
    random.Random(1).shuffle(chunks)
    r = C.Reassembler()
    assert _feed(r, chunks) == [msg]
    _assert_empty(r)


def test_duplicates_are_ignored():
    msg = _msg(10_000, 4)
    chunks = C.split(msg, 5, 1000)
    r = C.Reassembler()
    feed = chunks[:5] + chunks[:5] + chunks[5:-1] + [chunks[3]] + [chunks[-1]]
    assert _feed(r, feed) == [msg]
    assert r.stats()["duplicates"] == 6
    # a late duplicate right after completion does not start a phantom stream
    assert r.add("dev/a", chunks[2]) is None
    _assert_empty(r)
    assert r.stats()["duplicates"] == 7 and r.stats()["completed"] == 1


def test_resend_after_recent_window_reassembles_again():
    clock = FakeClock()
    msg = _msg(3000, 5)
    chunks = C.split(msg, 9, 1000)
    r = C.Reassembler(clock=clock, recent_s=5.0)
    assert _feed(r, chunks) == [msg]
    clock.t += 30  # e.g. the ack was lost and the agent resends the same message (same msg_id)
    assert _feed(r, chunks) == [msg]
    assert r.stats()["completed"] == 2


def test_lost_chunk_expires_and_frees_memory():
    clock = FakeClock()
    msg = _msg(10_000, 6)
    chunks = C.split(msg, 77, 1000)
    r = C.Reassembler(ttl_s=60.0, clock=clock)
    assert _feed(r, chunks[:4] + chunks[5:]) == []  # chunk 4 lost
    s = r.stats()
    assert s["streams_in_flight"] == 1 and s["bytes_in_flight"] >= len(msg)
    assert r.in_flight() == [("dev/a", 77, len(chunks) - 1, len(chunks))]
    clock.t += 59
    assert r.expire() == []
    clock.t += 2
    assert r.expire() == [("dev/a", 77)]
    _assert_empty(r)
    assert r.stats()["dropped"] == {"expired": 1}
    assert r.expire() == []  # reported once


def test_expiry_also_happens_in_add_and_is_reported_later():
    clock = FakeClock()
    r = C.Reassembler(ttl_s=10.0, clock=clock)
    a = C.split(_msg(3000, 7), 1, 1000)
    r.add("dev/a", a[0])
    clock.t += 11
    b = C.split(_msg(500, 8), 2, 1000)
    assert r.add("dev/b", b[0]) == _msg(500, 8)  # this add() dropped dev/a's stale stream
    _assert_empty(r)
    assert r.expire() == [("dev/a", 1)]


def test_ttl_counts_from_the_last_chunk():
    clock = FakeClock()
    msg = _msg(5000, 9)
    chunks = C.split(msg, 3, 1000)
    r = C.Reassembler(ttl_s=10.0, clock=clock)
    out = []
    for c in chunks:
        clock.t += 8  # the stream as a whole is older than ttl, but never idle for ttl
        out.append(r.add("dev/a", c))
    assert out[-1] == msg and r.expire() == []


# --------------------------------------------------------------------------- corruption

@pytest.mark.parametrize("where", ["data", "header", "crc"])
def test_corrupt_chunk_is_refused_and_good_copy_completes(where):
    msg = _msg(5000, 10)
    chunks = C.split(msg, 11, 1000)
    bad = bytearray(chunks[2])
    pos = {"data": 76 + 17, "header": 20, "crc": len(bad) - 1}[where]  # header byte 20: count
    bad[pos] ^= 0x04
    r = C.Reassembler()
    assert _feed(r, chunks[:2]) == []
    with pytest.raises(C.ChunkError, match="CRC") as e:
        r.add("dev/a", bytes(bad))
    assert e.value.reason == "crc"
    assert r.in_flight() == [("dev/a", 11, 2, len(chunks))]  # stream untouched
    assert _feed(r, chunks[2:]) == [msg]
    assert r.stats()["rejected_chunks"] == {"crc": 1}


def test_chunk_claiming_other_digest_total_or_count_drops_the_stream():
    msg = _msg(5000, 12)
    chunks = C.split(msg, 13, 1000)
    f = _fields(chunks[1])
    data = chunks[1][76:-4]
    forged = {
        "digest": _rebuild(f[:9] + [hashlib.sha256(b"other").digest()] + f[10:], data),
        "total": _rebuild(f[:7] + [5001] + f[8:], data),
        "count": _rebuild(f[:6] + [f[6] + 1] + f[7:], data),
    }
    for what, chunk in forged.items():
        r = C.Reassembler()
        assert r.add("dev/a", chunks[0]) is None
        with pytest.raises(C.ChunkError, match="stream is dropped") as e:
            r.add("dev/a", chunk)
        assert e.value.reason == "inconsistent", what
        _assert_empty(r)
        assert r.stats()["dropped"] == {"inconsistent": 1}
        # the rest of the original stream starts over and cannot complete without chunk 0
        assert _feed(r, chunks[1:]) == []


def test_valid_crc_but_altered_data_fails_sha256():
    msg = _msg(5000, 14)
    chunks = C.split(msg, 15, 1000)
    f = _fields(chunks[3])
    data = bytearray(chunks[3][76:-4])
    data[0] ^= 0xFF
    forged = _rebuild(f, bytes(data))
    r = C.Reassembler()
    chunks[3] = forged
    assert _feed(r, chunks[:-1]) == []
    with pytest.raises(C.ChunkError, match="sha256") as e:
        r.add("dev/a", chunks[-1])
    assert e.value.reason == "digest"
    _assert_empty(r)
    assert r.stats()["dropped"] == {"digest": 1} and r.stats()["completed"] == 0


def test_overlapping_chunks_drop_the_stream():
    msg = _msg(3000, 16)
    chunks = C.split(msg, 17, 1000)  # data per chunk: 920, 920, 920, 240
    f = _fields(chunks[2])
    # chunk 2 moved one byte back (still a valid single chunk) overlaps chunk 1
    shifted = _rebuild(f[:8] + [f[8] - 1] + f[9:], msg[f[8] - 1:f[8] - 1 + 920])
    r = C.Reassembler()
    assert _feed(r, chunks[:2]) == []
    with pytest.raises(C.ChunkError, match="do not tile") as e:
        r.add("dev/a", shifted)
    assert e.value.reason == "overlap"
    _assert_empty(r)


def test_duplicate_index_with_other_range_is_dropped_stream_kept():
    msg = _msg(3000, 18)
    chunks = C.split(msg, 19, 1000)
    f = _fields(chunks[1])
    other = _rebuild(f, msg[920:1000])  # index 1 again, shorter
    r = C.Reassembler()
    assert _feed(r, chunks[:2]) == []
    with pytest.raises(C.ChunkError) as e:
        r.add("dev/a", other)
    assert e.value.reason == "conflict"
    assert _feed(r, chunks[2:]) == [msg]


# --------------------------------------------------------------------------- limits

def test_total_len_over_max_is_refused_before_allocation():
    f = _fields(C.split(b"x" * 10, 1, 1000)[0])
    huge = _rebuild(f[:6] + [1, 1 << 40] + f[8:], b"x" * 10)  # claims a 1 TiB message
    r = C.Reassembler(max_message_bytes=1 << 20)
    with pytest.raises(C.ChunkError, match="over the limit") as e:
        r.add("dev/a", huge)
    assert e.value.reason == "too_large"
    _assert_empty(r)
    ok = C.split(_msg((1 << 20) + 1), 1, 64 << 10)
    with pytest.raises(C.ChunkError, match="refused before allocating"):
        r.add("dev/a", ok[0])
    _assert_empty(r)


def test_claimed_sizes_do_not_allocate():
    """A claim of 256 MiB that is within max_message_bytes but over the budget allocates nothing."""
    import tracemalloc
    f = _fields(C.split(b"x", 1, 1000)[0])
    claim = _rebuild(f[:6] + [2, 256 << 20, 0] + f[9:], b"x" * 1000)
    r = C.Reassembler(max_bytes_per_sender=16 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(C.ChunkError) as e:
            r.add("dev/a", claim)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.reason == "too_large" and peak < 1 << 20
    _assert_empty(r)


def test_per_sender_budget_busy_other_sender_unaffected():
    r = C.Reassembler(max_bytes_per_sender=30_000, max_bytes_total=1 << 20)
    a = C.split(_msg(20_000, 1), 1, 1000)
    b = C.split(_msg(20_000, 2), 2, 1000)
    assert r.add("dev/a", a[0]) is None
    with pytest.raises(C.ChunkError, match="busy") as e:
        r.add("dev/a", b[0])
    assert e.value.reason == "busy"
    assert r.stats()["streams_in_flight"] == 1
    assert _feed(r, b, sender="dev/b") == [_msg(20_000, 2)]  # another sender has its own budget
    assert _feed(r, a[1:]) == [_msg(20_000, 1)]
    assert _feed(r, b) == [_msg(20_000, 2)]  # fits once the first one is done
    _assert_empty(r)


def test_global_budget_busy():
    r = C.Reassembler(max_bytes_per_sender=30_000, max_bytes_total=50_000)
    msgs = {s: _msg(20_000, i) for i, s in enumerate(["dev/a", "dev/b", "dev/c"])}
    parts = {s: C.split(m, 1, 1000) for s, m in msgs.items()}
    assert r.add("dev/a", parts["dev/a"][0]) is None
    assert r.add("dev/b", parts["dev/b"][0]) is None
    with pytest.raises(C.ChunkError, match="busy"):
        r.add("dev/c", parts["dev/c"][0])
    assert r.stats()["bytes_in_flight"] <= 50_000
    assert _feed(r, parts["dev/a"][1:], "dev/a") == [msgs["dev/a"]]
    assert _feed(r, parts["dev/c"], "dev/c") == [msgs["dev/c"]]


def test_third_stream_evicts_the_oldest():
    clock = FakeClock()
    r = C.Reassembler(max_streams_per_sender=2, clock=clock)
    m = [_msg(3000, i) for i in range(3)]
    s = [C.split(x, 100 + i, 1000) for i, x in enumerate(m)]
    r.add("dev/a", s[0][0])
    clock.t += 1
    r.add("dev/a", s[1][0])
    clock.t += 1
    r.add("dev/a", s[1][1])  # stream 1 was started later; stream 0 is the oldest
    r.add("dev/b", C.split(_msg(3000), 5, 1000)[0])  # another sender's stream is not touched
    r.add("dev/a", s[2][0])
    assert sorted(x[:2] for x in r.in_flight()) == [("dev/a", 101), ("dev/a", 102), ("dev/b", 5)]
    assert r.stats()["dropped"] == {"evicted": 1}
    assert r.expire() == [("dev/a", 100)]
    assert _feed(r, s[1][2:]) == [m[1]] and _feed(r, s[2][1:]) == [m[2]]


# --------------------------------------------------------------------------- malformed

def test_truncated_and_bad_headers():
    good = C.split(b"some data", 1, 1000)[0]
    r = C.Reassembler()
    for n in (0, 3, 4, 40, OVH - 1):
        with pytest.raises(C.ChunkError, match="truncated"):
            r.add("dev/a", good[:n])
    with pytest.raises(C.ChunkError, match="cut or padded"):
        r.add("dev/a", good[:-1])
    with pytest.raises(C.ChunkError, match="cut or padded"):
        r.add("dev/a", good + b"\0")
    f = _fields(good)
    data = good[76:-4]
    cases = {
        "magic": (_rebuild([b"XXXX"] + f[1:], data), "not an EdgeFed chunk"),
        "version": (_rebuild(f[:1] + [2] + f[2:], data), "version 2 not supported"),
        "flags": (_rebuild(f[:2] + [1] + f[3:], data), "unknown chunk flags"),
        "reserved": (_rebuild(f[:3] + [7] + f[4:], data), "reserved"),
        "index": (_rebuild(f[:5] + [1] + f[6:], data), "index must be below count"),
        "zero count": (_rebuild(f[:5] + [0, 0] + f[7:], data), "index must be below count"),
        "offset": (_rebuild(f[:8] + [5] + f[9:], data), "do not fit"),
    }
    for what, (chunk, text) in cases.items():
        with pytest.raises(C.ChunkError, match=text):
            r.add("dev/a", chunk)
    with pytest.raises(C.ChunkError, match="must be bytes"):
        r.add("dev/a", "text")
    _assert_empty(r)


def test_whole_message_is_not_a_chunk():
    whole = P.Ack("job-1", 1, "d", 1).encode()
    assert not C.is_chunk(whole) and C.is_chunk(C.split(whole, 1, 1000)[0])
    assert not C.is_chunk(b"") and not C.is_chunk(b"EDG") and not C.is_chunk(None)
    with pytest.raises(C.ChunkError, match="whole EdgeFed message"):
        C.Reassembler().add("dev/a", whole)


def test_parse_exposes_fields_without_copy():
    c = C.split(b"abcdef", 3, OVH + 4)[1]
    p = C.parse(c)
    assert (p.stream_id, p.index, p.count, p.total_len, p.offset) == (3, 1, 2, 6, 4)
    assert bytes(p.data) == b"ef" and isinstance(p.data, memoryview)


# --------------------------------------------------------------------------- threads

def test_concurrent_adds_from_many_senders():
    r = C.Reassembler()
    msgs = {f"dev/{i}": _msg(40_000, i) for i in range(8)}
    results, errors = {}, []

    def worker(sender):
        try:
            chunks = C.split(msgs[sender], 1, 1000)
            random.Random(sender).shuffle(chunks)
            results[sender] = _feed(r, chunks, sender)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(s,)) for s in msgs]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    assert results == {s: [m] for s, m in msgs.items()}
    _assert_empty(r)


# --------------------------------------------------------------------------- with the protocol

def test_real_update_split_and_reassembled():
    limits = P.Limits(max_message_bytes=64 << 20)
    w = np.random.default_rng(0).standard_normal((2048, 1024)).astype(np.float32)  # 8 MiB
    upd = P.Update("job-1", 3, "pi4-kitchen", "fedavg", msg_id=P.MessageIds().next(), num_samples=32,
                   tensors=[P.Tensor("model.layers.0.mlp.down_proj.weight", w)], train_loss=0.5)
    data = upd.encode(limits)
    assert C.needs_chunking(data, P.DEFAULT_LIMITS.max_message_bytes)
    chunks = C.split(data, upd.msg_id, 1 << 20)
    assert len(chunks) == 9 and all(len(c) <= 1 << 20 for c in chunks)
    random.Random(0).shuffle(chunks)
    r = C.Reassembler()
    out = _feed(r, chunks, "edgefed/v1/job-1/update/pi4-kitchen")
    assert len(out) == 1 and out[0] == data
    back = P.decode(out[0], limits=limits, expect=P.Update)
    assert back.encode(limits) == data
    assert (back.job, back.round, back.device, back.msg_id, back.num_samples) == \
        ("job-1", 3, "pi4-kitchen", upd.msg_id, 32)
    assert back.tensors[0].name == upd.tensors[0].name and np.array_equal(back.tensors[0].data, w)


def test_device_import_has_no_torch():
    code = "import edgefed.chunking, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
