"""Denoising figures like the paper's Fig. 1: clean, noisy, one-step and the annealed trajectory, per noise."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import jax
import numpy as np

from scoresmooth_jax import denoise, noise as noise_lib


def denoising_rows(score_fn, images: np.ndarray, noises: Sequence[noise_lib.Noise], key, *,
                   sigma_min: float = denoise.DEFAULT_SIGMA_MIN, num_levels: int = denoise.DEFAULT_NUM_LEVELS,
                   steps_per_level: int = denoise.DEFAULT_STEPS_PER_LEVEL,
                   relative_step: float = denoise.DEFAULT_RELATIVE_STEP, snapshots: int = 4):
  """For each noise and image: (title, [clean, noisy, one-step or None, trajectory snapshots...]) rows."""
  rows = []
  for k, nz in enumerate(noises):
    y = images + np.asarray(nz.sample(jax.random.fold_in(key, k), images.shape))
    sigmas = denoise.default_sigmas(nz, sigma_min, num_levels)
    step = relative_step * float(sigmas[-1]) ** 2
    levels = np.asarray(jax.jit(lambda y: denoise.annealed_trajectory(score_fn, y, nz, sigmas, step,
                                                                       steps_per_level))(y))
    one = np.asarray(denoise.one_step(score_fn, y, nz.sigma)) if isinstance(nz, noise_lib.Gaussian) else None
    picks = np.unique(np.linspace(0, len(levels) - 1, snapshots).round().astype(int))
    for i in range(len(images)):
      panels = [images[i], y[i], None if one is None else one[i]] + [levels[j][i] for j in picks]
      rows.append((f"{nz.name} sigma={nz.sigma:g}", panels, [f"level {j + 1}" for j in picks]))
  return rows


def save_grid(rows, path) -> pathlib.Path:
  """Draws ``denoising_rows`` output as a PNG grid (images clipped to [0, 1] for display)."""
  import matplotlib  # optional extra "plot"
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  cols = len(rows[0][1])
  fig, axes = plt.subplots(len(rows), cols, figsize=(1.3 * cols, 1.35 * len(rows)), squeeze=False)
  for r, (title, panels, level_names) in enumerate(rows):
    names = ["clean", "noisy", "one-step"] + level_names
    for c, panel in enumerate(panels):
      ax = axes[r][c]
      ax.set_xticks([])
      ax.set_yticks([])
      if panel is None:  # one-step (Tweedie) exists only for Gaussian noise
        ax.text(0.5, 0.5, "n/a\n(Gaussian only)", ha="center", va="center", fontsize=6, transform=ax.transAxes)
        ax.set_frame_on(False)
      else:
        image = np.clip(panel, 0.0, 1.0)
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
      if r == 0 or rows[r - 1][0] != title:
        ax.set_title(names[c], fontsize=7)
      if c == 0:
        ax.set_ylabel(title, fontsize=6)
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
