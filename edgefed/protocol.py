"""EdgeFed wire protocol v2: topic layout and compact binary messages.

One spec, two renderings: this module is the executable one, docs/protocol.md the readable
one (tests/test_protocol.py checks that their field tables agree).

Every message is

    header  <4s B B H I>   magic b"EDGF", protocol version, message type, flags (0), body length
    body    fields in the order of the message's SCHEMA, little-endian
    trailer <I>            CRC32 (zlib) over header + body
    [signature]            only with header flag SIGNED (0x0001): <H> key id length, key id
                           (utf-8), <H> signature length, signature over signing_input(key id,
                           header + body + CRC) -- see "Signatures" in docs/protocol.md

Each message is declared once (a dataclass whose fields carry their wire kind in `wire(...)`);
SCHEMA, the codec and the per-field checks follow from it. The generic messages know nothing of
any method: a method's settings travel as plan `params`, its payloads as named tensors.

Device-side module: numpy + stdlib only (no torch); payloads are parsed field by field.
"""
from __future__ import annotations

import math
import re
import struct
import threading
import time
import zlib
from collections import OrderedDict, deque
import dataclasses
from dataclasses import MISSING, dataclass, field
from enum import IntEnum
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Type, Union

import numpy as np

PROTOCOL_VERSION = 2
SUPPORTED_VERSIONS = (2,)
MAGIC = b"EDGF"
HEADER = struct.Struct("<4sBBHI")
TRAILER = struct.Struct("<I")
OVERHEAD = HEADER.size + TRAILER.size  # 16 bytes around every body
FLAG_SIGNED = 0x0001  # a signature trailer follows the CRC (see signing_input)
KNOWN_FLAGS = FLAG_SIGNED  # unknown bits are refused, not ignored
SIG_DOMAIN = b"EDGF-SIG-v1\x00"  # domain separation of the signed bytes
MAX_SIGNATURE_LEN = 512

MAX_ID_LEN = 64  # job / device / method / state / device class ids
MAX_NAME_LEN = 256  # tensor names, param keys, model ids, digests
_ID_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}\Z")
_NAME_RE = re.compile(r"[A-Za-z0-9_.:/\-\[\]]{1,256}\Z")

TOPIC_ROOT = "edgefed/v1"  # topic-layout version; independent of PROTOCOL_VERSION (see docs)


# --------------------------------------------------------------------------- errors

class ProtocolError(ValueError):
    """A message or field is not valid EdgeFed protocol. The text says what and what to do."""


class MessageTooLarge(ProtocolError):
    """A size limit was exceeded (checked before anything is allocated)."""


class TruncatedMessage(ProtocolError):
    """The payload is shorter than its header or a field says."""


class BadMagic(ProtocolError):
    """The payload is not an EdgeFed message at all."""


class UnsupportedVersion(ProtocolError):
    def __init__(self, received: int):
        self.received = received
        hint = ("upgrade edgefed on the device" if received > PROTOCOL_VERSION
                else "the sender runs an older edgefed; upgrade it")
        super().__init__(f"protocol version {received} not supported (this build speaks "
                         f"{PROTOCOL_VERSION}); {hint}")


class ChecksumMismatch(ProtocolError):
    """CRC32 over the message does not match its trailer (corrupted in transit or by a bug)."""


class SignatureError(ProtocolError):
    """A message is unsigned, signed by an unknown key, or its signature does not verify."""


class InvalidField(ProtocolError):
    """A field holds a value the protocol forbids (bad id, NaN scalar, index out of range...)."""


class RoundMismatch(InvalidField):
    """An update or reply refers to another round than the one expected; servers usually ack 'late'."""

    def __init__(self, msg: str, expected: int, received: int):
        super().__init__(msg)
        self.expected = expected
        self.received = received


# --------------------------------------------------------------------------- limits

@dataclass(frozen=True)
class Limits:
    """Size limits, enforced on encode and on decode before any buffer is allocated."""

    max_message_bytes: int = 4 * 1024 * 1024
    max_tensors: int = 256  # per tensor list
    max_tensor_ndim: int = 8
    max_sync_rounds: int = 4096
    max_params: int = 64
    max_text: int = 1024  # bytes of utf-8 in free text / reasons
    max_blobs: int = 1 << 20  # byte strings per `blobs` field (aggregation workers' reports)


DEFAULT_LIMITS = Limits()


# --------------------------------------------------------------------------- field checks

def check_id(value: Any, what: str = "id") -> str:
    """Job/device/method ids: 1..64 of [A-Za-z0-9_.-]; no MQTT wildcards or separators."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise InvalidField(
            f"{what} {value!r} is not a valid id: use 1..{MAX_ID_LEN} characters of "
            f"[A-Za-z0-9_.-] (no spaces, '/', '+', '#' or '$')")
    return value


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise InvalidField(f"{what} {value!r} is not valid: use 1..{MAX_NAME_LEN} characters "
                           f"of [A-Za-z0-9_.:/-[]]")
    return value


def _check_int(value: Any, lo: int, hi: int, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InvalidField(f"{what} must be an integer, got {type(value).__name__}")
    if not lo <= int(value) <= hi:
        raise InvalidField(f"{what}={value} is outside [{lo}, {hi}]")
    return int(value)


def _check_finite(value: Any, what: str) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InvalidField(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(f):
        raise InvalidField(f"{what} is {f} (must be finite)")
    return f


def _check_all_finite(a: np.ndarray, what: str, hint: str = "") -> None:
    if a.size and not np.isfinite(a).all():
        bad = int(np.flatnonzero(~np.isfinite(a.reshape(-1)))[0])
        raise InvalidField(f"{what}[{bad}] is {a.reshape(-1)[bad]} (must be finite){hint}")


def _check_text(value: Any, what: str, limits: Limits) -> str:
    if not isinstance(value, str):
        raise InvalidField(f"{what} must be a str, got {type(value).__name__}")
    try:
        n = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidField(f"{what} cannot be encoded as utf-8") from None
    if n > limits.max_text:
        raise MessageTooLarge(f"{what} is longer than {limits.max_text} bytes of utf-8; shorten it")
    return value


# --------------------------------------------------------------------------- value types

# Tensor element types on the wire: name -> (wire code, numpy dtype of Tensor.data). bf16 has no
# numpy type; its data are the raw uint16 bit patterns (the top half of a float32).
TENSOR_DTYPES: Dict[str, Tuple[int, np.dtype]] = {
    "f32": (1, np.dtype("<f4")), "u32": (2, np.dtype("<u4")), "f16": (3, np.dtype("<f2")),
    "bf16": (4, np.dtype("<u2")), "i8": (5, np.dtype("i1"))}
_CODE_DTYPE = {code: name for name, (code, _) in TENSOR_DTYPES.items()}
_FLOAT_DTYPES = ("f32", "f16", "bf16")


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, (u >> np.uint32(16)) | np.uint32(0x40), rounded).astype(np.uint16)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns -> float32 (exact)."""
    return (np.ascontiguousarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


@dataclass(eq=False)
class Tensor:
    """A named array: f32 (LoRA factors, deltas, full-state chunks, FedKSeed's scalars and
    coefficients), f16 / bf16 (halved update bytes), i8 (quantised payloads; their scales travel as
    an f32 tensor of their own) or u32 (indices such as FedKSeed's seed indices, or a
    secure-aggregation masked vector: ring elements, not numbers).

    `dtype` is inferred from the data (float32, uint32, float16, int8; anything else numeric is
    cast to float32) except for bf16, which numpy lacks: pass dtype="bf16" with uint16 bit
    patterns, or build one with Tensor.bf16(name, floats)."""

    name: str
    data: np.ndarray
    dtype: str = ""

    def __post_init__(self) -> None:
        a = np.asarray(self.data)
        if self.dtype == "bf16":
            if a.dtype != np.uint16:
                raise InvalidField(f"tensor {self.name!r}: bf16 data must be uint16 bit patterns "
                                   f"(use Tensor.bf16(name, floats)), got {a.dtype}")
        elif self.dtype in ("", "f32", "u32", "f16", "i8"):
            inferred = {np.dtype(np.uint32): "u32", np.dtype(np.float16): "f16",
                        np.dtype(np.int8): "i8"}.get(a.dtype, "f32")
            if self.dtype and self.dtype != inferred and not (self.dtype == "f32" and a.dtype.kind in "fiub"):
                raise InvalidField(f"tensor {self.name!r}: dtype {self.dtype!r} does not match data of {a.dtype}")
            self.dtype = self.dtype or inferred
            if self.dtype == "f32":
                a = a.astype(np.float32, copy=False)
        else:
            raise InvalidField(f"tensor {self.name!r}: dtype {self.dtype!r} is not one of "
                               f"{sorted(TENSOR_DTYPES)}")
        self.data = np.ascontiguousarray(a)

    @classmethod
    def bf16(cls, name: str, values: np.ndarray) -> "Tensor":
        return cls(name, bf16_bits(values), "bf16")

    @classmethod
    def encode_as(cls, name: str, values: np.ndarray, dtype: str) -> "Tensor":
        """values (float) on the wire as dtype f32 | f16 | bf16 (rounded to nearest)."""
        if dtype == "bf16":
            return cls.bf16(name, values)
        if dtype in ("f32", "f16"):
            return cls(name, np.asarray(values, dtype=np.float32 if dtype == "f32" else np.float16))
        raise InvalidField(f"tensor {name!r}: cannot encode floats as {dtype!r}; use f32, f16 or bf16")

    def float32(self) -> np.ndarray:
        """The values as float32 (exact for f16 / bf16 / i8; u32 ring elements have no float meaning)."""
        if self.dtype == "bf16":
            return bf16_to_f32(self.data)
        if self.dtype == "u32":
            raise InvalidField(f"tensor {self.name!r} holds u32 ring elements, not numbers")
        return self.data.astype(np.float32, copy=False)

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.data.shape)


@dataclass(eq=False)
class RoundDelta:
    """What the server applied in one round, as the method's named tensors (FedKSeed: "seeds"
    u32 and "coeffs" f32; FedAvg: "delta"; ...): a device's apply_delta reads them."""

    round: int
    tensors: List[Tensor] = field(default_factory=list)


Param = Union[int, float, str]

_PARAM_INT, _PARAM_FLOAT, _PARAM_STR = 1, 2, 3


# --------------------------------------------------------------------------- byte codec

class _Writer:
    def __init__(self, limits: Limits):
        self.parts: List[bytes] = []
        self.limits = limits

    def pack(self, fmt: str, value: Any, what: str) -> None:
        try:
            self.parts.append(struct.pack("<" + fmt, value))
        except (struct.error, OverflowError) as e:
            raise InvalidField(f"{what}={value!r} does not fit the wire type '{fmt}': {e}") from None

    def str(self, s: str, what: str) -> None:
        b = s.encode("utf-8")
        self.pack("H", len(b), what)
        self.parts.append(b)

    def tensors(self, ts: List[Tensor], what: str) -> None:
        self.pack("H", len(ts), what)
        for t in ts:
            self.str(t.name, what + ".name")
            self.parts.append(struct.pack("<B", t.data.ndim))
            self.parts.append(struct.pack(f"<{t.data.ndim}I", *t.data.shape))
            code, dt = TENSOR_DTYPES[t.dtype]
            self.parts.append(struct.pack("<BI", code, t.data.size))
            self.parts.append(np.ascontiguousarray(t.data, dtype=dt).tobytes())

    def params(self, p: Dict[str, Param], what: str) -> None:
        self.pack("H", len(p), what)
        for k, v in p.items():
            self.str(k, what)
            if isinstance(v, str):
                self.parts.append(struct.pack("<B", _PARAM_STR))
                self.str(v, f"{what}[{k!r}]")
            elif isinstance(v, (int, np.integer)):  # bool is an int here
                self.parts.append(struct.pack("<B", _PARAM_INT))
                self.pack("q", int(v), f"{what}[{k!r}]")
            else:
                self.parts.append(struct.pack("<B", _PARAM_FLOAT))
                self.pack("d", float(v), f"{what}[{k!r}]")

    def blobs(self, bs: List[bytes], what: str) -> None:
        self.pack("I", len(bs), what)
        for b in bs:
            self.pack("I", len(b), what)
            self.parts.append(bytes(b))

    def rounds(self, rs: List[RoundDelta], what: str) -> None:
        self.pack("I", len(rs), what)
        for r in rs:
            self.pack("I", r.round, what + ".round")
            self.tensors(r.tensors, what + ".tensors")


class _Reader:
    """Bounds-checked reader: every count is checked against limits and remaining bytes first."""

    def __init__(self, buf: memoryview, total: int, limits: Limits):
        self.buf, self.pos, self.total, self.limits = buf, 0, total, limits

    def _need(self, n: int, what: str) -> None:
        left = len(self.buf) - self.pos
        if n > left:
            raise TruncatedMessage(
                f"message truncated: field {what!r} needs {n} bytes but only {left} remain "
                f"(message is {self.total} bytes); it was cut in transit or built by another encoder")

    def unpack(self, fmt: str, what: str) -> Any:
        s = struct.calcsize("<" + fmt)
        self._need(s, what)
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += s
        return v[0] if len(v) == 1 else v

    def str(self, what: str, max_bytes: int) -> str:
        n = self.unpack("H", what)
        if n > max_bytes:
            raise MessageTooLarge(f"{what} is {n} bytes; the limit is {max_bytes}")
        self._need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidField(f"{what} is not valid utf-8") from None

    def tensors(self, what: str) -> List[Tensor]:
        n = self.unpack("H", what)
        if n > self.limits.max_tensors:
            raise MessageTooLarge(f"{what} has {n} tensors; the limit is {self.limits.max_tensors}")
        out = []
        for i in range(n):
            name = self.str(f"{what}[{i}].name", MAX_NAME_LEN)
            ndim = self.unpack("B", f"{what}[{i}].ndim")
            if ndim > self.limits.max_tensor_ndim:
                raise MessageTooLarge(f"{what}[{i}] ({name}) has {ndim} dims; the limit is "
                                      f"{self.limits.max_tensor_ndim}")
            shape = self.unpack(f"{ndim}I", f"{what}[{i}].shape") if ndim else ()
            shape = (shape,) if isinstance(shape, int) else tuple(shape)
            count = math.prod(shape)
            code, size = self.unpack("BI", f"{what}[{i}] ({name}) dtype")
            dname = _CODE_DTYPE.get(code)
            if dname is None:
                raise InvalidField(f"{what}[{i}] ({name}) has unknown dtype code {code} (this build "
                                   f"knows {sorted(TENSOR_DTYPES)}); upgrade edgefed")
            dt = TENSOR_DTYPES[dname][1]
            # a zero in the shape makes count 0 whatever the other dims say, but numpy still
            # refuses a shape whose other dims multiply past its index range: bound their product
            max_elems = self.limits.max_message_bytes // dt.itemsize
            span = math.prod(d for d in shape if d)
            if span > max_elems:
                raise MessageTooLarge(f"{what}[{i}] ({name}) has shape {shape}: {span} {dname} values "
                                      f"across its dimensions; the message limit is "
                                      f"{self.limits.max_message_bytes} bytes")
            if size > max_elems:
                raise MessageTooLarge(f"{what}[{i}] ({name}) has {size} elements; the message limit "
                                      f"is {self.limits.max_message_bytes} bytes")
            if size != count:
                raise InvalidField(f"{what}[{i}] ({name}): shape {shape} needs {count} values, "
                                   f"payload has {size}")
            self._need(size * dt.itemsize, f"{what}[{i}] ({name})")
            data = np.frombuffer(self.buf, dtype=dt, count=size, offset=self.pos).astype(
                dt.newbyteorder("="), copy=True)
            self.pos += size * dt.itemsize
            out.append(Tensor(name, data.reshape(shape), dname))
        return out

    def params(self, what: str) -> Dict[str, Param]:
        n = self.unpack("H", what)
        if n > self.limits.max_params:
            raise MessageTooLarge(f"{what} has {n} entries; the limit is {self.limits.max_params}")
        out: Dict[str, Param] = {}
        for _ in range(n):
            k = self.str(f"{what} key", MAX_NAME_LEN)
            tag = self.unpack("B", f"{what}[{k!r}] type")
            if tag == _PARAM_INT:
                out[k] = self.unpack("q", f"{what}[{k!r}]")
            elif tag == _PARAM_FLOAT:
                out[k] = self.unpack("d", f"{what}[{k!r}]")
            elif tag == _PARAM_STR:
                out[k] = self.str(f"{what}[{k!r}]", self.limits.max_text)
            else:
                raise InvalidField(f"{what}[{k!r}] has unknown value type {tag}")
        return out

    def blobs(self, what: str) -> List[bytes]:
        n = self.unpack("I", what)
        if n > self.limits.max_blobs:
            raise MessageTooLarge(f"{what} has {n} entries; the limit is {self.limits.max_blobs}")
        self._need(4 * n, what)  # every entry has at least its length
        out = []
        for i in range(n):
            size = self.unpack("I", f"{what}[{i}] length")
            self._need(size, f"{what}[{i}]")
            out.append(bytes(self.buf[self.pos:self.pos + size]))
            self.pos += size
        return out

    def rounds(self, what: str) -> List[RoundDelta]:
        n = self.unpack("I", what)
        if n > self.limits.max_sync_rounds:
            raise MessageTooLarge(f"{what} has {n} rounds; the limit is "
                                  f"{self.limits.max_sync_rounds}; request a full-state sync")
        return [RoundDelta(self.unpack("I", f"{what}[{i}].round"), self.tensors(f"{what}[{i}].tensors"))
                for i in range(n)]


# Wire kinds of SCHEMA entries: (struct format | special kind). Special kinds are handled above.
_SCALAR_FMT = {"u8": "B", "u32": "I", "u64": "Q", "i64": "q", "f32": "f", "f64": "d", "bool": "?"}


def _write_field(w: _Writer, kind: str, value: Any, what: str) -> None:
    if kind in _SCALAR_FMT:
        w.pack(_SCALAR_FMT[kind], value, what)
    elif kind in ("id", "id?", "text"):
        w.str(value, what)
    else:
        getattr(w, kind)(value, what)  # tensors / params / rounds / blobs


def _read_field(r: _Reader, kind: str, what: str) -> Any:
    lim = r.limits
    if kind in _SCALAR_FMT:
        v = r.unpack(_SCALAR_FMT[kind], what)
        return bool(v) if kind == "bool" else v
    if kind in ("id", "id?"):
        return r.str(what, MAX_ID_LEN)
    if kind == "text":
        return r.str(what, lim.max_text)
    return getattr(r, kind)(what)


# --------------------------------------------------------------------------- messages

class MessageType(IntEnum):
    ROUND_PLAN = 1
    UPDATE = 2
    ACK = 3
    STATUS = 4
    SYNC_REQUEST = 5
    SYNC_REPLY = 6
    JOB_STATE = 7
    WORKER_REPORT = 8
    WORKER_CONTROL = 9


class AckStatus(IntEnum):
    ACCEPTED = 0
    REJECTED = 1
    DUPLICATE = 2
    LATE = 3


_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF
_INT_RANGE = {"u8": (0, 0xFF), "u32": (0, _U32), "u64": (0, _U64), "i64": (-(1 << 63), (1 << 63) - 1)}
WIRE_KINDS = (*_SCALAR_FMT, "id", "id?", "text", "tensors", "params", "rounds", "blobs")


@dataclass(frozen=True)
class WireField:
    """How one message field travels and what values it may hold (from its `wire(...)` declaration)."""

    name: str
    kind: str  # one of WIRE_KINDS: the codec and the generic check of the field follow from it
    what: str  # the field's name in error messages
    lo: Any = None  # integers / floats: smallest allowed value (default: the kind's range)
    hi: Any = None  # integers: largest allowed value; a str names a Limits attribute
    enum: Any = None  # u8 etc.: an IntEnum the value must belong to


def wire(kind: str, default: Any = MISSING, *, default_factory: Any = MISSING, lo: Any = None,
         hi: Any = None, enum: Any = None, what: str = "", kw_only: bool = False) -> Any:
    """Declare a message field once: its wire kind and bounds ride in the dataclass field's
    metadata; the message's SCHEMA (wire order = declaration order), the codec and the per-field
    checks are derived from them (see @message). Only cross-field rules live in `_check`.
    kw_only: the field sits at its wire position but is passed by keyword only (so the
    positional constructor need not follow the wire order)."""
    if kind not in WIRE_KINDS:
        raise ValueError(f"unknown wire kind {kind!r}; known: {WIRE_KINDS}")
    meta = {"wire": {"kind": kind, "what": what, "lo": lo, "hi": hi, "enum": enum}}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta, kw_only=kw_only)
    if default is not MISSING:
        return field(default=default, metadata=meta, kw_only=kw_only)
    return field(metadata=meta, kw_only=kw_only)


def message(cls: Type["Message"]) -> Type["Message"]:
    """Class decorator of every message: a dataclass whose every field is declared with wire();
    sets FIELDS (the WireFields in wire order) and SCHEMA ((name, kind) pairs, as docs/protocol.md
    renders them)."""
    cls = dataclass(eq=False)(cls)
    out = []
    for f in dataclasses.fields(cls):
        w = f.metadata.get("wire")
        if w is None:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with protocol.wire(kind, ...)")
        out.append(WireField(f.name, w["kind"], w["what"] or f.name, w["lo"], w["hi"], w["enum"]))
    cls.FIELDS = tuple(out)
    cls.SCHEMA = tuple((w.name, w.kind) for w in out)
    return cls


def _bound(b: Any, limits: Limits, default: Any) -> Any:
    if b is None:
        return default
    return getattr(limits, b) if isinstance(b, str) else b


def _check_tensors(ts: List[Tensor], what: str, limits: Limits) -> None:
    if not isinstance(ts, list):
        raise InvalidField(f"{what} must be a list of protocol.Tensor")
    if len(ts) > limits.max_tensors:
        raise MessageTooLarge(f"{what} has {len(ts)} tensors; the limit is {limits.max_tensors}")
    for i, t in enumerate(ts):
        if not isinstance(t, Tensor):
            raise InvalidField(f"{what}[{i}] must be a protocol.Tensor")
        _check_name(t.name, f"{what}[{i}].name")
        if t.data.ndim > limits.max_tensor_ndim:
            raise MessageTooLarge(f"{what}[{i}] ({t.name}) has {t.data.ndim} dims; limit "
                                  f"{limits.max_tensor_ndim}")
        if t.dtype in _FLOAT_DTYPES:
            _check_all_finite(t.float32(), f"{what}[{i}] ({t.name}) flat index ")


def _check_params(p: Dict[str, Param], what: str, limits: Limits) -> None:
    if not isinstance(p, dict):
        raise InvalidField(f"{what} must be a dict of str -> int|float|str")
    if len(p) > limits.max_params:
        raise MessageTooLarge(f"{what} has {len(p)} entries; the limit is {limits.max_params}")
    for k, v in p.items():
        _check_name(k, f"{what} key")
        if isinstance(v, str):
            _check_text(v, f"{what}[{k!r}]", limits)
        elif isinstance(v, (bool, int, np.integer)):
            _check_int(int(v), -(1 << 63), (1 << 63) - 1, f"{what}[{k!r}]")
        elif isinstance(v, (float, np.floating)):
            _check_finite(v, f"{what}[{k!r}]")
        else:
            raise InvalidField(f"{what}[{k!r}] must be int, float or str, got {type(v).__name__}")


def _check_rounds(rs: Any, what: str, limits: Limits) -> List["RoundDelta"]:
    if not isinstance(rs, list):
        raise InvalidField(f"{what} must be a list of protocol.RoundDelta")
    if len(rs) > limits.max_sync_rounds:
        raise MessageTooLarge(f"{len(rs)} rounds in a sync reply; the limit is "
                              f"{limits.max_sync_rounds}: send full=True instead")
    for i, r in enumerate(rs):
        if not isinstance(r, RoundDelta):
            raise InvalidField(f"{what}[{i}] must be a protocol.RoundDelta")
        r.round = _check_int(r.round, 0, _U32, f"{what}[{i}].round")
        _check_tensors(r.tensors, f"{what}[{i}].tensors", limits)
    return rs


def _check_field(f: WireField, value: Any, limits: Limits) -> Any:
    """The generic check of one field's value by its kind and bounds; returns it normalised."""
    kind, what = f.kind, f.what
    if kind in _INT_RANGE:
        lo, hi = _INT_RANGE[kind]
        v = _check_int(value, _bound(f.lo, limits, lo), _bound(f.hi, limits, hi), what)
        if f.enum is not None:
            try:
                return f.enum(v)
            except ValueError:
                raise InvalidField(f"{what} {value!r} unknown (known: "
                                   f"{[s.name.lower() for s in f.enum]})") from None
        return v
    if kind in ("f32", "f64"):
        v = _check_finite(value, what)
        if f.lo is not None and v < f.lo:
            raise InvalidField(f"{what}={v} must be >= {f.lo}")
        if kind == "f32":
            if not math.isfinite(float(np.float32(v))):
                raise InvalidField(f"{what}={v} overflows float32")
            v = float(np.float32(v))  # what the wire carries
        return v
    if kind == "bool":
        return bool(value)
    if kind == "id":
        return check_id(value, what)
    if kind == "id?":
        return value if value == "" else check_id(value, what)
    if kind == "text":
        return _check_text(value, what, limits)
    if kind == "tensors":
        _check_tensors(value, what, limits)
        return value
    if kind == "params":
        _check_params(value, what, limits)
        return value
    if kind == "rounds":
        return _check_rounds(value, what, limits)
    if kind == "blobs":
        if not isinstance(value, list) or not all(isinstance(b, (bytes, bytearray)) for b in value):
            raise InvalidField(f"{what} must be a list of bytes")
        if len(value) > limits.max_blobs:
            raise MessageTooLarge(f"{what} has {len(value)} entries; the limit is {limits.max_blobs}")
        return [bytes(b) for b in value]
    raise AssertionError(kind)


class Message:
    """Base of all messages (declared with @message and wire() fields): FIELDS / SCHEMA drive
    encode, decode and the per-field checks; _check() holds the cross-field rules only."""

    TYPE: ClassVar[MessageType]
    FIELDS: ClassVar[Tuple[WireField, ...]]
    SCHEMA: ClassVar[Tuple[Tuple[str, str], ...]]
    signature = None  # set by decode(): the parsed Signature trailer, or None (unsigned)

    def _check(self, limits: Limits) -> None:
        """Rules between fields (after every field passed its own check)."""

    def validate(self, limits: Limits = DEFAULT_LIMITS) -> "Message":
        """Normalise array fields and check every value; raises ProtocolError."""
        for f in self.FIELDS:
            setattr(self, f.name, _check_field(f, getattr(self, f.name), limits))
        self._check(limits)
        return self

    def encode(self, limits: Limits = DEFAULT_LIMITS, signer: Any = None) -> bytes:
        """The wire bytes; with a signer (an object with .key_id and .sign(bytes) -> bytes, e.g.
        edgefed.security.signing.Signer) the SIGNED flag is set and a signature trailer added."""
        self.validate(limits)
        w = _Writer(limits)
        for name, kind in self.SCHEMA:
            _write_field(w, kind, getattr(self, name), f"{type(self).__name__}.{name}")
        body = b"".join(w.parts)
        size = len(body) + OVERHEAD
        if size > limits.max_message_bytes:
            raise MessageTooLarge(
                f"{type(self).__name__} would be {size} bytes; the limit is "
                f"{limits.max_message_bytes} (Limits.max_message_bytes): split tensors or raise the limit "
                f"on both sides")
        flags = FLAG_SIGNED if signer is not None else 0
        head = HEADER.pack(MAGIC, PROTOCOL_VERSION, int(self.TYPE), flags, len(body))
        out = head + body + TRAILER.pack(zlib.crc32(body, zlib.crc32(head)))
        return out if signer is None else sign_bytes(out, signer, limits)

    def __eq__(self, other: object) -> bool:  # arrays make field-wise == ambiguous; compare wire bytes
        if type(other) is not type(self):
            return NotImplemented
        try:
            return self.encode() == other.encode()  # type: ignore[union-attr]
        except ProtocolError:
            return self is other

    __hash__ = None  # type: ignore[assignment]


@message
class RoundPlan(Message):
    """Published retained on plan/: what every device should do this round. The generic
    training settings are fields; everything method-specific travels in `params` (settings such
    as a ZO method's eps, k and seed_pool_id) and `tensors` (e.g. FedKSeed-Pro's seed_probs)."""

    TYPE: ClassVar[MessageType] = MessageType.ROUND_PLAN

    job: str = wire("id")
    round: int = wire("u32")
    method: str = wire("id")
    lr: float = wire("f64", 0.0)
    local_steps: int = wire("u32", 1)
    batch_size: int = wire("u32", 1)
    deadline: float = wire("f64", 0.0, lo=0.0)  # unix time; 0 = none
    min_devices: int = wire("u32", 1)
    params: Dict[str, Param] = wire("params", default_factory=dict)  # method settings, engine facts
    tensors: List[Tensor] = wire("tensors", default_factory=list)  # the method's plan tensors
    delta_tensors: List[Tensor] = wire("tensors", default_factory=list)  # the previous round's delta


@message
class Update(Message):
    """A device's result for one round: the method's named tensors (FedKSeed: "seeds" u32 and
    "scalars" f32; FedAvg: "delta"; a secure round: the masked vector)."""

    TYPE: ClassVar[MessageType] = MessageType.UPDATE

    job: str = wire("id")
    round: int = wire("u32")
    device: str = wire("id")
    method: str = wire("id")
    msg_id: int = wire("u64")  # per-device, strictly increasing (see MessageIds): the idempotency key
    num_samples: int = wire("u32")
    tensors: List[Tensor] = wire("tensors", default_factory=list)
    train_loss: float = wire("f32", 0.0)

    def _check(self, limits: Limits) -> None:
        if self.num_samples <= 0:
            raise InvalidField(f"num_samples must be > 0 (device {self.device} trained on no data); "
                               f"do not send an update for an empty round")

    def tensor(self, name: str) -> Optional[Tensor]:
        """The tensor called `name`, or None."""
        return next((t for t in self.tensors if t.name == name), None)


@message
class Ack(Message):
    TYPE: ClassVar[MessageType] = MessageType.ACK

    job: str = wire("id")
    round: int = wire("u32")
    device: str = wire("id")
    msg_id: int = wire("u64")
    status: AckStatus = wire("u8", AckStatus.ACCEPTED, enum=AckStatus, what="ack status")
    reason: str = wire("text", "")


@message
class Status(Message):
    """Retained per device on status/; also its MQTT last will (state 'offline')."""

    TYPE: ClassVar[MessageType] = MessageType.STATUS

    job: str = wire("id")
    device: str = wire("id")
    state: str = wire("id")  # online | idle | syncing | training | offline | error ...
    device_class: str = wire("id?", "")  # e.g. raspberry-pi-4 (a device_configs/ name), or empty
    round: int = wire("i64", -1, lo=-1, hi=_U32)  # last round seen, -1 = none
    timestamp: float = wire("f64", 0.0)  # unix time when written (for a will: when the device connected)
    text: str = wire("text", "")


@message
class SyncRequest(Message):
    """Device -> server: 'my parameters equal the global state at the start of from_round'."""

    TYPE: ClassVar[MessageType] = MessageType.SYNC_REQUEST

    job: str = wire("id")
    device: str = wire("id")
    from_round: int = wire("u32")
    full: bool = wire("bool", False)  # ask for the full state instead of deltas
    request_id: int = wire("u64", 0)  # echoed in the reply


@message
class SyncReply(Message):
    """Server -> device: deltas of rounds from_round+1..to_round, or the full state (full=True)."""

    TYPE: ClassVar[MessageType] = MessageType.SYNC_REPLY

    job: str = wire("id")
    device: str = wire("id")
    request_id: int = wire("u64", 0, kw_only=True)  # the request's id
    from_round: int = wire("u32")
    to_round: int = wire("u32")
    full: bool = wire("bool", False)
    rounds: List[RoundDelta] = wire("rounds", default_factory=list)
    state: List[Tensor] = wire("tensors", default_factory=list)  # full trainable state when full=True

    def _check(self, limits: Limits) -> None:
        if self.to_round < self.from_round:
            raise InvalidField(f"to_round {self.to_round} < from_round {self.from_round}")
        prev = self.from_round
        for i, r in enumerate(self.rounds):
            if not prev < r.round <= self.to_round:
                raise InvalidField(f"rounds[{i}].round={r.round} must increase within "
                                   f"({self.from_round}, {self.to_round}]")
            prev = r.round


@message
class JobState(Message):
    """Retained on state/: where the job is, and how far back deltas can be replayed."""

    TYPE: ClassVar[MessageType] = MessageType.JOB_STATE

    job: str = wire("id")
    round: int = wire("u32")  # round of the latest published plan
    history_from: int = wire("u32")  # oldest from_round a delta sync can start at; older devices sync full
    method: str = wire("id")
    model: str = wire("text", "")  # artifact id the devices must run
    digest: str = wire("text", "")  # e.g. sha256 hex of the global trainable state (optional)
    updated_at: float = wire("f64", 0.0)
    params: Dict[str, Param] = wire("params", default_factory=dict)


@message
class WorkerReport(Message):
    """Aggregation worker -> coordinator on worker/report/{worker} (docs/server.md "Scale-out"):
    what the worker decided for the updates it took from the shared subscription since its last
    report, the bytes of those it accepted, and, answering a close request, its partial sum."""

    TYPE: ClassVar[MessageType] = MessageType.WORKER_REPORT

    job: str = wire("id")
    worker: str = wire("id")
    session: int = wire("u64")  # random per worker process: a restarted worker is a new session
    round: int = wire("u32")
    seq: int = wire("u64", lo=1)  # 1, 2, ... per session and round
    request: int = wire("u64", 0)  # 0: progress; else the close request answered
    decisions: List[bytes] = wire("blobs", default_factory=list)  # one encoded Ack per update handled
    labels: List[bytes] = wire("blobs", default_factory=list)  # its reason class (utf-8; empty: accepted)
    updates: List[bytes] = wire("blobs", default_factory=list)  # accepted: the Update as received; else empty
    tensors: List[Tensor] = wire("tensors", default_factory=list)  # request > 0: the partial of reports 1..seq

    def _check(self, limits: Limits) -> None:
        if not len(self.decisions) == len(self.labels) == len(self.updates):
            raise InvalidField(f"worker report: {len(self.decisions)} decisions, {len(self.labels)} labels, "
                               f"{len(self.updates)} updates; one of each per update")
        if self.request == 0 and self.tensors:
            raise InvalidField("worker report: a partial sum answers a close request (request > 0)")


@message
class WorkerControl(Message):
    """Coordinator -> aggregation workers, retained on worker/control: the open round, the job
    configuration and the method state's scalars the workers validate with, and a close request."""

    TYPE: ClassVar[MessageType] = MessageType.WORKER_CONTROL

    job: str = wire("id")
    round: int = wire("u32")
    request: int = wire("u64", 0)  # > 0: send your partial for `round` (WorkerReport.request)
    done: bool = wire("bool", False)  # the job is finished
    config: List[bytes] = wire("blobs", default_factory=list)  # [job config JSON, state scalars JSON]


MESSAGE_TYPES: Dict[int, Type[Message]] = {
    int(c.TYPE): c for c in (RoundPlan, Update, Ack, Status, SyncRequest, SyncReply, JobState,
                             WorkerReport, WorkerControl)}


# --------------------------------------------------------------------------- signatures

@dataclass(frozen=True)
class Signature:
    """A parsed signature trailer: who signed (key id) what (the message bytes before it)."""

    key_id: str
    signature: bytes
    signed: bytes  # signing_input(key_id, message bytes): what the signature must verify over


def signing_input(key_id: str, message: bytes) -> bytes:
    """The bytes a signature covers: a domain tag, the key id, and the whole encoded message
    (header with the SIGNED flag, body, CRC), so job, type, round, device and msg_id are bound."""
    k = key_id.encode("utf-8")
    return SIG_DOMAIN + struct.pack("<H", len(k)) + k + bytes(message)


def sign_bytes(message: bytes, signer: Any, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Append a signature trailer to an encoded message whose header has FLAG_SIGNED set."""
    key_id = check_id(signer.key_id, "signing key id")
    sig = bytes(signer.sign(signing_input(key_id, message)))
    if not 0 < len(sig) <= MAX_SIGNATURE_LEN:
        raise InvalidField(f"signature of {len(sig)} bytes (limit {MAX_SIGNATURE_LEN})")
    k = key_id.encode("utf-8")
    out = message + struct.pack("<H", len(k)) + k + struct.pack("<H", len(sig)) + sig
    if len(out) > limits.max_message_bytes:
        raise MessageTooLarge(f"signed message would be {len(out)} bytes; the limit is "
                              f"{limits.max_message_bytes} (Limits.max_message_bytes)")
    return out


def _read_signature(buf: memoryview, start: int) -> Signature:
    r = _Reader(buf[start:], len(buf), DEFAULT_LIMITS)
    key_id = check_id(r.str("signature key id", MAX_ID_LEN), "signature key id")
    n = r.unpack("H", "signature length")
    if not 0 < n <= MAX_SIGNATURE_LEN:
        raise InvalidField(f"signature length {n} outside 1..{MAX_SIGNATURE_LEN}")
    r._need(n, "signature")
    sig = bytes(r.buf[r.pos:r.pos + n])
    if r.pos + n != len(r.buf):
        raise ProtocolError(f"{len(r.buf) - r.pos - n} unexpected bytes after the signature")
    return Signature(key_id, sig, signing_input(key_id, buf[:start]))


# --------------------------------------------------------------------------- decode

def decode(data: Union[bytes, bytearray, memoryview], *, limits: Limits = DEFAULT_LIMITS,
           expect: Optional[Type[Message]] = None, verifier: Any = None) -> Message:
    """Parse and fully validate one message. Raises ProtocolError (a ValueError) on anything wrong.

    A signature trailer, if any, is parsed and left on msg.signature (a Signature, else None).
    With a verifier (callable(msg, signature_or_None), raising SignatureError, e.g. from
    edgefed.security.signing) the message is returned only if the verifier accepts it."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"payload must be bytes, got {type(data).__name__}")
    try:
        buf = memoryview(data).cast("B")
    except TypeError:
        raise ProtocolError("payload must be a contiguous byte buffer") from None
    n = len(buf)
    if n > limits.max_message_bytes:
        raise MessageTooLarge(f"message is {n} bytes; the limit is {limits.max_message_bytes} "
                              f"(Limits.max_message_bytes)")
    if n == 0:
        raise TruncatedMessage("empty payload (on a retained topic this means the message was "
                               "cleared); nothing to decode")
    if n < OVERHEAD:
        raise TruncatedMessage(f"message truncated: {n} bytes, a header and CRC alone take {OVERHEAD}")
    magic, version, mtype, flags, body_len = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise BadMagic(f"not an EdgeFed message (magic {bytes(magic)!r}, expected {MAGIC!r}); "
                       f"something else publishes on this topic")
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersion(version)
    sig: Optional[Signature] = None
    if flags & FLAG_SIGNED and body_len + OVERHEAD < n:
        sig = _read_signature(buf, body_len + OVERHEAD)
        buf = buf[:body_len + OVERHEAD]
        n = len(buf)
    if body_len != n - OVERHEAD:
        raise TruncatedMessage(f"message length mismatch: header announces a {body_len}-byte body, "
                               f"payload carries {n - OVERHEAD}; it was cut or padded in transit")
    if flags & FLAG_SIGNED and sig is None:
        raise TruncatedMessage("message flagged as signed carries no signature trailer; it was cut "
                               "in transit")
    (crc,) = TRAILER.unpack_from(buf, n - TRAILER.size)
    actual = zlib.crc32(buf[:n - TRAILER.size])
    if crc != actual:
        raise ChecksumMismatch(f"CRC32 mismatch (trailer {crc:#010x}, computed {actual:#010x}): the "
                               f"message was corrupted; drop it and let the sender retry")
    cls = MESSAGE_TYPES.get(mtype)
    if cls is None:
        raise ProtocolError(f"unknown message type {mtype} (this build knows "
                            f"{sorted(MESSAGE_TYPES)}); upgrade edgefed")
    if expect is not None and cls is not expect:
        raise ProtocolError(f"expected a {expect.__name__} message, got {cls.__name__}")
    if flags & ~KNOWN_FLAGS:
        raise ProtocolError(f"unknown header flags {flags:#06x} (this build understands "
                            f"{KNOWN_FLAGS:#06x}); upgrade edgefed")
    r = _Reader(buf[HEADER.size:n - TRAILER.size], n, limits)
    values = {name: _read_field(r, kind, f"{cls.__name__}.{name}") for name, kind in cls.SCHEMA}
    if r.pos != body_len:
        raise ProtocolError(f"{cls.__name__} has {body_len - r.pos} unexpected trailing bytes")
    msg = cls(**values).validate(limits)
    msg.signature = sig
    if verifier is not None:
        verifier(msg, sig)  # raises SignatureError
    return msg


def validate_update(update: Update, plan: RoundPlan) -> Update:
    """Check an update against the plan it answers: job, round and method. What its tensors mean
    (names, dtypes, ranges) is the method's to check (ServerStrategy.validate_update)."""
    update.validate()  # normalises fields too; both are cheap next to the network
    plan.validate()
    if update.job != plan.job:
        raise InvalidField(f"update from {update.device} is for job {update.job!r}, not {plan.job!r}")
    if update.round != plan.round:
        raise RoundMismatch(f"update from {update.device} is for round {update.round}, the current "
                            f"round is {plan.round}", expected=plan.round, received=update.round)
    if update.method != plan.method:
        raise InvalidField(f"update from {update.device} uses method {update.method!r}, the plan "
                           f"says {plan.method!r}; the device runs another configuration")
    return update


def check_topic(topic: str, msg: Message) -> None:
    """Refuse a message whose type, job or device does not match the topic it arrived on."""
    info = parse_topic(topic)
    want = TOPIC_KINDS[info.kind]
    if not isinstance(msg, want):
        raise ProtocolError(f"{type(msg).__name__} arrived on a {info.kind} topic ({topic}); "
                            f"expected {want.__name__}")
    if getattr(msg, "job", info.job) != info.job:
        raise InvalidField(f"message for job {msg.job!r} arrived on {topic}")  # type: ignore[attr-defined]
    if info.device is not None and getattr(msg, "worker", info.device) != info.device:
        raise InvalidField(f"report of worker {msg.worker!r} arrived on {topic}")  # type: ignore[attr-defined]
    if info.device is not None and getattr(msg, "device", info.device) != info.device:
        raise InvalidField(f"message from/for device {msg.device!r} arrived on {topic}; "  # type: ignore
                           f"a device may only use its own topics")


# --------------------------------------------------------------------------- topics

@dataclass(frozen=True)
class TopicInfo:
    job: str
    kind: str  # plan | state | update | ack | status | sync_request | sync_reply | secagg_* (own codec)
    device: Optional[str] = None


class Topics:
    """Topic names and subscription filters of one job (all under edgefed/v1/{job}/)."""

    def __init__(self, job: str):
        self.job = check_id(job, "job")
        self.base = f"{TOPIC_ROOT}/{job}"

    # server -> devices
    def plan(self) -> str: return f"{self.base}/plan"
    def state(self) -> str: return f"{self.base}/state"
    def ack(self, device: str) -> str: return f"{self.base}/ack/{check_id(device, 'device')}"
    def sync_reply(self, device: str) -> str: return f"{self.base}/sync/reply/{check_id(device, 'device')}"
    def secagg_to(self, device: str) -> str: return f"{self.base}/secagg/to/{check_id(device, 'device')}"
    def secagg_all(self) -> str: return f"{self.base}/secagg/all"

    # devices -> server
    def update(self, device: str) -> str: return f"{self.base}/update/{check_id(device, 'device')}"
    def status(self, device: str) -> str: return f"{self.base}/status/{check_id(device, 'device')}"
    def sync_request(self, device: str) -> str:
        return f"{self.base}/sync/request/{check_id(device, 'device')}"
    def secagg(self, device: str) -> str: return f"{self.base}/secagg/from/{check_id(device, 'device')}"

    # aggregation workers (docs/server.md "Scale-out")
    def worker_report(self, worker: str) -> str:
        return f"{self.base}/worker/report/{check_id(worker, 'worker')}"
    def worker_status(self, worker: str) -> str:
        return f"{self.base}/worker/status/{check_id(worker, 'worker')}"
    def worker_control(self) -> str: return f"{self.base}/worker/control"
    def all_worker_reports(self) -> str: return f"{self.base}/worker/report/+"
    def all_worker_statuses(self) -> str: return f"{self.base}/worker/status/+"

    def shared_updates(self, group: str) -> str:
        """The MQTT 5 shared subscription of the update topics: the broker hands each update to
        one member of `group` (the coordinator and its workers)."""
        return f"$share/{check_id(group, 'share group')}/{self.all_updates()}"

    # server subscription filters
    def all_updates(self) -> str: return f"{self.base}/update/+"
    def all_statuses(self) -> str: return f"{self.base}/status/+"
    def all_sync_requests(self) -> str: return f"{self.base}/sync/request/+"
    def all_secagg(self) -> str: return f"{self.base}/secagg/from/+"
    def everything(self) -> str: return f"{self.base}/#"


TOPIC_KINDS: Dict[str, Type[Message]] = {
    "plan": RoundPlan, "state": JobState, "update": Update, "ack": Ack, "status": Status,
    "sync_request": SyncRequest, "sync_reply": SyncReply, "worker_report": WorkerReport,
    "worker_status": Status, "worker_control": WorkerControl}


def parse_topic(topic: str) -> TopicInfo:
    parts = topic.split("/")
    root = TOPIC_ROOT.split("/")
    if parts[:2] != root or len(parts) < 4:
        raise ProtocolError(f"topic {topic!r} is not under {TOPIC_ROOT}/<job>/")
    job = check_id(parts[2], "job in topic")
    rest = parts[3:]
    if rest in (["plan"], ["state"]):
        return TopicInfo(job, rest[0])
    if len(rest) == 2 and rest[0] in ("update", "ack", "status"):
        return TopicInfo(job, rest[0], check_id(rest[1], "device in topic"))
    if len(rest) == 3 and rest[0] == "sync" and rest[1] in ("request", "reply"):
        return TopicInfo(job, "sync_" + rest[1], check_id(rest[2], "device in topic"))
    if rest == ["worker", "control"]:
        return TopicInfo(job, "worker_control")
    if len(rest) == 3 and rest[0] == "worker" and rest[1] in ("report", "status"):
        return TopicInfo(job, "worker_" + rest[1], check_id(rest[2], "worker in topic"))
    if rest == ["secagg", "all"]:
        return TopicInfo(job, "secagg_all")
    if len(rest) == 3 and rest[0] == "secagg" and rest[1] in ("from", "to"):
        return TopicInfo(job, "secagg_" + rest[1], check_id(rest[2], "device in topic"))
    raise ProtocolError(f"topic {topic!r} is not part of the EdgeFed v1 layout")


# --------------------------------------------------------------------------- idempotency

class MessageIds:
    """Strictly increasing u64 message ids without persisted state: microseconds since the epoch,
    bumped by one when the clock has not moved, so a rebooted device still counts upwards."""

    def __init__(self, last: int = 0):
        self._last = last
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            self._last = max(self._last + 1, time.time_ns() // 1000)
            return self._last


__all__ = [
    "PROTOCOL_VERSION", "SUPPORTED_VERSIONS", "MAGIC", "TOPIC_ROOT", "Limits", "DEFAULT_LIMITS",
    "ProtocolError", "MessageTooLarge", "TruncatedMessage", "BadMagic", "UnsupportedVersion",
    "ChecksumMismatch", "InvalidField", "SignatureError", "Signature", "signing_input",
    "sign_bytes", "FLAG_SIGNED", "RoundMismatch", "Tensor", "TENSOR_DTYPES", "bf16_bits", "bf16_to_f32", "RoundDelta", "MessageType",
    "AckStatus", "Message", "message", "wire", "WireField", "WIRE_KINDS", "RoundPlan", "Update", "Ack", "Status", "SyncRequest", "SyncReply",
    "JobState", "WorkerReport", "WorkerControl", "MESSAGE_TYPES", "decode", "validate_update", "check_id", "check_topic",
    "TopicInfo", "Topics", "TOPIC_KINDS", "parse_topic", "MessageIds"]
