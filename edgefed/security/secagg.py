"""Secure aggregation (SecAgg / SecAgg+): the server learns the sum of the devices' vectors and
nothing else, and devices that drop out mid-round are recovered up to a threshold.

The protocol of Bonawitz et al. (CCS 2017), with the sparse neighbour graph of SecAgg+ (Bell
et al., CCS 2020), one instance per round with fresh keys:

  0 advertise  device -> server  two X25519 public keys (c: share encryption, s: masks), signed
                                 with the device's Ed25519 key
  1 roster     server -> all     every advertisement + the neighbour-graph seed, signed by the job key
    share      device -> server  Shamir shares (threshold t) of its s private key and of a fresh
                                 self-mask seed b, one AES-GCM ciphertext per neighbour
  2 forward    server -> device  the ciphertexts addressed to it
    masked     device -> server  y = x + PRG(b) + sum_nbr +-PRG(ECDH(s_u, s_v))   (mod 2^bits)
  3 unmask-req server -> all     who sent y (survivors) and who did not (dropped)
    unmask     device -> server  for each neighbour: its b share if it survived, its s share if
                                 it dropped (never both: a device refuses a request that would
                                 reveal both for one peer)
  result: sum y - sum PRG(b_survivor) -+ masks of dropped devices with survivors = sum x.

Inputs are fixed-point integers in Z_{2^bits} (`FixedPoint`): the sum of n inputs of magnitude
<= bound must fit, which `FixedPoint.for_sum` checks. Everything cryptographic comes from
maintained libraries: X25519, HKDF, AES-GCM, ChaCha20 (the mask PRG) and Ed25519 from
`cryptography`; Shamir sharing over GF(2^128) from `pycryptodome`.

What it does not do: the server sees only the sum, so it cannot bound or robust-aggregate one
device's input; bounds must be enforced on the device (clipping before encoding), and robust
aggregation (median, Krum) cannot be combined with it. A device that lies about its input is
not detected. See docs/security.md.
"""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .. import protocol as P

__all__ = ["SecAggError", "SecAggConfig", "FixedPoint", "neighbours", "SecAggClient", "SecAggServer",
           "Stage", "decode_message", "run_in_memory"]

MAGIC = b"EFSA"
VERSION = 1
SIG_DOMAIN = b"EDGF-SECAGG-v1\x00"
KEY_LEN = 32
SHARE_LEN = 16
MAX_COHORT = 10_000
MAX_VECTOR = 1 << 27  # elements in one masked vector (512 MiB at 32 bits): beyond that, chunk


class SecAggError(ValueError):
    """A secure-aggregation message or request that must not be acted on (the text says why)."""


class Stage:
    ADVERTISE, ROSTER, SHARES, FORWARD, MASKED, UNMASK_REQUEST, UNMASK = range(7)
    NAMES = ("advertise", "roster", "shares", "forward", "masked", "unmask-request", "unmask")


# ----------------------------------------------------------------------------- fixed point

@dataclass(frozen=True)
class FixedPoint:
    """Signed fixed point in Z_{2^bits}: x -> round(x * 2^frac_bits) mod 2^bits."""
    bits: int = 32
    frac_bits: int = 16

    def __post_init__(self):
        if self.bits not in (32, 64):
            raise SecAggError(f"ring bits must be 32 or 64, got {self.bits}")
        if not 0 <= self.frac_bits < self.bits - 1:
            raise SecAggError(f"frac_bits must be in [0, {self.bits - 2}], got {self.frac_bits}")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint32 if self.bits == 32 else np.uint64)

    @classmethod
    def for_sum(cls, n: int, bound: float, bits: int = 32, resolution: float | None = None) -> "FixedPoint":
        """The finest scale at which n inputs of |x| <= bound sum without wrapping; refuses when
        that is coarser than `resolution` (default: bound / 2^10)."""
        if n < 1 or not bound > 0:
            raise SecAggError(f"need n >= 1 and bound > 0, got n={n}, bound={bound}")
        headroom = (bits - 1) - np.log2(float(n) * float(bound))  # sum < 2^(bits-1)
        frac = int(np.floor(headroom)) - 1
        res = resolution if resolution is not None else bound / 1024
        if frac < 0 or 2.0 ** -frac > res:
            raise SecAggError(
                f"{n} inputs bounded by {bound:g} leave {max(frac, 0)} fraction bits in a {bits}-bit ring "
                f"(resolution {2.0 ** -max(frac, 0):.3g} > {res:.3g}); use bits=64 or a smaller bound")
        return cls(bits, min(frac, bits - 2))

    def encode(self, x: np.ndarray, bound: float) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(x)):
            raise SecAggError("input has non-finite values")
        big = float(np.max(np.abs(x))) if x.size else 0.0
        if big > bound:
            raise SecAggError(f"input magnitude {big:g} exceeds the agreed bound {bound:g}: clip before encoding")
        q = np.rint(x * 2.0 ** self.frac_bits).astype(np.int64)
        return q.astype(np.int32 if self.bits == 32 else np.int64).view(self.dtype)

    def decode(self, s: np.ndarray) -> np.ndarray:
        signed = np.asarray(s, dtype=self.dtype).view(np.int32 if self.bits == 32 else np.int64)
        return signed.astype(np.float64) / 2.0 ** self.frac_bits


@dataclass(frozen=True)
class SecAggConfig:
    """What every participant of one round agrees on (from the job settings)."""
    job: str
    round: int
    length: int                 # elements of each input vector
    threshold: int              # shares needed to reconstruct a secret: above half the neighbours
                                # (against a server that tells devices different survivor lists),
                                # at most the neighbours (dropouts tolerated: neighbours - threshold)
    degree: int = 0             # neighbours per device (SecAgg+); 0 = everyone (SecAgg)
    fixed: FixedPoint = field(default_factory=FixedPoint)
    bound: float = 1.0          # |x| <= bound for every element (clip on the device)
    min_survivors: int = 0      # fewest masked inputs the server may unmask (0: threshold)

    def __post_init__(self):
        P.check_id(self.job, "job")
        if not 0 < self.length <= MAX_VECTOR:
            raise SecAggError(f"length must be in 1..{MAX_VECTOR}, got {self.length}")
        if self.threshold != 0 and self.threshold < 2:
            raise SecAggError(f"threshold must be 0 (a majority of each device's neighbours) or >= 2, "
                              f"got {self.threshold}")
        if self.degree < 0 or self.degree % 2:
            raise SecAggError(f"degree must be 0 (everyone) or an even number, got {self.degree}")
        if self.degree and self.threshold and not self.degree / 2 < self.threshold <= self.degree:
            raise SecAggError(f"threshold {self.threshold} must be above half the neighbour degree {self.degree} "
                              f"and at most the degree: {self.degree // 2 + 1}..{self.degree}")

    @property
    def survivors_needed(self) -> int:
        return max(self.min_survivors, self.threshold or 3)

    def threshold_for(self, n_neighbours: int) -> int:
        """Shares needed for a secret held by n neighbours: the configured threshold, or (0)
        a majority of them."""
        return self.threshold or n_neighbours // 2 + 1


# ----------------------------------------------------------------------------- neighbour graph

def neighbours(cohort: Sequence[str], graph_seed: int, degree: int) -> Dict[str, List[str]]:
    """SecAgg+'s graph: the cohort shuffled by graph_seed on a ring, each device joined to the
    degree/2 devices on either side (everyone when degree == 0 or >= n - 1). Lists are sorted,
    so share indices (1 + position) are the same on every side."""
    ids = sorted(cohort)
    n = len(ids)
    if degree == 0 or degree >= n - 1:
        return {u: [v for v in ids if v != u] for u in ids}
    order = [ids[i] for i in np.random.default_rng(graph_seed).permutation(n)]
    pos = {u: i for i, u in enumerate(order)}
    half = degree // 2
    return {u: sorted({order[(pos[u] + d) % n] for d in range(-half, half + 1) if d}) for u in ids}


# ----------------------------------------------------------------------------- crypto helpers

def _x25519():
    from cryptography.hazmat.primitives.asymmetric import x25519
    return x25519


def _raw_public(priv) -> bytes:
    from cryptography.hazmat.primitives import serialization as s
    return priv.public_key().public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)


def _raw_private(priv) -> bytes:
    from cryptography.hazmat.primitives import serialization as s
    return priv.private_bytes(s.Encoding.Raw, s.PrivateFormat.Raw, s.NoEncryption())


def _kdf(secret: bytes, purpose: bytes, cfg: SecAggConfig) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    info = b"edgefed-secagg-v1|" + purpose + b"|" + cfg.job.encode() + struct.pack("<I", cfg.round)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_LEN, salt=None, info=info).derive(secret)


def _agree(priv_raw: bytes, peer_public: bytes) -> bytes:
    x = _x25519()
    try:
        return x.X25519PrivateKey.from_private_bytes(priv_raw).exchange(
            x.X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as e:  # a low-order point gives an all-zero secret
        raise SecAggError(f"key agreement failed: {e}") from None


def prg(key: bytes, length: int, dtype: np.dtype) -> np.ndarray:
    """`length` uniform words from ChaCha20(key) (the mask expansion)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
    enc = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(bytes(length * dtype.itemsize)), dtype=dtype.newbyteorder("<")).astype(dtype)


def _split(secret: bytes, k: int, n: int) -> List[bytes]:
    """Shamir shares (index i+1 -> list[i]) of a 16*m-byte secret, 16 bytes per block."""
    from Crypto.Protocol.SecretSharing import Shamir
    blocks = [Shamir.split(k, n, secret[i:i + SHARE_LEN]) for i in range(0, len(secret), SHARE_LEN)]
    return [b"".join(blk[j][1] for blk in blocks) for j in range(n)]


def _combine(shares: Sequence[Tuple[int, bytes]], size: int) -> bytes:
    from Crypto.Protocol.SecretSharing import Shamir
    return b"".join(Shamir.combine([(i, s[o:o + SHARE_LEN]) for i, s in shares])
                    for o in range(0, size, SHARE_LEN))


def _aead(key: bytes):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    return AESGCM(key)


# ----------------------------------------------------------------------------- wire format

class _W:
    def __init__(self):
        self.parts: List[bytes] = []

    def u8(self, v): self.parts.append(struct.pack("<B", v)); return self
    def u16(self, v): self.parts.append(struct.pack("<H", v)); return self
    def u32(self, v): self.parts.append(struct.pack("<I", v)); return self
    def u64(self, v): self.parts.append(struct.pack("<Q", v)); return self

    def blob(self, b: bytes):
        self.parts.append(struct.pack("<I", len(b)))
        self.parts.append(bytes(b))
        return self

    def id(self, s: str):
        return self.blob(P.check_id(s, "id").encode())

    def bytes(self) -> bytes:
        return b"".join(self.parts)


class _R:
    def __init__(self, buf: bytes, max_blob: int):
        self.buf, self.pos, self.max_blob = memoryview(buf), 0, max_blob

    def _take(self, n: int, what: str) -> memoryview:
        if n > len(self.buf) - self.pos:
            raise SecAggError(f"message truncated at {what}")
        v = self.buf[self.pos:self.pos + n]
        self.pos += n
        return v

    def u8(self, w="u8"): return self._take(1, w)[0]
    def u16(self, w="u16"): return struct.unpack("<H", self._take(2, w))[0]
    def u32(self, w="u32"): return struct.unpack("<I", self._take(4, w))[0]
    def u64(self, w="u64"): return struct.unpack("<Q", self._take(8, w))[0]

    def blob(self, what: str, exact: Optional[int] = None, limit: Optional[int] = None) -> bytes:
        n = self.u32(what)
        if exact is not None and n != exact:
            raise SecAggError(f"{what} is {n} bytes, expected {exact}")
        if n > (limit or self.max_blob):
            raise SecAggError(f"{what} is {n} bytes, over the limit {limit or self.max_blob}")
        return bytes(self._take(n, what))

    def id(self, what: str) -> str:
        raw = self.blob(what, limit=P.MAX_ID_LEN)
        try:
            return P.check_id(raw.decode("utf-8"), what)
        except (UnicodeDecodeError, P.InvalidField) as e:
            raise SecAggError(f"{what}: {e}") from None

    def count(self, what: str, limit: int = MAX_COHORT) -> int:
        n = self.u32(what)
        if n > limit:
            raise SecAggError(f"{what}: {n} entries, over the limit {limit}")
        return n

    def done(self) -> None:
        if self.pos != len(self.buf):
            raise SecAggError(f"{len(self.buf) - self.pos} unexpected trailing bytes")


@dataclass
class Msg:
    stage: int
    job: str
    round: int
    sender: str
    body: bytes
    signed: bytes = b""          # everything the signature covers
    signature: bytes = b""


def decode_message(data: bytes, max_bytes: int = 1 << 31) -> Msg:
    """Structure only (magic, version, ids, signature field); meaning is checked by the caller."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SecAggError("message must be bytes")
    data = bytes(data)
    if len(data) > max_bytes:
        raise SecAggError(f"message of {len(data)} bytes is over the limit {max_bytes}")
    if len(data) < 4 + 2 + 2 or data[:4] != MAGIC:
        raise SecAggError("not a secure-aggregation message (bad magic)")
    # layout: MAGIC, version, stage, job, round, sender, body (length-prefixed) | u16 len, signature
    r = _R(data[4:], max_bytes)
    ver, stage = r.u8("version"), r.u8("stage")
    if ver != VERSION:
        raise SecAggError(f"secure-aggregation version {ver} is not supported (this side speaks {VERSION})")
    if stage >= len(Stage.NAMES):
        raise SecAggError(f"unknown stage {stage}")
    job, rnd, sender = r.id("job"), r.u32("round"), r.id("sender")
    body_len = r.u32("body length")
    body = bytes(r._take(body_len, "body"))
    end = 4 + r.pos
    siglen = r.u16("signature length")
    if siglen > P.MAX_SIGNATURE_LEN:
        raise SecAggError(f"signature of {siglen} bytes is over the limit")
    sig = bytes(r._take(siglen, "signature"))
    r.done()
    return Msg(stage, job, rnd, sender, body, data[:end], sig)


def _pack(stage: int, cfg: SecAggConfig, sender: str, body: bytes, signer) -> bytes:
    head = _W().u8(VERSION).u8(stage).id(cfg.job).u32(cfg.round).id(sender).u32(len(body)).bytes()
    signed = MAGIC + head + body
    sig = signer.sign(SIG_DOMAIN + signed) if signer is not None else b""
    return signed + struct.pack("<H", len(sig)) + sig


def _verify(msg: Msg, public_key, who: str) -> None:
    if public_key is None:
        return
    from cryptography.exceptions import InvalidSignature
    if not msg.signature:
        raise SecAggError(f"unsigned {Stage.NAMES[msg.stage]} message from {who}")
    try:
        public_key.verify(msg.signature, SIG_DOMAIN + msg.signed)
    except InvalidSignature:
        raise SecAggError(f"bad signature on the {Stage.NAMES[msg.stage]} message from {who}") from None


def _expect(msg: Msg, cfg: SecAggConfig, stage: int, sender: Optional[str] = None) -> None:
    if msg.stage != stage:
        raise SecAggError(f"expected a {Stage.NAMES[stage]} message, got {Stage.NAMES[msg.stage]}")
    if msg.job != cfg.job or msg.round != cfg.round:
        raise SecAggError(f"{Stage.NAMES[stage]} message is for job {msg.job!r} round {msg.round}, "
                          f"this is job {cfg.job!r} round {cfg.round} (replayed or misrouted)")
    if sender is not None and msg.sender != sender:
        raise SecAggError(f"{Stage.NAMES[stage]} message claims sender {msg.sender!r}, expected {sender!r}")


SERVER_ID = "server"


# ----------------------------------------------------------------------------- device side

class SecAggClient:
    """One device's side of one round. Call the stages in order; each returns bytes to send."""

    def __init__(self, device: str, cfg: SecAggConfig, *, signer=None, server_key=None,
                 peer_keys: Optional[Mapping[str, object]] = None):
        """signer: this device's edgefed.security.signing.Signer; server_key: the job's Ed25519
        public key (roster, forwards and unmask requests must carry its signature); peer_keys:
        {device: Ed25519 public key} to check each peer's own advertisement (None: trust the
        job key's signature on the roster)."""
        self.device = P.check_id(device, "device")
        self.cfg = cfg
        self.signer, self.server_key, self.peer_keys = signer, server_key, peer_keys
        x = _x25519()
        self._c = x.X25519PrivateKey.generate()
        self._s = x.X25519PrivateKey.generate()
        self._b = os.urandom(SHARE_LEN)
        self.c_pk, self.s_pk = _raw_public(self._c), _raw_public(self._s)
        self.roster: Dict[str, Tuple[bytes, bytes]] = {}
        self.nbrs: List[str] = []
        self.sharers: List[str] = []            # neighbours whose shares reached this device
        self._held: Dict[str, Tuple[int, bytes, bytes]] = {}  # owner -> (index, s share, b share)
        self.revealed: Dict[str, str] = {}      # owner -> "b" | "s": what this device gave away

    # stage 0
    def advertise(self) -> bytes:
        return _pack(Stage.ADVERTISE, self.cfg, self.device, _W().blob(self.c_pk).blob(self.s_pk).bytes(),
                     self.signer)

    # stage 1
    def share_keys(self, roster_msg: bytes) -> bytes:
        m = decode_message(roster_msg)
        _expect(m, self.cfg, Stage.ROSTER, SERVER_ID)
        _verify(m, self.server_key, "the server")
        roster, seed = _parse_roster(m.body, self.cfg, self.peer_keys)
        if roster.get(self.device) != (self.c_pk, self.s_pk):
            raise SecAggError(f"the roster does not carry {self.device}'s own keys (substituted or missing)")
        if len(roster) < self.cfg.survivors_needed:
            raise SecAggError(f"roster of {len(roster)} devices is below the threshold {self.cfg.survivors_needed}")
        self.roster = roster
        self.nbrs = neighbours(list(roster), seed, self.cfg.degree)[self.device]
        t = self.cfg.threshold_for(len(self.nbrs))
        if t < 2 or len(self.nbrs) < t:
            raise SecAggError(f"{len(self.nbrs)} neighbours cannot hold a {t}-of-n sharing (>= 3 devices needed)")
        if 2 * t <= len(self.nbrs):
            # each neighbour reveals one of a peer's two secrets, so 2t > neighbours keeps a
            # server that tells halves of them different stories from getting both
            raise SecAggError(f"threshold {t} is not above half of the {len(self.nbrs)} neighbours; "
                              f"use at least {len(self.nbrs) // 2 + 1}")
        s_shares = _split(_raw_private(self._s), t, len(self.nbrs))
        b_shares = _split(self._b, t, len(self.nbrs))
        w = _W().u32(len(self.nbrs))
        for i, v in enumerate(self.nbrs):
            key = _kdf(_agree(_raw_private(self._c), roster[v][0]), b"share", self.cfg)
            plain = _W().id(self.device).id(v).u16(i + 1).blob(s_shares[i]).blob(b_shares[i]).bytes()
            w.id(v).blob(_aead(key).encrypt(_nonce(self.device, v), plain, _aad(self.cfg, self.device, v)))
        return _pack(Stage.SHARES, self.cfg, self.device, w.bytes(), self.signer)

    # stage 2
    def masked_vector(self, forward_msg: bytes, x: np.ndarray) -> np.ndarray:
        """The masked ring vector y (the caller may carry it in any signed message)."""
        m = decode_message(forward_msg)
        _expect(m, self.cfg, Stage.FORWARD, SERVER_ID)
        _verify(m, self.server_key, "the server")
        r = _R(m.body, 1 << 20)
        if r.id("recipient") != self.device:
            raise SecAggError("forwarded shares are addressed to another device")
        held = {}
        for _ in range(r.count("shares")):
            u = r.id("owner")
            ct = r.blob("ciphertext", limit=4096)
            if u not in self.nbrs:
                raise SecAggError(f"a share from {u}, who is not a neighbour of {self.device}")
            if u in held:
                raise SecAggError(f"two shares from {u}")
            key = _kdf(_agree(_raw_private(self._c), self.roster[u][0]), b"share", self.cfg)
            try:
                plain = _aead(key).decrypt(_nonce(u, self.device), ct, _aad(self.cfg, u, self.device))
            except Exception:
                raise SecAggError(f"the share from {u} does not decrypt (tampered or wrong key)") from None
            p = _R(plain, 64)
            if p.id("from") != u or p.id("to") != self.device:
                raise SecAggError(f"the share from {u} names other parties")
            idx = p.u16("index")
            held[u] = (idx, p.blob("s share", exact=KEY_LEN), p.blob("b share", exact=SHARE_LEN))
            p.done()
        r.done()
        if len(held) + 1 < self.cfg.survivors_needed:
            raise SecAggError(f"only {len(held)} neighbours shared keys: below the threshold, no input sent")
        self._held, self.sharers = held, sorted(held)
        y = self.cfg.fixed.encode(np.asarray(x).reshape(-1), self.cfg.bound)
        if y.size != self.cfg.length:
            raise SecAggError(f"input has {y.size} elements, the round agreed on {self.cfg.length}")
        dt = self.cfg.fixed.dtype
        y = y + prg(_kdf(self._b, b"self", self.cfg), y.size, dt)
        for v in self.sharers:
            mask = prg(_kdf(_agree(_raw_private(self._s), self.roster[v][1]), b"pair", self.cfg), y.size, dt)
            y = y + mask if self.device < v else y - mask
        return y

    def masked_input(self, forward_msg: bytes, x: np.ndarray) -> bytes:
        """masked_vector() as a signed secure-aggregation message."""
        y = self.masked_vector(forward_msg, x)
        dt = self.cfg.fixed.dtype
        body = _W().u32(y.size).blob(y.astype(dt.newbyteorder("<")).tobytes()).bytes()
        return _pack(Stage.MASKED, self.cfg, self.device, body, self.signer)

    # stage 3
    def unmask(self, request_msg: bytes) -> bytes:
        m = decode_message(request_msg)
        _expect(m, self.cfg, Stage.UNMASK_REQUEST, SERVER_ID)
        _verify(m, self.server_key, "the server")
        survivors, dropped = _parse_unmask_request(m.body)
        if self.device not in survivors:
            raise SecAggError("the unmask request does not list this device as a survivor")
        if len(survivors) < self.cfg.survivors_needed:
            raise SecAggError(f"{len(survivors)} survivors is below {self.cfg.survivors_needed}: the sum would "
                              "expose too few inputs; refusing to unmask")
        w = _W()
        out = []
        for u in self.sharers:
            kind = "b" if u in survivors else "s" if u in dropped else None
            if kind is None:
                raise SecAggError(f"the unmask request does not say whether {u} survived")
            if self.revealed.get(u, kind) != kind:
                raise SecAggError(f"refusing to reveal both secrets of {u}")
            self.revealed[u] = kind
            idx, s_share, b_share = self._held[u]
            out.append((u, kind, idx, b_share if kind == "b" else s_share))
        w.u32(len(out))
        for u, kind, idx, share in out:
            w.id(u).u8(0 if kind == "b" else 1).u16(idx).blob(share)
        return _pack(Stage.UNMASK, self.cfg, self.device, w.bytes(), self.signer)


def _nonce(sender: str, receiver: str) -> bytes:
    return hashlib.sha256(f"{sender}\0{receiver}".encode()).digest()[:12]  # keys are per pair and round


def _aad(cfg: SecAggConfig, sender: str, receiver: str) -> bytes:
    return f"{cfg.job}\0{cfg.round}\0{sender}\0{receiver}".encode()


def _parse_roster(body: bytes, cfg: SecAggConfig, peer_keys) -> Tuple[Dict[str, Tuple[bytes, bytes]], int]:
    r = _R(body, 1 << 16)
    seed = r.u64("graph seed")
    roster: Dict[str, Tuple[bytes, bytes]] = {}
    for _ in range(r.count("roster")):
        adv = decode_message(r.blob("advertisement", limit=1024))
        _expect(adv, cfg, Stage.ADVERTISE)
        if peer_keys is not None:
            key = peer_keys.get(adv.sender)
            if key is None:
                raise SecAggError(f"roster lists {adv.sender}, who is not in this device's registry")
            _verify(adv, key, adv.sender)
        a = _R(adv.body, 64)
        c_pk, s_pk = a.blob("c key", exact=KEY_LEN), a.blob("s key", exact=KEY_LEN)
        a.done()
        if adv.sender in roster:
            raise SecAggError(f"roster lists {adv.sender} twice")
        if c_pk == s_pk or any(c_pk in ks or s_pk in ks for ks in roster.values()):
            raise SecAggError(f"roster reuses a public key ({adv.sender})")
        roster[adv.sender] = (c_pk, s_pk)
    r.done()
    return roster, seed


def _parse_unmask_request(body: bytes) -> Tuple[set, set]:
    r = _R(body, 1 << 16)
    survivors = [r.id("survivor") for _ in range(r.count("survivors"))]
    dropped = [r.id("dropped") for _ in range(r.count("dropped"))]
    r.done()
    s, d = set(survivors), set(dropped)
    if len(s) != len(survivors) or len(d) != len(dropped):
        raise SecAggError("the unmask request lists a device twice")
    if s & d:
        raise SecAggError(f"the unmask request lists {sorted(s & d)[:3]} as both survived and dropped")
    return s, d


# ----------------------------------------------------------------------------- server side

class SecAggServer:
    """The server's side of one round: collects each stage, answers with the next message, and
    at the end returns the sum of the surviving devices' inputs (decoded) and who they are."""

    def __init__(self, cfg: SecAggConfig, *, signer=None, device_keys: Optional[Mapping[str, object]] = None,
                 graph_seed: Optional[int] = None):
        """signer: the job key (Signer 'server'); device_keys: {device: Ed25519 public key} that
        every device message must be signed with (None: development mode, unsigned)."""
        self.cfg, self.signer, self.device_keys = cfg, signer, device_keys
        self.graph_seed = int.from_bytes(os.urandom(8), "little") if graph_seed is None else graph_seed
        self.adverts: Dict[str, bytes] = {}
        self.keys: Dict[str, Tuple[bytes, bytes]] = {}
        self.nbrs: Dict[str, List[str]] = {}
        self.shares: Dict[str, Dict[str, bytes]] = {}   # sender -> {recipient: ciphertext}
        self.masked: Dict[str, np.ndarray] = {}
        self.unmasks: Dict[str, List[Tuple[str, str, int, bytes]]] = {}
        self.survivors: List[str] = []
        self.dropped: List[str] = []
        self.bytes_in = 0
        self.bytes_out = 0

    def _device_msg(self, data: bytes, stage: int) -> Msg:
        m = decode_message(data, max_bytes=64 + 8 * self.cfg.length + 4 * MAX_COHORT * 160)
        _expect(m, self.cfg, stage)
        if self.device_keys is not None:
            key = self.device_keys.get(m.sender)
            if key is None:
                raise SecAggError(f"{m.sender!r} is not a registered device")
            _verify(m, key, m.sender)
        self.bytes_in += len(data)
        return m

    def _out(self, stage: int, body: bytes) -> bytes:
        return _pack(stage, self.cfg, SERVER_ID, body, self.signer)

    # stage 0 -> roster
    def add_advertise(self, data: bytes) -> None:
        m = self._device_msg(data, Stage.ADVERTISE)
        if self.nbrs:
            raise SecAggError(f"advertisement from {m.sender} after the roster was sent")
        if m.sender in self.adverts:
            raise SecAggError(f"{m.sender} advertised twice")
        a = _R(m.body, 64)
        keys = (a.blob("c key", exact=KEY_LEN), a.blob("s key", exact=KEY_LEN))
        a.done()
        self.adverts[m.sender] = bytes(data)
        self.keys[m.sender] = keys

    def roster(self) -> bytes:
        if len(self.adverts) < self.cfg.survivors_needed:
            raise SecAggError(f"{len(self.adverts)} devices advertised keys; {self.cfg.survivors_needed} are "
                              "needed before the round can go on")
        self.nbrs = neighbours(list(self.adverts), self.graph_seed, self.cfg.degree)
        w = _W().u64(self.graph_seed).u32(len(self.adverts))
        for d in sorted(self.adverts):
            w.blob(self.adverts[d])
        out = self._out(Stage.ROSTER, w.bytes())
        self.bytes_out += len(out) * len(self.adverts)
        return out

    # stage 1 -> forwards
    def add_shares(self, data: bytes) -> None:
        m = self._device_msg(data, Stage.SHARES)
        if m.sender not in self.nbrs:
            raise SecAggError(f"shares from {m.sender}, who is not in this round's roster")
        if self.masked:
            raise SecAggError(f"shares from {m.sender} after masked inputs began")
        r = _R(m.body, 4096)
        cts = {}
        for _ in range(r.count("shares")):
            v, ct = r.id("recipient"), r.blob("ciphertext", limit=4096)
            cts[v] = ct
        r.done()
        if sorted(cts) != self.nbrs[m.sender]:
            raise SecAggError(f"{m.sender} sent shares for {len(cts)} devices, not exactly its "
                              f"{len(self.nbrs[m.sender])} neighbours")
        self.shares[m.sender] = cts

    def forward(self, device: str) -> bytes:
        """The ciphertexts addressed to `device` from every neighbour that sent its shares."""
        senders = [u for u in self.nbrs.get(device, []) if u in self.shares]
        w = _W().id(device).u32(len(senders))
        for u in senders:
            w.id(u).blob(self.shares[u][device])
        out = self._out(Stage.FORWARD, w.bytes())
        self.bytes_out += len(out)
        return out

    # stage 2 -> unmask request
    def add_masked(self, data: bytes) -> None:
        m = self._device_msg(data, Stage.MASKED)
        r = _R(m.body, 8 * self.cfg.length + 16)
        n = r.u32("length")
        dt = self.cfg.fixed.dtype
        raw = r.blob("vector", exact=n * dt.itemsize)
        r.done()
        if n != self.cfg.length:
            raise SecAggError(f"masked input of {n} elements; the round agreed on {self.cfg.length}")
        self.add_masked_vector(m.sender, np.frombuffer(raw, dtype=dt.newbyteorder("<")).astype(dt))

    def add_masked_vector(self, device: str, y: np.ndarray) -> None:
        """A masked vector that arrived inside another authenticated message (the caller checked
        that `device` sent it)."""
        if device not in self.shares:
            raise SecAggError(f"masked input from {device}, who sent no shares")
        if self.survivors:
            raise SecAggError(f"masked input from {device} after the unmask request (too late)")
        if device in self.masked:
            raise SecAggError(f"{device} sent two masked inputs")
        y = np.asarray(y)
        if y.dtype != self.cfg.fixed.dtype or y.shape != (self.cfg.length,):
            raise SecAggError(f"masked input from {device} is {y.dtype}{list(y.shape)}; the round agreed on "
                              f"{self.cfg.fixed.dtype}[{self.cfg.length}]")
        self.masked[device] = y.copy()

    def unmask_request(self) -> bytes:
        if len(self.masked) < self.cfg.survivors_needed:
            raise SecAggError(f"{len(self.masked)} masked inputs arrived; at least {self.cfg.survivors_needed} "
                              "are needed to unmask (the round fails rather than expose fewer)")
        self.survivors = sorted(self.masked)
        self.dropped = sorted(set(self.shares) - set(self.masked))
        w = _W().u32(len(self.survivors))
        for d in self.survivors:
            w.id(d)
        w.u32(len(self.dropped))
        for d in self.dropped:
            w.id(d)
        out = self._out(Stage.UNMASK_REQUEST, w.bytes())
        self.bytes_out += len(out) * len(self.survivors)
        return out

    # stage 3 -> result
    def add_unmask(self, data: bytes) -> None:
        m = self._device_msg(data, Stage.UNMASK)
        if m.sender not in self.masked:
            raise SecAggError(f"unmask shares from {m.sender}, who is not a survivor")
        if m.sender in self.unmasks:
            raise SecAggError(f"{m.sender} sent unmask shares twice")
        r = _R(m.body, 64)
        got = []
        for _ in range(r.count("shares")):
            owner, kind, idx = r.id("owner"), r.u8("kind"), r.u16("index")
            if kind not in (0, 1):
                raise SecAggError(f"unknown share kind {kind}")
            share = r.blob("share", exact=SHARE_LEN if kind == 0 else KEY_LEN)
            want = "b" if owner in self.masked else "s"
            if (kind == 0) != (want == "b") or m.sender not in self.nbrs.get(owner, []):
                raise SecAggError(f"{m.sender} sent an unexpected share of {owner}")
            if idx != self.nbrs[owner].index(m.sender) + 1:
                raise SecAggError(f"{m.sender} sent share index {idx} for {owner}; its index is "
                                  f"{self.nbrs[owner].index(m.sender) + 1}")
            got.append((owner, "b" if kind == 0 else "s", idx, share))
        r.done()
        self.unmasks[m.sender] = got

    def ready(self) -> bool:
        """Enough unmask shares to reconstruct every secret the sum needs."""
        try:
            self._needed_shares()
            return True
        except SecAggError:
            return False

    def _needed_shares(self) -> Dict[Tuple[str, str], List[Tuple[int, bytes]]]:
        have: Dict[Tuple[str, str], List[Tuple[int, bytes]]] = {}
        for _sender, shares in sorted(self.unmasks.items()):
            for owner, kind, idx, share in shares:
                have.setdefault((owner, kind), []).append((idx, share))
        need = [(u, "b") for u in self.survivors] + [(u, "s") for u in self.dropped]
        t = {u: self.cfg.threshold_for(len(self.nbrs[u])) for u, _ in need}
        short = [f"{u}:{k}" for u, k in need if len(have.get((u, k), [])) < t[u]]
        if short:
            raise SecAggError(f"too few unmask shares for {len(short)} secret(s) (e.g. {short[:3]}); "
                              f"a majority of each device's neighbours is needed")
        return {(u, k): have[(u, k)][:t[u]] for u, k in need}

    def result(self) -> Tuple[np.ndarray, List[str]]:
        """(sum of the survivors' inputs as float64, survivors)."""
        shares = self._needed_shares()
        dt = self.cfg.fixed.dtype
        total = np.zeros(self.cfg.length, dt)
        for d in self.survivors:
            total += self.masked[d]
        for u in self.survivors:
            b = _combine(shares[(u, "b")], SHARE_LEN)
            total -= prg(_kdf(b, b"self", self.cfg), self.cfg.length, dt)
        for u in self.dropped:
            s_raw = _combine(shares[(u, "s")], KEY_LEN)
            if _raw_public(_x25519().X25519PrivateKey.from_private_bytes(s_raw)) != self.keys[u][1]:
                raise SecAggError(f"the reconstructed key of {u} does not match its advertised key "
                                  "(a device sent a bad share)")
            for v in self.nbrs[u]:
                if v not in self.masked:
                    continue
                # v added +mask(v,u) if v < u, else -mask: take it back out
                mask = prg(_kdf(_agree(s_raw, self.keys[v][1]), b"pair", self.cfg), self.cfg.length, dt)
                total = total - mask if v < u else total + mask
        return self.cfg.fixed.decode(total), list(self.survivors)


# ----------------------------------------------------------------------------- in-memory round

def run_in_memory(cfg: SecAggConfig, inputs: Mapping[str, np.ndarray], *,
                  drop: Optional[Mapping[int, Iterable[str]]] = None, signers=None, server_signer=None,
                  graph_seed: int = 0) -> Tuple[np.ndarray, List[str], dict]:
    """One full round with every message encoded and decoded as on the wire, devices dropping
    out before the given stages (drop={Stage.SHARES: [...], Stage.MASKED: [...], Stage.UNMASK:
    [...]}). Returns (sum, survivors, bytes per stage)."""
    drop = {k: set(v) for k, v in (drop or {}).items()}
    signers = signers or {}
    dev_keys = {d: s.public_key() for d, s in signers.items()} if signers else None
    server_key = server_signer.public_key() if server_signer is not None else None
    srv = SecAggServer(cfg, signer=server_signer, device_keys=dev_keys, graph_seed=graph_seed)
    clients = {d: SecAggClient(d, cfg, signer=signers.get(d), server_key=server_key,
                               peer_keys=dev_keys) for d in sorted(inputs)}
    nbytes = {name: 0 for name in Stage.NAMES}

    def up(stage: int, data: bytes, add: Callable[[bytes], None]) -> None:
        nbytes[Stage.NAMES[stage]] += len(data)
        add(data)

    for d, c in clients.items():
        up(Stage.ADVERTISE, c.advertise(), srv.add_advertise)
    roster = srv.roster()
    alive = [d for d in clients if d not in drop.get(Stage.SHARES, ())]
    nbytes["roster"] += len(roster) * len(clients)
    for d in alive:
        up(Stage.SHARES, clients[d].share_keys(roster), srv.add_shares)
    alive = [d for d in alive if d not in drop.get(Stage.MASKED, ())]
    for d in alive:
        fwd = srv.forward(d)
        nbytes["forward"] += len(fwd)
        up(Stage.MASKED, clients[d].masked_input(fwd, inputs[d]), srv.add_masked)
    req = srv.unmask_request()
    nbytes["unmask-request"] += len(req) * len(srv.survivors)
    for d in srv.survivors:
        if d in drop.get(Stage.UNMASK, ()):
            continue
        up(Stage.UNMASK, clients[d].unmask(req), srv.add_unmask)
    total, survivors = srv.result()
    return total, survivors, nbytes


# ----------------------------------------------------------------------------- job settings

UPDATE_TENSOR = "secagg"  # the one tensor of a secure round's Update: the masked vector
PLAN_KEYS = ("secagg_len", "secagg_bound", "secagg_bits", "secagg_frac", "secagg_threshold",
             "secagg_degree", "secagg_attempt")
MAX_ATTEMPTS = 256


def round_tag(rnd: int, attempt: int) -> int:
    """The id one secure-aggregation instance runs under: a failed attempt is redone with fresh
    keys under a new tag, so no message of the old one can be replayed into it."""
    if not 0 <= attempt < MAX_ATTEMPTS:
        raise SecAggError(f"attempt {attempt} out of range 0..{MAX_ATTEMPTS - 1}")
    return int(rnd) * MAX_ATTEMPTS + int(attempt)


def plan_params(length: int, bound: float, n_max: int, threshold: int, degree: int, attempt: int) -> dict:
    """The round-plan params that tell devices how this round's secure aggregation runs. The
    ring is 32 bits when it leaves 24 fraction bits for the sum of n_max inputs, else 64 (the
    bounds are worst cases, so typical values sit far below them: precision matters)."""
    try:
        fx = FixedPoint.for_sum(n_max, bound, 32)
        if fx.frac_bits < 24:
            raise SecAggError("coarse")
    except SecAggError:
        fx = FixedPoint.for_sum(n_max, bound, 64)
    return {"secagg_len": int(length), "secagg_bound": float(bound), "secagg_bits": fx.bits,
            "secagg_frac": fx.frac_bits, "secagg_threshold": int(threshold), "secagg_degree": int(degree),
            "secagg_attempt": int(attempt)}


def config_from_plan(job: str, rnd: int, params: Mapping) -> Optional[SecAggConfig]:
    """The SecAggConfig a plan's params describe; None when the round is not secure."""
    if not params.get("secagg_len"):
        return None
    try:
        return SecAggConfig(job=job, round=round_tag(rnd, int(params.get("secagg_attempt", 0))),
                            length=int(params["secagg_len"]), threshold=int(params["secagg_threshold"]),
                            degree=int(params.get("secagg_degree", 0)),
                            fixed=FixedPoint(int(params["secagg_bits"]), int(params["secagg_frac"])),
                            bound=float(params["secagg_bound"]))
    except (KeyError, TypeError, ValueError) as e:
        raise SecAggError(f"the plan's secure-aggregation settings are incomplete or invalid: {e}") from None


def to_wire(y: np.ndarray) -> np.ndarray:
    """A ring vector as uint32 words (little-endian halves for a 64-bit ring)."""
    return np.ascontiguousarray(y).astype(y.dtype.newbyteorder("<")).view("<u4").astype(np.uint32)


def from_wire(words: np.ndarray, cfg: SecAggConfig) -> np.ndarray:
    w = np.ascontiguousarray(np.asarray(words, dtype=np.uint32).reshape(-1))
    dt = cfg.fixed.dtype
    if w.size * 4 != cfg.length * dt.itemsize:
        raise SecAggError(f"masked vector of {w.size} words; the round agreed on {cfg.length} x {dt.itemsize} bytes")
    return w.astype("<u4").view(dt.newbyteorder("<")).astype(dt)
