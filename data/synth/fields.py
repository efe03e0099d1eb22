"""Smooth random fields, cheap enough for one subject per fraction of a second.

- `LowFreqField`: a sum of separable cosines over a box (bias field, elastic displacement). On a
  grid it is three small matrix products, not a loop over voxels; it can also be read at points.
- `WaveNoise`: band-limited noise from random plane waves, read at arbitrary points in mm
  (lesion texture, nodules, lobulation).
"""
from __future__ import annotations

import numpy as np


class LowFreqField:
    """f(v) = sum_abc c_abc cos(pi a u_x) cos(pi b u_y) cos(pi c u_z), u = (v + 0.5) / n in [0, 1].

    Coefficients fall off as 1 / (1 + a + b + c); the constant term is zero; the field is scaled
    to have roughly `std` over the box.
    """

    def __init__(self, rng: np.random.Generator, shape, order: int, std: float, n_fields: int = 1):
        self.shape = tuple(int(s) for s in shape)
        a = np.arange(order)
        decay = 1.0 / (1.0 + a[:, None, None] + a[None, :, None] + a[None, None, :])  # [o, o, o]
        decay[0, 0, 0] = 0.0
        coef = rng.standard_normal((n_fields, order, order, order)) * decay  # [F, o, o, o]
        # Each cosine term has mean square 1/2 per non-constant axis: normalise the expected power.
        power = (coef ** 2 * 0.5 ** (a[:, None, None] > 0) * 0.5 ** (a[None, :, None] > 0)
                 * 0.5 ** (a[None, None, :] > 0)).sum(axis=(1, 2, 3))  # [F]
        self.coef = coef * (std / np.sqrt(np.maximum(power, 1e-12)))[:, None, None, None]
        self.order = order

    def _basis(self, v: np.ndarray, n: int) -> np.ndarray:
        return np.cos(np.pi * np.arange(self.order)[:, None] * ((np.asarray(v, np.float64) + 0.5) / n)[None])

    def grid(self) -> np.ndarray:
        """The fields on the whole grid, [F, X, Y, Z] float32."""
        return self.on_axes([np.arange(n) for n in self.shape])

    def on_axes(self, axes) -> np.ndarray:
        """The fields on the grid spanned by voxel coordinates along each axis (3 arrays [n_i], may be
        fractional or beyond the box, where the cosines continue smoothly), [F, n0, n1, n2] float32."""
        bx, by, bz = (self._basis(v, n).astype(np.float32) for v, n in zip(axes, self.shape))  # [o, n_i]
        c = self.coef.astype(np.float32)
        t = np.einsum("fabc,ck->fabk", c, bz)  # [F, o, o, Z]
        t = np.einsum("fabk,bj->fajk", t, by)  # [F, o, Y, Z]
        return np.einsum("fajk,ai->fijk", t, bx)  # [F, X, Y, Z]

    def at(self, vox: np.ndarray) -> np.ndarray:
        """The fields at continuous voxel coordinates vox [N, 3] -> [F, N]."""
        vox = np.atleast_2d(vox)
        bx, by, bz = (self._basis(vox[:, i], n) for i, n in enumerate(self.shape))  # [o, N]
        return np.einsum("fabc,an,bn,cn->fn", self.coef, bx, by, bz)


class WaveNoise:
    """Approximately Gaussian, zero-mean, unit-variance noise with wavelength ~`wavelength` (mm)."""

    def __init__(self, rng: np.random.Generator, wavelength: float, n_waves: int = 12, spread: float = 0.25):
        d = rng.standard_normal((n_waves, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        k = 2 * np.pi / (wavelength * np.exp(spread * rng.standard_normal(n_waves)))
        self.k = (d * k[:, None]).astype(np.float32)  # [M, 3] rad/mm
        self.phase = rng.uniform(0, 2 * np.pi, n_waves).astype(np.float32)  # [M]
        self.norm = np.float32(np.sqrt(2.0 / n_waves))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x [..., 3] mm -> [...]."""
        return np.cos(x @ self.k.T + self.phase).sum(-1) * self.norm
