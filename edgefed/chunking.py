"""Chunked transfer of encoded EdgeFed messages that exceed the broker's message limit.

An encoded message (protocol.Message.encode(), bytes) that carries a full model delta can be
larger than what the broker accepts in one MQTT message (the transports' max_payload_bytes,
4 MiB by default; protocol Limits.max_message_bytes is a separate, logical limit on the whole
message). The sender splits it with split() into chunks of at most max_chunk_bytes
each, header and CRC included, and publishes them as separate MQTT messages on the topic the
whole message would have used; the receiver feeds every payload that is_chunk() to a
Reassembler, which returns the whole message bytes once the last chunk is in. Only those bytes
reach protocol.decode(). The transports do both (edgefed.transport.base.Chunker), so their
callers publish and receive whole messages only.

Chunk wire format (little-endian), CHUNK_HEADER = struct "<4sBBHQIIQQ32sI", 76 bytes:

    magic      4s   b"EDGC" (a whole message starts with b"EDGF": the first 4 bytes tell them apart)
    version    u8   1
    flags      u8   0 (unknown bits are refused)
    reserved   u16  0
    stream_id  u64  the sender's id of the whole message (e.g. its msg_id)
    index      u32  0 .. count-1
    count      u32  chunks in the stream (>= 1)
    total_len  u64  bytes of the whole message
    offset     u64  where this chunk's data goes in the whole message
    digest     32s  sha256 of the whole message
    data_len   u32  bytes of data that follow
    data            data_len bytes
    crc        u32  CRC32 (zlib) over header + data

Chunks of one stream tile the message in index order: chunk 0 starts at offset 0, chunk i+1
starts where chunk i ends, the last one ends at total_len, and every chunk of a non-empty
message carries at least one byte (an empty message is one chunk with no data). Chunk sizes
need not be equal. Every length is checked before anything is allocated.

Security: chunks are not signed. The reassembled message is decoded and its signature verified
like any other message, so a forged or altered chunk can at most make a message fail (its
sha256 or its signature) or waste memory, and that memory is bounded per sender
(max_streams_per_sender, max_bytes_per_sender) and in total (max_bytes_total). Per-device
topics with broker ACLs keep one device from publishing into, and so filling or breaking,
another device's streams: key the Reassembler by topic (or by the device the topic names).

Device-side module: stdlib + numpy only (no torch).
"""
from __future__ import annotations

import hashlib
import struct
import threading
import time
import zlib
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable, Deque, Dict, List, Optional, Tuple, Union

import numpy as np

from edgefed.protocol import MAGIC as MESSAGE_MAGIC
from edgefed.protocol import ProtocolError

CHUNK_MAGIC = b"EDGC"
CHUNK_VERSION = 1
SUPPORTED_CHUNK_VERSIONS = (1,)
CHUNK_HEADER = struct.Struct("<4sBBHQIIQQ32sI")  # 76 bytes
CHUNK_TRAILER = struct.Struct("<I")
CHUNK_OVERHEAD = CHUNK_HEADER.size + CHUNK_TRAILER.size  # 80 bytes around every chunk's data
KNOWN_CHUNK_FLAGS = 0  # no flags defined in version 1
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF
# Per-chunk bookkeeping of a stream in flight (offset u64, length u32, received flag), counted in
# its memory budget: a stream of many tiny chunks costs more than its bytes.
_BOOKKEEPING_PER_CHUNK = 8 + 4 + 1

BytesLike = Union[bytes, bytearray, memoryview]


class ChunkError(ProtocolError):
    """A chunk is malformed, does not fit its stream, or its stream cannot be accepted.

    reason is a short tag for logs and stats: truncated, magic, version, flags, length, crc,
    bounds, too_large, busy, inconsistent, conflict, overlap, digest, argument."""

    def __init__(self, msg: str, reason: str = "invalid"):
        super().__init__(msg)
        self.reason = reason


# --------------------------------------------------------------------------- codec

@dataclass(frozen=True)
class Chunk:
    """One parsed, CRC-checked chunk; data is a view of the payload (no copy)."""

    stream_id: int
    index: int
    count: int
    total_len: int
    offset: int
    digest: bytes
    data: memoryview


def is_chunk(payload: BytesLike) -> bool:
    """True when payload starts with the chunk magic b"EDGC" (a whole message starts with b"EDGF")."""
    try:
        return bytes(memoryview(payload).cast("B")[:4]) == CHUNK_MAGIC
    except TypeError:
        return False


def needs_chunking(message: BytesLike, max_message_bytes: int) -> bool:
    """True when the encoded message is larger than the broker accepts in one MQTT message."""
    return len(memoryview(message).cast("B")) > max_message_bytes


def max_chunk_data(max_chunk_bytes: int) -> int:
    """Bytes of message data one chunk of at most max_chunk_bytes carries."""
    return max_chunk_bytes - CHUNK_OVERHEAD


def _as_view(payload: BytesLike, what: str) -> memoryview:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ChunkError(f"{what} must be bytes, got {type(payload).__name__}", "argument")
    try:
        return memoryview(payload).cast("B")
    except TypeError:
        raise ChunkError(f"{what} must be a contiguous byte buffer", "argument") from None


def split(message: BytesLike, stream_id: int, max_chunk_bytes: int) -> List[bytes]:
    """Split an encoded message into chunks of at most max_chunk_bytes each (header and CRC
    included, so each fits a broker limit of max_chunk_bytes). Always at least one chunk; use
    needs_chunking() to decide whether to chunk at all. stream_id: the sender's id of this message
    (its msg_id), so a resend of the same message under the same id fills the gaps of the first."""
    buf = _as_view(message, "message")
    if isinstance(stream_id, bool) or not isinstance(stream_id, (int, np.integer)) \
            or not 0 <= int(stream_id) <= _U64:
        raise ChunkError(f"stream_id={stream_id!r} must be an integer in [0, 2**64-1] "
                         f"(use the message's msg_id)", "argument")
    if isinstance(max_chunk_bytes, bool) or not isinstance(max_chunk_bytes, (int, np.integer)):
        raise ChunkError(f"max_chunk_bytes must be an integer, got {type(max_chunk_bytes).__name__}",
                         "argument")
    per = int(max_chunk_bytes) - CHUNK_OVERHEAD
    if per < 1:
        raise ChunkError(f"max_chunk_bytes={max_chunk_bytes} leaves no room for data: a chunk's header "
                         f"and CRC take {CHUNK_OVERHEAD} bytes; use at least {CHUNK_OVERHEAD + 1} "
                         f"(in practice the broker's message limit)", "argument")
    n = len(buf)
    count = max(1, -(-n // per))
    if count > _U32:
        raise ChunkError(f"a {n}-byte message in chunks of {per} data bytes needs {count} chunks, more "
                         f"than the {_U32} a stream can have; use larger chunks", "argument")
    sid = int(stream_id)
    digest = hashlib.sha256(buf).digest()
    out = []
    for i in range(count):
        off = i * per
        data = buf[off:off + per]
        head = CHUNK_HEADER.pack(CHUNK_MAGIC, CHUNK_VERSION, 0, 0, sid, i, count, n, off, digest,
                                 len(data))
        crc = zlib.crc32(data, zlib.crc32(head))
        out.append(b"".join((head, data, CHUNK_TRAILER.pack(crc))))
    return out


def parse(payload: BytesLike, max_message_bytes: Optional[int] = None) -> Chunk:
    """Parse and check one chunk on its own (magic, version, flags, lengths, CRC, total_len at
    most max_message_bytes when given, bounds). Raises ChunkError; a chunk that passes still has
    to fit its stream (Reassembler.add)."""
    buf = _as_view(payload, "chunk payload")
    n = len(buf)
    if n >= 4 and bytes(buf[:4]) != CHUNK_MAGIC:
        if bytes(buf[:4]) == MESSAGE_MAGIC:
            raise ChunkError("this is a whole EdgeFed message (magic b'EDGF'), not a chunk; pass it "
                             "to protocol.decode() (check is_chunk() first)", "magic")
        raise ChunkError(f"not an EdgeFed chunk (magic {bytes(buf[:4])!r}, expected {CHUNK_MAGIC!r}); "
                         f"something else publishes on this topic", "magic")
    if n < CHUNK_OVERHEAD:
        raise ChunkError(f"chunk truncated: {n} bytes, its header and CRC alone take {CHUNK_OVERHEAD}; "
                         f"it was cut in transit", "truncated")
    (magic, version, flags, reserved, sid, index, count, total_len, offset, digest,
     data_len) = CHUNK_HEADER.unpack_from(buf, 0)
    if version not in SUPPORTED_CHUNK_VERSIONS:
        hint = ("upgrade edgefed on the receiver" if version > CHUNK_VERSION
                else "the sender runs an older edgefed; upgrade it")
        raise ChunkError(f"chunk version {version} not supported (this build speaks {CHUNK_VERSION}); "
                         f"{hint}", "version")
    if flags & ~KNOWN_CHUNK_FLAGS or reserved:
        raise ChunkError(f"unknown chunk flags {flags:#04x} / reserved {reserved:#06x} (this build "
                         f"understands flags {KNOWN_CHUNK_FLAGS:#04x}, reserved 0); upgrade edgefed",
                         "flags")
    if data_len != n - CHUNK_OVERHEAD:
        raise ChunkError(f"chunk length mismatch: header announces {data_len} data bytes, payload "
                         f"carries {n - CHUNK_OVERHEAD}; it was cut or padded in transit", "length")
    (crc,) = CHUNK_TRAILER.unpack_from(buf, n - CHUNK_TRAILER.size)
    actual = zlib.crc32(buf[:n - CHUNK_TRAILER.size])
    if crc != actual:
        raise ChunkError(f"chunk CRC32 mismatch (trailer {crc:#010x}, computed {actual:#010x}): chunk "
                         f"{index} of stream {sid} was corrupted; it is dropped, the stream waits for "
                         f"a good copy", "crc")
    where = f"chunk {index}/{count} of stream {sid}"
    if max_message_bytes is not None and total_len > max_message_bytes:
        raise ChunkError(f"{where}: a {total_len}-byte message is over the limit of "
                         f"{max_message_bytes} bytes (Reassembler max_message_bytes); refused "
                         f"before allocating", "too_large")
    if count < 1 or index >= count:
        raise ChunkError(f"{where}: index must be below count (count >= 1)", "bounds")
    if total_len == 0:
        if count != 1 or offset != 0 or data_len != 0:
            raise ChunkError(f"{where}: an empty message is one chunk with offset 0 and no data",
                             "bounds")
    else:
        # each chunk carries >= 1 byte and they tile [0, total_len) in index order
        if count > total_len or data_len == 0:
            raise ChunkError(f"{where}: every chunk of a {total_len}-byte message must carry data "
                             f"(count {count}, data_len {data_len})", "bounds")
        end = offset + data_len
        if end > total_len or offset < index or total_len - end < count - 1 - index:
            raise ChunkError(f"{where}: bytes [{offset}, {end}) do not fit a {total_len}-byte message "
                             f"in {count} chunks", "bounds")
        if (index == 0 and offset != 0) or (index == count - 1 and end != total_len):
            raise ChunkError(f"{where}: the first chunk must start at 0 and the last end at "
                             f"{total_len} (got [{offset}, {end}))", "bounds")
    return Chunk(sid, index, count, total_len, offset, bytes(digest),
                 buf[CHUNK_HEADER.size:CHUNK_HEADER.size + data_len])


# --------------------------------------------------------------------------- reassembly

class _Stream:
    __slots__ = ("sender", "stream_id", "count", "total_len", "digest", "buf", "offsets", "lens",
                 "have", "received", "cost", "last")

    def __init__(self, sender: str, c: Chunk, cost: int, now: float):
        self.sender, self.stream_id = sender, c.stream_id
        self.count, self.total_len, self.digest = c.count, c.total_len, c.digest
        self.buf = bytearray(c.total_len)
        self.offsets = np.zeros(c.count, np.uint64)
        self.lens = np.zeros(c.count, np.uint32)
        self.have = np.zeros(c.count, np.bool_)
        self.received = 0
        self.cost = cost
        self.last = now


StreamKey = Tuple[str, int]


class Reassembler:
    """Collects chunks per (sender, stream_id) and returns each whole message once complete.

    sender: whatever identifies the publisher, ideally the topic (per-device topics + broker ACLs
    make it the device). Memory in flight is bounded before it is allocated: a message at most
    max_message_bytes, per sender at most max_streams_per_sender streams and max_bytes_per_sender
    bytes, all senders together max_bytes_total bytes (bytes = message buffers plus 13 bytes of
    bookkeeping per chunk). A new stream from a sender that already has max_streams_per_sender
    evicts that sender's oldest; one that does not fit a budget is refused (ChunkError "busy")
    until streams complete or expire. Streams with no new chunk for ttl_s seconds are dropped.
    A chunk of a stream completed less than recent_s seconds ago is taken for a late duplicate
    (MQTT QoS 1 delivers at least once) and ignored instead of starting the stream again.
    Thread-safe."""

    def __init__(self, max_message_bytes: int = 256 << 20, max_streams_per_sender: int = 2,
                 max_bytes_per_sender: int = 512 << 20, max_bytes_total: int = 1 << 30,
                 ttl_s: float = 300.0, clock: Callable[[], float] = time.monotonic,
                 recent_s: float = 5.0, max_recent: int = 1024):
        for name, v in (("max_message_bytes", max_message_bytes),
                        ("max_streams_per_sender", max_streams_per_sender),
                        ("max_bytes_per_sender", max_bytes_per_sender),
                        ("max_bytes_total", max_bytes_total), ("max_recent", max_recent)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        if not ttl_s > 0 or not recent_s >= 0:
            raise ValueError(f"ttl_s={ttl_s!r} must be > 0 and recent_s={recent_s!r} >= 0")
        self.max_message_bytes = max_message_bytes
        self.max_streams_per_sender = max_streams_per_sender
        self.max_bytes_per_sender = max_bytes_per_sender
        self.max_bytes_total = max_bytes_total
        self.ttl_s = float(ttl_s)
        self.recent_s = float(recent_s)
        self.clock = clock
        self._lock = threading.Lock()
        self._streams: "OrderedDict[StreamKey, _Stream]" = OrderedDict()  # by last progress
        self._by_sender: Dict[str, "OrderedDict[int, _Stream]"] = {}  # by start
        self._sender_bytes: Dict[str, int] = {}
        self._bytes = 0
        self._recent: "OrderedDict[Tuple[str, int, bytes], float]" = OrderedDict()
        self._max_recent = max_recent
        self._lost: Deque[StreamKey] = deque(maxlen=4096)  # expired/evicted, not yet reported
        self._completed = 0
        self._duplicates = 0
        self._dropped: Dict[str, int] = {}
        self._rejected: Dict[str, int] = {}

    # ----------------------------------------------------------------- public

    def add(self, sender: str, payload: BytesLike) -> Optional[bytes]:
        """Take one chunk; return the whole message bytes when it completes its stream, else None.

        Raises ChunkError for a chunk that is malformed or corrupted (dropped, its stream
        untouched), refused (too_large, busy), or that breaks its stream (inconsistent, overlap,
        digest: the stream is dropped). A duplicate chunk is ignored (None)."""
        try:
            c = parse(payload, self.max_message_bytes)
        except ChunkError as e:
            with self._lock:
                self._count(self._rejected, e.reason)
            raise
        with self._lock:
            now = self.clock()
            self._expire_locked(now)
            key = (sender, c.stream_id)
            st = self._streams.get(key)
            if st is None:
                if self._is_recent_locked((sender, c.stream_id, c.digest), now):
                    self._duplicates += 1
                    return None
                st = self._start_locked(sender, c, now)
            elif (c.count, c.total_len, c.digest) != (st.count, st.total_len, st.digest):
                self._drop_locked(st, "inconsistent")
                raise ChunkError(
                    f"stream {c.stream_id} from {sender}: chunk {c.index} claims count {c.count}, "
                    f"total_len {c.total_len}, digest {c.digest.hex()[:16]}.. but the stream has "
                    f"{st.count}, {st.total_len}, {st.digest.hex()[:16]}..; two messages share one "
                    f"stream id; the stream is dropped (the sender must use a new id per message)",
                    "inconsistent")
            i, off, n = c.index, c.offset, len(c.data)
            if st.have[i]:
                if int(st.offsets[i]) == off and int(st.lens[i]) == n:
                    self._duplicates += 1
                    return None
                self._count(self._rejected, "conflict")
                raise ChunkError(
                    f"stream {c.stream_id} from {sender}: chunk {i} arrived again with bytes "
                    f"[{off}, {off + n}) instead of [{int(st.offsets[i])}, "
                    f"{int(st.offsets[i]) + int(st.lens[i])}); the later copy is dropped", "conflict")
            bad = None
            if i > 0 and st.have[i - 1] and int(st.offsets[i - 1]) + int(st.lens[i - 1]) != off:
                bad = (i - 1, int(st.offsets[i - 1]), int(st.offsets[i - 1]) + int(st.lens[i - 1]))
            elif i + 1 < st.count and st.have[i + 1] and off + n != int(st.offsets[i + 1]):
                bad = (i + 1, int(st.offsets[i + 1]), int(st.offsets[i + 1]) + int(st.lens[i + 1]))
            if bad is not None:
                self._drop_locked(st, "overlap")
                raise ChunkError(
                    f"stream {c.stream_id} from {sender}: chunk {i} with bytes [{off}, {off + n}) "
                    f"does not adjoin chunk {bad[0]} with bytes [{bad[1]}, {bad[2]}); the chunks do "
                    f"not tile the message; the stream is dropped", "overlap")
            st.buf[off:off + n] = c.data
            st.offsets[i], st.lens[i], st.have[i] = off, n, True
            st.received += 1
            st.last = now
            self._streams.move_to_end(key)
            if st.received < st.count:
                return None
            self._remove_locked(st)
            rkey = (sender, st.stream_id, st.digest)
            self._recent[rkey] = now
            self._recent.move_to_end(rkey)
            while len(self._recent) > self._max_recent:
                self._recent.popitem(last=False)
        # complete: verify outside the lock (hashing hundreds of MiB takes a while)
        ends = st.offsets + st.lens.astype(np.uint64)
        tiled = (int(st.offsets[0]) == 0 and int(ends[-1]) == st.total_len
                 and bool(np.array_equal(st.offsets[1:], ends[:-1])))
        actual = hashlib.sha256(st.buf).digest()
        if not tiled or actual != st.digest:
            with self._lock:
                self._count(self._dropped, "digest")
                self._recent.pop(rkey, None)
            raise ChunkError(
                f"stream {st.stream_id} from {sender}: the reassembled {st.total_len}-byte message "
                f"has sha256 {actual.hex()[:16]}.., its chunks announced {st.digest.hex()[:16]}..; "
                f"a chunk was altered (valid CRC, wrong data); the stream is dropped and the sender "
                f"must resend", "digest")
        out = bytes(st.buf)
        st.buf = bytearray()
        with self._lock:
            self._completed += 1
        return out

    def expire(self) -> List[StreamKey]:
        """Drop streams with no new chunk for ttl_s; return (sender, stream_id) of every stream
        lost since the last call (expired here or in add(), or evicted), so the caller can log them."""
        with self._lock:
            self._expire_locked(self.clock())
            out = list(self._lost)
            self._lost.clear()
            return out

    def stats(self) -> Dict[str, object]:
        """streams_in_flight, bytes_in_flight (buffers + bookkeeping), senders, completed,
        duplicates, dropped {reason: streams}, rejected_chunks {reason: chunks}."""
        with self._lock:
            return {"streams_in_flight": len(self._streams), "bytes_in_flight": self._bytes,
                    "senders": len(self._by_sender), "completed": self._completed,
                    "duplicates": self._duplicates, "dropped": dict(self._dropped),
                    "rejected_chunks": dict(self._rejected)}

    def in_flight(self) -> List[Tuple[str, int, int, int]]:
        """(sender, stream_id, chunks received, count) of every stream in flight."""
        with self._lock:
            return [(s.sender, s.stream_id, s.received, s.count) for s in self._streams.values()]

    # ----------------------------------------------------------------- internals (lock held)

    @staticmethod
    def _count(d: Dict[str, int], reason: str) -> None:
        d[reason] = d.get(reason, 0) + 1

    def _is_recent_locked(self, rkey: Tuple[str, int, bytes], now: float) -> bool:
        while self._recent:
            t = next(iter(self._recent.values()))
            if now - t <= self.recent_s:
                break
            self._recent.popitem(last=False)
        return rkey in self._recent

    def _start_locked(self, sender: str, c: Chunk, now: float) -> _Stream:
        cost = c.total_len + c.count * _BOOKKEEPING_PER_CHUNK
        where = f"stream {c.stream_id} from {sender} ({c.total_len} bytes in {c.count} chunks)"
        if cost > self.max_bytes_per_sender or cost > self.max_bytes_total:
            self._count(self._rejected, "too_large")
            raise ChunkError(
                f"{where} needs {cost} bytes in flight, more than a sender may hold "
                f"({self.max_bytes_per_sender}) or all senders together ({self.max_bytes_total}); "
                f"send it in fewer, larger chunks or raise the Reassembler budgets", "too_large")
        mine = self._by_sender.get(sender)
        while mine and len(mine) >= self.max_streams_per_sender:
            oldest = next(iter(mine.values()))
            self._drop_locked(oldest, "evicted")
            self._lost.append((oldest.sender, oldest.stream_id))
            mine = self._by_sender.get(sender)
        held = self._sender_bytes.get(sender, 0)
        if held + cost > self.max_bytes_per_sender or self._bytes + cost > self.max_bytes_total:
            self._count(self._rejected, "busy")
            raise ChunkError(
                f"{where}: busy, {cost} more bytes would exceed the in-flight budget (this sender "
                f"holds {held} of {self.max_bytes_per_sender}, all senders {self._bytes} of "
                f"{self.max_bytes_total}); the chunk is dropped, retry after streams complete or "
                f"expire (ttl {self.ttl_s:g} s)", "busy")
        st = _Stream(sender, c, cost, now)
        self._streams[(sender, c.stream_id)] = st
        self._by_sender.setdefault(sender, OrderedDict())[c.stream_id] = st
        self._sender_bytes[sender] = held + cost
        self._bytes += cost
        return st

    def _remove_locked(self, st: _Stream) -> None:
        self._streams.pop((st.sender, st.stream_id), None)
        mine = self._by_sender.get(st.sender)
        if mine is not None:
            mine.pop(st.stream_id, None)
            if not mine:
                del self._by_sender[st.sender]
        left = self._sender_bytes.get(st.sender, 0) - st.cost
        if left > 0:
            self._sender_bytes[st.sender] = left
        else:
            self._sender_bytes.pop(st.sender, None)
        self._bytes -= st.cost

    def _drop_locked(self, st: _Stream, reason: str) -> None:
        self._remove_locked(st)
        st.buf = bytearray()
        self._count(self._dropped, reason)

    def _expire_locked(self, now: float) -> None:
        while self._streams:
            st = next(iter(self._streams.values()))
            if now - st.last <= self.ttl_s:
                break
            self._drop_locked(st, "expired")
            self._lost.append((st.sender, st.stream_id))


__all__ = ["CHUNK_MAGIC", "CHUNK_VERSION", "CHUNK_HEADER", "CHUNK_OVERHEAD", "Chunk", "ChunkError",
           "Reassembler", "is_chunk", "max_chunk_data", "needs_chunking", "parse", "split"]
