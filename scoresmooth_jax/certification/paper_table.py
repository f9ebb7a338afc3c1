"""The paper's Table 1 protocol: certification at several sigmas, best certified accuracy over sigma per radius.

Tables of randomized smoothing (Cohen et al. 2019, Table 1 of the paper this package reimplements, Salman et
al. 2020) certify every image at each noise level sigma in {0.12, 0.25, 0.5, 1.0} with n0 = 100, N = 10,000
(or 100,000), alpha = 0.001, and report, at each l2 radius r, the best certified accuracy over sigma: a
larger sigma certifies larger radii, a smaller one is more accurate near r = 0.

Promises:
  * ``Row`` names one smoothed classifier: a classifier export (``{sigma}`` in its path picks a per-sigma
    classifier, e.g. one noise-trained at each sigma for white-box smoothing) and an optional score model
    (then the one-step denoiser sits in front of it).
  * ``job_config`` is the certification job of one (row, sigma): the same job the package runs everywhere
    (``certify_job``), with sequential certification told the table's radii, so each image stops once more
    draws could not change at which reported radius it is certified; the table is that of N draws per image
    up to the sequential procedure's alpha split (``sequential`` module docstring), at a fraction of the draws.
  * ``best_over_sigma`` takes, per radius, the maximum over sigma of the certified accuracy of each sigma's
    own records, and says which sigma won; ``markdown`` lays out our rows beside ``PUBLISHED``.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from scoresmooth_jax.certification import report
from scoresmooth_jax.runtime import config_schema

PAPER_SIGMAS = (0.12, 0.25, 0.5, 1.0)
PAPER_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
# Certified accuracy (%) on CIFAR-10 at l2 radius 0.25 ... 1.5, best over sigma, ResNet-110, as printed in
# Table 1 of "Efficient randomized smoothing by denoising with learned score function" (N = 10,000).
PUBLISHED_RADII = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
PUBLISHED = {
    "white-box smoothing (Cohen et al., 2019)": (59, 45, 31, 21, 18, 13),
    "denoised smoothing, query access (Salman et al., 2020)": (45, 20, 15, 13, 11, 10),
    "denoised smoothing, full access (Salman et al., 2020)": (56, 41, 28, 19, 16, 13),
    "the paper (one-step score denoiser)": (60, 42, 28, 19, 11, 6),
}


@dataclasses.dataclass(frozen=True)
class Row:
  """One smoothed classifier of the table.

  Attributes:
    name: the row's label (also its folder name under the workdir).
    classifier: a classifier export; ``{sigma}`` is replaced by each sigma (``:g``-formatted, e.g. 0.25).
    score: a score model (export directory or shipped name) for the one-step denoiser; None: no denoiser.
  """

  name: str
  classifier: str
  score: str | None = None

  def classifier_at(self, sigma: float) -> str:
    return self.classifier.replace("{sigma}", f"{sigma:g}")

  @property
  def folder(self) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in self.name)


def parse_row(text: str) -> Row:
  """``NAME=CLASSIFIER`` (no denoiser) or ``NAME=CLASSIFIER@SCORE`` (one-step with that score model)."""
  name, sep, rest = text.partition("=")
  classifier, _, score = rest.partition("@")
  if not sep or not name.strip() or not classifier.strip():
    raise ValueError(f"--row {text!r}: expected NAME=CLASSIFIER or NAME=CLASSIFIER@SCORE, e.g. "
                     "'one-step=exports/resnet44@cifar10-cpu' or 'white-box=exports/resnet20_noise{sigma}'.")
  return Row(name.strip(), classifier.strip(), score.strip() or None)


def parse_caps(items: Sequence[str]) -> dict[float, int]:
  """``["0.12=50"]`` -> {0.12: 50}: fewer images at some sigmas."""
  caps = {}
  for item in items:
    sigma, sep, count = item.partition("=")
    try:
      caps[float(sigma)] = int(count)
    except ValueError:
      sep = ""
    if not sep or caps.get(float(sigma), 0) < 1:
      raise ValueError(f"--images_at {item!r}: expected SIGMA=COUNT with COUNT >= 1, e.g. 0.12=50.")
  return caps


def job_config(row: Row, sigma: float, *, dataset: str, num_images: int, n0: int, n: int, alpha: float,
               batch_size: int, radii: Sequence[float], seed: int = 0):
  """The certification job (``config_schema.certification_config`` keys) of ``row`` at noise level ``sigma``."""
  config = config_schema.certification_config()
  config.dataset.name, config.dataset.split = dataset, "test"
  config.dataset.skip, config.dataset.max = 1, num_images
  config.classifier.path = row.classifier_at(sigma)
  config.denoiser.kind = "one_step" if row.score else "none"
  config.denoiser.score = row.score or ""
  config.noise.type, config.noise.sigma = "gaussian", float(sigma)
  config.certify.update(dict(n0=n0, n=n, alpha=alpha, batch_size=batch_size, seed=seed))
  config.certify.sequential.update(dict(enabled=True, radii=tuple(float(r) for r in radii)))
  config.lock()
  return config


def run_dir(root, row: Row, sigma: float) -> pathlib.Path:
  return pathlib.Path(root) / row.folder / f"sigma_{sigma:g}"


def largest_certifiable(sigma: float, n: int, alpha: float) -> float:
  """The largest l2 radius any image can reach at this sigma: every one of the n draws a hit, at the last
  look's level of the sequential plan (so sigma 0.12 with N = 10,000 tops out near r = 0.38)."""
  from scoresmooth_jax import noise, sequential

  return sequential.largest_radius(noise.Gaussian(sigma), sequential.plan(n, alpha))


@dataclasses.dataclass(frozen=True)
class Best:
  """Best certified accuracy over sigma at each radius, and the sigma that gave it (nan, None: no records)."""

  accuracy: np.ndarray        # float64, one per radius
  sigma: tuple                # the winning sigma per radius (the smallest on a tie)


def best_over_sigma(runs: Mapping[float, Sequence[Mapping]], radii: Sequence[float]) -> Best:
  """Per radius, the largest certified accuracy among the sigmas' runs (each over its own records)."""
  sigmas = sorted(s for s, recs in runs.items() if recs)
  if not sigmas:
    return Best(np.full(len(radii), np.nan), (None,) * len(radii))
  table = np.stack([report.certified_accuracy(runs[s], radii) for s in sigmas])  # [sigma, radius]
  winner = np.argmax(table, axis=0)  # the first maximum: the smallest sigma on a tie
  return Best(table[winner, np.arange(len(radii))], tuple(sigmas[i] for i in winner))


def _cell(value: float) -> str:
  return "" if math.isnan(value) else f"{100 * value:.1f}"


def markdown(results: Mapping[str, Mapping[float, Sequence[Mapping]]], radii: Sequence[float], *, n: int,
             alpha: float, n0: int) -> str:
  """The whole report: best over sigma beside the published rows, then each row's per-sigma table and draws."""
  radii = [float(r) for r in radii]
  header = "| row | " + " | ".join(f"r={r:g}" for r in radii) + " |"
  rule = "|---|" + "---|" * len(radii)
  lines = [f"Certified accuracy (%), l2, best over sigma at each radius; n0 = {n0}, N = {n:,}, alpha = {alpha:g}.",
           "", header, rule]
  bests = {name: best_over_sigma(runs, radii) for name, runs in results.items()}
  for name, best in bests.items():
    lines.append(f"| {name} (ours) | " + " | ".join(_cell(a) for a in best.accuracy) + " |")
  for name, values in PUBLISHED.items():
    published = dict(zip(PUBLISHED_RADII, values))
    lines.append(f"| {name} | " + " | ".join(f"{published[r]:g}" if r in published else "" for r in radii) + " |")
  # No sigma certifies anything there: no winner to name.
  winners = [f"{name}: " + ", ".join("-" if s is None or not a > 0 else f"{s:g}"
                                     for s, a in zip(best.sigma, best.accuracy)) for name, best in bests.items()]
  lines += ["", "Winning sigma per radius: " + "; ".join(winners) + ".", ""]
  lines += ["Sequential certification told these radii: each image drew until more draws (up to N) could not "
            "change at which of them it is certified, with alpha split over the looks; the table is that of "
            f"N = {n:,} draws per image within sampling, at the draws below.", ""]
  for name, runs in results.items():
    lines += [f"## {name}", "", "| sigma | images | largest certifiable r | " + " | ".join(f"r={r:g}" for r in radii)
              + " | draws per image | hours |", "|---|---|---|" + "---|" * len(radii) + "---|---|"]
    for sigma in sorted(runs):
      recs = runs[sigma]
      acc = report.certified_accuracy(recs, radii) if recs else np.full(len(radii), np.nan)
      draws = np.mean([r.get("n0", 0) + r["n"] for r in recs]) if recs else float("nan")
      budget = np.mean([r.get("n0", 0) + r.get("n_max", r["n"]) for r in recs]) if recs else n0 + n  # as recorded
      hours = sum(float(r.get("time", 0.0)) for r in recs) / 3600
      lines.append(f"| {sigma:g} | {len(recs)} | {largest_certifiable(sigma, n, alpha):.2f} | "
                   + " | ".join(_cell(a) for a in acc)
                   + (f" | {draws:,.0f} of {budget:,.0f} | {hours:.2f} |" if recs else " | | |"))
    lines.append("")
  return "\n".join(lines)


def best_csv(results: Mapping[str, Mapping[float, Sequence[Mapping]]], radii: Sequence[float]) -> str:
  """Best over sigma as CSV: one line per row (ours, then published), certified accuracy in %."""
  lines = ["row," + ",".join(f"r={float(r):g}" for r in radii)]
  for name, runs in results.items():
    lines.append(f"{name} (ours)," + ",".join(_cell(a) for a in best_over_sigma(runs, radii).accuracy))
  for name, values in PUBLISHED.items():
    published = dict(zip(PUBLISHED_RADII, values))
    lines.append(f"\"{name}\"," + ",".join(f"{published[float(r)]:g}" if float(r) in published else ""
                                           for r in radii))
  return "\n".join(lines) + "\n"


def plot(results: Mapping[str, Mapping[float, Sequence[Mapping]]], path, max_radius: float = 1.6):
  """Certified accuracy vs radius: each row's per-sigma curves (thin) and best over sigma (thick), with the
  published rows as markers at their radii."""
  import matplotlib  # the optional "plot" extra
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  grid = np.linspace(0.0, max_radius, 321)
  fig, ax = plt.subplots(figsize=(7.2, 4.6))
  for k, (name, runs) in enumerate(results.items()):
    color = f"C{k}"
    for sigma, recs in sorted(runs.items()):
      if recs:
        ax.plot(grid, report.certified_accuracy(recs, grid), color=color, lw=0.7, alpha=0.5)
    ax.plot(grid, best_over_sigma(runs, grid).accuracy, color=color, lw=2.0, label=f"{name} (best over sigma)")
  for k, (name, values) in enumerate(PUBLISHED.items()):
    ax.plot(PUBLISHED_RADII, np.asarray(values) / 100, ls="none", marker="osD^"[k % 4], color="0.3",
            mfc="none", label=name)
  ax.set_xlabel("l2 radius")
  ax.set_ylabel("certified accuracy")
  ax.set_xlim(0.0, max_radius)
  ax.set_ylim(0.0, 1.0)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6)
  fig.tight_layout()
  path = pathlib.Path(path)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
