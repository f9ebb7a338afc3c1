"""Quickstart on the embedded digits: train, certify six ways at two noise levels, print the table, plot.

Run through `bash scripts/quickstart.sh` (which also creates the environment). Everything happens in one
process to pay JAX's start-up and compilation once; each step is the library call behind one of the scripts:
  train_score.py / train_classifier.py   -> train.train_and_evaluate
  certify.py                             -> certify_job.run_certification
  analyze.py, denoise_images.py          -> report, figures
Re-running with the same --workdir reuses finished models and records (every step resumes).
"""

import pathlib
import time

import jax
from absl import flags, logging

from scoresmooth_jax import noise
from scoresmooth_jax.certification import certify_job, figures, report
from scoresmooth_jax.datasets import data
from scoresmooth_jax.runtime import cli, xla_cpu
from scoresmooth_jax.runtime.configs_util import load_config
from scoresmooth_jax.training import train
from scoresmooth_jax.modelio import score_models

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/quickstart", "Where models, records and plots go.")
_SIGMAS = flags.DEFINE_list("sigmas", ["0.25", "0.5"], "Noise levels to certify at.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 100, "Test digits to certify.")
_ANNEALED_IMAGES = flags.DEFINE_integer("annealed_images", 50, "Test digits certified with the annealed denoiser "
                                        "(the first ones; the costly rows).")
_N0 = flags.DEFINE_integer("n0", 100, "Selection draws per image.")
_N = flags.DEFINE_integer("n", 1000, "Estimation draws per image (the paper uses 10,000; 1,000 keeps it fast); "
                          "with --sequential the budget n_max.")
_SEQUENTIAL = flags.DEFINE_bool("sequential", True, "Certify sequentially (sequential.certify_sequential, told the "
                                "table's radii): each image stops once more draws could not change at which radius "
                                "of the table it is certified, with the same guarantee; --nosequential draws n for "
                                "every image.")
_ANNEALED_N = flags.DEFINE_integer("annealed_n", 400, "Estimation draws (budget) of the annealed runs: each draw costs "
                                   "L * T score evaluations, so these runs decide the quickstart's time; 400 still "
                                   "certifies up to about 2 sigma (l2).")
_BATCH = flags.DEFINE_integer("batch_size", 250, "Draws per device per step (250 is fastest on a 2-core CPU).")
_SCORE_STEPS = flags.DEFINE_integer("score_steps", 1500, "Score-model training steps (configs/score_digits.py has "
                                    "3000; 1500 gives nearly the same denoising PSNR in half the time).")
_LEVELS = flags.DEFINE_integer("num_levels", 5, "Annealing levels L (the library default is 10).")
_STEPS = flags.DEFINE_integer("steps_per_level", 1, "Annealing steps per level T (the library default is 3): "
                              "L * T score evaluations per draw decide the quickstart's run time.")
_ALPHA = flags.DEFINE_float("alpha", 0.001, "Failure probability of each certificate.")
_RADII = flags.DEFINE_list("radii", ["0", "0.25", "0.5", "0.75", "1.0"], "Radii of the table's columns.")

# name -> (denoiser, noise, classifier): the six ways of the quickstart.
VARIANTS = {
    "no denoiser": ("none", "gaussian", "plain"),
    "one-step": ("one_step", "gaussian", "plain"),
    "annealed gaussian": ("annealed", "gaussian", "plain"),
    "annealed laplace": ("annealed", "laplace", "plain"),
    "annealed uniform": ("annealed", "uniform", "plain"),
    "white-box": ("none", "gaussian", "noise-trained"),
}


def _train(config_file, variant, workdir, **overrides) -> str:
  export = workdir / "export"
  if not (export / "metadata.json").exists():
    start = time.time()
    train.train_and_evaluate(load_config(config_file, variant, **overrides), str(workdir))
    print(f"trained {config_file}:{variant or 'default'} in {time.time() - start:.0f}s -> {export}", flush=True)
  return str(export)


def main(argv):
  del argv
  xla_cpu.apply_recommended_cpu_flags()  # before the first computation starts JAX's backend
  logging.set_verbosity(logging.WARNING)  # checkpointing logs every save at INFO; the progress lines suffice
  root = pathlib.Path(_WORKDIR.value)
  sigmas = [float(s) for s in _SIGMAS.value]
  start = time.time()
  score = _train("configs/score_digits.py", "", root / "score", train__num_steps=_SCORE_STEPS.value)
  plain = _train("configs/classifier_digits.py", "", root / "classifier_plain")
  noise_trained = {s: _train("configs/classifier_digits.py", f"gaussian_{s:g}", root / f"classifier_gaussian_{s:g}")
                   for s in sigmas}
  trained = time.time()

  runs = {}
  for sigma in sigmas:
    for name, (kind, noise_type, which) in VARIANTS.items():
      config = load_config("configs/certify_digits.py")
      with config.unlocked():
        annealed = kind == "annealed"  # the costly rows: fewer images and draws
        config.dataset.max = _ANNEALED_IMAGES.value if annealed else _NUM_IMAGES.value
        config.classifier.path = plain if which == "plain" else noise_trained[sigma]
        config.denoiser.kind = kind
        config.denoiser.score = score
        config.noise.type = noise_type
        config.noise.sigma = sigma
        config.denoiser.num_levels, config.denoiser.steps_per_level = _LEVELS.value, _STEPS.value
        n = _ANNEALED_N.value if annealed else _N.value
        config.certify.n0, config.certify.n, config.certify.alpha = _N0.value, n, _ALPHA.value
        config.certify.batch_size = _BATCH.value
        config.certify.sequential.enabled = _SEQUENTIAL.value
        config.certify.sequential.radii = tuple(float(r) for r in _RADII.value)
      workdir = root / "certify" / f"{name.replace(' ', '_').replace('-', '_')}_sigma{sigma:g}"
      print(f"--- certify: {name}, sigma={sigma:g}", flush=True)
      run = runs[f"{name} sigma={sigma:g}"] = certify_job.run_certification(config, workdir)
      print(f"    {report.draws_summary(run)}", flush=True)
  certified = time.time()

  radii = [float(r) for r in _RADII.value]
  markdown, csv_text = report.table(runs, radii)
  (root / "table.md").write_text(markdown)
  (root / "table.csv").write_text(csv_text)
  for sigma in sigmas:
    report.plot({k: v for k, v in runs.items() if k.endswith(f"sigma={sigma:g}")},
                root / f"curves_sigma{sigma:g}.png", title=f"digits, {_NUM_IMAGES.value} test images, sigma={sigma:g}")
  source = data.get_source("digits", "test")
  images = jax.numpy.stack([source[i][0] for i in range(3)])
  rows = figures.denoising_rows(score_models.load_score(score), images,
                                [noise.make(t, 0.5) for t in ("gaussian", "laplace", "uniform")], jax.random.key(0))
  figures.save_grid(rows, root / "denoising.png")
  budget = (f"n {'up to ' if _SEQUENTIAL.value else ''}{_N.value} ({_ANNEALED_N.value} annealed, L={_LEVELS.value}, "
            f"T={_STEPS.value}){', sequential' if _SEQUENTIAL.value else ''}")
  print(f"\nCertified accuracy (%) of {_NUM_IMAGES.value} test digits (annealed: the first "
        f"{_ANNEALED_IMAGES.value}), n0={_N0.value}, {budget}, "
        f"alpha={_ALPHA.value}; radii in each run's norm (l2 for Gaussian, l1 for Laplace/uniform):\n")
  print(markdown)
  print(f"training {trained - start:.0f}s, certification {certified - trained:.0f}s, total {time.time() - start:.0f}s")
  print(f"wrote {root / 'table.md'}, {root / 'table.csv'}, {root}/curves_sigma*.png, {root / 'denoising.png'}")


if __name__ == "__main__":
  cli.run(main)
