"""Exact, order-independent sums of weighted float64 values (a vectorised "superaccumulator").

Floating-point addition is not associative: a sample-weighted mean summed in arrival order, or
split between aggregation workers and merged, comes out with other last bits. `ExactSum` keeps
every coordinate's sum sum_i w_i x_i (x_i any finite float64, w_i an integer in [0, 2^32)) as an
exact fixed-point integer: base-2^32 limbs in int64, limb q weighing 2^(32 q - 1074), so that
every finite float64 (2^-1074 .. 2^1024) times a u32 weight lands on whole limbs. Integer
addition is associative, so the sum is the same for any order and any split into partial sums
(`merge`), and `to_float()` reads it out the same way every time: the limbs are carried to
their canonical digits first, then added in float64 from the most significant down. The
result is within a few ulps of the exact sum (usually correctly rounded) and is a pure function
of the exact value: bit-identical for every permutation and every partition of the terms.

How a term goes in (vectorised over the elements of one add): x = m 2^e with m < 2^53; m is
split into two 27-bit halves, each times w (< 2^59, exact in uint64), each of those into two
30-bit chunks, and each chunk shifted to its place in a 64-bit word that straddles two limbs:
eight integer contributions < 2^32 per element, summed with one np.bincount (exact in float64
while a call adds fewer than 2^18 elements to a limb; bigger calls are split). Limbs carry
nothing until `normalize()`; a bound on their magnitude triggers it long before int64 overflows.

Only the limbs that some term touched are stored (a window [base, base + width) of the 67
possible ones, plus headroom for carries), so a vector of values of similar magnitude costs
about 6-8 int64 per coordinate. On the wire (`to_tensors` / `from_tensors`) a sum is three
tensors of u32: the coordinates with a non-zero sum, their limbs (int64 as little-endian u32
pairs) and the window's base.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

__all__ = ["ExactSum", "MAX_WEIGHT"]

E0 = -1074                 # limb q weighs 2^(32 q + E0)
_LIMBS = 70                # absolute limbs: values up to 2^1024 x 2^32, plus carry headroom
_HEAD = 2                  # spare limbs above the highest touched one (carries of many terms)
MAX_WEIGHT = (1 << 32) - 1
_CALL_ELEMS = 1 << 18      # per bincount call: 8 x 2^32 x 2^18 < 2^53 (exact in float64)
_BOUND_LIMIT = 1 << 61     # normalise before any limb could reach this magnitude
_M32 = np.uint64(0xFFFFFFFF)


def _decompose(x: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(limb index, signed contribution) pairs, 8 per element, whose sum over limbs is w * x."""
    bits = x.view(np.uint64)
    neg = (bits >> np.uint64(63)).astype(bool)
    E = ((bits >> np.uint64(52)) & np.uint64(0x7FF)).astype(np.int64)
    F = bits & np.uint64((1 << 52) - 1)
    m = F | ((E > 0).astype(np.uint64) << np.uint64(52))
    p = np.maximum(E - 1, 0)                       # |x| = m 2^(p + E0)
    wq = np.uint64(w)
    halves = ((m & np.uint64((1 << 27) - 1)) * wq, (m >> np.uint64(27)) * wq)  # each < 2^59
    idx_parts, val_parts = [], []
    for h, off in zip(halves, (0, 27)):
        for c, off2 in ((h & np.uint64((1 << 30) - 1), 0), (h >> np.uint64(30), 30)):  # < 2^30
            o = p + (off + off2)
            q = o >> 5
            v = c << (o & 31).astype(np.uint64)    # < 2^61
            idx_parts += [q, q + 1]
            val_parts += [(v & _M32).astype(np.int64), (v >> np.uint64(32)).astype(np.int64)]
    vals = np.concatenate(val_parts)
    sign = np.where(np.tile(neg, 8), -1, 1)
    return np.concatenate(idx_parts), vals * sign


class ExactSum:
    """`size` exact sums (one per coordinate) of weighted float64 terms; see the module doc."""

    def __init__(self, size: int):
        self.size = int(size)
        self.base = 0
        self.limbs = np.zeros((self.size, 0), np.int64)   # window [base, base + width)
        self._bound = 0                                     # max |limb| so far (upper bound)

    # ------------------------------------------------------------------ window
    @property
    def width(self) -> int:
        return self.limbs.shape[1]

    def _ensure(self, lo: int, hi: int) -> None:
        """Grow the window to hold absolute limbs [lo, hi) (+ carry headroom on top)."""
        hi = min(_LIMBS, hi + _HEAD)
        lo = max(0, lo)
        if self.width == 0:
            self.base, self.limbs = lo, np.zeros((self.size, hi - lo), np.int64)
            return
        cur_lo, cur_hi = self.base, self.base + self.width
        if lo >= cur_lo and hi <= cur_hi:
            return
        nlo, nhi = min(lo, cur_lo), max(hi, cur_hi)
        out = np.zeros((self.size, nhi - nlo), np.int64)
        out[:, cur_lo - nlo:cur_hi - nlo] = self.limbs
        self.base, self.limbs = nlo, out

    # ------------------------------------------------------------------ adding
    def add(self, values: np.ndarray, weight: int = 1, index: Optional[np.ndarray] = None) -> None:
        """Add weight x values[i] to coordinate index[i] (or i, with index None: a dense vector).
        values: finite floats (float32 is widened exactly); weight: an integer in [0, 2^32)."""
        w = int(weight)
        if not 0 <= w <= MAX_WEIGHT:
            raise ValueError(f"weight {weight} must be an integer in [0, 2^32)")
        x = np.ascontiguousarray(values, dtype=np.float64).reshape(-1)
        if index is None:
            if x.size != self.size:
                raise ValueError(f"{x.size} values for a sum of {self.size} coordinates")
            rows = None
        else:
            rows = np.asarray(index, np.int64).reshape(-1)
            if rows.size != x.size:
                raise ValueError(f"{rows.size} indices but {x.size} values")
            if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= self.size):
                raise ValueError(f"index out of range for a sum of {self.size} coordinates")
        if w == 0 or x.size == 0:
            return
        if not np.all(np.isfinite(x)):
            raise ValueError("ExactSum.add: values must be finite")
        for s in range(0, x.size, _CALL_ELEMS):
            xs = x[s:s + _CALL_ELEMS]
            rs = None if rows is None else rows[s:s + _CALL_ELEMS]
            self._add_chunk(xs, w, rs)

    def _add_chunk(self, x: np.ndarray, w: int, rows: Optional[np.ndarray]) -> None:
        q, v = _decompose(x, w)
        nz = v != 0
        if not nz.any():
            return
        q, v = q[nz], v[nz]
        r = (np.arange(x.size, dtype=np.int64) if rows is None else rows)
        r = np.tile(r, 8)[nz]
        # at most 8 contributions < 2^32 per element to a limb; a coordinate listed d times
        # gets <= 8d (d <= the elements of the call)
        step = 8 * (1 if rows is None else x.size) * (1 << 32)
        if self._bound + step > _BOUND_LIMIT:
            self.normalize()
        self._ensure(int(q.min()), int(q.max()) + 1)
        flat = r * self.width + (q - self.base)
        sums = np.bincount(flat, weights=v.astype(np.float64), minlength=self.size * self.width)
        self.limbs += sums.astype(np.int64).reshape(self.size, self.width)
        self._bound += step

    def merge(self, other: "ExactSum", negate: bool = False) -> None:
        """self += other (or -= with negate): exact, so merging partial sums in any grouping gives
        the sum of all their terms."""
        if other.size != self.size:
            raise ValueError(f"cannot merge a sum of {other.size} coordinates into one of {self.size}")
        if other.width == 0:
            return
        if self._bound + other._bound > _BOUND_LIMIT:
            self.normalize()
        o = other if other._bound <= _BOUND_LIMIT // 2 else other.copy().normalize()
        self._ensure(o.base, o.base + o.width)
        a = o.base - self.base
        if negate:
            self.limbs[:, a:a + o.width] -= o.limbs
        else:
            self.limbs[:, a:a + o.width] += o.limbs
        self._bound += o._bound

    def copy(self) -> "ExactSum":
        c = ExactSum(self.size)
        c.base, c.limbs, c._bound = self.base, self.limbs.copy(), self._bound
        return c

    # ------------------------------------------------------------------ reading
    def normalize(self) -> "ExactSum":
        """Carry every limb into [0, 2^32) but the top one (signed): the canonical digits."""
        L = self.limbs
        for j in range(self.width - 1):
            c = L[:, j] >> 32           # floor division by 2^32 (arithmetic shift)
            L[:, j] -= c << 32
            L[:, j + 1] += c
        top = int(np.abs(L[:, -1]).max()) if self.width else 0
        self._bound = max(1 << 32, top)
        return self

    def to_float(self) -> np.ndarray:
        """The sums as float64 (a pure function of the exact values: same bits for any order or
        split of the terms)."""
        out = np.zeros(self.size, np.float64)
        if self.width == 0:
            return out
        L = self.copy().normalize().limbs
        neg = L[:, -1] < 0
        if neg.any():  # magnitudes: negate and carry again (top limb then >= 0)
            L[neg] = -L[neg]
            for j in range(self.width - 1):
                c = L[:, j] >> 32
                L[:, j] -= c << 32
                L[:, j + 1] += c
        for j in range(self.width - 1, -1, -1):  # most significant first
            out += np.ldexp(L[:, j].astype(np.float64), 32 * (self.base + j) + E0)
        return np.where(neg, -out, out)

    def nonzero_rows(self) -> np.ndarray:
        return np.flatnonzero(np.any(self.limbs != 0, axis=1)) if self.width else np.zeros(0, np.int64)

    # ------------------------------------------------------------------ wire
    def to_tensors(self, name: str) -> list:
        """[name.rows u32[n], name.limbs u32[n, 2 width], name.base u32[1]] (normalised limbs of
        the coordinates with a non-zero sum; int64 as little-endian u32 pairs)."""
        from .protocol import Tensor
        self.normalize()
        rows = self.nonzero_rows()
        limbs = np.ascontiguousarray(self.limbs[rows], dtype="<i8").view("<u4").reshape(rows.size, 2 * self.width)
        return [Tensor(f"{name}.rows", rows.astype(np.uint32)),
                Tensor(f"{name}.limbs", limbs),
                Tensor(f"{name}.base", np.array([self.base], np.uint32))]

    @classmethod
    def from_tensors(cls, size: int, tensors: Sequence, name: str) -> "ExactSum":
        """The inverse of to_tensors, checked (raises ValueError on anything malformed)."""
        by = {t.name: t for t in tensors}
        try:
            rows_t, limbs_t, base_t = by[f"{name}.rows"], by[f"{name}.limbs"], by[f"{name}.base"]
        except KeyError as e:
            raise ValueError(f"exact sum {name!r}: tensor {e.args[0]!r} missing") from None
        if any(t.dtype != "u32" for t in (rows_t, limbs_t, base_t)):
            raise ValueError(f"exact sum {name!r}: tensors must be u32")
        rows = rows_t.data.reshape(-1).astype(np.int64)
        base = base_t.data.reshape(-1)
        if base.size != 1:
            raise ValueError(f"exact sum {name!r}: base must hold one value")
        limbs = limbs_t.data
        if limbs.ndim != 2 or limbs.shape[0] != rows.size or limbs.shape[1] % 2:
            raise ValueError(f"exact sum {name!r}: limbs of shape {limbs.shape} for {rows.size} rows")
        width = limbs.shape[1] // 2
        b = int(base[0])
        if b + width > _LIMBS:
            raise ValueError(f"exact sum {name!r}: limbs [{b}, {b + width}) beyond the {_LIMBS} possible")
        if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= size or np.any(np.diff(rows) <= 0)):
            raise ValueError(f"exact sum {name!r}: rows must increase within [0, {size})")
        vals = np.ascontiguousarray(limbs, dtype="<u4").view("<i8").reshape(rows.size, width)
        if vals.size and int(np.abs(vals).max()) > _BOUND_LIMIT // 4:
            raise ValueError(f"exact sum {name!r}: a limb is out of range (not normalised)")
        s = cls(size)
        if width:
            s.base = b
            s.limbs = np.zeros((size, width), np.int64)
            s.limbs[rows] = vals
            s._bound = int(np.abs(vals).max()) if vals.size else 0
        return s
