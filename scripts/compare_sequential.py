"""Sequential vs fixed-n certification of the quickstart's digits models, on the same test images.

  python scripts/compare_sequential.py --workdir workdirs/sequential \
      --classifier workdirs/quickstart/classifier_plain/export --score workdirs/quickstart/score/export
(train the two models first with `bash scripts/quickstart.sh`, which writes them there). For every denoiser and
sigma it runs certification jobs: fixed n = n_max (Cohen et al.), decision mode at r = sigma, radius mode told
the table's radii (max_radius = the largest) and, with --procedures=...,radius_tolerance, radius mode with
the default tolerance and that max_radius alone; then prints (and writes to
<workdir>/comparison.md) the draws per image and the certified accuracy of each. Every job resumes, so the
command can be stopped and run again; --procedures picks a subset.
"""

import pathlib

from absl import flags

from scoresmooth_jax.certification import certify_job, report
from scoresmooth_jax.runtime import cli, xla_cpu
from scoresmooth_jax.runtime.configs_util import load_config

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/sequential", "Where the records and the table go.")
_CLASSIFIER = flags.DEFINE_string("classifier", "workdirs/quickstart/classifier_plain/export", "Classifier export.")
_SCORE = flags.DEFINE_string("score", "workdirs/quickstart/score/export", "Score-model export.")
_DENOISERS = flags.DEFINE_list("denoisers", ["none", "one_step"], "Denoisers to compare under.")
_SIGMAS = flags.DEFINE_list("sigmas", ["0.25", "0.5"], "Gaussian noise levels.")
_PROCEDURES = flags.DEFINE_list("procedures", ["fixed", "decision", "radius"], "Which jobs to run.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 100, "Test digits (the first ones) to certify.")
_N0 = flags.DEFINE_integer("n0", 100, "Selection draws per image.")
_N_MAX = flags.DEFINE_integer("n_max", 100_000, "Fixed n, and the sequential budget.")
_ALPHA = flags.DEFINE_float("alpha", 0.001, "Failure probability of each certificate.")
_BATCH = flags.DEFINE_integer("batch_size", 1000, "Draws per device per step.")
_RADII = flags.DEFINE_list("radii", ["0", "0.25", "0.5", "0.75", "1.0"], "Radii of the table; the largest is "
                           "radius mode's max_radius.")


def _config(denoiser: str, sigma: float, procedure: str):
  config = load_config("configs/certify_digits.py", classifier__path=_CLASSIFIER.value, denoiser__score=_SCORE.value,
                       denoiser__kind=denoiser, noise__sigma=sigma, dataset__max=_NUM_IMAGES.value,
                       certify__n0=_N0.value, certify__n=_N_MAX.value, certify__alpha=_ALPHA.value,
                       certify__batch_size=_BATCH.value)
  with config.unlocked():
    if procedure != "fixed":
      config.certify.sequential.enabled = True
    if procedure == "decision":
      config.certify.sequential.radius = sigma
    elif procedure == "radius":  # the defaults, told which radii the table reports
      config.certify.sequential.radii = tuple(float(r) for r in _RADII.value)
      config.certify.sequential.max_radius = max(float(r) for r in _RADII.value)
    elif procedure == "radius_tolerance":  # the defaults without the table's radii: the default tolerance
      config.certify.sequential.max_radius = max(float(r) for r in _RADII.value)
  return config


def main(argv):
  del argv
  xla_cpu.apply_recommended_cpu_flags()
  root = pathlib.Path(_WORKDIR.value)
  radii = [float(r) for r in _RADII.value]
  lines = [f"{_NUM_IMAGES.value} test digits, n0 = {_N0.value}, n_max = fixed n = {_N_MAX.value:,}, alpha = "
           f"{_ALPHA.value}; certified accuracy (%) at each radius (decision mode answers only at r = sigma).", "",
           "| denoiser | sigma | procedure | draws/image | % of fixed | "
           + " | ".join(f"r={r:g}" for r in radii) + " |", "|" + "---|" * (5 + len(radii))]
  for denoiser in _DENOISERS.value:
    for sigma in (float(s) for s in _SIGMAS.value):
      for procedure in _PROCEDURES.value:
        print(f"--- {denoiser}, sigma={sigma:g}, {procedure}", flush=True)
        recs = certify_job.run_certification(_config(denoiser, sigma, procedure),
                                             root / f"{denoiser}_sigma{sigma:g}" / procedure, progress_every_s=60)
        used = sum(r["n0"] + r["n"] for r in recs) / len(recs)
        share = sum(r["n0"] + r["n"] for r in recs) / sum(r["n0"] + r.get("n_max", r["n"]) for r in recs)
        accuracy = report.certified_accuracy(recs, radii)
        cells = [f"{100 * a:.0f}" if procedure != "decision" or r == sigma else "" for r, a in zip(radii, accuracy)]
        lines.append(f"| {denoiser} | {sigma:g} | {procedure} | {used:,.0f} | {100 * share:.1f} | "
                     + " | ".join(cells) + " |")
  text = "\n".join(lines) + "\n"
  (root / "comparison.md").write_text(text)
  print(text)


if __name__ == "__main__":
  cli.run(main)
