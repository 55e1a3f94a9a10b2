"""Pure-numpy reference of EdgeFed's counter-based perturbation RNG.

This module *is* the specification (docs/rng.md explains it in prose); the C++
kernels in ``csrc/`` must reproduce it bit for bit.

Stream: the 32-bit word for element ``i`` of seed ``s`` on ``stream`` is word
``i % 4`` of Philox4x32-10 with key ``(s & 0xffffffff, s >> 32)`` and counter
``((i//4) & 0xffffffff, (i//4) >> 32, stream, 0)``.

Rademacher: -1 where the word's top bit is set, else +1.

Normal: Box-Muller on the block's word pairs (w0, w1) -> elements 4b, 4b+1 and
(w2, w3) -> 4b+2, 4b+3, evaluated with float32 additions, multiplications,
divisions and square roots only (each IEEE-754 correctly rounded, so every
platform gets the same bits) and our own polynomial log / sin / cos.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "philox4x32_10", "words", "rademacher", "normal", "generate",
    "perturb", "zo_coefficient", "replay", "DISTRIBUTIONS",
]

DISTRIBUTIONS = ("normal", "rademacher")

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_LO = np.uint64(0xFFFFFFFF)
_CHUNK = 1 << 20  # elements per reference chunk: bounds temporary memory


def _f32(bits: int) -> np.float32:
    """A float32 constant from its bit pattern (no decimal double-rounding)."""
    return np.array(bits, dtype=np.uint32).view(np.float32)[()]


# Constants, by bit pattern; csrc/normal.hpp holds the same values as hex floats.
LN2 = _f32(0x3F317218)
INV3, INV5, INV7, INV9 = _f32(0x3EAAAAAB), _f32(0x3E4CCCCD), _f32(0x3E124925), _f32(0x3DE38E39)
HALF_PI = _f32(0x3FC90FDB)
S3, S5, S7, S9 = _f32(0xBE2AAAAB), _f32(0x3C088889), _f32(0xB9500D01), _f32(0x3638EF1D)
C2, C4, C6, C8, C10 = (_f32(0xBF000000), _f32(0x3D2AAAAB), _f32(0xBAB60B61),
                       _f32(0x37D00D01), _f32(0xB493F27E))
TWO_M24 = _f32(0x33800000)  # 2**-24
TWO_M22 = _f32(0x34800000)  # 2**-22
SQRT2_BITS = np.uint32(0x3FB504F3)
ONE, TWO, HALF, MINUS_TWO = (np.float32(1.0), np.float32(2.0), np.float32(0.5),
                             np.float32(-2.0))


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Random123) on uint32 arrays; returns four uint32 arrays."""
    c = [np.asarray(x, dtype=np.uint32).astype(np.uint64) for x in (c0, c1, c2, c3)]
    k0 = np.asarray(k0, dtype=np.uint32).astype(np.uint64)
    k1 = np.asarray(k1, dtype=np.uint32).astype(np.uint64)
    for r in range(10):
        if r:  # key schedule: Weyl increments mod 2**32
            k0 = (k0 + _W0) & _LO
            k1 = (k1 + _W1) & _LO
        p0 = _M0 * c[0]
        p1 = _M1 * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & _LO,
             (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & _LO]
    return tuple(x.astype(np.uint32) for x in c)


def _check_seed(seed: int) -> int:
    seed = int(seed)
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed


def _blocks(seed: int, stream: int, b0: int, nb: int):
    """Philox words of blocks b0 .. b0+nb-1 as four uint32 arrays."""
    b = np.arange(b0, b0 + nb, dtype=np.uint64)
    seed = _check_seed(seed)
    return philox4x32_10(b & _LO, b >> np.uint64(32),
                         np.full(nb, stream, np.uint32), np.zeros(nb, np.uint32),
                         np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32))


def words(seed: int, n: int, stream: int = 0, offset: int = 0) -> np.ndarray:
    """The raw 32-bit words of elements offset .. offset+n-1."""
    b0, b1 = offset // 4, (offset + n + 3) // 4
    w = np.stack(_blocks(seed, stream, b0, b1 - b0), axis=1).reshape(-1)
    s = offset - 4 * b0
    return w[s:s + n]


def _log(u: np.ndarray) -> np.ndarray:
    """Natural log of float32 u in [2**-24, 1], float32 ops only."""
    bits = u.view(np.uint32)
    e = (bits >> np.uint32(23)).astype(np.int32) - 127
    mbits = (bits & np.uint32(0x7FFFFF)) | np.uint32(0x3F800000)
    big = mbits > SQRT2_BITS
    m = mbits.view(np.float32)
    m = np.where(big, m * HALF, m)
    e = np.where(big, e + 1, e)
    f = m - ONE
    s = f / (m + ONE)
    s2 = s * s
    p = INV9 * s2
    p = p + INV7
    p = p * s2
    p = p + INV5
    p = p * s2
    p = p + INV3
    p = p * s2
    t = s + s
    lm = t * p
    lm = t + lm
    el = e.astype(np.float32) * LN2
    return el + lm


def _sincos(phi: np.ndarray):
    """sin and cos of float32 phi in [-pi/4, pi/4), float32 ops only."""
    p2 = phi * phi
    a = S9 * p2
    a = a + S7
    a = a * p2
    a = a + S5
    a = a * p2
    a = a + S3
    a = a * p2
    a = a * phi
    sin = phi + a
    b = C10 * p2
    b = b + C8
    b = b * p2
    b = b + C6
    b = b * p2
    b = b + C4
    b = b * p2
    b = b + C2
    b = b * p2
    cos = ONE + b
    return sin, cos


def _box_muller(wa: np.ndarray, wb: np.ndarray):
    """Two standard normals per word pair."""
    u = ((wa >> np.uint32(8)) + np.uint32(1)).astype(np.float32) * TWO_M24
    r = np.sqrt(_log(u) * MINUS_TWO)
    q = wb >> np.uint32(30)
    x = ((wb >> np.uint32(8)) & np.uint32(0x3FFFFF)).astype(np.float32) * TWO_M22
    phi = (x - HALF) * HALF_PI
    s, c = _sincos(phi)
    # theta = q*pi/2 + phi: rotate (cos, sin) by quadrant; negation is exact.
    cos_t = np.select([q == 0, q == 1, q == 2], [c, -s, -c], s)
    sin_t = np.select([q == 0, q == 1, q == 2], [s, c, -s], -c)
    return r * cos_t, r * sin_t


def _normal_chunk(seed: int, stream: int, offset: int, n: int) -> np.ndarray:
    b0, b1 = offset // 4, (offset + n + 3) // 4
    w0, w1, w2, w3 = _blocks(seed, stream, b0, b1 - b0)
    z = np.empty((b1 - b0, 4), dtype=np.float32)
    z[:, 0], z[:, 1] = _box_muller(w0, w1)
    z[:, 2], z[:, 3] = _box_muller(w2, w3)
    s = offset - 4 * b0
    return z.reshape(-1)[s:s + n]


def _rademacher_chunk(seed: int, stream: int, offset: int, n: int) -> np.ndarray:
    w = words(seed, n, stream, offset)
    return np.where(w >> np.uint32(31), np.float32(-1.0), np.float32(1.0)).astype(np.float32)


def generate(seed: int, n: int, dist: str = "normal", stream: int = 0, offset: int = 0) -> np.ndarray:
    """z(seed)[offset : offset+n] as float32."""
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {dist!r}; use one of {DISTRIBUTIONS}")
    chunk = _normal_chunk if dist == "normal" else _rademacher_chunk
    out = np.empty(n, dtype=np.float32)
    for a in range(0, n, _CHUNK):
        m = min(_CHUNK, n - a)
        out[a:a + m] = chunk(seed, stream, offset + a, m)
    return out


def normal(seed: int, n: int, stream: int = 0, offset: int = 0) -> np.ndarray:
    return generate(seed, n, "normal", stream, offset)


def rademacher(seed: int, n: int, stream: int = 0, offset: int = 0) -> np.ndarray:
    return generate(seed, n, "rademacher", stream, offset)


def _apply(buffers, seed: int, coeff: np.float32, dist: str, offsets=None) -> None:
    """theta += coeff * z(seed), element-wise in float32, across buffers in order; buffer k holds
    elements [offsets[k], offsets[k] + size) of the logical vector (default: one after another)."""
    off = 0
    for k, buf in enumerate(buffers):
        if offsets is not None:
            off = int(offsets[k])
        flat = buf.reshape(-1)
        for a in range(0, flat.size, _CHUNK):
            m = min(_CHUNK, flat.size - a)
            z = generate(seed, m, dist, 0, off + a)
            flat[a:a + m] += coeff * z
        off += flat.size


def perturb(buffers, seed: int, scale: float, dist: str = "normal", offsets=None) -> None:
    """Reference of kernels.perturb: theta += float32(scale) * z."""
    _apply(buffers, seed, np.float32(scale), dist, offsets)


def zo_coefficient(eps: float, lr: float, g: float) -> np.float32:
    """The fused restore+update coefficient, computed in float64 then rounded once."""
    return np.float32(float(eps) - float(lr) * float(g))


def replay(buffers, seeds, coeffs, dist: str = "normal", offsets=None) -> None:
    """Reference of kernels.replay: the same bits as perturbing seed by seed in order."""
    for s, c in zip(seeds, np.asarray(coeffs, dtype=np.float32)):
        _apply(buffers, int(s), c, dist, offsets)
