"""Local forward-only training on a device: batches, ZO steps, progress, checkpoints."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from .batching import row_batches
from .data import Example
from .runtime import DeviceModel, save_checkpoint
from .security.dp import device_rng
from .directions import WHOLE
from .zo import (PROBES, DivergedError, ProbeResult, ScalarAccumulator, SeedPool, ZOConfig,
                 gradient_projection_step, probe_only, two_point_step)

__all__ = ["LocalTrainer", "progress_bar"]


def progress_bar(total: int, desc: str, enabled: bool = True):
    """tqdm when installed and wanted, else a silent stand-in with the same methods."""
    if enabled:
        try:
            from tqdm import tqdm
            return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
        except ImportError:
            pass

    class _Quiet:
        def update(self, n=1): ...
        def set_postfix(self, **kw): ...
        def close(self): ...
    return _Quiet()


class LocalTrainer:
    """Runs `steps` ZO steps of MeZO/FedKSeed on a DeviceModel, recording per-seed scalars."""

    def __init__(self, model: DeviceModel, pool: SeedPool, cfg: ZOConfig, progress: bool = True,
                 space=None):
        self.model, self.pool, self.cfg, self.progress = model, pool, cfg, progress
        self.space = space or WHOLE  # which vector a seed stands for (edgefed.directions)

    def _exact_probes(self) -> bool:
        can = hasattr(self.model, "loss_and_grad")
        if self.cfg.probe == "grad" and not can:
            raise ValueError("probe=grad needs a model that can backprop (edgefed device --backend torch)")
        if self.cfg.probe not in PROBES:
            raise ValueError(f"probe={self.cfg.probe!r}: use one of {', '.join(PROBES)}")
        return can and self.cfg.probe != "zo"

    def train(self, examples: Sequence[Example], steps: int, *, batch_size: int | None = None,
              seed: int = 0, probs: np.ndarray | None = None, step_offset: int = 0,
              checkpoint: str | Path | None = None, desc: str = "local ZO",
              acc: ScalarAccumulator | None = None,
              noise_gen: np.random.Generator | None = None) -> ScalarAccumulator:
        """Pass `acc` to keep the record of applied steps even if a step raises.

        With cfg.noise_std > 0 (DP-ZO) every probe's clipped g gets N(0, noise_std^2) from
        `noise_gen`; without one, a generator seeded from os.urandom (edgefed.security.dp.device_rng)."""
        if not examples:
            raise ValueError("no training examples on this device: check --data")
        bs = min(batch_size or self.model.batch_size, len(examples))
        gen = np.random.default_rng(seed)
        acc = acc if acc is not None else ScalarAccumulator(self.pool.k)
        q = max(1, self.cfg.n_perturb)
        noise_std = float(self.cfg.noise_std)
        if noise_std > 0 and noise_gen is None:
            noise_gen = device_rng()
        exact = self._exact_probes()
        scratch = np.empty(self.model.params.size, np.float32) if exact else None
        bar = progress_bar(steps, desc, self.progress)
        # A GPU host's two-point steps run on its device copy of the trainables (zo_session); its
        # exact-gradient steps and every device use the model's own buffers.
        on_device = not exact and getattr(self.model, "zo_on_device", False)
        session = self.model.zo_session() if on_device else contextlib.nullcontext(
            (self.model.buffers, self.model.loss))
        try:
            with session as (self._buffers, self._loss):
                self._steps(examples, steps, bs, gen, acc, q, noise_std, noise_gen, exact, scratch, probs, bar)
        finally:
            bar.close()
            self._buffers = self._loss = None
            if checkpoint is not None:
                save_checkpoint(self.model, checkpoint, {"steps": len(acc.history)})
        return acc

    def _steps(self, examples, steps: int, bs: int, gen, acc, q: int, noise_std: float, noise_gen, exact: bool,
               scratch, probs, bar) -> None:
        draws = row_batches(gen, len(examples), bs, self.cfg.length_buckets,
                            lambda i: self.model.row_length(examples[i]))
        for t in range(steps):
            rows = next(draws)
            batch = self.model.encode([examples[i] for i in rows])
            lr = self.cfg.lr / q
            eps = self.cfg.eps
            grad = None
            if exact:  # one backward pass serves every seed of the step
                loss, grad = self.model.loss_and_grad(batch)
                if not np.isfinite(loss):
                    raise DivergedError(f"loss is {loss} at step {t}; parameters unchanged. Lower lr.")
            if grad is None and self.cfg.n_perturb_max > q:
                for probe in self._adaptive_step(batch, gen, probs, noise_gen):
                    acc.add(probe)
                bar.update(1)
                bar.set_postfix(loss=f"{acc.history[-1].loss:.4f}")
                continue
            for j in self.pool.sample(gen, q, probs):
                noise = float(noise_gen.normal(0.0, noise_std)) if noise_std > 0 else 0.0
                if grad is not None:
                    probe = gradient_projection_step(grad, loss, self._buffers, scratch,
                                                     self.pool.seed(int(j)), int(j), lr,
                                                     self.cfg.dist, self.cfg.clip, noise, self.space)
                else:
                    probe = two_point_step(lambda: self._loss(batch), self._buffers,
                                           self.pool.seed(int(j)), int(j), eps, lr,
                                           self.cfg.dist, self.cfg.clip, noise, self.space)
                acc.add(probe)
            bar.update(1)
            bar.set_postfix(loss=f"{acc.history[-1].loss:.4f}")

    def _adaptive_step(self, batch, gen: np.random.Generator, probs, noise_gen) -> list[ProbeResult]:
        """Variance-adaptive n-SPSA: probes at the same theta on the same batch, at least
        n_perturb and at most n_perturb_max, until the standard error of the mean g is within
        adaptive_tol of |mean g|; then theta moves by -lr/q_t * g_j along each d_j. Each probe
        reports g_j * n_perturb / q_t, so the server's coefficient -lr/n_perturb * G is this step's
        (a step's reports sum to at most n_perturb probes' worth, whatever q_t was)."""
        cfg = self.cfg
        q_min, q_max = max(1, cfg.n_perturb), int(cfg.n_perturb_max)
        noise_std = float(cfg.noise_std)
        probes: list[ProbeResult] = []
        while len(probes) < q_max:
            j = int(self.pool.sample(gen, 1, probs)[0])
            noise = float(noise_gen.normal(0.0, noise_std)) if noise_std > 0 else 0.0
            probes.append(probe_only(lambda: self._loss(batch), self._buffers, self.pool.seed(j), j,
                                     cfg.eps, cfg.dist, cfg.clip, noise, self.space))
            if len(probes) >= max(2, q_min):
                g = np.array([p.g for p in probes])
                if g.std(ddof=1) / np.sqrt(g.size) <= cfg.adaptive_tol * abs(g.mean()):
                    break
        q_t = len(probes)
        for p in probes:  # the same float32 coefficient the server's replay will use
            scaled = float(np.float32(p.g * q_min / q_t))
            coeff = float(np.float32(-cfg.lr / q_min * scaled))
            self.space.perturb(self._buffers, self.pool.seed(p.seed_index), coeff, cfg.dist)
            p.g, p.coeff = scaled, coeff
        return probes
