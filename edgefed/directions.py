"""Direction spaces: which vector d(seed) a seed stands for in a zeroth-order step.

Every replica (device, server, simulation) regenerates d from the seed, so d is a fixed function
of the seed, the job's settings and the artifact (its tensor layout and initial trainables),
never of the current trainables. That keeps every update linear in its coefficients: replaying
deltas, the cumulative-coefficient full state and server-side momentum over seeds stay exact.

Job params (all optional; combinable):
- mask_frac F (0 < F <= 1, default 1): perturb only a fixed fraction F of the trainables, in
  blocks of mask_block elements (default 64; blocks never straddle two tensors), chosen by
  mask_by: "magnitude" (default; the blocks whose largest |theta_0| is smallest: Sparse-MeZO's
  small weights, fixed at the artifact's initial trainables) or "random" (drawn with Philox from
  mask_seed, default the seed pool id). Ties and draws are integer-exact on every platform.
- mask_tensors REGEX: perturb only the trainable tensors whose name matches (e.g. "lora_B").
- lowrank R (default 0: off): a 2-D tensor W (m x n, min(m, n) > R) moves along
  U V^T / sqrt(R) with U (m x R) and V (n x R) drawn from the seed on streams 2 and 3 at W's
  logical offset (LOZO / SubZero-style low-rank directions, the same variance per element as
  z); other tensors move along z. The product is a float64 sum of outer products in a fixed
  order, rounded once, so every machine computes the same bits. Not with a block mask.

Outside the selected part d is exactly 0: those trainables keep their bits. Device side: no torch.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from . import kernels, rng

__all__ = ["DirectionSpec", "DirectionSpace", "WholeVector", "WHOLE", "direction_space", "DIRECTION_PARAMS"]

DIRECTION_PARAMS = ("mask_frac", "mask_by", "mask_block", "mask_seed", "mask_tensors", "lowrank")
MASK_BY = ("magnitude", "random")
_STREAM_MASK, _STREAM_U, _STREAM_V = 4, 2, 3
_U64 = (1 << 64) - 1


@dataclass(frozen=True)
class DirectionSpec:
    mask_frac: float = 1.0
    mask_by: str = "magnitude"
    mask_block: int = 64
    mask_seed: int = 0
    mask_tensors: str = ""
    lowrank: int = 0

    @property
    def dense(self) -> bool:
        return self.mask_frac >= 1.0 and not self.mask_tensors and self.lowrank == 0

    @classmethod
    def from_params(cls, params: Mapping) -> "DirectionSpec":
        """The job's (or a plan's) direction settings, checked; errors say what to set."""
        def num(key, default, kind):
            v = params.get(key, default)
            if kind is int and isinstance(v, float) and not v.is_integer():
                raise ValueError(f"job param {key}={v!r} must be an integer")
            try:
                return kind(v)
            except (TypeError, ValueError, OverflowError):
                raise ValueError(f"job param {key}={v!r} must be {'an integer' if kind is int else 'a number'}") from None
        frac = num("mask_frac", 1.0, float)
        if not (math.isfinite(frac) and 0.0 < frac <= 1.0):
            raise ValueError(f"mask_frac={frac} must be in (0, 1]: the fraction of trainables perturbed")
        by = str(params.get("mask_by", "magnitude"))
        if by not in MASK_BY:
            raise ValueError(f"mask_by={by!r}: use one of {', '.join(MASK_BY)}")
        block = num("mask_block", 64, int)
        if not 1 <= block <= 1 << 20:
            raise ValueError(f"mask_block={block} must be in [1, 2**20] elements")
        seed_default = params.get("seed_pool_id", 0)
        mseed = num("mask_seed", seed_default, int) & _U64
        pattern = str(params.get("mask_tensors", "") or "")
        if pattern:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"mask_tensors={pattern!r} is not a regular expression: {e}") from None
        rank = num("lowrank", 0, int)
        if not 0 <= rank <= 1024:
            raise ValueError(f"lowrank={rank} must be in [0, 1024] (0: off)")
        if rank and frac < 1.0:
            raise ValueError("lowrank directions and a block mask (mask_frac < 1) do not combine; use "
                             "mask_tensors to choose tensors for lowrank")
        return cls(frac, by, block, mseed, pattern, rank)

    def plan_params(self) -> dict:
        """What a round plan carries so that devices build the same space (only non-defaults)."""
        out: dict = {}
        if self.mask_frac < 1.0:
            out.update(mask_frac=self.mask_frac, mask_by=self.mask_by, mask_block=self.mask_block,
                       mask_seed=self.mask_seed - (1 << 64) if self.mask_seed >= 1 << 63 else self.mask_seed)
        if self.mask_tensors:
            out["mask_tensors"] = self.mask_tensors
        if self.lowrank:
            out["lowrank"] = self.lowrank
        return out


@dataclass(frozen=True)
class _Piece:
    buf: int       # index into the model's buffers (manifest order)
    start: int     # [start, stop) within that buffer
    stop: int
    offset: int    # logical index of element `start` in the whole perturbation vector


@dataclass(frozen=True)
class _Matrix:
    buf: int
    rows: int
    cols: int
    offset: int


class DirectionSpace:
    """d(seed) for one artifact layout and one spec; bound to a model's buffers at each call."""

    def __init__(self, spec: DirectionSpec, names: Sequence[str], shapes: Sequence[tuple[int, ...]],
                 initial: Sequence[np.ndarray] | None = None):
        self.spec = spec
        sizes = [int(np.prod(s)) for s in shapes]
        begins = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if sizes else []
        chosen = [i for i, n in enumerate(names)
                  if not spec.mask_tensors or re.search(spec.mask_tensors, n)]
        if not chosen:
            raise ValueError(f"mask_tensors={spec.mask_tensors!r} matches none of the trainable tensors "
                             f"({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})")
        self.matrices: list[_Matrix] = []
        pieces: list[_Piece] = []
        if spec.mask_frac < 1.0:
            pieces = self._block_mask(spec, chosen, sizes, begins, initial)
        else:
            for i in chosen:
                shp = tuple(int(d) for d in shapes[i])
                if spec.lowrank and len(shp) == 2 and min(shp) > spec.lowrank:
                    self.matrices.append(_Matrix(i, shp[0], shp[1], int(begins[i])))
                else:
                    pieces.append(_Piece(i, 0, sizes[i], int(begins[i])))
        self.pieces = pieces
        self.n_total = int(sum(sizes))
        self.n_active = int(sum(p.stop - p.start for p in pieces) + sum(m.rows * m.cols for m in self.matrices))
        self._whole = False  # direction_space hands out WHOLE for the dense spec

    @staticmethod
    def _block_mask(spec: DirectionSpec, chosen, sizes, begins, initial) -> list[_Piece]:
        b = spec.mask_block
        blocks = [(i, a, min(a + b, sizes[i])) for i in chosen for a in range(0, sizes[i], b)]
        n_keep = max(1, int(round(spec.mask_frac * len(blocks))))
        if spec.mask_by == "magnitude":
            if initial is None:
                raise ValueError("mask_by=magnitude needs the artifact's initial trainables")
            score = np.array([float(np.max(np.abs(initial[i][a:e]))) for i, a, e in blocks])
        else:  # Philox words: the same draw on every platform and numpy version
            score = rng.words(spec.mask_seed, len(blocks), stream=_STREAM_MASK).astype(np.float64)
        order = np.lexsort((np.arange(len(blocks)), score))  # by score, then by position
        keep = sorted(order[:n_keep].tolist())
        pieces: list[_Piece] = []
        for k in keep:  # merge neighbouring blocks of one tensor into one piece
            i, a, e = blocks[k]
            if pieces and pieces[-1].buf == i and pieces[-1].stop == a:
                p = pieces[-1]
                pieces[-1] = _Piece(i, p.start, e, p.offset)
            else:
                pieces.append(_Piece(i, a, e, int(begins[i]) + a))
        return pieces

    # -- bound to a model's buffers ---------------------------------------------------------
    def _segments(self, buffers) -> tuple[list[np.ndarray], list[int]]:
        return ([buffers[p.buf][p.start:p.stop] for p in self.pieces], [p.offset for p in self.pieces])

    def _lowrank(self, seed: int, m: _Matrix, dist: str) -> np.ndarray:
        r = self.spec.lowrank
        u = np.empty(m.rows * r, np.float32)
        v = np.empty(m.cols * r, np.float32)
        kernels.fill(u, seed, dist, stream=_STREAM_U, offset=m.offset)
        kernels.fill(v, seed, dist, stream=_STREAM_V, offset=m.offset)
        u64 = u.reshape(m.rows, r).astype(np.float64)
        v64 = v.reshape(m.cols, r).astype(np.float64)
        acc = np.zeros((m.rows, m.cols), np.float64)
        for k in range(r):  # exact products, summed in one fixed order: no BLAS
            acc += np.multiply.outer(u64[:, k], v64[:, k])
        return (acc * (1.0 / math.sqrt(r))).astype(np.float32).reshape(-1)

    def perturb(self, buffers, seed: int, scale: float, dist: str = "normal") -> None:
        """theta += float32(scale) * d(seed)."""
        if self._whole:
            kernels.perturb(buffers, seed, scale, dist)
            return
        if self.pieces:
            segs, offs = self._segments(buffers)
            kernels.perturb(segs, seed, scale, dist, offsets=offs)
        if self.matrices:
            c = np.float32(kernels._check_finite(scale, "scale"))
            for m in self.matrices:
                _add_into(buffers[m.buf], c * self._lowrank(seed, m, dist))

    def zo_update(self, buffers, seed: int, eps: float, lr: float, g: float, dist: str = "normal") -> None:
        """After a probe left theta at theta - eps d: theta += (eps - lr g) d (the fused coefficient
        of kernels.zo_update, rounded once)."""
        if self._whole:
            kernels.zo_update(buffers, seed, eps, lr, g, dist)
        else:
            self.perturb(buffers, seed, float(rng.zo_coefficient(eps, lr, g)), dist)

    def replay(self, buffers, seeds, coeffs, dist: str = "normal") -> None:
        """theta += sum_j coeffs[j] d(seeds[j]), seed by seed in order (the same bits as perturbing
        one seed at a time)."""
        if self._whole:
            kernels.replay(buffers, seeds, coeffs, dist)
            return
        seeds = list(seeds)
        c = np.asarray(coeffs, np.float64).astype(np.float32)
        if self.pieces:
            segs, offs = self._segments(buffers)
            kernels.replay(segs, seeds, c, dist, offsets=offs)
        for s, cj in zip(seeds, c):
            for m in self.matrices:
                _add_into(buffers[m.buf], cj * self._lowrank(int(s), m, dist))

    def fill(self, out: np.ndarray, seed: int, dist: str = "normal") -> None:
        """out = d(seed) over the whole trainable vector (zeros outside the space)."""
        if self._whole:
            kernels.fill(out, seed, dist)
            return
        out[:] = 0.0
        for p in self.pieces:
            kernels.fill(out[p.offset:p.offset + p.stop - p.start], seed, dist, offset=p.offset)
        for m in self.matrices:
            out[m.offset:m.offset + m.rows * m.cols] = self._lowrank(seed, m, dist)

    def describe(self) -> str:
        s = self.spec
        if s.dense:
            return f"dense ({self.n_total:,} trainables)"
        parts = []
        if s.mask_tensors:
            parts.append(f"tensors /{s.mask_tensors}/")
        if s.mask_frac < 1.0:
            parts.append(f"{s.mask_by} mask {s.mask_frac:g} in blocks of {s.mask_block}")
        if s.lowrank:
            parts.append(f"rank-{s.lowrank} directions on {len(self.matrices)} matrices")
        return f"{', '.join(parts)}: {self.n_active:,} of {self.n_total:,} trainables move"


def _add_into(flat, delta: np.ndarray) -> None:
    """flat += delta (float32, one rounding per element) on a numpy buffer or a torch tensor (a GPU
    host's trainables): the same bits either way."""
    if isinstance(flat, np.ndarray):
        flat += delta
    else:  # a torch tensor: new_tensor puts delta on its device without importing torch here
        flat.add_(flat.new_tensor(delta))


class WholeVector:
    """The default space, d = z(seed) over every trainable (MeZO): the kernels as they are."""
    spec = DirectionSpec()
    pieces: list = []
    matrices: list = []

    perturb = staticmethod(kernels.perturb)
    zo_update = staticmethod(kernels.zo_update)
    replay = staticmethod(kernels.replay)

    @staticmethod
    def fill(out: np.ndarray, seed: int, dist: str = "normal") -> None:
        kernels.fill(out, seed, dist)

    @staticmethod
    def describe() -> str:
        return "dense"


WHOLE = WholeVector()
_cache: dict[tuple, DirectionSpace] = {}


def direction_space(model, params: Mapping) -> DirectionSpace:
    """The space of `model`'s artifact under the job's (or plan's) params; built once per artifact
    and spec (a block mask by magnitude reads the artifact's initial trainables)."""
    spec = DirectionSpec.from_params(params)
    if spec.dense:
        return WHOLE
    manifest = model.manifest
    key = (str(getattr(model, "dir", "")), manifest.get("n_trainable"), spec)
    space = _cache.get(key)
    if space is None:
        views = model.views
        names = list(views)
        shapes = [tuple(v.shape) for v in views.values()]
        initial = None
        if spec.mask_frac < 1.0 and spec.mask_by == "magnitude":
            from .export.artifact import read_trainable, trainable_views
            init = read_trainable(model.dir, manifest)
            initial = [v.reshape(-1) for v in trainable_views(init, manifest).values()]
        space = _cache[key] = DirectionSpace(spec, names, shapes, initial)
    return space
